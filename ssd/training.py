"""One rank's training run: epochs of ``Trainer`` steps, evaluation every K epochs, a checkpoint
every epoch, progress on the console and metrics to MLflow (rank 0).

Plain PyTorch. When ``torch.distributed`` is initialised (Ray Train's ``TorchTrainer`` does that;
``ssd/distributed/`` wires it) the model is wrapped in DDP, each rank reads its own split of the
shards, and evaluation states are gathered on rank 0, which computes pycocotools AP (and VOC07
mAP for VOC data). Without it, the same code trains in one process (tests, notebooks).

How checkpoints leave this module: ``run_training`` calls ``report(metrics, save)`` once per
epoch on every rank; ``save`` (rank 0 only, None elsewhere) writes the checkpoint directory
where the caller wants it (Ray: a temporary folder handed to ``ray.train.report``).

Resuming: from a checkpoint of epoch ``e`` the run continues at epoch ``e`` with the model,
optimizer and LR schedule restored. The data order and the augmentation draws of an epoch
depend only on (seed, epoch, rank), so a resumed run trains on exactly what the unbroken run
would have.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ssd.checkpoint import Checkpoint, restore, save_checkpoint, unwrap
from ssd.config import Config
from ssd.data.shards import ShardLoader, ShardSet, ShardStream
from ssd.engine import Trainer, build_optimizer, build_scheduler, evaluate, network_input, predict
from ssd.evaluate import CocoEvaluator, VocEvaluator
from ssd.models import build_model
from ssd.reporting import write_eval_report
from ssd.scoring import flat_metrics, is_voc
from ssd.transforms import build_transform

#: the checkpoint score: COCO AP@[.5:.95] on the validation shards
SCORE = "mAP"
#: the score of an epoch without evaluation (and the best score before the first): below any
#: real mAP, so Ray keeps evaluated checkpoints first. Not NaN: Ray 2.60 stores NaN metrics as
#: null in its checkpoint snapshot, and a resumed run then fails comparing None scores.
NOT_EVALUATED = -1.0



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


SaveFn = Callable[[Path], None]
ReportFn = Callable[[dict[str, Any], SaveFn | None], None]


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
    #: "auto" (bf16 on GPUs that support it, else fp32), "bf16" or "none"
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

    bf16 only: it needs no loss scaling (fp16 would need a GradScaler, which the step has not).
    """
    if amp not in ("auto", "bf16", "none"):
        raise ValueError(f"amp must be auto, bf16 or none, got {amp!r}")
    if amp == "none" or (amp == "auto" and device.type != "cuda"):
        return None
    if device.type != "cuda":
        raise ValueError(f"amp=bf16 needs a CUDA device, the run is on {device}")
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if amp == "bf16":
        raise ValueError(f"amp=bf16: {torch.cuda.get_device_name(device)} has no bf16 support")
    return None


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


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The global RNG seed of one rank's epoch (drives augmentation and loader worker seeds)."""
    return (seed * 1_000_003 + epoch * 10_007 + rank) % (2**63)


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class _Progress:
    """Rank 0's console lines: step progress with throughput and ETA, epoch summaries."""

    def __init__(self, epochs: int, steps_per_epoch: int, world_size: int, batch_size: int, enabled: bool) -> None:
        self.epochs, self.steps, self.world, self.batch = epochs, steps_per_epoch, world_size, batch_size
        self.enabled = enabled
        self.start = time.perf_counter()
        self.steps_done = 0  # in this process (a resumed run's ETA uses its own pace)
        self.eval_seconds = 0.0

    def eta(self, epoch: int, step: int) -> float:
        """Seconds left: remaining steps at this process's mean step time, evaluation included."""
        elapsed = time.perf_counter() - self.start - self.eval_seconds
        per_step = elapsed / max(self.steps_done, 1)
        remaining = (self.epochs - epoch) * self.steps + (self.steps - step)
        evals_per_step = self.eval_seconds / max(self.steps_done, 1)
        return remaining * (per_step + evals_per_step)

    def step(self, epoch: int, step: int, metrics: dict[str, float], images_per_s: float) -> None:
        if not self.enabled:
            return
        print(f"epoch {epoch}/{self.epochs} step {step}/{self.steps}  loss {metrics['loss']:.3f} "
              f"(loc {metrics['loss_loc']:.3f}, conf {metrics['loss_conf']:.3f})  lr {metrics['lr']:.5f}  "
              f"{images_per_s:.0f} img/s  ETA {format_duration(self.eta(epoch, step))}", flush=True)

    def epoch(self, epoch: int, metrics: dict[str, Any], seconds: float) -> None:
        if not self.enabled:
            return
        line = (f"epoch {epoch}/{self.epochs} done in {seconds:.1f} s: loss {metrics['loss']:.3f} "
                f"(loc {metrics['loss_loc']:.3f}, conf {metrics['loss_conf']:.3f})  "
                f"{metrics['images_per_s']:.0f} img/s")
        if metrics[SCORE] != NOT_EVALUATED:
            line += f"  mAP {metrics[SCORE]:.4f}  AP50 {metrics['AP50']:.4f}"
            if "VOC07_mAP" in metrics:
                line += f"  VOC07 mAP {metrics['VOC07_mAP']:.4f}"
        line += f"  (best mAP {metrics['best_mAP']:.4f})" if metrics["best_mAP"] != NOT_EVALUATED else ""
        line += f"  ETA {format_duration(self.eta(epoch, self.steps))}"
        print(line, flush=True)


