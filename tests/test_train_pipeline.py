"""pipelines/train.py on a local Ray cluster: bad requests fail fast, and a worker that dies
mid-run is replaced and the run resumes from its last checkpoint (mid-epoch) without redoing
trained batches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ssd.checkpoint import load_checkpoint
from ssd.data.convert import ensure_synthetic_shards
from ssd.distributed.trainer import ClusterTooSmall, Scaling, check_cluster_resources

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "pipelines" / "train.py"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 64, 32, log=lambda _: None)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
            "SSD_DATA_HOME": str(tmp_path / "data"), "SSD_MLFLOW_HOME": str(tmp_path / "mlflow"),
            "RAY_ADDRESS": ""}


#: a bound far above the ~1.5 s a refused request takes here, far below the 20-50 s it took when
#: a Ray cluster was started first (what these tests guard against)
FAST = 15.0


def _no_ray(out: subprocess.CompletedProcess) -> bool:
    log = out.stdout + out.stderr
    return "Ray: " not in log and "Started a local Ray instance" not in log


def _train(args: list[str], tmp_path: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], env=_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_unknown_config_key_fails_before_ray_starts(shards, tmp_path):
    start = time.perf_counter()
    out = _train(["--data", str(shards), "optim.learning_rate=0.1"], tmp_path)
    assert out.returncode != 0
    assert "unknown key 'optim.learning_rate'" in out.stderr and "known keys in 'optim'" in out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
    assert time.perf_counter() - start < 60


def test_an_incompatible_init_model_fails_before_ray_starts(shards, tmp_path):
    import torch

    from ssd.checkpoint import save_checkpoint
    from ssd.config import load_config
    from ssd.models import build_model

    source_cfg = load_config("tiny", ["model.num_classes=3"])
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "source", model=build_model(source_cfg), epoch=1, step=1, config=source_cfg,
                    classes=["circle", "dog"])
    out = _train(["--data", str(shards), "--init-from", str(tmp_path / "source"), "--no-mlflow",
                  "priors.extra_box=false"], tmp_path)
    assert out.returncode != 0
    assert "--init-from" in out.stderr and "boxes per location (4, 6, 6, 4, 4)" in out.stderr, out.stderr
    assert "Started a local Ray instance" not in out.stdout + out.stderr
    out = _train(["--data", str(shards), "--init-from", str(tmp_path / "nowhere"), "--no-mlflow"], tmp_path)
    assert out.returncode != 0 and "not a checkpoint folder" in out.stderr, out.stderr


def test_missing_data_fails_fast_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    start = time.perf_counter()
    out = _train(["--data", str(missing)], tmp_path)
    assert out.returncode != 0 and _no_ray(out)
    assert f"training shards '{missing / 'train'}'" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # one line, no traceback
    assert time.perf_counter() - start < FAST


@pytest.mark.parametrize(("override", "message"), [
    ("optim.lr=abc", "optim.lr must be a number >= 0, got 'abc'"),
    ("loss.neg_ratio=-1", "loss.neg_ratio must be"),
    ("augment.strength=1.5", "augment.strength must be in [0, 1], got 1.5"),
    ("matching.iou_threshold=0", "matching.iou_threshold must be"),
    ("optim.schedule=linear", "optim.schedule 'linear'"),
])
def test_bad_config_values_fail_before_ray_naming_key_and_value(shards, tmp_path, override, message):
    start = time.perf_counter()
    out = _train(["--data", str(shards), "--no-mlflow", override], tmp_path)
    assert out.returncode != 0 and _no_ray(out)
    assert message in out.stderr and out.stderr.startswith("error: config:"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert time.perf_counter() - start < FAST


def test_mismatched_splits_fail(shards, tmp_path):
    other = ensure_synthetic_shards(tmp_path / "voc-like", 16, 16, log=lambda _: None)
    info = json.loads((other / "val" / "dataset.json").read_text())
    info["classes"] = ["a", "b"]
    (other / "val" / "dataset.json").write_text(json.dumps(info))
    out = _train(["--train", str(shards / "train"), "--val", str(other / "val")], tmp_path)
    assert out.returncode != 0 and "different classes" in out.stderr


def test_cluster_resource_check():
    check_cluster_resources(Scaling(2, False, 1.0), {"CPU": 2.0})
    with pytest.raises(ClusterTooSmall, match=r"3 workers x 1 CPU = 3 CPUs, but the Ray cluster has 2"):
        check_cluster_resources(Scaling(3, False, 1.0), {"CPU": 2.0})
    with pytest.raises(ClusterTooSmall, match=r"2 GPU workers need 2 GPUs, but the Ray cluster has 1"):
        check_cluster_resources(Scaling(2, True, 1.0), {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ClusterTooSmall, match="at least 1"):
        check_cluster_resources(Scaling(0, False, 1.0), {"CPU": 8.0})


def test_more_workers_than_cpus_fails_fast_without_starting_a_cluster(shards, tmp_path):
    start = time.perf_counter()
    out = _train(["--data", str(shards), "--workers", "64", "--address", "local", "--no-mlflow",
                  "--storage-path", str(tmp_path / "runs")], tmp_path)
    assert out.returncode != 0 and _no_ray(out)
    assert re.search(rf"64 workers x 1 CPU = 64 CPUs, but this machine has {os.cpu_count()}\b", out.stderr), out.stderr
    assert time.perf_counter() - start < FAST
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_worker_error_a_restart_cannot_fix_ends_the_run_at_once(shards, tmp_path):
    """A data error found by the workers before their first step is not retried --max-failures
    times; the user sees one line with the cause, not every rank's traceback."""
    out = _train(["--data", str(shards), "--workers", "2", "--address", "local", "--no-mlflow", "--max-failures", "2",
                  "--inject-failure", "setup", "--storage-path", str(tmp_path / "runs")], tmp_path)
    log = out.stdout + out.stderr
    assert out.returncode != 0
    assert log.count("worker error that a restart cannot fix, not retried") == 1, log[-3000:]
    assert "worker failure, restarting" not in log
    final = out.stderr.strip().splitlines()[-1]
    assert final.startswith("error: training failed: rank ") and "injected data error" in final, final
    assert "Error in training function" not in log and "Traceback" not in log, log[-3000:]


