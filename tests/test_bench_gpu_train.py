"""benchmarks/bench_gpu_train.py: a CPU smoke run of the whole script, the GPU run, the peak table."""

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_gpu_train.py"


def run_bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        check=False,  # the tests check returncode themselves
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_result(result: dict, batch: int) -> None:
    case = result["cases"][0]
    assert case["ours"]["unit"] == "images/s" and case["ours"]["median"] > 0
    assert case["peer"]["median"] > 0
    # the median of the per-round ratios (rounds paired: both sides' samples in round order)
    ratios = sorted(o / p for o, p in zip(case["ours"]["samples"], case["peer"]["samples"], strict=True))
    assert case["ratio"] == pytest.approx(ratios[len(ratios) // 2] if len(ratios) % 2
                                          else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2)
    assert case["ratio_quartiles"][0] <= case["ratio"] <= case["ratio_quartiles"][1]
    assert result["run"]["batch"] == batch
    eq = result["equivalence"]
    assert eq["checked"] and eq["priors"] == 8732 and eq["parameters"] == eq["peer_parameters"]
    for side in ("ours", "peer"):
        s = result["sides"][side]
        assert s["images_per_s"] > 0 and s["step"]["median_ms"] > 0
        assert s["flops_per_step"] > 0 and s["achieved_tflops"] > 0
    # both sides run the same network on the same batch: the same counted FLOPs
    assert eq["flops_ours"] == pytest.approx(eq["flops_peer"], rel=0.01)
    assert all(len(v) >= 2 for v in result["losses"].values())


@pytest.mark.slow
def test_cpu_smoke_run_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    proc = run_bench("--device", "cpu", "--smoke", "--batch", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    check_result(result, batch=2)
    assert result["machine"]["device"] == "cpu" and result["run"]["amp"] == "none"
    assert result["settings"]["repeats"] == 1 and result["run"]["smoke"]
    # VGG16-SSD300 forward + backward is ~188 GFLOP per 300x300 image (3 x ~62.6 forward)
    assert 150e9 < result["equivalence"]["flops_ours"] / 2 < 250e9
    # no peak FLOP/s for a CPU: MFU is null and the output says why
    assert result["sides"]["ours"]["mfu"] is None and result["peak"]["flops"] is None
    assert "MFU not computed" in proc.stdout
    assert "| ratio (ours / tv; quartiles) |" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_without_cuda_it_skips_cleanly(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    proc = run_bench("--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "skipped: no CUDA device" in proc.stdout
    assert not out.exists()


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_reports_throughput_and_mfu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_train.json"
    proc = run_bench("--batch", "8", "--warmup", "2", "--iters", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    check_result(result, batch=8)
    assert result["machine"]["device"].startswith("cuda") and result["machine"]["gpu"]
    assert result["run"]["timer"] == "cuda events" and result["run"]["channels_last"]
    expected_amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert result["run"]["amp"] == expected_amp
    for side in ("ours", "peer"):
        assert result["sides"][side]["peak_memory_gib"] > 0
        mfu = result["sides"][side]["mfu"]
        assert (mfu is None) == (result["peak"]["flops"] is None)
        assert mfu is None or 0 < mfu < 1


def test_peak_table_picks_the_right_gpu() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.import_module("bench_gpu_train")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == (989e12, "H100")
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "tf32") == (494e12, "H100")
    assert bench.peak_flops("NVIDIA H100 PCIe", "bf16") == (756e12, "H100 PCIe")
    assert bench.peak_flops("NVIDIA H200", "bf16") == (989e12, "H200")
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == (19.5e12, "A100")
    assert bench.peak_flops("NVIDIA L4", "bf16") == (121e12, "L4")
    assert bench.peak_flops("Tesla T4", "fp16") == (None, None)
    assert bench.compute_dtype_key("bf16", torch.device("cpu")) == "bf16"
    assert bench.compute_dtype_key("none", torch.device("cpu")) == "fp32"
