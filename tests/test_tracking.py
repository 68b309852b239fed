"""ssd.tracking against a real MLflow tracking server, and with no server at all."""

from __future__ import annotations

import socket
import time

import pytest

from ssd.tracking import Tracker, resolve_tracking_uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_run_params_metrics_artifacts_land_on_the_server(mlflow_server, tmp_path):
    import mlflow

    tracker = Tracker(mlflow_server, "ssd-test", "run-1", tags={"data_hash": "abc"})
    assert tracker.active, tracker.failure
    tracker.log_params({"optim.lr": 0.05, "priors.s_min": 0.2})
    tracker.log_metrics({"loss": 3.5, "AP": 0.1}, step=1)
    tracker.log_metrics({"loss": 2.5, "AP": 0.3}, step=2)
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.05\n")
    tracker.log_artifact(tmp_path / "config.yaml")
    tracker.end()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-1"
    assert run.data.params == {"optim.lr": "0.05", "priors.s_min": "0.2"}
    assert run.data.tags["data_hash"] == "abc"
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "AP")] == [(1, 0.1), (2, 0.3)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["config.yaml"]


def test_unreachable_server_warns_once_and_never_raises(caplog, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    start = time.perf_counter()
    tracker = Tracker(f"http://127.0.0.1:{_free_port()}", "ssd-test", "run")
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end("FAILED")
    assert time.perf_counter() - start < 30
    assert not tracker.active and "start the run" in tracker.failure
    warnings = [r for r in caplog.records if "tracking is off" in r.getMessage()]
    assert len(warnings) == 1


def test_disabled_tracker_on_other_ranks_does_nothing():
    tracker = Tracker("http://127.0.0.1:1", "x", "y", enabled=False)
    tracker.log_metrics({"loss": 1.0})
    assert tracker.run_id is None and tracker.failure is None and not tracker.active


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("SSD_MLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://server:5000")
    assert resolve_tracking_uri() == "http://server:5000"
    assert resolve_tracking_uri("http://cli:1") == "http://cli:1"


def test_the_server_make_up_started_comes_before_the_sqlite_file_and_is_named(monkeypatch, tmp_path, capsys):
    """start.sh's state folder names the running server (mlflow.json + a live pid): scripts use
    it when neither --mlflow-uri nor MLFLOW_TRACKING_URI is given, and say so on stderr."""
    import json
    import os

    from ssd import tracking

    state = tmp_path / "state"
    state.mkdir()
    (state / "mlflow.json").write_text(json.dumps({"tracking_uri": "http://127.0.0.1:5999", "home": "x"}))
    (state / "mlflow.pid").write_text(str(os.getpid()))  # a live process
    monkeypatch.setenv("SSD_LOCAL_STATE", str(state))
    monkeypatch.setenv("SSD_MLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking, "_announced", set())
    assert resolve_tracking_uri() == "http://127.0.0.1:5999"
    assert f"MLflow: http://127.0.0.1:5999 (the server `make up` started (state {state})" in capsys.readouterr().err
    assert resolve_tracking_uri("http://cli:1") == "http://cli:1"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:2")
    assert resolve_tracking_uri() == "http://env:2"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    (state / "mlflow.pid").write_text("999999999")  # gone: the file store again
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    assert "a local SQLite store" in capsys.readouterr().err


def test_local_sqlite_store_keeps_artifacts_at_the_fixed_home(monkeypatch, tmp_path):
    monkeypatch.setenv("SSD_MLFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    (tmp_path / "note.txt").write_text("x")
    tracker = Tracker(resolve_tracking_uri(), "local", "r")
    tracker.log_artifact(tmp_path / "note.txt")
    tracker.end()
    assert tracker.active, tracker.failure
    assert list((tmp_path / "home" / "artifacts" / "local").rglob("note.txt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "note.txt"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_attach_continues_an_existing_run_and_reopens_an_ended_one(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    driver = Tracker(mlflow_server, "ssd-test", "driver-run")
    worker = Tracker.attach(mlflow_server, driver.run_id)  # e.g. a worker logging into it
    assert worker.active and worker.run_id == driver.run_id, worker.failure
    worker.log_metrics({"AP": 0.1}, step=1)
    assert client.get_run(driver.run_id).info.status == "RUNNING"
    driver.end()
    assert client.get_run(driver.run_id).info.status == "FINISHED"

    resumed = Tracker.attach(mlflow_server, driver.run_id)  # e.g. a resumed training run
    assert resumed.active, resumed.failure
    assert client.get_run(driver.run_id).info.status == "RUNNING"
    resumed.log_metrics({"AP": 0.2}, step=2)
    resumed.set_tags({"resumed": "1"})
    resumed.end("KILLED")
    run = client.get_run(driver.run_id)
    assert run.info.status == "KILLED" and run.data.tags["resumed"] == "1"
    assert [(m.step, m.value) for m in client.get_metric_history(driver.run_id, "AP")] == [(1, 0.1), (2, 0.2)]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_attach_to_a_missing_run_warns_once_and_never_raises(mlflow_server, caplog):
    tracker = Tracker.attach(mlflow_server, "0" * 32)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end()
    assert not tracker.active and "attach to the run" in tracker.failure
    assert len([r for r in caplog.records if "tracking is off" in r.getMessage()]) == 1


def test_attach_unreachable_or_disabled_never_raises(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    start = time.perf_counter()
    tracker = Tracker.attach(f"http://127.0.0.1:{_free_port()}", "0" * 32)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.end("FAILED")
    assert time.perf_counter() - start < 30
    assert not tracker.active and "attach to the run" in tracker.failure
    disabled = Tracker.attach("http://127.0.0.1:1", "0" * 32, enabled=False)
    disabled.log_metrics({"loss": 1.0})
    assert disabled.run_id is None and disabled.failure is None and not disabled.active
