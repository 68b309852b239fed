"""benchmarks/gpu_check.py (`make gpu-check`): the dry run on the CPU, so the script cannot rot
against the code it measures; and the non-dry run on a machine without CUDA, which must skip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("env", "model", "shards", "e2e", "learn", "ray", "compile")
STATUSES = {"ok", "partial", "failed", "timeout", "skipped"}


def run_check(tmp_path: Path, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"), **env)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, env=environ, capture_output=True,
        text=True, timeout=timeout, check=False,
    )


def read_report(tmp_path: Path) -> dict:
    out = tmp_path / "out"
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check")
    assert list(report["stages"]) == list(STAGES)
    for name, stage in report["stages"].items():
        assert stage["status"] in STATUSES, (name, stage)
    return report


def failures(report: dict) -> dict:
    return {n: s.get("note") for n, s in report["stages"].items() if s["status"] not in ("ok", "skipped")}


#: the slow test of the Ray and torch.compile stages
RAY_AND_COMPILE = "test_dry_run_ray_and_compile"


@pytest.fixture(scope="module")
def dry_run(request, tmp_path_factory):
    """The one dry run the module's dry-run tests check: all seven stages when the slow
    Ray/compile test is selected too (one driver and one shards stage for both tests: two runs
    took ~10 s more), else every stage but Ray's and torch.compile's."""
    tmp_path = tmp_path_factory.mktemp("gpu_check_dry")
    both = any(item.name == RAY_AND_COMPILE for item in request.session.items)
    proc = run_check(tmp_path, "--dry", GPU_CHECK_SKIP="" if both else "ray,compile")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SimpleNamespace(report=read_report(tmp_path), out=tmp_path / "out", all_stages=both)


def test_dry_run(dry_run):
    """Every stage but Ray's and torch.compile's at tiny sizes on the CPU (those two take ~40 s
    on a 2-core machine: the slow test below, on the same run)."""
    report = dry_run.report
    assert report["dry"] is True
    for name in ("env", "model", "shards", "e2e", "learn"):
        assert report["stages"][name]["status"] == "ok", (name, report["stages"][name])
    if not dry_run.all_stages:
        assert report["stages"]["ray"]["status"] == report["stages"]["compile"]["status"] == "skipped"
    assert not failures(report), failures(report)
    stages = {n: s["result"] for n, s in report["stages"].items()}
    # the model-bound comparison: both sides timed, the same counted FLOPs per image
    config = stages["model"]["configs"][0]
    assert config["ours"]["images_per_s"] > 0 and config["peer"]["images_per_s"] > 0
    flops = stages["model"]["flops_per_image"]
    assert flops["ours"] == pytest.approx(flops["peer"], rel=0.01)
    # the real loader feeding the step, per loader-worker count, with the data-wait share
    cases = stages["e2e"]["cases"]
    assert {(c["augment"], c["loader_workers"]) for c in cases} >= {("cpu", 0), ("cpu", 1)}
    assert all(0 <= c["steady_data_wait_share"] <= 1 and c["images"] > 0 for c in cases)
    if "device" in {c["augment"] for c in cases}:  # once ssd.device_augment exists
        assert stages["e2e"]["device_augmentation"].startswith("measured")
    assert stages["learn"]["n_steps"] > 0 and "loss_fell" in stages["learn"]
    md = (dry_run.out / "gpu_check.md").read_text()
    assert "| model | ok |" in md and "Model-bound" in md


@pytest.mark.slow
def test_dry_run_ray_and_compile(dry_run):
    """The Ray stage (pipelines/train.py --workers 1, one epoch, on the shards stage's data) and
    torch.compile of the step (dynamo with the eager backend in the dry run)."""
    report = dry_run.report
    assert dry_run.all_stages
    assert report["stages"]["ray"]["status"] == report["stages"]["compile"]["status"] == "ok", (
        report["stages"]["ray"], report["stages"]["compile"])
    assert not failures(report), failures(report)
    ray = report["stages"]["ray"]["result"]
    assert ray["rc"] == 0 and ray["summary"]
    assert report["stages"]["compile"]["result"]["compiled_images_per_s"] > 0


def test_without_cuda_skips_cleanly(tmp_path):
    proc = run_check(tmp_path, timeout=120, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped: no CUDA device" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()
