"""benchmarks/bench_device_augment.py: the whole benchmark on 2 synthetic shard samples (seconds)."""

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        yield importlib.import_module("bench_device_augment")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_tiny_run_prints_every_row(bench, tmp_path: Path, capsys) -> None:
    from ssd.data.convert import ensure_synthetic_shards

    data = ensure_synthetic_shards(tmp_path / "synthetic", 2, 1, log=lambda _: None) / "train"
    out = tmp_path / "device_augment.json"
    result = bench.main(["--data", str(data), "--batch", "2", "--repeats", "2", "--warmup", "0",
                         "--batches", "2", "--thread-counts", "1", "--passes", "1", "--profile", "always",
                         "--out", str(out)], log=lambda _: None)
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == result["rows"]
    row = result["rows"][0]
    assert row["threads"] == 1 and row["worker"]["ratio"]["rounds"] == 2 and row["batch"]["ratio"]["rounds"] == 2
    assert all(v > 0 for side in ("cpu", "device") for v in row["worker"]["ms"][side])
    assert result["equal"]["epoch"] == {"samples": 2, "boxes": result["equal"]["epoch"]["boxes"],
                                        "targets_equal": True}
    feed = result["feed"]
    assert feed["cpu_cores"] == pytest.approx(2000 * feed["cpu_ms"] / 1e3)
    # the tables: (a) and (b) rows at 1 thread, the cores-per-GPU rows, the stages, the profiles
    assert "| torch threads | CPU path ms/img (median ± IQR) |" in printed
    goal_rows = [line for line in printed.splitlines() if line.startswith("| 1 | ") and "| ≥ " in line]
    assert len(goal_rows) == 2  # (a) and (b)
    assert "| CPU path (`augment_on=cpu`) |" in printed and "| device path (`augment_on=device`) |" in printed
    assert "device path (worker): prepare" in printed
    assert printed.count("Profile: ") == 3
    assert f"Commit {result['library_commit']}" in printed
