"""Train SSD with Ray Train (DDP, one process per worker, GPU or CPU) and track it in MLflow.

    ray job submit --working-dir . -- python pipelines/train.py --config tiny --data DIR --workers 2
    python pipelines/train.py --config ssd300_vgg16 --data shards/voc --workers 8 --gpu optim.lr=2e-3
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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd import storage
from ssd.config import Config, ConfigError, load_config
from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.data.shards import DATASET_JSON, ShardSet, join_spec
from ssd.tracking import Tracker, resolve_tracking_uri

if TYPE_CHECKING:
    from ssd.distributed.cluster import ClusterPlan

EXIT_BAD_REQUEST = 2


class BadRequest(Exception):
    """A problem with the command line, the config or the data, found before training."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="preset name or YAML path (default: tiny; with --init-from, the model and priors "
                        "sections are the source model's and this gives the rest, default the source's)")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="folder with train/ and val/ shard sets (default: the synthetic dataset)")
    data.add_argument("--train", help="training shard set (overrides --data)")
    data.add_argument("--val", help="validation shard set (overrides --data)")
    data.add_argument("--loader-workers", type=int, default=0,
                      help="DataLoader processes per worker (default 0: load in the worker; best with few CPUs)")
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


def default_storage_path() -> str:
    return os.environ.get("SSD_STORAGE_PATH") or str(Path.home() / ".cache" / "ssd-ray" / "runs")


def _open(spec: str, what: str) -> ShardSet:
    try:
        return ShardSet.open(spec)
    except (OSError, ValueError) as err:  # missing, malformed, or storage refusing access
        raise BadRequest(f"{what} shards {spec!r}: {err}") from None


def _local(spec: str) -> str:
    """Local paths made absolute: Ray workers run in another working directory."""
    return spec if "://" in spec or spec.startswith("pipe:") else str(Path(spec).expanduser().resolve())


