"""From network outputs to detections: decode, softmax, threshold, per-class NMS, top-k.

Batched over images, and doing only the work that can change the result:

- threshold first: a class score can pass ``score_threshold`` only where the background
  probability is below ``1 - score_threshold``, so a cheap (B, P) test on the logits finds the few
  candidate priors; only they get a softmax, and only the class scores that pass are decoded;
- pre-NMS top-k per (image, class) group, only where it can remove something: in the groups with
  more than ``pre_nms_top_k`` candidates past the threshold. Those groups' candidates are packed
  into a (groups, most candidates) matrix for one ``topk``; the other groups keep all of theirs
  (with a trained network, usually every group: at most a few dozen candidates each). Only when
  candidates are very many (an untrained network) does one dense topk over every (image, class)
  before the threshold cost less, and run instead;
- NMS on a score-ordered prefix with early exit: greedy NMS keeps or drops a box looking only at
  higher-scored boxes of its class, so NMS over an image's M best candidates decides those M
  exactly; once an image keeps ``top_k`` of them nothing below can enter its top-k, so the rest is
  never NMS-ed. Otherwise M doubles for the images not yet finished.

The result equals torchvision SSD's ``postprocess_detections`` (tests/test_postprocess.py), down
to which of the candidates tied at a group's k-th place survive the pre-NMS top-k.
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
    of every (image, prior, class) whose score passes the threshold and the pre-NMS top-k, in no
    particular order."""
    batch, num_priors, num_classes = logits.shape
    logits = logits.float()
    threshold, k = params.score_threshold, params.pre_nms_top_k
    # Class scores sum to 1 - background, so one can pass only where background < 1 - threshold,
    # i.e. where sum_c exp(logit_c) * (1 - threshold) > exp(logit_0). Cheaper than the softmax: a
    # length-C reduction per prior is slow, this sum is a matrix-vector product; and exp of the
    # logits as they are, image by image into one reused buffer, avoids a broadcast subtraction
    # and a fresh (B, P, C) temporary (each cost as much as the exp). 1e-5 absorbs rounding;
    # where exp overflows (logits > 88) or underflows (all < -69) the test cannot tell, and the
    # prior stays a candidate: a superset, made exact by the softmax below.
    ones = logits.new_ones(num_classes)
    if logits.device.type == "cpu":
        total = logits.new_empty((batch, num_priors))
        background = logits.new_empty((batch, num_priors))
        exps = logits.new_empty((num_priors, num_classes))
        for i in range(batch):
            torch.exp(logits[i], out=exps)
            torch.mv(exps, ones, out=total[i])
            background[i] = exps[:, 0]
    else:  # one kernel per op for the batch
        exps = logits.exp()  # (B, P, C)
        total, background = exps @ ones, exps[..., 0]  # (B, P)
    maybe = (total * (1.0 - threshold + 1e-5) > background) | ~(total.isfinite() & (total > 1e-30))
    maybe_image, maybe_prior = maybe.nonzero(as_tuple=True)
    fg = None
    if 4 * maybe_image.numel() > batch * num_priors:
        # Most priors are candidates (an untrained network): one softmax over all of them costs
        # less than gathering their rows first.
        fg = logits.softmax(dim=-1)[..., 1:]  # (B, P, C-1)
    # With many candidates, one dense topk per (image, class) before the threshold costs less
    # than the sparse path below, whose cost per candidate (nonzero, gathers, packing) is about
    # that of 8 topk inputs (measured on a CPU).
    if fg is not None and 0 < k < num_priors and 8 * int((fg > threshold).count_nonzero()) > fg.numel():
        image, cls, prior, score = _dense_top_k(fg.transpose(1, 2), threshold, k)
    else:
        if fg is not None:
            scores = fg[maybe_image, maybe_prior]  # (N', C-1)
        else:
            # The softmax of each candidate row alone: the same bits as over the whole batch
            # (a row-wise kernel), so the scores, and their ties, are torchvision's.
            scores = logits[maybe_image, maybe_prior].softmax(dim=-1)[:, 1:]  # (N', C-1)
        # Listed class by class, then by row: each (image, class) group is one run, in prior
        # order (nonzero listed the rows by (image, prior)), the order torchvision's topk sees.
        cls, row = (scores.T > threshold).nonzero(as_tuple=True)  # (M,)
        image, score = maybe_image[row], scores[row, cls]
        if k > 0:
            keep = _pre_nms_top_k(score, cls * batch + image, (num_classes - 1) * batch, k)
            if keep is not None:
                keep = keep.nonzero().squeeze(1)
                cls, row, image, score = cls[keep], row[keep], image[keep], score[keep]
        prior = maybe_prior[row]
    box = decode(loc[image, prior].float(), priors[prior].float(), variances).clamp_(0.0, 1.0)
    return image, cls, score, box


