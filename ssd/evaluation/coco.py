"""The COCO detection metric: AP/AR through pycocotools, on files or on accumulated tensors.

- :func:`coco_evaluate` takes a COCO ground-truth dict / JSON file and a COCO *results* list /
  JSON file (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``), as written
  by any detector, and returns the 12 ``COCOeval.summarize`` numbers plus per-class AP,
  per-class AP50 and the per-class precision-recall curves at IoU .50.
- :class:`CocoEvaluator` accumulates per-image tensors during an evaluation loop (``add``; see
  :mod:`ssd.evaluation.accumulator` for merging ranks) and runs :func:`coco_evaluate` on them.

Box conventions: tensors are (N, 4) ``x1, y1, x2, y2`` in absolute
pixels of the image as stored; COCO JSON boxes are ``[x, y, w, h]`` in the same pixels.

The result is JSON-able (plain floats, dicts and lists)::

    {"AP": .., "AP50": .., "AP75": .., "AP_small": .., "AP_medium": .., "AP_large": ..,
     "AR1": .., "AR10": .., "AR100": .., "AR_small": .., "AR_medium": .., "AR_large": ..,
     "per_class_AP": {"person": .., ...}, "per_class_AP50": {"person": .., ...},
     "pr_curve50": {"recall": [0.0, 0.01, ..., 1.0], "precision": {"person": [..101..], ...}}}
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import numbers
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssd.evaluation.accumulator import PerImageAccumulator

__all__ = ["COCO_STAT_NAMES", "CocoEvaluator", "coco_evaluate"]

#: Names of the 12 numbers of ``COCOeval.summarize()`` (``COCOeval.stats``), in its order.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)

# --------------------------------------------------------------------------------------------
# COCO: input loading and validation
# --------------------------------------------------------------------------------------------


def _load_json(src: Any, what: str) -> tuple[Any, str]:
    """Return (parsed data, a name for error messages); ``src`` is a path or in-memory data."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file not found: {path}")
        try:
            with path.open("r", encoding="utf-8") as f:
                return json.load(f), str(path)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
    return src, f"{what} (in memory)"


def _is_number(v: Any) -> bool:
    """A finite real number (numpy scalars included), not a bool."""
    t = type(v)
    # Fast paths: this runs 5x per detection, and ABC isinstance checks are slow.
    if t is float:
        return math.isfinite(v)
    if t is int:
        return True
    # bool is an int subclass, but a bbox of True/False is a bug, not a coordinate.
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_bbox(bbox: Any, where: str) -> list[float]:
    """Validate a COCO ``[x, y, w, h]`` box and return it as plain floats."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(map(_is_number, bbox)):
        raise ValueError(f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    if bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(f"{where}: 'bbox' has a negative width or height: {bbox!r}")
    return [float(v) for v in bbox]


def _require(obj: Any, keys: Sequence[str], where: str) -> None:
    if type(obj) is not dict and not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
    for key in keys:
        if key not in obj:
            raise ValueError(f"{where}: missing field '{key}'")


# Malformed input of any kind (wrong type included) raises ValueError, so that callers (the
# evaluate pipeline) handle one exception type: hence the TRY004 exemptions below.


def _records_with_unique_ids(data: Mapping[str, Any], key: str, src: str) -> list[dict[str, Any]]:
    """Copies of ``data[key]``'s records, each with an ``id``, ids unique, at least one record."""
    records = []
    for i, record in enumerate(data[key]):
        _require(record, ("id",), f"{src}: {key}[{i}]")
        records.append(dict(record))
    if len({r["id"] for r in records}) != len(records):
        raise ValueError(f"{src}: '{key}' has duplicate ids")
    if not records:
        raise ValueError(f"{src}: '{key}' is empty")
    return records


