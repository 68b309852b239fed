"""A run's batch, length and learning-rate schedule, from its config, its data size and its
number of workers: one pure function (:func:`plan_schedule`) that the driver (MLflow params,
``ssd.publish.start_tracking``; the checks before Ray starts, ``ssd.jobs``) and every rank
(``ssd.training.run_training``: loader batch, number of steps, LR schedule, the "recipe" block)
call, so that both agree.

The rules (the SSD references: batch 32 in total, 120k iterations, lr drops at 80k and 100k):

- ``train.batch_size`` is the GLOBAL batch: each of the ``world_size`` workers takes
  ``batch_size / world_size`` images per step; a batch that does not split evenly is an error
  naming both numbers.
- The length is in optimizer steps (iterations). ``train.max_iters`` gives it directly;
  ``train.epochs`` is a shorthand for ``epochs * floor(train samples / global batch)``
  iterations, the same with 1 or N workers. Exactly one of the two is set (``ssd.config``).
- LR drops (multistep) are at ``optim.lr_steps`` (absolute iterations) or at
  ``ceil(fraction * iterations)`` for each of ``optim.milestones``; warm-up is
  ``optim.warmup_iters`` linear steps (never the whole run).
- Linear scaling (Goyal et al. 2017): with ``optim.reference_batch`` set, the lr is the one for
  that batch and the run uses ``lr * global batch / reference_batch``, warm-up kept. A length in
  iterations (``train.max_iters``, ``optim.lr_steps``) is then the reference batch's too, and is
  scaled by ``reference_batch / global batch`` (rounded): the run sees the same number of images
  and drops the lr at the same points of the data, as the rule prescribes. Unset, the lr and the
  iterations are taken as they are.

Nothing here imports torch: a bad request is refused on the driver in milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ssd.config import Config, OptimConfig


class ScheduleError(ValueError):
    """A batch or schedule that does not fit the workers or the data; the message names the numbers."""


def per_worker_batch(global_batch: int, world_size: int) -> int:
    """``global_batch / world_size``; ScheduleError when it does not split evenly."""
    if world_size < 1:
        raise ScheduleError(f"the number of workers must be at least 1, got {world_size}")
    if global_batch % world_size:
        raise ScheduleError(
            f"train.batch_size={global_batch} does not split over {world_size} workers: train.batch_size is the "
            f"global batch, divided evenly among the workers; use a multiple of {world_size} "
            f"(e.g. {max(world_size, global_batch // world_size * world_size)}) or another number of workers")
    return global_batch // world_size


def lr_drop_iters(optim: OptimConfig, total_iters: int, length_scale: float = 1.0) -> tuple[int, ...]:
    """The iterations (0-based step index) from which the lr is multiplied by one more
    ``optim.gamma``: ``optim.lr_steps`` (times ``length_scale``, rounded), else
    ``ceil(m * total_iters)`` for each milestone fraction m. Empty for the cosine schedule."""
    if optim.schedule != "multistep":
        return ()
    if optim.lr_steps is not None:
        return tuple(max(1, round(int(step) * length_scale)) for step in optim.lr_steps)
    # rounded first: 0.67 * 100 is 67.00000000000001 in floats, and the drop is meant at 67; to
    # 3 decimals, so that a fraction written to 9 digits (2/3 as 0.666666667) lands exactly
    return tuple(math.ceil(round(m * total_iters, 3)) for m in optim.milestones)


def effective_warmup(optim: OptimConfig, total_iters: int) -> int:
    """The warm-up steps actually run: ``optim.warmup_iters``, at most ``total_iters - 1``."""
    return min(optim.warmup_iters, max(total_iters - 1, 0))


@dataclass(frozen=True)
class SchedulePlan:
    """A run's batch, length and lr schedule (see the module docstring for the rules)."""

    #: ``train.batch_size``: images per optimizer step, all workers together
    global_batch: int
    world_size: int
    #: images per step on each worker (the loader's batch)
    per_worker_batch: int
    train_samples: int
    #: iterations of one epoch: floor(train samples / global batch)
    iters_per_epoch: int
    #: optimizer steps of the whole run
    iterations: int
    #: ``iterations`` in epochs (a fraction when ``train.max_iters`` defines the length)
    epochs: float
    #: the key that defines the length: "train.epochs" or "train.max_iters"
    length_from: str
    #: reference batch / global batch when ``train.max_iters`` is for ``optim.reference_batch``
    #: (the linear scaling rule keeps the images seen), else 1
    length_scale: float
    #: ``optim.lr``, and the batch it is for (``optim.reference_batch``; None: this run's batch)
    lr: float
    reference_batch: int | None
    #: global batch / reference batch, and the lr the run uses: lr * lr_scale
    lr_scale: float
    lr_effective: float
    schedule: str
    #: multistep: the iterations from which the lr is multiplied by gamma once more
    lr_drops: tuple[int, ...]
    gamma: float
    #: warm-up steps actually run (linear up to ``lr_effective``)
    warmup_iters: int

    def params(self) -> dict[str, Any]:
        """The plan as MLflow params ``schedule.<field>`` (lists as JSON)."""
        return {f"schedule.{key}": json.dumps(list(value)) if isinstance(value, tuple) else value
                for key, value in asdict(self).items()}

    def recipe_lines(self, steps_per_pass: int | None = None, title: str | None = None,
                     extra: tuple[str, ...] = ()) -> list[str]:
        """The run's "recipe" block, as rank 0 prints it at the start. ``steps_per_pass``: the
        steps one pass over the data gives each worker (``ssd.data.sharding.steps_per_epoch``),
        mentioned when the shard split makes it shorter than an epoch's iterations. ``title``
        follows "recipe:" (the named recipe); ``extra`` lines (weights, evaluation, ...) end the
        block, indented as the others."""
        if self.reference_batch is None:
            lr = f"{self.lr_effective:g} (optim.lr, taken for this batch: optim.reference_batch unset)"
        elif self.lr_scale == 1:
            lr = f"{self.lr_effective:g} (optim.lr for batch {self.reference_batch}: no scaling)"
        else:
            lr = (f"{self.lr_effective:g} = {self.lr:g} x {self.global_batch}/{self.reference_batch} (linear scaling "
                  f"rule: optim.lr is for batch {self.reference_batch})")
        if self.schedule == "multistep":
            drops = ", ".join(f"{d}" + ("" if d < self.iterations else " (after the end)") for d in self.lr_drops)
            schedule = f"multistep, x{self.gamma:g} at iterations {drops}" if drops else "constant (no drops)"
        else:
            schedule = f"cosine to 0 at iteration {self.iterations}"
        workers = f"{self.world_size} worker{'s' if self.world_size > 1 else ''}"
        origin = self.length_from
        if self.length_scale != 1:
            origin += f" x {self.reference_batch}/{self.global_batch} (given for batch {self.reference_batch})"
        length = (f"{self.iterations} iterations = {self.epochs:g} epochs of {self.iters_per_epoch} iterations "
                  f"({self.train_samples} images); set by {origin}")
        lines = [
            f"recipe: {title}" if title else "recipe:",
            f"  batch     {self.global_batch} global = {self.per_worker_batch} per worker x {workers}",
            f"  length    {length}",
            f"  lr        {lr}",
            f"  schedule  {schedule}",
            f"  warm-up   {self.warmup_iters} iterations, linear up to {self.lr_effective:g}",
        ]
        if steps_per_pass is not None and steps_per_pass < self.iters_per_epoch:
            passes = math.ceil(self.iterations / steps_per_pass)
            lines.append(f"  data      the shard split gives each worker {steps_per_pass} full batches per pass "
                         f"(an epoch is {self.iters_per_epoch}): {passes} passes, checkpoints after each")
        return lines + [f"  {line}" for line in extra]

    def recipe(self, steps_per_pass: int | None = None, title: str | None = None, extra: tuple[str, ...] = ()) -> str:
        return "\n".join(self.recipe_lines(steps_per_pass, title, extra))


