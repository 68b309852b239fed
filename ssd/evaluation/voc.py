"""The PASCAL VOC detection metric (devkit rules): VOC2007 11-point AP or VOC2010+ AP.

:class:`VocEvaluator` accumulates per-image tensors (the same ``add`` as
:class:`ssd.evaluation.coco.CocoEvaluator`, so one evaluation loop feeds either);
:func:`voc_evaluate` scores parallel per-image lists; :func:`voc_ap` is the AP of one ranked list.

Box conventions: (N, 4) ``x1, y1, x2, y2`` in absolute pixels of
the image as stored, *continuous* coordinates (the VOC reader already turned the devkit's 1-based
inclusive integer boxes into boxes whose width is ``xmax - xmin + 1``). The result is
``{"mAP": .., "per_class_AP": {name: ..}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ssd.boxes import box_iou
from ssd.evaluation.accumulator import ArrayLike, PerImageAccumulator

__all__ = ["VocEvaluator", "voc_ap", "voc_evaluate"]


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """Average precision from a ranked list's cumulative recall and precision.

    Exactly py-faster-rcnn's ``voc_eval.voc_ap`` (itself a port of the devkit's ``VOCevaldet``):

    - ``use_07_metric=True``: VOC2007's 11-point interpolation, the mean over
      ``t in np.arange(0, 1.1, 0.1)`` of ``max(precision[recall >= t])`` (0 when no recall
      reaches t). The thresholds are numpy's, e.g. 0.30000000000000004, as in py-faster-rcnn.
    - ``use_07_metric=False``: VOC2010+'s area under the monotone (right-to-left running max)
      precision envelope, summed where recall changes.

    Args:
        recall: (D,) cumulative recall after each detection in score order.
        precision: (D,) cumulative precision after each detection.
    Returns:
        AP in [0, 1] (0 for empty inputs).
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"recall {rec.shape} and precision {prec.shape} differ in shape")
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = rec >= t
            p = float(np.max(prec[above])) if above.any() else 0.0
            ap += p / 11.0
        return float(ap)
    # Sentinels at both ends, then the precision envelope (max precision at recall >= r).
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    changes = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[changes + 1] - mrec[changes]) * mpre[changes + 1]))


def _voc_eval_records(
    records: Sequence[Mapping[str, Any]],
    num_classes: int,
    iou_threshold: float,
    use_07_metric: bool,
) -> np.ndarray:
    """Per-class VOC AP, (C,) with NaN for classes without (non-difficult) ground truth.

    Same decisions as the devkit / py-faster-rcnn ``voc_eval``, vectorised:
    each detection's best GT is the highest-IoU GT *of its class in its image*, over all of them
    (difficult and already-matched included, ties to the first); that is a property of the
    detection alone, computed per image as one (K, N) IoU matrix. Going down the global
    score-sorted list of a class, a detection is then TP iff IoU > threshold, its best GT is not
    difficult and it is the first such detection of that GT; FP if IoU <= threshold or the GT
    was already taken; neither if its best GT is difficult. "First in score order per GT" is
    ``np.unique(..., return_index=True)`` on the sorted list, so no loop over detections.
    """
    det_scores, det_labels, det_iou, det_gt = [], [], [], []
    gt_labels, gt_ignore = [], []
    offset = 0  # index of this image's first GT in the concatenated GT arrays
    for rec in records:
        gb, gl = rec["gt_boxes"], rec["gt_labels"]
        db, dl = rec["det_boxes"], rec["det_labels"]
        n, k = len(gb), len(db)
        if k:
            if n:
                # (K, N) IoU in continuous pixels: no devkit "+1" (our boxes already have
                # width = xmax - xmin + 1 relative to the devkit's integer boxes).
                iou = box_iou(torch.from_numpy(db), torch.from_numpy(gb)).numpy()
                iou[dl[:, None] != gl[None, :]] = -np.inf  # only GT of the detection's class
                best = iou.argmax(axis=1)  # first maximum, like the devkit's max()
                best_iou = iou[np.arange(k), best]
            else:
                best = np.zeros(k, dtype=np.int64)
                best_iou = np.full(k, -np.inf)
            det_scores.append(rec["det_scores"])
            det_labels.append(dl)
            det_iou.append(best_iou)
            det_gt.append(best + offset)
        gt_labels.append(gl)
        # Crowd regions (COCO data) are treated like difficult objects: ignored.
        gt_ignore.append(rec["gt_difficult"] | rec["gt_iscrowd"])
        offset += n

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

    scores, labels = cat(det_scores, np.float64), cat(det_labels, np.int64)
    ious, gts = cat(det_iou, np.float64), cat(det_gt, np.int64)
    all_gt_labels, all_gt_ignore = cat(gt_labels, np.int64), cat(gt_ignore, bool)

    aps = np.full(num_classes, np.nan)
    for c in range(1, num_classes + 1):
        npos = int(np.count_nonzero((all_gt_labels == c) & ~all_gt_ignore))
        if npos == 0:
            continue  # AP undefined (recall = x / 0): NaN, left out of the mean
        mask = labels == c
        # Stable sort: ties keep image order, like MATLAB's sort in the devkit (numpy's default
        # quicksort would make tied detections' order, and so AP, arbitrary).
        order = np.argsort(-scores[mask], kind="stable")
        c_iou, c_gt = ious[mask][order], gts[mask][order]
        hit = c_iou > iou_threshold  # strictly greater, as the devkit
        # c_gt is meaningless where there was no hit (may even be out of range): index 0 there.
        on_ignored = hit & all_gt_ignore[np.where(hit, c_gt, 0)]
        candidate = hit & ~on_ignored
        tp = np.zeros(len(c_iou), dtype=bool)
        cand_idx = np.flatnonzero(candidate)
        _, first = np.unique(c_gt[cand_idx], return_index=True)  # first hit of each GT
        tp[cand_idx[first]] = True
        fp = ~hit | (candidate & ~tp)  # a miss, or a second detection of a matched GT
        tp_cum = np.cumsum(tp, dtype=np.float64)
        fp_cum = np.cumsum(fp, dtype=np.float64)
        recall = tp_cum / npos
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        aps[c - 1] = voc_ap(recall, precision, use_07_metric)
    return aps


