"""ssd.endpoint without Ray: request limits, decoding, the answer's JSON, the alias watcher (a fake
clock against fakes and against a real MLflow registry), and ssd.jobs.serve's checks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import encode_png

from ssd.checkpoint import save_checkpoint
from ssd.config import load_config
from ssd.distributed.serve_job import check_serve_resources
from ssd.endpoint import (
    MIB,
    RETRY_FACTOR,
    Endpoint,
    EndpointSettings,
    LoadedModel,
    ModelInfo,
    ModelWatcher,
    Rejected,
    declared_length,
    decode_body,
    detection_record,
    read_body,
    settings_from_args,
)
from ssd.jobs.common import BadRequest, JobError
from ssd.jobs.serve import ServeRequest, is_loopback, resolve_serve
from ssd.models import build_model
from ssd.serving import Detector, to_image_tensor

#: the class names of conftest's ``tiny_checkpoint``
TINY_CLASSES = [f"class{i}" for i in range(1, 7)]


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (3, H, W): smooth blobs on noise (an untrained model finds boxes on it)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 4, 5), generator=g, dtype=torch.uint8)
    base = torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="bilinear")[0]
    return (base + torch.randint(-20, 21, (3, height, width), generator=g)).clamp(0, 255).to(torch.uint8)


def _png(image: torch.Tensor) -> bytes:
    return encode_png(image).numpy().tobytes()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int, height: int) -> bytes:
    """A small PNG claiming width x height RGB: an IHDR, one short IDAT (zeros compress 1000:1, so
    a real bomb is small too) and IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 10_000))
            + _chunk(b"IEND", b""))


async def _chunks(parts: list[bytes], pulled: list[int]):
    for part in parts:
        pulled.append(len(part))
        yield part


def _run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------------------------------
# limits and decoding


def test_declared_length_refuses_before_the_body():
    assert declared_length(None, 10) is None
    assert declared_length("10", 10) == 10 and declared_length(" 0 ", 10) == 0
    with pytest.raises(Rejected) as err:
        declared_length("11", 10)
    assert err.value.status == 413 and "11 bytes exceeds the limit of 10 bytes" in err.value.reason
    for bad in ("-1", "ten", "1e3", ""):
        with pytest.raises(Rejected) as err:
            declared_length(bad, 10)
        assert err.value.status == 400 and "Content-Length" in err.value.reason


def test_read_body_stops_at_the_chunk_that_passes_the_limit():
    pulled: list[int] = []
    assert _run(read_body(_chunks([b"ab", b"", b"cd"], pulled), 4)) == b"abcd"
    pulled.clear()
    with pytest.raises(Rejected) as err:
        _run(read_body(_chunks([b"abc", b"de", b"never read"], pulled), 4))
    assert err.value.status == 413 and pulled == [3, 2]  # the third chunk was never pulled


def test_rejected_reason_is_one_line():
    err = Rejected(400, "first line\nsecond\tline  ")
    assert err.reason == "first line second line" and err.payload() == {"error": "first line second line"}


def test_decode_body_is_predict_py_decoding():
    image = _image(37, 53, seed=1)
    png = _png(image)
    assert torch.equal(decode_body(png, 10**6), image)
    assert torch.equal(decode_body(png, 10**6), to_image_tensor(png))
    # a format torchvision does not decode (BMP) goes through Pillow, as predict.py's fallback
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="BMP")
    assert torch.equal(decode_body(buffer.getvalue(), 10**6), image)
    # grey becomes RGB
    grey = io.BytesIO()
    Image.fromarray(np.full((4, 6), 77, dtype=np.uint8)).save(grey, format="PNG")
    decoded = decode_body(grey.getvalue(), 10**6)
    assert decoded.shape == (3, 4, 6) and int(decoded.min()) == int(decoded.max()) == 77


@pytest.mark.parametrize("body,needle", [
    (b"", "empty body"),
    (b"hello, this is text\nwith two lines", "not an image"),
    (b'{"image": "not like this"}', "not an image"),
    (_png(_image(8, 8, seed=2))[:40], "not an image"),  # a truncated PNG
])
def test_decode_body_refuses_what_is_not_an_image(body, needle):
    with pytest.raises(Rejected) as err:
        decode_body(body, 10**6)
    assert err.value.status == 400 and needle in err.value.reason and "\n" not in err.value.reason