def _finished_epochs(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"epoch (\d+)/\d+ done in", log)]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(600)
def test_worker_death_resumes_from_checkpoint_and_resume_continues(shards, tmp_path):
    """Also: with MLflow unreachable the run warns, trains and checkpoints as usual."""
    storage = tmp_path / "runs"
    # MLflow unreachable (nothing listens on port 9): the run must warn and train on regardless
    common = ["--data", str(shards), "--workers", "2", "--address", "local", "--mlflow-uri", "http://127.0.0.1:9",
              "--log-every", "1",
              "--storage-path", str(storage)]
    overrides = ["train.batch_size=16", "train.eval_every=2"]  # 8 per worker
    # a checkpoint every 2 steps too: the failure at epoch 2 step 3 resumes 2 batches into epoch 2
    out = _train([*common, "--name", "faulty", "--epochs", "3", "--inject-failure", "2:3:1",
                  "--summary-json", str(tmp_path / "summary.json"), *overrides, "train.checkpoint_every_iters=2"],
                 tmp_path, timeout=420)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "MLflow at http://127.0.0.1:9 failed to start the run; tracking is off" in log
    assert "injected failure: rank 1 exits at epoch 2 step 3" in log
    # one line for the recovered failure, naming the rank that died; no tracebacks
    assert log.count("worker failure, restarting the workers from the last checkpoint: rank 1: the worker process "
                     "died") == 1, log[-4000:]
    assert "Traceback" not in log and "Error in training function" not in log, log[-4000:]
    assert re.search(r"resuming from \S+checkpoint-epoch-0001-iter-0000006 \(epoch 1 done, 2 batches into epoch 2\)",
                     log), log[-4000:]
    assert _finished_epochs(log) == [1, 2, 3]  # epoch 1 is not trained twice
    # the replacement workers skip epoch 2's first 2 batches (trained once) and redo step 3 with
    # the same data and weights
    assert len(re.findall(r"epoch 2/3 step 1/4  loss", log)) == 1, log[-4000:]
    before, after = re.findall(r"epoch 2/3 step 3/4  loss (\S+)", log)
    assert before == after
    summary = json.loads((tmp_path / "summary.json").read_text())
    last = load_checkpoint(summary["last_checkpoint"])
    assert last.epoch == 3 and last.step == 3 * 4  # 64 images / global batch 16 = 4 steps

    # --resume NAME continues the stopped run where it stopped: only the new epoch trains
    again = _train([*common, "--resume", "faulty", "--epochs", "4", "--summary-json",
                    str(tmp_path / "summary2.json"), *overrides], tmp_path, timeout=300)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-4000:]
    assert _finished_epochs(log) == [4]
    last = load_checkpoint(json.loads((tmp_path / "summary2.json").read_text())["last_checkpoint"])
    assert last.epoch == 4 and last.step == 4 * 4
