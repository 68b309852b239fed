"""Evaluate a model on a shard set: the one evaluation of training, scoring and the pipelines.

Every image of the set in shard order (each rank its own split) goes through the evaluation
transform (:func:`ssd.evaluation.inference.eval_transform`), the model and the post-processing;
detections and ground truth, in pixels of the original image, go into a
:class:`~ssd.evaluation.coco.CocoEvaluator`. The ranks' evaluator states are gathered on rank 0,
which computes the COCO metrics (pycocotools; VOC ``difficult`` objects and crowds are ignore
regions) and, for a set converted from PASCAL VOC (``dataset.json``'s ``source.type`` is
``"voc"``), the 11-point VOC2007 mAP that SSD papers report. One process::

    result = evaluate_on_shards(model, cfg, ShardSet.open("shards/voc/val"), "cuda", 32)
    result["AP"], result["AP50"], result.get("VOC07", {}).get("mAP")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ssd.checkpoint import unwrap
from ssd.config import Config
from ssd.data.shards import ShardSet
from ssd.data.streaming import ShardLoader, ShardStream
from ssd.evaluation.coco import COCO_STAT_NAMES, CocoEvaluator
from ssd.evaluation.inference import BatchPredictor, eval_transform
from ssd.evaluation.voc import VocEvaluator

__all__ = ["eval_loader", "evaluate_on_shards", "flat_metrics", "is_voc", "results_from_states"]

#: a rank's evaluator state -> every rank's, in rank order (``torch.distributed.all_gather_object``)
Gather = Callable[[dict[str, Any]], list[dict[str, Any]]]


def is_voc(shard_set: ShardSet) -> bool:
    """True when the shard set was converted from PASCAL VOC (VOC07 mAP is reported too)."""
    return (shard_set.info.get("source") or {}).get("type") == "voc"


def eval_loader(cfg: Config, shard_set: ShardSet, batch_size: int, rank: int = 0,
                world_size: int = 1, num_workers: int = 0) -> ShardLoader:
    """Batches of rank ``rank``'s split of ``shard_set`` through the evaluation transform, read
    and resized by ``num_workers`` loader processes (0: in this process).

    Every sample of the split once (in shard order with one process; the workers' batches
    interleave otherwise), in full batches except the last; images
    uint8 (B, 3, S, S); targets with ``boxes`` in [0, 1] of the network input, ``labels``,
    ``image_id``, ``orig_size`` (H, W) and the ``difficult`` / ``iscrowd`` flags.
    """
    stream = ShardStream(shard_set, eval_transform(cfg), train=False, rank=rank, world_size=world_size)
    return ShardLoader(stream, batch_size, num_workers=num_workers)


def _all_gather(state: dict[str, Any]) -> list[dict[str, Any]]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("world_size > 1 needs an initialised torch.distributed process group "
                           "(or a gather function)")
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, state)
    return out


def results_from_states(states: Iterable[Mapping[str, Any]], voc: bool) -> dict[str, Any]:
    """The metrics of the merged evaluator states (``CocoEvaluator.state()``, one per rank).

    Returns ``CocoEvaluator.compute()``'s dict (``AP``, ``AP50``, ``AP75``, ``AP_small``, ...,
    ``AR_large``, ``per_class_AP``, ``per_class_AP50``, ``pr_curve50``; see
    :func:`ssd.evaluation.coco.coco_evaluate`) and, with ``voc``, ``"VOC07"``: ``{"mAP",
    "per_class_AP"}`` from the same records (11-point AP, difficult objects ignored; NaN for a
    class without ground truth).
    """
    states = list(states)
    result: dict[str, Any] = CocoEvaluator.from_states(states).compute()
    if voc:
        result["VOC07"] = VocEvaluator.from_states(states, use_07_metric=True).compute()
    return result


@torch.no_grad()
def evaluate_on_shards(
    model: nn.Module,
    cfg: Config,
    shard_set: ShardSet,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    *,
    rank: int = 0,
    world_size: int = 1,
    voc: bool | None = None,
    gather: Gather | None = None,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any] | None:
    """The validation metrics of ``model`` on ``shard_set``, computed on rank 0.

    Args:
        model: the SSD (DDP / ``torch.compile`` wrappers are taken off); it is moved to
            ``device`` (channels-last when ``cfg.train.channels_last``) and put in eval mode.
            Returns (loc (B, P, 4), logits (B, P, C + 1)).
        cfg: the model's config: ``priors`` (input size and priors), ``augment`` (mean, std),
            ``postprocess`` (thresholds, NMS), ``model.num_classes`` (= the set's classes + 1).
        shard_set: the validation split (``ShardSet.open``); label ``k`` is its ``classes[k-1]``.
        device: where the network runs.
        batch_size: images per forward pass (the result does not depend on it beyond float
            rounding).
        rank, world_size: this process's place among the ranks; each evaluates its own split of
            the shards (:func:`eval_loader`) and every rank must call this.
        voc: also compute the VOC07 mAP; None: for sets converted from VOC (:func:`is_voc`).
        gather: hands this rank's evaluator state to the others and returns every rank's; by
            default ``torch.distributed.all_gather_object`` (only used when ``world_size > 1``).
        num_workers: loader processes that read and resize the images (:func:`eval_loader`).
        amp_dtype: the network under autocast to this dtype (training's validation on a GPU
            uses the run's bf16); None: float32. Decoding and NMS are float32 either way.
    Returns:
        On rank 0, :func:`results_from_states` of every rank's images; None on other ranks.
    Raises:
        ValueError: ``cfg.model.num_classes`` does not fit the set's classes, or the set is empty.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    classes = list(shard_set.classes)
    if cfg.model.num_classes != shard_set.num_classes:
        raise ValueError(f"model.num_classes is {cfg.model.num_classes} but the shards have {len(classes)} "
                         f"classes + background = {shard_set.num_classes}")
    device = torch.device(device)
    predictor = BatchPredictor(unwrap(model), cfg, device, amp_dtype)
    predictor.model.to(device, memory_format=predictor.memory_format).eval()
    evaluator = CocoEvaluator(classes)
    for images, targets in eval_loader(cfg, shard_set, batch_size, rank, world_size, num_workers):
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        detections = predictor(images, image_sizes=sizes)
        for det, target, (height, width) in zip(detections, targets, sizes.tolist(), strict=True):
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            evaluator.add(
                image_id=int(target["image_id"]),
                width=int(width),
                height=int(height),
                gt_boxes=target["boxes"] * scale,
                gt_labels=target["labels"],
                det_boxes=det["boxes"].cpu(),
                det_scores=det["scores"].cpu(),
                det_labels=det["labels"].cpu(),
                gt_iscrowd=target.get("iscrowd"),
                gt_difficult=target.get("difficult"),
            )
    state = evaluator.state()
    states = (gather or _all_gather)(state) if world_size > 1 else [state]
    if rank != 0:
        return None
    return results_from_states(states, is_voc(shard_set) if voc is None else voc)


def flat_metrics(result: dict[str, Any], finite_only: bool = True) -> dict[str, float]:
    """Flat numbers of an :func:`evaluate_on_shards` result for metric stores (training reports
    these).

    The 12 COCO numbers, ``mAP`` (= ``AP``), ``AP/<class>`` and, for VOC sets, ``VOC07_mAP``
    and ``VOC07_AP/<class>``. With ``finite_only``, non-finite values (VOC AP of a class without
    ground truth) are left out; COCO's -1 (no ground truth) is kept either way.
    """
    out = {name: float(result[name]) for name in COCO_STAT_NAMES}
    out["mAP"] = out["AP"]
    out.update({f"AP/{name}": float(v) for name, v in result["per_class_AP"].items()})
    voc = result.get("VOC07")
    if voc is not None:
        out["VOC07_mAP"] = float(voc["mAP"])
        out.update({f"VOC07_AP/{name}": float(v) for name, v in voc["per_class_AP"].items()})
    return {k: v for k, v in out.items() if math.isfinite(v)} if finite_only else out
