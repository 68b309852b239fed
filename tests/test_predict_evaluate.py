"""Using trained and registered models: ssd.scoring, pipelines/predict.py and the model mode of
pipelines/evaluate.py (offline on a checkpoint folder, and against a real MLflow server)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssd.checkpoint import save_checkpoint
from ssd.config import load_config
from ssd.data.convert import make_synthetic_shards
from ssd.data.shards import ShardSet, read_samples
from ssd.data.synthetic import CLASSES
from ssd.evaluation import COCO_STAT_NAMES, coco_evaluate, voc_evaluate
from ssd.evaluation.service import evaluate_on_shards as evaluate_model
from ssd.evaluation.service import flat_metrics
from ssd.models import build_model
from ssd.scoring import evaluate_checkpoint
from ssd.serving import Detector

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24


def _pipeline(name: str):
    """Import ``pipelines/<name>.py`` as a module (its ``main`` runs in-process: no start-up)."""
    spec = importlib.util.spec_from_file_location(f"_pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict_cli = _pipeline("predict")
evaluate_cli = _pipeline("evaluate")


def _checkpoint(path: Path, classes: list[str]) -> Path:
    cfg = load_config("tiny", [f"model.num_classes={len(classes) + 1}"])
    torch.manual_seed(0)
    return save_checkpoint(path, model=build_model(cfg), epoch=1, step=10, config=cfg, classes=classes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("model") / "ckpt", list(CLASSES))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic val split in the COCO and the VOC layout: ``{"coco": root, "voc": root}``,
    shards in ``root/val``, the source dataset in ``root/source``."""
    root = tmp_path_factory.mktemp("data")
    for layout in ("coco", "voc"):
        make_synthetic_shards(root / layout, {"val": NUM_IMAGES}, layout=layout, workers=0, progress=False,
                              log=lambda _: None)
    return {"coco": root / "coco", "voc": root / "voc"}


