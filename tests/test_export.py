"""ONNX export (``ssd.export``, ``ssd.onnx_postprocess``, ``pipelines/export.py``): onnxruntime
against PyTorch on real images, for every preset; the CLI against a real MLflow registry."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssd.boxes import decode
from ssd.config import load_config
from ssd.models import build_model
from ssd.onnx_postprocess import postprocess_outputs
from ssd.postprocess import PostprocessConfig, postprocess
from ssd.serving import Detector, to_image_tensor

pytest.importorskip("onnxruntime", reason="onnxruntime is a test extra (pip install -e .[test])")

from ssd.export import (  # after the importorskip: these tests need onnxruntime
    NMS_OUTPUTS,
    RAW_OUTPUTS,
    ExportableSSD,
    OnnxMismatch,
    check_onnx,
    export_onnx,
    onnx_session,
    read_metadata,
    reference_outputs,
)

REPO = Path(__file__).resolve().parents[1]
VOC_IMAGES = REPO.parent / "shared/datasets/voc2007-mini/VOCdevkit/VOC2007/JPEGImages"
#: the slow presets, random init (no pretrained backbone to download)
PRESETS = ["ssd300_vgg16", "ssd512_vgg16", "mobilenetv1_ssd300", "mobilenetv2_ssdlite300"]


def _pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"_pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_cli = _pipeline("export")


def _real_images(count: int) -> list[torch.Tensor]:
    """``count`` real photographs (VOC-mini) as uint8 (3, H, W); the synthetic data's images when
    the shared datasets are absent (a fresh clone without ../shared)."""
    if VOC_IMAGES.is_dir():
        files = sorted(VOC_IMAGES.glob("*.jpg"))[:count]
        return [to_image_tensor(path, i) for i, path in enumerate(files)]
    from ssd.data.synthetic import render_sample

    return [render_sample(i, seed=7)[0] for i in range(count)]


def _model(preset: str, classes: int | None = None) -> tuple[torch.nn.Module, object, list[str]]:
    overrides = [] if preset == "tiny" else ["model.backbone_weights=none"]
    if classes is not None:
        overrides.append(f"model.num_classes={classes + 1}")
    cfg = load_config(preset, overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    _calibrate_batchnorm(model, cfg)
    return model.eval(), cfg, [f"class{i}" for i in range(1, cfg.model.num_classes)]


def _calibrate_batchnorm(model: torch.nn.Module, cfg) -> None:
    """Batch-norm running statistics from a few real images, as training would leave them.

    At random init the MobileNets' activations shrink layer by layer (the running statistics
    are 0 and 1), their class logits are all ~0 and the scores tie at 1 / (C + 1): no test of
    which detection wins could tell right from wrong. With statistics of real activations they
    spread as a trained network's do."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batch
    batch, _ = Detector(model, cfg, [f"c{i}" for i in range(1, cfg.model.num_classes)]).preprocess(_real_images(4))
    from ssd.engine import network_input

    model.train()
    with torch.no_grad():
        model(network_input(batch, cfg, torch.device("cpu"), torch.contiguous_format))
    model.eval()
    for norm in norms:
        # The deepest maps (3x3 .. 1x1) give a channel 4 to 36 values: some variances come out
        # near 0 and their gains amplify float32 rounding to ~1e-4 at the outputs (PyTorch
        # against itself in float64), which no trained network does. A floor at the layer's
        # mean variance bounds the gains.
        norm.running_var.clamp_(min=float(norm.running_var.mean()))


