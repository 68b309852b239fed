"""Ray Tune sweep: each trial is one Ray Train run of pipelines/train.py's training function.

    ray job submit --working-dir . -- python pipelines/tune.py --space tune_spaces/priors.yaml \\
        --data DIR --num-samples 8 --epochs 6
    python pipelines/tune.py --space tune_spaces/default.yaml --data DIR --num-samples 16 --min-prior-recall 0.8
    python pipelines/tune.py --resume NAME        # continue an interrupted sweep (same --storage-path)
    python pipelines/tune.py --smoke-test         # 3 tiny trials of 2 epochs on synthetic data

The space (``tune_spaces/*.yaml``, grammar in ``ssd/search_space.py``) is checked against the
config before anything starts: an unknown key or an invalid range is an error naming the key.
Trials run concurrently as far as the cluster's CPUs (GPUs) allow (``--workers-per-trial`` x
``--cpus-per-worker`` each); ASHA (``--scheduler asha``, the default) stops trials whose
validation mAP trails after ``--grace-period`` epochs, keeping 1/``--reduction-factor`` per rung.
``--min-prior-recall R`` skips, before training, every sampled prior spec that gives fewer than
R of the training boxes a prior at IoU >= 0.5 (``pipelines/analyze_priors.py``).

MLflow: one parent run for the sweep (its settings as params; the results table
``results.csv``, ``sweep.png`` (mAP against each searched key) and ``best_config.yaml`` as
artifacts) and one child run per trial (sampled values as params, metrics per epoch).
``best_config.yaml`` is the best trial's whole config: ``pipelines/train.py --config
best_config.yaml`` trains it as is.

Storage: ``--storage-path`` is a folder every node mounts, or ``s3://BUCKET/PREFIX``. The sweep's
folder there holds Tune's state, each trial's Train run, ``sweep_setup.json`` (the request,
including the loaded search space, so that ``--resume`` needs nothing else), ``best_config.yaml``
and ``results.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd.distributed.sweep_job import run_sweep
from ssd.jobs.common import request_from_args, run_from_cli
from ssd.jobs.sweep import SweepRequest, no_result_reason


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="search space YAML (tune_spaces/...)")
    p.add_argument("--config", default="tiny", help="base config: preset name or YAML path (default tiny)")
    p.add_argument("--data", help="folder with train/ and val/ shard sets (default: the synthetic dataset)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (per grid point)")
    p.add_argument("--epochs", type=int, help="epochs per trial (train.epochs); evaluation every epoch")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this many per rung")
    p.add_argument("--min-prior-recall", type=float, default=0.0,
                   help="skip specs whose prior recall at IoU 0.5 on the training boxes is below this")
    p.add_argument("--prescreen-images", type=int, default=500, help="training images used by the pre-screen")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--loader-workers", type=int, default=None,
                   help="DataLoader processes per training worker (default: --cpus-per-worker minus 1 on GPU "
                        "workers, 0 on CPU workers)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="as pipelines/train.py")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    p.add_argument("--address", default=None, help="Ray address (as pipelines/train.py)")
    p.add_argument("--name", help="sweep name (default: sweep-<space>-<time>)")
    p.add_argument("--storage-path", default=None, help="as pipelines/train.py (default ~/.cache/ssd-ray/runs)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else local SQLite)")
    p.add_argument("--experiment", default="ssd-ray-tune")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--summary-json", type=Path, help="also write the sweep summary as JSON here")
    p.add_argument("--smoke-test", action="store_true", help="3 trials of 2 epochs on a small synthetic set")
    p.add_argument("overrides", nargs="*", help="overrides of the base config, e.g. train.batch_size=8")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_from_cli(run_sweep, request_from_args(SweepRequest, args), args.summary_json)
    if summary["best_trial"] is None:  # nothing trained to a score: the sweep failed, whatever Tune says
        raise SystemExit(f"error: sweep {summary['name']}: {no_result_reason(summary['rows'])}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
