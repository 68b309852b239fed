"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url`` until it answers; False if ``proc`` exits or ``timeout`` seconds pass first."""
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                return False
            time.sleep(0.3)


#: MLflow 3's job runner (huey consumers for its GenAI jobs; ssd uses none) costs a quarter of a
#: core while idle and 5 s to stop: the servers of the tests run without it
MLFLOW_NO_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

#: session fixtures that stop as soon as the last collected test using them is done (see
#: ``shared_until_last_user``), rather than at the end of the session
_SHARED: dict[str, Callable[[], None] | None] = {"services": None, "mlflow_server": None}
#: fixture name -> node id of the last collected test that uses it
_LAST_USER: dict[str, str] = {}


def pytest_collection_finish(session):
    for item in session.items:
        for name in _SHARED:
            if name in getattr(item, "fixturenames", ()):
                _LAST_USER[name] = item.nodeid


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    for name, nodeid in _LAST_USER.items():
        stop = _SHARED.get(name)
        if nodeid == item.nodeid and stop is not None:
            _SHARED[name] = None
            stop()


def shared_until_last_user(name: str, stop: Callable[[], None]) -> Callable[[], None]:
    """Register ``stop`` of the session fixture ``name``: it runs after the teardown of the last
    collected test that uses the fixture (so an idle server does not linger through the rest of
    the session), or at the session's end, whichever comes first; once. Returns the call for the
    fixture's own teardown."""
    _SHARED[name] = stop

    def finish() -> None:
        if _SHARED.get(name) is stop:
            _SHARED[name] = None
            stop()
    return finish


@pytest.fixture(scope="session", autouse=True)
def no_user_services(tmp_path_factory):
    """Tests never attach to the user's `make up` services or to a cluster in RAY_ADDRESS: the
    scripts look for start.sh's state in SSD_LOCAL_STATE (ssd.local_state), here an empty folder,
    unless a test names its own (the `services` fixture)."""
    saved = {k: os.environ.get(k) for k in ("SSD_LOCAL_STATE", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ["SSD_LOCAL_STATE"] = str(tmp_path_factory.mktemp("no-local-services"))
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_local_services(root: Path, free_port, which: str = "all", **settings: str) -> dict:
    """infra/local/start.sh (``which``: all, ray or mlflow) with its state under ``root`` on free
    loopback ports; returns the
    addresses, the state folder and ``env``: what a client of these services needs (the token
    exports start.sh prints included). Stop them with ``stop_local_services(env)``."""
    ports = {name: str(free_port()) for name in
             ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_CLIENT_PORT", "RAY_AGENT_PORT", "MLFLOW_PORT")}
    state = root / "state"
    env = {**os.environ, **ports, "PYTHON": sys.executable, "SSD_LOCAL_STATE": str(state),
           "SSD_MLFLOW_HOME": str(root / "mlflow"), "RAY_NUM_CPUS": "2", "RAY_OBJECT_STORE_MB": "256", **settings}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(key, None)
    started = subprocess.run([str(ROOT / "infra" / "local" / "start.sh"), which], env=env,
                             capture_output=True, text=True, timeout=240, check=False)
    if started.returncode != 0:
        stop_local_services(env)
        raise AssertionError(started.stdout + started.stderr)
    client_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state / "auth_token")}
    return {"env": client_env, "dashboard": f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}",
            "gcs": f"127.0.0.1:{ports['RAY_PORT']}", "mlflow": f"http://127.0.0.1:{ports['MLFLOW_PORT']}",
            "root": root, "state": state, "ports": ports, "start_output": started.stdout}


def stop_local_services(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "infra" / "local" / "stop.sh")], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1 (for services a test starts)."""
    return _free_port


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite store) on loopback, stopped by its process group after the
    last test that uses it. Shared by the modules: each uses experiment and registered-model
    names of its own (a test that needs an empty store starts its own server)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(mlflow), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **MLFLOW_NO_JOBS})
    url = f"http://127.0.0.1:{port}"
    if not wait_for_http(f"{url}/health", proc, timeout=90):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start")

    def stop() -> None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

    finish = shared_until_last_user("mlflow_server", stop)
    try:
        yield url
    finally:
        finish()


@pytest.fixture(scope="session")
def services(tmp_path_factory, free_port):
    """infra/local/start.sh on free loopback ports: a Ray head (2 CPUs, token auth) and an MLflow
    server; yields their addresses and the environment that reaches them (with the token), stops
    them after the last test that uses them. Shared by the modules (start-up and stop take
    ~30 s): each uses experiment and registered-model names of its own, and none changes the
    cluster (tests/test_infra_local.py starts and stops instances of its own)."""
    # a shorter grace before stop.sh's SIGKILL: the data is thrown away anyway
    # (tests/test_infra_local.py checks the graceful stop with the default grace)
    found = start_local_services(tmp_path_factory.mktemp("services"), free_port, STOP_GRACE_SECONDS="5",
                                 **MLFLOW_NO_JOBS)
    stopping: list[subprocess.Popen] = []

    def stop() -> None:  # in the background (Ray takes ~10 s to stop): the next tests run meanwhile
        stopping.append(subprocess.Popen([str(ROOT / "infra" / "local" / "stop.sh")], env=found["env"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    finish = shared_until_last_user("services", stop)
    try:
        yield found
    finally:
        finish()
        for proc in stopping:  # the session's end: stopped for sure
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                stop_local_services(found["env"])


#: the bucket :func:`s3_server` creates
S3_BUCKET = "ssd-test"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible HTTP server on loopback (moto's standalone ``moto_server``, a test
    extra: MinIO has no package in the registries CI can reach) with an empty bucket
    ``S3_BUCKET``. Yields SimpleNamespace(endpoint, bucket, env): ``env`` holds the AWS variables
    that point pyarrow, boto3 and MLflow at it; pass it to subprocesses, monkeypatch it in-process.
    """
    from types import SimpleNamespace

    import boto3

    port = _free_port()
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "ssd-test",
           "AWS_SECRET_ACCESS_KEY": "ssd-test-secret", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    try:
        if not wait_for_http(f"{endpoint}/moto-api/", proc, timeout=60):
            pytest.fail(f"moto_server did not start:\n{log.read_text(errors='replace')[-2000:]}")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=S3_BUCKET)

        def keys(prefix: str = "") -> list[str]:
            """Every object key under ``prefix`` (read with boto3, independently of ssd.storage)."""
            found = []
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix):
                found += [item["Key"] for item in page.get("Contents", [])]
            return found

        yield SimpleNamespace(endpoint=endpoint, bucket=S3_BUCKET, env=env, client=client, keys=keys)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


#: the class names of :func:`tiny_checkpoint`
TINY_CLASSES = [f"class{i}" for i in range(1, 7)]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untrained tiny SSD (seed 0) saved as a checkpoint, classes ``class1..class6``."""
    import torch

    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.models import build_model

    cfg = load_config("tiny", ["model.num_classes=7"])
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "ckpt"
    save_checkpoint(path, model=build_model(cfg), epoch=1, step=10, config=cfg, classes=TINY_CLASSES)
    return path