def _assert_same_detections(got: dict[str, np.ndarray], want: dict[str, torch.Tensor], where: str) -> None:
    """The same detections: equal counts, and a one-to-one pairing with equal labels, scores to
    1e-4 and boxes to 1e-4 of the image. Paired in order where the order is decided: detections
    whose scores differ by less than the two runtimes' float noise (up to ~1e-5 for the
    MobileNets) may come in either order."""
    want_boxes, want_scores, want_labels = (want[k].numpy() for k in ("boxes", "scores", "labels"))
    assert len(got["scores"]) == len(want_scores), where
    assert np.all(np.diff(got["scores"]) <= 0), f"{where}: scores not in descending order"
    tolerance = 1e-4 * max(float(np.abs(want_boxes).max()) if len(want_boxes) else 1.0, 1.0)
    unpaired = np.ones(len(want_scores), dtype=bool)
    for i in range(len(got["scores"])):
        fits = (unpaired & (want_labels == got["labels"][i]) & (np.abs(want_scores - got["scores"][i]) <= 1e-4)
                & (np.abs(want_boxes - got["boxes"][i]).max(axis=1) <= tolerance))
        assert fits.any(), (f"{where}: detection {i} (label {got['labels'][i]}, score {got['scores'][i]:.6f}, "
                            f"box {got['boxes'][i]}) has no counterpart; PyTorch's #{i}: label {want_labels[i]}, "
                            f"score {want_scores[i]:.6f}, box {want_boxes[i]}")
        j = i if fits[i] else int(np.flatnonzero(fits)[0])
        unpaired[j] = False


def _onnx_detections(outputs: dict[str, np.ndarray], sizes: torch.Tensor) -> list[dict[str, np.ndarray]]:
    """The padded in-graph-NMS outputs -> per image detections in pixels of ``sizes`` (h, w)."""
    out = []
    for i, (height, width) in enumerate(sizes.tolist()):
        count = int(outputs["num_detections"][i])
        assert not outputs["scores"][i, count:].any() and not outputs["labels"][i, count:].any()
        boxes = outputs["boxes"][i, :count] * np.array([width, height, width, height], dtype=np.float32)
        out.append({"boxes": boxes, "scores": outputs["scores"][i, :count], "labels": outputs["labels"][i, :count]})
    return out


def _run(session, batch: torch.Tensor) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"images": batch.numpy()})))


def _export_both(model, cfg, classes, folder: Path, exporter: str = "dynamo") -> tuple[Path, Path]:
    """The graph with NMS and the one without, written in ``folder``."""
    return (export_onnx(model, cfg, classes, folder / "nms.onnx", exporter=exporter),
            export_onnx(model, cfg, classes, folder / "raw.onnx", nms=False, exporter=exporter))