def test_too_many_pixels_are_refused_from_the_header():
    # refused from the header (decoding would allocate the pixels first), the size in the reason
    with pytest.raises(Rejected) as err:
        decode_body(_png_bomb(5000, 4000), 10**6)
    assert err.value.status == 413 and "5000x4000 = 20000000 pixels exceeds the limit of 1000000" in err.value.reason
    # past Pillow's own bomb limit (2 x 89.5 M pixels) too
    with pytest.raises(Rejected) as err:
        decode_body(_png_bomb(100_000, 100_000), 10**6)
    assert err.value.status == 413 and "exceeds the limit of 1000000 pixels" in err.value.reason
    image = _png(_image(20, 30, seed=3))
    assert decode_body(image, 600).shape == (3, 20, 30)
    with pytest.raises(Rejected) as err:
        decode_body(image, 599)
    assert err.value.status == 413 and "30x20 = 600 pixels" in err.value.reason


def test_detection_record_by_hand():
    det = {"boxes": torch.tensor([[1.0, 2.0, 3.5, 4.0], [0.0, 0.0, 10.0, 5.0]]),
           "scores": torch.tensor([0.9, 0.25]), "labels": torch.tensor([2, 1])}
    record = detection_record(det, ["cat", "dog"], 640, 480, ModelInfo("models:/m@champion", "m", "3"))
    assert record == {
        "model": {"reference": "models:/m@champion", "name": "m", "version": "3"}, "width": 640, "height": 480,
        "detections": [{"label": 2, "class_name": "dog", "score": pytest.approx(0.9), "box": [1.0, 2.0, 3.5, 4.0]},
                       {"label": 1, "class_name": "cat", "score": pytest.approx(0.25), "box": [0.0, 0.0, 10.0, 5.0]}]}
    json.dumps(record)  # plain JSON


def test_settings_from_args_as_a_rayservice_passes_them():
    settings = settings_from_args({"model": "models:/m@champion", "max_body_mb": "2", "reload_seconds": 5,
                                   "mlflow_uri": "http://mlflow:5000"})
    assert settings == EndpointSettings(model="models:/m@champion", tracking_uri="http://mlflow:5000",
                                        max_body_bytes=2 * MIB, reload_seconds=5.0)
    with pytest.raises(ValueError, match="unknown endpoint option.*max_body_bytes"):
        settings_from_args({"model": "x", "max_body_bytes": 3})
    with pytest.raises(ValueError, match="needs model"):
        settings_from_args({})
    with pytest.raises(ValueError, match="reload_seconds must be > 0"):
        settings_from_args({"model": "x", "reload_seconds": 0})


# ------------------------------------------------------------------------------------------
# the endpoint on a real checkpoint


@pytest.fixture(scope="module")
def endpoint(tiny_checkpoint):
    return Endpoint(EndpointSettings(model=str(tiny_checkpoint), max_body_bytes=50_000, max_pixels=200 * 200,
                                     device="cpu"))


def test_post_answers_the_detectors_detections(endpoint, tiny_checkpoint):
    image = _image(90, 120, seed=4)
    body = _png(image)
    status, answer = _run(endpoint.handle_post(str(len(body)), _chunks([body[:100], body[100:]], [])))
    assert status == 200
    assert answer["model"] == {"reference": str(tiny_checkpoint), "name": None, "version": None}
    assert (answer["width"], answer["height"]) == (120, 90)
    want = Detector.from_checkpoint(tiny_checkpoint).predict([body])
    assert len(answer["detections"]) == len(want) > 0
    for got, row in zip(answer["detections"], want):
        assert (got["label"], got["class_name"]) == (row["label"], row["class_name"])
        assert got["score"] == pytest.approx(row["score"], abs=1e-6)
        assert got["box"] == pytest.approx([row["x1"], row["y1"], row["x2"], row["y2"]], abs=1e-4)
    assert json.loads(json.dumps(answer)) == answer


def test_post_refusals(endpoint):
    pulled: list[int] = []
    status, answer = _run(endpoint.handle_post("50001", _chunks([b"x" * 10], pulled)))
    assert status == 413 and "50001 bytes" in answer["error"] and pulled == []  # not a byte read
    status, answer = _run(endpoint.handle_post(None, _chunks([b"x" * 30_000] * 3, pulled)))
    assert status == 413 and "exceeds the limit of 50000 bytes" in answer["error"] and pulled == [30_000] * 2
    status, answer = _run(endpoint.handle_post("5", _chunks([b"hello"], [])))
    assert status == 400 and answer["error"].startswith("the body is not an image")
    status, answer = _run(endpoint.handle_post(None, _chunks([_png(torch.zeros(3, 201, 200, dtype=torch.uint8))], [])))
    assert status == 413 and "200x201" in answer["error"]


def test_info_names_the_model_and_the_limits(endpoint, tiny_checkpoint):
    info = endpoint.info()
    assert info["model"]["reference"] == str(tiny_checkpoint) and info["classes"] == TINY_CLASSES
    assert (info["max_body_bytes"], info["max_pixels"], info["follows_alias"]) == (50_000, 40_000, False)
    assert endpoint.watcher.poll() is False  # nothing to follow


