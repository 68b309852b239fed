import math
import sys

import pytest
import torch
import torch.nn.functional as F

from ssd import loss as loss_module
from ssd.loss import MultiBoxLoss, hard_negative_mask


@pytest.fixture(autouse=True, params=["host", "static"])
def implementation(request, monkeypatch):
    """Every test on both backward paths: the CPU's (kept rows only) and the accelerators'
    (static shapes, all rows)."""
    monkeypatch.setattr(loss_module, "HOST_SHORTCUTS_ON_CPU", request.param == "host")
    return request.param


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


# --- equal to the argsort implementation (issue 18) ---------------------------------------------
# A verbatim copy of the loss before issue 18 (git da7b6a9, ssd/loss.py), renamed: the reference
# the faster loss must equal, losses and gradients to 1e-6.


def _reference_hard_negative_mask(ce, positive, neg_ratio: float):
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


class _ReferenceMultiBoxLoss(torch.nn.Module):
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

    def forward(self, loc_pred, cls_logits, labels, box_targets):
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
        keep = positive | _reference_hard_negative_mask(ce, positive, self.neg_ratio)
        conf_loss = (ce * keep).sum()

        loss_loc = loc_loss / num_pos
        loss_conf = conf_loss / num_pos
        return {
            "loss": loss_conf + self.loc_weight * loss_loc,
            "loss_loc": loss_loc,
            "loss_conf": loss_conf,
            "num_pos": positive.sum().float(),
        }


def _stable_reference_mask(ce, positive, neg_ratio: float):
    """The reference's rule with its ties broken by prior index (a stable descending sort keeps
    equal losses in index order): what :func:`hard_negative_mask` promises. The reference's own
    ``argsort`` is not stable, so on ties it picks an arbitrary (but equally valid) subset."""
    num_pos = positive.sum(dim=1, keepdim=True)
    num_neg = torch.minimum((num_pos * neg_ratio).floor().long(), positive.shape[1] - num_pos)
    neg_loss = ce.detach().masked_fill(positive, float("-inf"))
    order = torch.sort(neg_loss, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(ce.shape[1]).expand_as(order))
    return rank < num_neg


