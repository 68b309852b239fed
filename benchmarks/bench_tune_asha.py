"""ASHA against FIFO on the same sampled trials: trial-epochs spent and the best mAP found, plus
the trials the prior-recall pre-screen skipped before training.

    .venv/bin/python benchmarks/bench_tune_asha.py                     # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_tune_asha.py --num-samples 12 --epochs 4

Both sweeps run ``pipelines/tune.py`` with the same space (``tune_spaces/default.yaml``: prior
scales, aspect ratios, extra box, neg ratio, augmentation strength, lr), the same search seed (so
the same sampled trials), the tiny preset on the synthetic shards (1536 + 256 images), one 1-CPU
worker per trial, two trials at a time, and ``--min-prior-recall``; only the scheduler differs
(ASHA: grace period 1 epoch, reduction factor 2). Writes ``results/tune_asha.json`` and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def sweep(scheduler: str, args: argparse.Namespace, storage: str) -> dict:
    out = Path(storage) / f"{scheduler}.json"
    cmd = [sys.executable, str(ROOT / "pipelines" / "tune.py"), "--space", str(ROOT / "tune_spaces" / "default.yaml"),
           "--num-samples", str(args.num_samples), "--epochs", str(args.epochs), "--scheduler", scheduler,
           "--grace-period", "1", "--reduction-factor", "2", "--min-prior-recall", str(args.min_prior_recall),
           "--seed", str(args.seed), "--address", "local", "--no-mlflow", "--storage-path", storage,
           "--summary-json", str(out)]
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--min-prior-recall", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "tune_asha.json")
    args = p.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as storage:
        for scheduler in ("asha", "fifo"):
            runs[scheduler] = sweep(scheduler, args, storage)
    rows = []
    for scheduler, s in runs.items():
        rows.append({"scheduler": scheduler, "trials": s["trials"], "skipped": s["by_status"].get("skipped", 0),
                     "invalid": s["by_status"].get("invalid", 0), "trial_epochs": s["trial_epochs"],
                     "budget": s["full_budget_epochs"], "best_mAP": s["best_mAP"], "seconds": s["seconds"],
                     "by_status": s["by_status"]})
    result = {"date": time.strftime("%Y-%m-%d"), "settings": vars(args) | {"out": str(args.out)}, "rows": rows,
              "trials": {k: v["rows"] for k, v in runs.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| scheduler | trials | skipped by pre-screen | invalid | trial-epochs trained (of budget) | best mAP | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['scheduler']} | {r['trials']} | {r['skipped']} | {r['invalid']} | {r['trial_epochs']} "
                     f"({r['budget']}) | {r['best_mAP']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