# ------------------------------------------------------------------------------------------
# the alias watcher


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeRegistry:
    """lookup/load for ModelWatcher: ``alias`` is the version the alias names; loading a version
    in ``broken`` fails."""

    def __init__(self) -> None:
        self.alias, self.broken, self.lookups, self.loads = "1", set(), 0, []
        self.down = False

    def lookup(self, reference: str) -> str:
        self.lookups += 1
        if self.down:
            raise ConnectionError("registry unreachable")
        return self.alias

    def load(self, reference: str, served_as: str) -> LoadedModel:
        self.loads.append(reference)
        version = reference.rsplit("/", 1)[-1]
        if version in self.broken:
            raise ValueError(f"version {version} has no checkpoint")
        return LoadedModel(detector=object(), info=ModelInfo(served_as, "m", version))


def test_watcher_follows_the_alias_on_its_period_and_keeps_a_working_model(caplog):
    clock, registry = FakeClock(), FakeRegistry()
    watcher = ModelWatcher(EndpointSettings(model="models:/m@champion", reload_seconds=10), lookup=registry.lookup,
                           load=registry.load, clock=clock)
    assert watcher.follows_alias and watcher.current.info.version == "1" and registry.loads == ["models:/m/1"]
    clock.now += 9.9
    assert watcher.poll() is False and registry.lookups == 1  # not due: no lookup at all
    clock.now += 0.1
    assert watcher.poll() is False and registry.lookups == 2 and len(registry.loads) == 1  # unchanged
    registry.alias = "2"
    clock.now += 5
    assert watcher.poll() is False and registry.lookups == 2  # the next period starts at the last poll
    clock.now += 5
    assert watcher.poll() is True and watcher.current.info.version == "2" and registry.loads[-1] == "models:/m/2"
    assert watcher.current.info.reference == "models:/m@champion"

    # a version that does not load: logged, the old model keeps serving, retried only later
    registry.alias, registry.broken = "3", {"3"}
    with caplog.at_level(logging.WARNING, logger="ssd.endpoint"):
        clock.now += 10
        assert watcher.poll() is False
    assert watcher.current.info.version == "2"
    assert "version 3, which cannot be loaded (ValueError: version 3 has no checkpoint); still serving version 2" \
        in caplog.text
    loads = len(registry.loads)
    for _ in range(RETRY_FACTOR - 1):
        clock.now += 10
        assert watcher.poll() is False
    assert len(registry.loads) == loads  # not retried every period
    registry.broken = set()
    clock.now += 10
    assert watcher.poll() is True and watcher.current.info.version == "3"

    # an unreachable registry: logged, nothing changes
    registry.down = True
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssd.endpoint"):
        clock.now += 10
        assert watcher.poll() is False
    assert "cannot look the alias up (ConnectionError: registry unreachable); still serving version 3" in caplog.text