def _prepare_gt(data: Any, src: str) -> dict[str, Any]:
    """Validate a COCO ground-truth dict and return a fresh, minimal copy for pycocotools.

    The copy matters: COCOeval writes ``ignore`` into the ground-truth annotations it is given,
    and we must not mutate the caller's dict. Annotation ids are renumbered 1..N because
    COCOeval stores the matched GT *id* in ``dtMatches`` and reads a 0 as "unmatched": a GT
    with id 0 would turn its true positive into a false positive. Ids are only bookkeeping, so
    renumbering changes no metric. Missing ``iscrowd`` defaults to 0 and missing ``area`` to
    ``w * h`` of the box (what pycocotools' ``loadRes`` uses for detections).
    """
    if not isinstance(data, Mapping):
        raise ValueError(  # noqa: TRY004
            f"{src}: expected a COCO object with 'images', 'annotations' and 'categories', "
            f"got {type(data).__name__}"
        )
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{src}: missing '{key}'")
        if not isinstance(data[key], list):
            kind = type(data[key]).__name__
            raise ValueError(f"{src}: '{key}' must be a list, got {kind}")  # noqa: TRY004

    images = _records_with_unique_ids(data, "images", src)
    image_ids = {img["id"] for img in images}
    categories = _records_with_unique_ids(data, "categories", src)
    cat_ids = {cat["id"] for cat in categories}

    annotations = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{src}: annotations[{i}]"
        _require(ann, ("image_id", "category_id", "bbox"), where)
        bbox = _check_bbox(ann["bbox"], where)
        if ann["image_id"] not in image_ids:
            raise ValueError(f"{where}: 'image_id' {ann['image_id']!r} is not in 'images'")
        if ann["category_id"] not in cat_ids:
            raise ValueError(
                f"{where}: 'category_id' {ann['category_id']!r} is not in 'categories'"
            )
        iscrowd = ann.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # also accepts True/False
            raise ValueError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}")
        area = ann.get("area", bbox[2] * bbox[3])
        if not _is_number(area):
            raise ValueError(f"{where}: 'area' must be a finite number, got {area!r}")
        annotations.append(
            {
                "id": i + 1,
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": bbox,
                "area": float(area),
                "iscrowd": int(iscrowd),
            }
        )

    out = {"images": images, "annotations": annotations, "categories": categories}
    if "info" in data:
        out["info"] = copy.deepcopy(data["info"])
    return out


def _prepare_detections(
    data: Any, src: str, image_ids: set[Any], cat_ids: set[Any]
) -> list[dict[str, Any]]:
    """Validate a COCO results list and return fresh dicts (``loadRes`` mutates its input)."""
    if not isinstance(data, list):
        raise ValueError(  # noqa: TRY004
            f"{src}: expected a list of detections in COCO results format, "
            f"got {type(data).__name__}"
        )
    out = []
    for i, det in enumerate(data):
        where = f"{src}: detection [{i}]"
        _require(det, ("image_id", "category_id", "bbox", "score"), where)
        bbox = _check_bbox(det["bbox"], where)
        if det["image_id"] not in image_ids:
            raise ValueError(
                f"{where}: 'image_id' {det['image_id']!r} is not an image of the ground truth"
            )
        if det["category_id"] not in cat_ids:
            raise ValueError(
                f"{where}: 'category_id' {det['category_id']!r} is not a category of the "
                f"ground truth (known: {sorted(cat_ids)})"
            )
        if not _is_number(det["score"]):
            raise ValueError(f"{where}: 'score' must be a finite number, got {det['score']!r}")
        out.append(
            {
                "image_id": det["image_id"],
                "category_id": det["category_id"],
                "bbox": bbox,
                "score": float(det["score"]),
            }
        )
    return out


@contextlib.contextmanager
def _pycocotools_output(verbose: bool) -> Iterator[None]:
    """Capture pycocotools' prints; replay them on stderr when ``verbose``.

    stderr, not stdout, so that a caller printing machine-readable output on stdout (the
    evaluate pipeline prints one JSON object) stays parseable even in verbose mode.
    """
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        if verbose:
            sys.stderr.write(buf.getvalue())
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# COCO: the metric
# --------------------------------------------------------------------------------------------


