"""A training run as requested (:class:`TrainRequest`, what ``pipelines/train.py``'s command
line says) and as resolved before any worker starts (:class:`ResolvedTrain`: the config, the
shards, the run's name and storage, what it resumes or starts from).

:func:`resolve_train` does every check that can fail in seconds (unknown config keys, values
out of range, missing data, an ``--init-from`` model that does not fit) and raises
:class:`~ssd.jobs.common.BadRequest`; nothing here imports Ray. ``ssd.distributed.train_job``
runs a resolved request.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ssd import storage
from ssd.config import Config, ConfigError, load_config
from ssd.jobs.common import (
    BadRequest,
    checkpoint_summary,
    default_storage_path,
    latest_checkpoint,
    local_path,
    resolve_data,
)
from ssd.tracking import resolve_tracking_uri


@dataclass(frozen=True)
class TrainRequest:
    """One training run, as asked for: the fields are ``pipelines/train.py``'s options (same
    names and defaults; ``overrides`` are its trailing ``key=value`` arguments)."""

    config: str | None = None
    data: str | None = None
    train: str | None = None
    val: str | None = None
    loader_workers: int | None = None  # None: ssd.jobs.common.loader_workers_for
    workers: int = 2
    use_gpu: bool | None = None  # None: GPUs if the cluster has one per worker
    cpus_per_worker: float = 1.0
    address: str | None = None
    name: str | None = None
    storage_path: str | None = None
    resume: str | None = None  # a run NAME under the storage path, or a checkpoint folder
    max_failures: int = 2
    keep_checkpoints: int = 3
    amp: str = "auto"
    mlflow_uri: str | None = None
    experiment: str = "ssd-ray"
    no_mlflow: bool = False
    register_as: str | None = None
    alias: str = "champion"
    eval_device: str = "cpu"
    register_timeout: float = 300.0
    parent_model: str | None = None
    parent_run_id: str | None = None
    init_from: str | None = None
    freeze_backbone_epochs: int | None = None
    epochs: int | None = None
    log_every: int = 20
    inject_failure: str | None = None
    smoke_test: bool = False
    overrides: tuple[str, ...] = ()

    def config_overrides(self, base: Config | None = None) -> list[str]:
        """The config overrides the request makes on ``base`` (the config they apply to):
        ``overrides``, then the shorthands (``epochs``, ``freeze_backbone_epochs``);
        ``smoke_test``'s come first. ``--epochs N`` (and the smoke test's 2 epochs) set the run's
        length: they clear ``train.max_iters`` and keep the lr drops at the same fractions of the
        run (:func:`epochs_overrides`)."""
        overrides = list(self.overrides)
        if self.epochs:
            overrides += epochs_overrides(self.epochs, base, self.overrides)
        if self.freeze_backbone_epochs is not None:
            overrides.append(f"train.freeze_backbone_epochs={self.freeze_backbone_epochs}")
        if self.smoke_test:
            overrides = [*epochs_overrides(2, base, self.overrides), "train.batch_size=8", *overrides]
        return overrides

    def argv(self) -> list[str]:
        """The ``pipelines/train.py`` arguments that make this request (options left at their
        defaults are left out)."""
        out: list[str] = []
        for f in fields(self):
            value = getattr(self, f.name)
            if value == f.default or f.name == "overrides":
                continue
            if f.name == "use_gpu":
                out.append("--gpu" if value else "--cpu")
            else:
                flag = "--" + f.name.replace("_", "-")
                out += [flag] if value is True else [flag, str(value)]
        return out + list(self.overrides)


def epochs_overrides(epochs: int, base: Config | None = None, user: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The overrides of an ``--epochs N`` shorthand: the length in epochs, ``train.max_iters``
    cleared (a preset may give the length in iterations; exactly one of the two may be set).

    When ``base`` gives its lr drops in iterations of its ``max_iters`` (``optim.lr_steps``, the
    recipes: 80k and 100k of 120k), they become the same fractions of the new length
    (``optim.milestones``), so a shorter run still drops its lr; unless the ``user`` overrides
    set the drops themselves."""
    out = ["train.max_iters=null", f"train.epochs={epochs}"]
    optim, train = (base.optim, base.train) if base is not None else (None, None)
    user_drops = any(o.split("=", 1)[0].strip() in ("optim.lr_steps", "optim.milestones") for o in user)
    if optim is not None and optim.lr_steps and train.max_iters and optim.schedule == "multistep" and not user_drops:
        fractions = [round(step / train.max_iters, 9) for step in optim.lr_steps if step < train.max_iters]
        out += ["optim.lr_steps=null", f"optim.milestones={fractions}"]
    return out


