"""The hooks of one rank's training run (``ssd.train_loop``), one concern each.

In the order ``ssd.training.run_training`` installs them:

- :class:`EpochSeed`: the RNG seed and data order of each epoch depend only on (seed, epoch, rank);
- :class:`BackboneFreeze`: the backbone frozen for the first K epochs, then trained;
- :class:`StepProgress`: step lines with throughput and ETA, step metrics to MLflow;
- :class:`InjectedFailure`: a rank exits abruptly at a given step (fault-tolerance tests);
- :class:`EpochSummary`: the epoch's losses averaged over ranks;
- :class:`PeriodicEvaluation`: validation every K epochs or within a time budget, always at the end;
- :class:`EpochLog`: epoch metrics to MLflow and the epoch line;
- :class:`CheckpointReport`: ``report(metrics, save)`` once per epoch and, if asked, every N
  iterations or minutes mid-epoch (Ray Train's checkpoints).
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ssd.checkpoint import TrainingState, snapshot, unwrap, write_checkpoint
from ssd.data.streaming import epoch_seed
from ssd.engine import metrics_to_host
from ssd.train_loop import HookBase

#: the checkpoint score: COCO AP@[.5:.95] on the validation shards
SCORE = "mAP"
#: the score of an epoch without evaluation (and the best score before the first): below any
#: real mAP, so Ray keeps evaluated checkpoints first. Not NaN: Ray 2.60 stores NaN metrics as
#: null in its checkpoint snapshot, and a resumed run then fails comparing None scores.
NOT_EVALUATED = -1.0

SaveFn = Callable[[Path], Path]
ReportFn = Callable[[dict[str, Any], SaveFn | None], None]


def world() -> tuple[int, int]:
    """(rank, world size) of ``torch.distributed``, (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks (identity in one process)."""
    if world()[1] == 1:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class EpochSeed(HookBase):
    """Seeds the epoch (augmentation draws) and sets the loader's epoch (shard order)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def before_epoch(self) -> None:
        torch.manual_seed(epoch_seed(self.seed, self.loop.epoch, self.rank))
        self.loop.loader.set_epoch(self.loop.epoch)


class BackboneFreeze(HookBase):
    """Keeps ``model.backbone`` frozen for the first ``epochs`` epochs.

    Frozen parameters have ``requires_grad=False``: no gradient is computed (the backward pass
    stops at the extras), SGD skips them (no weight decay or momentum either), and BatchNorm in
    the backbone runs in eval mode (``StepRunner.frozen``). DDP only synchronises the parameters
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
        if world()[1] == 1:
            return self.model
        # after the memory-format change: DDP's gradient buckets take the parameters' strides
        return nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def before_epoch(self) -> None:
        if not self.set_epoch(self.loop.epoch):
            return
        # the backbone thaws: it trains from this epoch on
        self.loop.runner.model = self.wrap()
        # The old DDP wrapper's reducer hooks every non-backbone parameter: it must be gone
        # before the next backward, or those gradients would be reduced twice.
        gc.collect()
        self.loop.runner.frozen = self.frozen_module()
        if world()[0] == 0:
            print(f"epoch {self.loop.epoch_number}: the backbone is unfrozen", flush=True)


class Progress:
    """Rank 0's console lines: step progress with throughput and ETA, epoch summaries.

    ``total_iters``: the run's optimizer steps (``ssd.schedule.SchedulePlan.iterations``); None:
    ``epochs`` full epochs of ``steps_per_epoch``."""

    def __init__(self, epochs: int, steps_per_epoch: int, enabled: bool, total_iters: int | None = None) -> None:
        self.epochs, self.steps = epochs, steps_per_epoch
        self.total_iters = total_iters if total_iters is not None else epochs * steps_per_epoch
        self.enabled = enabled
        self.start = time.perf_counter()
        self.steps_done = 0  # in this process (a resumed run's ETA uses its own pace)
        self.eval_seconds = 0.0

    def eta(self, epoch: int, step: int) -> float:
        """Seconds left: remaining steps at this process's mean step time, evaluation included."""
        elapsed = time.perf_counter() - self.start - self.eval_seconds
        per_step = elapsed / max(self.steps_done, 1)
        # every epoch before the current one was a full one
        remaining = max(self.total_iters - (epoch - 1) * self.steps - step, 0)
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


class StepProgress(HookBase):
    """Every ``log_every`` steps (and at an epoch's last): the progress line and, with a tracker,
    the step metrics with the global throughput since the last line. The only place a step's
    device metrics are read (and a non-finite loss since the last line raises: ``check_finite``)."""

    def __init__(self, progress: Progress, log_every: int, global_batch: int, tracker: Any | None) -> None:
        self.progress, self.log_every, self.global_batch, self.tracker = progress, log_every, global_batch, tracker

    def before_epoch(self) -> None:
        self.window_start, self.window_steps = time.perf_counter(), 0

    def after_step(self) -> None:
        self.progress.steps_done += 1
        self.window_steps += 1
        step = self.loop.step
        if step % self.log_every == 0 or step == self.loop.epoch_steps:
            self.loop.runner.check_finite()
            metrics = metrics_to_host(self.loop.step_metrics)
            rate = self.window_steps * self.global_batch / max(time.perf_counter() - self.window_start, 1e-9)
            self.progress.step(self.loop.epoch_number, step, metrics, rate)
            if self.tracker is not None:
                self.tracker.log_metrics({f"train/{k}": v for k, v in metrics.items()}
                                         | {"train/images_per_s": rate}, step=self.loop.runner.iteration)
            self.window_start, self.window_steps = time.perf_counter(), 0


class InjectedFailure(HookBase):
    """Rank ``rank`` exits abruptly (``os._exit``) after step ``step`` of epoch ``epoch`` (1-based):
    how the fault-tolerance tests kill a worker."""

    def __init__(self, epoch: int, step: int, rank: int) -> None:
        self.epoch, self.step, self.rank = epoch, step, rank

    def after_step(self) -> None:
        if (self.loop.epoch_number, self.loop.step, world()[0]) != (self.epoch, self.step, self.rank):
            return
        # Wait first: Ray Train's controller registers a reported checkpoint when it next
        # polls the workers (every 2 s); a death before that loses the epoch's checkpoint.
        time.sleep(3.0)
        print(f"injected failure: rank {self.rank} exits at epoch {self.epoch} step {self.step}", flush=True)
        os._exit(17)


class EpochSummary(HookBase):
    """The epoch's metrics: losses averaged over ranks, lr, global images/s, seconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def before_epoch(self) -> None:
        self.start = time.perf_counter()

    def after_epoch(self) -> None:
        seconds = time.perf_counter() - self.start
        means = self.loop.meter.means()
        losses = mean_over_ranks({k: means[k] for k in ("loss", "loss_loc", "loss_conf")}, self.device)
        self.loop.epoch_metrics.update(
            {"epoch": self.loop.epoch_number, "step": self.loop.runner.iteration, **losses, "lr": means["lr"],
             "images_per_s": means["images"] * world()[1] / max(seconds, 1e-9), "epoch_seconds": seconds,
             SCORE: NOT_EVALUATED})


#: the first "auto" decision's guess of an evaluation's time per validation image, in training
#: time per image. A forward pass alone is ~1/3 of a training step, but decoding the full-size
#: JPEGs, NMS and pycocotools run on the CPU whatever the model: measured here (make demo, tiny on
#: 2 cores) an evaluation cost 2.6x a training image per image; on a GPU the CPU share only
#: grows. Erring high delays the first evaluation by an epoch or two; every later decision uses
#: the last evaluation's measured time.
EVAL_COST_GUESS = 2.0


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Each value's maximum over the ranks (identity in one process): a decision every rank
    takes from them is the same on all."""
    if world()[1] == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def within_budget(train_seconds: float, eval_seconds: float, next_eval: float, budget: float) -> bool:
    """Whether one more evaluation of ``next_eval`` seconds keeps evaluation's share of the wall
    time, ``eval / (train + eval)``, within ``budget``."""
    spent = eval_seconds + next_eval
    return spent <= budget * (train_seconds + spent)


class PeriodicEvaluation(HookBase):
    """Validation after some epochs and always after the last (also one that ``max_iters`` cuts
    short); ``best_mAP``, ``eval_seconds`` and ``eval_share`` on every epoch.

    ``every``: an int K evaluates every K epochs; ``"auto"`` evaluates after an epoch whenever
    that keeps evaluation within ``budget`` of the wall time so far (:func:`within_budget`),
    judging an evaluation's time by the last one measured (before the first:
    ``first_eval_ratio`` times the epoch's training time). All ranks evaluate together, so the
    times are maxed over ranks first and every rank takes the same decision. Evaluations land at
    epoch ends because that is where a checkpoint is reported with its score.

    ``validation`` is a ``ssd.training.Validation``: ``run(model)`` (every rank; results on rank
    0) and ``sample(model, count)`` (a picture's worth of detections).
    """

    def __init__(self, validation: Any, every: int | str, best: float, progress: Progress, tracker: Any | None,
                 sample_images: int, budget: float = 0.1, first_eval_ratio: float = 0.1,
                 device: torch.device | None = None) -> None:
        self.validation, self.every, self.best = validation, every, best
        self.progress, self.tracker, self.sample_images = progress, tracker, sample_images
        self.budget, self.first_eval_ratio = budget, first_eval_ratio
        self.device = device or torch.device("cpu")
        self.train_seconds = self.eval_seconds = 0.0
        self.last_eval: float | None = None
        self.evaluations = 0

    def before_epoch(self) -> None:
        self.epoch_start = time.perf_counter()

    def should_evaluate(self, epoch_seconds: float) -> bool:
        if self.loop.last_epoch:
            return True
        if self.every != "auto":
            return self.loop.epoch_number % int(self.every) == 0
        guess = self.last_eval if self.last_eval is not None else self.first_eval_ratio * epoch_seconds
        train, spent, guess = max_over_ranks([self.train_seconds, self.eval_seconds, guess], self.device)
        return within_budget(train, spent, guess, self.budget)

    def after_epoch(self) -> None:
        epoch_seconds = time.perf_counter() - self.epoch_start
        self.train_seconds += epoch_seconds
        epoch, metrics = self.loop.epoch_number, self.loop.epoch_metrics
        seconds = 0.0
        if self.should_evaluate(epoch_seconds):
            start = time.perf_counter()
            model = unwrap(self.loop.runner.model)
            results = self.validation.run(model)
            if results is not None:  # rank 0
                metrics.update(results.metrics)
                sample = self.validation.sample(model, self.sample_images)
                log_eval_artifacts(self.tracker, epoch, results, self.validation.classes, sample)
            seconds = self.last_eval = time.perf_counter() - start
            self.eval_seconds += seconds
            self.evaluations += 1
            self.progress.eval_seconds += seconds
            self.best = max(self.best, metrics[SCORE])
        metrics["best_mAP"] = self.best
        metrics["eval_seconds"] = seconds
        metrics["eval_share"] = self.eval_seconds / max(self.train_seconds + self.eval_seconds, 1e-9)

    def after_train(self) -> None:
        if world()[0] == 0 and self.evaluations:
            total = self.train_seconds + self.eval_seconds
            print(f"evaluation: {self.evaluations} run(s), {self.eval_seconds:.1f} s of {total:.1f} s "
                  f"({100 * self.eval_seconds / max(total, 1e-9):.1f} % of the wall time in this process)", flush=True)


def log_eval_artifacts(tracker: Any, epoch: int, results: Any, classes: list[str], sample: tuple | None) -> None:
    """Per-class AP table, PR curves and a detection grid into the run's ``eval/epoch-NNN``."""
    from ssd.reporting import write_eval_report  # matplotlib: only when there is a tracker

    if tracker is None or not tracker.active:
        return
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = write_eval_report(Path(tmp), results.coco, classes, voc=results.voc, sample=sample)
        except Exception as err:  # noqa: BLE001 - a failed picture must not stop training
            print(f"warning: could not draw the evaluation report: {err}", file=sys.stderr, flush=True)
            return
        for path in paths:
            tracker.log_artifact(path, f"eval/epoch-{epoch:03d}")


class EpochLog(HookBase):
    """The epoch's metrics to MLflow (``epoch/...``, unevaluated scores left out) and its line."""

    def __init__(self, progress: Progress, tracker: Any | None) -> None:
        self.progress, self.tracker = progress, tracker

    def after_epoch(self) -> None:
        metrics = self.loop.epoch_metrics
        if self.tracker is not None:
            self.tracker.log_metrics({f"epoch/{k}": v for k, v in metrics.items() if k not in ("epoch", "step")
                                      and not (k in (SCORE, "best_mAP") and v == NOT_EVALUATED)},
                                     step=self.loop.epoch_number)
        self.progress.epoch(self.loop.epoch_number, metrics, metrics["epoch_seconds"])


class CheckpointReport(HookBase):
    """Calls ``report(metrics, save)`` on every rank after every epoch, and mid-epoch every
    ``every_iters`` optimizer steps and/or after ``every_minutes`` since the last checkpoint.
    ``save(path)`` (rank 0 only, None elsewhere) writes the checkpoint (model, optimizer,
    schedule, metrics, ``extra``) from host copies taken when ``report`` was called, so it may
    run in a background thread while training goes on (``ssd.distributed.trainer`` does that).

    A mid-epoch report's metrics are ``epoch`` (epochs completed), ``step`` (the iteration),
    ``epoch_step`` (batches of the current epoch trained: a resumed run passes over them),
    ``mAP`` = ``NOT_EVALUATED`` and ``best_mAP``. Every rank must take the same decision
    (``report`` is a barrier in Ray Train): the iteration rule is the same everywhere, and the
    time rule is checked at log points only, on the elapsed time maxed over the ranks.
    """

    def __init__(self, report: ReportFn, cfg: Any, classes: list[str],
                 optimizer: torch.optim.Optimizer, scheduler: Any, extra: dict[str, Any], *,
                 best: float = NOT_EVALUATED, log_every: int = 20, device: torch.device | None = None) -> None:
        self.report, self.cfg, self.classes = report, cfg, classes
        self.optimizer, self.scheduler, self.extra = optimizer, scheduler, extra
        self.every_iters = int(cfg.train.checkpoint_every_iters)
        self.every_seconds = 60.0 * float(cfg.train.checkpoint_every_minutes)
        self.best, self.log_every = best, max(1, log_every)
        self.device = device or torch.device("cpu")
        self.last_save = time.perf_counter()

    def _save_fn(self, metrics: dict[str, Any], epoch: int, epoch_step: int) -> SaveFn | None:
        if world()[0] != 0:
            return None
        state = snapshot(
            model=self.loop.runner.model, epoch=epoch, step=self.loop.runner.iteration, epoch_step=epoch_step,
            config=self.cfg, classes=self.classes, optimizer=self.optimizer, scheduler=self.scheduler,
            scaler=self.loop.runner.scaler,  # fp16's loss scale (None otherwise)
            metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))}, extra=self.extra)
        return functools.partial(_write, state=state)

    def _due_mid_epoch(self) -> bool:
        loop = self.loop
        if loop.step >= loop.epoch_steps:  # the epoch's end reports anyway
            return False
        if self.every_iters and loop.runner.iteration % self.every_iters == 0:
            return True
        if self.every_seconds and loop.step % self.log_every == 0:
            elapsed = max_over_ranks([time.perf_counter() - self.last_save], self.device)[0]
            return elapsed >= self.every_seconds
        return False

    def after_step(self) -> None:
        if not self._due_mid_epoch():
            return
        self.loop.runner.check_finite()  # never a checkpoint of broken weights
        metrics = {"epoch": self.loop.epoch, "step": self.loop.runner.iteration, "epoch_step": self.loop.step,
                   SCORE: NOT_EVALUATED, "best_mAP": self.best}
        self.report(dict(metrics), self._save_fn(metrics, self.loop.epoch, self.loop.step))
        self.last_save = time.perf_counter()

    def after_epoch(self) -> None:
        metrics = self.loop.epoch_metrics
        self.best = metrics.get("best_mAP", self.best)
        self.report(dict(metrics), self._save_fn(metrics, self.loop.epoch_number, 0))
        self.last_save = time.perf_counter()


def _write(path: Path, state: TrainingState) -> Path:
    return write_checkpoint(path, state)