def _labels(pos_fraction: list[float], num_priors: int, num_classes: int, seed: int):
    """(B, P) labels: image i has about ``pos_fraction[i]`` of its priors positive (random class)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for fraction in pos_fraction:
        positive = torch.rand(num_priors, generator=g) < fraction
        rows.append(torch.where(positive, torch.randint(1, num_classes, (num_priors,), generator=g), 0))
    return torch.stack(rows)


def _inputs(labels, num_classes: int, seed: int, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    batch, num_priors = labels.shape
    loc = torch.randn(batch, num_priors, 4, generator=g)
    logits = torch.randn(batch, num_priors, num_classes, generator=g) * scale
    targets = torch.randn(batch, num_priors, 4, generator=g) * (labels > 0).unsqueeze(-1)
    return loc, logits, targets


def _run(loss_fn, loc, logits, labels, targets):
    """Losses and the gradients w.r.t. loc and logits (fresh leaves of the same values)."""
    loc, logits = loc.clone().requires_grad_(), logits.clone().requires_grad_()
    out = loss_fn(loc, logits, labels, targets)
    out["loss"].backward()
    return out, loc.grad, logits.grad


def _assert_equal_results(got, want, equal_nan=False):
    (got_out, got_loc, got_logits), (want_out, want_loc, want_logits) = got, want
    assert got_out.keys() == want_out.keys()
    for key in want_out:
        torch.testing.assert_close(got_out[key], want_out[key], rtol=1e-6, atol=1e-6, equal_nan=equal_nan)
    # gradients are O(1 / N): an absolute 1e-6 would hide a missing or extra prior
    torch.testing.assert_close(got_loc, want_loc, rtol=1e-6, atol=1e-9, equal_nan=equal_nan)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-6, atol=1e-9, equal_nan=equal_nan)


@pytest.mark.parametrize(
    ("pos_fraction", "num_priors", "neg_ratio", "seed"),
    [
        ([0.01], 8732, 3.0, 0),  # one SSD300 image
        ([0.005, 0.0, 0.02, 0.3, 0.9, 0.001, 0.05, 0.0], 8732, 3.0, 1),  # 0 positives; 0.3, 0.9: too few negatives
        ([0.02] * 16 + [0.0, 0.6], 2000, 3.0, 2),
        ([0.05, 0.0, 0.5, 0.01], 500, 0.5, 3),  # fractional ratio: floor
        ([0.05, 0.2, 0.01], 500, 1.7, 4),
        ([0.05, 0.2, 0.01], 500, 10.0, 5),
        ([0.05, 0.0, 0.2], 500, 0.0, 6),  # no negatives at all
        ([0.0, 0.0], 300, 3.0, 7),  # no positive in the batch
        ([1.0, 0.999], 1000, 3.0, 8),  # every prior positive; one negative left
    ],
)
def test_loss_and_gradients_equal_the_argsort_implementation(pos_fraction, num_priors, neg_ratio, seed):
    labels = _labels(pos_fraction, num_priors, 21, seed)
    loc, logits, targets = _inputs(labels, 21, seed)
    got = _run(MultiBoxLoss(neg_ratio, 1.5), loc, logits, labels, targets)
    want = _run(_ReferenceMultiBoxLoss(neg_ratio, 1.5), loc, logits, labels, targets)
    _assert_equal_results(got, want)
    # the same priors get a gradient (a mining difference would show here first)
    assert torch.equal(got[2].abs().sum(-1) > 0, want[2].abs().sum(-1) > 0)


def test_the_cases_above_exercise_what_they_claim():
    labels = _labels([0.005, 0.0, 0.02, 0.3, 0.9, 0.001, 0.05, 0.0], 8732, 21, 1)
    pos = (labels > 0).sum(1)
    neg = 8732 - pos
    assert (pos == 0).sum() == 2
    assert ((3 * pos > neg) & (pos > 0)).sum() == 2  # the ratio asks for more than there are
    assert _reference_hard_negative_mask(torch.rand(8, 8732), labels > 0, 3.0).sum(1).tolist() == \
        torch.minimum(3 * pos, neg).tolist()


def test_real_matching_at_ssd300_size():
    from ssd.matching import match_priors, pad_targets
    from ssd.priors import PriorSpec

    g = torch.Generator().manual_seed(11)
    boxes, classes = [], []
    for _ in range(6):
        n = int(torch.randint(1, 9, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.6 + 0.05
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat((xy, xy + wh), 1))
        classes.append(torch.randint(1, 21, (n,), generator=g))
    labels, targets = match_priors(PriorSpec.preset("ssd300_vgg16").generate(), *pad_targets(boxes, classes))
    loc = torch.randn(*targets.shape, generator=g)
    logits = torch.randn(*labels.shape, 21, generator=g)
    _assert_equal_results(_run(MultiBoxLoss(), loc, logits, labels, targets),
                          _run(_ReferenceMultiBoxLoss(), loc, logits, labels, targets))


def _tied_inputs():
    """Labels and logits whose negatives' losses tie at each image's selection threshold: every
    background prior's logits are one of 3 rows, so its loss is one of 3 values."""
    labels = _labels([0.02, 0.05, 0.0, 0.01], 1000, 5, 21)
    loc, logits, targets = _inputs(labels, 5, 21)
    g = torch.Generator().manual_seed(22)
    rows = torch.randn(3, 5, generator=g) * 2
    pick = torch.randint(0, 3, labels.shape, generator=g)
    logits = torch.where((labels > 0).unsqueeze(-1), logits, rows[pick])
    return loc, logits, labels, targets


def test_ties_are_broken_by_prior_index():
    _loc, logits, labels, _targets = _tied_inputs()
    positive = labels > 0
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)
    keep = hard_negative_mask(ce, positive, 3.0)
    assert torch.equal(keep, _stable_reference_mask(ce, positive, 3.0))
    # the inputs do put the threshold inside a group of equal losses: some kept, some not
    for i in (0, 1, 3):
        threshold = ce[i][keep[i]].min()
        tied = (ce[i] == threshold) & ~positive[i]
        assert (tied & keep[i]).any() and (tied & ~keep[i]).any()
        # ... and of those, the kept ones come first
        kept_idx = (tied & keep[i]).nonzero().flatten()
        dropped_idx = (tied & ~keep[i]).nonzero().flatten()
        assert kept_idx.max() < dropped_idx.min()


def test_loss_and_gradients_with_ties_equal_the_reference_with_ties_by_index(monkeypatch):
    loc, logits, labels, targets = _tied_inputs()
    got = _run(MultiBoxLoss(3.0), loc, logits, labels, targets)
    # the reference's own (unstable) choice among equal losses: the same losses
    want_unstable = _run(_ReferenceMultiBoxLoss(3.0), loc, logits, labels, targets)
    for key in got[0]:
        torch.testing.assert_close(got[0][key], want_unstable[0][key], rtol=1e-6, atol=1e-6)
    # with its ties broken by index: the same gradients too
    monkeypatch.setattr(sys.modules[__name__], "_reference_hard_negative_mask", _stable_reference_mask)
    _assert_equal_results(got, _run(_ReferenceMultiBoxLoss(3.0), loc, logits, labels, targets))