class _StepHook:
    """Called after every step of one epoch: progress lines, step metrics, injected failure."""

    def __init__(self, epoch: int, steps: int, log_every: int, global_batch: int, progress: _Progress,
                 trainer: Trainer, tracker: Any | None, failure: tuple[int, int, int] | None, rank: int) -> None:
        self.epoch, self.steps, self.log_every, self.global_batch = epoch, steps, log_every, global_batch
        self.progress, self.trainer, self.tracker, self.failure, self.rank = progress, trainer, tracker, failure, rank
        self.window_start, self.window_steps = time.perf_counter(), 0

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.progress.steps_done += 1
        self.window_steps += 1
        if self.failure == (self.epoch, step, self.rank):
            # Wait first: Ray Train's controller registers a reported checkpoint when it next
            # polls the workers (every 2 s); a death before that loses the epoch's checkpoint.
            time.sleep(3.0)
            print(f"injected failure: rank {self.rank} exits at epoch {self.epoch} step {step}", flush=True)
            os._exit(17)
        if step % self.log_every == 0 or step == self.steps:
            rate = self.window_steps * self.global_batch / max(time.perf_counter() - self.window_start, 1e-9)
            self.progress.step(self.epoch, step, metrics, rate)
            if self.tracker is not None:
                self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}
                                         | {"train/images_per_s": rate}, step=self.trainer.iteration)
            self.window_start, self.window_steps = time.perf_counter(), 0


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (identity in one process)."""
    if _world()[1] == 1:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def _gather(obj: Any) -> list[Any]:
    if _world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _BackboneFreeze:
    """Keeps ``model.backbone`` frozen for the first ``epochs`` epochs.

    Frozen parameters have ``requires_grad=False``: no gradient is computed (the backward pass
    stops at the extras), SGD skips them (no weight decay or momentum either), and BatchNorm in
    the backbone runs in eval mode (``Trainer.frozen``). DDP only synchronises the parameters
    that require gradients when it is built, so the model is wrapped again when the backbone
    thaws (:meth:`wrap`).
    """

    def __init__(self, model: nn.Module, epochs: int, device: torch.device) -> None:
        self.model, self.epochs, self.device = model, epochs, device
        self.frozen: bool | None = None

    def set_epoch(self, epoch: int) -> bool:
        """Freeze or thaw for 0-based ``epoch``; True when that changed a frozen backbone."""
        frozen = epoch < self.epochs
        changed = self.frozen is not None and frozen != self.frozen
        if frozen != self.frozen:
            for parameter in self.model.backbone.parameters():
                parameter.requires_grad_(not frozen)
            self.frozen = frozen
        return changed

    def frozen_module(self) -> nn.Module | None:
        return self.model.backbone if self.frozen else None

    def wrap(self) -> nn.Module:
        """The model to train: DDP-wrapped (anew) when distributed, else the model itself."""
        if _world()[1] == 1:
            return self.model
        # after the memory-format change: DDP's gradient buckets take the parameters' strides
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)


class _Evaluation:
    """Validation on every rank's split; rank 0 merges the states and computes the metrics."""

    def __init__(self, cfg: Config, val_set: ShardSet, device: torch.device, batch_size: int) -> None:
        rank, world = _world()
        self.cfg, self.val_set, self.device = cfg, val_set, device
        self.classes = list(val_set.classes)
        self.voc = is_voc(val_set)
        # min_size=0: evaluation keeps every annotated object, however small at the network size
        transform = build_transform(cfg.priors.image_size, 0.0, train=False, min_size=0.0, normalize=False)
        self.loader = ShardLoader(ShardStream(val_set, transform, train=False, rank=rank, world_size=world),
                                  batch_size, num_workers=0)

    def run(self, model: nn.Module) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """(COCO result, VOC07 result or None) on rank 0; (None, None) on the others."""
        state = evaluate(model, self.loader, self.cfg, CocoEvaluator(self.classes), self.device).state()
        states = _gather(state)
        if _world()[0] != 0:
            return None, None
        coco = CocoEvaluator.from_states(states).compute()
        voc = VocEvaluator.from_states(states, use_07_metric=True).compute() if self.voc else None
        return coco, voc

    def sample(self, model: nn.Module, count: int) -> tuple[Tensor, list[dict], list[dict]] | None:
        """(uint8 images (N,3,S,S), detections, ground truth) in network pixels, for a picture."""
        if count <= 0:
            return None
        images, targets = next(iter(self.loader))
        images, targets = images[:count], targets[:count]
        size = self.cfg.priors.image_size
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        priors = self.cfg.priors.generate(device=self.device)
        detections = predict(model, network_input(images, self.cfg, self.device, memory_format), priors,
                             self.cfg.postprocess, variances=self.cfg.loss.variances)
        scale = torch.tensor([size] * 4, dtype=torch.float32)
        detections = [{k: v.cpu() for k, v in d.items()} | {"boxes": d["boxes"].cpu() * scale} for d in detections]
        truth = [{"boxes": t["boxes"] * scale, "labels": t["labels"]} for t in targets]
        return images, detections, truth