def _dense_top_k(fg: Tensor, threshold: float, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(M,) image, class, prior and score of the candidates above ``threshold`` among each
    (image, class)'s ``k`` best, as torchvision's topk after the threshold keeps them.

    Args:
        fg: (B, C-1, P) foreground class scores; ``k < P``.
    """
    best, best_prior = fg.topk(k + 1, dim=2)  # (B, C-1, k + 1), sorted descending
    # A tie at the k-th place among passing scores leaves the choice to topk's selection
    # algorithm, which depends on the whole array: redo such a group on exactly the 1-D array
    # torchvision's topk gets (the passing scores in prior order). Rare with real scores.
    tied = (best[..., k - 1] == best[..., k]) & (best[..., k] > threshold)  # (B, C-1)
    for b, c in tied.nonzero().tolist():
        passing = (fg[b, c] > threshold).nonzero().squeeze(1)
        best_prior[b, c, :k] = passing[fg[b, c, passing].topk(k).indices]
        best[b, c, :k] = fg[b, c, best_prior[b, c, :k]]
    best, best_prior = best[..., :k], best_prior[..., :k]
    image, cls, slot = (best > threshold).nonzero(as_tuple=True)
    return image, cls, best_prior[image, cls, slot], best[image, cls, slot]


def _pre_nms_top_k(score: Tensor, group: Tensor, num_groups: int, k: int) -> Tensor | None:
    """Which candidates torchvision's per-group ``topk(k)`` keeps (it runs after the threshold).

    Args:
        score: (M,) candidate scores, listed group by group (``group`` non-decreasing), each
            group in the order torchvision's topk sees it.
        group: (M,) group index in [0, num_groups).
    Returns:
        (M,) bool, or None when no group holds more than ``k`` candidates (all are kept).
    """
    sizes = torch.bincount(group, minlength=num_groups)  # (num_groups,)
    starts = sizes.cumsum(0) - sizes
    over = sizes > k
    if not bool(over.any()):
        return None
    # Only the groups with more than k candidates need a top-k: pack their runs into the rows
    # of a (G, width) matrix, -inf padded, for one topk.
    member = over[group]  # (M,)
    index = member.nonzero().squeeze(1)  # (M_over,) runs of the larger groups, in order
    slot = over.cumsum(0) - 1  # (num_groups,) row of a larger group in the packed matrix
    column = index - starts[group[index]]
    sizes, starts = sizes[over], starts[over]  # (G,)
    width = int(sizes.max())
    packed = score.new_full((sizes.numel(), width), float("-inf"))  # (G, width)
    packed.view(-1)[slot[group[index]] * width + column] = score[index]
    best, best_column = packed.topk(k + 1, dim=1)  # (G, k + 1), all real candidates
    chosen = starts[:, None] + best_column[:, :k]  # (G, k) indices into score
    # A tie at the k-th place leaves the choice to topk's selection algorithm, which depends on
    # the whole array (the padding changes it): redo such a group on exactly the 1-D array
    # torchvision's topk gets, so that the same tied candidates survive. Rare with real scores.
    for g in (best[:, k - 1] == best[:, k]).nonzero().flatten().tolist():
        start, size = int(starts[g]), int(sizes[g])
        chosen[g] = start + score[start : start + size].topk(k).indices
    keep = ~member
    keep[chosen.flatten()] = True
    return keep


#: boxes per ``batched_nms`` call on a CPU: a call costs a fixed overhead plus a term quadratic in
#: its input (every surviving box is compared with every later one, the offsets that keep groups
#: apart notwithstanding); 256 was the fastest of 64-384 on bench_postprocess.py's inputs
_NMS_CHUNK = 256


def _grouped_nms(box: Tensor, score: Tensor, group: Tensor, iou_threshold: float) -> Tensor:
    """Greedy NMS within each group; returns the kept indices (in no particular order)."""
    # imported here: torchvision's import (~1.3 s) would make every script that only reads a
    # config slow to start, and slow to fail on a trivial error
    from torchvision.ops import batched_nms

    if box.shape[0] <= _NMS_CHUNK or box.device.type != "cpu":
        # Small inputs, or a GPU: batched_nms's single call with offset coordinates is fastest.
        return batched_nms(box, score, group, iou_threshold)
    # On a CPU, sort by group and cut into runs of whole groups of about _NMS_CHUNK boxes, one
    # batched_nms call each (NMS never looks across groups, so how they are batched is free).
    order = torch.argsort(group, stable=True)
    bounds, start, last = [], 0, 0
    for end in torch.bincount(group).cumsum(0).tolist():  # where each group's run ends
        if end - start > _NMS_CHUNK and last > start:
            bounds.append((start, last))
            start = last
        last = end
    bounds.append((start, last))
    kept = []
    for start, end in bounds:
        idx = order[start:end]
        kept.append(idx[batched_nms(box[idx], score[idx], group[idx], iou_threshold)])
    return torch.cat(kept)


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
    threshold. Returns the same flat layout as :func:`_candidates`.
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
