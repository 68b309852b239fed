"""Training throughput on Ray Train CPU workers: 1 worker against 2 (scaling efficiency).

    .venv/bin/python benchmarks/bench_ray_scaling.py                 # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_ray_scaling.py --repeats 3 --epochs 4

The real job (``ssd.distributed.trainer.build_torch_trainer`` -> ``TorchTrainer`` -> DDP over gloo)
trains the tiny preset on the synthetic shards (1536 images, made on first use), batch 16 per
worker (data-parallel: 2 workers take 32 images per step). Per epoch, rank 0 reports images/s
over the training part of the epoch (all ranks' images / rank 0's epoch time, evaluation and
checkpointing excluded); the first epoch is dropped as warm-up and the median of the rest is
the run's figure. Cases:

- ``1 worker x 1 CPU``: the baseline (1 torch thread).
- ``2 workers x 1 CPU``: scaling efficiency = its images/s / (2 x the baseline's).
- ``1 worker x 2 CPUs``: the same two cores used by threads instead of processes.

Runs are interleaved case by case (``--repeats`` rounds) so that load from other processes hits
every case alike. Writes ``results/ray_scaling.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _common import RESULTS_DIR, machine_info

CASES = [("1 worker x 1 CPU", 1, 1.0), ("2 workers x 1 CPU", 2, 1.0), ("1 worker x 2 CPUs", 1, 2.0)]


def one_run(data: Path, workers: int, cpus: float, epochs: int, storage: str) -> list[float]:
    """images/s of each epoch after the first, as rank 0 reported them."""
    from ssd.config import load_config
    from ssd.data.shards import ShardSet
    from ssd.distributed.trainer import Scaling, build_torch_trainer
    from ssd.training import RunOptions

    classes = ShardSet.open(data / "train").num_classes
    cfg = load_config("tiny", [f"model.num_classes={classes}", f"train.epochs={epochs}", f"train.eval_every={epochs}"])
    options = RunOptions(train_data=str(data / "train"), val_data=str(data / "val"), log_every=10**6,
                         sample_images=0)
    trainer = build_torch_trainer(cfg, options, Scaling(workers, False, cpus), name=f"bench-{time.time_ns()}",
                                  storage_path=storage, max_failures=0, keep_checkpoints=epochs)
    result = trainer.fit()
    per_epoch = sorted((m["epoch"], m["images_per_s"]) for _, m in result.best_checkpoints)
    return [rate for epoch, rate in per_epoch if epoch > 1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the cases")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "ray_scaling.json")
    args = parser.parse_args(argv)

    import ray

    from ssd.data.convert import default_data_home, ensure_synthetic_shards
    from ssd.distributed.cluster import connect

    data = ensure_synthetic_shards(default_data_home() / "synthetic", 1536, 256)
    cpus = os.cpu_count() or 1
    connect("local", num_cpus=min(cpus, 2), quiet=True)  # a private cluster: loopback, token auth
    rates: dict[str, list[float]] = {name: [] for name, _, _ in CASES}
    with tempfile.TemporaryDirectory() as storage:
        for _ in range(args.repeats):
            for name, workers, per_worker in CASES:
                rates[name] += one_run(data, workers, per_worker, args.epochs, storage)
                print(f"{name}: {rates[name]}", flush=True)
    ray.shutdown()

    base = statistics.median(rates[CASES[0][0]])
    rows = []
    for name, workers, per_worker in CASES:
        median = statistics.median(rates[name])
        rows.append({"case": name, "workers": workers, "cpus_per_worker": per_worker, "images_per_s": median,
                     "per_worker_images_per_s": median / workers, "epochs_measured": rates[name],
                     "vs_baseline": median / base, "efficiency": median / (base * workers * per_worker)})
    result = {"name": "ray_scaling", "command": "python benchmarks/bench_ray_scaling.py " + " ".join(argv or sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": machine_info(1), "load_at_start": os.getloadavg()[0],
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = ["| case | images/s (median) | per worker | vs 1 worker x 1 CPU | efficiency per CPU |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['images_per_s']:.0f} | {r['per_worker_images_per_s']:.0f} | "
                     f"{r['vs_baseline']:.2f}x | {r['efficiency']:.0%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
