"""MultiBox loss forward + backward (matching excluded), ours vs the loss before issue 18.

    .venv/bin/python benchmarks/bench_loss.py                     # defaults: batch 32, SSD300 shapes
    .venv/bin/python benchmarks/bench_loss.py --threads 1 --repeats 9

Ours: ``ssd.loss.MultiBoxLoss`` (the cross-entropy from one ``log_softmax`` with its gradient
written in place as ``(softmax - onehot) * grad``; hard negatives selected by one ``kthvalue``
per image on distinct integer keys). Peer: ``ReferenceMultiBoxLoss`` below, a verbatim copy of
``MultiBoxLoss`` and ``hard_negative_mask`` before issue 18 (git da7b6a9): ``F.cross_entropy``
with autograd's backward and mining by a full ``argsort`` per image. Same module arguments
(``neg_ratio`` 3, ``loc_weight`` 1).

Inputs (seeded, float32): ``--batch`` (32) images of the ``ssd300_vgg16`` preset (8732 priors,
21 classes). Labels and box targets from the real matching, done once outside the timing:
``match_priors(priors, *pad_targets(boxes, labels))`` on VOC-like ground truth, 1-``--max-gt``
(8) boxes per image, each 5-65 % of the image side, random classes 1..20. Predictions: loc and
logits ~ N(0, 1) leaves with ``requires_grad`` (an untrained head), one pair per side with the
same values. A timed call is ``forward`` + ``loss.backward()`` (the leaves' ``.grad`` reset to
None first, as ``zero_grad(set_to_none=True)`` does).

Before timing, the four losses and both gradients (w.r.t. loc and logits) are checked equal to
1e-6 (gradients: relative 1e-6, absolute 1e-9; they are O(1/N)). After timing, a
``torch.profiler`` run of each side (``--profile-iters`` calls) gives the top ops by self CPU
time, in the JSON under ``profile``.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from _common import case_result, finish, get_args_parser, time_side_by_side
from torch import Tensor, nn

from ssd.loss import MultiBoxLoss
from ssd.matching import match_priors, pad_targets
from ssd.priors import PriorSpec

NAME = "loss"
NUM_CLASSES = 21  # VOC: 20 classes + background


# --- the peer: the loss before issue 18 (git da7b6a9, ssd/loss.py), verbatim but for the names --


def reference_hard_negative_mask(ce: Tensor, positive: Tensor, neg_ratio: float) -> Tensor:
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


class ReferenceMultiBoxLoss(nn.Module):
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
        keep = positive | reference_hard_negative_mask(ce, positive, self.neg_ratio)
        conf_loss = (ce * keep).sum()

        loss_loc = loc_loss / num_pos
        loss_conf = conf_loss / num_pos
        return {
            "loss": loss_conf + self.loc_weight * loss_loc,
            "loss_loc": loss_loc,
            "loss_conf": loss_conf,
            "num_pos": positive.sum().float(),
        }


# --- inputs, check, timing ---------------------------------------------------------------------


def voc_like_targets(batch: int, max_gt: int, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    """``batch`` images with 1..max_gt boxes each (xyxy in [0, 1], sides 5-65 % of the image) and
    labels in 1..NUM_CLASSES-1."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_gt + 1, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.6 + 0.05
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat((xy, xy + wh), dim=1))
        labels.append(torch.randint(1, NUM_CLASSES, (n,), generator=g))
    return boxes, labels


def step_fn(loss: nn.Module, loc: Tensor, logits: Tensor, labels: Tensor, box_targets: Tensor):
    """One timed call: forward + backward into the leaves ``loc`` and ``logits``."""

    def run() -> dict[str, Tensor]:
        loc.grad = None
        logits.grad = None
        out = loss(loc, logits, labels, box_targets)
        out["loss"].backward()
        return out

    return run


def check_equal(ours, peer, ours_leaves, peer_leaves) -> dict:
    """Losses to 1e-6; gradients to relative 1e-6, absolute 1e-9 (they are O(1/N))."""
    got, want = ours(), peer()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)
    diffs = {}
    for name, a, b in zip(("loc", "logits"), ours_leaves, peer_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
        diffs[f"max_abs_grad_diff_{name}"] = (a.grad - b.grad).abs().max().item()
    return {"checked": True, **{k: v.item() for k, v in want.items()}, **diffs}


def top_ops(fn, iters: int, rows: int = 12) -> list[dict]:
    """The ``rows`` ops with the most self CPU time over ``iters`` calls of ``fn`` (per call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {"op": e.key, "self_ms_per_call": e.self_cpu_time_total / 1e3 / iters,
         "share": e.self_cpu_time_total / total, "calls_per_call": e.count / iters}
        for e in events[:rows]
    ]


def print_profile(side: str, ops: list[dict]) -> None:
    print(f"\n{side}: top ops by self CPU time (per forward + backward)")
    for op in ops:
        print(f"  {op['op']:<40} {op['self_ms_per_call']:7.2f} ms  {op['share']:6.1%}")


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=15, warmup=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-gt", type=int, default=8, help="1..max-gt boxes per image")
    parser.add_argument("--neg-ratio", type=float, default=3.0)
    parser.add_argument("--profile-iters", type=int, default=3, help="0: no profile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    priors = PriorSpec.preset("ssd300_vgg16").generate()  # (8732, 4) cxcywh, float32
    boxes, gt_labels = voc_like_targets(args.batch, args.max_gt, args.seed)
    labels, box_targets = match_priors(priors, *pad_targets(boxes, gt_labels))  # (B, P), (B, P, 4)
    g = torch.Generator().manual_seed(args.seed + 1)
    loc0 = torch.randn(*box_targets.shape, generator=g)
    logits0 = torch.randn(*labels.shape, NUM_CLASSES, generator=g)
    ours_leaves = (loc0.clone().requires_grad_(), logits0.clone().requires_grad_())
    peer_leaves = (loc0.clone().requires_grad_(), logits0.clone().requires_grad_())
    ours = step_fn(MultiBoxLoss(args.neg_ratio), *ours_leaves, labels, box_targets)
    peer = step_fn(ReferenceMultiBoxLoss(args.neg_ratio), *peer_leaves, labels, box_targets)

    check = check_equal(ours, peer, ours_leaves, peer_leaves)
    ours_t, peer_t = time_side_by_side(ours, peer, args.repeats, args.warmup, args.number)
    profile = {}
    if args.profile_iters > 0:
        profile = {"iters": args.profile_iters, "ours": top_ops(ours, args.profile_iters),
                   "peer": top_ops(peer, args.profile_iters)}
        print_profile("ours", profile["ours"])
        print_profile("today's loss", profile["peer"])

    num_pos = (labels > 0).sum(dim=1)
    batch, num_priors = labels.shape
    case = (f"forward + backward, B={batch}, P={num_priors}, C={NUM_CLASSES}, neg_ratio {args.neg_ratio:g}, "
            f"{sum(len(b) for b in boxes)} GT, {int(num_pos.sum())} positives "
            f"({int(num_pos.min())}-{int(num_pos.max())} per image), float32")
    return finish(
        NAME,
        args,
        "python benchmarks/bench_loss.py " + " ".join(sys.argv[1:] if argv is None else argv),
        [case_result(case, ours_t, peer_t, goal=2.0, note="matching excluded")],
        equivalence=check,
        profile=profile,
        table={"peer": "today's loss", "ratio": "today / ours"},
    )


if __name__ == "__main__":
    main()
