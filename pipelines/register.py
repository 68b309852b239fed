"""Finish a training run's MLflow registration later: what ``train.py --register-as`` prints when
MLflow stayed unreachable at the end of a run.

    python pipelines/register.py --run-id RUN_ID --name ssd-voc --checkpoint CHECKPOINT \\
        --mlflow-uri http://127.0.0.1:5000

Into MLflow run ``--run-id`` (default: the run recorded in the checkpoint) it logs the best
metrics and the model of ``--checkpoint`` (a checkpoint folder, or its ``s3://`` URI), registers
it as a new version of ``--name`` with the tags ``train.py`` gives a version (data hashes from
the run's tags, prior spec, lineage, mAP), applies the champion rule (``--alias`` moves to it if
its mAP beats the champion's on the same validation shards; ``ssd.registry.apply_champion_rule``)
and ends the run FINISHED. Without ``--name`` the model is logged and the run ended, nothing
registered. A version already registered from the run (an interrupted attempt) is reused, not
registered twice. An unreachable server is retried for ``--timeout`` seconds.

Errors are one line ``error: ...`` and exit code 2: an unknown run, a missing or broken
checkpoint, MLflow unreachable.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd import storage
from ssd.checkpoint import INFERENCE_FILES, load_checkpoint
from ssd.publish import DEFAULT_TIMEOUT, PublishError, publish_run
from ssd.tracking import resolve_tracking_uri

EXIT_ERROR = 2


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the run's best checkpoint: a folder or an s3:// URI")
    p.add_argument("--run-id", help="the MLflow run to log into (default: the run recorded in the checkpoint)")
    p.add_argument("--name", help="registered model name (without it: log the model only)")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else the local SQLite store)")
    p.add_argument("--alias", default="champion", help="the alias of the best version (default champion)")
    p.add_argument("--val", help="validation shards to evaluate the champion on when its recorded mAP is on "
                                 "other data (default: the checkpoint's own)")
    p.add_argument("--eval-device", default="cpu", help="where that evaluation runs (default cpu)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to keep retrying an unreachable MLflow (default {DEFAULT_TIMEOUT:.0f})")
    return p


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_ERROR)


def _local_checkpoint(location: str, tmp: str) -> Path:
    """The checkpoint as a local folder: used in place, or its inference files downloaded."""
    if not storage.is_uri(location):
        return Path(location).expanduser()
    folder = Path(tmp) / "checkpoint"
    folder.mkdir()
    for name in INFERENCE_FILES:  # the optimizer state (training.pt) is not needed
        (folder / name).write_bytes(storage.read_bytes(storage.join(location, name)))
    return folder


def main(args: argparse.Namespace) -> dict[str, Any]:
    # Our own retry loop waits for the server: MLflow's default 7 retries per call would multiply it.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    uri = resolve_tracking_uri(args.mlflow_uri)
    with tempfile.TemporaryDirectory(prefix="ssd-register-") as tmp:
        try:
            folder = _local_checkpoint(args.checkpoint, tmp)
            best = load_checkpoint(folder)
        except (OSError, ValueError, KeyError) as err:
            _fail(f"--checkpoint {args.checkpoint}: not a readable checkpoint ({err})")
        run_id = args.run_id or best.extra.get("mlflow_run_id")
        if not run_id:
            _fail(f"--checkpoint {args.checkpoint} records no MLflow run: give --run-id")
        try:
            result = publish_run(run_id, uri, folder, register_as=args.name, val_data=args.val, alias=args.alias,
                                 eval_device=args.eval_device, timeout=args.timeout,
                                 say=lambda line: print(line, flush=True))
        except PublishError as err:
            _fail(str(err))
    if args.name:
        comparison = result["champion_comparison"]
        verdict = (f"now {args.alias}" if result["champion"]
                   else f"{args.alias} stays at version {comparison['champion_version']}")
        print(f"registered {args.name} version {result['registered_version']} "
              f"(models:/{args.name}/{result['registered_version']}): {verdict} ({comparison['reason']}); "
              f"MLflow run {run_id} FINISHED", flush=True)
    else:
        print(f"logged {result['model_uri']} into MLflow run {run_id}; run FINISHED", flush=True)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
