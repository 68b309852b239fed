"""Registration at the end of a training run (``ssd.publish.finish_run``) and later
(``pipelines/register.py``) against a real ``mlflow server`` that these tests stop and restart on
the same port and store: the champion rule, the retry window, the command that finishes the job,
and a failed run ended once the server is back."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import MLFLOW_NO_JOBS, wait_for_http  # tests/ is on sys.path under pytest

from ssd.checkpoint import load_checkpoint
from ssd.jobs.common import request_from_args
from ssd.jobs.train import ResolvedTrain, TrainRequest, print_summary
from ssd.publish import finish_run
from ssd.tracking import Tracker

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.integration]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load("train")
register = _load("register")


class Server:
    """``mlflow server`` (SQLite store, proxied artifacts) that can be stopped and started again
    on the same port and store, as an MLflow outage looks to a client."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", str(self.root / "artifacts"),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, **MLFLOW_NO_JOBS})
        if not wait_for_http(f"{self.url}/health", self.proc, timeout=90):
            self.stop()
            pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None

    def start_later(self, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        thread.start()
        return thread


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    server = Server(tmp_path_factory.mktemp("mlflow"), free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def up(server):
    """The server, running (a test may have left it stopped)."""
    if server.proc is None:
        server.start()
    return server


@pytest.fixture(autouse=True)
def fail_fast(monkeypatch):
    # what ssd.tracking.Tracker sets in a training process (setdefault: the test's values win)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def _checkpoint(tiny_checkpoint: Path, folder: Path, mAP: float) -> Path:
    """A copy of the tiny checkpoint that says its validation mAP was ``mAP``."""
    shutil.copytree(tiny_checkpoint, folder)
    meta = json.loads((folder / "meta.json").read_text())
    meta["metrics"] = {"mAP": mAP, "AP50": 2 * mAP}
    meta["extra"] = {"val_data": "/nowhere/val"}  # never read: the champion's mAP is recorded on the same hash
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _finish(uri: str, checkpoint: Path, name: str | None, timeout: float, tracker: Tracker) -> dict:
    """finish_run for ``tracker``'s run, as a training job calls it after training."""
    args = train.get_args_parser().parse_args(
        ["--mlflow-uri", uri, "--register-timeout", str(timeout), *(["--register-as", name] if name else [])])
    resolved = ResolvedTrain(cfg=load_checkpoint(checkpoint).config, val_spec="/nowhere/val",
                             train_set=SimpleNamespace(info={"content_hash": "train-hash"}),
                             val_set=SimpleNamespace(info={"content_hash": "val-hash"}),
                             train_spec="/nowhere/train", name="r", storage="/nowhere")
    return finish_run(request_from_args(TrainRequest, args), resolved, tracker, checkpoint, str(checkpoint))


def _printed(summary: dict, capsys) -> str:
    capsys.readouterr()
    print_summary(summary | {"run_name": "r", "seconds": 1.0})
    return capsys.readouterr().out


@pytest.mark.timeout(300)
def test_the_first_version_becomes_champion_then_only_a_better_one(up, tiny_checkpoint, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient(up.url)
    runs = {}
    for label, score in (("first", 0.30), ("worse", 0.25), ("better", 0.35)):
        tracker = Tracker(up.url, "register-test", label)
        summary = _finish(up.url, _checkpoint(tiny_checkpoint, tmp_path / label, score), "ssd-rule", 30, tracker)
        assert summary["error"] is None, summary
        runs[label] = (tracker.run_id, summary, _printed(summary, capsys))
        assert client.get_run(tracker.run_id).info.status == "FINISHED"

    first, worse, better = (runs[k][1] for k in ("first", "worse", "better"))
    assert [s["registered_version"] for s in (first, worse, better)] == ["1", "2", "3"]
    assert (first["champion"], worse["champion"], better["champion"]) == (True, False, True)
    assert client.get_model_version_by_alias("ssd-rule", "champion").version == "3"
    # the comparison: against the champion's mAP recorded on the same validation shards
    recorded = json.loads(client.get_model_version("ssd-rule", "2").tags["champion_comparison"])
    assert recorded == worse["champion_comparison"]
    assert (recorded["champion_version"], recorded["champion_score"], recorded["score"]) == ("1", 0.30, 0.25)
    assert recorded["champion_score_source"] == "recorded on the same validation shards"
    tags = client.get_model_version("ssd-rule", "3").tags
    assert (tags["mAP"], tags["val_data_hash"], tags["data_hash"]) == ("0.35", "val-hash", "train-hash")
    assert tags["run_id"] == runs["better"][0] and tags["parent_model"] == "none" and tags["prior_spec"] == "tiny"
    assert client.get_run(runs["better"][0]).data.metrics["best/mAP"] == 0.35
    # the printed summary says whether the alias moved
    assert "alias champion: moved to version 1 (no champion yet)" in runs["first"][2]
    assert "alias champion: stays at version 1 (mAP 0.25 <= champion v1's 0.3 " in runs["worse"][2]
    assert "alias champion: moved to version 3 (mAP 0.35 > champion v1's 0.3 " in runs["better"][2]


@pytest.mark.timeout(300)
def test_mlflow_down_at_the_end_fails_with_the_command_that_finishes_the_job(
        up, tiny_checkpoint, tmp_path, capsys):
    import mlflow

    checkpoint = _checkpoint(tiny_checkpoint, tmp_path / "best", 0.4)
    tracker = Tracker(up.url, "register-test", "down-at-the-end")
    run_id = tracker.run_id
    up.stop()
    start = time.monotonic()
    summary = _finish(up.url, checkpoint, "ssd-later", 3, tracker)
    assert time.monotonic() - start < 30  # the window is bounded
    command = (f"python pipelines/register.py --run-id {run_id} --name ssd-later --checkpoint {checkpoint} "
               f"--mlflow-uri {up.url}")
    assert summary["register_command"] == command and summary["registered_version"] is None
    assert summary["error"].startswith(f"the model was not registered as ssd-later: MLflow run {run_id} at {up.url}: "
                                       "could not ")
    assert summary["error"].endswith(f"finish it later with: {command}")
    assert "still unreachable after 3 s" in summary["error"]
    assert f"  finish it later with: {command}\n" in _printed(summary, capsys)

    # register.py while the server is still down: one error line, exit code 2
    argv = shlex.split(command)[2:]
    with pytest.raises(SystemExit) as exited:
        register.main(register.get_args_parser().parse_args([*argv, "--timeout", "1"]))
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: MLflow run {run_id} at {up.url}: could not read its tags (still unreachable")
    assert err.count("\n") == 1

    up.start()  # the same port and store
    client = mlflow.MlflowClient(up.url)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody could end it
    out = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "registered ssd-later version 1 (models:/ssd-later/1): now champion" in out.stdout
    assert client.get_model_version_by_alias("ssd-later", "champion").version == "1"
    version = client.get_model_version("ssd-later", "1")
    assert version.run_id == run_id and version.tags["mAP"] == "0.4"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["best/mAP"] == 0.4

    # run again: the version from this run is kept, not registered twice
    again = register.main(register.get_args_parser().parse_args(argv))
    assert again["registered_version"] == "1" and again["champion"]
    assert [v.version for v in client.search_model_versions("name = 'ssd-later'")] == ["1"]


@pytest.mark.timeout(300)
def test_a_server_back_within_the_window_finishes_the_run(up, tiny_checkpoint, tmp_path):
    import mlflow

    tracker = Tracker(up.url, "register-test", "back-in-time")
    up.stop()
    tracker.log_metrics({"loss": 1.0}, step=1)  # mid-training: tracking turns itself off
    assert not tracker.active
    restart = up.start_later(2)
    summary = _finish(up.url, _checkpoint(tiny_checkpoint, tmp_path / "best", 0.5), "ssd-back", 120, tracker)
    restart.join()
    assert summary["error"] is None and summary["registration_error"] is None, summary
    assert (summary["registered_version"], summary["champion"]) == ("1", True)
    client = mlflow.MlflowClient(up.url)
    assert client.get_model_version_by_alias("ssd-back", "champion").version == "1"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


@pytest.mark.timeout(300)
def test_a_refused_registration_fails_at_once_and_ends_the_run_failed(up, tiny_checkpoint, tmp_path):
    import mlflow

    tracker = Tracker(up.url, "register-test", "refused")
    start = time.monotonic()
    summary = _finish(up.url, _checkpoint(tiny_checkpoint, tmp_path / "best", 0.5), "bad/name", 120, tracker)
    assert time.monotonic() - start < 60  # a refusal is not retried for the whole window
    assert "could not register the model as bad/name: " in summary["error"]
    assert "Names cannot contain '/'" in summary["error"] and "unreachable" not in summary["error"]
    assert summary["model_uri"] and summary["registered_version"] is None  # logged, then refused
    assert mlflow.MlflowClient(up.url).get_run(tracker.run_id).info.status == "FAILED"  # as the job


@pytest.mark.timeout(300)
def test_a_failed_run_is_ended_once_the_server_is_back(up):
    import mlflow

    tracker = Tracker(up.url, "register-test", "training-failed")
    up.stop()
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end("FAILED")  # the plain end: a no-op once tracking is off
    restart = up.start_later(2)
    assert tracker.end("FAILED", retry_for=120)  # the end main() makes when training failed
    restart.join()
    assert mlflow.MlflowClient(up.url).get_run(tracker.run_id).info.status == "FAILED"


@pytest.mark.timeout(120)
def test_register_refuses_bad_requests_with_one_error_line(up, tiny_checkpoint, tmp_path, capsys, free_port):
    checkpoint = _checkpoint(tiny_checkpoint, tmp_path / "best", 0.1)
    cases = {
        "unknown run": (["--run-id", "0" * 32, "--checkpoint", str(checkpoint), "--mlflow-uri", up.url],
                        "RESOURCE_DOES_NOT_EXIST"),
        "no checkpoint": (["--run-id", "x", "--checkpoint", str(tmp_path / "nowhere"), "--mlflow-uri", up.url],
                          "not a readable checkpoint"),
        "not a checkpoint": (["--run-id", "x", "--checkpoint", str(tmp_path), "--mlflow-uri", up.url],
                             "not a readable checkpoint"),
        "no run recorded": (["--checkpoint", str(checkpoint), "--mlflow-uri", up.url], "give --run-id"),
        "unreachable": (["--run-id", "x", "--checkpoint", str(checkpoint), "--timeout", "1",
                         "--mlflow-uri", f"http://127.0.0.1:{free_port()}"], "still unreachable after 1 s"),
    }
    for what, (argv, message) in cases.items():
        with pytest.raises(SystemExit) as exited:
            register.main(register.get_args_parser().parse_args([*argv, "--name", "ssd-refused"]))
        err = capsys.readouterr().err
        assert exited.value.code == 2, what
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (what, err)


@pytest.mark.timeout(180)
def test_register_reads_a_checkpoint_on_object_storage(up, s3_server, tiny_checkpoint, tmp_path, monkeypatch):
    import mlflow

    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    checkpoint = _checkpoint(tiny_checkpoint, tmp_path / "best", 0.2)
    for file in checkpoint.iterdir():  # as Ray Train leaves a run's checkpoint under --storage-path s3://...
        s3_server.client.upload_file(str(file), s3_server.bucket, f"runs/r1/checkpoint_000001/{file.name}")
    tracker = Tracker(up.url, "register-test", "on-s3")
    result = register.main(register.get_args_parser().parse_args(
        ["--run-id", tracker.run_id, "--name", "ssd-s3", "--mlflow-uri", up.url,
         "--checkpoint", f"s3://{s3_server.bucket}/runs/r1/checkpoint_000001"]))
    assert (result["registered_version"], result["champion"]) == ("1", True)
    client = mlflow.MlflowClient(up.url)
    assert client.get_model_version("ssd-s3", "1").tags["mAP"] == "0.2"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
