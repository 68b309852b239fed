"""The model registry path against the deployment's stores: an MLflow server whose backend store
is a real PostgreSQL server and whose artifact store is an S3-compatible one, configured as in
infra/mlflow/docker-compose.yaml and infra/mlflow/k8s/mlflow.yaml (``--artifacts-destination
s3://<bucket>/mlflow-artifacts --serve-artifacts``, the S3 endpoint and credentials in the
server's environment only). A run is logged, the tiny SSD registered, promoted to ``champion``
and loaded back by that alias; the rows are read straight from PostgreSQL and the model's files
straight from the bucket.

The test process has no S3 endpoint or credentials while it logs and loads the model: with
``--serve-artifacts`` clients upload and download through the server
(``mlflow-artifacts:/`` URIs), as in the deployment, where they get no S3 credentials.

The test starts its own throwaway PostgreSQL (``initdb`` + ``pg_ctl``) on a free loopback port,
with its data in a temporary folder; nothing else on the machine is used or changed (the Debian
package's ``main`` cluster, if any, is left alone). PostgreSQL refuses to run as root, so under
root the server runs as the ``postgres`` system user the Debian package creates, with its folder
in /tmp (pytest's own tmp folders are private to root). The S3 store stands in for MinIO: the
``s3_server`` fixture of conftest.py, moto's standalone S3-compatible HTTP server on loopback.

Without the PostgreSQL server binaries, or psycopg2 (the MLflow server's driver), the tests are
skipped; with ``SSD_REQUIRE_POSTGRES=1`` (set by ``.ci/run``, which installs the Debian packages
with ``infra/ci/postgres.sh``) they fail instead, so that CI cannot skip them silently.
``SSD_PG_BINDIR`` names the folder of ``initdb``/``pg_ctl`` when they are not found on their own.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import MLFLOW_NO_JOBS

from ssd.checkpoint import INFERENCE_FILES, load_checkpoint
from ssd.mlflow_model import detections_frame, log_ssd_model
from ssd.registry import promote_if_better, resolve_model
from ssd.serving import Detector

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

PG_TOOLS = ("initdb", "pg_ctl", "postgres", "createdb")
PG_SYSTEM_USER = "postgres"  # who runs the server when the tests run as root
PG_SUPERUSER = "postgres"  # the database superuser initdb creates (trust auth, no password)
DATABASE = "mlflow"
MODEL = "ssd-pg"
ARTIFACT_PREFIX = "mlflow-artifacts"  # the server's artifact root: s3://<bucket>/mlflow-artifacts
#: what points boto3 at an S3 store and authenticates it: kept out of the test process, which
#: reaches artifacts only through the server (clients of the deployment get no S3 credentials)
S3_CLIENT_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                       "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                       "MLFLOW_S3_ENDPOINT_URL")
CLASSES = [f"class{i}" for i in range(1, 7)]


def _unavailable(reason: str):
    """Skip, or fail when CI requires PostgreSQL (SSD_REQUIRE_POSTGRES=1)."""
    if os.environ.get("SSD_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"SSD_REQUIRE_POSTGRES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _pg_bindir() -> Path | None:
    """The folder holding initdb, pg_ctl, postgres and createdb: $SSD_PG_BINDIR, else pg_ctl's on
    PATH (symlinks resolved), else the newest Debian /usr/lib/postgresql/N/bin."""
    candidates = []
    if os.environ.get("SSD_PG_BINDIR"):
        candidates.append(Path(os.environ["SSD_PG_BINDIR"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    debian = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    candidates += sorted(debian, key=lambda p: int(p.parent.name), reverse=True)
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in PG_TOOLS):
            return folder
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


@pytest.fixture(scope="module")
def postgres(free_port):
    """A throwaway PostgreSQL server on 127.0.0.1 with an empty ``mlflow`` database; yields
    SimpleNamespace(port, uri, connect); stopped (``pg_ctl stop -m fast``) and deleted after."""
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable(f"no PostgreSQL server binaries ({', '.join(PG_TOOLS)}) on PATH, in "
                     "/usr/lib/postgresql/*/bin or $SSD_PG_BINDIR (Debian: apt-get install postgresql)")
    try:
        import psycopg2
    except ImportError:
        _unavailable("psycopg2 is not installed (pip install psycopg2-binary): the MLflow server "
                     "needs it for a postgresql:// backend store")
    as_user: dict = {}
    parent = None
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(PG_SYSTEM_USER)
        except KeyError:
            _unavailable(f"running as root (PostgreSQL refuses to) and there is no {PG_SYSTEM_USER!r} "
                         "user to run it as")
        as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        parent = "/tmp"  # world-traversable, unlike pytest's /tmp/pytest-of-root/

    root = Path(tempfile.mkdtemp(prefix="ssd-pg-", dir=parent))  # mode 0700
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data, log, port = root / "data", root / "postgres.log", free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "HOME": str(root)}

    def pg(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(bindir / tool), *args], cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout, check=False, **as_user)

    started = False
    try:
        done = pg("initdb", "-D", str(data), "-U", PG_SUPERUSER, "-A", "trust", "-E", "UTF8",
                  "--no-locale", "--no-sync")
        assert done.returncode == 0, f"initdb failed:\n{done.stdout}\n{done.stderr}"
        # Loopback only, the socket in our own folder (not /var/run/postgresql, which may not
        # exist or may belong to a system cluster), and no durability: the data is throwaway.
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       f"unix_socket_directories = '{root}'\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        done = pg("pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "start")
        started = True  # even a failed start may leave a postmaster behind: always stop
        assert done.returncode == 0, f"pg_ctl start failed:\n{done.stderr}\n{_tail(log)}"
        done = pg("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", PG_SUPERUSER, DATABASE)
        assert done.returncode == 0, f"createdb failed:\n{done.stderr}\n{_tail(log)}"

        def connect():
            conn = psycopg2.connect(host="127.0.0.1", port=port, user=PG_SUPERUSER, dbname=DATABASE)
            conn.autocommit = True
            return conn

        yield SimpleNamespace(port=port, connect=connect, log=log,
                              # the driver named: SQLAlchemy 2.1 maps a bare postgresql://
                              # to psycopg 3, which the project does not install
                              uri=f"postgresql+psycopg2://{PG_SUPERUSER}@127.0.0.1:{port}/{DATABASE}")
    finally:
        if started:
            stopped = pg("pg_ctl", "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop")
            pid_file = data / "postmaster.pid"
            if stopped.returncode != 0 and pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_pg(postgres, s3_server, free_port, tmp_path_factory):
    """``mlflow server`` as deployed: PostgreSQL as its backend store, artifacts in the S3 bucket
    of ``s3_server`` under ``mlflow-artifacts/``, proxied by the server (``--serve-artifacts``);
    the S3 variables go to the server only. On loopback; yields its URL, stopped by its process
    group after the module."""
    root = tmp_path_factory.mktemp("mlflow-pg")
    port, log = free_port(), root / "server.log"
    mlflow = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, **s3_server.env, **MLFLOW_NO_JOBS}  # no job runner: as in conftest's servers
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(mlflow), "server", "--backend-store-uri", postgres.uri,
             "--artifacts-destination", f"s3://{s3_server.bucket}/{ARTIFACT_PREFIX}",
             "--serve-artifacts",
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120  # the first start creates the schema (alembic migrations)
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"mlflow server on {postgres.uri} did not start:\n{_tail(log)}")
                time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass


def _without_s3_credentials(mp: pytest.MonkeyPatch) -> None:
    """No S3 endpoint or credentials for this process (nor from ~/.aws): a client that tried S3
    itself instead of going through the server would fail."""
    for name in S3_CLIENT_VARIABLES:
        mp.delenv(name, raising=False)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)


def _query(postgres, sql: str, *params) -> list[tuple]:
    conn = postgres.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture(scope="module")
def champion(mlflow_pg, checkpoint):
    """The tiny checkpoint logged into a run, registered as ``ssd-pg`` and made ``champion``
    (uploaded through the server, without S3 credentials)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        _without_s3_credentials(mp)
        client = mlflow.MlflowClient(tracking_uri=mlflow_pg)
        run = client.create_run(client.create_experiment("ssd-pg-train"), run_name="train")
        info = log_ssd_model(run.info.run_id, mlflow_pg, checkpoint, register_as=MODEL,
                             torch_flavour=False)
        client.set_terminated(run.info.run_id, "FINISHED")
        promotion = promote_if_better(client, MODEL, info["version"], 0.5, None)
    return SimpleNamespace(run_id=run.info.run_id, promotion=promotion, **info)