def resolve_request(args: argparse.Namespace) -> dict[str, Any]:
    """Config, data and run identity from the command line; raises BadRequest before any Ray."""
    storage_path = _local(args.storage_path or default_storage_path())  # Ray wants it absolute
    resumed: dict[str, Any] = {}
    resume_from = None
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    if args.freeze_backbone_epochs is not None:
        overrides.append(f"train.freeze_backbone_epochs={args.freeze_backbone_epochs}")
    if args.smoke_test:
        overrides = ["train.epochs=2", "train.batch_size=8", *overrides]
    name = args.name
    if args.resume:
        from ssd.distributed.trainer import (  # Ray: only when needed
            checkpoint_summary,
            latest_checkpoint,
        )

        if storage.is_file(storage.join(_local(args.resume), "meta.json")):
            # a checkpoint folder (path or URI): a new run starting from it
            resume_from = checkpoint_dir = _local(args.resume)
        else:  # a run name: Ray continues the run in storage/NAME from its latest checkpoint
            if args.name and args.name != args.resume:
                raise BadRequest("--resume NAME continues run NAME; do not also give a different --name")
            name = args.resume
            try:
                checkpoint_dir = latest_checkpoint(storage.join(storage_path, name))
            except OSError as err:  # e.g. object storage refusing the listing
                raise BadRequest(f"--resume {args.resume}: cannot list {storage.join(storage_path, name)}: "
                                 f"{err}") from None
            if checkpoint_dir is None:
                raise BadRequest(f"--resume {args.resume}: no checkpoint under {storage.join(storage_path, name)}")
        try:
            summary = checkpoint_summary(checkpoint_dir)
        except (OSError, ValueError, KeyError) as err:
            raise BadRequest(f"--resume {args.resume}: cannot read the checkpoint at {checkpoint_dir}: {err}") from None
        resumed = {"config": summary["config"], "epoch": summary["epoch"], **summary.get("extra", {})}

    train_spec, val_spec = args.train, args.val
    if args.data:
        train_spec = train_spec or join_spec(args.data, "train")  # a folder or an s3:// / http prefix
        val_spec = val_spec or join_spec(args.data, "val")
    train_spec, val_spec = train_spec or resumed.get("train_data"), val_spec or resumed.get("val_data")
    if not train_spec or not val_spec:
        if (args.train or args.val) and not args.data:
            raise BadRequest("give both --train and --val, or --data DIR with DIR/train and DIR/val")
        counts = (64, 32) if args.smoke_test else (1536, 256)
        home = default_data_home() / ("synthetic-smoke" if args.smoke_test else "synthetic")
        ensure_synthetic_shards(home, *counts, log=lambda line: print(line, flush=True))
        train_spec, val_spec = train_spec or str(home / "train"), val_spec or str(home / "val")
    train_spec, val_spec = _local(train_spec), _local(val_spec)
    train_set, val_set = _open(train_spec, "training"), _open(val_spec, "validation")
    if list(train_set.classes) != list(val_set.classes):
        raise BadRequest(f"training and validation shards have different classes: {list(train_set.classes)} "
                         f"vs {list(val_set.classes)}")

    source = None
    if args.init_from and "config" not in resumed:  # a resumed run has its weights already
        source = _load_init_source(args)
    try:
        from ssd.config import apply_overrides, config_from_dict

        if "config" in resumed:
            cfg = config_from_dict(apply_overrides(resumed["config"].to_dict(), overrides))
        elif source is not None:  # the source's model and priors; the rest from --config or the source
            from ssd.transfer import finetune_config

            base = load_config(args.config) if args.config else None
            cfg = finetune_config(source["checkpoint"].config, base, overrides, train_set.num_classes)
        else:
            cfg = load_config(args.config or "tiny", [f"model.num_classes={train_set.num_classes}", *overrides])
    except ConfigError as err:
        raise BadRequest(f"config: {err}") from None
    if cfg.model.num_classes != train_set.num_classes:
        raise BadRequest(f"model.num_classes={cfg.model.num_classes}, but the shards have "
                         f"{len(train_set.classes)} classes + background")
    if args.workers < 1:
        raise BadRequest(f"--workers must be at least 1, got {args.workers}")
    if args.register_as and args.no_mlflow:
        raise BadRequest("--register-as needs MLflow: drop --no-mlflow")
    init_state = None
    if source is not None:
        from ssd.transfer import IncompatibleModels, initial_state

        checkpoint = source["checkpoint"]
        try:
            init_state, report, warnings = initial_state(cfg, list(train_set.classes), checkpoint.model,
                                                         checkpoint.config, checkpoint.classes)
        except IncompatibleModels as err:
            raise BadRequest(f"--init-from {args.init_from}: {err}") from None
        print(f"initialising from {source['model'].label}: {report.summary()}", flush=True)
        for warning in warnings:
            print(f"warning: --init-from {args.init_from}: {warning}", file=sys.stderr, flush=True)
        source["report"] = report
    if name is None:
        config_name = args.config or ("finetune" if source is not None else "tiny")
        stem = Path(config_name).stem if not config_name.isidentifier() else config_name
        name = f"ssd-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"cfg": cfg, "train_set": train_set, "val_set": val_set, "train_spec": train_spec,
            "val_spec": val_spec, "name": name, "storage": storage_path, "resume_from": resume_from,
            "resumed": resumed, "init_state": init_state, "source": source}


