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
- **host shortcuts** (tensors on the CPU, where reading a value costs nothing): IoU is computed
  only for the prior/box pairs that can match. Priors are grouped in blocks of nearby priors of
  similar size; an upper bound of a box's IoU with a block skips the blocks that cannot hold a
  match (on real VOC and COCO boxes about 95 % of the pairs), and only the matched priors are
  encoded (about 0.3 % of them) instead of all.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssd.boxes import DEFAULT_VARIANCES, box_area, box_iou, cxcywh_to_xyxy, xyxy_to_cxcywh

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


#: priors per block of the CPU path's pruning (:class:`_PriorBlocks`); 32 measured fastest on real
#: VOC and COCO boxes against 16 and 64 (benchmarks/bench_matching.py)
PRIOR_BLOCK = 32


class _PriorBlocks:
    """The priors regrouped into blocks of :data:`PRIOR_BLOCK` priors of similar size that lie
    close together, with each block's bounds, so that a box's IoU is computed only with the
    blocks that can hold a match.

    Any (P, 4) priors work: blocks are formed from the values, not from a prior spec. Priors are
    sorted by size class (width and height on a half-octave scale), then along a Z-order curve of
    their centres, so on the regular grids of SSD's feature maps a block is a compact tile of one
    prior shape. The bounds only decide which blocks are visited, so grouping affects speed,
    never the result.
    """

    def __init__(self, priors_xyxy: Tensor, block: int = PRIOR_BLOCK) -> None:
        num_priors = priors_xyxy.shape[0]
        x1, y1, x2, y2 = priors_xyxy.unbind(-1)
        size = torch.stack(((x2 - x1), (y2 - y1)), 1).clamp(min=1e-6).log2().mul(2).round().long()
        size = size.clamp(-63, 64) + 63  # (P, 2) in 0..127
        centre = torch.stack(((x1 + x2) / 2, (y1 + y2) / 2), 1).clamp(0, 1).mul(1023).long()  # (P, 2)
        key = ((size[:, 0] * 128 + size[:, 1]) << 20) | _z_order(centre)
        order = torch.sort(key, stable=True).indices
        num_blocks = -(-num_priors // block)
        pad = num_blocks * block - num_priors
        #: (NB, S) each slot's prior index; P in the last block's padding
        self.index = torch.cat((order, order.new_full((pad,), num_priors))).view(num_blocks, block)
        # padding: an empty box (IoU 0 with anything), left out of the bounds below
        xyxy = torch.cat((priors_xyxy[order], priors_xyxy.new_zeros((pad, 4))))
        #: (NB, S, 4) the priors' xyxy, as the dense path has them (same values, same IoU bits)
        self.xyxy = xyxy.view(num_blocks, block, 4).contiguous()
        real = self.index < num_priors
        x1, y1, x2, y2 = self.xyxy.unbind(-1)
        inf = torch.tensor(float("inf"), dtype=priors_xyxy.dtype)
        #: (NB,) each block's extent (the union of its priors), largest width and height, and
        #: smallest area (computed as box_area computes it)
        self.lo_x, self.lo_y = torch.where(real, x1, inf).amin(1), torch.where(real, y1, inf).amin(1)
        self.hi_x, self.hi_y = torch.where(real, x2, -inf).amax(1), torch.where(real, y2, -inf).amax(1)
        self.w_max = torch.where(real, (x2 - x1).clamp(min=0), -inf).amax(1)
        self.h_max = torch.where(real, (y2 - y1).clamp(min=0), -inf).amax(1)
        self.area_min = torch.where(real, box_area(self.xyxy), inf).amin(1)

    def iou_bounds(self, boxes: Tensor) -> tuple[Tensor, Tensor]:
        """Bounds of each box's IoU with the priors of each block.

        Args:
            boxes: (N, 4) xyxy.
        Returns:
            overlaps (N, NB) bool: False where no prior of the block can intersect the box (their
            IoUs are exactly 0); bound (N, NB): at least the IoU (as :func:`ssd.boxes.box_iou`
            computes it) of the box with any prior of the block.
        """
        bx1, by1, bx2, by2 = boxes.unsqueeze(1).unbind(-1)  # 4 x (N, 1)
        box_w, box_h = (bx2 - bx1).clamp(min=0), (by2 - by1).clamp(min=0)
        # A prior's intersection with the box is at most the box's overlap with the block's
        # extent, and no wider (taller) than the box or the block's widest (tallest) prior. Float
        # subtraction and min/max are monotone, so these hold for the computed values exactly.
        inter_w = torch.minimum(bx2, self.hi_x).sub_(torch.maximum(bx1, self.lo_x)).clamp_(min=0)
        inter_w = torch.minimum(torch.minimum(inter_w, box_w), self.w_max)
        inter_h = torch.minimum(by2, self.hi_y).sub_(torch.maximum(by1, self.lo_y)).clamp_(min=0)
        inter_h = torch.minimum(torch.minimum(inter_h, box_h), self.h_max)
        inter = inter_w.mul_(inter_h)  # (N, NB)
        # IoU = I / (A_box + A_prior - I) grows with I and falls with A_prior, and the union is
        # at least the box's area: IoU <= I_max / max(A_box, A_box + A_min - I_max).
        box_area_ = box_w * box_h  # (N, 1)
        union = torch.maximum(box_area_.expand_as(inter), (box_area_ + self.area_min).sub_(inter))
        bound = inter / union.clamp_(min=torch.finfo(inter.dtype).tiny)
        # A margin for rounding: the bound and the IoU are each a few roundings from exact.
        return inter > 0, bound.mul_(1 + 64 * torch.finfo(bound.dtype).eps)


def _z_order(cells: Tensor) -> Tensor:
    """(N, 2) int64 in [0, 1024) -> (N,) their Z-order (Morton) codes: the bits interleaved."""
    code = torch.zeros(cells.shape[0], dtype=torch.long)
    for bit in range(10):
        code |= ((cells[:, 0] >> bit) & 1) << (2 * bit)
        code |= ((cells[:, 1] >> bit) & 1) << (2 * bit + 1)
    return code


#: the blocks of the last few prior sets matched (a run matches against one or two)
_BLOCKS_CACHE: list[tuple[Tensor, _PriorBlocks]] = []


def _prior_blocks(priors_xyxy: Tensor) -> _PriorBlocks:
    for known, blocks in _BLOCKS_CACHE:
        if known.shape == priors_xyxy.shape and known.dtype == priors_xyxy.dtype and torch.equal(known, priors_xyxy):
            return blocks
    blocks = _PriorBlocks(priors_xyxy)
    _BLOCKS_CACHE.append((priors_xyxy.clone(), blocks))
    del _BLOCKS_CACHE[:-4]
    return blocks


def _matches_on_host(
    priors: Tensor, gt_boxes: Tensor, gt_mask: Tensor, iou_threshold: float
) -> tuple[Tensor, Tensor]:
    """:func:`assign_max_iou`'s matches for CPU tensors, equal bit for bit, as a sparse list,
    computing IoU only where a match can be.

    On real data almost all prior/box pairs cannot match: 22 % of them overlap at all and 0.1 %
    reach IoU 0.5 (VOC boxes against the SSD300 priors). The priors are grouped in blocks of
    similar, nearby priors (:class:`_PriorBlocks`), and for each real box:

    1. an upper bound of its IoU with each block's priors;
    2. the IoU with every prior of the blocks whose bound reaches the threshold (they hold all
       the box's threshold matches), or, for a box no block can match, of its best-bounded
       blocks;
    3. for a box whose best IoU so far is below the threshold, also the blocks whose bound
       reaches that best IoU (they hold its true best prior and every tie).

    About 5 % of the dense path's pairs are computed, with the same arithmetic (same bits).
    Ties resolve as the dense path's first maximum: the lowest box index for a prior, the lowest
    prior index for a box; a box that overlaps no prior (IoU 0 everywhere) takes prior 0.

    Args:
        priors: (P, 4) cxcywh; gt_boxes: (B, G, 4) xyxy, padded; gt_mask: (B, G) bool.
    Returns:
        slot (N,): ``image * P + prior`` of every matched prior, ascending; box (N,): the index
        of its ground truth in the image.
    """
    num_gt = gt_mask.shape[1]
    priors_xyxy = cxcywh_to_xyxy(priors)
    num_priors = priors_xyxy.shape[0]
    blocks = _prior_blocks(priors_xyxy)
    image, gt_index = gt_mask.nonzero(as_tuple=True)  # (N,): the real boxes
    boxes = gt_boxes[image, gt_index]  # (N, 4)
    num_boxes = boxes.shape[0]

    overlaps, bound = blocks.iou_bounds(boxes)  # (N, NB)
    # first visit: the blocks whose bound reaches the threshold or, for a box no block can match,
    # 0.7 of its best bound (bounds of one prior shape saturate at one value, so a box's best
    # few blocks are a good start: a higher best IoU leaves fewer blocks for the second visit)
    wanted = bound.amax(1, keepdim=True).mul_(0.7).clamp_(max=iou_threshold)
    visit = overlaps & (bound >= wanted)
    box_of, block_of = visit.nonzero(as_tuple=True)  # (K,) pairs of a box and a block
    iou = box_iou(boxes[box_of].unsqueeze(1), blocks.xyxy[block_of]).squeeze(1)  # (K, S)
    best = boxes.new_zeros(num_boxes).scatter_reduce_(0, box_of, iou.amax(1), "amax")
    more = overlaps & ~visit & (bound >= best[:, None]) & (best < iou_threshold)[:, None]
    if more.any():  # boxes below the threshold: the blocks that may hold a better prior or a tie
        extra_box, extra_block = more.nonzero(as_tuple=True)
        extra = box_iou(boxes[extra_box].unsqueeze(1), blocks.xyxy[extra_block]).squeeze(1)
        box_of, block_of = torch.cat((box_of, extra_box)), torch.cat((block_of, extra_block))
        iou = torch.cat((iou, extra))
    row_best = iou.amax(1)  # (K,)
    best = boxes.new_zeros(num_boxes).scatter_reduce_(0, box_of, row_best, "amax")

    # each box's best prior (bipartite step): the lowest prior index at the box's best IoU
    rows = ((row_best == best[box_of]) & (row_best > 0)).nonzero().squeeze(1)
    at_best = iou[rows] == row_best[rows, None]
    lowest = torch.where(at_best, blocks.index[block_of[rows]], num_priors).amin(1)
    best_prior = torch.full((num_boxes,), num_priors).scatter_reduce_(0, box_of[rows], lowest, "amin")
    best_prior = torch.where(best > 0, best_prior, torch.zeros_like(best_prior))

    # threshold matches: each prior's best box (the lowest index among equal IoUs)
    rows = (row_best >= iou_threshold).nonzero().squeeze(1)
    row, column = (iou[rows] >= iou_threshold).nonzero(as_tuple=True)
    row = rows[row]
    pair_iou, pair_box = iou[row, column], box_of[row]
    slot, group = torch.unique(image[pair_box] * num_priors + blocks.index[block_of[row], column],
                               return_inverse=True)  # ascending
    slot_best = pair_iou.new_zeros(slot.shape[0]).scatter_reduce_(0, group, pair_iou, "amax")
    at_best = pair_iou == slot_best[group]
    box = torch.full_like(slot, num_gt).scatter_reduce_(0, group[at_best], gt_index[pair_box[at_best]], "amin")

    # bipartite step: every real box forces its best prior, over its threshold match; of two
    # boxes forcing one prior the higher index wins. Sorted by (slot, forced, box), the last of
    # each slot's run is kept.
    forced_slot = image * num_priors + best_prior
    key = torch.cat((slot * 2, forced_slot * 2 + 1)) * num_gt + torch.cat((box, gt_index))
    key = key.sort().values
    slot, box = key // (2 * num_gt), key % num_gt
    last = torch.ones_like(slot, dtype=torch.bool)
    last[:-1] = slot[1:] != slot[:-1]
    return slot[last], box[last]


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
