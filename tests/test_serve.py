"""pipelines/serve.py against a real local Ray Serve instance (one start for the module): a model
registered in a real MLflow server, detections equal pipelines/predict.py's, refusals (400, 413,
404/405), the alias moving while serving, nothing listening on a wildcard address, a clean stop.
"""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from ssd.checkpoint import save_checkpoint
from ssd.config import load_config
from ssd.models import build_model
from ssd.serving import Detector

REPO = Path(__file__).resolve().parents[1]
MODEL = "ssd-serve"
#: the classes of conftest's ``tiny_checkpoint``
CLASSES = [f"class{i}" for i in range(1, 7)]
MAX_BODY_MB = 1
MAX_PIXELS = 250_000
RELOAD_SECONDS = 1.0

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _image(height: int, width: int, seed: int) -> torch.Tensor:
    """uint8 (3, H, W): smooth blobs on noise (an untrained model finds boxes on it)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.randint(0, 256, (3, 4, 5), generator=g, dtype=torch.uint8)
    base = torch.nn.functional.interpolate(small[None].float(), size=(height, width), mode="bilinear")[0]
    return (base + torch.randint(-20, 21, (3, height, width), generator=g)).clamp(0, 255).to(torch.uint8)


def _pipeline(name: str):
    spec = importlib.util.spec_from_file_location(f"_pipeline_{name}", REPO / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _request(url: str, body: bytes | None = None, method: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:  # Serve's proxy itself answers in plain text (e.g. 404 before the app is up)
            return err.code, {"proxy": text.decode(errors="replace")}


# Processes and their listening sockets from /proc (Linux), as `ss -ltnp` finds them.


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid] if Path(f"/proc/{pid}").exists() else []
    while todo:
        current = todo.pop()
        found.append(current)
        todo += parents.get(current, [])
    return found


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def _address(hex_address: str) -> str:
    """/proc/net/tcp{,6}'s little-endian hex address -> text ("0100007F" -> "127.0.0.1")."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word is host order
    address = ipaddress.ip_address(words)
    # an IPv6 socket bound to an IPv4 address shows it mapped (::ffff:127.0.0.1)
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _listeners(pids: list[int]) -> list[tuple[str, int, str]]:
    """(address, port, process command) of every listening TCP socket of ``pids``."""
    listening: dict[str, tuple[str, int]] = {}  # socket inode -> (address, port)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                address, port = fields[1].split(":")
                listening[fields[9]] = (_address(address), int(port, 16))
    found = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in listening:
                    found.append((*listening[target[8:-1]], command))
        except OSError:  # the process ended meanwhile
            continue
    return sorted(set(found))


@pytest.fixture(scope="module")
def served(mlflow_server, tiny_checkpoint, tmp_path_factory, free_port):
    """``MODEL`` versions 1 (tiny_checkpoint) and 2 (other weights), ``@champion`` on 1, served by
    ``pipelines/serve.py`` on a private local cluster. Yields a namespace with the URL, the process,
    its log and both checkpoints; stops it (and checks nothing is left) at the end."""
    import mlflow

    from ssd.mlflow_model import log_ssd_model

    root = tmp_path_factory.mktemp("serve")
    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(1)
    second = save_checkpoint(root / "ckpt2", model=build_model(cfg), epoch=1, step=10, config=cfg, classes=CLASSES)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.create_run(client.create_experiment("ssd-serve-test"), run_name="train")
    for checkpoint in (tiny_checkpoint, second):
        log_ssd_model(run.info.run_id, mlflow_server, checkpoint, register_as=MODEL, torch_flavour=False)
    client.set_terminated(run.info.run_id, "FINISHED")
    client.set_registered_model_alias(MODEL, "champion", "1")

    port = free_port()
    log_path = root / "serve.log"
    # the private cluster's object store capped (Ray sizes it from the machine's memory otherwise)
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(256 * 2**20)}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "pipelines" / "serve.py"), "--model", f"models:/{MODEL}@champion",
             "--mlflow-uri", mlflow_server, "--address", "local", "--port", str(port),
             "--reload-seconds", str(RELOAD_SECONDS), "--max-body-mb", str(MAX_BODY_MB),
             "--max-pixels", str(MAX_PIXELS)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    ready = False
    while time.time() < deadline and proc.poll() is None:
        try:
            ready = _request(f"{url}/health")[0] == 200
        except OSError:
            ready = False
        if ready:
            break
        time.sleep(0.5)
    state = {"url": url, "proc": proc, "log": log_path, "first": tiny_checkpoint, "second": second,
             "client": client, "processes": _tree(proc.pid)}
    try:
        if not ready:
            pytest.fail(f"pipelines/serve.py did not start:\n{log_path.read_text(errors='replace')[-4000:]}")
        yield state
    finally:
        _stop(state)


