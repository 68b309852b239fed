"""Training and evaluation loops in plain PyTorch (no Ray): each returns a dict of metrics.

The step is short, as detectron2's ``SimpleTrainer.run_step``: batch -> targets from the model's box
coding on the device -> forward -> loss dict -> backward -> optimizer and LR-schedule step.
Evaluation, checkpoints and logging are hooks around it (``ssd.train_loop``, ``ssd.train_hooks``).

The step never waits for the device: targets, loss and metrics stay device tensors, and a
non-finite loss only sets a device flag. The host reads them where it logs anyway
(:meth:`StepRunner.check_finite`, :meth:`MeanMeter.means`, ``ssd.train_hooks.StepProgress``),
so a GPU can run ahead of Python by many steps. The one exception is fp16's GradScaler, whose
``step`` reads its overflow flag (PyTorch's own sync; bf16 and fp32 need no scaler).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ssd.checkpoint import unwrap
from ssd.coding import BoxCoding
from ssd.config import Config, OptimConfig
from ssd.loss import MultiBoxLoss
from ssd.matching import pad_targets
from ssd.postprocess import PostprocessConfig
from ssd.schedule import effective_warmup, lr_drop_iters
from ssd.transforms import normalize

Batch = tuple[Tensor, list[dict[str, Tensor]]]
#: a step's metrics: 0-d device tensors (detached losses, ``num_pos``) and the Python float ``lr``
StepMetrics = dict[str, Tensor | float]
#: the losses a step reports, in the order the non-finite record keeps them
LOSS_KEYS = ("loss", "loss_loc", "loss_conf")


def collate(samples: list[tuple[Tensor, dict[str, Tensor]]]) -> Batch:
    """Stack same-size images (B, 3, S, S); targets stay a list (box counts differ)."""
    images, targets = zip(*samples)
    return torch.stack(images), list(targets)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay (paper section 3: lr 1e-3, momentum 0.9, wd 5e-4)."""
    return torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )


