"""Batch inference on Ray Data (pipelines/predict.py --images): the same detections as the
single-process mode, from a folder, from shards and from s3://; unreadable images recorded and
counted; scoring a bucket equal to pipelines/evaluate.py.

One private Ray cluster (2 CPUs, loopback, token auth) serves the whole module: its start-up is
most of the time here. The jobs run in this process (``predict.main``), as a user's script would.
"""

from __future__ import annotations

import builtins
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import TINY_CLASSES

from ssd.batch_inference import (
    IMAGE_COLUMNS,
    ImageDecodeError,
    ImageResult,
    Preparer,
    decode_image,
    detection_table,
    drawn_names,
    image_table,
)
from ssd.data.convert import make_synthetic_shards
from ssd.jobs.batch_predict import Progress

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 12
#: the VOC-mini images (tests marked integration use them)
VOC_MINI = Path("/work/shared/datasets/voc2007-mini/VOCdevkit/VOC2007")


def _pipeline(name: str):
    """Import ``pipelines/<name>.py`` as a module (its ``main`` runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"_batch_pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict_cli = _pipeline("predict")
evaluate_cli = _pipeline("evaluate")


def _predict(*argv: str) -> dict:
    return predict_cli.main(predict_cli.get_args_parser().parse_args(list(argv)))


# --------------------------------------------------------------------------------------------
# Fixtures: one Ray cluster, the synthetic data in both layouts (classes of tiny_checkpoint)
# --------------------------------------------------------------------------------------------

#: what ssd.distributed.cluster.connect sets in this process; restored when the module is done
_RAY_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
                  "RAY_API_SERVER_ADDRESS", "RAY_USAGE_STATS_ENABLED")


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A private local Ray cluster for the module (what the jobs attach to). Its processes get
    the AWS variables of ``s3_server``, as a user's cluster gets the user's: set before it starts."""
    import ray

    from ssd.distributed.cluster import connect
    from ssd.distributed.ray_internals import reload_settings

    saved = {k: os.environ.get(k) for k in (*_RAY_VARIABLES, "RAY_TQDM_PATCH_PRINT", *s3_server.env)}
    os.environ.update(s3_server.env)
    original_print = builtins.print
    connect("local", num_cpus=2, quiet=True)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()
        # the jobs ran in this process: Ray Data must not have left its print in place
        # (it did before RAY_TQDM_PATCH_PRINT=0, breaking a later test's pickle of print)
        patched, builtins.print = builtins.print, original_print
        assert patched is original_print, f"builtins.print left replaced by {patched!r}"
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reload_settings(single_machine=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """The synthetic val split (classes renamed to tiny_checkpoint's) in both layouts, each
    with its shards (``root/val``) and source (``root/source``)."""
    root = tmp_path_factory.mktemp("batch-data")
    for layout in ("coco", "voc"):
        make_synthetic_shards(root / layout, {"val": NUM_IMAGES}, layout=layout, workers=0, progress=False,
                              log=lambda _: None, class_names=TINY_CLASSES)
    return {"coco": root / "coco", "voc": root / "voc"}


@pytest.fixture(scope="module")
def folder(data, tmp_path_factory) -> Path:
    """The COCO-layout JPEGs, a PNG of another size, a text file, and a broken JPEG."""
    from PIL import Image

    target = tmp_path_factory.mktemp("batch-images") / "photos"
    shutil.copytree(data["coco"] / "source" / "coco" / "val", target)
    first = min(target.glob("*.jpg"))
    Image.open(first).convert("RGB").resize((150, 90)).save(target / "b-wide.png")
    (target / "notes.txt").write_text("not an image, and not listed")
    (target / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    return target


def _read(out: Path | str, name: str):
    from ssd import storage

    return pq.read_table(__import__("io").BytesIO(storage.read_bytes(storage.join(str(out), name))))


def _assert_same_as_single_process(detections, images, single: dict) -> None:
    """Parquet tables == detections.json of the single-process mode, image by image."""
    by_file = {image["file"]: image for image in single["images"]}
    rows = detections.to_pylist()
    for image in images.to_pylist():
        if image["error"]:
            continue
        want = by_file[image["path"]]
        assert (image["width"], image["height"]) == (want["width"], want["height"])
        got = [r for r in rows if r["path"] == image["path"]]
        assert len(got) == image["detections"] == len(want["detections"]) > 0, image["path"]
        # each detection has its equal: float32 values exact, or a few ulps apart (another batch,
        # another thread count); in any order, as exactly tied scores may come in another order
        free = list(got)
        for w in want["detections"]:
            same = [g for g in free if (g["label"], g["class_name"]) == (w["label"], w["class_name"])
                    and g["score"] == pytest.approx(w["score"], abs=1e-5)
                    and [g["x1"], g["y1"], g["x2"], g["y2"]] == pytest.approx(w["box"], rel=1e-6, abs=1e-5)]
            assert same, (image["path"], w)
            free.remove(same[0])
        scores = [g["score"] for g in got]
        assert scores == sorted(scores, reverse=True), image["path"]  # by descending score


# --------------------------------------------------------------------------------------------
# Without Ray: the parts
# --------------------------------------------------------------------------------------------


def test_decode_and_prepare_match_the_detectors_preprocessing(tiny_checkpoint, folder):
    from ssd.serving import Detector

    detector = Detector.from_checkpoint(tiny_checkpoint)
    preparer = Preparer(detector.cfg)
    for path in (sorted(folder.glob("*.jpg"))[1], folder / "b-wide.png"):
        row = preparer({"index": 3, "path": str(path), "image_id": -1})
        batch, sizes = detector.preprocess([predict_cli.load_image(path, 0)])
        assert row["error"] == "" and np.array_equal(row["image"], batch[0].numpy())
        assert (row["height"], row["width"]) == tuple(sizes[0].tolist())
    broken = preparer({"index": 0, "path": str(folder / "broken.jpg"), "image_id": -1})
    assert broken["error"].startswith("not a readable image") and (broken["width"], broken["height"]) == (0, 0)
    missing = preparer({"index": 0, "path": str(folder / "gone.jpg"), "image_id": -1})
    assert missing["error"].startswith("cannot read the file") and "gone.jpg" in missing["error"]
    with pytest.raises(ImageDecodeError, match="not a readable image"):
        decode_image(b"")


def test_tables_rows_and_names():
    results = [
        ImageResult(0, "/a/x.jpg", -1, 40, 30, "", np.array([2, 1]), np.array([0.9, 0.5], np.float32),
                    np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32)),
        ImageResult(1, "/a/bad.jpg", -1, 0, 0, "not a readable image (x)", np.zeros(0, np.int64),
                    np.zeros(0, np.float32), np.zeros((0, 4), np.float32)),
    ]
    table = detection_table(results, ["cat", "dog"]).to_pylist()
    assert table == [
        {"path": "/a/x.jpg", "label": 2, "class_name": "dog", "score": pytest.approx(0.9), "x1": 1.0, "y1": 2.0,
         "x2": 3.0, "y2": 4.0},
        {"path": "/a/x.jpg", "label": 1, "class_name": "cat", "score": 0.5, "x1": 5.0, "y1": 6.0, "x2": 7.0,
         "y2": 8.0},
    ]
    images = image_table(results)
    assert images.column_names == list(IMAGE_COLUMNS)
    assert images.column("detections").to_pylist() == [2, 0] and images.column("error").to_pylist()[0] == ""
    assert drawn_names(["/a/x.jpg", "s3://b/x.JPEG", "/c/x.png", "u/shard-000000.tar#k1"]) == [
        "x.jpg", "x-1.jpg", "x.png", "k1.jpg"]


def test_progress_lines_give_rate_and_eta():
    lines: list[str] = []
    progress = Progress(10, every_s=0.0, emit=lines.append)
    progress.start -= 2.0  # 2 s ago
    progress.update(4)
    assert lines[0].startswith("progress: 4/10 images (40 %), ") and "images/s, ETA " in lines[0]
    rate = float(lines[0].split(", ")[1].split()[0])
    assert rate == pytest.approx(2.0, rel=0.05)
    assert lines[0].endswith(f"ETA {6 / rate:.0f} s")


def test_actor_reservation_leaves_room_for_decoding():
    from ssd.distributed.batch_predict import DECODE_CPUS, actor_cpus
    from ssd.jobs.common import JobError

    assert actor_cpus(8, 2, 2.0, gpu=False) == 2.0
    assert actor_cpus(2, 2, 1.0, gpu=False) == pytest.approx((2 - DECODE_CPUS) / 2)
    with pytest.raises(JobError, match="lower --actors"):
        actor_cpus(2, 20, 1.0, gpu=False)
    with pytest.raises(JobError, match="the Ray cluster has 2"):
        actor_cpus(2, 2, 1.0, gpu=True)


def test_bad_requests_fail_before_ray_naming_the_flag(tiny_checkpoint, folder, tmp_path):
    cases = [
        (["--images", str(tmp_path / "nowhere")], "--images"),
        (["--images", str(tmp_path)], "no image files"),
        (["--images", str(folder), "--actors", "0"], "--actors must be >= 1"),
        (["--images", str(folder), "--annotations", str(tmp_path / "gt.json")], "--annotations"),
        (["--images", str(folder), "--annotations", str(tmp_path)], "not a COCO JSON file"),
        (["--images", str(folder), "--image-set", "test"], "--image-set needs --annotations"),
        (["--images", str(folder), "--device", "cpu"], "--gpu"),
        (["--images", str(folder), str(folder)], "not both"),
        ([], "--images"),
    ]
    import ray

    for argv, needle in cases:
        with pytest.raises(SystemExit) as err:
            _predict("--model", str(tiny_checkpoint), *argv, "--out", str(tmp_path / "out"))
        assert str(err.value).startswith("error: ") and needle in str(err.value), (argv, err.value)
    with pytest.raises(SystemExit, match="--model"):
        _predict("--model", str(tmp_path / "no-model"), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert not ray.is_initialized()  # all refused before Ray started


# --------------------------------------------------------------------------------------------
# On Ray
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def champion(mlflow_server, tiny_checkpoint):
    """tiny_checkpoint registered as ``ssd-batch`` version 1, aliased ``champion``."""
    import mlflow

    from ssd.mlflow_model import log_ssd_model

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("ssd-batch-train"), run_name="train")
    info = log_ssd_model(run.info.run_id, mlflow_server, tiny_checkpoint, register_as="ssd-batch",
                         torch_flavour=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_alias("ssd-batch", "champion", info["version"])
    return "models:/ssd-batch@champion"


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_folder_with_the_registered_champion_equals_single_process_predict(
        ray_cluster, mlflow_server, champion, tiny_checkpoint, folder, tmp_path, monkeypatch, capsys):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test (the job sets them)
    out = tmp_path / "batch"
    summary = _predict("--model", champion, "--mlflow-uri", mlflow_server, "--images", str(folder), "--out", str(out),
                       "--actors", "2", "--batch-size", "3", "--draw", "2")
    printed = capsys.readouterr().out
    files = sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))
    assert (summary["name"], summary["version"], summary["images"]) == ("ssd-batch", "1", len(files))
    broken = str(folder / "broken.jpg")
    assert summary["unreadable"] == 1 and summary["unreadable_images"][0]["path"] == broken
    assert f"unreadable: {broken}: not a readable image" in printed and "images/s, ETA" in printed
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(summary))

    images, detections = _read(out, "images.parquet"), _read(out, "detections.parquet")
    assert images.column("path").to_pylist() == [str(p) for p in files]  # input order
    assert detections.num_rows == summary["detections"] == sum(images.column("detections").to_pylist())
    errors = dict(zip(images.column("path").to_pylist(), images.column("error").to_pylist()))
    assert errors[broken].startswith("not a readable image") and sum(bool(e) for e in errors.values()) == 1

    readable = [str(p) for p in files if str(p) != broken]
    single = _predict("--model", str(tiny_checkpoint), *readable, "--out", str(tmp_path / "single"),
                      "--device", "cpu", "--no-draw", "--batch-size", "4")
    _assert_same_as_single_process(detections, images, single)

    from PIL import Image

    drawn = sorted((out / "drawn").iterdir())
    assert [p.name for p in drawn] == sorted(summary["drawn"]) and len(drawn) == 2
    first = next(image for image in single["images"] if Path(image["file"]).name == summary["drawn"][0])
    assert Image.open(out / "drawn" / summary["drawn"][0]).size == (first["width"], first["height"])


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_voc_bucket_scores_like_evaluate_on_the_converted_shards(ray_cluster, tiny_checkpoint, data, tmp_path,
                                                                  capsys):
    """The VOC layout's JPEGImages scored against its annotations == pipelines/evaluate.py on the
    shards converted from the same annotations (COCO suite and VOC07)."""
    devkit = data["voc"] / "source" / "voc" / "VOCdevkit" / "VOCsynthetic"
    summary = _predict("--model", str(tiny_checkpoint), "--images", str(devkit / "JPEGImages"),
                       "--out", str(tmp_path / "out"), "--annotations", str(devkit), "--image-set", "val")
    printed = capsys.readouterr().out
    evaluated = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
        ["--model", str(tiny_checkpoint), "--data", str(data["voc"] / "val"), "--device", "cpu"]))
    scoring = summary["scoring"]
    assert scoring["scored"] == NUM_IMAGES and scoring["not_annotated"] == [] and scoring["unreadable"] == []
    _assert_same_metrics(scoring["metrics"], evaluated)
    assert scoring["metrics"]["VOC07"]["mAP"] == pytest.approx(evaluated["VOC07"]["mAP"], abs=1e-9)
    assert evaluated["AR100"] > 0 and evaluated["VOC07"]["mAP"] > 0  # real numbers, not zeros
    assert f"VOC07 mAP (11-point): {evaluated['VOC07']['mAP']:.4f}" in printed