def _rows_by_image(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        out[row["image"]].append(row)
    return out


def _assert_same_detections(got: list[dict], want: list[dict], where: str) -> None:
    """``got``: detections.json entries; ``want``: Detector / pyfunc rows of that image."""
    assert len(got) == len(want), where
    for g, w in zip(got, want):
        assert (g["label"], g["class_name"]) == (w["label"], w["class_name"]), where
        assert g["score"] == pytest.approx(w["score"], abs=1e-5), where
        # pixels up to a few hundred: 1e-6 relative is a few float32 ulps
        assert g["box"] == pytest.approx([w["x1"], w["y1"], w["x2"], w["y2"]], rel=1e-6, abs=1e-5), where


def _assert_same_metrics(got: dict, want: dict, *, with_areas: bool = True) -> None:
    names = COCO_STAT_NAMES if with_areas else ("AP", "AP50", "AP75", "AR1", "AR10", "AR100")
    for name in names:
        assert got[name] == pytest.approx(want[name], abs=1e-9), name
    assert got["per_class_AP"] == pytest.approx(want["per_class_AP"], abs=1e-9)
    assert got["per_class_AP50"] == pytest.approx(want["per_class_AP50"], abs=1e-9)


# --------------------------------------------------------------------------------------------
# ssd.scoring
# --------------------------------------------------------------------------------------------


def test_voc_shards_get_voc07_and_the_coco_suite_as_training_reports_them(checkpoint, data):
    from ssd.training import Validation

    spec = str(data["voc"] / "val")
    result = evaluate_checkpoint(checkpoint, spec, batch_size=1)
    shard_set = ShardSet.open(spec)
    assert set(COCO_STAT_NAMES) <= set(result)
    assert list(result["per_class_AP"]) == list(CLASSES) and len(result["pr_curve50"]["recall"]) == 101
    assert set(result["VOC07"]) == {"mAP", "per_class_AP"} and list(result["VOC07"]["per_class_AP"]) == list(CLASSES)
    assert result["data"] == spec and result["images"] == NUM_IMAGES
    assert result["data_hash"] == shard_set.info["content_hash"] and len(result["data_hash"]) == 64
    # an untrained model, but not a trivial result: the checks below compare real numbers
    assert result["AR100"] > 0 and result["VOC07"]["mAP"] > 0

    # Independent path: raw shard samples (no loader, no transform of targets), the serving
    # Detector on the encoded bytes, and the functional metrics on hand-built ground truth.
    samples = list(read_samples(shard_set))
    detector = Detector.from_checkpoint(checkpoint)
    rows = _rows_by_image(detector.predict([jpg for _, jpg, _ in samples], batch_size=1))
    truths, dets, gt = [], [], {"images": [], "annotations": [], "categories": []}
    gt["categories"] = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    results = []
    for index, (_, _, meta) in enumerate(samples):
        truths.append({"boxes": torch.tensor(meta["boxes"]).reshape(-1, 4), "labels": torch.tensor(meta["labels"]),
                       "difficult": torch.tensor(meta["difficult"], dtype=torch.bool)})
        mine = rows.get(index, [])
        dets.append({"boxes": torch.tensor([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in mine]).reshape(-1, 4),
                     "scores": torch.tensor([r["score"] for r in mine]),
                     "labels": torch.tensor([r["label"] for r in mine], dtype=torch.int64)})
        gt["images"].append({"id": meta["image_id"], "width": meta["width"], "height": meta["height"]})
        for (x1, y1, x2, y2), label, hard in zip(meta["boxes"], meta["labels"], meta["difficult"]):
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": meta["image_id"],
                                      "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                      "area": (x2 - x1) * (y2 - y1), "iscrowd": int(hard)})
        results += [{"image_id": meta["image_id"], "category_id": r["label"], "score": r["score"],
                     "bbox": [r["x1"], r["y1"], r["x2"] - r["x1"], r["y2"] - r["y1"]]} for r in mine]
    voc = voc_evaluate(truths, dets, list(CLASSES), use_07_metric=True)
    assert result["VOC07"]["mAP"] == pytest.approx(voc["mAP"], abs=1e-9)
    assert result["VOC07"]["per_class_AP"] == pytest.approx(voc["per_class_AP"], abs=1e-9, nan_ok=True)
    _assert_same_metrics(result, coco_evaluate(gt, results))

    # And exactly what a training run's validation reports for the same model and shards.
    model, cfg = detector.model, detector.cfg
    validation = Validation(cfg, shard_set, torch.device("cpu"), 1).run(model)
    train_coco, train_voc = validation.coco, validation.voc
    assert {k: v for k, v in result.items() if k not in ("VOC07", "data", "data_hash", "images")} == train_coco
    assert result["VOC07"] == train_voc  # every class has ground truth here: no NaN
    # evaluate_model itself: same numbers at another batch size (up to batched-conv rounding);
    # no VOC07 for COCO-layout shards
    again = evaluate_model(model, cfg, shard_set, batch_size=7)
    assert again["AP"] == pytest.approx(result["AP"], abs=1e-4)
    assert again["AR100"] == pytest.approx(result["AR100"], abs=1e-3)
    assert "VOC07" not in evaluate_model(model, cfg, ShardSet.open(data["coco"] / "val"), batch_size=32)
    flat = flat_metrics(result)
    assert flat["mAP"] == flat["AP"] == result["AP"] and flat["VOC07_mAP"] == result["VOC07"]["mAP"]
    assert flat["AP/circle"] == result["per_class_AP"]["circle"]


def test_class_order_mismatch_is_an_error_naming_both_lists(data, tmp_path):
    swapped = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    ckpt = _checkpoint(tmp_path / "swapped", swapped)
    spec = str(data["voc"] / "val")
    with pytest.raises(ValueError) as err:
        evaluate_checkpoint(ckpt, spec)
    assert str(swapped) in str(err.value) and str(list(CLASSES)) in str(err.value) and spec in str(err.value)
    # The pipeline: status 1, the message on stderr, nothing on stdout, no traceback.
    done = subprocess.run([sys.executable, "pipelines/evaluate.py", "--model", str(ckpt), "--data", spec],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: ") or "\nerror: " in done.stderr, done.stderr
    assert str(swapped) in done.stderr and str(list(CLASSES)) in done.stderr and "Traceback" not in done.stderr


def test_evaluate_cli_model_mode_matches_scoring_predict_output_with_the_source_annotations(
        checkpoint, data, tmp_path, capsys):
    """Model mode on COCO-layout shards == predict.py's detections on the source images scored
    by the detections-file mode against the ORIGINAL COCO annotation file."""
    root = data["coco"]
    args = evaluate_cli.get_args_parser().parse_args(
        ["--model", str(checkpoint), "--data", str(root / "val"), "--batch-size", "1", "--device", "cpu",
         "--output", str(tmp_path / "eval.json")])
    result = evaluate_cli.main(args)
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and json.loads(printed) == result
    assert json.loads((tmp_path / "eval.json").read_text()) == result
    assert (result["model"], result["name"], result["version"]) == (str(checkpoint), None, None)
    assert "VOC07" not in result and result["images"] == NUM_IMAGES

    predicted = predict_cli.main(predict_cli.get_args_parser().parse_args(
        ["--model", str(checkpoint), str(root / "source" / "coco" / "val"), "--out", str(tmp_path / "pred"),
         "--batch-size", "1", "--device", "cpu", "--no-draw"]))
    annotations = root / "source" / "coco" / "annotations" / "instances_val.json"
    source = json.loads(annotations.read_text())
    image_ids = {image["file_name"]: image["id"] for image in source["images"]}
    category_ids = {category["name"]: category["id"] for category in source["categories"]}
    assert len(predicted["images"]) == len(image_ids) == NUM_IMAGES
    results = [{"image_id": image_ids[Path(image["file"]).name], "category_id": category_ids[d["class_name"]],
                "score": d["score"], "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0],
                                              d["box"][3] - d["box"][1]]}
               for image in predicted["images"] for d in image["detections"]]
    (tmp_path / "results.json").write_text(json.dumps(results))
    capsys.readouterr()
    from_files = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
        ["--coco-gt", str(annotations), "--detections", str(tmp_path / "results.json")]))
    assert result["AR100"] > 0
    _assert_same_metrics(result, from_files)


