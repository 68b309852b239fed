"""Batched matching of priors to ground truth (SSD paper, section 2.2 "Matching strategy").

Two steps, both vectorised over the whole batch:
1. bipartite: every ground-truth box takes the prior it overlaps most (so every object gets at
   least one positive even when no prior reaches the threshold);
2. threshold: every other prior takes the ground truth it overlaps most if that IoU is at least
   ``iou_threshold`` (0.5).

Ties and conflicts follow the reference implementation (ssd.pytorch ``match``): a ground truth's
best prior is the first one with the maximal IoU; when two ground truths pick the same best prior,
the one with the higher index keeps it.

Two implementations, equal bit for bit (tests/test_matching.py):

- **static shapes** (accelerators): every step is a fixed-shape tensor op over the padded batch,
  so the host never waits for the device (tests/test_sync_free.py);
- **host shortcuts** (tensors on the CPU, where reading a value costs nothing): images are
  matched in buckets of similar box count instead of padded to the batch's largest (real VOC
  batches average 3.2 boxes per image but pad to 13-42: most IoU pairs were padding), and only
  the matched priors are encoded (about 0.3 % of them on real data) instead of all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd.boxes import DEFAULT_VARIANCES, box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh

#: take the host shortcuts (see the module docstring) for tensors on the CPU; tests turn them off
#: to check the static-shape path, the one accelerators run, on the CPU
HOST_SHORTCUTS_ON_CPU = True


def _host_shortcuts(tensor: Tensor) -> bool:
    return HOST_SHORTCUTS_ON_CPU and tensor.device.type == "cpu"


#: matching strategies by config name (``matching.strategy``); see :func:`register_matcher`
MATCHERS: dict[str, type] = {}


def register_matcher(name: str):
    """Class decorator: make a matcher class available as ``matching.strategy=name``.

    A matcher is built with the ``matching`` config section (``ssd.coding.MatchingConfig``) and
    called as ``matcher(priors (P, 4) cxcywh, gt_boxes (B, G, 4) xyxy, gt_mask (B, G))`` to give
    each prior the index of its ground truth, ``(B, P)`` int64, or -1 for background. Labels and
    encoded box targets follow from that assignment (:func:`targets_from_assignment`), so a new
    assigner (ATSS, ...) is one class here plus its name in the config.
    """

    def add(cls: type) -> type:
        MATCHERS[name] = cls
        return cls

    return add


@register_matcher("max_iou")
class MaxIoUMatcher:
    """The paper's matching (section 2.2): bipartite best prior per box, then IoU >= threshold."""

    def __init__(self, cfg) -> None:
        self.iou_threshold = float(cfg.iou_threshold)

    def __call__(self, priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor) -> Tensor:
        return assign_max_iou(priors, gt_boxes, gt_mask, self.iou_threshold)


def match_priors(
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    gt_mask: Tensor,
    iou_threshold: float = 0.5,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
) -> tuple[Tensor, Tensor]:
    """Assign every prior of every image a class label and an encoded box target (the paper's
    strategy: :func:`assign_max_iou`, then :func:`targets_from_assignment`).

    Args:
        priors: (P, 4) cxcywh in [0, 1].
        gt_boxes: (B, G, 4) xyxy in [0, 1], padded to the batch's largest G.
        gt_labels: (B, G) int64 in 1..C (padding entries are ignored).
        gt_mask: (B, G) bool, True for real boxes, False for padding.
        iou_threshold: IoU at or above which a prior is matched (0.5 in the paper).
        variances: box-encoding variances.
    Returns:
        labels: (B, P) int64, 0 for background.
        box_targets: (B, P, 4) offsets of the matched ground truth (see :func:`ssd.boxes.encode`)
            where ``labels > 0``, zero elsewhere.
    """
    if _host_shortcuts(gt_mask) and gt_mask.shape[1] > 0:
        _check_threshold(iou_threshold)
        slot, box = _matches_on_host(priors, gt_boxes, gt_mask, iou_threshold)
        return _targets_on_host(slot, box, priors, gt_boxes, gt_labels, variances)
    assigned = assign_max_iou(priors, gt_boxes, gt_mask, iou_threshold)
    return targets_from_assignment(assigned, priors, gt_boxes, gt_labels, variances)


