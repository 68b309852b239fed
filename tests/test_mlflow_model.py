"""ssd.mlflow_model: the pyfunc wrapper offline, and log + register + load against a real server."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.io import encode_png

from ssd.mlflow_model import (
    SSDPyfuncModel,
    detections_frame,
    images_from_input,
    log_ssd_model,
    pinned_requirements,
)
from ssd.serving import COLUMNS, Detector

CLASSES = [f"class{i}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(path, PNG bytes, (H, W, 3) array) of three small RGB images of different sizes."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    out = []
    for i, (h, w) in enumerate([(80, 96), (96, 80), (64, 64)]):
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        data = encode_png(image).numpy().tobytes()
        (root / f"{i}.png").write_bytes(data)
        out.append((root / f"{i}.png", data, image.permute(1, 2, 0).numpy()))
    return out


def test_images_from_input_accepts_frames_lists_and_arrays():
    a = np.zeros((8, 10, 3), np.uint8)
    frame = pd.DataFrame({"image": ["x.jpg", b"raw"]}, index=[7, 3])
    assert images_from_input(frame) == ["x.jpg", b"raw"]
    assert images_from_input({"image": ["x.jpg"]}) == ["x.jpg"]
    assert images_from_input(["x.jpg", a])[0] == "x.jpg"
    assert len(images_from_input(a)) == 1 and images_from_input(a)[0] is a
    assert len(images_from_input(np.stack([a, a]))) == 2
    assert images_from_input("x.jpg") == ["x.jpg"]
    with pytest.raises(ValueError, match="'image' column"):
        images_from_input(pd.DataFrame({"path": ["x.jpg"]}))
    with pytest.raises(TypeError, match="numpy input"):
        images_from_input(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="unsupported model input"):
        images_from_input(3.5)


def test_empty_detections_frame_has_the_columns():
    frame = detections_frame([])
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 0
    assert frame["image"].dtype == np.int64 and frame["score"].dtype == np.float64


def test_requirements_are_pinned_to_the_installed_versions():
    reqs = pinned_requirements()
    assert [r.split("==")[0] for r in reqs] == ["torch", "torchvision", "numpy", "pillow", "pyyaml",
                                                "pycocotools", "mlflow"]
    assert "mlflow==3.17.2" in reqs and all("+" not in r for r in reqs)


def test_pyfunc_wrapper_offline_matches_the_detector(checkpoint, images):
    model = SSDPyfuncModel()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config={}))
    paths = [p for p, _, _ in images]
    want = detections_frame(Detector.from_checkpoint(checkpoint).predict(paths))
    got = model.predict(None, pd.DataFrame({"image": paths}))
    pd.testing.assert_frame_equal(got, want)
    # An (H, W, 3) array alone, a one-image batch, a list: the same rows for that image.
    only_first = want[want["image"] == 0].reset_index(drop=True)
    for single in (images[0][2], images[0][2][None], [images[0][1]]):
        pd.testing.assert_frame_equal(model.predict(None, single), only_first)


@pytest.fixture(scope="module")
def logged(mlflow_server, checkpoint):
    """The tiny checkpoint logged into a RUNNING run and registered as ``ssd-tiny``."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("ssd-models")
    run = client.create_run(experiment, run_name="train")
    before = os.environ.get("MLFLOW_TRACKING_URI")
    info = log_ssd_model(run.info.run_id, mlflow_server, checkpoint, register_as="ssd-tiny",
                         version_tags={"data_hash": "abc123", "prior_spec": "tiny"})
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the process-wide URI is restored
    return SimpleNamespace(run_id=run.info.run_id, experiment=experiment, **info)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_registered_pyfunc_predicts_like_the_detector(mlflow_server, logged, checkpoint, images, monkeypatch):
    import mlflow

    monkeypatch.setattr(sys, "path", list(sys.path))  # load_model prepends the model's code dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    assert logged.registered_name == "ssd-tiny" and logged.version == "1"
    model = mlflow.pyfunc.load_model(f"models:/ssd-tiny/{logged.version}")
    inputs = [images[0][0], images[1][1], images[2][2]]  # a path, PNG bytes, an array
    got = model.predict(pd.DataFrame({"image": inputs}))
    want = detections_frame(Detector.from_checkpoint(checkpoint).predict(inputs))
    assert len(want) > 0 and set(want["image"]) == {0, 1, 2}
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-5)
    assert len(model.predict([images[0][2]], params={"batch_size": 1})) == (want["image"] == 0).sum()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    version = client.get_model_version("ssd-tiny", logged.version)
    assert version.tags == {"data_hash": "abc123", "prior_spec": "tiny", "run_id": logged.run_id}
    assert version.run_id == logged.run_id
    assert model.metadata.metadata["classes"] == CLASSES
    assert client.get_run(logged.run_id).info.status == "RUNNING"  # the caller ends the run


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_torch_flavour_gives_the_same_raw_outputs(mlflow_server, logged, checkpoint, monkeypatch):
    import mlflow.pytorch

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    loaded = mlflow.pytorch.load_model(logged.torch_model_uri).eval()
    reference = Detector.from_checkpoint(checkpoint).model
    x = torch.randn(2, 3, reference.prior_spec.image_size, reference.prior_spec.image_size)
    with torch.no_grad():
        for got, want in zip(loaded(x), reference(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_run_keeps_its_status_even_when_logging_fails(mlflow_server, checkpoint, tmp_path, monkeypatch):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.create_experiment("ssd-status")
    finished = client.create_run(experiment)
    client.set_terminated(finished.info.run_id, "FINISHED")
    info = log_ssd_model(finished.info.run_id, mlflow_server, checkpoint, torch_flavour=False)
    assert info["model_uri"].startswith("models:/") and info["torch_model_uri"] is None
    assert info["registered_name"] is None and info["version"] is None
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"
    assert mlflow.active_run() is None

    running = client.create_run(experiment)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        log_ssd_model(running.info.run_id, mlflow_server, tmp_path)

    def fail(**kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(mlflow.pyfunc, "log_model", fail)
    with pytest.raises(RuntimeError, match="artifact store unavailable"):
        log_ssd_model(running.info.run_id, mlflow_server, checkpoint)
    # Leaving ``with mlflow.start_run(...)`` on an error would have set FAILED.
    assert client.get_run(running.info.run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_the_model_loads_where_the_repo_is_not_importable(mlflow_server, logged, checkpoint, images, tmp_path):
    """A fresh interpreter with the editable install of ``ssd`` hidden uses the logged copy."""
    np.save(tmp_path / "image.npy", images[0][2])
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
        sys.path_hooks[:] = [h for h in sys.path_hooks if "__editable__" not in getattr(h, "__module__", "")]
        sys.path[:] = [p for p in sys.path if "__editable__" not in p and p not in ("", {os.getcwd()!r})]
        sys.path_importer_cache.clear()
        assert importlib.util.find_spec("ssd") is None, "ssd is still importable"
        import mlflow.pyfunc, numpy as np
        model = mlflow.pyfunc.load_model("models:/ssd-tiny/{logged.version}")
        import ssd
        print("ssd from", ssd.__file__)
        model.predict(np.load("image.npy")).to_pickle("out.pkl")
    """)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    env.pop("PYTHONPATH", None)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, check=False,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ssd from" in done.stdout and os.path.join("code", "ssd") in done.stdout, done.stdout
    got = pd.read_pickle(tmp_path / "out.pkl")
    want = detections_frame(Detector.from_checkpoint(checkpoint).predict([images[0][2]]))
    assert len(want) > 0
    pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=1e-5, atol=1e-5)