def test_evaluate_cli_errors_name_the_thing(checkpoint, data, tmp_path, monkeypatch, free_port):
    parse = evaluate_cli.get_args_parser().parse_args
    cases = [
        (["--model", str(tmp_path / "nowhere"), "--data", str(data["voc"] / "val")], str(tmp_path / "nowhere")),
        (["--model", str(checkpoint), "--data", str(tmp_path / "no-shards")], str(tmp_path / "no-shards")),
        (["--model", str(checkpoint)], "--data"),
        (["--model", str(checkpoint), "--data", "x", "--coco-gt", "gt.json"], "cannot be combined"),
        ([], "--coco-gt"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as err:
            evaluate_cli.main(parse(argv))
        assert str(err.value).startswith("error: ") and needle in str(err.value), (argv, err.value)
    # --log-to-mlflow is an explicit request: an unreachable server is an error, the result kept
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as err:
        evaluate_cli.main(parse(["--model", str(checkpoint), "--data", str(data["voc"] / "val"), "--log-to-mlflow",
                                 "--mlflow-uri", dead, "--output", str(tmp_path / "kept.json")]))
    assert str(err.value).startswith("error: logging the evaluation to MLflow at " + dead)
    assert json.loads((tmp_path / "kept.json").read_text())["VOC07"]["mAP"] > 0


# --------------------------------------------------------------------------------------------
# pipelines/predict.py
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(data, tmp_path_factory) -> dict[str, object]:
    """A folder of 3 JPEGs, a PNG and a text file, and a separate RGBA PNG of another size."""
    root = tmp_path_factory.mktemp("images")
    folder = root / "folder"
    folder.mkdir()
    jpgs = sorted((data["coco"] / "source" / "coco" / "val").glob("*.jpg"))[:3]
    for path in jpgs:
        shutil.copy(path, folder / path.name)
    Image.open(jpgs[0]).convert("RGB").resize((150, 90)).save(folder / "b-wide.png")
    (folder / "notes.txt").write_text("not an image")
    single = root / "single.PNG"
    Image.open(jpgs[1]).convert("RGBA").resize((77, 133)).save(single, format="PNG")
    expanded = sorted([folder / p.name for p in jpgs] + [folder / "b-wide.png"]) + [single]
    return {"folder": folder, "single": single, "expanded": expanded}


def _predict(*argv: str) -> dict:
    return predict_cli.main(predict_cli.get_args_parser().parse_args(list(argv)))


def test_predict_writes_all_detections_and_draws_at_original_size(checkpoint, images, tmp_path, capsys):
    out = tmp_path / "out"
    result = _predict("--model", str(checkpoint), str(images["folder"]), str(images["single"]), "--out", str(out),
                      "--batch-size", "2", "--device", "cpu", "--score-threshold", "0.3")
    lines = capsys.readouterr().out.splitlines()
    files = images["expanded"]
    assert [Path(image["file"]) for image in result["images"]] == files  # folder expanded, sorted, no .txt
    assert json.loads((out / "detections.json").read_text()) == result
    assert result["classes"] == list(CLASSES) and (result["name"], result["version"]) == (None, None)
    # the detections are everything the detector returns for those images, not the drawn subset
    want = _rows_by_image(Detector.from_checkpoint(checkpoint).predict(files, batch_size=2))
    assert all(len(want[i]) > 0 for i in range(len(files)))
    drawn_any = False
    for index, (path, image) in enumerate(zip(files, result["images"])):
        _assert_same_detections(image["detections"], want[index], str(path))
        original = Image.open(path)
        assert (image["width"], image["height"]) == original.size
        drawn = Image.open(out / image["drawn"])
        assert drawn.size == original.size and drawn.mode == "RGB"
        assert image["drawn"] == path.stem + (".jpg" if path.suffix.lower() == ".jpg" else ".png")
        drawn_any |= any(d["score"] >= 0.3 for d in image["detections"])
        assert any(line.startswith(f"{path}: ") for line in lines)
    assert drawn_any, "no detection above the threshold: the drawing is not exercised"
    # The threshold only filters what is drawn: above every score, the PNG comes back untouched.
    # A BMP (which torchvision cannot decode) of the same pixels gives the same detections.
    bmp = tmp_path / "b-wide.bmp"
    Image.open(images["folder"] / "b-wide.png").save(bmp)
    plain = _predict("--model", str(checkpoint), str(images["folder"] / "b-wide.png"), str(bmp), "--out",
                     str(tmp_path / "plain"), "--device", "cpu", "--score-threshold", "1.5", "--batch-size", "1")
    assert plain["images"][1]["detections"] == plain["images"][0]["detections"]
    assert [image["drawn"] for image in plain["images"]] == ["b-wide.png", "b-wide-1.png"]  # same stem
    as_rows = [{"label": d["label"], "class_name": d["class_name"], "score": d["score"],
                **dict(zip(("x1", "y1", "x2", "y2"), d["box"]))}
               for d in result["images"][files.index(images["folder"] / "b-wide.png")]["detections"]]
    _assert_same_detections(plain["images"][0]["detections"], as_rows, "threshold 1.5")  # batch 1 vs 2
    untouched = np.asarray(Image.open(tmp_path / "plain" / "b-wide.png"))
    assert np.array_equal(untouched, np.asarray(Image.open(images["folder"] / "b-wide.png").convert("RGB")))
    assert not np.array_equal(np.asarray(Image.open(out / "b-wide.png")), untouched)


def test_predict_errors_name_the_file(checkpoint, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a JPEG")
    with pytest.raises(SystemExit) as err:
        _predict("--model", str(checkpoint), str(images["single"]), str(broken), "--out", str(tmp_path / "o"),
                 "--device", "cpu", "--no-draw")
    assert str(err.value).startswith(f"error: {broken}: not a readable image")
    assert not (tmp_path / "o" / "detections.json").exists()
    for argv, needle in [([str(tmp_path / "missing.png")], str(tmp_path / "missing.png")),
                         ([str(tmp_path / "o")], "has no image files")]:
        with pytest.raises(SystemExit) as err:
            _predict("--model", str(checkpoint), *argv, "--out", str(tmp_path / "o2"))
        assert str(err.value).startswith("error: ") and needle in str(err.value)
    with pytest.raises(SystemExit, match=r"^error: --model .*nowhere"):
        _predict("--model", str(tmp_path / "nowhere"), str(images["single"]), "--out", str(tmp_path / "o3"))


# --------------------------------------------------------------------------------------------
# Registered models, against a real MLflow server
# --------------------------------------------------------------------------------------------


def _restore_mlflow_http_settings(monkeypatch) -> None:
    """The pipelines set MLflow's HTTP retry settings for their process (``setdefault``): undo
    that after the test, so that other test modules see the environment they started with."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # records the value to restore


@pytest.fixture(scope="module")
def registered(mlflow_server, checkpoint):
    """The tiny checkpoint logged, registered as ``ssd-test`` version 1, aliased ``champion``."""
    import mlflow

    from ssd.mlflow_model import log_ssd_model

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("ssd-train"), run_name="train")
    info = log_ssd_model(run.info.run_id, mlflow_server, checkpoint, register_as="ssd-test", torch_flavour=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_alias("ssd-test", "champion", info["version"])
    return info


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_registered_champion_predicts_like_the_detector_and_the_pyfunc(
        mlflow_server, registered, checkpoint, images, tmp_path, monkeypatch):
    import mlflow

    _restore_mlflow_http_settings(monkeypatch)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_model prepends the model's code dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    files = images["expanded"]
    result = _predict("--model", "models:/ssd-test@champion", *map(str, files), "--out", str(tmp_path / "out"),
                      "--mlflow-uri", mlflow_server, "--device", "cpu", "--no-draw")
    assert (result["model"], result["name"], result["version"]) == ("models:/ssd-test@champion", "ssd-test", "1")
    local = _rows_by_image(Detector.from_checkpoint(checkpoint).predict(files))
    frame = mlflow.pyfunc.load_model("models:/ssd-test@champion").predict([str(p) for p in files])
    served = _rows_by_image(frame.to_dict("records"))
    for index, image in enumerate(result["images"]):
        assert len(local[index]) > 0
        _assert_same_detections(image["detections"], local[index], f"{files[index]} vs Detector")
        _assert_same_detections(image["detections"], served[index], f"{files[index]} vs pyfunc")


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_evaluate_logs_the_run_and_tags_the_registered_version(mlflow_server, registered, data, capsys, monkeypatch):
    import mlflow

    _restore_mlflow_http_settings(monkeypatch)
    spec = str(data["voc"] / "val")
    result = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
        ["--model", "models:/ssd-test/1", "--data", spec, "--log-to-mlflow", "--mlflow-uri", mlflow_server,
         "--device", "cpu"]))
    assert json.loads(capsys.readouterr().out) == result
    assert (result["name"], result["version"]) == ("ssd-test", "1")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    tags = client.get_model_version("ssd-test", "1").tags
    assert tags["eval/val/mAP"] == f"{result['AP']:.6f}" and tags["eval/val/AP50"] == f"{result['AP50']:.6f}"
    assert tags["eval/val/VOC07_mAP"] == f"{result['VOC07']['mAP']:.6f}"
    assert tags["eval/val/data_hash"] == result["data_hash"] and tags["eval/val/run_id"] == result["mlflow_run_id"]

    run = client.get_run(result["mlflow_run_id"])
    assert run.info.run_name == "evaluate ssd-test/1 on val" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "ssd-ray-eval"
    assert run.data.params == {"model": "models:/ssd-test/1", "data": spec, "data_hash": result["data_hash"],
                               "images": str(NUM_IMAGES)}
    assert run.data.metrics["AP"] == pytest.approx(result["AP"]) and run.data.metrics["mAP"] == run.data.metrics["AP"]
    assert run.data.metrics["VOC07_mAP"] == pytest.approx(result["VOC07"]["mAP"])
    assert run.data.metrics["AP/circle"] == pytest.approx(result["per_class_AP"]["circle"])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["evaluation.json"]
    # the metrics are attached to the logged model, with the dataset they were measured on
    model_id = registered["model_uri"].removeprefix("models:/")  # the version's source, an MLflow 3 logged model
    linked = {m.key: m for m in client.get_logged_model(model_id).metrics or []}
    assert linked["AP"].value == pytest.approx(result["AP"]) and linked["AP"].dataset_name == "val"
    assert linked["AP"].dataset_digest == result["data_hash"][:36] and linked["AP"].run_id == run.info.run_id


def test_evaluation_with_loader_workers_and_autocast_matches_the_plain_one(checkpoint, data):
    """Training's validation reads with its own loader workers (the images arrive interleaved)
    and runs the network under the run's autocast: the first must change nothing, the second
    only what bf16 rounds (on the CPU here; bf16 on a GPU)."""
    from ssd.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model)
    shard_set = ShardSet.open(str(data["voc"] / "val"))
    plain = evaluate_model(model, ckpt.config, shard_set, "cpu", 4)
    workers = evaluate_model(model, ckpt.config, shard_set, "cpu", 4, num_workers=2)
    _assert_same_metrics(workers, plain)
    assert workers["VOC07"]["mAP"] == plain["VOC07"]["mAP"]
    amp = evaluate_model(model, ckpt.config, shard_set, "cpu", 4, amp_dtype=torch.bfloat16)
    assert amp["AP50"] == pytest.approx(plain["AP50"], abs=0.05) and amp["AR100"] > 0


def test_validation_really_uses_its_loader_workers_and_autocast(checkpoint, data, monkeypatch):
    """The two options reach the loader and the network (the test above only shows they change
    no result): the loader is built with the workers, the network's outputs are bf16."""
    from ssd.checkpoint import load_checkpoint
    from ssd.evaluation import service

    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt.config)
    model.load_state_dict(ckpt.model)
    workers, dtypes = [], []
    real_loader = service.ShardLoader
    monkeypatch.setattr(service, "ShardLoader",
                        lambda stream, batch, num_workers=0: workers.append(num_workers) or real_loader(
                            stream, batch, num_workers=num_workers))
    model.register_forward_hook(lambda module, args, out: dtypes.append(out[1].dtype))
    evaluate_model(model, ckpt.config, ShardSet.open(str(data["voc"] / "val")), "cpu", 4, num_workers=2,
                   amp_dtype=torch.bfloat16)
    assert workers == [2] and set(dtypes) == {torch.bfloat16}