def plan_schedule(cfg: Config, num_train_samples: int, world_size: int) -> SchedulePlan:
    """The batch, length and lr schedule of a run of ``cfg`` on ``num_train_samples`` training
    images with ``world_size`` workers. Raises ScheduleError (a ValueError) naming the numbers
    when the batch does not split over the workers or the data cannot fill one global batch."""
    train, optim = cfg.train, cfg.optim
    global_batch = train.batch_size
    worker_batch = per_worker_batch(global_batch, world_size)
    iters_per_epoch = num_train_samples // global_batch
    if iters_per_epoch < 1:
        raise ScheduleError(f"{num_train_samples} training images do not fill one global batch of "
                            f"train.batch_size={global_batch}: lower train.batch_size")
    reference = optim.reference_batch
    scale = global_batch / reference if reference is not None else 1.0
    length_scale = 1.0
    if train.max_iters is not None:
        # iterations given for the reference batch: the same images seen at this batch
        length_scale = reference / global_batch if reference is not None else 1.0
        iterations, length_from = max(1, round(train.max_iters * length_scale)), "train.max_iters"
    else:
        iterations, length_from = train.epochs * iters_per_epoch, "train.epochs"
    return SchedulePlan(
        global_batch=global_batch, world_size=world_size, per_worker_batch=worker_batch,
        train_samples=num_train_samples, iters_per_epoch=iters_per_epoch, iterations=iterations,
        epochs=round(iterations / iters_per_epoch, 4), length_from=length_from, length_scale=length_scale,
        lr=optim.lr, reference_batch=reference, lr_scale=scale, lr_effective=optim.lr * scale,
        schedule=optim.schedule, lr_drops=lr_drop_iters(optim, iterations, length_scale), gamma=optim.gamma,
        warmup_iters=effective_warmup(optim, iterations))


