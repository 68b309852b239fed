"""Ray Train glue (Train V2): the per-worker function, the ``TorchTrainer`` builder, and the
checks that make a bad request fail before any worker starts.

The training itself is ``ssd.training.run_training``; this module only supplies what Ray knows:
the rank's device (``ray.train.torch.get_device``), the checkpoint to resume from
(``ray.train.get_checkpoint``: after a worker failure, the last reported one) and where
checkpoints go (``ray.train.report``, which persists them under ``storage_path/name`` and keeps
the best ``num_to_keep`` by validation mAP, plus always the latest), written and uploaded in
Ray's background upload thread from host copies, so a checkpoint does not stall training.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import (
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    LoggingConfig,
    RunConfig,
)

from ssd import storage
from ssd.checkpoint import load_checkpoint
from ssd.config import Config
from ssd.distributed.cluster import ClusterTooSmall, Scaling, check_cluster_resources  # noqa: F401 - re-exported
from ssd.distributed.console import quiet_train_console
from ssd.distributed.failures import SSDTorchTrainer
from ssd.distributed.ray_internals import placement_group, train_report_logger
from ssd.jobs.common import CHECKPOINT_PREFIX, checkpoint_summary, latest_checkpoint  # noqa: F401 - re-exported
from ssd.models import BackboneWeights
from ssd.tracking import Tracker
from ssd.training import SCORE, RunOptions, errors_are_permanent, run_training


def _quiet_report_logs() -> None:
    """Ray Train V2 logs every report (all metrics, every rank) at INFO from a logger named after
    its module file, outside the ``ray.train`` hierarchy that ``LoggingConfig`` sets."""
    logger = train_report_logger()
    if logger is not None:  # a Ray version with another layout: only noisier
        logger.setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: rebuild config and options, resume if Ray has a
    checkpoint, train, and report each epoch (rank 0 attaches the checkpoint)."""
    context = ray.train.get_context()
    rank = context.get_world_rank()
    _quiet_report_logs()
    quiet_train_console()
    torch.set_num_threads(max(1, int(loop_config["threads"])))
    cfg: Config = loop_config["config"]
    options: RunOptions = loop_config["options"]
    device = ray.train.torch.get_device()

    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder, errors_are_permanent(f"checkpoint {checkpoint.path}"):
            resume = load_checkpoint(folder)
        if rank == 0:
            into = f", {resume.epoch_step} batches into epoch {resume.epoch + 1}" if resume.epoch_step else ""
            print(f"resuming from {checkpoint.path} (epoch {resume.epoch} done{into})", flush=True)

    tracker = None
    if rank == 0 and options.mlflow_run_id:
        tracker = Tracker.attach(options.tracking_uri, options.mlflow_run_id)

    def report(metrics: dict[str, Any], save) -> None:
        name = checkpoint_name(metrics)
        metrics = {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}
        if save is None:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
            return
        ray.train.report(metrics, checkpoint_dir_name=name, **background_upload(save, name))

    if rank == 0 and loop_config.get("placement_group_file"):
        _write_placement_group(loop_config["placement_group_file"])
    init_state = None
    if resume is None and loop_config.get("init_state") is not None:
        init_state = ray.get(loop_config["init_state"])  # the driver's transferred weights
    backbone = None
    if resume is None and loop_config.get("backbone") is not None:
        backbone = ray.get(loop_config["backbone"])  # the driver's pretrained backbone, once per worker
    run_training(cfg, options, device=device, report=report, resume=resume, tracker=tracker, init_state=init_state,
                 backbone=backbone)


def checkpoint_name(metrics: dict[str, Any]) -> str:
    """``checkpoint-epoch-0003`` after epoch 3; ``checkpoint-epoch-0003-iter-0001234`` for one
    taken mid-epoch (epoch 3 done, optimizer step 1234), which sorts after it."""
    name = f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):04d}"
    if metrics.get("epoch_step"):
        name += f"-iter-{int(metrics['step']):07d}"
    return name