def lr_factor(cfg: OptimConfig, iteration: int, total_iters: int, drops: tuple[int, ...] | None = None) -> float:
    """Multiplier of the base lr at step ``iteration`` (0-based) of ``total_iters``: linear
    warm-up, then multi-step decay (``gamma`` at each of ``ssd.schedule.lr_drop_iters``, or
    ``drops`` when given) or cosine to zero. The linear-scaling factor is not in it
    (:func:`build_scheduler` applies it)."""
    warmup = effective_warmup(cfg, total_iters)
    if iteration < warmup:
        return (iteration + 1) / (warmup + 1)
    if cfg.schedule == "cosine":
        progress = (iteration - warmup) / max(total_iters - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "multistep":
        drops = lr_drop_iters(cfg, total_iters) if drops is None else drops
        return cfg.gamma ** sum(iteration >= d for d in drops)
    raise ValueError(f"optim.schedule must be 'multistep' or 'cosine', got {cfg.schedule!r}")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_iters: int, lr_scale: float = 1.0,
    drops: tuple[int, ...] | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration schedule (call ``step()`` after every optimizer step): the optimizer's lr
    times ``lr_scale`` (the linear scaling rule, ``ssd.schedule.SchedulePlan.lr_scale``) times
    :func:`lr_factor`, dropping at ``drops`` (``SchedulePlan.lr_drops``; None: from ``cfg``)."""
    drops = lr_drop_iters(cfg, total_iters) if drops is None else drops
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_scale * lr_factor(cfg, it, total_iters, drops)
    )


def network_input(
    images: Tensor, cfg: Config, device: torch.device, memory_format: torch.memory_format
) -> Tensor:
    """A loader batch (B, 3, S, S) -> the model's input on ``device``.

    uint8 batches (``build_transform(normalize=False)``) are moved as bytes and normalised on the
    device with ``cfg.augment``'s mean, std and input convention (BGR for ``caffe_bgr``); float
    batches are taken as already normalised.
    """
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize(images, cfg.augment.mean, cfg.augment.std, cfg.augment.input_convention)
    return images.contiguous(memory_format=memory_format)


def metrics_to_host(metrics: dict[str, Tensor | float]) -> dict[str, float]:
    """Python floats of a metrics dict: every tensor value read in one transfer (one sync)."""
    keys = [k for k, v in metrics.items() if isinstance(v, Tensor)]
    values = torch.stack([metrics[k].detach().float() for k in keys]).tolist() if keys else []
    return {k: float(v) for k, v in metrics.items() if not isinstance(v, Tensor)} | dict(zip(keys, values, strict=True))


class MeanMeter:
    """Running means of step metrics and the image throughput of one epoch.

    Tensor metrics (0-d, on the step's device) are summed on the device, so :meth:`add` never
    waits for it; :meth:`means` reads them all in one transfer."""

    def __init__(self) -> None:
        self.totals: dict[str, Tensor | float] = {}
        self.steps = self.images = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, Tensor | float], images: int) -> None:
        self.steps += 1
        self.images += images
        for key, value in metrics.items():
            if isinstance(value, Tensor):  # float64: thousands of float32 steps summed stay exact
                value = value.detach().to(torch.float64)
            self.totals[key] = self.totals[key] + value if key in self.totals else value

    def means(self) -> dict[str, float]:
        """Mean of every metric, plus ``steps``, ``images`` and ``images_per_s`` (a host sync)."""
        elapsed = time.perf_counter() - self.start
        totals = metrics_to_host(self.totals)
        out = {key: totals[key] / max(self.steps, 1) for key in self.totals}
        return out | {"steps": self.steps, "images": self.images,
                      "images_per_s": self.images / max(elapsed, 1e-9)}


class StepRunner:
    """Owns the model, loss and optimizer of one process and runs the step.

    Args:
        model: an SSD returning (loc (B,P,4), logits (B,P,C)); may be DDP-wrapped. Its box
            coding (``model.coding``: priors, matcher, coder) makes the step's targets.
        cfg: the resolved run config.
        device: where the step runs; targets are matched there.
        amp_dtype: autocast dtype (torch.bfloat16 on GPUs that have it, torch.float16 with a
            GradScaler, ``scaler``, on those without) or None for fp32.

    With ``cfg.train.compile`` the model's forward and the loss run through ``torch.compile``
    (the model is compiled again when a hook replaces ``model``, e.g. DDP re-wrapping at a
    backbone thaw). On CUDA, ``cudnn.benchmark`` is switched on: the input size is fixed
    (``priors.image_size``), so the autotuned convolution algorithms are chosen once.

    A non-finite loss does not stop the step (that would need a host sync every step): it is
    recorded on the device and :meth:`check_finite`, called at log points and epoch ends,
    raises ``FloatingPointError`` naming the first bad iteration and its losses.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: Config,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(memory_format=self.memory_format)
        self.cfg = cfg
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.amp_dtype = amp_dtype
        self.coding: BoxCoding = unwrap(model).coding
        self.criterion = MultiBoxLoss(cfg.loss.neg_ratio, cfg.loss.loc_weight)
        self.compile = bool(cfg.train.compile)
        self._loss = torch.compile(self.criterion) if self.compile else self.criterion
        self._compiled: nn.Module | None = None  # torch.compile(self.model), made on first use
        self._compiled_for: nn.Module | None = None  # the model it wraps
        #: fp16's loss scaler (bf16 and fp32 need none); its state belongs in checkpoints
        self.scaler = torch.amp.GradScaler(self.device.type) if amp_dtype == torch.float16 else None
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: autotune convolutions once
        self.iteration = 0
        #: a part of the model kept in eval mode while training (a frozen backbone's BatchNorm
        #: statistics stay fixed); None: everything trains
        self.frozen: nn.Module | None = None
        # The non-finite record, on the device: the first bad iteration (-1: none) and its
        # LOSS_KEYS values; the first iteration that check_finite has not looked at yet.
        self._bad_iteration = torch.full((), -1, dtype=torch.long, device=self.device)
        self._bad_losses = torch.zeros(len(LOSS_KEYS), device=self.device)
        self._unchecked_from: int | None = None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The model on (B, 3, S, S) -> loc (B, P, 4), logits (B, P, C); compiled if asked."""
        if not self.compile:
            return self.model(images)
        if self._compiled_for is not self.model:  # first call, or a hook swapped the model
            self._compiled, self._compiled_for = torch.compile(self.model), self.model
        return self._compiled(images)

    def _record_nonfinite(self, losses: dict[str, Tensor]) -> None:
        """Keep the first non-finite step's iteration and losses, on the device (no sync)."""
        values = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])  # (3,)
        first = torch.logical_not(torch.isfinite(values).all()) & (self._bad_iteration < 0)
        self._bad_iteration = torch.where(first, self.iteration, self._bad_iteration)
        self._bad_losses = torch.where(first, values, self._bad_losses)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if any step since the start had a non-finite loss.

        One host sync: call it where the host waits anyway (log points, epoch ends), never per
        step. The steps after the bad one have run (on NaN weights); nothing was saved since.
        """
        record = torch.cat((self._bad_iteration.reshape(1).double(), self._bad_losses.double())).tolist()
        since = self._unchecked_from if self._unchecked_from is not None else self.iteration
        self._unchecked_from = self.iteration
        bad_iteration, loss, loss_loc, loss_conf = record
        if bad_iteration < 0:
            return
        raise FloatingPointError(
            f"non-finite loss {loss} at iteration {int(bad_iteration)} "
            f"(loss_loc={loss_loc}, loss_conf={loss_conf}; found by the check of iterations "
            f"{since}..{self.iteration - 1}); "
            "lower optim.lr, raise optim.warmup_iters or set optim.grad_clip"
        )

    def step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> StepMetrics:
        """One optimisation step on a batch, without waiting for the device.

        Args:
            images: (B, 3, S, S) uint8 or normalised float (:func:`network_input`).
            targets: B dicts with ``boxes`` (G_i, 4) xyxy in [0, 1] and ``labels`` (G_i,) int64.
        Returns:
            ``loss``, ``loss_loc``, ``loss_conf``, ``num_pos``: detached 0-d tensors on the
            device (read them at log points: :func:`metrics_to_host`); ``lr``: a float.
        """
        images = network_input(images, self.cfg, self.device, self.memory_format)
        padded = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], self.device)
        if self._unchecked_from is None:
            self._unchecked_from = self.iteration
        labels, box_targets = self.coding.targets(*padded)
        self.model.train()
        if self.frozen is not None:
            self.frozen.eval()
        with self._autocast():
            loc, logits = self._forward(images)
        losses = self._loss(loc, logits, labels, box_targets)
        loss = losses["loss"]
        self._record_nonfinite(losses)
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.cfg.optim.grad_clip
        if self.scaler is None:
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        else:  # fp16: scaled gradients; the scaler skips a step whose gradients overflowed
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)  # clip the true gradients
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return {k: v.detach() for k, v in losses.items()} | {"lr": self.optimizer.param_groups[0]["lr"]}

    def train_epoch(
        self,
        batches: Iterable[Batch],
        max_steps: int | None = None,
        on_step: Callable[[int, StepMetrics], None] | None = None,
    ) -> dict[str, float]:
        """Run steps over ``batches`` (at most ``max_steps``); returns the epoch's mean losses
        and throughput (:class:`MeanMeter`), after :meth:`check_finite`. The training loop with
        hooks is ``ssd.train_loop``."""
        meter = MeanMeter()
        for images, targets in batches:
            if max_steps is not None and meter.steps >= max_steps:
                break
            metrics = self.step(images, targets)
            meter.add(metrics, images.shape[0])
            if on_step is not None:
                on_step(meter.steps, metrics)
        self.check_finite()
        return meter.means()


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    params: PostprocessConfig,
    image_sizes: Tensor | None = None,
    amp_dtype: torch.dtype | None = None,
) -> list[dict[str, Tensor]]:
    """Detections for a batch of network-ready images (B, 3, S, S); boxes in pixels of
    ``image_sizes`` ((B, 2) height, width) or in [0, 1] when it is None. Decoded by the model's
    own box coding (``model.coding``), the one its training targets were encoded with. With
    ``amp_dtype`` the network runs under autocast; its outputs are decoded in float32."""
    model.eval()
    if amp_dtype is None:
        loc, logits = model(images)
    else:
        with torch.autocast(images.device.type, dtype=amp_dtype):
            loc, logits = model(images)
        loc, logits = loc.float(), logits.float()
    return unwrap(model).coding.detect(loc, logits, params, image_sizes=image_sizes)
