"""Training and evaluation loops in plain PyTorch (no Ray): each returns a dict of metrics.

The step is short, as detectron2's ``SimpleTrainer.run_step``: batch -> targets from the model's box
coding on the device -> forward -> loss dict -> backward -> optimizer and LR-schedule step.
Evaluation, checkpoints and logging are hooks around it (``ssd.train_loop``, ``ssd.train_hooks``).
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


class MeanMeter:
    """Running means of step metrics and the image throughput of one epoch."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.steps = self.images = 0
        self.start = time.perf_counter()

    def add(self, metrics: dict[str, float], images: int) -> None:
        self.steps += 1
        self.images += images
        for key, value in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + value

    def means(self) -> dict[str, float]:
        """Mean of every metric, plus ``steps``, ``images`` and ``images_per_s``."""
        elapsed = time.perf_counter() - self.start
        out = {key: value / max(self.steps, 1) for key, value in self.totals.items()}
        return out | {"steps": self.steps, "images": self.images,
                      "images_per_s": self.images / max(elapsed, 1e-9)}


class StepRunner:
    """Owns the model, loss and optimizer of one process and runs the step.

    Args:
        model: an SSD returning (loc (B,P,4), logits (B,P,C)); may be DDP-wrapped. Its box
            coding (``model.coding``: priors, matcher, coder) makes the step's targets.
        cfg: the resolved run config.
        device: where the step runs; targets are matched there.
        amp_dtype: autocast dtype (torch.bfloat16 on GPUs that have it) or None for fp32.
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
        self.iteration = 0
        #: a part of the model kept in eval mode while training (a frozen backbone's BatchNorm
        #: statistics stay fixed); None: everything trains
        self.frozen: nn.Module | None = None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def step(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, float]:
        """One optimisation step on a batch; targets hold ``boxes`` in [0, 1] and ``labels``."""
        images = network_input(images, self.cfg, self.device, self.memory_format)
        padded = pad_targets([t["boxes"] for t in targets], [t["labels"] for t in targets], self.device)
        labels, box_targets = self.coding.targets(*padded)
        self.model.train()
        if self.frozen is not None:
            self.frozen.eval()
        with self._autocast():
            loc, logits = self.model(images)
        losses = self.criterion(loc, logits, labels, box_targets)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss {loss.item()} at iteration {self.iteration} "
                f"(loss_loc={losses['loss_loc'].item()}, loss_conf={losses['loss_conf'].item()}); "
                "lower optim.lr, raise optim.warmup_iters or set optim.grad_clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        return {k: float(v.detach()) for k, v in losses.items()} | {"lr": self.optimizer.param_groups[0]["lr"]}

    def train_epoch(
        self,
        batches: Iterable[Batch],
        max_steps: int | None = None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
    ) -> dict[str, float]:
        """Run steps over ``batches`` (at most ``max_steps``); returns the epoch's mean losses
        and throughput (:class:`MeanMeter`). The training loop with hooks is ``ssd.train_loop``."""
        meter = MeanMeter()
        for images, targets in batches:
            if max_steps is not None and meter.steps >= max_steps:
                break
            metrics = self.step(images, targets)
            meter.add(metrics, images.shape[0])
            if on_step is not None:
                on_step(meter.steps, metrics)
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
