"""One rank's training run: builds the data, model, optimizer and hooks, then runs the loop
(``ssd.train_loop``): epochs of ``StepRunner`` steps, evaluation every K epochs, a checkpoint every
epoch, progress on the console and metrics to MLflow (rank 0); each concern is a hook in
``ssd.train_hooks``.

Batch and length come from ``ssd.schedule.plan_schedule`` (the driver computes the same plan):
``train.batch_size`` is the global batch, each rank loading ``batch_size / world size`` images a
step; the run makes exactly ``plan.iterations`` optimizer steps (``train.max_iters``, or
``train.epochs`` converted with the global batch), the last epoch cut short when they end
mid-epoch; the lr follows ``plan.lr_effective`` (linear scaling) and ``plan.lr_drops``. Rank 0
prints the plan as a "recipe" block before the first step.

Plain PyTorch. When ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does that;
``ssd/distributed/`` wires it) the model is wrapped in DDP, each rank reads its own split of the
shards, and evaluation states are gathered on rank 0, which computes pycocotools AP (and VOC07
mAP for VOC data). Without it, the same code trains in one process (tests, notebooks).

How checkpoints leave this module: ``run_training`` calls ``report(metrics, save)`` once per
epoch on every rank, and mid-epoch every ``train.checkpoint_every_iters`` steps or
``train.checkpoint_every_minutes``; ``save`` (rank 0 only, None elsewhere) writes the checkpoint
directory where the caller wants it, from host copies, so it may run in a background thread
(Ray: ``ray.train.report``'s asynchronous upload).

Resuming: from a checkpoint of epoch ``e`` the run continues at epoch ``e`` with the model,
optimizer and LR schedule restored, after the ``epoch_step`` batches of it that a mid-epoch
checkpoint had trained (passed over without decoding, their random draws replayed). The data
order and the augmentation draws of an epoch depend only on (seed, epoch, rank), so a resumed
run trains on exactly what the unbroken run would have.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ssd.checkpoint import Checkpoint, restore
from ssd.config import Config
from ssd.data.shards import ShardSet
from ssd.data.streaming import ShardLoader, ShardStream
from ssd.engine import StepRunner, build_optimizer, build_scheduler
from ssd.evaluation.inference import BatchPredictor
from ssd.evaluation.service import eval_loader, evaluate_on_shards, flat_metrics
from ssd.models import BackboneWeights, build_model
from ssd.schedule import SchedulePlan, plan_schedule, recipe_deviations, recipe_title
from ssd.train_hooks import (  # noqa: F401 - SCORE, NOT_EVALUATED, epoch_seed, format_duration: re-exported
    EVAL_COST_GUESS,
    NOT_EVALUATED,
    SCORE,
    BackboneFreeze,
    CheckpointReport,
    EpochLog,
    EpochSeed,
    EpochSummary,
    InjectedFailure,
    PeriodicEvaluation,
    Progress,
    ReportFn,
    StepProgress,
    epoch_seed,
    format_duration,
    world,
)
from ssd.train_loop import HookBase, TrainLoop
from ssd.transforms import build_transform


class PermanentError(Exception):
    """A failure that restarting the workers cannot fix (a config or data error): the run ends
    at once instead of being retried (``ssd.distributed.failures``). Raise it, or a subclass,
    for any error that is certain to repeat."""


class PermanentValueError(PermanentError, ValueError):
    """A permanent ``ValueError`` (bad config or data values): still caught as a ValueError."""


#: errors of the setup (config, data, checkpoint) that a restart would only repeat
SETUP_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError)


@contextlib.contextmanager
def errors_are_permanent(what: str) -> Iterator[None]:
    """Re-raise ``SETUP_ERRORS`` raised inside as ``PermanentError`` naming ``what``."""
    try:
        yield
    except PermanentError:
        raise
    except SETUP_ERRORS as err:
        kind = PermanentValueError if isinstance(err, ValueError) else PermanentError
        raise kind(f"{what}: {type(err).__name__}: {err}") from err


@dataclass(frozen=True)
class RunOptions:
    """How to run (the config says what to train); every field is plain data for Ray to ship."""

    #: shard set specs (folder, dataset.json, s3:// or http URL) of the two splits
    train_data: str
    val_data: str
    #: DataLoader worker processes per rank (0: load in the training process, best on small CPUs)
    loader_workers: int = 0
    #: print and log step metrics every this many steps
    log_every: int = 20
    #: "auto" (bf16 on GPUs that support it, fp16 with a loss scaler on older GPUs, fp32 off
    #: CUDA), "bf16" or "none"
    amp: str = "auto"
    #: MLflow run the ranks log into (created by the driver); None: no tracking
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    #: validation images drawn with their detections at each evaluation (rank 0's first batch)
    sample_images: int = 8
    #: "EPOCH:STEP[:RANK]": that rank exits abruptly at that step (1-based), once - only in a run
    #: that did not start from a checkpoint; "setup": every rank finds a (simulated) data error
    #: before its first step. For testing fault tolerance.
    inject_failure: str | None = None


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32).

    ``auto``: bf16 on CUDA GPUs that have it (Ampere and later: no loss scaling needed), fp16 on
    those without (V100, T4: ``StepRunner`` then adds a GradScaler), fp32 off CUDA.
    """
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be auto, bf16 or none, got {amp!r}")
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"amp=bf16 needs a CUDA device, the run is on {device}")
    # including_emulation=False: pre-Ampere GPUs "support" bf16 only by slow emulation
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return torch.bfloat16
    if amp == "bf16":
        raise ValueError(f"amp=bf16: {torch.cuda.get_device_name(device)} has no bf16 support")
    return torch.float16