def check_schedule(cfg: Config, num_train_samples: int, workers: int) -> Any:
    """``ssd.schedule.plan_schedule`` of the run, or BadRequest naming the numbers (a global
    batch that does not split over the workers, data that cannot fill one global batch)."""
    from ssd.schedule import ScheduleError, plan_schedule

    try:
        return plan_schedule(cfg, num_train_samples, workers)
    except ScheduleError as err:
        raise BadRequest(f"config: {err}") from None


@dataclass(frozen=True)
class Resumed:
    """The checkpoint a resumed run continues from: its config, its epoch, and its ``extra``
    record (``mlflow_run_id``, ``train_data``, ``val_data``, ...)."""

    config: Config
    epoch: int
    extra: dict[str, Any]


@dataclass(frozen=True)
class InitSource:
    """The ``--init-from`` model: where it came from (``ssd.registry.ResolvedModel``), its
    checkpoint (``ssd.checkpoint.Checkpoint``) and what the transfer did
    (``ssd.transfer.TransferReport``)."""

    model: Any
    checkpoint: Any
    report: Any = None


@dataclass(frozen=True)
class ResolvedTrain:
    """A request checked and resolved: everything a run needs before Ray starts.

    ``storage`` is the absolute storage path (or URI), ``name`` the run's folder under it;
    ``resume_from`` a checkpoint a new run starts from (``--resume CHECKPOINT``); ``resumed``
    the checkpoint the run continues (``--resume NAME``) or starts from; ``init_state`` the
    transferred weights of an ``--init-from`` run, ``source`` that model.
    """

    cfg: Config
    train_set: Any  # ssd.data.shards.ShardSet
    val_set: Any
    train_spec: str
    val_spec: str
    name: str
    storage: str
    resume_from: str | None = None
    resumed: Resumed | None = None
    init_state: dict[str, Any] | None = None
    source: InitSource | None = None
    #: the pretrained backbone of a fresh run (``ssd.models.BackboneWeights``), resolved here once
    backbone: Any = None

    @property
    def run_dir(self) -> str:
        return storage.join(self.storage, self.name)


def train_config(request: TrainRequest, num_classes: int, *, source_config: Config | None = None,
                 resumed_config: Config | None = None) -> Config:
    """The config a run of ``request`` trains with, on shards of ``num_classes`` (background
    included): a resumed run's config with the overrides; for a run that starts from a model
    trained with ``source_config``, its model and priors sections and the rest from
    ``request.config`` or the source (``ssd.transfer.finetune_config``); else ``request.config``
    (default tiny). Raises BadRequest for unknown keys and invalid values."""
    try:
        from ssd.config import apply_overrides, config_from_dict

        if resumed_config is not None:
            overrides = request.config_overrides(resumed_config)
            return config_from_dict(apply_overrides(resumed_config.to_dict(), overrides))
        if source_config is not None:  # the source's model and priors; the rest from --config or the source
            from ssd.transfer import finetune_config

            base = load_config(request.config) if request.config else None
            return finetune_config(source_config, base, request.config_overrides(base or source_config), num_classes)
        preset = request.config or "tiny"
        overrides = request.config_overrides(load_config(preset) if request.epochs or request.smoke_test else None)
        return load_config(preset, [f"model.num_classes={num_classes}", *overrides])
    except ConfigError as err:
        raise BadRequest(f"config: {err}") from None


def _resumed(request: TrainRequest, storage_path: str) -> tuple[str, str | None, Resumed]:
    """``--resume``: (the run's name, the checkpoint a new run starts from or None, the checkpoint)."""
    name = request.name
    resume_from = None
    if storage.is_file(storage.join(local_path(request.resume), "meta.json")):
        # a checkpoint folder (path or URI): a new run starting from it
        resume_from = checkpoint_dir = local_path(request.resume)
    else:  # a run name: Ray continues the run in storage/NAME from its latest checkpoint
        if request.name and request.name != request.resume:
            raise BadRequest("--resume NAME continues run NAME; do not also give a different --name")
        name = request.resume
        try:
            checkpoint_dir = latest_checkpoint(storage.join(storage_path, name))
        except OSError as err:  # e.g. object storage refusing the listing
            raise BadRequest(f"--resume {request.resume}: cannot list {storage.join(storage_path, name)}: "
                             f"{err}") from None
        if checkpoint_dir is None:
            raise BadRequest(f"--resume {request.resume}: no checkpoint under {storage.join(storage_path, name)}")
    try:
        summary = checkpoint_summary(checkpoint_dir)
    except (OSError, ValueError, KeyError) as err:
        raise BadRequest(f"--resume {request.resume}: cannot read the checkpoint at {checkpoint_dir}: {err}") from None
    return name, resume_from, Resumed(summary["config"], summary["epoch"], dict(summary.get("extra", {})))


