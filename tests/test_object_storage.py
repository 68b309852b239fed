"""Shards, runs and sweeps on object storage, against a real S3-compatible server (``s3_server``).

Objects are put and listed with boto3, independently of ``ssd.storage``, so a bug there cannot
hide itself. The pipelines run as users run them (``python pipelines/train.py ...``) with only
the AWS variables pointing them at the server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssd import storage
from ssd.data.convert import make_synthetic_shards
from ssd.data.shards import ShardSet, read_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def aws_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SSD_S3_COMMAND", raising=False)
    return s3_server


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory):
    """Synthetic train/val shards (48 + 16 images, 16 per shard) uploaded under ``data/``;
    yields (local folder, s3:// prefix)."""
    local = tmp_path_factory.mktemp("shards")
    make_synthetic_shards(local, {"train": 48, "val": 16}, shard_size=16, workers=0, progress=False,
                          log=lambda _: None)
    for path in sorted(local.rglob("*")):
        relative = path.relative_to(local)
        if path.is_file() and relative.parts[0] in ("train", "val"):
            s3_server.client.upload_file(str(path), s3_server.bucket, f"data/{relative.as_posix()}")
    return local, f"s3://{s3_server.bucket}/data"


# --------------------------------------------------------------------------------------------
# ssd.storage


def test_join_keeps_the_double_slash_of_a_uri():
    assert storage.join("s3://b/runs/", "r1", "meta.json") == "s3://b/runs/r1/meta.json"
    assert storage.join("/tmp/runs", "r1", "meta.json") == "/tmp/runs/r1/meta.json"
    assert storage.is_uri("s3://b/x") and not storage.is_uri("/tmp/x")


@pytest.mark.parametrize("where", ["path", "s3"])
def test_files_round_trip_on_a_path_and_on_s3(where, tmp_path, aws_env):
    base = str(tmp_path / "root") if where == "path" else f"s3://{aws_env.bucket}/storage-test"
    assert storage.list_names(base) == [] and not storage.is_file(storage.join(base, "a.json"))

    storage.write_text(storage.join(base, "a.json"), '{"epoch": 3}')
    storage.write_bytes(storage.join(base, "sub", "b.bin"), b"\x00\x01")
    storage.write_text(storage.join(base, "a.json"), '{"epoch": 4}')  # replaced whole

    assert json.loads(storage.read_text(storage.join(base, "a.json"))) == {"epoch": 4}
    assert storage.read_bytes(storage.join(base, "sub", "b.bin")) == b"\x00\x01"
    assert storage.list_names(base) == ["a.json", "sub"]
    assert storage.is_file(storage.join(base, "a.json")) and not storage.is_file(storage.join(base, "sub"))
    with pytest.raises(FileNotFoundError, match=re.escape(storage.join(base, "missing.json"))):
        storage.read_text(storage.join(base, "missing.json"))
    if where == "s3":  # the objects, as another S3 client sees them
        assert sorted(aws_env.keys("storage-test/")) == ["storage-test/a.json", "storage-test/sub/b.bin"]
        body = aws_env.client.get_object(Bucket=aws_env.bucket, Key="storage-test/a.json")["Body"].read()
        assert json.loads(body) == {"epoch": 4}
    else:  # local writes leave no temporary file behind
        assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["a.json", "sub"]


# --------------------------------------------------------------------------------------------
# shards


def test_shards_on_s3_stream_exactly_like_the_local_copy(s3_shards, aws_env):
    local_dir, prefix = s3_shards
    local, remote = ShardSet.open(local_dir / "train"), ShardSet.open(f"{prefix}/train")
    assert remote.urls == tuple(f"{prefix}/train/shard-{i:06d}.tar" for i in range(3))
    assert remote.counts == local.counts == (16, 16, 16) and remote.classes == local.classes
    assert list(read_samples(remote)) == list(read_samples(local))  # keys, JPEG bytes, annotations
    with pytest.raises(FileNotFoundError, match=f"{prefix}/nothing/dataset.json"):
        ShardSet.open(f"{prefix}/nothing")


# --------------------------------------------------------------------------------------------
# the pipelines on object storage


def _run(script: str, args: list[str], tmp_path: Path, env: dict[str, str], timeout: int = 420):
    full_env = {**os.environ, **env, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
                "SSD_DATA_HOME": str(tmp_path / "data-home"), "SSD_MLFLOW_HOME": str(tmp_path / "mlflow")}
    full_env.pop("SSD_S3_COMMAND", None)
    return subprocess.run([sys.executable, str(ROOT / "pipelines" / script), *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_run_on_s3_resumes_by_name_with_its_data_config_and_mlflow_run(s3_shards, s3_server, tmp_path):
    import mlflow

    _, prefix = s3_shards
    runs = f"s3://{s3_server.bucket}/runs"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _run("train.py", ["--data", prefix, "--storage-path", runs, "--name", "r", "--epochs", "1",
                              "--workers", "2", "--address", "local", "--mlflow-uri", tracking,
                              "--summary-json", str(tmp_path / "first.json"), "train.batch_size=16",
                              "optim.warmup_iters=2"], tmp_path, s3_server.env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    summary = json.loads((tmp_path / "first.json").read_text())
    assert summary["best_checkpoint"] == f"{runs}/r/checkpoint-epoch-0001"
    assert {"runs/r/checkpoint-epoch-0001/model.pt", "runs/r/checkpoint-epoch-0001/meta.json"} <= set(
        s3_server.keys("runs/r/"))

    # only the name: data, config (batch size 8, warmup 2) and MLflow run come from the run itself
    again = _run("train.py", ["--resume", "r", "--storage-path", runs, "--epochs", "2", "--workers", "2",
                              "--address", "local", "--mlflow-uri", tracking,
                              "--summary-json", str(tmp_path / "again.json")], tmp_path, s3_server.env)
    log = again.stdout + again.stderr
    assert again.returncode == 0, log[-5000:]
    assert "(epoch 1 done)" in log and "synthetic" not in log
    resumed = json.loads((tmp_path / "again.json").read_text())
    assert resumed["last_checkpoint"] == f"{runs}/r/checkpoint-epoch-0002"
    assert resumed["mlflow_run_id"] == summary["mlflow_run_id"]
    meta = json.loads(s3_server.client.get_object(Bucket=s3_server.bucket,
                                                  Key="runs/r/checkpoint-epoch-0002/meta.json")["Body"].read())
    assert meta["epoch"] == 2 and meta["step"] == 2 * 3  # 48 images / global batch 16 (8 per rank) = 3 steps
    assert meta["extra"]["train_data"] == f"{prefix}/train"
    history = mlflow.MlflowClient(tracking).get_metric_history(summary["mlflow_run_id"], "epoch/mAP")
    assert sorted(m.step for m in history) == [1, 2]

    missing = _run("train.py", ["--resume", "nope", "--storage-path", runs, "--no-mlflow"], tmp_path,
                   s3_server.env, timeout=120)
    assert missing.returncode != 0 and f"--resume nope: no checkpoint under {runs}/nope" in missing.stderr


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(900)
def test_a_sweep_on_s3_keeps_its_files_there_and_resumes_without_its_space_file(s3_shards, s3_server, tmp_path):
    _, prefix = s3_shards
    sweeps = f"s3://{s3_server.bucket}/sweeps"
    space = tmp_path / "space.yaml"  # gone before the resume: the sweep must not need it again
    space.write_text("space:\n  loss.neg_ratio: {grid: [2, 3]}\n")
    first = _run("tune.py", ["--space", str(space), "--data", prefix, "--num-samples", "1", "--epochs", "1",
                             "--scheduler", "fifo", "--address", "local", "--no-mlflow", "--storage-path", sweeps,
                             "--name", "sw", "--summary-json", str(tmp_path / "first.json"), "train.batch_size=8"],
                 tmp_path, s3_server.env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    summary = json.loads((tmp_path / "first.json").read_text())
    assert summary["by_status"] == {"completed": 2} and summary["sweep_dir"] == f"{sweeps}/sw"
    assert summary["best_config"] == f"{sweeps}/sw/best_config.yaml"
    keys = set(s3_server.keys("sweeps/"))
    assert {"sweeps/sw/sweep_setup.json", "sweeps/sw/best_config.yaml", "sweeps/sw/results.csv",
            "sweeps/sw/sweep.png"} <= keys
    # each trial's rank 0 recorded its placement group there, for the driver to release
    assert {f"sweeps/sw/placement_groups/{r['trial_id']}" for r in summary["rows"]} <= keys
    # the trials' Train runs checkpoint there too
    assert sum(k.endswith("checkpoint-epoch-0001/model.pt") for k in keys) == 2
    best = s3_server.client.get_object(Bucket=s3_server.bucket, Key="sweeps/sw/best_config.yaml")["Body"].read()
    assert f"best trial {summary['best_trial']}" in best.decode()

    space.unlink()
    again = _run("tune.py", ["--resume", "sw", "--storage-path", sweeps, "--address", "local",
                             "--summary-json", str(tmp_path / "again.json")], tmp_path, s3_server.env)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    resumed = json.loads((tmp_path / "again.json").read_text())
    assert resumed["by_status"] == {"completed": 2} and resumed["trial_epochs"] == 2
    assert {r["trial_id"]: r["best_mAP"] for r in resumed["rows"]} == {
        r["trial_id"]: r["best_mAP"] for r in summary["rows"]}  # nothing trained again

    missing = _run("tune.py", ["--resume", "nope", "--storage-path", sweeps], tmp_path, s3_server.env,
                   timeout=120)
    assert missing.returncode != 0 and f"--resume nope: no sweep under {sweeps}/nope" in missing.stderr