def _parse_failure(spec: str | None) -> tuple[int, int, int] | None:
    if not spec or spec == "setup":
        return None
    parts = spec.split(":")
    try:
        epoch, step, rank = (int(p) for p in (parts + ["0"])[:3])
    except ValueError:
        raise ValueError(f"inject_failure must be EPOCH:STEP[:RANK], got {spec!r}") from None
    if len(parts) > 3 or epoch < 1 or step < 1 or rank < 0:
        raise ValueError(f"inject_failure must be EPOCH:STEP[:RANK] with EPOCH, STEP >= 1, got {spec!r}")
    return epoch, step, rank


@dataclass(frozen=True)
class ValidationResults:
    """One evaluation on rank 0: the COCO result, the VOC07 one (VOC data) or None, and both
    flattened as epoch metrics (``mAP``, ``AP50``, ..., ``VOC07_mAP``)."""

    coco: dict[str, Any]
    voc: dict[str, Any] | None
    metrics: dict[str, float]


class Validation:
    """The validation split of this rank, evaluated with ``ssd.evaluation.evaluate_on_shards``."""

    def __init__(self, cfg: Config, val_set: ShardSet, device: torch.device, batch_size: int,
                 loader_workers: int = 0, amp_dtype: torch.dtype | None = None) -> None:
        self.cfg, self.val_set, self.device, self.batch_size = cfg, val_set, device, batch_size
        self.loader_workers, self.amp_dtype = loader_workers, amp_dtype
        self.classes = list(val_set.classes)

    def run(self, model: nn.Module) -> ValidationResults | None:
        """Every rank evaluates its split (its own loader workers, the run's autocast); rank 0
        gets the results, the others None."""
        rank, world_size = world()
        result = evaluate_on_shards(model, self.cfg, self.val_set, self.device, self.batch_size,
                                    rank=rank, world_size=world_size, num_workers=self.loader_workers,
                                    amp_dtype=self.amp_dtype)
        if result is None:
            return None
        coco = {key: value for key, value in result.items() if key != "VOC07"}
        return ValidationResults(coco, result.get("VOC07"), flat_metrics(result, finite_only=False))

    def sample(self, model: nn.Module, count: int) -> tuple[Tensor, list[dict], list[dict]] | None:
        """(uint8 images (N,3,S,S), detections, ground truth) in network pixels, for a picture."""
        if count <= 0:
            return None
        images, targets = next(iter(eval_loader(self.cfg, self.val_set, self.batch_size, *world())))
        images, targets = images[:count], targets[:count]
        size = self.cfg.priors.image_size
        with torch.no_grad():
            detections = BatchPredictor(model, self.cfg, self.device, self.amp_dtype)(images)
        scale = torch.tensor([size] * 4, dtype=torch.float32)
        detections = [{k: v.cpu() for k, v in d.items()} | {"boxes": d["boxes"].cpu() * scale} for d in detections]
        truth = [{"boxes": t["boxes"] * scale, "labels": t["labels"]} for t in targets]
        return images, detections, truth