def test_a_fixed_reference_is_not_followed():
    clock, registry = FakeClock(), FakeRegistry()
    watcher = ModelWatcher(EndpointSettings(model="models:/m/4", reload_seconds=1), lookup=registry.lookup,
                           load=registry.load, clock=clock)
    clock.now += 100
    assert not watcher.follows_alias and watcher.poll() is False
    assert registry.lookups == 0 and registry.loads == ["models:/m/4"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_watcher_against_a_real_registry(mlflow_server, tiny_checkpoint, tmp_path, caplog, monkeypatch):
    """Two registered versions with different weights; the alias moves to the second, then to a
    version without a checkpoint."""
    import mlflow

    from ssd.mlflow_model import log_ssd_model

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # resolve_serve sets them: restored after the test
    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(1)
    other = save_checkpoint(tmp_path / "ckpt2", model=build_model(cfg), epoch=1, step=10, config=cfg,
                            classes=TINY_CLASSES)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("ssd-endpoint-test"), run_name="train")
    for checkpoint in (tiny_checkpoint, other):
        log_ssd_model(run.info.run_id, mlflow_server, checkpoint, register_as="ssd-endpoint", torch_flavour=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_alias("ssd-endpoint", "champion", "1")

    clock = FakeClock()
    settings = EndpointSettings(model="models:/ssd-endpoint@champion", tracking_uri=mlflow_server,
                                reload_seconds=5, device="cpu")
    endpoint = Endpoint(settings, ModelWatcher(settings, clock=clock))
    body = _png(_image(60, 80, seed=6))
    assert endpoint.detect(body)["model"]["version"] == "1"
    client.set_registered_model_alias("ssd-endpoint", "champion", "2")
    clock.now += 4
    assert endpoint.watcher.poll() is False and endpoint.info()["model"]["version"] == "1"
    clock.now += 1
    assert endpoint.watcher.poll() is True
    answer = endpoint.detect(body)
    assert answer["model"] == {"reference": "models:/ssd-endpoint@champion", "name": "ssd-endpoint", "version": "2"}
    want = Detector.from_checkpoint(other).predict([body])
    assert [d["score"] for d in answer["detections"]] == pytest.approx([r["score"] for r in want], abs=1e-6)

    # version 3 has no SSD checkpoint: the replica keeps serving version 2
    broken = client.create_model_version("ssd-endpoint", source=f"runs:/{run.info.run_id}/nothing",
                                         run_id=run.info.run_id)
    client.set_registered_model_alias("ssd-endpoint", "champion", broken.version)
    with caplog.at_level(logging.WARNING, logger="ssd.endpoint"):
        clock.now += 5
        assert endpoint.watcher.poll() is False
    assert endpoint.detect(body)["model"]["version"] == "2"
    assert f"moved to version {broken.version}, which cannot be loaded" in caplog.text

    # and the job's checks look the reference up before Ray starts
    resolved = resolve_serve(ServeRequest(model="models:/ssd-endpoint@champion", mlflow_uri=mlflow_server))
    assert resolved.version == broken.version and resolved.settings.tracking_uri == mlflow_server
    with pytest.raises(BadRequest, match="alias nope not found"):
        resolve_serve(ServeRequest(model="models:/ssd-endpoint@nope", mlflow_uri=mlflow_server))


# ------------------------------------------------------------------------------------------
# ssd.jobs.serve and the resource check


@pytest.mark.parametrize("change,needle", [
    ({"replicas": 0}, "--replicas must be >= 1"),
    ({"cpus": 0}, "--cpus must be > 0"),
    ({"gpu": -1}, "--gpu must be >= 0"),
    ({"port": 70000}, "--port must be 1..65535"),
    ({"max_body_mb": 0}, "--max-body-mb must be > 0"),
    ({"max_pixels": 0}, "--max-pixels must be > 0"),
    ({"reload_seconds": -5}, "--reload-seconds must be > 0"),
    ({"host": "my host"}, "--host 'my host' is not an IP address"),
])
def test_bad_requests_fail_before_ray(tiny_checkpoint, change, needle):
    with pytest.raises(BadRequest, match=needle):
        resolve_serve(ServeRequest(model=str(tiny_checkpoint), **change))


def test_resolve_a_checkpoint_folder(tiny_checkpoint, tmp_path):
    resolved = resolve_serve(ServeRequest(model=str(tiny_checkpoint), max_body_mb=1.5, gpu=1, port=8123))
    assert resolved.settings == EndpointSettings(model=str(tiny_checkpoint.resolve()), max_body_bytes=int(1.5 * MIB),
                                                 device="cuda")
    assert resolved.version is None and resolved.url == "http://127.0.0.1:8123/" and resolved.loopback_only
    assert not resolve_serve(ServeRequest(model=str(tiny_checkpoint), host="0.0.0.0")).loopback_only
    with pytest.raises(BadRequest, match="not a checkpoint folder"):
        resolve_serve(ServeRequest(model=str(tmp_path)))
    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("10.0.0.1")


def test_replicas_must_fit_the_cluster():
    check_serve_resources(ServeRequest(model="m", replicas=2, cpus=1), {"CPU": 2.0}, "here")
    with pytest.raises(JobError, match=r"3 replicas x 1 CPU need 3 CPUs, but here has 2"):
        check_serve_resources(ServeRequest(model="m", replicas=3), {"CPU": 2.0}, "here")
    with pytest.raises(JobError, match=r"2 replicas x 0.5 GPU need 1 GPUs, but here has 0"):
        check_serve_resources(ServeRequest(model="m", replicas=2, gpu=0.5), {"CPU": 8.0}, "here")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_endpoint_answers_as_the_cpu_one(tiny_checkpoint):
    """--gpu replicas get device cuda (EndpointSettings.device): same answer as on the CPU."""
    body = _png(_image(120, 160, seed=7))
    cpu = Endpoint(EndpointSettings(model=str(tiny_checkpoint), device="cpu")).detect(body)
    gpu_endpoint = Endpoint(EndpointSettings(model=str(tiny_checkpoint), device="auto"))
    assert gpu_endpoint.info()["device"].startswith("cuda")
    gpu = gpu_endpoint.detect(body)
    assert len(gpu["detections"]) == len(cpu["detections"]) > 0
    for g, c in zip(gpu["detections"], cpu["detections"]):
        assert g["label"] == c["label"] and g["score"] == pytest.approx(c["score"], abs=1e-3)
        assert g["box"] == pytest.approx(c["box"], abs=0.5)
