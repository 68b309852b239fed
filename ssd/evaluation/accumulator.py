"""Per-image records of ground truth and detections, merged across distributed ranks.

The evaluators of :mod:`ssd.evaluation.coco` and :mod:`ssd.evaluation.voc` share this
accumulator: an evaluation loop calls ``add`` once per image, each rank hands its ``state()``
to rank 0 (``torch.distributed.all_gather_object`` or Ray), and ``from_states`` rebuilds one
evaluator there, which computes the metric.

Box conventions: tensors are (N, 4) ``x1, y1, x2, y2`` in absolute
pixels of the image as stored, *continuous* coordinates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:  # typing.Self is 3.11+; annotations are strings here, so no runtime import
    from typing_extensions import Self

__all__ = ["ArrayLike", "PerImageAccumulator"]

log = logging.getLogger(__name__)

ArrayLike = Tensor | np.ndarray | Sequence[Any]


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


class PerImageAccumulator:
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

    def merge(self, other: PerImageAccumulator) -> None:
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
