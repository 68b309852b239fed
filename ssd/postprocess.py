"""From network outputs to detections: decode, softmax, threshold, per-class NMS, top-k.

Batched over images, and doing only the work that can change the result:

- threshold first: a class score can pass ``score_threshold`` only where the background
  probability is below ``1 - score_threshold``, so a (B, P) test finds the few candidate priors;
  only they are decoded. The dense per-(image, class) pre-NMS top-k runs only when some image has
  more candidate priors than ``pre_nms_top_k`` (otherwise it cannot remove anything);
- NMS on a score-ordered prefix with early exit: greedy NMS keeps or drops a box looking only at
  higher-scored boxes of its class, so NMS over an image's M best candidates decides those M
  exactly; once an image keeps ``top_k`` of them nothing below can enter its top-k, so the rest is
  never NMS-ed. Otherwise M doubles for the images not yet finished.

The result equals torchvision SSD's ``postprocess_detections`` (tests/test_postprocess.py).
Soft-NMS (Bodla et al. 2017) runs its greedy loop over all (image, class) groups at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ssd.boxes import DEFAULT_VARIANCES, box_iou, decode
from ssd.fields import Int, Num, OneOf, check_fields

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
        # imported here: ssd.config imports this module (and never builds one while importing)
        from ssd.config import ConfigError

        check_fields(
            self, "postprocess", ConfigError,
            score_threshold=Num("[0, 1)"),  # 0 keeps every detection with a non-zero score
            nms_iou=Num("(0, 1]"),  # 1 suppresses nothing
            top_k=Int(">= 1"),
            pre_nms_top_k=Int(">= 0"),
            method=OneOf(NMS_METHODS),
            soft_sigma=Num("> 0"),
        )


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
    batch = logits.shape[0]
    if params.method == "nms":
        image, cls, score, box = _candidates(loc, logits, priors, params, variances)
        kept = _prefix_nms(image, cls, score, box, batch, logits.shape[2] - 1, params)
        image, cls, score, box = image[kept], cls[kept], score[kept], box[kept]
    else:
        image, cls, score, box = _soft_nms(*_dense_candidates(loc, logits, priors, params, variances), params)
    return _per_image_top_k(image, cls + 1, score, box, batch, params.top_k, image_sizes)


def _candidates(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    params: PostprocessConfig,
    variances: tuple[float, float],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flat (N,) image index, class index (0-based, no background), score and (N, 4) decoded box
    of every (image, prior, class) whose score passes the threshold and the pre-NMS top-k."""
    batch, num_priors, _ = logits.shape
    probs = logits.float().softmax(dim=-1)  # (B, P, C)
    threshold, k = params.score_threshold, params.pre_nms_top_k
    # Class scores sum to 1 - background, so one can pass only where background < 1 - threshold
    # (1e-6 absorbs rounding: a superset is fine).
    maybe_image, maybe_prior = (probs[..., 0] < 1.0 - threshold + 1e-6).nonzero(as_tuple=True)
    most_per_image = int(torch.bincount(maybe_image, minlength=batch).max()) if batch else 0
    if k <= 0 or most_per_image <= k:
        # No (image, class) group can hold more than k candidates: the top-k is a no-op.
        scores = probs[maybe_image, maybe_prior, 1:]  # (N', C-1)
        row, cls = (scores > threshold).nonzero(as_tuple=True)
        image, prior, score = maybe_image[row], maybe_prior[row], scores[row, cls]
    else:
        # Top-k per (image, class) first, then the threshold (same set as threshold-then-top-k).
        cand_scores, cand_prior = probs[..., 1:].transpose(1, 2).topk(min(k, num_priors), dim=2)
        passed = cand_scores > threshold  # (B, C-1, k)
        image, cls, slot = passed.nonzero(as_tuple=True)
        score, prior = cand_scores[passed], cand_prior[image, cls, slot]
    box = decode(loc[image, prior].float(), priors[prior].float(), variances).clamp_(0.0, 1.0)
    return image, cls, score, box


def _grouped_nms(box: Tensor, score: Tensor, group: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each group; returns the kept indices (in no particular order)."""
    # imported here: torchvision's import (~1.3 s) would make every script that only reads a
    # config slow to start, and slow to fail on a trivial error
    from torchvision.ops import batched_nms, nms

    if box.numel() <= 4000 or box.device.type != "cpu":
        # Small inputs, or a GPU: batched_nms's single call with offset coordinates is fastest.
        return batched_nms(box, score, group, iou_threshold)
    # On a CPU, batched_nms loops over groups scanning ``group == g`` each time; one sort and
    # split visits every candidate once.
    order = torch.argsort(group, stable=True)
    kept, start = [], 0
    for count in torch.bincount(group).tolist():
        if count:
            idx = order[start : start + count]
            kept.append(idx[nms(box[idx], score[idx], iou_threshold)])
        start += count
    return torch.cat(kept) if kept else order[:0]


def _prefix_nms(
    image: Tensor,
    cls: Tensor,
    score: Tensor,
    box: Tensor,
    batch: int,
    num_fg_classes: int,
    params: PostprocessConfig,
) -> Tensor:
    """Indices of the candidates per-class NMS keeps that can reach their image's top-k, in
    decreasing score order. Exact: see the module docstring."""
    device = image.device
    group = image * num_fg_classes + cls
    # rank of every candidate within its image by decreasing score
    order = score.argsort(descending=True)
    order = order[image[order].argsort(stable=True)]
    per_image = torch.bincount(image, minlength=batch)
    starts = per_image.cumsum(0) - per_image
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device) - starts[image[order]]

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    kept_parts = []
    prefix = 4 * params.top_k
    while True:
        selected = ((rank < prefix) & ~done[image]).nonzero().squeeze(1)
        kept = selected[_grouped_nms(box[selected], score[selected], group[selected], params.nms_iou)]
        kept_per_image = torch.bincount(image[kept], minlength=batch)
        finished = (kept_per_image >= params.top_k) | (per_image <= prefix)
        kept_parts.append(kept[(finished & ~done)[image[kept]]])
        done |= finished
        if bool(done.all()):
            break
        prefix *= 2
    kept = torch.cat(kept_parts)
    return kept[score[kept].argsort(descending=True)]


def _dense_candidates(
    loc: Tensor,
    logits: Tensor,
    priors: Tensor,
    params: PostprocessConfig,
    variances: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """(B, C-1, k, 4) boxes and (B, C-1, k) scores of each (image, class)'s k best priors, the
    padded layout soft-NMS iterates over."""
    batch, num_priors, num_classes = logits.shape
    boxes = decode(loc.float(), priors.float(), variances).clamp_(0.0, 1.0)  # (B, P, 4)
    scores = logits.float().softmax(dim=-1)[..., 1:].transpose(1, 2)  # (B, C-1, P)
    k = num_priors if params.pre_nms_top_k <= 0 else min(params.pre_nms_top_k, num_priors)
    cand_scores, cand_prior = scores.topk(k, dim=2)  # (B, C-1, k), sorted descending
    cand_boxes = boxes.gather(1, cand_prior.flatten(1)[..., None].expand(-1, -1, 4))
    return cand_boxes.view(batch, num_classes - 1, k, 4), cand_scores


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
