"""The demo (`make demo`): the synthetic dataset, a local Ray head and MLflow server, and a
2-worker training job submitted with `ray job submit`, as on a real cluster.

    python pipelines/demo.py                 # about 4 minutes on 2 CPU cores
    python pipelines/demo.py --epochs 4      # shorter
    make down                                # stop the Ray head and the MLflow server afterwards

Steps: write the embedded synthetic dataset in the COCO layout and convert it to shards (once,
under ``~/.cache/ssd-ray/data/synthetic``); start ``infra/local/start.sh`` (a Ray head and an
MLflow server on 127.0.0.1, left running so the MLflow UI can be browsed); submit
``python pipelines/train.py --config tiny --workers 2 --register-as ssd-synthetic`` with
``ray job submit --working-dir .``; wait; print the final mAP, the MLflow UI address and the
registered model version. No download, no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.local_state import running_mlflow, running_ray, state_dir

BIN = Path(sys.executable).parent


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
    env = {**os.environ, "PYTHON": sys.executable}
    if args.state:
        env["SSD_LOCAL_STATE"] = str(args.state)
    subprocess.run([str(ROOT / "infra" / "local" / "start.sh")], env=env, check=True)

    state = Path(env.get("SSD_LOCAL_STATE") or state_dir())
    head, server = running_ray(state), running_mlflow(state)
    if head is None or server is None:
        raise SystemExit(f"start.sh did not leave a running Ray head and MLflow server in {state}")
    dashboard, mlflow_url = head.dashboard, server.tracking_uri
    # `ray job submit` needs the head's token (start.sh turns token auth on)
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.token_file}
    env.pop("RAY_AUTH_TOKEN", None)
    summary_path = state / f"demo-summary-{os.getpid()}.json"
    command = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT), "--",
               "python", "pipelines/train.py", "--config", "tiny", "--data", str(data),
               "--workers", str(args.workers), "--epochs", str(args.epochs), "--log-every", "48",
               "--mlflow-uri", mlflow_url, "--experiment", "ssd-demo", "--register-as", args.register_as,
               "--summary-json", str(summary_path), *args.overrides]
    print("$ " + " ".join(command), flush=True)
    job = subprocess.run(command, env=env, check=False)
    if job.returncode != 0:
        raise SystemExit(f"the training job failed (exit {job.returncode}); `{BIN / 'ray'} job logs --address "
                         f"{dashboard} <job id>` shows its log; `make down` stops the services")
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndemo done in {minutes:.1f} min")
    print(f"  validation mAP (COCO AP@[.5:.95]) {summary['mAP']:.3f}, AP50 {summary['AP50']:.3f} "
          f"(epoch {summary['best_epoch']} of {summary['epochs']})")
    print(f"  MLflow UI: {mlflow_url}  (experiment ssd-demo, run {summary.get('mlflow_run_id')})")
    if summary.get("registered_version") is not None:
        print(f"  registered model: {summary['registered_name']} version {summary['registered_version']}")
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