def background_upload(save, name: str) -> dict[str, Any]:
    """``ray.train.report`` arguments that write and upload a checkpoint in Ray's upload thread:
    ``save`` (host copies, taken at the report) writes it into a local staging folder, then it
    is copied to the run's storage and the staging folder removed. Training goes on meanwhile;
    Ray still registers checkpoints in report order and flushes the last before the run ends.

    Ray hands ``checkpoint_upload_fn`` the (empty) staging checkpoint; the copy to storage is
    the one Ray's own upload does (``StorageContext.persist_current_checkpoint``, Ray 2.60)."""
    storage_context = ray.train.get_context().get_storage()
    staging = Path(tempfile.mkdtemp(prefix="ssd-checkpoint-"))
    (staging / name).mkdir()

    def upload(checkpoint: ray.train.Checkpoint, dir_name: str) -> ray.train.Checkpoint:
        try:
            save(staging / name)
            return storage_context.persist_current_checkpoint(
                ray.train.Checkpoint.from_directory(str(staging / name)), dir_name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    return {"checkpoint": ray.train.Checkpoint.from_directory(str(staging / name)),
            "checkpoint_upload_mode": CheckpointUploadMode.ASYNC, "checkpoint_upload_fn": upload,
            "delete_local_checkpoint_after_upload": False}


def _write_placement_group(location: str) -> None:
    """Record this run's placement group (at a path or a URI), so that whoever stops the run
    abruptly (Tune's ASHA kills the trial, and with it the Train controller) can release it:
    Ray 2.60 keeps a placement group whose creating actor was killed, holding its CPUs for good."""
    group = ray.util.get_current_placement_group()
    if group is not None:
        storage.write_text(location, group.id.hex())


def release_placement_group(location: str | Path) -> bool:
    """Remove the placement group recorded at ``location`` if it still exists; True if removed."""
    from ray.util.placement_group import placement_group_table

    try:
        group_id = storage.read_text(location).strip()
    except FileNotFoundError:
        return False
    entry = placement_group_table().get(group_id)
    if entry is None or entry.get("state") == "REMOVED":
        return False
    ray.util.remove_placement_group(placement_group(group_id))
    return True


def _object_ref(value: Any) -> Any:
    """``value`` in the object store (an object ref passes through; None stays None)."""
    if value is None or isinstance(value, ray.ObjectRef):
        return value
    return ray.put(value)


def build_torch_trainer(
    cfg: Config,
    options: RunOptions,
    scaling: Scaling,
    *,
    name: str,
    storage_path: str,
    max_failures: int = 2,
    keep_checkpoints: int = 3,
    resume_from: str | None = None,
    callbacks: list[Any] | None = None,
    placement_group_file: str | None = None,
    init_state: dict[str, Any] | None = None,
    backbone: BackboneWeights | Any | None = None,
) -> SSDTorchTrainer:
    """Ray's ``TorchTrainer`` for one training run (not the plain-PyTorch ``StepRunner`` of
    ``ssd.engine``: the Ray Train run of workers that each run ``ssd.training.run_training``).

    Args:
        name: the run's folder under ``storage_path``; an existing one is resumed by Ray.
        storage_path: a local path, an NFS mount shared by all nodes, or ``s3://bucket/prefix``.
        max_failures: worker-group restarts (from the last checkpoint) before the run fails.
        keep_checkpoints: checkpoints kept: the best by validation mAP, plus always the latest.
        resume_from: a checkpoint folder (path or URI) to start from (a new run continuing an old one).
        callbacks: Ray Train callbacks (a Tune trial passes ``TuneReportCallback``).
        placement_group_file: rank 0 writes the run's placement-group id there (see
            ``release_placement_group``).
        init_state: initial weights of a fresh run (``ssd.transfer.initial_state``); they go
            through the object store, so workers on any node get them. A run resumed from a
            checkpoint (after a failure, or ``resume_from``) starts from that instead.
        backbone: the pretrained backbone (``ssd.models.resolve_backbone_weights`` on the driver,
            or an object ref of it): fetched once, through the object store to every worker,
            never downloaded by a worker.
    """
    # The config and options travel as the objects they are (frozen dataclasses, pickled by Ray):
    # no dict round trip between the driver's checked config and the workers'.
    loop_config = {"config": cfg, "options": options,
                   "threads": max(1, math.floor(scaling.cpus_per_worker)),
                   "placement_group_file": placement_group_file,
                   "init_state": ray.put(init_state) if init_state is not None else None,
                   "backbone": _object_ref(backbone)}
    return SSDTorchTrainer(  # a TorchTrainer that ends the run at once on a PermanentError
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling.to_ray(),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints, checkpoint_score_attribute=SCORE,
                                               checkpoint_score_order="max"),
            # Train V2 turns every print into a log record and also prints it, which doubles our
            # progress lines and leaks pycocotools' captured report; its per-report INFO lines
            # would drown the progress. Plain prints and warnings only.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        resume_from_checkpoint=ray.train.Checkpoint(resume_from) if resume_from else None,
    )


def checkpoint_location(checkpoint: ray.train.Checkpoint) -> str:
    """A Ray checkpoint's place as users write it: a path, or a URI (Ray keeps ``bucket/key``
    and the filesystem apart)."""
    scheme = {"local": "", "gcs": "gs"}.get(checkpoint.filesystem.type_name, checkpoint.filesystem.type_name)
    return f"{scheme}://{checkpoint.path}" if scheme else checkpoint.path