def _stop(state: dict) -> list[int]:
    """SIGINT (the script shuts Serve and its cluster down); SIGKILL what is left after 60 s.
    Returns the pids that were still alive 30 s after the script ended."""
    proc = state["proc"]
    if proc.poll() is None:
        state["processes"] = _tree(proc.pid)  # the replica and proxies exist by now
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    deadline = time.time() + 30
    while _alive(state["processes"]) and time.time() < deadline:
        time.sleep(0.2)
    alive = _alive(state["processes"])
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return alive


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-images")
    files = []
    for i, (height, width) in enumerate([(96, 128), (150, 90), (64, 64)]):
        image = _image(height, width, seed=10 + i)
        data = encode_jpeg(image, quality=90) if i == 1 else encode_png(image)
        path = root / f"img{i}.{'jpg' if i == 1 else 'png'}"
        path.write_bytes(data.numpy().tobytes())
        files.append(path)
    return files


def _assert_same(got: list[dict], want: list[dict], where: str) -> None:
    assert len(got) == len(want) > 0, where
    for g, w in zip(got, want):
        assert (g["label"], g["class_name"]) == (w["label"], w["class_name"]), where
        assert g["score"] == pytest.approx(w["score"], abs=1e-5), where
        assert g["box"] == pytest.approx(w["box"], rel=1e-6, abs=1e-4), where


def test_detections_equal_predict_py(served, images, tmp_path, monkeypatch):
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)  # predict.py sets them for its process
    predict = _pipeline("predict")
    args = predict.get_args_parser().parse_args(
        ["--model", f"models:/{MODEL}@champion", *map(str, images), "--out", str(tmp_path / "out"),
         "--mlflow-uri", served["client"].tracking_uri, "--device", "cpu", "--no-draw"])
    expected = predict.main(args)
    assert expected["version"] == "1"
    for path, record in zip(images, expected["images"]):
        status, answer = _request(served["url"] + "/", path.read_bytes())
        assert status == 200, answer
        assert answer["model"] == {"reference": f"models:/{MODEL}@champion", "name": MODEL, "version": "1"}
        assert (answer["width"], answer["height"]) == (record["width"], record["height"])
        _assert_same(answer["detections"], record["detections"], str(path))
    status, info = _request(served["url"] + "/health")
    assert status == 200 and info["model"]["version"] == "1" and info["classes"] == CLASSES
    assert info["max_body_bytes"] == MAX_BODY_MB * 2**20 and info["follows_alias"] is True


def test_bad_requests_get_a_status_and_a_one_line_reason(served):
    url = served["url"]
    status, answer = _request(url + "/", b"this is not an image\nat all")
    assert status == 400 and answer["error"].startswith("the body is not an image") and "\n" not in answer["error"]
    status, answer = _request(url + "/", b"")
    assert status == 400 and answer["error"].startswith("empty body")
    status, answer = _request(url + "/", method="PUT", body=b"x")
    assert status == 405
    status, answer = _request(url + "/nowhere")
    assert status == 404 and "no route /nowhere" in answer["error"]


