"""Pure tensor box operations.

Conventions (see ARCHITECTURE.md, "Contracts"):
- ``xyxy``: (..., 4) ``x1, y1, x2, y2`` with x2 >= x1, y2 >= y1.
- ``cxcywh``: (..., 4) ``cx, cy, w, h``; priors are (P, 4) cxcywh in [0, 1].

Pairwise ops broadcast (N, 1, .) against (M, .) to (N, M), as torchvision's ``ops/boxes.py``.
Every function works on any leading batch dimensions unless it says otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The SSD paper's variances for (centre, size) offsets (Liu et al. 2016, the Caffe reference).
DEFAULT_VARIANCES: tuple[float, float] = (0.1, 0.2)


#: the keys of a target dict that hold one entry per object (box); the rest are per image
PER_OBJECT_KEYS: tuple[str, ...] = ("boxes", "labels", "difficult", "iscrowd", "truncated")

def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) x1,y1,x2,y2 -> (..., 4) cx,cy,w,h."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cx,cy,w,h -> (..., 4) x1,y1,x2,y2."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area; degenerate boxes have area 0, never negative."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes.

    Args:
        boxes1: (..., N, 4) xyxy.
        boxes2: (..., M, 4) xyxy (leading dims broadcast against ``boxes1``'s).
    Returns:
        (..., N, M) IoU in [0, 1]; 0 where both boxes are empty.
    """
    area1 = box_area(boxes1)  # (..., N)
    area2 = box_area(boxes2)  # (..., M)
    # Coordinate by coordinate, so each temporary is (..., N, M), never (..., N, M, 2), with the
    # M boxes' coordinates as contiguous rows so the broadcast inner loop vectorises; in-place
    # ops act only on tensors created here. Matching 32 x 40 boxes against 8732 priors is
    # memory-bound, so this is what makes it fast (benchmarks/bench_matching.py).
    a = boxes1.unsqueeze(-1).unbind(-2)  # 4 x (..., N, 1)
    b = boxes2.transpose(-1, -2).contiguous().unsqueeze(-2).unbind(-3)  # 4 x (..., 1, M)
    inter_w = torch.minimum(a[2], b[2]).sub_(torch.maximum(a[0], b[0])).clamp_(min=0)
    inter_h = torch.minimum(a[3], b[3]).sub_(torch.maximum(a[1], b[1])).clamp_(min=0)
    inter = inter_w.mul_(inter_h)  # (..., N, M)
    union = (area1[..., :, None] + area2[..., None, :]).sub_(inter)
    # union == 0 only when both boxes are empty; their IoU is defined as 0.
    return inter.div_(union.clamp_(min=torch.finfo(inter.dtype).tiny))


def clip_boxes(boxes: Tensor, height: float, width: float) -> Tensor:
    """Clamp (..., 4) xyxy boxes to the image [0, width] x [0, height]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )


def encode(
    boxes: Tensor, priors: Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES
) -> Tensor:
    """Encode ground-truth boxes as offsets from priors (SSD paper, eq. 2, with variances).

    Args:
        boxes: (..., P, 4) xyxy, same units as the priors (normally [0, 1]).
        priors: (P, 4) cxcywh.
        variances: (centre, size) variances, (0.1, 0.2) in the paper's reference code.
    Returns:
        (..., P, 4) offsets ``((cx-pcx)/(v0*pw), (cy-pcy)/(v0*ph), log(w/pw)/v1, log(h/ph)/v1)``.
    """
    matched = xyxy_to_cxcywh(boxes)
    centre = (matched[..., :2] - priors[:, :2]) / (variances[0] * priors[:, 2:])
    # A zero-size box would give log(0) = -inf: clamp to a tiny positive size instead.
    size = torch.log(matched[..., 2:].clamp(min=1e-6) / priors[:, 2:]) / variances[1]
    return torch.cat((centre, size), dim=-1)


def decode(
    offsets: Tensor, priors: Tensor, variances: tuple[float, float] = DEFAULT_VARIANCES
) -> Tensor:
    """Invert :func:`encode`.

    Args:
        offsets: (..., P, 4) predicted offsets.
        priors: (P, 4) cxcywh.
    Returns:
        (..., P, 4) xyxy boxes in the priors' units.
    """
    centre = priors[:, :2] + offsets[..., :2] * variances[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(offsets[..., 2:] * variances[1])
    return torch.cat((centre - size / 2, centre + size / 2), dim=-1)
