"""Target assignment (prior <-> ground-truth matching + box encoding), ours vs torchvision.

    .venv/bin/python benchmarks/bench_matching.py                 # defaults: 32 images, 8732 priors
    .venv/bin/python benchmarks/bench_matching.py --repeats 30 --warmup 3 --threads 1

Ours: ``pad_targets`` + ``match_priors`` (one batched pass: labels (B, P) and encoded targets
(B, P, 4) for every prior). Peer: torchvision SSD's per-image path (``SSD.forward`` +
``SSD.compute_loss`` in torchvision/models/detection/ssd.py): ``SSDMatcher(0.5)`` on
``box_iou(gt, anchors_xyxy)``, then ``BoxCoder((10, 10, 5, 5)).encode_single`` of the foreground
priors' matched boxes and a label gather, image by image. Both encode only the foreground priors
(ours returns zeros for the rest).

Inputs: 32 images with 1..40 random GT boxes each (seeded), priors of the ``ssd300_vgg16`` preset
(8732), float32, boxes in [0, 1]. The anchors' xyxy form is precomputed for the peer (torchvision
makes its anchors in the anchor generator, outside matching); ours converts inside the call.
Before timing, the outputs are checked equal: the same label for every prior and the same encoded
target (to 1e-4) for every foreground prior.
"""

from __future__ import annotations

import sys

import torch
from _common import case_result, finish, get_args_parser, time_side_by_side
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.ops import box_iou as tv_box_iou

from ssd.boxes import cxcywh_to_xyxy
from ssd.matching import match_priors, pad_targets
from ssd.priors import PriorSpec

NAME = "matching"


def make_targets(batch: int, max_gt: int, num_classes: int, seed: int):
    """``batch`` images with 1..max_gt boxes each: xyxy in [0, 1], labels in 1..num_classes-1."""
    g = torch.Generator().manual_seed(seed)
    boxes, labels = [], []
    for _ in range(batch):
        n = int(torch.randint(1, max_gt + 1, (1,), generator=g))
        wh = torch.rand(n, 2, generator=g) * 0.6 + 0.02
        xy = torch.rand(n, 2, generator=g) * (1 - wh)
        boxes.append(torch.cat((xy, xy + wh), dim=1))
        labels.append(torch.randint(1, num_classes, (n,), generator=g))
    return boxes, labels


def ours_fn(priors, boxes, labels):
    def run():
        return match_priors(priors, *pad_targets(boxes, labels))

    return run


def peer_fn(anchors_xyxy, boxes, labels):
    """torchvision SSD's per-image matching and target encoding (labels for all anchors,
    regression targets for the foreground ones)."""
    matcher = SSDMatcher(0.5)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    num_anchors = anchors_xyxy.shape[0]

    def run():
        out = []
        for gt_boxes, gt_labels in zip(boxes, labels):
            matched_idxs = matcher(tv_box_iou(gt_boxes, anchors_xyxy))  # SSD.forward
            fg = torch.where(matched_idxs >= 0)[0]  # SSD.compute_loss from here
            fg_matched = matched_idxs[fg]
            target_regression = coder.encode_single(gt_boxes[fg_matched], anchors_xyxy[fg])
            cls_target = torch.zeros(num_anchors, dtype=gt_labels.dtype)
            cls_target[fg] = gt_labels[fg_matched]
            out.append((cls_target, fg, target_regression))
        return out

    return run


def check_equal(ours_out, peer_out) -> dict:
    labels, targets = ours_out
    num_fg = 0
    for i, (cls_target, fg, target_regression) in enumerate(peer_out):
        assert torch.equal(labels[i], cls_target), f"labels differ in image {i}"
        assert torch.equal((labels[i] > 0).nonzero()[:, 0], fg)
        err = (targets[i, fg] - target_regression).abs().max().item()
        assert err < 1e-4, f"encoded targets differ by {err} in image {i}"
        num_fg += fg.numel()
    return {"foreground_priors": num_fg}


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=15, warmup=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-gt", type=int, default=40)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    priors = PriorSpec.preset("ssd300_vgg16").generate()  # (8732, 4) cxcywh, float32
    anchors_xyxy = cxcywh_to_xyxy(priors)
    boxes, labels = make_targets(args.batch, args.max_gt, 21, args.seed)
    ours, peer = ours_fn(priors, boxes, labels), peer_fn(anchors_xyxy, boxes, labels)

    with torch.inference_mode():
        check = check_equal(ours(), peer())
        ours_t, peer_t = time_side_by_side(ours, peer, args.repeats, args.warmup, args.number)
    case = (
        f"B={args.batch}, P={priors.shape[0]}, 1-{args.max_gt} GT/image "
        f"({sum(len(b) for b in boxes)} GT), float32"
    )
    return finish(
        NAME,
        args,
        "python benchmarks/bench_matching.py " + " ".join(sys.argv[1:] if argv is None else argv),
        [case_result(case, ours_t, peer_t, goal=5.0)],
        equivalence={"checked": True, **check},
    )


if __name__ == "__main__":
    main()