def _assert_same_metrics(got: dict, want: dict) -> None:
    from ssd.evaluation import COCO_STAT_NAMES

    for name in COCO_STAT_NAMES:
        assert got[name] == pytest.approx(want[name], abs=1e-9), name
    assert got["per_class_AP"] == pytest.approx(want["per_class_AP"], abs=1e-9)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_shards_in_equal_files_in_and_score_by_image_id(ray_cluster, tiny_checkpoint, data, tmp_path):
    """Shards as input: the same detections as the single-process mode on the source files, and
    a COCO JSON scored by image id, equal to pipelines/evaluate.py on those shards."""
    root = data["coco"]
    annotations = root / "source" / "coco" / "annotations" / "instances_val.json"
    summary = _predict("--model", str(tiny_checkpoint), "--images", str(root / "val"), "--out", str(tmp_path / "out"),
                       "--batch-size", "5", "--annotations", str(annotations))
    images, detections = _read(tmp_path / "out", "images.parquet"), _read(tmp_path / "out", "detections.parquet")
    assert summary["images"] == NUM_IMAGES and summary["unreadable"] == 0
    assert all(path.startswith(str(root / "val" / "shard-")) and "#" in path
               for path in images.column("path").to_pylist())
    # the same images as files: map shard sample -> file through the COCO image ids
    source = json.loads(annotations.read_text())
    file_of = {image["id"]: str(root / "source" / "coco" / "val" / image["file_name"]) for image in source["images"]}
    single = _predict("--model", str(tiny_checkpoint), *sorted(file_of.values()), "--out", str(tmp_path / "single"),
                      "--device", "cpu", "--no-draw")
    renamed = {path: file_of[image_id] for path, image_id in
               zip(images.column("path").to_pylist(), images.column("image_id").to_pylist())}
    import pyarrow as pa

    images = images.set_column(0, "path", pa.array([renamed[p] for p in images.column("path").to_pylist()]))
    detections = detections.set_column(0, "path", pa.array([renamed[p] for p in detections.column("path").to_pylist()]))
    _assert_same_as_single_process(detections, images, single)

    evaluated = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
        ["--model", str(tiny_checkpoint), "--data", str(root / "val"), "--device", "cpu"]))
    assert summary["scoring"]["scored"] == NUM_IMAGES and "VOC07" not in summary["scoring"]["metrics"]
    _assert_same_metrics(summary["scoring"]["metrics"], evaluated)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_s3_in_and_out(ray_cluster, s3_server, tiny_checkpoint, folder, tmp_path):
    """Images under an s3:// prefix (a real S3-compatible server), outputs to another prefix:
    the same tables as from the local folder."""
    files = sorted(folder.glob("*.jpg"))[:4]
    for path in files:
        s3_server.client.upload_file(str(path), s3_server.bucket, f"in/{path.name}")
    prefix = f"s3://{s3_server.bucket}"
    summary = _predict("--model", str(tiny_checkpoint), "--images", f"{prefix}/in", "--out", f"{prefix}/out",
                       "--draw", "1")
    assert summary["images"] == 4 and summary["unreadable"] == 0
    assert sorted(s3_server.keys("out/")) == sorted(
        ["out/detections.parquet", "out/images.parquet", "out/summary.json", f"out/drawn/{files[0].name}"])
    images, detections = _read(f"{prefix}/out", "images.parquet"), _read(f"{prefix}/out", "detections.parquet")
    assert images.column("path").to_pylist() == [f"{prefix}/in/{p.name}" for p in files]
    single = _predict("--model", str(tiny_checkpoint), *map(str, files), "--out", str(tmp_path / "single"),
                      "--device", "cpu", "--no-draw")
    for image in single["images"]:  # name the local files as the bucket's objects
        image["file"] = f"{prefix}/in/{Path(image['file']).name}"
    _assert_same_as_single_process(detections, images, single)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(not VOC_MINI.is_dir(), reason="needs the VOC-mini dataset")
