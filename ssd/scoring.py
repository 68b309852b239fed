"""Score a trained model on a validation shard set, in one process, exactly as training does.

No Ray, no MLflow, no ``torch.distributed``: this is what ``pipelines/evaluate.py --model`` runs,
and what a pipeline calls to re-evaluate a registered champion on a candidate's validation set
(the two scores are then comparable: same code, same data)::

    result = evaluate_checkpoint("runs/exp/checkpoints/best", "shards/voc/val")
    result["AP"], result["AP50"], result.get("VOC07", {}).get("mAP")

The numbers are those of ``ssd.training``'s validation (``_Evaluation.run``): every image of the
set in shard order through the evaluation transform (resize only, ``min_size=0`` so that no
annotated object is dropped, uint8 out and normalised on the device), ``ssd.engine.evaluate``
(detections and ground truth in pixels of the original image), then
``CocoEvaluator(...).compute()`` (pycocotools; VOC ``difficult`` objects and crowds are ignore
regions) and, for a set converted from PASCAL VOC (``dataset.json``'s ``source.type`` is
``"voc"``), ``VocEvaluator(use_07_metric=True).compute()``: the 11-point VOC2007 mAP that SSD
papers report.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from ssd.checkpoint import unwrap
from ssd.config import Config
from ssd.data.shards import ShardLoader, ShardSet, ShardStream
from ssd.engine import evaluate
from ssd.evaluate import COCO_STAT_NAMES, CocoEvaluator, VocEvaluator
from ssd.serving import Detector
from ssd.transforms import build_transform

__all__ = ["evaluate_checkpoint", "evaluate_model", "flat_metrics", "is_voc"]


def is_voc(shard_set: ShardSet) -> bool:
    """True when the shard set was converted from PASCAL VOC (VOC07 mAP is reported too)."""
    return (shard_set.info.get("source") or {}).get("type") == "voc"


def evaluate_model(
    model: nn.Module,
    cfg: Config,
    shard_set: ShardSet,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[str, Any]:
    """The validation metrics of ``model`` on every image of ``shard_set``.

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
    Returns:
        ``CocoEvaluator.compute()``'s dict (``AP``, ``AP50``, ``AP75``, ``AP_small``, ...,
        ``AR_large``, ``per_class_AP``, ``per_class_AP50``, ``pr_curve50``; see
        ``ssd.evaluate.coco_evaluate``) and, for a VOC set, ``"VOC07"``: ``{"mAP",
        "per_class_AP"}`` (11-point AP, difficult objects ignored; NaN for a class without
        ground truth).
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
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = unwrap(model).to(device, memory_format=memory_format).eval()
    # min_size=0: evaluation keeps every annotated object, however small at the network size
    transform = build_transform(cfg.priors.image_size, 0.0, train=False, min_size=0.0, normalize=False)
    loader = ShardLoader(ShardStream(shard_set, transform, train=False), batch_size, num_workers=0)
    evaluator = evaluate(model, loader, cfg, CocoEvaluator(classes), device)
    result: dict[str, Any] = evaluator.compute()
    if is_voc(shard_set):
        # the same per-image records, scored by the VOC rules (as ``_Evaluation.run`` does)
        result["VOC07"] = VocEvaluator.from_states([evaluator.state()], use_07_metric=True).compute()
    return result


def evaluate_checkpoint(
    checkpoint_dir: str | os.PathLike,
    data: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[str, Any]:
    """:func:`evaluate_model` for a ``save_checkpoint`` directory on the shard set ``data``.

    The model is rebuilt as ``ssd.serving.Detector.from_checkpoint`` does (config + weights;
    ``model.backbone_weights`` is ignored, the checkpoint holds every weight).

    Args:
        checkpoint_dir: a checkpoint directory (``meta.json``, ``config.yaml``, ``model.pt``).
        data: a shard set spec for ``ShardSet.open``: a folder with ``dataset.json``, a
            ``dataset.json`` path, or an ``s3://`` / http URL.
    Returns:
        :func:`evaluate_model`'s dict plus ``"data"`` (the spec as given), ``"data_hash"``
        (``dataset.json``'s ``content_hash``, None if it has none) and ``"images"`` (the number
        of images evaluated).
    Raises:
        FileNotFoundError: no shard set at ``data``, or an incomplete checkpoint.
        ValueError: the checkpoint's classes are not the shards' classes in the same order (the
            message names both lists and the shard set), or malformed shards / checkpoint.
    """
    spec = os.fspath(data)
    shard_set = ShardSet.open(spec)  # bad data fails before the weights are loaded
    detector = Detector.from_checkpoint(checkpoint_dir, device="cpu")
    if list(detector.classes) != list(shard_set.classes):
        raise ValueError(
            f"the checkpoint {os.fspath(checkpoint_dir)} was trained on the classes {list(detector.classes)} "
            f"but the shard set {spec} has the classes {list(shard_set.classes)} (labels are positions in "
            "these lists, so they must be equal and in the same order)")
    result = evaluate_model(detector.model, detector.cfg, shard_set, device=device, batch_size=batch_size)
    return result | {"data": spec, "data_hash": shard_set.info.get("content_hash"),
                     "images": shard_set.num_samples}


def flat_metrics(result: dict[str, Any], finite_only: bool = True) -> dict[str, float]:
    """Flat numbers of an :func:`evaluate_model` result for metric stores (training reports these).

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
