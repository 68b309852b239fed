import math

import pytest
import torch
import torch.nn.functional as F

from ssd.loss import MultiBoxLoss, hard_negative_mask


def test_hard_negative_mask_keeps_exactly_min_of_ratio_and_available():
    g = torch.Generator().manual_seed(0)
    ce = torch.rand(4, 50, generator=g)
    positive = torch.zeros(4, 50, dtype=torch.bool)
    positive[0, :2] = True  # 2 positives -> 6 negatives
    positive[1, :20] = True  # 20 positives -> 60 > 30 negatives available -> 30
    positive[3, :1] = True  # 1 positive -> 3
    keep = hard_negative_mask(ce, positive, neg_ratio=3)
    assert keep.sum(1).tolist() == [6, 30, 0, 3]
    assert not (keep & positive).any()
    for i in range(4):
        if keep[i].any():
            # every kept negative's loss >= every dropped negative's loss
            dropped = ~keep[i] & ~positive[i]
            if dropped.any():
                assert ce[i][keep[i]].min() >= ce[i][dropped].max()


def test_fractional_ratio_floors():
    ce = torch.arange(10.0)[None]
    positive = torch.zeros(1, 10, dtype=torch.bool)
    positive[0, 0] = True
    keep = hard_negative_mask(ce, positive, neg_ratio=2.5)
    assert keep[0].nonzero().flatten().tolist() == [8, 9]


def test_loss_hand_computed():
    # One image, 4 priors, 2 classes. Prior 0 positive (label 1); 3 negatives; neg_ratio 1 keeps
    # only the hardest negative: prior 2 (largest background CE).
    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 3.0], [2.0, 0.0]]])
    labels = torch.tensor([[1, 0, 0, 0]])
    loc = torch.tensor([[[0.5, -2.0, 0.0, 0.0]] + [[9.0, 9.0, 9.0, 9.0]] * 3])
    targets = torch.zeros(1, 4, 4)
    out = MultiBoxLoss(neg_ratio=1, loc_weight=2.0)(loc, logits, labels, targets)
    ce_pos = -math.log(math.exp(2) / (1 + math.exp(2)))
    ce_neg = -math.log(1 / (1 + math.exp(3)))
    smooth_l1 = 0.5 * 0.5**2 + (2.0 - 0.5)  # |x| < 1 -> x^2/2, else |x| - 1/2
    assert out["loss_conf"].item() == pytest.approx(ce_pos + ce_neg, rel=1e-5)
    assert out["loss_loc"].item() == pytest.approx(smooth_l1, rel=1e-5)
    assert out["loss"].item() == pytest.approx(ce_pos + ce_neg + 2 * smooth_l1, rel=1e-5)
    assert out["num_pos"].item() == 1


def test_normalised_by_positives_over_the_batch_and_no_positive_is_finite():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 30, 5, generator=g)
    loc = torch.randn(2, 30, 4, generator=g)
    targets = torch.randn(2, 30, 4, generator=g)
    labels = torch.zeros(2, 30, dtype=torch.long)
    out = MultiBoxLoss()(loc, logits, labels, targets)
    assert out["loss"].item() == 0.0  # no positive -> no negative either
    labels[0, 3] = 2
    labels[1, 7] = 4
    labels[1, 8] = 1
    out = MultiBoxLoss(neg_ratio=3)(loc, logits, labels, targets)
    pos = labels > 0
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(2, 30)
    keep = pos | hard_negative_mask(ce, pos, 3)
    assert out["loss_conf"].item() == pytest.approx((ce * keep).sum().item() / 3, rel=1e-5)
    expected_loc = F.smooth_l1_loss(loc[pos], targets[pos], reduction="sum").item() / 3
    assert out["loss_loc"].item() == pytest.approx(expected_loc, rel=1e-5)


def test_gradients_flow_only_through_kept_priors():
    logits = torch.randn(1, 20, 3, requires_grad=True)
    loc = torch.randn(1, 20, 4, requires_grad=True)
    labels = torch.zeros(1, 20, dtype=torch.long)
    labels[0, 0] = 1
    MultiBoxLoss(neg_ratio=3)(loc, logits, labels, torch.zeros(1, 20, 4))["loss"].backward()
    assert (logits.grad.abs().sum(-1) > 0).sum().item() == 4  # 1 positive + 3 negatives
    assert (loc.grad.abs().sum(-1) > 0).sum().item() == 1
