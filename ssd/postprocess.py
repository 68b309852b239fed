"""From network outputs to detections: decode, softmax, threshold, per-class NMS, top-k.

Everything is batched over images: one decode, one softmax, one top-k per (image, class) and one
``torchvision.ops.batched_nms`` call whose groups are (image, class) pairs, then a vectorised
per-image top-k. Soft-NMS (Bodla et al. 2017) runs its greedy loop over all (image, class) groups
at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from ssd.boxes import DEFAULT_VARIANCES, box_iou, decode

NMS_METHODS = ("nms", "soft_linear", "soft_gaussian")


@dataclass(frozen=True)
class PostprocessConfig:
    """Defaults are the SSD paper's evaluation settings (section 3): score 0.01, NMS 0.45, 200."""

    score_threshold: float = 0.01
    nms_iou: float = 0.45
    top_k: int = 200
    #: candidates kept per (image, class) before NMS, as torchvision's SSD (400); 0 keeps all
    pre_nms_top_k: int = 400
    method: str = "nms"
    #: Gaussian soft-NMS sigma (Bodla et al.: 0.5)
    soft_sigma: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in NMS_METHODS:
            raise ValueError(f"postprocess.method must be one of {NMS_METHODS}, got {self.method!r}")


def postprocess(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    params: PostprocessConfig | None = None,
    image_sizes: Tensor | list[tuple[int, int]] | None = None,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
) -> list[dict[str, Tensor]]:
    """Turn SSD outputs into per-image detections.

    Args:
        loc: (B, P, 4) predicted offsets.
        logits: (B, P, C) class logits, class 0 = background.
        priors: (P, 4) cxcywh in [0, 1].
        params: thresholds and NMS method.
        image_sizes: (B, 2) ``(height, width)`` of the images the boxes should be expressed in
            (normally the original images); None returns boxes in [0, 1].
    Returns:
        B dicts with ``boxes`` (K, 4) xyxy in pixels of ``image_sizes`` (or [0, 1]), ``scores`` (K,)
        sorted descending, and ``labels`` (K,) int64 in 1..C-1.
    """
    params = params or PostprocessConfig()
    batch, num_priors, num_classes = logits.shape
    boxes = decode(loc.float(), priors.float(), variances).clamp_(0.0, 1.0)  # (B, P, 4)
    scores = logits.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # (B, C-1, P)

    k = num_priors if params.pre_nms_top_k <= 0 else min(params.pre_nms_top_k, num_priors)
    if k < num_priors:
        cand_scores, cand_prior = scores.topk(k, dim=2)  # (B, C-1, k), sorted descending
    else:
        cand_scores, cand_prior = scores.sort(dim=2, descending=True)
    # (B, C-1, k, 4): each candidate's box
    cand_boxes = boxes.gather(
        1, cand_prior.flatten(1)[..., None].expand(-1, -1, 4)
    ).view(batch, num_classes - 1, k, 4)

    if params.method == "nms":
        image, cls, score, box = _hard_nms(cand_boxes, cand_scores, params)
    else:
        image, cls, score, box = _soft_nms(cand_boxes, cand_scores, params)
    return _per_image_top_k(image, cls + 1, score, box, batch, params.top_k, image_sizes)


def _hard_nms(
    cand_boxes: Tensor, cand_scores: Tensor, params: PostprocessConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Threshold, then one ``batched_nms`` over all (image, class) groups.

    Returns flat (N,) image index, class index (0-based, no background), score and (N, 4) box,
    ordered by decreasing score.
    """
    keep = cand_scores > params.score_threshold  # (B, C-1, k)
    image, cls, _ = keep.nonzero(as_tuple=True)
    score = cand_scores[keep]
    box = cand_boxes[keep]
    group = image * cand_scores.shape[1] + cls
    kept = batched_nms(box, score, group, params.nms_iou)  # indices by decreasing score
    return image[kept], cls[kept], score[kept], box[kept]


def _soft_nms(
    cand_boxes: Tensor, cand_scores: Tensor, params: PostprocessConfig
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017, algorithm 1) over all (image, class) groups in parallel.

    Each iteration picks every group's highest remaining score, keeps it, and decays the scores of
    the rest of that group: linear ``s * (1 - iou)`` where ``iou >= nms_iou``, Gaussian
    ``s * exp(-iou^2 / sigma)``. A group stops when its best remaining score falls to the score
    threshold. Returns the same flat layout as :func:`_hard_nms`.
    """
    batch, classes, k = cand_scores.shape
    boxes = cand_boxes.reshape(batch * classes, k, 4)  # (G, k, 4)
    scores = cand_scores.reshape(batch * classes, k).clone()
    scores = scores.masked_fill(scores <= params.score_threshold, 0.0)
    kept_idx, kept_score = [], []
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    for _ in range(k):  # at most k picks per group; every pick is over all groups at once
        best_score, best = scores.max(dim=1)  # (G,)
        active = best_score > params.score_threshold
        if not bool(active.any()):
            break
        kept_idx.append(torch.where(active, best, -1))
        kept_score.append(best_score)
        scores[rows, best] = 0.0  # picked: out of the running
        iou = box_iou(boxes[rows, best][:, None], boxes)[:, 0]  # (G, k)
        if params.method == "soft_linear":
            decay = torch.where(iou >= params.nms_iou, 1.0 - iou, torch.ones_like(iou))
        else:
            decay = torch.exp(-(iou * iou) / params.soft_sigma)
        scores = scores * torch.where(active[:, None], decay, torch.ones_like(decay))
    if not kept_idx:
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, empty, cand_scores.new_zeros(0), cand_boxes.new_zeros((0, 4))
    idx = torch.stack(kept_idx, dim=1)  # (G, T)
    score = torch.stack(kept_score, dim=1)
    group, step = (idx >= 0).nonzero(as_tuple=True)
    flat_score = score[group, step]
    flat_box = boxes[group, idx[group, step]]
    order = flat_score.argsort(descending=True)
    group, flat_score, flat_box = group[order], flat_score[order], flat_box[order]
    return group // classes, group % classes, flat_score, flat_box


def _per_image_top_k(
    image: Tensor,
    label: Tensor,
    score: Tensor,
    box: Tensor,
    batch: int,
    top_k: int,
    image_sizes: Tensor | list[tuple[int, int]] | None,
) -> list[dict[str, Tensor]]:
    """Keep each image's ``top_k`` best detections from flat, score-sorted candidates."""
    # A stable sort by image keeps the score order within each image.
    order = image.argsort(stable=True)
    image, label, score, box = image[order], label[order], score[order], box[order]
    counts = torch.bincount(image, minlength=batch)  # (B,)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(image.numel(), device=image.device) - starts[image]
    keep = rank < top_k
    image, label, score, box = image[keep], label[keep], score[keep], box[keep]
    if image_sizes is not None:
        sizes = torch.as_tensor(image_sizes, dtype=box.dtype, device=box.device)  # (B, 2) h, w
        scale = sizes[:, [1, 0, 1, 0]]  # (B, 4) w, h, w, h
        box = box * scale[image]
    per_image = torch.bincount(image, minlength=batch).tolist()
    return [
        {"boxes": b, "scores": s, "labels": lab}
        for b, s, lab in zip(box.split(per_image), score.split(per_image), label.split(per_image))
    ]