def _load_init_source(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--init-from`` model, downloaded if it is an MLflow model, and its checkpoint."""
    from ssd.checkpoint import load_checkpoint
    from ssd.registry import ModelReferenceError, is_model_uri, resolve_model

    try:
        model = resolve_model(args.init_from, resolve_tracking_uri(args.mlflow_uri) if is_model_uri(args.init_from)
                              else None)
        checkpoint = load_checkpoint(model.checkpoint)
    except (ModelReferenceError, FileNotFoundError, ValueError) as err:
        raise BadRequest(f"--init-from: {err}") from None
    return {"model": model, "checkpoint": checkpoint}


def lineage_tags(args: argparse.Namespace, request: dict[str, Any]) -> dict[str, str]:
    """Tags naming the model a run started from (run and model-version tags alike)."""
    source = request.get("source")
    if source is None:
        return {"parent_model": args.parent_model or "none"}
    model = source["model"]
    tags = {"parent_model": args.parent_model or model.label, "init_from": model.reference}
    if model.name:
        tags |= {"parent_model_name": model.name, "parent_model_version": model.version,
                 "parent_run_id": model.tags.get("run_id", ""),
                 "parent_data_hash": model.tags.get("data_hash", "")}
    if "report" in source:
        tags["init_classes_transferred"] = json.dumps(source["report"].mapped, sort_keys=True)
        tags["init_classes_fresh"] = json.dumps(source["report"].fresh)
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def _ui_address(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"


def start_tracking(args: argparse.Namespace, request: dict[str, Any], scaling: Any) -> Tracker | None:
    """The run's MLflow run (created here, or the resumed run's), with params, tags and inputs."""
    if args.no_mlflow:
        return None
    uri = resolve_tracking_uri(args.mlflow_uri)
    cfg: Config = request["cfg"]
    train_set, val_set = request["train_set"], request["val_set"]
    previous = request["resumed"].get("mlflow_run_id")
    if previous and args.resume == request["name"]:
        tracker = Tracker.attach(uri, previous)
        tracker.set_tags({"resumed_at_epoch": request["resumed"].get("epoch")})
        return tracker
    tags = {
        "data_hash": train_set.info.get("content_hash", ""),
        "val_data_hash": val_set.info.get("content_hash", ""),
        "classes": json.dumps(list(train_set.classes)),
        "prior_spec": cfg.priors.name,
        "ray_run_name": request["name"],
        "storage_path": request["storage"],
        **lineage_tags(args, request),
    }
    if request["resume_from"]:
        tags["resumed_from_checkpoint"] = request["resume_from"]
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    tracker = Tracker(uri, args.experiment, request["name"], tags=tags, parent_run_id=args.parent_run_id)
    tracker.log_params(cfg.flat() | {
        "data.train": request["train_spec"], "data.val": request["val_spec"],
        "data.train_samples": train_set.num_samples, "data.val_samples": val_set.num_samples,
        "ray.workers": scaling.num_workers, "ray.use_gpu": scaling.use_gpu,
        "ray.cpus_per_worker": scaling.cpus_per_worker, "amp": args.amp,
    })
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(cfg.to_yaml())
        tracker.log_artifact(config_path)
        for split, shards in (("train", train_set), ("val", val_set)):
            info = Path(tmp) / split / DATASET_JSON
            info.parent.mkdir()
            info.write_text(json.dumps(shards.info, indent=2, sort_keys=True))
            tracker.log_artifact(info, f"data/{split}")
    return tracker


def init_ray(address: str | None) -> ClusterPlan:
    """Connect to the cluster ``ssd.distributed.cluster`` picks; one line on failure."""
    from ssd.distributed.cluster import ClusterAddressError, connect

    try:
        return connect(address)
    except (ClusterAddressError, ConnectionError) as err:
        raise SystemExit(f"error: {err}") from None


def check_workers_fit(args: argparse.Namespace, target: ClusterPlan) -> None:
    """Before a private cluster starts, check ``--workers`` against this machine (seconds, not
    the minute a cluster start costs); a running cluster is checked once connected."""
    from ssd.distributed.cluster import machine_resources

    if target.starts_cluster:
        _check_scaling(args, machine_resources(), "this machine")


def _check_scaling(args: argparse.Namespace, resources: dict[str, float], where: str) -> bool:
    """The GPU choice for ``resources``, or SystemExit naming the shortfall."""
    from ssd.distributed.cluster import ClusterTooSmall, Scaling, check_cluster_resources

    use_gpu = args.use_gpu if args.use_gpu is not None else resources.get("GPU", 0) >= args.workers
    try:
        check_cluster_resources(Scaling(args.workers, use_gpu, args.cpus_per_worker), resources, where=where)
    except ClusterTooSmall as err:
        raise SystemExit(f"error: {err}") from None
    return use_gpu


def main(args: argparse.Namespace) -> dict[str, Any]:
    from ssd.distributed.cluster import ClusterAddressError, Scaling
    from ssd.distributed.cluster import plan as plan_cluster

    try:
        target = plan_cluster(args.address)
    except ClusterAddressError as err:
        raise SystemExit(f"error: {err}") from None
    check_workers_fit(args, target)
    try:
        request = resolve_request(args)
    except BadRequest as err:
        raise SystemExit(f"error: {err}") from None

    # Ray, Ray Train and the training code load only now: a bad request fails in a few seconds
    from ssd.distributed.trainer import build_trainer, checkpoint_location
    from ssd.training import SCORE, RunOptions

    init_ray(args.address)
    import ray

    use_gpu = _check_scaling(args, ray.cluster_resources(), "the Ray cluster")
    scaling = Scaling(num_workers=args.workers, use_gpu=use_gpu, cpus_per_worker=args.cpus_per_worker)

    tracker = start_tracking(args, request, scaling)
    run_id = tracker.run_id if tracker is not None and tracker.active else None
    uri = tracker.uri if tracker is not None else None
    options = RunOptions(train_data=request["train_spec"], val_data=request["val_spec"],
                         loader_workers=args.loader_workers, log_every=args.log_every, amp=args.amp,
                         tracking_uri=uri, mlflow_run_id=run_id, inject_failure=args.inject_failure)
    run_dir = storage.join(request["storage"], request["name"])
    print(f"run {request['name']}: {scaling.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s); checkpoints "
          f"in {run_dir}" + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off"), flush=True)

    trainer = build_trainer(request["cfg"], options, scaling, name=request["name"], storage_path=request["storage"],
                            max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints,
                            resume_from=request["resume_from"], init_state=request["init_state"])
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - whatever failed, the MLflow run must not stay RUNNING
        if tracker is not None:  # ended even if MLflow was away during training, once it answers
            tracker.end("FAILED", retry_for=min(args.register_timeout, 30))
        from ssd.distributed.failures import summarize

        raise SystemExit(f"error: training failed: {summarize(err)}") from None
    best = result.get_best_checkpoint(metric=SCORE, mode="max") or result.checkpoint
    with best.as_directory() as folder:
        summary = finish_run(args, request, tracker, Path(folder), checkpoint_location(best))
    summary.update(run_name=request["name"], run_dir=run_dir, seconds=round(time.perf_counter() - start, 1),
                   last_checkpoint=checkpoint_location(result.checkpoint) if result.checkpoint else None)
    print_summary(summary)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
    if summary.get("error"):  # e.g. the model could not be registered: the job failed
        raise SystemExit(f"error: {summary['error']}")
    return summary


def finish_run(args: argparse.Namespace, request: dict[str, Any], tracker: Tracker | None, checkpoint: Path,
               checkpoint_path: str) -> dict[str, Any]:
    """Finish the MLflow run with the best checkpoint (``ssd.publish.publish_run``: best metrics,
    the model, with ``--register-as`` a version and the champion rule, the run ended FINISHED),
    retrying an unreachable server for ``--register-timeout`` seconds; the summary.

    Training never waited for MLflow; this step does, because a ``--register-as`` job exists to
    register. If it still fails, the run is ended FAILED if the server answers, and the summary
    holds ``registration_error`` and ``register_command`` (``pipelines/register.py``, which
    finishes the job later); with ``--register-as`` also ``error``: the job must exit non-zero.
    """
    from ssd.checkpoint import load_checkpoint
    from ssd.publish import PublishError, publish_run, register_command

    best = load_checkpoint(checkpoint)
    summary: dict[str, Any] = {
        "best_checkpoint": checkpoint_path, "best_epoch": best.epoch,
        "mAP": best.metrics.get("mAP"), "AP50": best.metrics.get("AP50"),
        "VOC07_mAP": best.metrics.get("VOC07_mAP"), "epochs": request["cfg"].train.epochs,
        "mlflow_run_id": None, "registered_name": None, "registered_version": None, "alias": args.alias,
        "champion": None, "champion_comparison": None, "registration_error": None, "register_command": None,
        "error": None,
    }
    if tracker is None or tracker.run_id is None:  # --no-mlflow, or MLflow unreachable when the run started
        if args.register_as:
            why = ("--no-mlflow" if tracker is None
                   else f"MLflow was unreachable when the run started ({tracker.failure})")
            summary["registration_error"] = f"nothing was logged or registered: {why}"
            summary["error"] = (f"the model was not registered as {args.register_as}: {why}; the best checkpoint is "
                                f"{checkpoint_path}")
        return summary
    summary.update(mlflow_run_id=tracker.run_id, mlflow_uri=tracker.uri, mlflow_ui=_ui_address(tracker.uri))
    lineage: dict[str, str] | None = lineage_tags(args, request)
    if request.get("source") is None and request["resumed"] and not args.parent_model:
        lineage = None  # a resumed finetune: its lineage was tagged on the run when it started; read there
    try:
        published = publish_run(
            tracker.run_id, tracker.uri, checkpoint, register_as=args.register_as,
            data_hash=request["train_set"].info.get("content_hash", ""),
            val_data_hash=request["val_set"].info.get("content_hash", ""), lineage=lineage,
            val_data=request["val_spec"], alias=args.alias, eval_device=args.eval_device,
            timeout=args.register_timeout, say=lambda line: print(line, flush=True))
        summary.update(published)
    except PublishError as err:
        summary.update({k: v for k, v in err.done.items() if v is not None})
        command = register_command(tracker.run_id, checkpoint_path, name=args.register_as, tracking_uri=tracker.uri,
                                   alias=args.alias)
        summary.update(registration_error=str(err), register_command=command)
        # The job fails (with --register-as): so does its run, if the server answers now. register.py
        # ends it FINISHED when it completes the job.
        status = "FAILED" if args.register_as else "FINISHED"
        tracker.end(status, retry_for=0)
        if args.register_as:
            summary["error"] = (f"the model was not registered as {args.register_as}: {err}; "
                                f"finish it later with: {command}")
        else:
            print(f"warning: the model was not logged to MLflow: {err}; log it later with: {command}",
                  file=sys.stderr, flush=True)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    def number(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"finished {summary['run_name']} in {summary['seconds']:.0f} s",
             f"  best validation mAP (COCO AP) {number('mAP')}, AP50 {number('AP50')}"
             + (f", VOC07 mAP {number('VOC07_mAP')}" if summary.get("VOC07_mAP") is not None else "")
             + f" at epoch {summary['best_epoch']}/{summary['epochs']}",
             f"  best checkpoint: {summary['best_checkpoint']}"]
    if summary.get("mlflow_run_id"):
        lines.append(f"  MLflow run {summary['mlflow_run_id']}: {summary['mlflow_ui']}")
    if summary.get("registered_name"):
        lines.append(f"  registered model: {summary['registered_name']} version {summary['registered_version']} "
                     f"(models:/{summary['registered_name']}/{summary['registered_version']})")
    comparison = summary.get("champion_comparison")
    if comparison:
        alias = summary.get("alias") or "champion"
        if comparison["promoted"]:
            lines.append(f"  alias {alias}: moved to version {comparison['version']} ({comparison['reason']})")
        else:
            lines.append(f"  alias {alias}: stays at version {comparison['champion_version']} ({comparison['reason']})")
    if summary.get("registration_error"):
        lines.append(f"  MLflow: FAILED: {summary['registration_error']}")
        if summary.get("register_command"):
            lines.append(f"  finish it later with: {summary['register_command']}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
