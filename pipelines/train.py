"""Train SSD with Ray Train (DDP, one process per worker, GPU or CPU) and track it in MLflow.

    ray job submit --working-dir . -- python pipelines/train.py --config tiny --data DIR --workers 2
    python pipelines/train.py --config ssd300_voc0712 --data shards/voc --workers 8 --gpu
    python pipelines/train.py --resume NAME            # continue a stopped run where it stopped
    python pipelines/train.py --smoke-test             # 2 tiny epochs on 2 CPU workers
    python pipelines/train.py --init-from models:/ssd-coco@champion --data shards/voc --freeze-backbone-epochs 2

``--data DIR`` is a folder with ``train/`` and ``val/`` shard sets (``pipelines/make_shards.py``);
``--train``/``--val`` name the two sets separately (folders, dataset.json, ``s3://`` or http).
Without either, the embedded synthetic dataset is made on first use under
``~/.cache/ssd-ray/data`` (``$SSD_DATA_HOME``). Trailing ``key=value`` arguments override the
config (``ssd/configs/<preset>.yaml`` or a YAML path), e.g. ``train.epochs=20 optim.lr=0.01``.

Ray (``ssd.distributed.cluster``): ``--address`` or ``$RAY_ADDRESS`` (``ray job submit`` sets it
for the job; ``http://127.0.0.1:8265`` is the head ``make up`` started), else the head ``make up``
started if it runs, else a private local cluster for this process (loopback only, token auth);
``--address local`` always starts a private one; never "the latest cluster" Ray records in
/tmp/ray. ``--workers`` more than the machine (or running cluster) holds fails before Ray starts.
Checkpoints go
to ``--storage-path/NAME`` (a local path, an NFS mount shared by all nodes, or ``s3://``): one
every epoch, the best ``--keep-checkpoints`` by validation mAP kept plus the latest. A worker
failure restarts the group from the last checkpoint (``--max-failures``); ``--resume NAME``
continues a stopped run (its config, data and MLflow run read from its latest checkpoint, also on
``s3://``), ``--resume CHECKPOINT`` (a folder or URI) starts a new run from a checkpoint.

Finetuning: ``--init-from`` a checkpoint folder or an MLflow model (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``) starts from its weights: backbone, extras and box head as they are, the
class head class by class (VOC's ``aeroplane`` from COCO's ``airplane``, ...; ``ssd.transfer``),
classes without a counterpart fresh. The model and priors sections of the config are the source
model's (with this data's classes), the others ``--config``'s, or the source's without it;
overrides apply last. The architecture and the boxes per location must match, checked before any
worker starts. ``--freeze-backbone-epochs N`` trains only the extras and heads for the first N epochs.

MLflow (rank 0 and this driver only): ``--mlflow-uri`` > ``$MLFLOW_TRACKING_URI`` > the server
``make up`` runs > a SQLite store under ``~/.cache/ssd-ray/mlflow``. Params, metrics, evaluation
artifacts, the final model (pyfunc + torch) and, with ``--register-as NAME``, a registry version
with lineage tags; the first version of NAME becomes ``@champion``, a later one only if its mAP
is higher on the same validation shards. If MLflow is unreachable the run warns and trains on; at
the end an unreachable server is retried for ``--register-timeout`` seconds, after which a
``--register-as`` job exits non-zero and prints the ``pipelines/register.py`` command that
finishes it.

Bad requests fail in seconds, before any worker starts: unknown config keys, config values of the
wrong type or out of range, missing data, more workers than the cluster has CPUs (or GPUs). A
worker error that a restart cannot fix (``ssd.training.PermanentError``: config and data errors
before the first step) ends the run at once instead of after ``--max-failures`` restarts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd.distributed.train_job import run_train_job
from ssd.jobs.common import request_from_args, run_from_cli
from ssd.jobs.train import TrainRequest


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="preset name or YAML path (default: tiny; with --init-from, the model and priors "
                        "sections are the source model's and this gives the rest, default the source's)")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="folder with train/ and val/ shard sets (default: the synthetic dataset)")
    data.add_argument("--train", help="training shard set (overrides --data)")
    data.add_argument("--val", help="validation shard set (overrides --data)")
    data.add_argument("--loader-workers", type=int, default=None,
                      help="DataLoader processes per worker (default: --cpus-per-worker minus 1 on GPU workers, "
                           "0 on CPU workers, which load in the training process)")
    scale = p.add_argument_group("Ray")
    scale.add_argument("--workers", type=int, default=2, help="training workers = DDP processes (default 2)")
    gpu = scale.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None, help="one GPU per worker")
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false", help="CPU workers even if GPUs exist")
    scale.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (= torch threads)")
    scale.add_argument("--address", default=None, help="Ray address: HOST:PORT, or the http:// address of the "
                       "`make up` head (default: RAY_ADDRESS, else the `make up` head, else a private local "
                       "cluster; 'local' always starts a private one)")
    scale.add_argument("--name", help="run name under the storage path (default: ssd-<config>-<time>)")
    scale.add_argument("--storage-path", default=None,
                       help="where runs and checkpoints go: path, NFS or s3:// (default $SSD_STORAGE_PATH or "
                            "~/.cache/ssd-ray/runs)")
    scale.add_argument("--resume", help="a run NAME under the storage path to continue, or a checkpoint folder")
    scale.add_argument("--max-failures", type=int, default=2, help="worker-group restarts from the last checkpoint")
    scale.add_argument("--keep-checkpoints", type=int, default=3, help="best checkpoints kept (plus the latest)")
    scale.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"],
                       help="autocast (auto: bf16 on GPUs that have it, fp32 on the CPU)")
    track = p.add_argument_group("MLflow")
    track.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else a local SQLite store)")
    track.add_argument("--experiment", default="ssd-ray", help="MLflow experiment (default ssd-ray)")
    track.add_argument("--no-mlflow", action="store_true", help="do not track")
    track.add_argument("--register-as", metavar="NAME",
                       help="register the best model as a version of NAME; alias --alias moves to it if it beats "
                            "the current one on the same validation shards (a first version takes it)")
    track.add_argument("--alias", default="champion", help="the alias of NAME's best version (default champion)")
    track.add_argument("--eval-device", default="cpu",
                       help="where the current champion is evaluated when its recorded mAP is on other "
                            "validation data (default cpu)")
    track.add_argument("--register-timeout", type=float, default=300.0, metavar="SECONDS",
                       help="at the end, keep retrying an unreachable MLflow this long to log the model, register "
                            "it and end the run (default 300); then exit non-zero with the command that does it "
                            "later (pipelines/register.py)")
    track.add_argument("--parent-model", metavar="NAME/VERSION",
                       help="lineage tag: the model this run started from (default: the --init-from model)")
    track.add_argument("--parent-run-id", help="nest this run's MLflow run under that run (pipelines use it)")
    init = p.add_argument_group("finetuning")
    init.add_argument("--init-from", metavar="MODEL",
                      help="start from this model's weights: a checkpoint folder, models:/NAME@ALIAS or models:/NAME/VERSION")
    init.add_argument("--freeze-backbone-epochs", type=int, metavar="N",
                      help="shorthand for train.freeze_backbone_epochs=N: the backbone is frozen for N epochs")
    p.add_argument("--epochs", type=int, help="shorthand for train.epochs=N")
    p.add_argument("--log-every", type=int, default=20, help="steps between progress lines (default 20)")
    p.add_argument("--summary-json", type=Path, help="also write the run summary as JSON here")
    p.add_argument("--inject-failure", metavar="EPOCH:STEP[:RANK] or setup",
                   help="(testing) that worker dies at that step of a fresh run; the run must recover")
    p.add_argument("--smoke-test", action="store_true", help="2 short epochs on a small synthetic set")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=0.02")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    summary = run_from_cli(run_train_job, request_from_args(TrainRequest, args), args.summary_json)
    if summary.get("error"):  # e.g. the model could not be registered: the job failed
        raise SystemExit(f"error: {summary['error']}")
    return summary


if __name__ == "__main__":
    main(get_args_parser().parse_args())