def test_a_run_round_trips_through_postgres(mlflow_pg, postgres):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_pg)
    experiment = client.create_experiment("ssd-pg-runs")
    run = client.create_run(experiment, run_name="round-trip")
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "0.001")
    client.log_param(run_id, "arch", "ssd300_vgg16")
    for step, loss in enumerate([2.5, 1.25, 0.75]):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_metric(run_id, "mAP", 0.42)
    client.set_terminated(run_id, "FINISHED")

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "round-trip"
    assert got.data.params == {"lr": "0.001", "arch": "ssd300_vgg16"}
    assert got.data.metrics == {"loss": 0.75, "mAP": 0.42}
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 2.5), (1, 1.25), (2, 0.75)]

    # ... and it is PostgreSQL that holds them
    assert _query(postgres, "SELECT name, status FROM runs WHERE run_uuid = %s", run_id) == [("round-trip", "FINISHED")]
    assert dict(_query(postgres, "SELECT key, value FROM params WHERE run_uuid = %s", run_id)) == got.data.params
    assert sorted(_query(postgres, "SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                         run_id)) == [(0, 2.5), (1, 1.25), (2, 0.75)]
    assert _query(postgres, "SELECT name FROM experiments WHERE experiment_id = %s",
                  int(experiment)) == [("ssd-pg-runs",)]


def test_the_champion_loads_back_by_alias(mlflow_pg, champion, checkpoint, tmp_path, monkeypatch):
    import mlflow

    assert champion.registered_name == MODEL and champion.version == "1"
    assert champion.promotion.promoted and champion.promotion.champion_version is None
    _without_s3_credentials(monkeypatch)  # downloaded through the server too

    resolved = resolve_model(f"models:/{MODEL}@champion", mlflow_pg, dst=tmp_path / "resolved")
    assert (resolved.name, resolved.version) == (MODEL, "1")
    assert resolved.tags["run_id"] == champion.run_id and "champion_comparison" in resolved.tags
    want, got = load_checkpoint(checkpoint), load_checkpoint(resolved.checkpoint)
    assert got.classes == want.classes == CLASSES
    assert got.model.keys() == want.model.keys()
    for key, value in want.model.items():
        torch.testing.assert_close(got.model[key], value, rtol=0, atol=0)

    monkeypatch.setattr(sys, "path", list(sys.path))  # load_model prepends the model's code dir
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_pg)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(72, 88), (64, 64)]]
    frame = model.predict(pd.DataFrame({"image": images}))
    reference = detections_frame(Detector.from_checkpoint(checkpoint).predict(images))
    assert len(reference) > 0 and set(reference["image"]) == {0, 1}
    pd.testing.assert_frame_equal(frame, reference, check_exact=False, rtol=1e-5, atol=1e-5)