def coco_evaluate(
    gt: Mapping[str, Any] | str | os.PathLike,
    detections: Sequence[Mapping[str, Any]] | str | os.PathLike,
    class_names: Mapping[int, str] | None = None,
    *,
    verbose: bool = False,
) -> dict[str, Any]:
    """COCO bbox AP/AR with pycocotools (``COCOeval`` evaluate → accumulate → summarize).

    Args:
        gt: COCO ground truth: a dict or a JSON file with ``images``, ``annotations`` (``bbox``
            ``[x, y, w, h]`` pixels, ``iscrowd``, ``area``) and ``categories``.
        detections: COCO results format: a list or a JSON file of
            ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``. May be empty.
        class_names: category id → name for ``per_class_AP``; default: the GT categories'
            ``name`` (or ``str(id)`` where a category has none).
        verbose: replay pycocotools' own report on stderr (silent otherwise).
    Returns:
        ``{name: float for name in COCO_STAT_NAMES}`` (``-1.0`` where pycocotools gives -1,
        i.e. no ground truth in that area range) and ``per_class_AP`` {category name: AP over
        IoU .50:.95}, averaged exactly as ``summarize`` averages AP (mean over IoU thresholds
        and recall points for area ``all`` and 100 detections, -1 entries excluded; -1 for a
        category without ground truth), ``per_class_AP50`` {category name: AP at IoU .50},
        averaged the same way (the mean over categories is the ``AP50`` stat when every
        category has ground truth), and ``pr_curve50`` ``{"recall": [101 recall thresholds
        0, .01, ..., 1], "precision": {category name: [101 interpolated precisions at IoU .50,
        area all, 100 detections; all -1 for a category without ground truth]}}``. Evaluating
        one category at a time with ``params.catIds = [cid]`` gives the same per-class
        numbers: pycocotools evaluates categories independently.
    Raises:
        FileNotFoundError: a path that does not exist (the message names it).
        ValueError: malformed input; the message names the file (or "in memory") and field.
    """
    # Imported here so that importing ssd.evaluation (e.g. for voc_ap) does not need pycocotools.
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_data, gt_src = _load_json(gt, "ground truth")
    gt_clean = _prepare_gt(gt_data, gt_src)
    det_data, det_src = _load_json(detections, "detections")
    image_ids = {img["id"] for img in gt_clean["images"]}
    cat_ids = {cat["id"] for cat in gt_clean["categories"]}
    dets = _prepare_detections(det_data, det_src, image_ids, cat_ids)

    names: dict[Any, str] = {}
    for cat in gt_clean["categories"]:
        if class_names is not None and cat["id"] in class_names:
            names[cat["id"]] = str(class_names[cat["id"]])
        else:
            names[cat["id"]] = str(cat.get("name", cat["id"]))
    if len(set(names.values())) != len(names):
        raise ValueError(f"{gt_src}: category names are not unique: {sorted(names.values())}")

    with _pycocotools_output(verbose):
        coco_gt = COCO()
        coco_gt.dataset = gt_clean
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            # loadRes indexes anns[0] and crashes on an empty list; an empty result set is a
            # legitimate outcome (an untrained model), so build the empty result COCO directly.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(gt_clean["images"]),
                "categories": copy.deepcopy(gt_clean["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    result: dict[str, Any] = {
        name: float(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats, strict=True)
    }
    result["per_class_AP"] = _coco_per_class_ap(coco_eval, names)
    result["per_class_AP50"] = _coco_per_class_ap(coco_eval, names, iou_threshold=0.5)
    result["pr_curve50"] = _coco_pr_curve(coco_eval, names, iou_threshold=0.5)
    return result


def _coco_precision(coco_eval: Any, iou_threshold: float | None) -> np.ndarray:
    """``eval['precision']`` for area ``all`` and 100 detections: (T', R recall points, K).

    ``T'`` is every IoU threshold (.50:.05:.95) when ``iou_threshold`` is None, else the one
    threshold equal to it (``summarize`` picks it the same way, ``iouThrs == iouThr``; we compare
    with a tolerance because the thresholds come from ``np.linspace``). Entries are -1 where a
    category has no ground truth.
    """
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # (T iou thresholds, R recall points, K, A, M)
    area_index = params.areaRngLbl.index("all")
    maxdet_index = params.maxDets.index(100)  # summarize's AP uses maxDets=100
    p = precision[:, :, :, area_index, maxdet_index]  # (T, R, K)
    if iou_threshold is None:
        return p
    (iou_index,) = np.flatnonzero(np.isclose(params.iouThrs, iou_threshold, rtol=0, atol=1e-9))
    return p[iou_index : iou_index + 1]  # (1, R, K)


def _coco_per_class_ap(
    coco_eval: Any, names: Mapping[Any, str], iou_threshold: float | None = None
) -> dict[str, float]:
    """Per-category AP from ``eval['precision']``, averaged as ``summarize`` does.

    AP@[.5:.95] when ``iou_threshold`` is None, else AP at that one IoU threshold (mean over
    the 101 recall points, -1 entries excluded; -1.0 for a category without ground truth).
    """
    precision = _coco_precision(coco_eval, iou_threshold)  # (T', R, K)
    out: dict[str, float] = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k]
        valid = p[p > -1]
        out[names[cat_id]] = float(np.mean(valid)) if valid.size else -1.0
    return out


