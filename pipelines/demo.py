"""The demo (`make demo`): the synthetic dataset, a local Ray head and MLflow server, and a
2-worker training job submitted with `ray job submit`, as on a real cluster.

    python pipelines/demo.py                 # about 2.5 minutes on 2 CPU cores
    python pipelines/demo.py --epochs 4      # shorter
    make down                                # stop the Ray head and the MLflow server afterwards

Steps: write the embedded synthetic dataset in the COCO layout and convert it to shards (once,
under ``~/.cache/ssd-ray/data/synthetic``); start ``infra/local/start.sh`` (a Ray head and an
MLflow server on 127.0.0.1, token auth on, left running so the MLflow UI can be browsed); submit
``python pipelines/train.py --config tiny --workers 2 --register-as ssd-synthetic`` as a Ray job
with this checkout as its working dir (``pipelines/submit.py``: ``ray job submit --working-dir .``
with the head's token); wait; print the final mAP, the MLflow UI address, the registered model
version and the exports that reach the services from a shell. No download, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.distributed.submission import SubmitError, submit
from ssd.local_state import running_mlflow, running_ray, state_dir


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--register-as", default="ssd-synthetic")
    p.add_argument("--state", type=Path, default=None,
                   help="where start.sh keeps pid files and logs (default ~/.cache/ssd-ray/local)")
    p.add_argument("overrides", nargs="*", help="config overrides passed to train.py")
    return p


def main(args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    data = ensure_synthetic_shards(default_data_home() / "synthetic", 1536, 256,
                                   log=lambda line: print(line, flush=True))
    if args.state:
        os.environ["SSD_LOCAL_STATE"] = str(args.state)
    subprocess.run([str(ROOT / "infra" / "local" / "start.sh")], env={**os.environ, "PYTHON": sys.executable},
                   check=True)

    state = state_dir()
    head, server = running_ray(state), running_mlflow(state)
    if head is None or server is None:
        raise SystemExit(f"start.sh did not leave a running Ray head and MLflow server in {state}")
    dashboard, mlflow_url = head.dashboard, server.tracking_uri
    summary_path = state / f"demo-summary-{os.getpid()}.json"
    # train.batch_size: 16 per worker, the batch the demo's figures were measured with (it is global)
    command = ["python", "pipelines/train.py", "--config", "tiny", "--data", str(data),
               "--workers", str(args.workers), "--epochs", str(args.epochs), "--log-every", "48",
               "--mlflow-uri", mlflow_url, "--experiment", "ssd-demo", "--register-as", args.register_as,
               "--summary-json", str(summary_path), f"train.batch_size={16 * args.workers}", *args.overrides]
    # what `ray job submit --working-dir . -- ...` does, with the head's token and a quiet console
    print("$ python pipelines/submit.py -- " + shlex.join(command), flush=True)
    try:
        status = submit(command, working_dir=ROOT, address=dashboard)
    except SubmitError as err:
        raise SystemExit(f"error: {err}; `make down` stops the services") from None
    if status != 0:
        raise SystemExit(f"the training job failed (exit {status}); `make down` stops the services")
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo done in {minutes:.1f} min")
    print(f"  validation mAP (COCO AP@[.5:.95]) {summary['mAP']:.3f}, AP50 {summary['AP50']:.3f} "
          f"(epoch {summary['best_epoch']} of {summary['epochs']})")
    print(f"  MLflow UI: {mlflow_url}  (experiment ssd-demo, run {summary.get('mlflow_run_id')})")
    if summary.get("registered_version") is not None:
        comparison = summary.get("champion_comparison") or {}
        champion = (f"now {args.register_as}@champion" if summary.get("champion") else
                    f"{args.register_as}@champion stays at version {comparison.get('champion_version')}")
        print(f"  registered model: {summary['registered_name']} version {summary['registered_version']} ({champion})")
    print(f"  Ray dashboard: {dashboard}; stop both with `make down`")
    print("\nto use them from this shell (`ray job submit`, `ray status`, pipelines/*.py, the MLflow client):")
    print(f"  export RAY_ADDRESS={dashboard} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={head.token_file}")
    print(f"  export MLFLOW_TRACKING_URI={mlflow_url}")
    if summary.get("registered_version") is not None:
        print(f"  python pipelines/predict.py --model models:/{summary['registered_name']}@champion --out predictions "
              "IMAGE.jpg")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