def _open_data(cfg: Config, options: RunOptions, rank: int) -> tuple[ShardSet, ShardSet]:
    if options.inject_failure == "setup":
        raise ValueError(f"injected data error (inject_failure=setup) on rank {rank}")
    train_set, val_set = ShardSet.open(options.train_data), ShardSet.open(options.val_data)
    if list(train_set.classes) != list(val_set.classes):
        raise ValueError(f"train and validation shards have different classes: {list(train_set.classes)} "
                         f"vs {list(val_set.classes)}")
    if cfg.model.num_classes != train_set.num_classes:
        raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the shards have "
                         f"{len(train_set.classes)} classes + background = {train_set.num_classes}")
    return train_set, val_set


def run_training(
    cfg: Config,
    options: RunOptions,
    *,
    device: torch.device | str = "cpu",
    report: ReportFn | None = None,
    resume: Checkpoint | None = None,
    tracker: Any | None = None,
    init_state: dict[str, Tensor] | None = None,
    backbone: BackboneWeights | None = None,
) -> dict[str, Any]:
    """Train the run's ``plan_schedule(cfg, ...).iterations`` optimizer steps on this rank (from
    ``resume.step`` when resuming, in epochs counted from ``resume.epoch``).

    Args:
        cfg: the resolved config; ``model.num_classes`` must match the shards' classes + 1.
        options: data, loader, logging and AMP settings.
        device: this rank's device.
        report: called on every rank after every epoch with the epoch's metrics and, on rank 0,
            a function that writes the checkpoint into a given directory.
        resume: a loaded checkpoint to continue from.
        tracker: an ``ssd.tracking.Tracker`` (rank 0; None or disabled elsewhere).
        init_state: initial weights of a fresh run (a finetune's transferred weights,
            ``ssd.transfer.initial_state``); ignored when resuming, whose checkpoint has its own.
        backbone: pretrained backbone weights of a fresh run (``ssd.models.resolve_backbone_weights``,
            resolved once by the driver); ignored when resuming.
    Returns:
        The last epoch's metrics (rank 0's view; evaluation metrics are NaN on other ranks).
    """
    device = torch.device(device)
    rank, world_size = world()
    failure = _parse_failure(options.inject_failure)
    with errors_are_permanent("before the first step"):
        train_set, val_set = _open_data(cfg, options, rank)
        plan = plan_schedule(cfg, train_set.num_samples, world_size)  # ScheduleError is a ValueError
        if resume is not None and resume.step > plan.iterations:
            raise ValueError(f"the checkpoint is at epoch {resume.epoch} (iteration {resume.step}), past the "
                             f"run's {plan.iterations} iterations ({_length_words(cfg, plan)})")

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        amp_dtype = amp_dtype_for(options.amp, device)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        # the pretrained backbone (resolved once on the driver); a resumed run has every weight
        model = build_model(cfg, backbone=backbone if resume is None else None)
        if init_state is not None and resume is None:
            model.load_state_dict(init_state)
        model = model.to(device=device, memory_format=memory_format)
        start_epoch = resume.epoch if resume is not None else 0
        freeze = BackboneFreeze(model, cfg.train.freeze_backbone_epochs, device)
        freeze.set_epoch(start_epoch)
        model = freeze.wrap()
        optimizer = build_optimizer(model, cfg.optim)
        # normalize=False: loaders hand over uint8 batches; the step normalises them on the device
        augment_on = cfg.train.augment_on
        if augment_on == "auto":
            augment_on = "device" if device.type == "cuda" else "cpu"
        if augment_on == "device":
            # loader workers only read JPEG bytes and draw the parameters (ssd.transforms'
            # one sampler); the batch is decoded and augmented on the training device
            from ssd.device_augment import DeviceAugment, DeviceAugmentLoader

            augment = DeviceAugment(cfg.priors.image_size, cfg.augment.strength, tuple(cfg.augment.mean))
            train_loader = DeviceAugmentLoader(ShardLoader(
                ShardStream(train_set, train=True, rank=rank, world_size=world_size, seed=cfg.train.seed,
                            prepare=augment.prepare),
                plan.per_worker_batch, num_workers=options.loader_workers, pin_memory=device.type == "cuda"),
                augment, device)
        else:
            train_tf = build_transform(cfg.priors.image_size, cfg.augment.strength, train=True,
                                       mean=cfg.augment.mean, normalize=False)
            train_loader = ShardLoader(
                ShardStream(train_set, train_tf, train=True, rank=rank, world_size=world_size, seed=cfg.train.seed),
                plan.per_worker_batch, num_workers=options.loader_workers, pin_memory=device.type == "cuda")
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ValueError(f"{options.train_data}: {train_set.num_samples} training samples over {world_size} "
                             f"ranks do not fill one batch of {plan.per_worker_batch} per rank")
        scheduler = build_scheduler(optimizer, cfg.optim, plan.iterations, plan.lr_scale, plan.lr_drops)
        runner = StepRunner(model, cfg, optimizer, scheduler, device, amp_dtype)
        runner.frozen = freeze.frozen_module()

    best = NOT_EVALUATED
    if resume is not None:
        # the fp16 loss scale too (a checkpoint of a bf16 / fp32 run has none: the scaler starts fresh)
        restore(resume, model, optimizer, scheduler,
                scaler=runner.scaler if runner.scaler is not None and resume.scaler is not None else None)
        runner.iteration = resume.step
        best = resume.metrics.get("best_mAP", NOT_EVALUATED)
    start_step = _resume_step(resume, steps_per_epoch, world_size, rank)
    # epochs are passes of steps_per_epoch steps (the plan's iterations per epoch, or a few fewer
    # when the shard split cannot fill them on every rank); the last may be cut short, the first
    # of a run resumed mid-epoch starts after start_step of them
    epochs = start_epoch + math.ceil((plan.iterations - runner.iteration + start_step) / steps_per_epoch)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.model.arch}: {params / 1e6:.2f} M parameters, {cfg.priors.num_priors()} priors; "
              f"{train_set.num_samples} training images in {len(train_set.urls)} shards, {world_size} rank(s) x "
              f"{steps_per_epoch} steps of {plan.per_worker_batch} per epoch; {val_set.num_samples} validation "
              f"images; device {device}, AMP {amp_dtype or 'off'}"
              + (f"; resumed from epoch {start_epoch} (step {resume.step})" if resume is not None else "")
              + (f", {start_step} batches into epoch {start_epoch + 1}" if start_step else ""),
              flush=True)
        print(plan.recipe(steps_per_epoch, recipe_title(cfg),
                          _recipe_extra(cfg, backbone, resume, init_state is not None)), flush=True)

    progress = Progress(epochs, steps_per_epoch, enabled=rank == 0,
                        total_iters=start_epoch * steps_per_epoch + start_step + plan.iterations - runner.iteration)
    hooks: list[HookBase] = [
        EpochSeed(cfg.train.seed, rank),
        freeze,
        StepProgress(progress, options.log_every, plan.global_batch, tracker),
    ]
    if failure is not None and resume is None:  # injected once: a resumed run does not fail again
        hooks.append(InjectedFailure(*failure))
    hooks += [
        EpochSummary(device),
        PeriodicEvaluation(
            Validation(cfg, val_set, device, cfg.train.batch_size, options.loader_workers, amp_dtype),
            cfg.train.eval_every, best, progress, tracker, options.sample_images, budget=cfg.train.eval_budget,
            # an evaluation's first guess: its images at EVAL_COST_GUESS of a training image's time
            first_eval_ratio=EVAL_COST_GUESS * val_set.num_samples / (steps_per_epoch * plan.global_batch),
            device=device),
        EpochLog(progress, tracker),
    ]
    if report is not None:
        extra = {"mlflow_run_id": options.mlflow_run_id, "world_size": world_size,
                 "train_data": options.train_data, "val_data": options.val_data}
        hooks.append(CheckpointReport(report, cfg, list(train_set.classes), optimizer, scheduler, extra,
                                      best=best, log_every=options.log_every, device=device))
    return TrainLoop(runner, train_loader, hooks, steps_per_epoch).train(start_epoch, epochs, plan.iterations,
                                                                         start_step=start_step)


