"""MultiBox loss (SSD paper, section 2.2 "Training objective" and "Hard negative mining").

    L = (L_conf + alpha * L_loc) / N

with N the number of matched (positive) priors in the batch, L_loc the Smooth-L1 loss over the
positives' encoded offsets and L_conf the cross-entropy over the positives and the hardest
negatives: per image, the negatives with the highest confidence loss, at most
``neg_ratio`` x that image's positives.

Everything runs on static shapes (masks instead of selections, mining by one order statistic per
image): no ``nonzero``, boolean indexing or ``.item()``, so the training step never waits for the
device (tests/test_sync_free.py).

Cost (issue 18, benchmarks/bench_loss.py). The per-prior cross-entropy is one ``log_softmax``
over (B, P, C), needed anyway to rank the negatives; its gradient is written straight into that
buffer as ``(softmax - onehot) * grad`` (:class:`_CrossEntropy`; on a CPU over chunks of rows
that stay in cache), instead of autograd's zero-filled ``nll_loss`` gradient followed by
``log_softmax``'s backward over all B x P x C values. Mining finds each image's k-th hardest
negative with ``kthvalue`` (a selection, linear in P) instead of an ``argsort`` of every image's
P losses, on keys that make every prior distinct so that the k-th key is a threshold keeping
exactly k (:func:`hard_negative_mask`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MAX = 2**63 - 1
_INF_BITS = 0x7F800000  # +inf; larger magnitudes are NaN

#: on the CPU, let the cross-entropy's backward select the kept rows (a data-dependent shape,
#: free where the host is the device); tests turn it off to check the static-shape passes, the
#: ones accelerators run, on the CPU
HOST_SHORTCUTS_ON_CPU = True


def _ranking_key(loss: Tensor, positive: Tensor) -> Tensor:
    """Distinct int64 keys that rank priors as the mining does: a larger key is a harder negative.

    Args:
        loss: (B, P) float per-prior loss (ranked as float32).
        positive: (B, P) bool mask of matched priors.
    Returns:
        (B, P) int64: ``order(loss) * 2**32 + (P - 1 - prior index)``. ``order`` maps float32 onto
        int32 in the same order: +-the magnitude bits (which grow with the magnitude), so -0.0
        and 0.0 are equal; every NaN above +inf (where ``sort`` puts NaN); the positives below
        everything. The low half breaks ties of equal losses towards the lower prior index.
    """
    bits = loss.detach().float().view(torch.int32)  # (B, P) the IEEE-754 bits
    magnitude = bits & _INT32_MAX
    order = torch.where(bits < 0, -magnitude, magnitude)
    order = order.masked_fill_(magnitude > _INF_BITS, _INT32_MAX).masked_fill_(positive, _INT32_MIN)
    tie_break = torch.arange(loss.shape[1] - 1, -1, -1, device=loss.device)  # (P,) P - 1 - index
    # |order| <= 2**31, so order * 2**32 lies in [-2**63, 2**63 - 2**32]: no overflow
    return torch.add(tie_break, order.long(), alpha=2**32)


def hard_negative_mask(ce: Tensor, positive: Tensor, neg_ratio: float) -> Tensor:
    """Select the hardest negatives per image.

    Args:
        ce: (B, P) per-prior cross-entropy against the assigned label (float; ranked as float32,
            not differentiated).
        positive: (B, P) bool mask of matched priors.
        neg_ratio: negatives kept per positive.
    Returns:
        (B, P) bool mask of the kept negatives: exactly min(floor(neg_ratio * pos_i), neg_i)
        priors of image i, those with the largest loss; of equal losses the lower prior index
        first; NaN ranks above every number (as in ``sort``).
    """
    if neg_ratio == 0:  # a config constant: nothing to select
        return torch.zeros_like(positive)
    num_priors = ce.shape[1]
    num_pos = positive.sum(dim=1, keepdim=True)  # (B, 1)
    num_neg = torch.minimum((num_pos * neg_ratio).floor().long(), num_priors - num_pos)  # (B, 1)
    key = _ranking_key(ce, positive)  # (B, P), distinct
    # The num_neg-th largest key per image, with kthvalue's k the same for every image: append
    # num_neg pads below every negative's key (as the positives' keys are) and the rest above
    # every key (distinct: quickselect is slow on repeated values); the (P + 1)-th smallest is
    # then the image's num_neg-th largest key, or the lowest upper pad when num_neg = 0.
    # num_neg <= max over pos of min(ratio * pos, P - pos) = ratio * P / (1 + ratio): that many
    # pads (+1 for float32 rounding of ratio * pos, +1 to keep an upper pad) suffice, 0.75 P
    # instead of P at ratio 3.
    num_pads = min(num_priors, math.floor(neg_ratio * num_priors / (1 + neg_ratio)) + 2)
    cols = torch.arange(num_pads, device=ce.device)
    pads = torch.where(cols < num_neg, -_INT64_MAX, _INT64_MAX - cols)  # (B, num_pads)
    kth = torch.cat((key, pads), dim=1).kthvalue(num_priors + 1, dim=1, keepdim=True).values
    return key >= kth  # (B, P): exactly num_neg per image, the keys being distinct


def _row_chunk(num_rows: int, num_classes: int, device: torch.device) -> int:
    """Rows per chunk of :class:`_CrossEntropy`'s passes. All at once on a GPU (kernel launches
    cost more than memory there) and under ``torch.compile`` (which fuses the passes anyway); on
    a CPU about 256k values (1 MB), so that the passes after the first over a chunk (gather; exp,
    multiply, scatter) find it in cache, not in memory (~2 ms of ~30 at batch 32 on SSD300,
    benchmarks/bench_loss.py)."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return max(num_rows, 1)
    return max(1, (1 << 18) // num_classes)


class _CrossEntropy(torch.autograd.Function):
    """Per-prior cross-entropy with a lean backward.

    Forward: logits (B, P, C) float, labels (B, P) int64 -> (B, P), the values of
    ``F.cross_entropy(logits, labels, reduction="none")`` bit for bit (the same ``log_softmax``,
    row by row). Backward: ``(softmax - onehot(label)) * grad``, computed in place in the saved
    ``log_softmax`` buffer, which becomes the gradient: two elementwise passes and a scatter,
    where autograd zero-fills a (B, P, C) gradient for ``nll_loss`` and runs ``log_softmax``'s
    backward (a per-row reduction) over it. The buffer is consumed: backpropagate once (a second
    backward through the same graph raises, it does not give wrong gradients).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        num_classes = logits.shape[-1]
        rows = logits.reshape(-1, num_classes)  # (B*P, C)
        index = labels.reshape(-1, 1)  # (B*P, 1)
        chunk = _row_chunk(rows.shape[0], num_classes, logits.device)
        if chunk >= rows.shape[0]:
            log_probs = torch.log_softmax(rows, dim=-1)  # (B*P, C)
            ce = log_probs.gather(-1, index)  # (B*P, 1)
        else:
            log_probs = torch.empty_like(rows, memory_format=torch.contiguous_format)
            ce = rows.new_empty(index.shape)
            for start in range(0, rows.shape[0], chunk):
                part = slice(start, start + chunk)
                torch.log_softmax(rows[part], dim=-1, out=log_probs[part])
                torch.gather(log_probs[part], -1, index[part], out=ce[part])
        ctx.save_for_backward(log_probs, index, ce)
        ctx.logits_shape = logits.shape
        return ce.view_as(labels).neg()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ce: Tensor) -> tuple[Tensor, None]:
        log_probs, index, log_p_label = ctx.saved_tensors  # (B*P, C), (B*P, 1), (B*P, 1)
        weight = grad_ce.reshape(-1, 1)  # (B*P, 1)
        minus_weight = -weight
        if HOST_SHORTCUTS_ON_CPU and log_probs.device.type == "cpu" and not torch.compiler.is_compiling():
            # Only the kept rows (positives and mined negatives, ~1.5 % at ratio 3) have a nonzero
            # weight: their gradient from a gathered copy, every other row zero-filled, instead
            # of exp and multiply over all B x P x C values (a zero weight times a finite softmax
            # is 0). A row with a NaN or +inf logit is NaN throughout its log_softmax, its label's
            # entry included, and its gradient NaN whatever the weight: such rows are computed
            # too, so the gradients stay those of the dense passes. On a CPU the host is the
            # device, so selecting rows costs no sync; a GPU keeps the static-shape passes below.
            rows = ((weight != 0) | ~log_p_label.isfinite()).view(-1).nonzero().squeeze(1)  # (K,)
            grad_rows = log_probs.index_select(0, rows).exp_().mul_(weight[rows])
            grad_rows.scatter_add_(-1, index[rows], minus_weight[rows])  # (K, C)
            return log_probs.zero_().index_copy_(0, rows, grad_rows).view(ctx.logits_shape), None
        chunk = _row_chunk(log_probs.shape[0], log_probs.shape[1], log_probs.device)
        for start in range(0, log_probs.shape[0], chunk):
            part = slice(start, start + chunk)
            # softmax * grad - onehot * grad, in the buffer
            log_probs[part].exp_().mul_(weight[part]).scatter_add_(-1, index[part], minus_weight[part])
        return log_probs.view(ctx.logits_shape), None


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
        count = positive.sum()
        # float32, not loc_pred's dtype: under bf16 autocast a count of 1000 positives would round
        # to 1000 +- 4, i.e. a ~0.4 % error in both terms.
        num_pos = count.clamp(min=1).float()

        # Every prior's Smooth-L1, the background's set to 0 by a mask: static shapes, no boolean
        # indexing (a host sync for the size of its result). A mask rather than a product so that
        # a background prior's non-finite prediction cannot leak NaN (inf * 0) into the sum. The
        # mask is (B, P, 4) contiguous: broadcasting (B, P, 1) over a last dimension of 4 takes
        # ~1.7x as long, forward and backward (measured on a CPU); in place, as Smooth-L1's
        # backward needs its inputs, not this output.
        background4 = positive.logical_not().unsqueeze(-1).expand_as(loc_pred).contiguous()
        loc_each = F.smooth_l1_loss(loc_pred.float(), box_targets.float(), reduction="none", beta=1.0)
        loc_loss = loc_each.masked_fill_(background4, 0.0).sum()
        ce = _CrossEntropy.apply(cls_logits.float(), labels)  # (B, P)
        keep = positive | hard_negative_mask(ce, positive, self.neg_ratio)
        # A product, as before: a non-finite loss anywhere makes the loss non-finite, which the
        # training loop's guard reports. The mask as float once (a CPU product of float and bool
        # converts the bool in a temporary, forward and again backward).
        conf_loss = (ce * keep.float()).sum()

        loss_loc = loc_loss / num_pos
        loss_conf = conf_loss / num_pos
        return {
            "loss": loss_conf + self.loc_weight * loss_loc,
            "loss_loc": loss_loc,
            "loss_conf": loss_conf,
            "num_pos": count.float(),
        }
