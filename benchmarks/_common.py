"""Shared helpers of the side-by-side benchmarks: argparse, timing, machine info, JSON, tables.

Every benchmark times *ours* and the *peer* (torchvision) in the same process, in rounds: a
round runs both sides back to back (alternating which goes first), so that a load spike from
another process on the machine hits both sides alike. A repeat is the mean of ``--number``
back-to-back calls. Reported per side: the median and the inter-quartile range (IQR) of its
repeats; the ratio is the **median of the per-round ratios** peer / ours, with its quartiles
(> 1 means ours is faster): each round's two times were taken under the same conditions, so
the ratio of a pair is what the load disturbs least. Throughput benchmarks (input_pipeline)
report rates instead (``stats``, e.g. samples/s per epoch) and per-round ratios ours / peer,
still > 1 when ours is faster. ``samples_ms`` / ``samples`` keep the rounds' order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: 1-minute load average when the benchmark started (other processes on a shared machine skew
#: timings, and with more threads than idle cores OpenMP ops can stall on descheduled threads)
START_LOAD = os.getloadavg()[0]


def get_args_parser(
    name: str, description: str, repeats: int, warmup: int, number: int = 1
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats, help="timed repeats per side")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed calls per side first")
    parser.add_argument(
        "--number", type=int, default=number, help="calls averaged inside one timed repeat"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=torch.get_num_threads(),
        help="torch intra-op threads (default: torch's own default on this machine)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="where to write the JSON"
    )
    return parser


def machine_info(threads: int, device: str = "cpu") -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": cpu,
        "cores": cores,
        "threads": threads,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "loadavg_1min_start": round(START_LOAD, 2),
        "loadavg_1min_end": round(os.getloadavg()[0], 2),
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return info


def library_version() -> str:
    """The git commit of the checkout, with "+dirty" when ssd/ or benchmarks/ has uncommitted
    changes (the code measured, or the measuring code)."""
    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=root, capture_output=True, text=True, check=False)
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "ssd", "benchmarks")
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (inclusive method)."""
    if len(values) >= 2:
        q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, median, q3
    return values[0], values[0], values[0]


def stats_ms(samples_s: list[float]) -> dict[str, Any]:
    """Median/IQR in ms of per-round times in seconds; ``samples_ms`` in the rounds' order."""
    ms = [s * 1e3 for s in samples_s]
    q1, median, q3 = quartiles(ms)
    return {
        "median_ms": median,
        "iqr_ms": q3 - q1,
        "q1_ms": q1,
        "q3_ms": q3,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "samples_ms": ms,
    }


def stats(values: list[float], unit: str) -> dict[str, Any]:
    """Median/IQR of per-round values in any unit (e.g. samples/s); keys without ``_ms``;
    ``samples`` in the rounds' order."""
    q1, median, q3 = quartiles(values)
    return {
        "unit": unit,
        "median": median,
        "iqr": q3 - q1,
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "samples": list(values),
    }


def paired_ratio(ours: dict[str, Any], peer: dict[str, Any], higher_is_better: bool = False) -> dict[str, Any]:
    """The median and quartiles of the per-round ratios of two sides measured in the same rounds
    (``stats_ms``: peer / ours; ``stats`` rates with ``higher_is_better``: ours / peer)."""
    key = "samples" if higher_is_better else "samples_ms"
    a, b = ours[key], peer[key]
    if len(a) != len(b):
        raise ValueError(f"paired ratio: {len(a)} rounds of ours against {len(b)} of the peer")
    ratios = [o / p for o, p in zip(a, b)] if higher_is_better else [p / o for o, p in zip(a, b)]
    q1, median, q3 = quartiles(ratios)
    return {"median": median, "q1": q1, "q3": q3, "rounds": len(ratios), "values": ratios}