def test_mask_ranks_nan_and_infinities_like_sort():
    # NaN above +inf above numbers; -0.0 == 0.0 (ties by index); negative losses below 0
    nan, inf = float("nan"), float("inf")
    ce = torch.tensor([[1.0, nan, 0.0, inf, -0.0, 2.0, nan, -1.0, -inf, 0.0, 5.0, 3.0]])
    positive = torch.zeros_like(ce, dtype=torch.bool)
    positive[0, 10] = True  # the largest loss, but positive
    for ratio in range(1, 13):
        got = hard_negative_mask(ce, positive, float(ratio))
        assert torch.equal(got, _stable_reference_mask(ce, positive, float(ratio))), ratio
        assert got.sum().item() == min(ratio, 11)
    # by hand: NaN (1, 6), inf (3), 3 (11), 2 (5), 1 (0), then 0.0 (2), -0.0 (4) and 0.0 (9) tie
    assert hard_negative_mask(ce, positive, 6.0).nonzero()[:, 1].tolist() == [0, 1, 3, 5, 6, 11]
    assert hard_negative_mask(ce, positive, 8.0).nonzero()[:, 1].tolist() == [0, 1, 2, 3, 4, 5, 6, 11]


@pytest.mark.parametrize("where", ["background_logit_inf", "not_kept", "other_logit_inf", "nan", "loc_nan"])
def test_non_finite_predictions_give_the_references_results(where):
    # The reference is not protected against a non-finite logit: the loss becomes NaN or inf
    # (the training loop's guard reports it), wherever the prior. A non-finite loc prediction of
    # a background prior does not reach the loss (``where``), only its gradient. Kept as it was.
    labels = _labels([0.02, 0.0, 0.05], 600, 21, 31)
    loc, logits, targets = _inputs(labels, 21, 31)
    background = (labels[0] == 0).nonzero().flatten()
    image2_background = (labels[2] == 0).nonzero().flatten()
    if where == "background_logit_inf":
        logits[0, background[:3], 0] = float("inf")  # ce = inf - inf = NaN
    elif where == "not_kept":  # the only non-finite loss, in an image without positives (nothing kept)
        logits[1, 5, 0] = float("-inf")  # ce = inf; inf * 0 = NaN in the reference's sum
    elif where == "other_logit_inf":
        logits[2, image2_background[:2], 3] = float("inf")  # ce = inf: the hardest negatives
        logits[2, image2_background[2], 0] = float("-inf")
    elif where == "nan":
        logits[0, background[7], 4] = float("nan")
        logits[1, 0, 0] = float("nan")
    else:
        loc[0, background[:2], 1] = float("nan")
        loc[2, image2_background[0], 0] = float("inf")
    got = _run(MultiBoxLoss(), loc, logits, labels, targets)
    want = _run(_ReferenceMultiBoxLoss(), loc, logits, labels, targets)
    _assert_equal_results(got, want, equal_nan=True)
    finite = where == "loc_nan"
    assert bool(torch.isfinite(got[0]["loss"])) is finite


def test_low_precision_inputs_are_computed_in_float32_like_the_reference():
    labels = _labels([0.03, 0.01], 800, 21, 41)
    loc, logits, targets = _inputs(labels, 21, 41)
    args = (loc.bfloat16(), logits.bfloat16(), labels, targets.bfloat16())
    got, want = _run(MultiBoxLoss(), *args), _run(_ReferenceMultiBoxLoss(), *args)
    assert got[0]["loss"].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    _assert_equal_results(got, want)


def test_a_second_backward_through_the_same_graph_raises():
    # The cross-entropy's gradient is written into its saved log_softmax buffer: backpropagating
    # twice must fail loudly, not give wrong gradients.
    labels = _labels([0.05], 100, 5, 51)
    loc, logits, targets = _inputs(labels, 5, 51)
    logits.requires_grad_()
    loss = MultiBoxLoss()(loc, logits, labels, targets)["loss"]
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_cross_entropy_in_row_chunks_is_bit_equal_to_one_pass(monkeypatch):
    # On a CPU the cross-entropy's passes run over chunks of rows (cache); on a GPU in one pass.
    import ssd.loss

    labels = _labels([0.05, 0.0, 0.3], 500, 21, 61)
    loc, logits, targets = _inputs(labels, 21, 61)
    results = []
    for chunk in (7, 10**9):  # chunks that split images, and one pass
        monkeypatch.setattr(ssd.loss, "_row_chunk", lambda rows, classes, device, chunk=chunk: chunk)
        results.append(_run(MultiBoxLoss(), loc, logits, labels, targets))
    (chunked, chunked_loc, chunked_logits), (whole, whole_loc, whole_logits) = results
    assert all(torch.equal(chunked[k], whole[k]) for k in whole)
    assert torch.equal(chunked_loc, whole_loc) and torch.equal(chunked_logits, whole_logits)