#: keys that do not change what a recipe trains (how often it is scored or saved, the memory layout)
_RECIPE_NEUTRAL = ("train.eval_every", "train.eval_budget", "train.channels_last", "train.seed", "train.compile",
                   "train.augment_on", "train.checkpoint_every_iters", "train.checkpoint_every_minutes")


def recipe_deviations(cfg: Config) -> list[str]:
    """The keys in which ``cfg`` differs from the named recipe it says it is (``recipe.name``,
    a preset), as ``key=value (recipe: value)``; empty when it has no name, the name is not a
    preset (a stage of a two-stage recipe), or nothing differs. The recipe's figure is for it as
    written: the run's first lines say what differs."""
    from ssd.config import ConfigError, load_config

    name = cfg.recipe.name
    if not name:
        return []
    try:
        reference = load_config(name, [f"model.num_classes={cfg.model.num_classes}"]).flat()
    except ConfigError:
        return []
    ours = cfg.flat()
    same = _same_weights_file(cfg.model.arch, ours.get("model.backbone_weights"), reference.get("model.backbone_weights"))
    return [f"{key}={ours[key]!r} (recipe: {reference.get(key)!r})" for key in sorted(ours)
            if key not in _RECIPE_NEUTRAL and not key.startswith("recipe.") and ours[key] != reference.get(key)
            and not (key == "model.backbone_weights" and same)]


def _same_weights_file(arch: str, ours: Any, recipe: Any) -> bool:
    """Whether ``model.backbone_weights=ours`` names the recipe's ``imagenet`` file itself (a
    pre-staged copy on a path or bucket under torchvision's file name, e.g. vgg16-397923af.pth;
    the recipe block's weights line shows the file's sha256 to confirm it)."""
    if recipe != "imagenet" or not isinstance(ours, str) or ours in ("imagenet", "none"):
        return False
    from urllib.parse import urlparse

    from ssd.models.weights import published_weights

    try:
        url = published_weights(arch).url
    except ValueError:
        return False
    return Path(urlparse(ours).path).name == Path(urlparse(url).path).name


def recipe_title(cfg: Config) -> str | None:
    """The "recipe:" line's title: the recipe's name and the figure it should reach."""
    if not cfg.recipe.name:
        return None
    return cfg.recipe.name + (f" (expected: {cfg.recipe.expected})" if cfg.recipe.expected else "")

