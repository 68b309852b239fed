"""MultiBox loss (SSD paper, section 2.2 "Training objective" and "Hard negative mining").

    L = (L_conf + alpha * L_loc) / N

with N the number of matched (positive) priors in the batch, L_loc the Smooth-L1 loss over the
positives' encoded offsets and L_conf the cross-entropy over the positives and the hardest
negatives: per image, the negatives with the highest confidence loss, at most
``neg_ratio`` x that image's positives.

Everything runs on static shapes (masks by ``where``, mining by a sort and a rank comparison):
no ``nonzero``, boolean indexing or ``.item()``, so the training step never waits for the
device (tests/test_sync_free.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def hard_negative_mask(ce: Tensor, positive: Tensor, neg_ratio: float) -> Tensor:
    """Select the hardest negatives per image.

    Args:
        ce: (B, P) per-prior cross-entropy against the assigned label.
        positive: (B, P) bool mask of matched priors.
        neg_ratio: negatives kept per positive.
    Returns:
        (B, P) bool mask of the kept negatives: exactly min(floor(neg_ratio * pos_i), neg_i)
        priors of image i, those with the largest loss (ties broken by sort order).
    """
    num_pos = positive.sum(dim=1, keepdim=True)  # (B, 1)
    num_neg = torch.minimum(
        (num_pos * neg_ratio).floor().long(), positive.shape[1] - num_pos
    )  # (B, 1)
    neg_loss = ce.detach().masked_fill(positive, float("-inf"))
    order = neg_loss.argsort(dim=1, descending=True)  # (B, P) prior indices, hardest first
    # rank[b, p] = position of prior p in image b's ordering (inverse permutation; one scatter
    # instead of torchvision's second argsort).
    ranks = torch.arange(ce.shape[1], device=ce.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return rank < num_neg


class MultiBoxLoss(nn.Module):
    """Smooth-L1 localisation + cross-entropy with hard negative mining.

    Args:
        neg_ratio: hard negatives kept per positive, per image (paper: 3).
        loc_weight: alpha, the weight of the localisation term (paper: 1).
    """

    def __init__(self, neg_ratio: float = 3.0, loc_weight: float = 1.0) -> None:
        super().__init__()
        if neg_ratio < 0:
            raise ValueError(f"loss.neg_ratio must be >= 0, got {neg_ratio}")
        self.neg_ratio = neg_ratio
        self.loc_weight = loc_weight

    def forward(
        self, loc_pred: Tensor, cls_logits: Tensor, labels: Tensor, box_targets: Tensor
    ) -> dict[str, Tensor]:
        """Compute the loss.

        Args:
            loc_pred: (B, P, 4) predicted offsets.
            cls_logits: (B, P, C) class logits, class 0 = background.
            labels: (B, P) int64 matched labels (0 = background).
            box_targets: (B, P, 4) encoded offsets of the matched ground truth.
        Returns:
            ``loss`` (what to backpropagate), ``loss_loc`` and ``loss_conf`` (both already divided
            by N and before the alpha weight) and ``num_pos`` (N, float).
        """
        positive = labels > 0  # (B, P)
        # float32, not loc_pred's dtype: under bf16 autocast a count of 1000 positives would round
        # to 1000 +- 4, i.e. a ~0.4 % error in both terms.
        num_pos = positive.sum().clamp(min=1).float()

        # Every prior's Smooth-L1 and the positives' kept by ``where``: static shapes, no boolean
        # indexing (a host sync for the size of its result). ``where`` rather than a product so
        # that a background prior's non-finite prediction cannot leak NaN (inf * 0) into the sum.
        loc_each = F.smooth_l1_loss(loc_pred.float(), box_targets.float(), reduction="none", beta=1.0)
        loc_loss = torch.where(positive.unsqueeze(-1), loc_each, loc_each.new_zeros(())).sum()
        ce = F.cross_entropy(
            cls_logits.float().flatten(0, 1), labels.flatten(), reduction="none"
        ).view_as(labels)  # (B, P)
        keep = positive | hard_negative_mask(ce, positive, self.neg_ratio)
        conf_loss = (ce * keep).sum()

        loss_loc = loc_loss / num_pos
        loss_conf = conf_loss / num_pos
        return {
            "loss": loss_conf + self.loc_weight * loss_loc,
            "loss_loc": loss_loc,
            "loss_conf": loss_conf,
            "num_pos": positive.sum().float(),
        }
