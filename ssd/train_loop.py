"""The training loop with hooks, as detectron2's ``TrainerBase``: a short loop, every concern a hook.

    loop = TrainLoop(step_runner, loader, hooks=[...])
    loop.train(start_epoch=0, epochs=10)                 # 10 passes over the loader
    loop.train(start_epoch=0, epochs=4, max_iters=100)   # ... ending after optimizer step 100

The loop runs epochs of steps and keeps the state hooks read (epoch, step, the last step's
metrics, the epoch's running means); everything else (seeding, backbone freezing, progress
lines, MLflow, evaluation, checkpoints, failure injection) is a :class:`HookBase` subclass in
``ssd.train_hooks``, called in list order at each point.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from ssd.engine import Batch, MeanMeter, StepMetrics, StepRunner


class HookBase:
    """A hook: override any of the six points. ``self.loop`` is set when the loop takes it."""

    loop: TrainLoop

    def before_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_epoch(self) -> None: ...

    def after_train(self) -> None: ...


class TrainLoop:
    """Epochs of ``runner.step`` over ``loader`` with hooks around every epoch and step.

    State for hooks: ``epoch`` (0-based), ``epoch_number`` (1-based), ``step`` (1-based within
    the epoch), ``step_metrics`` (the last step's losses as detached 0-d device tensors, and
    the float lr: ``ssd.engine.metrics_to_host`` reads them), ``meter`` (the epoch's running
    means, summed on the device), ``epoch_metrics`` (what ``after_epoch`` hooks fill in, in
    order), ``epochs``, ``steps_per_epoch`` (of a full pass), ``epoch_steps`` (of this epoch:
    fewer in a last epoch that ``max_iters`` cuts short), ``max_iters``.
    """

    def __init__(self, runner: StepRunner, loader: Iterable[Batch], hooks: Sequence[HookBase] = (),
                 steps_per_epoch: int | None = None) -> None:
        self.runner, self.loader = runner, loader
        self.steps_per_epoch = steps_per_epoch if steps_per_epoch is not None else len(loader)  # type: ignore[arg-type]
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.loop = self
        self.epoch = self.step = 0
        self.epochs = self.epoch_steps = 0
        self.max_iters: int | None = None
        self.step_metrics: StepMetrics = {}
        self.epoch_metrics: dict[str, Any] = {}
        self.meter = MeanMeter()

    @property
    def epoch_number(self) -> int:
        return self.epoch + 1

    @property
    def last_epoch(self) -> bool:
        """Whether the current epoch is the run's last (the last of ``epochs``, or the one in
        which the runner reaches ``max_iters``)."""
        return self.epoch_number >= self.epochs or (
            self.max_iters is not None and self.runner.iteration + self.epoch_steps - self.step >= self.max_iters)

    def _call(self, point: str) -> None:
        for hook in self.hooks:
            getattr(hook, point)()

    def train(self, start_epoch: int, epochs: int, max_iters: int | None = None, start_step: int = 0) -> dict[str, Any]:
        """Run epochs ``start_epoch`` .. ``epochs - 1``; with ``max_iters``, stop as soon as the
        runner has made that many optimizer steps (``runner.iteration``), possibly mid-epoch:
        that epoch's ``after_epoch`` hooks still run, and it is the last. Returns the last
        epoch's metrics.

        ``start_step``: the first epoch starts after that many of its batches (a checkpoint
        taken mid-epoch); the loader's ``skip_next`` passes over them without decoding (a loader
        without it is read and the batches dropped). Its epoch metrics cover the steps run here.

        Steps never wait for the device; a non-finite loss raises ``FloatingPointError`` at the
        next log point (``StepProgress``) or, at the latest, at the epoch's end, before any
        ``after_epoch`` hook (evaluation, checkpoint) sees the broken weights."""
        self.epochs, self.max_iters = epochs, max_iters
        self._call("before_train")
        for self.epoch in range(start_epoch, epochs):
            left = None if max_iters is None else max_iters - self.runner.iteration
            if left is not None and left <= 0:
                break
            skip, start_step = start_step, 0
            self.epoch_steps = self.steps_per_epoch if left is None else min(self.steps_per_epoch, skip + left)
            self.epoch_metrics, self.meter, self.step = {}, MeanMeter(), skip
            self._call("before_epoch")
            announce = getattr(self.loader, "set_next_epoch", None)
            if announce is not None:  # its workers start before this epoch's end hooks run
                announce(None if self.last_epoch else self.epoch + 1)
            batches: Iterable[Batch] = self.loader
            if skip and hasattr(self.loader, "skip_next"):
                self.loader.skip_next(skip)
            elif skip:
                batches = itertools.islice(self.loader, skip, None)
            for images, targets in batches:
                self.step += 1
                self._call("before_step")
                self.step_metrics = self.runner.step(images, targets)
                self.meter.add(self.step_metrics, images.shape[0])
                self._call("after_step")
                if self.step >= self.epoch_steps < self.steps_per_epoch:  # max_iters reached mid-epoch
                    break
            self.runner.check_finite()
            self._call("after_epoch")
        self._call("after_train")
        return self.epoch_metrics