def test_oversized_bodies_are_refused_before_they_are_sent(served):
    """Content-Length over the limit: 413 while most of the body was never sent (a server that
    read it all would wait for the rest and the read below would time out)."""
    host, port = served["url"].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/")
        conn.putheader("Content-Length", str(MAX_BODY_MB * 2**20 + 1))
        conn.putheader("Content-Type", "image/jpeg")
        conn.endheaders()
        conn.send(b"\xff\xd8" + b"\x00" * 1000)
        started = time.perf_counter()
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 413 and "exceeds the limit of 1048576 bytes" in answer["error"]
    assert time.perf_counter() - started < 20
    # an image of more pixels than --max-pixels: refused (from its header)
    status, answer = _request(served["url"] + "/", encode_png(torch.zeros(3, 1000, 1000, dtype=torch.uint8))
                              .numpy().tobytes())
    assert status == 413 and "1000x1000 = 1000000 pixels exceeds the limit of 250000" in answer["error"]


def test_nothing_listens_on_a_wildcard_address(served):
    listeners = _listeners(_tree(served["proc"].pid))
    port = int(served["url"].rsplit(":", 1)[1])
    assert listeners, "no listening socket found in the process tree"
    wildcard = [entry for entry in listeners if entry[0] in ("0.0.0.0", "::", "")]
    assert wildcard == [], f"listening on every interface: {wildcard}"
    assert all(ip.startswith("127.") or ip == "::1" for ip, _, _ in listeners), listeners
    assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in listeners}  # the HTTP proxy
    # the replica's inter-deployment gRPC server (Ray binds it to [::] unpatched) is loopback too
    replicas = [entry for entry in listeners if "ServeReplica" in entry[2]]
    assert replicas and all(ip == "127.0.0.1" for ip, _, _ in replicas), listeners


def test_the_alias_moving_is_served_within_the_poll_period(served, images):
    served["client"].set_registered_model_alias(MODEL, "champion", "2")
    moved, deadline = time.perf_counter(), time.perf_counter() + 60
    version = "1"
    while version != "2" and time.perf_counter() < deadline:
        time.sleep(0.2)
        version = _request(served["url"] + "/health")[1]["model"]["version"]
    took = time.perf_counter() - moved
    assert version == "2", served["log"].read_text(errors="replace")[-3000:]
    # the poll period plus a download and a build of the tiny model, with room for a busy machine
    assert took < RELOAD_SECONDS + 20, took
    body = images[0].read_bytes()
    status, answer = _request(served["url"] + "/", body)
    assert status == 200 and answer["model"]["version"] == "2"
    want = Detector.from_checkpoint(served["second"]).predict([body])
    _assert_same(answer["detections"], [{"label": r["label"], "class_name": r["class_name"], "score": r["score"],
                                         "box": [r["x1"], r["y1"], r["x2"], r["y2"]]} for r in want], "version 2")


def test_stops_cleanly(served):
    assert len(_tree(served["proc"].pid)) > 3  # the script, Ray's servers, Serve's controller, proxy, replica
    alive = _stop(served)
    assert served["proc"].returncode == 0, served["log"].read_text(errors="replace")[-3000:]
    assert alive == [], f"left running after the script stopped: {alive}"
    assert "stopping Serve" in served["log"].read_text()


def test_replica_grpc_patch_rewrites_only_the_wildcard(monkeypatch):
    """ssd.distributed.ray_internals.bind_serve_replica_grpc on a real gRPC server."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from ray.serve._private import replica

    from ssd.distributed.ray_internals import bind_serve_replica_grpc

    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)  # restored after
    bind_serve_replica_grpc("127.0.0.1")
    bind_serve_replica_grpc("127.0.0.1")  # idempotent: not wrapped twice
    assert replica.add_port_to_grpc_server._ssd_original.__name__ != "add_port"
    server = grpc.server(ThreadPoolExecutor(1))
    try:
        port = replica.add_port_to_grpc_server(server, "[::]:0")
        server.start()
        mine = _listeners([os.getpid()])
        assert ("127.0.0.1", port) in {(ip, p) for ip, p, _ in mine}
        assert not [entry for entry in mine if entry[1] == port and entry[0] != "127.0.0.1"]
    finally:
        server.stop(0)