def test_the_registry_lives_in_postgres(postgres, champion):
    assert _query(postgres, "SELECT version()")[0][0].startswith("PostgreSQL")
    # MLflow created its schema here with its alembic migrations, up to a head revision
    assert len(_query(postgres, "SELECT version_num FROM alembic_version")) == 1
    assert _query(postgres, "SELECT name FROM registered_models") == [(MODEL,)]
    assert _query(postgres, "SELECT name, alias, version FROM registered_model_aliases") == [(MODEL, "champion", 1)]
    assert _query(postgres, "SELECT name, version, run_id, status FROM model_versions") == [
        (MODEL, 1, champion.run_id, "READY")]
    tags = dict(_query(postgres, "SELECT key, value FROM model_version_tags WHERE name = %s AND version = 1",
                       MODEL))
    assert tags["run_id"] == champion.run_id and '"promoted": true' in tags["champion_comparison"]


def test_the_models_artifacts_live_in_s3(s3_server, postgres, champion, checkpoint):
    # the registry hands clients the server's proxied URI, never the bucket's s3:// one ...
    [(storage_location,)] = _query(postgres, "SELECT storage_location FROM model_versions "
                                   "WHERE name = %s AND version = 1", MODEL)
    assert storage_location.startswith("mlflow-artifacts:/"), storage_location
    # ... under which the server put the files into the bucket, below its artifact root
    prefix = f"{ARTIFACT_PREFIX}/{storage_location.removeprefix('mlflow-artifacts:/').strip('/')}/"
    keys = set(s3_server.keys(f"{ARTIFACT_PREFIX}/"))
    checkpoint_files = {f"{prefix}artifacts/checkpoint/{name}": name for name in INFERENCE_FILES}
    expected = {f"{prefix}{name}" for name in ("MLmodel", "requirements.txt", "python_env.yaml")}
    expected |= set(checkpoint_files)
    assert expected <= keys, f"missing from s3://{s3_server.bucket}: {sorted(expected - keys)}"
    assert f"{prefix}artifacts/checkpoint/training.pt" not in keys  # an inference copy

    def read(key: str) -> bytes:
        return s3_server.client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()

    for key, name in checkpoint_files.items():  # byte for byte the checkpoint's files
        assert read(key) == (checkpoint / name).read_bytes(), key
    assert b"python_function" in read(f"{prefix}MLmodel")