def _check_preset(model, cfg, classes, files: tuple[Path | None, Path], images: list[torch.Tensor]) -> None:
    """Both graphs of one model (or only the one without NMS when ``files[0]`` is None) against
    PyTorch on ``images`` (batch 1, then all of them, in one session each): raw outputs to 1e-4,
    detections equal to the project's (``Detector``)."""
    detector = Detector(model, cfg, classes)
    batch, sizes = detector.preprocess(images)  # uint8 (B, 3, S, S): the evaluation's resize
    want = detector.predict_tensors(images)  # PyTorch: boxes in pixels of the original images
    chunks = [slice(0, 1), slice(0, len(images))]  # batch 1 and batch B through one session

    if files[0] is not None:
        with_nms = onnx_session(files[0])
        assert [o.name for o in with_nms.get_outputs()] == list(NMS_OUTPUTS)
        assert isinstance(with_nms.get_inputs()[0].shape[0], str), "the batch size is baked into the graph"
        for chunk in chunks:
            got = _onnx_detections(_run(with_nms, batch[chunk]), sizes[chunk])
            for i, (g, w) in enumerate(zip(got, want[chunk])):
                _assert_same_detections(g, w, f"in-graph NMS, image {chunk.start + i}")

    raw = onnx_session(files[1])
    assert [o.name for o in raw.get_outputs()] == list(RAW_OUTPUTS)
    assert isinstance(raw.get_inputs()[0].shape[0], str), "the batch size is baked into the graph"
    meta = read_metadata(raw)
    params = {"score_threshold": float(meta["ssd.score_threshold"]), "nms_iou": float(meta["ssd.nms_iou"]),
              "pre_nms_top_k": int(meta["ssd.pre_nms_top_k"]), "top_k": int(meta["ssd.top_k"])}
    for chunk in chunks:
        got = _run(raw, batch[chunk])
        ref_boxes, ref_scores = reference_outputs(model, cfg, batch[chunk])
        assert got["boxes"].shape == (chunk.stop - chunk.start, cfg.priors.num_priors(), 4)
        np.testing.assert_allclose(got["boxes"], ref_boxes.numpy(), rtol=0, atol=1e-4)
        np.testing.assert_allclose(got["scores"], ref_scores.numpy(), rtol=0, atol=1e-4)
        detections = postprocess_outputs(got["boxes"], got["scores"], image_sizes=sizes[chunk].numpy(), **params)
        for i, (g, w) in enumerate(zip(detections, want[chunk])):
            _assert_same_detections(g, w, f"--no-nms + postprocess_outputs, image {chunk.start + i}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init tiny SSD with 20 classes and its two exports (dynamo), shared by the tests;
    also eager normalisation before and after exporting (the trap test)."""
    from types import SimpleNamespace

    from ssd.transforms import normalize

    model, cfg, classes = _model("tiny", classes=20)
    probe = torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)
    args = (cfg.augment.mean, cfg.augment.std, cfg.augment.input_convention)
    before = normalize(probe, *args).clone()  # fills ssd.transforms' constants cache first
    files = _export_both(model, cfg, classes, tmp_path_factory.mktemp("tiny-onnx"))
    return SimpleNamespace(model=model, cfg=cfg, classes=classes, files=files, normalized_before=before,
                           normalized_after=normalize(probe, *args))


# --------------------------------------------------------------------------------------------
# postprocess_outputs (numpy) against hand-computed cases and the project's postprocess
# --------------------------------------------------------------------------------------------


def test_postprocess_outputs_hand_computed():
    # three priors: A and B overlap with IoU 0.25 / (0.5 + 0.5 - 0.25) = 1/3, C is apart
    boxes = np.array([[[0.0, 0.0, 0.5, 1.0], [0.25, 0.0, 0.75, 1.0], [0.8, 0.8, 1.0, 1.0]]], np.float32)
    # columns: class 1, class 2
    scores = np.array([[[0.6, 0.05], [0.5, 0.3], [0.2, 0.01]]], np.float32)
    common = {"score_threshold": 0.01, "pre_nms_top_k": 0, "top_k": 10}
    # IoU 1/3 > 0.3: in class 1, A (0.6) suppresses B (0.5); in class 2, B (0.3) suppresses A
    # (0.05), and C scores exactly the threshold (out: strictly above passes)
    (det,) = postprocess_outputs(boxes, scores, nms_iou=0.3, **common)
    assert det["labels"].tolist() == [1, 2, 1]
    np.testing.assert_allclose(det["scores"], [0.6, 0.3, 0.2])
    np.testing.assert_array_equal(det["boxes"], boxes[0, [0, 1, 2]])
    # IoU 1/3 <= 0.4: nothing is suppressed
    (det,) = postprocess_outputs(boxes, scores, nms_iou=0.4, **common)
    assert det["labels"].tolist() == [1, 1, 2, 1, 2]
    np.testing.assert_allclose(det["scores"], [0.6, 0.5, 0.3, 0.2, 0.05])
    # pre-NMS top-1 per class, then the image's top 2; pixels of a 200 x 100 (h x w) image
    (det,) = postprocess_outputs(boxes, scores, nms_iou=0.4, score_threshold=0.01, pre_nms_top_k=1, top_k=2,
                                 image_sizes=[(200, 100)])
    assert det["labels"].tolist() == [1, 2]
    np.testing.assert_allclose(det["boxes"], [[0, 0, 50, 200], [25, 0, 75, 200]])


@pytest.mark.parametrize("params", [PostprocessConfig(),
                                    PostprocessConfig(score_threshold=0.05, nms_iou=0.3, top_k=15, pre_nms_top_k=7)])
def test_postprocess_outputs_equals_the_projects_postprocess(params):
    """Same network outputs -> the same detections, bit for bit (a trained network's
    confident scores, and near-uniform ones where every class is a candidate)."""
    cfg = load_config("tiny", ["model.num_classes=5"])
    priors = build_model(cfg).coding.priors()
    generator = torch.Generator().manual_seed(3)
    loc = torch.randn((2, priors.shape[0], 4), generator=generator) * 0.5
    for spread in (2.5, 0.3):
        logits = torch.randn((2, priors.shape[0], 5), generator=generator) * spread
        want = postprocess(loc, logits, priors, params, image_sizes=[(300, 200), (120, 480)])
        boxes = decode(loc, priors).clamp(0.0, 1.0)
        scores = logits.softmax(dim=-1)[..., 1:]
        got = postprocess_outputs(boxes.numpy(), scores.numpy(), score_threshold=params.score_threshold,
                                  nms_iou=params.nms_iou, pre_nms_top_k=params.pre_nms_top_k, top_k=params.top_k,
                                  image_sizes=[(300, 200), (120, 480)])
        for i, (g, w) in enumerate(zip(got, want)):
            assert len(w["scores"]) > 0
            np.testing.assert_array_equal(g["labels"], w["labels"].numpy(), err_msg=f"spread {spread} image {i}")
            np.testing.assert_array_equal(g["scores"], w["scores"].numpy(), err_msg=f"spread {spread} image {i}")
            np.testing.assert_allclose(g["boxes"], w["boxes"].numpy(), rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The exported graph against PyTorch
# --------------------------------------------------------------------------------------------


@pytest.mark.integration  # reads the shared VOC-mini (synthetic images without it)
def test_tiny_onnx_equals_pytorch_on_real_images(tiny):
    _check_preset(tiny.model, tiny.cfg, tiny.classes, tiny.files, _real_images(3))


@pytest.mark.integration  # reads the shared VOC-mini (synthetic images without it)
def test_torchscript_exporter_gives_the_same_graph_outputs(tmp_path):
    model, cfg, classes = _model("tiny", classes=6)
    files = _export_both(model, cfg, classes, tmp_path, exporter="torchscript")
    _check_preset(model, cfg, classes, files, _real_images(3))


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_onnx_equals_pytorch_on_real_images(preset, tmp_path):
    # What differs between presets is the network (backbone, extras, heads, priors): the graph
    # without NMS checks it. The NMS tail is the same code for every preset (both exporters on
    # tiny above); it is exported here for the paper's preset only, to keep the suite's time.
    model, cfg, classes = _model(preset)
    if preset == "ssd300_vgg16":
        files = _export_both(model, cfg, classes, tmp_path)
    else:
        files = (None, export_onnx(model, cfg, classes, tmp_path / "raw.onnx", nms=False))
    _check_preset(model, cfg, classes, files, _real_images(3))


def test_metadata_lets_a_user_without_the_project_run_it(tiny):
    for path, nms in zip(tiny.files, (True, False)):
        meta = read_metadata(path)
        assert json.loads(meta["ssd.classes"]) == tiny.classes
        assert int(meta["ssd.input_size"]) == tiny.cfg.priors.image_size == 128
        assert json.loads(meta["ssd.variances"]) == list(tiny.cfg.matching.variances)
        assert float(meta["ssd.score_threshold"]) == tiny.cfg.postprocess.score_threshold
        assert float(meta["ssd.nms_iou"]) == tiny.cfg.postprocess.nms_iou
        assert int(meta["ssd.top_k"]) == tiny.cfg.postprocess.top_k
        assert meta["ssd.arch"] == "tiny"
        assert meta["ssd.nms"] == ("in-graph" if nms else "none")
        assert ("num_detections" in meta["ssd.outputs"]) == nms
        assert ("postprocess_outputs" in meta["ssd.outputs"]) == (not nms)


def test_a_user_without_the_project_gets_the_same_detections(tiny, tmp_path):
    """onnxruntime, numpy and a copy of ssd/onnx_postprocess.py, in a process where ``import ssd``
    fails: everything else comes from the file's metadata."""
    import shutil
    import subprocess
    import sys

    detector = Detector(tiny.model, tiny.cfg, tiny.classes)
    images = _real_images(2)
    batch, sizes = detector.preprocess(images)
    np.save(tmp_path / "batch.npy", batch.numpy())
    np.save(tmp_path / "sizes.npy", sizes.numpy())
    shutil.copy(REPO / "ssd" / "onnx_postprocess.py", tmp_path / "onnx_postprocess.py")
    (tmp_path / "use.py").write_text(f"""
import json, sys
sys.modules["ssd"] = None  # the project's code is not there
import numpy as np, onnxruntime as ort
from onnx_postprocess import postprocess_outputs
results = {{}}
for name in ("nms", "raw"):
    session = ort.InferenceSession({str(tiny.files[0].parent)!r} + f"/{{name}}.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    classes, size = json.loads(meta["ssd.classes"]), int(meta["ssd.input_size"])
    batch, sizes = np.load("batch.npy"), np.load("sizes.npy")
    assert batch.shape[1:] == (3, size, size) and batch.dtype == np.uint8
    outputs = session.run(None, {{"images": batch}})
    if meta["ssd.nms"] == "in-graph":
        count, boxes, scores, labels = outputs
        dets = [{{"boxes": boxes[i, :count[i]] * np.array([w, h, w, h], np.float32), "scores": scores[i, :count[i]],
                  "labels": labels[i, :count[i]]}} for i, (h, w) in enumerate(sizes)]
    else:
        dets = postprocess_outputs(*outputs, score_threshold=float(meta["ssd.score_threshold"]),
                                   nms_iou=float(meta["ssd.nms_iou"]), pre_nms_top_k=int(meta["ssd.pre_nms_top_k"]),
                                   top_k=int(meta["ssd.top_k"]), image_sizes=sizes)
    results[name] = [{{"boxes": d["boxes"].tolist(), "scores": d["scores"].tolist(),
                       "classes": [classes[k - 1] for k in d["labels"]]}} for d in dets]
print(json.dumps(results))
""")
    # -E: no PYTHONPATH (the checkout); the venv's editable install is blocked inside the script
    run = subprocess.run([sys.executable, "-E", "use.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    want = detector.predict_tensors(images)
    for name in ("nms", "raw"):
        for i, (g, w) in enumerate(zip(results[name], want)):
            labels = np.array([tiny.classes.index(c) + 1 for c in g["classes"]])
            got = {"boxes": np.array(g["boxes"], np.float32).reshape(-1, 4),
                   "scores": np.array(g["scores"], np.float32), "labels": labels}
            _assert_same_detections(got, w, f"{name}, image {i}")


def test_check_refuses_a_file_that_does_not_match_the_model(tiny):
    with_nms, raw = tiny.files
    assert check_onnx(raw, tiny.model, tiny.cfg).max_score_diff <= 1e-4
    assert check_onnx(with_nms, tiny.model, tiny.cfg).detections > 0
    other, _, _ = _model("tiny", classes=20)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.01)
    with pytest.raises(OnnxMismatch, match="differ from PyTorch's"):
        check_onnx(raw, other, tiny.cfg)
    with pytest.raises(OnnxMismatch):
        check_onnx(with_nms, other, tiny.cfg)


def test_check_pairs_detections_up_to_float_noise_only():
    from ssd.export import _pair_detections

    want = {"boxes": np.array([[0, 0, 1, 1], [0, 0, 0.5, 0.5], [0.2, 0.2, 0.4, 0.4]], np.float32),
            "scores": np.array([0.9, 0.50001, 0.1], np.float32), "labels": np.array([1, 2, 3])}
    # the first two 1e-5 apart, listed in the other order (the runtimes' float noise): the same;
    # each paired with its counterpart (not skipped: that is only for the last place)
    near = {"boxes": want["boxes"], "scores": np.array([0.90001, 0.9, 0.1], np.float32), "labels": want["labels"]}
    swapped = {k: v[[1, 0, 2]] for k, v in near.items()}
    assert _pair_detections(swapped, near, "x") == (0.0, 0.0)
    swapped["boxes"] = swapped["boxes"] + np.float32(5e-5)
    assert _pair_detections(swapped, near, "x")[0] == pytest.approx(5e-5, abs=1e-7)
    # a different label, a score off by 1e-3, a box off by 1e-3: refused
    for key, index, value in (("labels", 0, 4), ("scores", 0, 0.901), ("boxes", (0, 2), 1.001)):
        other = {k: v.copy() for k, v in want.items()}
        other[key][index] = value
        with pytest.raises(OnnxMismatch, match="detection 0"):
            _pair_detections(other, want, "x")
    # the last place differs only when its score is within noise of the cut
    tail = {k: v.copy() for k, v in want.items()}
    tail["labels"][2] = 5
    _pair_detections(tail, want, "x")
    tail["scores"][2] = 0.2
    with pytest.raises(OnnxMismatch, match="detection 2"):
        _pair_detections(tail, want, "x")


def test_soft_nms_exports_only_without_nms():
    cfg = load_config("tiny", ["postprocess.method=soft_gaussian"])
    model = build_model(cfg)
    with pytest.raises(ValueError, match="--no-nms"):
        ExportableSSD(model, cfg, nms=True)
    ExportableSSD(model, cfg, nms=False)


def test_export_leaves_eager_normalisation_intact(tiny):
    """The known trap: normalising through ssd.transforms' cache while tracing poisons it."""
    assert torch.equal(tiny.normalized_before, tiny.normalized_after)


# --------------------------------------------------------------------------------------------
# pipelines/export.py
# --------------------------------------------------------------------------------------------


def _export(*argv: str) -> dict:
    return export_cli.main(export_cli.get_args_parser().parse_args(list(argv)))


def test_cli_bad_model_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as raised:
        _export("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx"))
    message = str(raised.value.code)
    assert message.startswith("error: --model") and "not a checkpoint folder" in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_a_mismatching_file(tiny_checkpoint, tmp_path, monkeypatch):
    import ssd.export

    real_export = ssd.export.export_onnx

    def wrong_export(model, *args, **kwargs):  # the file of a slightly different network
        other = build_model(Detector.from_checkpoint(tiny_checkpoint).cfg)
        return real_export(other, *args, **kwargs)

    monkeypatch.setattr(ssd.export, "export_onnx", wrong_export)
    with pytest.raises(SystemExit) as raised:
        _export("--model", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), "--no-nms")
    message = str(raised.value.code)
    assert message.startswith("error:") and "does not match PyTorch" in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_cli_logs_the_file_to_the_registered_version(mlflow_server, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import mlflow

    from ssd.mlflow_model import log_ssd_model

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # restored after the test (the CLI sets them)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("ssd-export-test"), run_name="train")
    info = log_ssd_model(run.info.run_id, mlflow_server, tiny_checkpoint, register_as="ssd-export", torch_flavour=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_alias("ssd-export", "champion", info["version"])

    out = tmp_path / "exported" / "model.onnx"
    result = _export("--model", "models:/ssd-export@champion", "--out", str(out), "--mlflow-uri", mlflow_server)
    assert "onnxruntime matches PyTorch" in capsys.readouterr().out
    version = client.get_model_version("ssd-export", info["version"])
    assert version.tags["onnx/uri"] == f"runs:/{run.info.run_id}/onnx/model.onnx" == result["logged_uri"]
    assert version.tags["onnx/nms"] == "true" and version.tags["onnx/exporter"] == "dynamo"
    assert version.tags["onnx/sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert [a.path for a in client.list_artifacts(run.info.run_id, "onnx")] == ["onnx/model.onnx"]
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=version.tags["onnx/uri"],
                                                     dst_path=str(tmp_path / "dl"), tracking_uri=mlflow_server)
    assert hashlib.sha256(Path(downloaded).read_bytes()).hexdigest() == version.tags["onnx/sha256"]
    # the downloaded file detects what the registered model's Detector detects
    detector = Detector.from_checkpoint(tiny_checkpoint)
    images = _real_images(2)
    batch, sizes = detector.preprocess(images)
    got = _onnx_detections(_run(onnx_session(downloaded), batch), sizes)
    for i, (g, w) in enumerate(zip(got, detector.predict_tensors(images))):
        _assert_same_detections(g, w, f"downloaded file, image {i}")

    with pytest.raises(SystemExit) as raised:
        _export("--model", "models:/ssd-export@nope", "--out", str(tmp_path / "x.onnx"), "--mlflow-uri", mlflow_server)
    assert str(raised.value.code).startswith("error: --model models:/ssd-export@nope")
    assert "\n" not in str(raised.value.code)
