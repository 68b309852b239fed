"""Post-processing of an ONNX SSD exported with ``--no-nms``, in numpy alone.

This module imports nothing but numpy, so that it can be copied next to the ``.onnx`` file and
used where the project's code is not installed. With the settings the file's metadata records
(``ssd.score_threshold``, ``ssd.nms_iou``, ``ssd.pre_nms_top_k``, ``ssd.top_k``) it gives the
detections ``ssd.postprocess.postprocess`` gives for the same network outputs (the SSD paper's
evaluation rule, as torchvision's SSD applies it)::

    import json, numpy as np, onnxruntime as ort
    session = ort.InferenceSession("model.onnx")
    meta = session.get_modelmeta().custom_metadata_map
    boxes, scores = session.run(None, {"images": batch})   # batch: (B, 3, S, S) uint8 RGB
    detections = postprocess_outputs(
        boxes, scores, score_threshold=float(meta["ssd.score_threshold"]),
        nms_iou=float(meta["ssd.nms_iou"]), pre_nms_top_k=int(meta["ssd.pre_nms_top_k"]),
        top_k=int(meta["ssd.top_k"]), image_sizes=[(h, w) for each original image])

Per image and foreground class: keep the scores above ``score_threshold``; of those, the
``pre_nms_top_k`` best (0: all); greedy NMS (a box is dropped when its IoU with a kept,
higher-scored box of the same class exceeds ``nms_iou``); then the image's ``top_k`` best
detections over all classes. Which of several exactly equal scores wins a tie is unspecified
here as in PyTorch; real scores are rarely exactly equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def postprocess_outputs(
    boxes: np.ndarray,
    scores: np.ndarray,
    *,
    score_threshold: float,
    nms_iou: float,
    pre_nms_top_k: int,
    top_k: int,
    image_sizes: Sequence[tuple[int, int]] | np.ndarray | None = None,
) -> list[dict[str, np.ndarray]]:
    """Detections from the outputs of an SSD exported without NMS.

    Args:
        boxes: (B, P, 4) float, per prior the decoded box xyxy in [0, 1] of the network input
            (the output ``boxes``).
        scores: (B, P, C) float, per prior the softmax score of each foreground class; column
            ``k`` is label ``k + 1`` (the output ``scores``; the background column is left out).
        score_threshold: keep scores strictly above this.
        nms_iou: suppress a box whose IoU with a kept box of its class is strictly above this.
        pre_nms_top_k: candidates kept per (image, class) before NMS; 0 keeps all.
        top_k: detections kept per image.
        image_sizes: (B, 2) ``(height, width)`` of the original images: boxes are scaled to
            their pixels (the input was warped to S x S, so x and y scale apart). None keeps
            [0, 1].
    Returns:
        B dicts: ``boxes`` (K, 4) float32 xyxy, ``scores`` (K,) float32 descending, ``labels``
        (K,) int64 in 1..C.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 3 or boxes.shape[2] != 4 or scores.ndim != 3 or scores.shape[:2] != boxes.shape[:2]:
        raise ValueError(f"expected boxes (B, P, 4) and scores (B, P, C), got {boxes.shape} and {scores.shape}")
    if image_sizes is not None and len(image_sizes) != boxes.shape[0]:
        raise ValueError(f"{len(image_sizes)} image sizes for a batch of {boxes.shape[0]}")
    out = []
    for b in range(boxes.shape[0]):
        kept_boxes, kept_scores, kept_labels = [], [], []
        for c in range(scores.shape[2]):
            column = scores[b, :, c]
            candidates = np.flatnonzero(column > score_threshold)
            # best first; a stable sort keeps prior order among equal scores
            candidates = candidates[np.argsort(-column[candidates], kind="stable")]
            if pre_nms_top_k > 0:
                candidates = candidates[:pre_nms_top_k]
            # a class never contributes more than top_k detections to an image's top_k
            keep = _greedy_nms(boxes[b, candidates], nms_iou, top_k)
            kept_boxes.append(boxes[b, candidates[keep]])
            kept_scores.append(column[candidates[keep]])
            kept_labels.append(np.full(len(keep), c + 1, dtype=np.int64))
        box = np.concatenate(kept_boxes) if kept_boxes else np.zeros((0, 4), np.float32)
        score = np.concatenate(kept_scores) if kept_scores else np.zeros((0,), np.float32)
        label = np.concatenate(kept_labels) if kept_labels else np.zeros((0,), np.int64)
        order = np.argsort(-score, kind="stable")[:top_k]
        box, score, label = box[order], score[order], label[order]
        if image_sizes is not None:
            height, width = image_sizes[b]
            box = box * np.array([width, height, width, height], dtype=np.float32)
        out.append({"boxes": box.astype(np.float32), "scores": score, "labels": label})
    return out


def _greedy_nms(boxes: np.ndarray, iou_threshold: float, limit: int) -> np.ndarray:
    """Indices kept by greedy NMS of (N, 4) xyxy boxes listed best first, at most ``limit``."""
    # float32 arithmetic in torchvision's order (area of each, then inter / (a1 + a2 - inter)),
    # so that an IoU at the threshold compares as it does there
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = np.arange(len(boxes))
    keep: list[int] = []
    while order.size and len(keep) < limit:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        width = np.maximum(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), np.float32(0))
        height = np.maximum(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), np.float32(0))
        inter = width * height
        iou = inter / (areas[i] + areas[rest] - inter)
        # a NaN IoU (two empty boxes) suppresses nothing, as in torchvision
        order = rest[~(iou > np.float32(iou_threshold))]
    return np.asarray(keep, dtype=np.int64)