def _log_eval_artifacts(tracker: Any, epoch: int, coco: dict, voc: dict | None, classes: list[str],
                        sample: tuple | None) -> None:
    """Per-class AP table, PR curves and a detection grid into the run's ``eval/epoch-NNN``."""
    if tracker is None or not tracker.active:
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = write_eval_report(Path(tmp), coco, classes, voc=voc, sample=sample)
        except Exception as err:  # noqa: BLE001 - a failed picture must not stop training
            print(f"warning: could not draw the evaluation report: {err}", file=sys.stderr, flush=True)
            return
        for path in paths:
            tracker.log_artifact(path, f"eval/epoch-{epoch:03d}")


def run_training(
    cfg: Config,
    options: RunOptions,
    *,
    device: torch.device | str = "cpu",
    report: ReportFn | None = None,
    resume: Checkpoint | None = None,
    tracker: Any | None = None,
    init_state: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Train ``cfg.train.epochs`` epochs (from ``resume.epoch`` when resuming) on this rank.

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
    Returns:
        The last epoch's metrics (rank 0's view; evaluation metrics are NaN on other ranks).
    """
    device = torch.device(device)
    rank, world = _world()
    failure = _parse_failure(options.inject_failure)
    with errors_are_permanent("before the first step"):
        if options.inject_failure == "setup":
            raise ValueError(f"injected data error (inject_failure=setup) on rank {rank}")
        train_set, val_set = ShardSet.open(options.train_data), ShardSet.open(options.val_data)
        if list(train_set.classes) != list(val_set.classes):
            raise ValueError(f"train and validation shards have different classes: {list(train_set.classes)} "
                             f"vs {list(val_set.classes)}")
        if cfg.model.num_classes != train_set.num_classes:
            raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the shards have "
                             f"{len(train_set.classes)} classes + background = {train_set.num_classes}")
        epochs = cfg.train.epochs
        if resume is not None and resume.epoch > epochs:
            raise ValueError(f"the checkpoint is at epoch {resume.epoch}, past train.epochs={epochs}")

        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        amp_dtype = amp_dtype_for(options.amp, device)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        model = build_model(cfg)
        if init_state is not None and resume is None:
            model.load_state_dict(init_state)
        model = model.to(device=device, memory_format=memory_format)
        start_epoch = resume.epoch if resume is not None else 0
        freeze = _BackboneFreeze(model, cfg.train.freeze_backbone_epochs, device)
        freeze.set_epoch(start_epoch)
        model = freeze.wrap()
        optimizer = build_optimizer(model, cfg.optim)
        # normalize=False: loaders hand over uint8 batches; the trainer normalises them on the device
        train_tf = build_transform(cfg.priors.image_size, cfg.augment.strength, train=True, mean=cfg.augment.mean,
                                   normalize=False)
        train_loader = ShardLoader(
            ShardStream(train_set, train_tf, train=True, rank=rank, world_size=world, seed=cfg.train.seed),
            cfg.train.batch_size, num_workers=options.loader_workers, pin_memory=device.type == "cuda")
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ValueError(f"{options.train_data}: {train_set.num_samples} training samples over {world} ranks "
                             f"do not fill one batch of {cfg.train.batch_size} per rank")
        scheduler = build_scheduler(optimizer, cfg.optim, epochs * steps_per_epoch)
        trainer = Trainer(model, cfg, optimizer, scheduler, device, amp_dtype)
        trainer.frozen = freeze.frozen_module()
        evaluation = _Evaluation(cfg, val_set, device, cfg.train.batch_size)

    best = NOT_EVALUATED
    if resume is not None:
        restore(resume, model, optimizer, scheduler)
        trainer.iteration = resume.step
        best = resume.metrics.get("best_mAP", NOT_EVALUATED)
    progress = _Progress(epochs, steps_per_epoch, world, cfg.train.batch_size, enabled=rank == 0)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"{cfg.model.arch}: {params / 1e6:.2f} M parameters, {cfg.priors.num_priors()} priors; "
              f"{train_set.num_samples} training images in {len(train_set.urls)} shards, {world} rank(s) x "
              f"{steps_per_epoch} steps of {cfg.train.batch_size} per epoch; {val_set.num_samples} validation "
              f"images; device {device}, AMP {amp_dtype or 'off'}"
              + (f"; resumed from epoch {start_epoch} (step {resume.step})" if resume is not None else ""),
              flush=True)

    metrics: dict[str, Any] = {}
    for epoch in range(start_epoch, epochs):
        epoch_number = epoch + 1
        torch.manual_seed(epoch_seed(cfg.train.seed, epoch, rank))
        if freeze.set_epoch(epoch):  # the backbone thaws: it trains from this epoch on
            model = trainer.model = freeze.wrap()
            # The old DDP wrapper's reducer hooks every non-backbone parameter: it must be gone
            # before the next backward, or those gradients would be reduced twice.
            gc.collect()
            trainer.frozen = freeze.frozen_module()
            if rank == 0:
                print(f"epoch {epoch_number}: the backbone is unfrozen", flush=True)
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        on_step = _StepHook(epoch_number, steps_per_epoch, options.log_every, cfg.train.batch_size * world,
                            progress, trainer, tracker, failure if resume is None else None, rank)
        train = trainer.train_epoch(train_loader, on_step=on_step)
        seconds = time.perf_counter() - epoch_start
        losses = _mean_over_ranks({k: train[k] for k in ("loss", "loss_loc", "loss_conf")}, device)
        metrics = {"epoch": epoch_number, "step": trainer.iteration, **losses, "lr": train["lr"],
                   "images_per_s": train["images"] * world / max(seconds, 1e-9), "epoch_seconds": seconds,
                   SCORE: NOT_EVALUATED}

        evaluated = epoch_number % cfg.train.eval_every == 0 or epoch_number == epochs
        if evaluated:
            eval_start = time.perf_counter()
            coco, voc = evaluation.run(unwrap(model))
            if rank == 0:
                metrics.update(flat_metrics(coco | ({"VOC07": voc} if voc is not None else {}), finite_only=False))
                sample = evaluation.sample(unwrap(model), options.sample_images)
                _log_eval_artifacts(tracker, epoch_number, coco, voc, evaluation.classes, sample)
            progress.eval_seconds += time.perf_counter() - eval_start
        if evaluated and metrics[SCORE] > best:
            best = metrics[SCORE]
        metrics["best_mAP"] = best

        if tracker is not None:
            tracker.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")
                                 and not (k in (SCORE, "best_mAP") and v == NOT_EVALUATED)}, step=epoch_number)
        progress.epoch(epoch_number, metrics, seconds)

        save = functools.partial(
            save_checkpoint, model=model, epoch=epoch_number, step=trainer.iteration, config=cfg,
            classes=list(train_set.classes), optimizer=optimizer, scheduler=scheduler,
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            extra={"mlflow_run_id": options.mlflow_run_id, "world_size": world,
                   "train_data": options.train_data, "val_data": options.val_data})
        if report is not None:
            report(dict(metrics), save if rank == 0 else None)
    return metrics