def _coco_pr_curve(
    coco_eval: Any, names: Mapping[Any, str], iou_threshold: float
) -> dict[str, Any]:
    """The interpolated precision-recall curve per category at one IoU threshold.

    Returns ``{"recall": [R floats], "precision": {name: [R floats]}}`` with R = 101 recall
    thresholds 0, .01, ..., 1 (``params.recThrs``) and pycocotools' precision at each (already
    the monotone envelope, so non-increasing in recall; 0 beyond the highest recall reached;
    all -1 for a category without ground truth), for area ``all`` and 100 detections.
    """
    precision = _coco_precision(coco_eval, iou_threshold)[0]  # (R, K)
    return {
        "recall": [float(r) for r in coco_eval.params.recThrs],
        "precision": {
            names[cat_id]: [float(v) for v in precision[:, k]]
            for k, cat_id in enumerate(coco_eval.params.catIds)
        },
    }


# --------------------------------------------------------------------------------------------
# COCO evaluator
# --------------------------------------------------------------------------------------------


def _xyxy_to_xywh_list(boxes: np.ndarray) -> list[list[float]]:
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.tolist()


class CocoEvaluator(PerImageAccumulator):
    """Accumulate per-image tensors, then run :func:`coco_evaluate` on them in memory.

    Labels 1..C become COCO category ids 1..C named ``class_names[label - 1]``. GT boxes become
    ``[x, y, w, h]`` with ``area = w * h`` (there are no masks, so the box area is the only area
    we have; COCO's own files use the mask area, so AP_small/medium/large on real COCO differ
    slightly from the official numbers, while AP over all sizes does not depend on ``area``).

    ``iscrowd``: pycocotools treats crowd GT as ignore regions (a detection on one is neither TP
    nor FP; it overwrites any ``ignore`` field). VOC ``difficult`` objects are passed as
    ``iscrowd=1`` so that they are ignored too, the closest COCO-style equivalent of the VOC
    rule. It is not identical: pycocotools' IoU against a crowd box divides by the detection's
    area only, and several detections may land on the same crowd box. For the VOC metric
    proper use :class:`VocEvaluator`.
    """

    def gt_dict(self) -> dict[str, Any]:
        """The accumulated ground truth as a COCO dict (annotation ids 1..N, images sorted)."""
        images, annotations = [], []
        for rec in self._sorted_records():
            images.append({"id": rec["image_id"], "width": rec["width"], "height": rec["height"]})
            crowd = rec["gt_iscrowd"] | rec["gt_difficult"]
            for bbox, label, is_crowd in zip(
                _xyxy_to_xywh_list(rec["gt_boxes"]), rec["gt_labels"].tolist(), crowd.tolist()
            ):
                annotations.append(
                    {
                        "id": len(annotations) + 1,  # never 0: COCOeval reads id 0 as unmatched
                        "image_id": rec["image_id"],
                        "category_id": label,
                        "bbox": bbox,
                        "area": bbox[2] * bbox[3],
                        "iscrowd": int(is_crowd),
                    }
                )
        categories = [{"id": i + 1, "name": name} for i, name in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def detections(self) -> list[dict[str, Any]]:
        """The accumulated detections in COCO results format, images sorted by id."""
        out = []
        for rec in self._sorted_records():
            for bbox, score, label in zip(
                _xyxy_to_xywh_list(rec["det_boxes"]),
                rec["det_scores"].tolist(),
                rec["det_labels"].tolist(),
            ):
                out.append(
                    {
                        "image_id": rec["image_id"],
                        "category_id": label,
                        "bbox": bbox,
                        "score": score,
                    }
                )
        return out

    def compute(self, verbose: bool = False) -> dict[str, Any]:
        """COCO metrics over every image added so far (see :func:`coco_evaluate`)."""
        if not self._records:
            raise ValueError("CocoEvaluator.compute: no images were added")
        return coco_evaluate(
            self.gt_dict(),
            self.detections(),
            class_names={i + 1: n for i, n in enumerate(self.class_names)},
            verbose=verbose,
        )