def _check_threshold(iou_threshold: float) -> None:
    if not iou_threshold > 0:
        # Padding boxes have IoU 0 with every prior; a threshold of 0 would match them.
        raise ValueError(f"matching.iou_threshold must be > 0, got {iou_threshold}")


def assign_max_iou(priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Each prior's ground-truth index, or -1 for background.

    Args:
        priors: (P, 4) cxcywh in [0, 1].
        gt_boxes: (B, G, 4) xyxy, padded; gt_mask: (B, G) bool, True for real boxes.
        iou_threshold: IoU at or above which a prior is matched (> 0).
    Returns:
        (B, P) int64 in -1..G-1.
    """
    _check_threshold(iou_threshold)
    batch, num_gt = gt_mask.shape
    num_priors = priors.shape[0]
    if num_gt == 0:  # no ground truth anywhere in the batch
        return torch.full((batch, num_priors), -1, dtype=torch.long, device=gt_mask.device)

    # Padding becomes the empty box (0, 0, 0, 0), whose IoU with anything is 0: it can never be
    # a prior's match (matches need IoU >= threshold > 0, or the bipartite step, which padding
    # skips below). Masking the (B, G, 4) boxes is much cheaper than masking a (B, G, P) IoU.
    if _host_shortcuts(gt_mask):
        slot, box = _matches_on_host(priors, gt_boxes, gt_mask, iou_threshold)
        assigned = torch.full((batch, num_priors), -1, dtype=torch.long)
        assigned.view(-1)[slot] = box
        return assigned
    real_boxes = gt_boxes * gt_mask[..., None]
    best_gt_iou, best_gt_idx, best_prior_idx = _best_matches(real_boxes, cxcywh_to_xyxy(priors))

    # Bipartite step. Padding boxes scatter into a scratch column P that is dropped afterwards;
    # scatter_reduce("amax") makes the higher ground-truth index win a contested prior
    # deterministically on every device.
    gt_index = torch.arange(num_gt, device=gt_mask.device).expand(batch, num_gt)
    target_prior = torch.where(gt_mask, best_prior_idx, torch.full_like(best_prior_idx, num_priors))
    forced = torch.full((batch, num_priors + 1), -1, dtype=torch.long, device=gt_mask.device)
    forced.scatter_reduce_(1, target_prior, gt_index, reduce="amax")
    forced = forced[:, :num_priors]  # (B, P): forced ground-truth index or -1
    is_forced = forced >= 0
    best_gt_idx = torch.where(is_forced, forced, best_gt_idx)
    positive = is_forced | (best_gt_iou >= iou_threshold)
    return torch.where(positive, best_gt_idx, torch.full_like(best_gt_idx, -1))


def targets_from_assignment(
    assigned: Tensor,
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    variances: tuple[float, float] = DEFAULT_VARIANCES,
) -> tuple[Tensor, Tensor]:
    """Labels and encoded box targets of an assignment.

    Args:
        assigned: (B, P) int64 ground-truth index per prior, -1 for background.
        priors: (P, 4) cxcywh; gt_boxes: (B, G, 4) xyxy; gt_labels: (B, G) int64.
    Returns:
        labels (B, P) int64 (0: background) and box_targets (B, P, 4), zero off the positives.
    """
    batch, num_priors = assigned.shape
    positive = assigned >= 0
    if gt_labels.shape[1] == 0:  # a shape, known on the host: no sync
        return gt_labels.new_zeros((batch, num_priors)), priors.new_zeros((batch, num_priors, 4))
    if _host_shortcuts(assigned):
        slot = positive.reshape(-1).nonzero().squeeze(1)
        return _targets_on_host(slot, assigned.reshape(-1)[slot], priors, gt_boxes, gt_labels, variances)
    # Background (-1) reads a prepended label 0: one gather, no masking of the (B, P) result.
    labels = torch.cat((gt_labels.new_zeros((batch, 1)), gt_labels), 1).gather(1, assigned + 1)
    # Every prior's target is encoded (background reads ground truth 0) and the background's
    # zeroed: static shapes, no ``nonzero`` (whose output size the host must wait for). This is
    # ssd.boxes.encode, bit for bit, with its per-box steps (xyxy -> cxcywh, the size clamp) done
    # once per ground truth (B, G), so that only a gather and six elementwise ops make (B, P, *)
    # temporaries. The cost is on a CPU: ~20 ms for 32 x 8732 priors against ~1.5 ms for
    # encoding the positives only, noise beside a CPU training step of seconds.
    gt = _encoded_gt(gt_boxes, priors.dtype)  # (B, G, 4) cx, cy, w, h, encode's zero-size clamp
    index = assigned.clamp(min=0).unsqueeze(-1).expand(batch, num_priors, 4)
    matched = gt.gather(1, index)  # (B, P, 4)
    centre = (matched[..., :2] - priors[:, :2]) / (variances[0] * priors[:, 2:])
    size = torch.log(matched[..., 2:] / priors[:, 2:]) / variances[1]
    box_targets = torch.cat((centre, size), dim=-1)  # (B, P, 4)
    # where, not a product: a background prior's (padding) box may encode to a non-finite value
    return labels, torch.where(positive.unsqueeze(-1), box_targets, box_targets.new_zeros(()))


def _encoded_gt(gt_boxes: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, G, 4) cx, cy, w, h of the ground truth with encode's zero-size clamp."""
    gt = xyxy_to_cxcywh(gt_boxes.to(dtype))
    return torch.cat((gt[..., :2], gt[..., 2:].clamp(min=1e-6)), dim=-1)


def _targets_on_host(
    slot: Tensor,
    box: Tensor,
    priors: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    variances: tuple[float, float],
) -> tuple[Tensor, Tensor]:
    """``targets_from_assignment`` for CPU tensors, from the matched priors only (equal bit for
    bit to the dense path, which encodes every prior).

    Args:
        slot: (N,) flat index ``image * P + prior`` of each matched prior; box: (N,) its ground
            truth's index in the image.
        priors: (P, 4) cxcywh; gt_boxes: (B, G, 4) xyxy; gt_labels: (B, G) int64.
    Returns:
        labels (B, P) int64 and box_targets (B, P, 4), zero off the matched priors.
    """
    batch, num_priors = gt_boxes.shape[0], priors.shape[0]
    image, prior = slot // num_priors, slot % num_priors
    labels = gt_labels.new_zeros((batch, num_priors))
    labels.view(-1)[slot] = gt_labels[image, box]
    matched = _encoded_gt(gt_boxes, priors.dtype)[image, box]  # (N, 4)
    chosen = priors[prior]  # (N, 4)
    # the dense path's arithmetic, op for op, on the N matched priors
    centre = (matched[:, :2] - chosen[:, :2]) / (variances[0] * chosen[:, 2:])
    size = torch.log(matched[:, 2:] / chosen[:, 2:]) / variances[1]
    box_targets = priors.new_zeros((batch, num_priors, 4))
    box_targets.view(-1, 4)[slot] = torch.cat((centre, size), dim=-1)
    return labels, box_targets


def _chunk_size(batch: int, num_gt: int, num_priors: int, device: torch.device) -> int:
    """Priors per IoU chunk: all at once on a GPU (kernel launches cost more than memory there);
    on a CPU about 256k IoU values (1 MB), so every temporary stays in cache instead of being a
    fresh 45 MB allocation that the OS maps and page-faults on every call (measured 3.7x faster
    for 32 images x 40 boxes x 8732 priors, benchmarks/bench_matching.py)."""
    if device.type != "cpu":
        return num_priors
    return max(64, (1 << 18) // max(batch * num_gt, 1))


def _best_matches(gt_boxes: Tensor, priors_xyxy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Both directions of the best IoU, computed over chunks of priors.

    Args:
        gt_boxes: (B, G, 4) xyxy (padding as empty boxes).
        priors_xyxy: (P, 4) xyxy.
    Returns:
        best_gt_iou (B, P) and best_gt_idx (B, P): each prior's best ground truth (first on ties);
        best_prior_idx (B, G): each ground truth's best prior (first on ties).
    """
    batch, num_gt, _ = gt_boxes.shape
    num_priors = priors_xyxy.shape[0]
    chunk = _chunk_size(batch, num_gt, num_priors, gt_boxes.device)
    best_gt_iou = gt_boxes.new_empty((batch, num_priors))
    best_gt_idx = torch.empty((batch, num_priors), dtype=torch.long, device=gt_boxes.device)
    best_prior_iou = gt_boxes.new_full((batch, num_gt), -1.0)
    best_prior_idx = torch.zeros((batch, num_gt), dtype=torch.long, device=gt_boxes.device)
    for start in range(0, num_priors, chunk):  # a few dozen chunks, never a loop over boxes
        iou = box_iou(gt_boxes, priors_xyxy[start : start + chunk])  # (B, G, chunk)
        best_gt_iou[:, start : start + chunk], best_gt_idx[:, start : start + chunk] = iou.max(dim=1)
        chunk_iou, chunk_idx = iou.max(dim=2)  # (B, G)
        better = chunk_iou > best_prior_iou  # strict: an earlier chunk keeps ties (first maximum)
        best_prior_iou = torch.where(better, chunk_iou, best_prior_iou)
        best_prior_idx = torch.where(better, chunk_idx + start, best_prior_idx)
    return best_gt_iou, best_gt_idx, best_prior_idx


def _matches_on_host(
    priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """:func:`assign_max_iou`'s matches for CPU tensors, equal bit for bit, reading values on
    the host, as a sparse list.

    - Images are matched in groups of similar box count, each padded only to a power of two
      >= its largest count, so the IoU work follows the real boxes, not the batch's largest image.
    - Each prior's best IoU is a values-only ``amax`` over the boxes (~30x cheaper on a CPU than
      ``max`` with indices along that axis); the best box's index is found afterwards, only for
      the priors at or above the threshold (a few hundred of the batch's B x P), from their IoU
      with their image's boxes, recomputed by the same arithmetic.
    - The bipartite step touches only the forced priors.

    Args:
        priors: (P, 4) cxcywh; gt_boxes: (B, G, 4) xyxy, padded; gt_mask: (B, G) bool.
    Returns:
        slot (N,): ``image * P + prior`` of every matched prior, ascending; box (N,): the index
        of its ground truth in the image.
    """
    batch, num_gt = gt_mask.shape
    priors_xyxy = cxcywh_to_xyxy(priors)
    num_priors = priors_xyxy.shape[0]
    # padding as the empty box (IoU 0 with everything); real boxes first, in their order, so
    # "the first maximum" stays the first real box
    order = torch.sort((~gt_mask).to(torch.uint8), dim=1, stable=True).indices  # (B, G)
    boxes = (gt_boxes * gt_mask[..., None]).gather(1, order.unsqueeze(-1).expand(batch, num_gt, 4))
    counts = gt_mask.sum(dim=1).tolist()
    best_gt_iou = boxes.new_empty((batch, num_priors))
    best_prior_idx = torch.zeros((batch, num_gt), dtype=torch.long)  # original box order
    width_of = [1 << max(count - 1, 0).bit_length() for count in counts]  # 1, 2, 4, 8, ...
    for width in sorted(set(width_of)):
        images = torch.tensor([i for i, w in enumerate(width_of) if w == width])
        width = min(width, num_gt)
        iou, prior = _best_values(boxes[images, :width], priors_xyxy)
        best_gt_iou[images] = iou
        best_prior_idx[images.unsqueeze(1), order[images, :width]] = prior

    # threshold matches: each prior's best box, found for the priors that reach the threshold
    slot = (best_gt_iou.view(-1) >= iou_threshold).nonzero().squeeze(1)  # (N,) ascending
    image, prior = slot // num_priors, slot % num_priors
    pair_iou = box_iou(boxes[image], priors_xyxy[prior].unsqueeze(1)).squeeze(-1)  # (N, G)
    box = order[image].gather(1, pair_iou.max(dim=1).indices.unsqueeze(1)).squeeze(1)
    # bipartite step: every real box forces its best prior, over its threshold match; of two
    # boxes forcing one prior the higher index wins. Sorted by (slot, forced, box), the last of
    # each slot's run is kept.
    forced_image, forced_box = gt_mask.nonzero(as_tuple=True)
    forced_slot = forced_image * num_priors + best_prior_idx[forced_image, forced_box]
    key = torch.cat((slot * 2, forced_slot * 2 + 1)) * num_gt + torch.cat((box, forced_box))
    key = key.sort().values
    slot, box = key // (2 * num_gt), key % num_gt
    last = torch.ones_like(slot, dtype=torch.bool)
    last[:-1] = slot[1:] != slot[:-1]
    return slot[last], box[last]


def _best_values(gt_boxes: Tensor, priors_xyxy: Tensor) -> tuple[Tensor, Tensor]:
    """Each prior's best IoU (values only) and each box's best prior, over chunks of priors.

    Args:
        gt_boxes: (B, G, 4) xyxy (padding as empty boxes); priors_xyxy: (P, 4) xyxy.
    Returns:
        best_gt_iou (B, P); best_prior_idx (B, G), first on ties (as :func:`_best_matches`).
    """
    batch, num_gt, _ = gt_boxes.shape
    num_priors = priors_xyxy.shape[0]
    chunk = _chunk_size(batch, num_gt, num_priors, gt_boxes.device)
    best_gt_iou = gt_boxes.new_empty((batch, num_priors))
    best_prior_iou = gt_boxes.new_full((batch, num_gt), -1.0)
    best_prior_idx = torch.zeros((batch, num_gt), dtype=torch.long, device=gt_boxes.device)
    for start in range(0, num_priors, chunk):
        iou = box_iou(gt_boxes, priors_xyxy[start : start + chunk])  # (B, G, chunk)
        torch.amax(iou, dim=1, out=best_gt_iou[:, start : start + chunk])
        chunk_iou, chunk_idx = iou.max(dim=2)  # (B, G): along the contiguous axis, cheap
        better = chunk_iou > best_prior_iou  # strict: an earlier chunk keeps ties (first maximum)
        best_prior_iou = torch.where(better, chunk_iou, best_prior_iou)
        best_prior_idx = torch.where(better, chunk_idx + start, best_prior_idx)
    return best_gt_iou, best_prior_idx


def pad_targets(
    boxes: list[Tensor], labels: list[Tensor], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Pad per-image ground truth to a batch.

    Args:
        boxes: B tensors (G_i, 4) xyxy.
        labels: B tensors (G_i,) int64.
    Returns:
        gt_boxes (B, G, 4), gt_labels (B, G), gt_mask (B, G) with G = max G_i (at least 1 so
        shapes stay static-friendly; an all-False mask then means "no ground truth").
    """
    batch = len(boxes)
    max_gt = max([1] + [b.numel() // 4 for b in boxes])
    dtype = boxes[0].dtype if batch else torch.float32
    # Built in pinned memory for a GPU: a "non-blocking" copy from pageable memory is staged by
    # the driver, which may wait for the stream, a host sync on every step.
    pin = device is not None and torch.device(device).type == "cuda"
    gt_boxes = torch.zeros((batch, max_gt, 4), dtype=dtype, pin_memory=pin)
    gt_labels = torch.zeros((batch, max_gt), dtype=torch.long, pin_memory=pin)
    gt_mask = torch.zeros((batch, max_gt), dtype=torch.bool, pin_memory=pin)
    counts = [b.numel() // 4 for b in boxes]
    if sum(counts):
        # one scatter of all boxes (a few ops whatever B; a per-image loop cost ~15 us an image)
        count = torch.tensor(counts)
        image = torch.repeat_interleave(torch.arange(batch), count)
        first = torch.repeat_interleave(count.cumsum(0) - count, count)
        slot = torch.arange(len(image)) - first
        # an empty list may arrive as shape (0,)
        gt_boxes[image, slot] = torch.cat([b.reshape(-1, 4) for b in boxes]).to(dtype)
        gt_labels[image, slot] = torch.cat([lab.reshape(-1) for lab in labels]).to(torch.long)
        gt_mask[image, slot] = True
    if device is not None:
        gt_boxes, gt_labels, gt_mask = (t.to(device, non_blocking=True) for t in (gt_boxes, gt_labels, gt_mask))
    return gt_boxes, gt_labels, gt_mask
