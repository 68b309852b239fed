"""Post-processing (decode, softmax, threshold, per-class NMS, top-k), ours vs torchvision SSD.

    .venv/bin/python benchmarks/bench_postprocess.py
    .venv/bin/python benchmarks/bench_postprocess.py --repeats 20 --warmup 2 --threads 1

Ours: ``ssd.postprocess.postprocess`` (batched over images: threshold first, a pre-NMS top-k only
for the (image, class) groups with more candidates than k, NMS over all groups at once). Peer:
torchvision's ``SSD.postprocess_detections`` of ``ssd300_vgg16(num_classes=21, score_thresh=0.01,
nms_thresh=0.45, detections_per_img=200, topk_candidates=k)`` (a Python loop over images and
classes). Same settings on both sides: our ``PostprocessConfig()`` defaults, with the pre-NMS
top-k per (image, class) k = ``pre_nms_top_k`` = ``topk_candidates`` set alike on both sides to
each of ``--pre-nms-top-k`` (400: our default and torchvision's; 200: the reference
implementations' value, issue 18).

Inputs: a batch of 8, 8732 priors (``ssd300_vgg16`` preset) x 21 classes, seeded, two cases:
- ``random``: loc ~ N(0, 0.5^2), logits ~ N(0, 3^2) (an untrained-like network: many priors pass
  the 0.01 score threshold, NMS gets up to 20 x k candidates per image);
- ``trained-like``: background logit +10 everywhere, 1% of the priors get +11 on one random
  object class (so most priors are confident background and few candidates reach NMS).
Before timing, the detections are checked equal per image (same count, scores to 1e-6, labels,
boxes to 1e-3 px after sorting by score).
"""

from __future__ import annotations

import sys

import torch
from _common import case_result, finish, get_args_parser, time_side_by_side
from torchvision.models.detection import ssd300_vgg16

from ssd.boxes import cxcywh_to_xyxy
from ssd.postprocess import PostprocessConfig, postprocess
from ssd.priors import PriorSpec

NAME = "postprocess"
SIZE = 300
#: speed-up goals (torchvision / ours) by (case, pre-NMS top-k); 2.0 for the rest
GOALS = {("trained-like", 200): 4.0}


def make_outputs(case: str, batch: int, priors: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if case == "random":
        loc = torch.randn(batch, priors, 4, generator=g) * 0.5
        logits = torch.randn(batch, priors, classes, generator=g) * 3.0
    elif case == "trained-like":
        loc = torch.randn(batch, priors, 4, generator=g) * 0.2
        logits = torch.randn(batch, priors, classes, generator=g)
        logits[..., 0] += 10.0
        objects = torch.rand(batch, priors, generator=g) < 0.01
        cls = torch.randint(1, classes, (batch, priors), generator=g)
        logits.scatter_add_(2, cls[..., None], objects[..., None].float() * 11.0)
    else:
        raise ValueError(case)
    return loc, logits


def _order(det: dict) -> torch.Tensor:
    """Sort by score (descending), ties by label, then by x1: exact score ties do occur, and
    the two sides may list tied detections in either order."""
    order = torch.argsort(det["boxes"][:, 0], stable=True)
    order = order[torch.argsort(det["labels"][order], stable=True)]
    return order[torch.argsort(det["scores"][order], descending=True, stable=True)]


def check_equal(ours_out, peer_out) -> list[int]:
    counts = []
    for i, (mine, ref) in enumerate(zip(ours_out, peer_out)):
        assert len(mine["scores"]) == len(ref["scores"]), f"image {i}: detection counts differ"
        o1, o2 = _order(mine), _order(ref)
        assert torch.allclose(mine["scores"][o1], ref["scores"][o2], atol=1e-6), f"image {i}"
        assert torch.equal(mine["labels"][o1], ref["labels"][o2]), f"image {i}: labels differ"
        assert torch.allclose(mine["boxes"][o1], ref["boxes"][o2], atol=1e-3), f"image {i}"
        counts.append(len(mine["scores"]))
    return counts


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=20, warmup=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cases", default="random,trained-like")
    parser.add_argument(
        "--pre-nms-top-k",
        default="400,200",
        help="comma-separated pre-NMS top-k per (image, class), the same on both sides",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    priors = PriorSpec.preset("ssd300_vgg16").generate()
    anchors = cxcywh_to_xyxy(priors) * SIZE  # torchvision's anchors are xyxy in input pixels
    sizes = [(SIZE, SIZE)] * args.batch

    cases, equivalence = [], {}
    for k in (int(v) for v in args.pre_nms_top_k.split(",")):
        # score 0.01, NMS 0.45, 200 per image; k per (image, class) before NMS
        params = PostprocessConfig(pre_nms_top_k=k)
        tv = ssd300_vgg16(
            weights=None,
            weights_backbone=None,
            num_classes=21,
            score_thresh=params.score_threshold,
            nms_thresh=params.nms_iou,
            detections_per_img=params.top_k,
            topk_candidates=params.pre_nms_top_k,
        ).eval()
        for case in args.cases.split(","):
            loc, logits = make_outputs(case, args.batch, priors.shape[0], 21, args.seed)

            def ours(loc=loc, logits=logits, params=params):
                return postprocess(loc, logits, priors, params, image_sizes=sizes)

            def peer(loc=loc, logits=logits, tv=tv):
                return tv.postprocess_detections(
                    {"bbox_regression": loc, "cls_logits": logits}, [anchors] * args.batch, sizes
                )

            with torch.inference_mode():
                counts = check_equal(ours(), peer())
                ours_t, peer_t = time_side_by_side(
                    ours, peer, args.repeats, args.warmup, args.number
                )
            equivalence[f"{case}, pre_nms_top_k={k}"] = {
                "checked": True,
                "detections_per_image": counts,
            }
            label = f"{case}, pre_nms_top_k={k}: B={args.batch}, P={priors.shape[0]}, C=21"
            cases.append(case_result(label, ours_t, peer_t, goal=GOALS.get((case, k), 2.0)))
    return finish(
        NAME,
        args,
        "python benchmarks/bench_postprocess.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        cases,
        equivalence=equivalence,
    )


if __name__ == "__main__":
    main()
