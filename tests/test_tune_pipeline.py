"""pipelines/tune.py on a local Ray cluster: an ASHA sweep of the tiny model tracked in a real
MLflow server, the pre-screen and invalid combinations, and spaces rejected before any trial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ssd.config import load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.training import RunOptions, run_training

ROOT = Path(__file__).resolve().parents[1]
TUNE = ROOT / "pipelines" / "tune.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 64, 32, log=lambda _: None)


def _tune(args: list[str], tmp_path: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "", "SSD_MLFLOW_HOME": str(tmp_path / "mlflow")}
    return subprocess.run([sys.executable, str(TUNE), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_invalid_space_fails_before_any_trial(shards, tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("space:\n  loss.neg_ratio: {randint: [2, 6]}\n  optim.momentm: {uniform: [0.8, 0.9]}\n")
    out = _tune(["--space", str(space), "--data", str(shards), "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert out.returncode != 0
    assert "unknown key 'optim.momentm'" in out.stderr and str(space) in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
    assert not (tmp_path / "runs").exists()


def test_resuming_a_sweep_with_an_unreadable_setup_names_the_file(tmp_path):
    setup = tmp_path / "runs" / "broken" / "sweep_setup.json"
    setup.parent.mkdir(parents=True)
    setup.write_text('{"name": "broken", ')  # cut off mid-write
    out = _tune(["--resume", "broken", "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert out.returncode != 0
    assert f"--resume broken: cannot read {setup}" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "Started a local Ray instance" not in out.stdout + out.stderr


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_asha_sweep_is_tracked_and_its_best_config_trains(shards, tmp_path, mlflow_server):
    import mlflow

    summary_path = tmp_path / "summary.json"
    out = _tune(["--space", str(ROOT / "tune_spaces" / "loss_aug.yaml"), "--data", str(shards), "--num-samples", "4",
                 "--epochs", "2", "--grace-period", "1", "--reduction-factor", "2", "--address", "local",
                 "--storage-path", str(tmp_path / "runs"), "--mlflow-uri", mlflow_server, "--experiment", "sweep-test",
                 "--summary-json", str(summary_path), "train.batch_size=8", "optim.warmup_iters=5"], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    summary = json.loads(summary_path.read_text())
    assert summary["trials"] == 4 and summary["by_status"].get("stopped early", 0) >= 1, summary["by_status"]
    assert summary["trial_epochs"] < summary["full_budget_epochs"] == 8
    assert all(r["epochs"] in (1, 2) for r in summary["rows"])

    client = mlflow.MlflowClient(mlflow_server)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["scheduler"] == "asha"
    assert {f.path for f in client.list_artifacts(parent.info.run_id)} >= {
        "results.csv", "sweep.png", "best_config.yaml", "loss_aug.yaml"}
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {c.data.tags["trial_id"] for c in children} == {r["trial_id"] for r in summary["rows"]}
    status = {r["trial_id"]: r["status"] for r in summary["rows"]}
    for child in children:  # none left RUNNING; stopped trials KILLED whatever their driver did
        expected = "KILLED" if status[child.data.tags["trial_id"]] == "stopped early" else "FINISHED"
        assert child.info.status == expected, (child.data.tags, status)
    for child in children:
        assert {"loss.neg_ratio", "augment.strength", "optim.lr"} <= set(child.data.params)
        assert len(client.get_metric_history(child.info.run_id, "epoch/mAP")) in (1, 2)

    # the best trial's config file trains unchanged (and carries the best trial's values)
    best = max(summary["rows"], key=lambda r: r["best_mAP"])
    cfg = load_config(summary["best_config"], ["train.epochs=1"])
    assert cfg.optim.lr == pytest.approx(best["optim.lr"]) and cfg.loss.neg_ratio == best["loss.neg_ratio"]
    metrics = run_training(cfg, RunOptions(train_data=str(shards / "train"), val_data=str(shards / "val"),
                                           sample_images=0))
    assert metrics["epoch"] == 1 and metrics["mAP"] >= 0


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_prescreen_skips_low_recall_specs_and_an_unbuildable_combination_fails_alone(shards, tmp_path):
    # on these shards (measured): s_min 0.2 -> prior recall 0.756 (s_max 0.7) / 0.770 (0.9);
    # s_min 0.8, s_max 0.9 -> 0.535; s_min 0.8, s_max 0.7 cannot be built
    space = tmp_path / "priors.yaml"
    space.write_text("space:\n  priors.s_min: {grid: [0.2, 0.8]}\n  priors.s_max: {grid: [0.7, 0.9]}\n")
    summary_path = tmp_path / "summary.json"
    out = _tune(["--space", str(space), "--data", str(shards), "--num-samples", "1", "--epochs", "1",
                 "--min-prior-recall", "0.7", "--address", "local", "--no-mlflow",
                 "--storage-path", str(tmp_path / "runs"), "--summary-json", str(summary_path),
                 "train.batch_size=8"], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    summary = json.loads(summary_path.read_text())
    by_values = {(r["priors.s_min"], r["priors.s_max"]): r for r in summary["rows"]}
    assert by_values[(0.8, 0.7)]["status"] == "invalid"
    assert by_values[(0.8, 0.9)]["status"] == "skipped" and by_values[(0.8, 0.9)]["epochs"] == 0
    assert by_values[(0.8, 0.9)]["prior_recall"] == pytest.approx(0.535, abs=0.01)
    assert by_values[(0.2, 0.7)]["status"] == by_values[(0.2, 0.9)]["status"] == "completed"
    assert summary["trial_epochs"] == 2 and summary["by_status"] == {"completed": 2, "invalid": 1, "skipped": 1}
    assert "s_min" in log and "invalid config" in log


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_sweep_whose_every_trial_failed_exits_non_zero_with_the_first_error(shards, tmp_path):
    space = tmp_path / "unbuildable.yaml"  # every combination has s_min >= s_max
    space.write_text("space:\n  priors.s_min: {grid: [0.8, 0.85]}\n  priors.s_max: {grid: [0.7]}\n")
    out = _tune(["--space", str(space), "--data", str(shards), "--num-samples", "1", "--epochs", "1",
                 "--scheduler", "fifo", "--address", "local", "--no-mlflow", "--storage-path", str(tmp_path / "runs"),
                 "train.batch_size=8"], tmp_path)
    assert out.returncode != 0, (out.stdout + out.stderr)[-3000:]
    final = out.stderr.strip().splitlines()[-1]
    assert final.startswith("error: sweep ") and "all 2 trial(s) failed; the first" in final, final
    assert "(invalid)" in final and "s_min" in final and "s_max" in final, final
    assert "best mAP -1.0000" not in out.stdout


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(shards, tmp_path):
    import signal
    import time

    storage = tmp_path / "runs"
    args = ["--space", str(ROOT / "tune_spaces" / "loss_aug.yaml"), "--data", str(shards), "--num-samples", "3",
            "--epochs", "1", "--max-concurrent", "1", "--scheduler", "fifo", "--address", "local", "--no-mlflow",
            "--storage-path", str(storage), "--name", "resumable", "train.batch_size=8"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, str(TUNE), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    groups = storage / "resumable" / "placement_groups"
    deadline = time.time() + 300
    while len(list(groups.glob("*"))) < 2:  # the second trial has started training
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:] if proc.stdout else ""
        time.sleep(0.5)
    first_trials = {p.name for p in groups.glob("*")}
    proc.send_signal(signal.SIGINT)
    log = proc.communicate(timeout=240)[0]
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted" in log and "--resume resumable" in log

    summary_path = tmp_path / "summary.json"
    out = _tune(["--resume", "resumable", "--storage-path", str(storage), "--address", "local",
                 "--summary-json", str(summary_path)], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-5000:]
    summary = json.loads(summary_path.read_text())
    assert summary["trials"] == 3 and summary["by_status"] == {"completed": 3}
    finished_before = min(first_trials)  # the first trial had completed before the interrupt
    assert f"{finished_before} started" not in log.replace("trial_driver_", "")


def test_trial_concurrency_follows_free_resources():
    from ssd.distributed.trainer import Scaling
    from ssd.distributed.tune import max_concurrent_trials

    assert max_concurrent_trials(Scaling(1, False, 1.0), {"CPU": 2.0}) == 2
    assert max_concurrent_trials(Scaling(2, False, 1.0), {"CPU": 5.0}) == 2
    assert max_concurrent_trials(Scaling(1, False, 2.0), {"CPU": 1.0}) == 1  # queued, never 0
    assert max_concurrent_trials(Scaling(1, True, 4.0), {"CPU": 32.0, "GPU": 3.0}) == 3