def load_init_source(request: TrainRequest) -> InitSource:
    """The ``--init-from`` model, downloaded if it is an MLflow model, and its checkpoint."""
    from ssd.checkpoint import load_checkpoint
    from ssd.registry import ModelReferenceError, is_model_uri, resolve_model

    try:
        uri = resolve_tracking_uri(request.mlflow_uri) if is_model_uri(request.init_from) else None
        model = resolve_model(request.init_from, uri)
        checkpoint = load_checkpoint(model.checkpoint)
    except (ModelReferenceError, FileNotFoundError, ValueError) as err:
        raise BadRequest(f"--init-from: {err}") from None
    return InitSource(model, checkpoint)


def resolve_train(request: TrainRequest) -> ResolvedTrain:
    """Config, data and run identity of ``request``; raises BadRequest before any Ray."""
    storage_path = local_path(request.storage_path or default_storage_path())  # Ray wants it absolute
    name, resume_from, resumed = request.name, None, None
    if request.resume:
        name, resume_from, resumed = _resumed(request, storage_path)
    extra = resumed.extra if resumed is not None else {}
    data = resolve_data(request.data, request.train, request.val, smoke_test=request.smoke_test,
                        fallback=(extra.get("train_data"), extra.get("val_data")))
    train_set = data.train_set

    source = None
    if request.init_from and resumed is None:  # a resumed run has its weights already
        source = load_init_source(request)
    cfg = train_config(request, train_set.num_classes, source_config=source.checkpoint.config if source else None,
                       resumed_config=resumed.config if resumed else None)
    if cfg.model.num_classes != train_set.num_classes:
        raise BadRequest(f"model.num_classes={cfg.model.num_classes}, but the shards have "
                         f"{len(train_set.classes)} classes + background")
    if request.workers < 1:
        raise BadRequest(f"--workers must be at least 1, got {request.workers}")
    check_schedule(cfg, train_set.num_samples, request.workers)
    if request.register_as and request.no_mlflow:
        raise BadRequest("--register-as needs MLflow: drop --no-mlflow")
    # A fresh run's pretrained backbone: read (or fetched) once, here, then shipped to the workers
    # by Ray; resumed and --init-from runs have every weight already.
    backbone = resolve_backbone(cfg) if resumed is None and source is None else None
    init_state = None
    if source is not None:
        from ssd.transfer import IncompatibleModels, initial_state

        checkpoint = source.checkpoint
        try:
            init_state, report, warnings = initial_state(cfg, list(train_set.classes), checkpoint.model,
                                                         checkpoint.config, checkpoint.classes)
        except IncompatibleModels as err:
            raise BadRequest(f"--init-from {request.init_from}: {err}") from None
        print(f"initialising from {source.model.label}: {report.summary()}", flush=True)
        for warning in warnings:
            print(f"warning: --init-from {request.init_from}: {warning}", file=sys.stderr, flush=True)
        source = InitSource(source.model, checkpoint, report)
    if name is None:
        config_name = request.config or ("finetune" if source is not None else "tiny")
        stem = Path(config_name).stem if not config_name.isidentifier() else config_name
        name = f"ssd-{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return ResolvedTrain(cfg=cfg, train_set=train_set, val_set=data.val_set, train_spec=data.train_spec,
                         val_spec=data.val_spec, name=name, storage=storage_path, resume_from=resume_from,
                         resumed=resumed, init_state=init_state, source=source, backbone=backbone)


def resolve_backbone(cfg: Config) -> Any:
    """``ssd.models.resolve_backbone_weights`` with its one-line errors as a BadRequest; prints
    where the weights came from."""
    from ssd.models import resolve_backbone_weights

    try:
        backbone = resolve_backbone_weights(cfg)
    except (ValueError, OSError) as err:  # unavailable offline, not found, NaN, wrong architecture
        raise BadRequest(str(err)) from None
    if backbone is not None:
        print(f"backbone weights: {backbone.source} (sha256 {backbone.sha256[:16]}, input "
              f"{backbone.input_convention})", flush=True)
    return backbone


def print_summary(summary: dict[str, Any]) -> None:
    """The end of a training run on the console: best scores, checkpoint, MLflow run, model version."""
    def number(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    lines = [f"finished {summary['run_name']} in {summary['seconds']:.0f} s",
             f"  best validation mAP (COCO AP) {number('mAP')}, AP50 {number('AP50')}"
             + (f", VOC07 mAP {number('VOC07_mAP')}" if summary.get("VOC07_mAP") is not None else "")
             + f" at epoch {summary['best_epoch']}"
             + (f"/{summary['epochs']}" if summary.get("epochs") is not None else ""),  # None: train.max_iters
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