@pytest.mark.timeout(600)
def test_voc_mini_scores_like_evaluate(ray_cluster, tiny_checkpoint, tmp_path):
    """Real VOC2007 images and annotations: 24 of the test set's images plus 4 that are not in
    it; scored == pipelines/evaluate.py on shards converted from those 24 annotations."""
    from ssd.data.convert import convert
    from ssd.data.voc import VocReader

    test_ids = (VOC_MINI / "ImageSets" / "Main" / "test.txt").read_text().split()[:24]
    other = sorted({p.stem for p in (VOC_MINI / "JPEGImages").glob("*.jpg")} - set(test_ids))[:4]
    devkit = tmp_path / "VOCdevkit" / "VOC2007"
    (devkit / "ImageSets" / "Main").mkdir(parents=True)
    (devkit / "ImageSets" / "Main" / "test.txt").write_text("".join(f"{i}\n" for i in test_ids))
    (devkit / "JPEGImages").mkdir()
    for image_id in test_ids + other:
        os.symlink(VOC_MINI / "JPEGImages" / f"{image_id}.jpg", devkit / "JPEGImages" / f"{image_id}.jpg")
    os.symlink(VOC_MINI / "Annotations", devkit / "Annotations")
    # the tiny model with VOC's classes: same weights as tiny_checkpoint, 20 classes
    import torch

    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.data.voc import VOC_CLASSES
    from ssd.models import build_model

    cfg = load_config("tiny", [f"model.num_classes={len(VOC_CLASSES) + 1}"])
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "voc-model", model=build_model(cfg), epoch=1, step=1, config=cfg,
                            classes=list(VOC_CLASSES))
    convert(VocReader(devkit.parent, "2007:test"), tmp_path / "shards", workers=0, progress=False, log=lambda _: None)
    summary = _predict("--model", str(model), "--images", str(devkit / "JPEGImages"), "--out", str(tmp_path / "out"),
                       "--annotations", str(devkit))
    evaluated = evaluate_cli.main(evaluate_cli.get_args_parser().parse_args(
        ["--model", str(model), "--data", str(tmp_path / "shards"), "--device", "cpu"]))
    scoring = summary["scoring"]
    assert scoring["scored"] == evaluated["images"] == 24 and len(scoring["not_annotated"]) == 4
    _assert_same_metrics(scoring["metrics"], evaluated)
    assert scoring["metrics"]["VOC07"]["mAP"] == pytest.approx(evaluated["VOC07"]["mAP"], abs=1e-9)


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_gpu_actor_detects_like_the_cpu(ray_cluster, tiny_checkpoint, folder, tmp_path):
    """--gpu: the model and the post-processing on the actor's GPU; the best detections of each
    image as on the CPU (cuDNN's convolutions round differently, hence the tolerances)."""
    import torch

    if not torch.cuda.is_available() or ray_cluster.get("GPU", 0) < 1:
        pytest.skip("needs a CUDA device")
    runs = {}
    for name, flags in (("cpu", []), ("gpu", ["--gpu"])):
        summary = _predict("--model", str(tiny_checkpoint), "--images", str(folder), "--out", str(tmp_path / name),
                           *flags)
        assert summary["device"] == name and summary["unreadable"] == 1
        runs[name] = _read(tmp_path / name, "detections.parquet").to_pylist()
    def close(a: dict, b: dict) -> bool:  # same detection up to rounding (near-ties may swap places)
        return a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-3 and all(
            abs(a[k] - b[k]) < 0.5 for k in ("x1", "y1", "x2", "y2"))

    for path in {row["path"] for row in runs["cpu"]}:
        cpu, gpu = ([r for r in runs[k] if r["path"] == path] for k in ("cpu", "gpu"))
        assert all(any(close(g, c) for c in cpu) for g in gpu[:5]), path


def test_module_keeps_ray_out_of_ssd_imports():
    """The Ray-free parts stay Ray-free (ARCHITECTURE.md's import rule)."""
    import subprocess

    code = ("import sys, ssd.batch_inference, ssd.jobs.batch_predict, ssd.evaluation.bucket; "
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True)
    assert out.stdout.strip() == "False"