def _resume_step(resume: Checkpoint | None, steps_per_epoch: int, world_size: int, rank: int) -> int:
    """Batches of the resumed epoch already trained (0 unless the checkpoint was taken mid-epoch).

    They are the same batches only with the same ranks: another world size splits the epoch's
    samples differently, so the rest of that epoch then reads the new split from the same point
    (some samples twice, some not at all, in that epoch only)."""
    if resume is None or resume.epoch_step <= 0:
        return 0
    if resume.epoch_step >= steps_per_epoch:
        raise ValueError(f"the checkpoint was taken {resume.epoch_step} steps into an epoch of {steps_per_epoch}: "
                         "the data or the batch changed since")
    saved_world = resume.extra.get("world_size")
    if rank == 0 and saved_world is not None and int(saved_world) != world_size:
        print(f"note: the checkpoint was taken mid-epoch with {saved_world} worker(s), this run has {world_size}: "
              f"the rest of epoch {resume.epoch + 1} reads this run's split from step {resume.epoch_step + 1}",
              flush=True)
    return resume.epoch_step


def _recipe_extra(cfg: Config, backbone: BackboneWeights | None, resume: Checkpoint | None,
                  init_state: bool) -> tuple[str, ...]:
    """The recipe block's lines after the schedule: where the weights come from, when the run
    evaluates, the recipe's source and what this run changes in it."""
    if resume is not None:
        weights = f"from the checkpoint of epoch {resume.epoch} (iteration {resume.step})"
    elif init_state:
        weights = "the finetune's initial state (the source model's, classes mapped by name)"
    elif backbone is not None:
        weights = f"{backbone.source}, sha256 {backbone.sha256[:16]}, input {backbone.input_convention}"
    else:
        weights = "none: the backbone starts from random weights (model.backbone_weights unset or none)"
    train = cfg.train
    if train.eval_every == "auto":
        evaluation = (f"auto: after an epoch when evaluation stays within {train.eval_budget:.0%} of the wall time "
                      "(train.eval_budget), and after the last")
    else:
        evaluation = f"every {train.eval_every} epoch(s) and after the last"
    lines = [f"weights   {weights}", f"eval      {evaluation}"]
    if cfg.recipe.reference:
        lines.append(f"source    {cfg.recipe.reference}")
    changed = recipe_deviations(cfg)
    if changed:
        lines.append(f"changed   from {cfg.recipe.name} (its expected figure is for the recipe as written): "
                     + ", ".join(changed))
    return tuple(lines)


def _length_words(cfg: Config, plan: SchedulePlan) -> str:
    if plan.length_from == "train.max_iters":
        return f"train.max_iters={cfg.train.max_iters}"
    return f"train.epochs={cfg.train.epochs} of {plan.iters_per_epoch} iterations"
