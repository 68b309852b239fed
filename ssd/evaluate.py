"""Detection metrics: COCO-style AP through pycocotools, and the PASCAL VOC AP.

Two ways in:

- :func:`coco_evaluate` takes a COCO ground-truth dict / JSON file and a COCO *results* list /
  JSON file (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``), as written
  by any detector, and returns the 12 ``COCOeval.summarize`` numbers plus per-class AP,
  per-class AP50 and the per-class precision-recall curves at IoU .50.
- :class:`CocoEvaluator` and :class:`VocEvaluator` accumulate per-image tensors during an
  evaluation loop (``add``), can be combined across distributed ranks (``state`` /
  ``from_states`` / ``merge``) and compute the metric at the end (``compute``).

Box conventions (docs/DESIGN.md, "Contracts"): tensors are (N, 4) ``x1, y1, x2, y2`` in absolute
pixels of the image as stored, *continuous* coordinates (the VOC reader already turned the
devkit's 1-based inclusive integer boxes into boxes whose width is ``xmax - xmin + 1``). COCO
JSON boxes are ``[x, y, w, h]`` in the same pixels.

Every returned dict is JSON-able (plain floats, dicts and lists), e.g. for COCO::

    {"AP": .., "AP50": .., "AP75": .., "AP_small": .., "AP_medium": .., "AP_large": ..,
     "AR1": .., "AR10": .., "AR100": .., "AR_small": .., "AR_medium": .., "AR_large": ..,
     "per_class_AP": {"person": .., ...}, "per_class_AP50": {"person": .., ...},
     "pr_curve50": {"recall": [0.0, 0.01, ..., 1.0], "precision": {"person": [..101..], ...}}}

and for VOC ``{"mAP": .., "per_class_AP": {...}}``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import numbers
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from ssd.boxes import box_iou

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are strings here, so no runtime import
    from typing_extensions import Self

__all__ = [
    "COCO_STAT_NAMES",
    "CocoEvaluator",
    "VocEvaluator",
    "coco_evaluate",
    "voc_ap",
    "voc_evaluate",
]

log = logging.getLogger(__name__)

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

ArrayLike = Tensor | np.ndarray | Sequence[Any]


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
    # Imported here so that importing ssd.evaluate (e.g. for voc_ap) does not need pycocotools.
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
# Per-image accumulation shared by the COCO and VOC evaluators
# --------------------------------------------------------------------------------------------


def _to_numpy(
    x: ArrayLike | None, dtype: Any, name: str, shape_tail: tuple[int, ...] = ()
) -> np.ndarray:
    """Tensor / array / list → numpy ``dtype`` array of shape (N, *shape_tail); None → empty."""
    if x is None:
        return np.zeros((0, *shape_tail), dtype=dtype)
    if isinstance(x, Tensor):
        # Via float64 for floating tensors: exact for every float dtype, and numpy has no bf16.
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.size == 0:  # accept (0,), [] etc. for "no boxes"
        return arr.reshape(0, *shape_tail)
    if arr.shape[1:] != shape_tail or arr.ndim != 1 + len(shape_tail):
        expected = "(N" + "".join(f", {d}" for d in shape_tail) + (",)" if not shape_tail else ")")
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(arr.shape)}")
    return arr


class _PerImageAccumulator:
    """Keeps one record per image (numpy arrays) and merges records across ranks.

    A record holds the image's ground truth and detections; both evaluators share ``add``, so an
    evaluation loop can feed either (or both) with the same call.
    """

    def __init__(self, class_names: Sequence[str]) -> None:
        if not class_names:
            raise ValueError("class_names is empty")
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"class_names are not unique: {list(class_names)}")
        self.class_names: list[str] = [str(n) for n in class_names]
        self._records: dict[int, dict[str, Any]] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self._records)

    def add(
        self,
        image_id: int,
        width: int,
        height: int,
        gt_boxes: ArrayLike,
        gt_labels: ArrayLike,
        det_boxes: ArrayLike,
        det_scores: ArrayLike,
        det_labels: ArrayLike,
        gt_iscrowd: ArrayLike | None = None,
        gt_difficult: ArrayLike | None = None,
    ) -> None:
        """Record one image.

        Args:
            image_id: the dataset's stable image id (unique over the evaluation set).
            width, height: image size in pixels (as stored, i.e. the boxes' frame).
            gt_boxes: (N, 4) xyxy absolute pixels.
            gt_labels: (N,) int64 in 1..C (0 is background and never a ground truth).
            det_boxes: (K, 4) xyxy absolute pixels of the same image.
            det_scores: (K,) confidence.
            det_labels: (K,) int64 in 1..C.
            gt_iscrowd: (N,) bool, COCO crowd regions (None: all False).
            gt_difficult: (N,) bool, VOC difficult objects (None: all False).

        An image id added twice keeps the first record: ``DistributedSampler`` pads ranks by
        repeating images, and counting an image twice would bias the metric.
        """
        gt_b = _to_numpy(gt_boxes, np.float64, "gt_boxes", (4,))
        n = len(gt_b)
        rec = {
            "image_id": int(image_id),
            "width": int(width),
            "height": int(height),
            "gt_boxes": gt_b,
            "gt_labels": _to_numpy(gt_labels, np.int64, "gt_labels"),
            "gt_iscrowd": _to_numpy(gt_iscrowd, bool, "gt_iscrowd")
            if gt_iscrowd is not None
            else np.zeros(n, dtype=bool),
            "gt_difficult": _to_numpy(gt_difficult, bool, "gt_difficult")
            if gt_difficult is not None
            else np.zeros(n, dtype=bool),
            "det_boxes": _to_numpy(det_boxes, np.float64, "det_boxes", (4,)),
            "det_scores": _to_numpy(det_scores, np.float64, "det_scores"),
            "det_labels": _to_numpy(det_labels, np.int64, "det_labels"),
        }
        self._check_record(rec)
        self._insert(rec)

    def _check_record(self, rec: Mapping[str, Any]) -> None:
        where = f"image {rec['image_id']}"
        n, k = len(rec["gt_boxes"]), len(rec["det_boxes"])
        for key, expected in (
            ("gt_labels", n),
            ("gt_iscrowd", n),
            ("gt_difficult", n),
            ("det_scores", k),
            ("det_labels", k),
        ):
            if len(rec[key]) != expected:
                raise ValueError(f"{where}: {key} has {len(rec[key])} entries, expected {expected}")
        for key in ("gt_labels", "det_labels"):
            labels = rec[key]
            if labels.size and (labels.min() < 1 or labels.max() > self.num_classes):
                raise ValueError(
                    f"{where}: {key} must be in 1..{self.num_classes}, got {np.unique(labels)}"
                )
        for key in ("gt_boxes", "det_boxes"):
            boxes = rec[key]
            if not np.isfinite(boxes).all():
                raise ValueError(f"{where}: {key} has non-finite values")
            if (boxes[:, 2:] < boxes[:, :2]).any():
                raise ValueError(f"{where}: {key} must be xyxy with x2 >= x1 and y2 >= y1")
        if not np.isfinite(rec["det_scores"]).all():
            raise ValueError(f"{where}: det_scores has non-finite values")

    def _insert(self, rec: dict[str, Any]) -> None:
        image_id = rec["image_id"]
        if image_id in self._records:
            log.debug("image %s added again; keeping the first record", image_id)
            return
        self._records[image_id] = rec

    def _sorted_records(self) -> list[dict[str, Any]]:
        # Sorting by image id makes every export and metric independent of the order in which
        # images (or ranks) arrived: pycocotools and the VOC ranking break score ties by order.
        return [self._records[i] for i in sorted(self._records)]

    def state(self) -> dict[str, Any]:
        """A picklable snapshot (class names + per-image numpy records) to gather across ranks.

        Use with ``torch.distributed.all_gather_object`` or Ray, then :meth:`from_states`.
        """
        return {
            "class_names": list(self.class_names),
            "records": [dict(r) for r in self._sorted_records()],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Add the records of a :meth:`state` snapshot (same class names required)."""
        if list(state["class_names"]) != self.class_names:
            raise ValueError(
                f"cannot merge evaluators with different class names: "
                f"{self.class_names} vs {list(state['class_names'])}"
            )
        for rec in state["records"]:
            rec = dict(rec)
            self._check_record(rec)
            self._insert(rec)

    def merge(self, other: _PerImageAccumulator) -> None:
        """Add every image of ``other`` (e.g. another rank's evaluator) into this one."""
        self.load_state(other.state())

    @classmethod
    def from_states(cls, states: Iterable[Mapping[str, Any]], **kwargs: Any) -> Self:
        """Build one evaluator from the :meth:`state` of several (e.g. one per rank).

        ``kwargs`` go to the constructor (e.g. ``iou_threshold`` of :class:`VocEvaluator`).
        """
        states = list(states)
        if not states:
            raise ValueError("from_states needs at least one state")
        evaluator = cls(states[0]["class_names"], **kwargs)
        for state in states:
            evaluator.load_state(state)
        return evaluator


# --------------------------------------------------------------------------------------------
# COCO evaluator
# --------------------------------------------------------------------------------------------


def _xyxy_to_xywh_list(boxes: np.ndarray) -> list[list[float]]:
    xywh = boxes.copy()
    xywh[:, 2:] -= xywh[:, :2]
    return xywh.tolist()


class CocoEvaluator(_PerImageAccumulator):
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


# --------------------------------------------------------------------------------------------
# VOC metric
# --------------------------------------------------------------------------------------------


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


class VocEvaluator(_PerImageAccumulator):
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