def time_side_by_side(
    ours: Callable[[], Any],
    peer: Callable[[], Any],
    repeats: int,
    warmup: int,
    number: int = 1,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median/IQR in ms of ``ours`` and ``peer``, interleaved repeat by repeat."""
    for _ in range(warmup):
        ours()
        peer()
    samples: dict[str, list[float]] = {"ours": [], "peer": []}
    for r in range(repeats):
        # alternate which side goes first, so neither always runs on a warmer cache
        order = (("ours", ours), ("peer", peer)) if r % 2 == 0 else (("peer", peer), ("ours", ours))
        for key, fn in order:
            start = time.perf_counter()
            for _ in range(number):
                fn()
            samples[key].append((time.perf_counter() - start) / number)
    return stats_ms(samples["ours"]), stats_ms(samples["peer"])


def case_result(
    case: str,
    ours: dict[str, Any],
    peer: dict[str, Any],
    goal: float,
    note: str = "",
    higher_is_better: bool = False,
    paired: bool = True,
) -> dict[str, Any]:
    """One table row. Times (``stats_ms``): ratio = peer / ours. Rates (``stats``, e.g.
    samples/s; ``higher_is_better``): ratio = ours / peer. Either way > 1 means ours is faster.
    ``paired`` (the sides' samples come from the same rounds, in order): ``ratio`` is the median
    of the per-round ratios, ``ratio_quartiles`` their quartiles; otherwise the ratio of the
    medians, without quartiles."""
    row: dict[str, Any] = {"case": case, "ours": ours, "peer": peer}
    if paired:
        pairs = paired_ratio(ours, peer, higher_is_better)
        row["ratio"] = pairs["median"]
        row["ratio_quartiles"] = [pairs["q1"], pairs["q3"]]
        row["ratio_values"] = pairs["values"]
    elif higher_is_better:
        row["ratio"] = ours["median"] / peer["median"]
    else:
        row["ratio"] = peer["median_ms"] / ours["median_ms"]
    row.update(goal=goal, met=row["ratio"] >= goal, note=note, paired=paired)
    return row


#: columns of ``markdown_table``; a result's ``"table"`` entry overrides them (e.g. a rate
#: benchmark: ``{"unit": "samples/s", "peer": "folder", "ratio": "ours / folder", "digits": 0}``)
TABLE_DEFAULTS: dict[str, Any] = {
    "unit": "ms", "peer": "torchvision", "ratio": "tv / ours", "digits": 2
}


def markdown_table(result: dict[str, Any]) -> str:
    """The results table of one benchmark's JSON (also used by run_all.py for the docs)."""
    spec = {**TABLE_DEFAULTS, **result.get("table", {})}
    unit, digits = spec["unit"], spec["digits"]
    lines = [
        (
            f"| case | ours {unit} (median ± IQR) | {spec['peer']} {unit} (median ± IQR) "
            f"| ratio ({spec['ratio']}; quartiles) | goal | met? |"
        ),
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for c in result["cases"]:
        o, p = c["ours"], c["peer"]
        key = "median_ms" if "median_ms" in o else "median"
        iqr = "iqr_ms" if "iqr_ms" in o else "iqr"
        lines.append(
            f"| {c['case']} | {o[key]:.{digits}f} ± {o[iqr]:.{digits}f} "
            f"| {p[key]:.{digits}f} ± {p[iqr]:.{digits}f} | **{c['ratio']:.2f}x**{_quartile_text(c)} "
            f"| ≥ {c['goal']:g}x | {'yes' if c['met'] else 'no'} |"
        )
    return "\n".join(lines)


def _quartile_text(row: dict[str, Any]) -> str:
    """" (q1-q3)" of a paired row's ratio; "" for an unpaired one (ratio of the medians)."""
    if "ratio_quartiles" not in row:
        return " (medians)" if row.get("paired") is False else ""
    q1, q3 = row["ratio_quartiles"]
    return f" ({q1:.2f}-{q3:.2f})"


def machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f"{m['gpu']} (CUDA {m['cuda']}, cuDNN {m['cudnn']}); host " if "gpu" in m else ""
    line = gpu + (
        f"{m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, "
        f"torch {m['torch']}, torchvision {m['torchvision']}, Python {m['python']}"
    )
    if "loadavg_1min_start" in m:
        line += f"; 1-min load average {m['loadavg_1min_start']} -> {m['loadavg_1min_end']}"
    return line


def finish(
    name: str, args: argparse.Namespace, command: str, cases: list[dict], **extra: Any
) -> dict:
    """Assemble, print and write a benchmark's result."""
    result = {
        "benchmark": name,
        "command": command,
        "machine": machine_info(args.threads, getattr(args, "device", "cpu")),
        "settings": {
            "repeats": args.repeats,
            "warmup": args.warmup,
            "number": args.number,
            "seed": args.seed,
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "library_commit": library_version(),
        "cases": cases,
        **extra,
    }
    print(f"\n## {name}\n\nMachine: {machine_line(result)}\n")
    print(markdown_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result