def _voc_result(aps: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    valid = aps[~np.isnan(aps)]
    return {
        "mAP": float(valid.mean()) if valid.size else float("nan"),
        "per_class_AP": {name: float(ap) for name, ap in zip(class_names, aps, strict=True)},
    }


class VocEvaluator(PerImageAccumulator):
    """PASCAL VOC AP (devkit rules) over per-image tensors; same ``add`` as :class:`CocoEvaluator`.

    Args:
        class_names: the C class names; label ``l`` in 1..C is ``class_names[l - 1]``.
        iou_threshold: a detection is a hit iff IoU > this (strictly, as the devkit).
        use_07_metric: VOC2007 11-point AP (default, the number SSD papers report on VOC07
            test) or the VOC2010+ all-point AP.

    Boxes are continuous-pixel xyxy, so IoU and areas use no devkit "+1" (the VOC reader already
    converted the devkit's inclusive integer boxes). ``difficult`` GT are not counted in the
    number of positives and a detection whose best GT is difficult is neither TP nor FP;
    ``iscrowd`` GT are handled the same way. A class without non-difficult GT gets AP NaN and
    is left out of the mAP (``mAP`` is NaN only if every class is).
    """

    def __init__(
        self, class_names: Sequence[str], iou_threshold: float = 0.5, use_07_metric: bool = True
    ) -> None:
        super().__init__(class_names)
        self.iou_threshold = float(iou_threshold)
        self.use_07_metric = bool(use_07_metric)

    def compute(self) -> dict[str, Any]:
        """``{"mAP": float, "per_class_AP": {name: float}}`` over every image added so far."""
        aps = _voc_eval_records(
            self._sorted_records(), self.num_classes, self.iou_threshold, self.use_07_metric
        )
        return _voc_result(aps, self.class_names)


def voc_evaluate(
    ground_truths: Sequence[Mapping[str, ArrayLike]],
    detections: Sequence[Mapping[str, ArrayLike]],
    class_names: Sequence[str],
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> dict[str, Any]:
    """VOC AP over a whole set given as parallel per-image lists (see :class:`VocEvaluator`).

    Args:
        ground_truths: per image ``{"boxes": (N, 4) xyxy pixels, "labels": (N,) 1..C,
            "difficult": (N,) bool (optional), "iscrowd": (N,) bool (optional)}``.
        detections: per image, same order, ``{"boxes": (K, 4) xyxy pixels, "scores": (K,),
            "labels": (K,) 1..C}`` (the post-processing output).
        class_names: the C class names.
        iou_threshold: hit iff IoU > this.
        use_07_metric: 11-point VOC2007 AP (default) or all-point VOC2010+ AP.
    Returns:
        ``{"mAP": float, "per_class_AP": {name: float}}``; NaN for classes without GT.
    """
    if len(ground_truths) != len(detections):
        raise ValueError(
            f"{len(ground_truths)} ground-truth images but {len(detections)} detection images"
        )
    evaluator = VocEvaluator(class_names, iou_threshold=iou_threshold, use_07_metric=use_07_metric)
    for i, (gt, det) in enumerate(zip(ground_truths, detections, strict=True)):
        evaluator.add(
            image_id=i,
            width=0,
            height=0,
            gt_boxes=gt["boxes"],
            gt_labels=gt["labels"],
            det_boxes=det["boxes"],
            det_scores=det["scores"],
            det_labels=det["labels"],
            gt_iscrowd=gt.get("iscrowd"),
            gt_difficult=gt.get("difficult"),
        )
    return evaluator.compute()
