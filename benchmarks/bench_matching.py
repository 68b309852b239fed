"""Target assignment (prior <-> ground-truth matching + box encoding), ours vs torchvision.

    .venv/bin/python benchmarks/bench_matching.py                 # defaults: batches of 32, 8732 priors
    .venv/bin/python benchmarks/bench_matching.py --repeats 30 --warmup 3 --threads 1
    .venv/bin/python benchmarks/bench_matching.py --voc-root DIR/VOCdevkit --coco-root DIR/coco2017-mini

Ours: ``pad_targets`` + ``match_priors`` (one batched pass: labels (B, P) and encoded targets
(B, P, 4) for every prior). Peer: torchvision SSD's per-image path (``SSD.forward`` +
``SSD.compute_loss`` in torchvision/models/detection/ssd.py): ``SSDMatcher(0.5)`` on
``box_iou(gt, anchors_xyxy)``, then ``BoxCoder((10, 10, 5, 5)).encode_single`` of the foreground
priors' matched boxes and a label gather, image by image. Both encode only the foreground priors
(ours returns zeros for the rest).

Inputs (issue 18: what a detector sees first). Priors of the ``ssd300_vgg16`` preset (8732),
float32, boxes in [0, 1] (pixels divided by the image size). One call matches every batch of a
case, in batches of ``--batch`` (32) images:

- **VOC boxes** (primary): the annotation boxes of every image of VOC2007-mini (``--voc-root``,
  the folder holding ``VOC2007``; all image sets, 600 images, 1,940 objects, 3.2 per image,
  median 2, up to 42), read by ``ssd.data.voc.VocReader``; difficult objects kept, as training
  keeps them.
- **COCO boxes** (primary): every image of COCO2017-mini (``--coco-root``;
  ``annotations/instances.json``, 549 images, about 8 per image, up to ~90), read by
  ``ssd.data.coco.CocoReader``; crowd regions dropped, as training drops them.
- **synthetic** (second row): 1..``--max-gt`` (40) random boxes per image (seeded), 32 images.

Also (``--no-scaling`` skips it): a scaling table, ours and the peer on one batch of 32 images
with exactly 1, 10, 40 or 100 random boxes each, for the ``tiny``, ``ssd300_vgg16`` and
``ssd512_vgg16`` priors, with the time per IoU pair (images x boxes x priors).

Images without a box are left out (5 COCO images), so both sides see the same images (torchvision
special-cases them). A case whose data folder is missing is skipped with a message. The anchors'
xyxy form is precomputed for the peer (torchvision makes its anchors in the anchor generator,
outside matching); ours converts inside the call. Before timing, the outputs are checked equal:
the same label for every prior and the same encoded target (to 1e-4) for every foreground prior.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from _common import case_result, finish, get_args_parser, time_side_by_side
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, SSDMatcher
from torchvision.ops import box_iou as tv_box_iou

from ssd.boxes import cxcywh_to_xyxy
from ssd.data.coco import CocoReader
from ssd.data.records import SampleError
from ssd.data.voc import VocReader
from ssd.matching import match_priors, pad_targets
from ssd.priors import PriorSpec

NAME = "matching"
DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DEFAULT_VOC_ROOT = DATASETS / "voc2007-mini" / "VOCdevkit"
DEFAULT_COCO_ROOT = DATASETS / "coco2017-mini"


def real_targets(reader) -> tuple[list[Tensor], list[Tensor]]:
    """Every image's training boxes (xyxy in [0, 1]) and labels from a dataset reader; crowd
    regions dropped (training drops them), images left without a box left out."""
    boxes, labels = [], []
    for task in reader.tasks():
        try:
            record, _problems = reader.read(task)
        except SampleError:
            continue
        keep = [i for i, crowd in enumerate(record.iscrowd) if not crowd]
        if not keep:
            continue
        scale = torch.tensor([record.width, record.height, record.width, record.height], dtype=torch.float32)
        box = torch.tensor([record.boxes[i] for i in keep], dtype=torch.float32) / scale
        boxes.append(box.clamp_(0.0, 1.0))
        labels.append(torch.tensor([record.labels[i] for i in keep], dtype=torch.long))
    return boxes, labels


def batches(boxes: list[Tensor], labels: list[Tensor], batch: int) -> list[tuple[list, list]]:
    """Consecutive full batches of ``batch`` images (the last partial one left out)."""
    return [(boxes[i:i + batch], labels[i:i + batch]) for i in range(0, len(boxes) - batch + 1, batch)]


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


def ours_fn(priors, batch_list):
    """Ours on every batch: one batched call per batch."""
    def run():
        return [match_priors(priors, *pad_targets(boxes, labels)) for boxes, labels in batch_list]

    return run


def peer_fn(anchors_xyxy, batch_list):
    """torchvision SSD's per-image matching and target encoding (labels for all anchors,
    regression targets for the foreground ones), on every image of every batch."""
    matcher = SSDMatcher(0.5)
    coder = BoxCoder(weights=(10.0, 10.0, 5.0, 5.0))
    num_anchors = anchors_xyxy.shape[0]

    def run():
        out = []
        for boxes, labels in batch_list:
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
    per_image = [(labels[i], targets[i]) for labels, targets in ours_out for i in range(labels.shape[0])]
    assert len(per_image) == len(peer_out), (len(per_image), len(peer_out))
    num_fg = 0
    for i, ((labels, targets), (cls_target, fg, target_regression)) in enumerate(zip(per_image, peer_out)):
        assert torch.equal(labels, cls_target), f"labels differ in image {i}"
        assert torch.equal((labels > 0).nonzero()[:, 0], fg)
        err = (targets[fg] - target_regression).abs().max().item() if fg.numel() else 0.0
        assert err < 1e-4, f"encoded targets differ by {err} in image {i}"
        num_fg += fg.numel()
    return {"foreground_priors": num_fg}


def box_counts(batch_list) -> dict:
    counts = sorted(len(b) for boxes, _ in batch_list for b in boxes)
    return {"images": len(counts), "boxes": sum(counts), "mean": sum(counts) / len(counts),
            "median": counts[len(counts) // 2], "max": counts[-1]}


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, __doc__.splitlines()[0], repeats=15, warmup=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-gt", type=int, default=40, help="synthetic case: 1..max-gt boxes per image")
    parser.add_argument("--voc-root", type=Path, default=DEFAULT_VOC_ROOT, help="folder holding VOC2007")
    parser.add_argument("--coco-root", type=Path, default=DEFAULT_COCO_ROOT,
                        help="folder holding images/ and annotations/instances.json")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false",
                        help="skip the scaling table (priors x boxes per image)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    priors = PriorSpec.preset("ssd300_vgg16").generate()  # (8732, 4) cxcywh, float32
    anchors_xyxy = cxcywh_to_xyxy(priors)
    inputs: list[tuple[str, list]] = []
    voc_sets = args.voc_root / "VOC2007" / "ImageSets" / "Main"
    if voc_sets.is_dir():
        sets = "+".join(f"2007:{name}" for name in ("trainval", "test") if (voc_sets / f"{name}.txt").is_file())
        inputs.append(("VOC2007-mini boxes", batches(*real_targets(VocReader(args.voc_root, sets)), args.batch)))
    else:
        print(f"skipping the VOC case: no {voc_sets}", file=sys.stderr)
    coco_json = args.coco_root / "annotations" / "instances.json"
    if coco_json.is_file():
        reader = CocoReader(args.coco_root / "images", coco_json)
        inputs.append(("COCO2017-mini boxes", batches(*real_targets(reader), args.batch)))
    else:
        print(f"skipping the COCO case: no {coco_json}", file=sys.stderr)
    inputs.append((f"synthetic, 1-{args.max_gt} boxes/image",
                   [make_targets(args.batch, args.max_gt, 21, args.seed)]))

    scaling = measure_scaling(args) if args.scaling else None
    cases, checks = [], {}
    for label, batch_list in inputs:
        counts = box_counts(batch_list)
        ours, peer = ours_fn(priors, batch_list), peer_fn(anchors_xyxy, batch_list)
        with torch.inference_mode():
            check = check_equal(ours(), peer())
            ours_t, peer_t = time_side_by_side(ours, peer, args.repeats, args.warmup, args.number)
        case = (f"{label}: {len(batch_list)} x B={args.batch}, P={priors.shape[0]}, {counts['boxes']} GT "
                f"(mean {counts['mean']:.1f}, median {counts['median']}, max {counts['max']} per image), float32")
        cases.append(case_result(case, ours_t, peer_t, goal=3.0 if label.startswith("VOC") else 5.0))
        checks[label] = {**check, **counts, "batches": len(batch_list)}
    return finish(
        NAME,
        args,
        "python benchmarks/bench_matching.py " + " ".join(sys.argv[1:] if argv is None else argv),
        cases,
        equivalence={"checked": True, "cases": checks},
        batch=args.batch,
        **({"scaling": scaling} if scaling is not None else {}),
    )


#: the scaling table's grid: prior presets x boxes per image (every image the same count)
SCALING_PRESETS = ("tiny", "ssd300_vgg16", "ssd512_vgg16")
SCALING_BOXES = (1, 10, 40, 100)


def fixed_targets(batch: int, boxes_per_image: int, seed: int):
    """``batch`` images with exactly ``boxes_per_image`` random boxes each (VOC-like sizes)."""
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(batch, boxes_per_image, 2, generator=g) * 0.6 + 0.02
    xy = torch.rand(batch, boxes_per_image, 2, generator=g) * (1 - wh)
    boxes = torch.cat((xy, xy + wh), dim=-1)
    labels = torch.randint(1, 21, (batch, boxes_per_image), generator=g)
    return list(boxes), list(labels)


def measure_scaling(args) -> list[dict]:
    """Ours and the peer on one batch per (preset, boxes per image): median ms, ns per pair."""
    rows = []
    repeats, warmup = min(args.repeats, 5), 1
    for preset in SCALING_PRESETS:
        priors = PriorSpec.preset(preset).generate()
        anchors = cxcywh_to_xyxy(priors)
        for n in SCALING_BOXES:
            batch_list = [fixed_targets(args.batch, n, args.seed)]
            ours, peer = ours_fn(priors, batch_list), peer_fn(anchors, batch_list)
            with torch.inference_mode():
                check_equal(ours(), peer())
                ours_t, peer_t = time_side_by_side(ours, peer, repeats, warmup)
            pairs = args.batch * n * priors.shape[0]
            row = case_result(f"{preset}, {n} boxes/image", ours_t, peer_t, goal=0.0)
            rows.append({"preset": preset, "priors": priors.shape[0], "boxes_per_image": n, "pairs": pairs,
                         "ours_ms": ours_t["median_ms"], "peer_ms": peer_t["median_ms"], "ratio": row["ratio"],
                         "ours_ns_per_pair": ours_t["median_ms"] * 1e6 / pairs,
                         "peer_ns_per_pair": peer_t["median_ms"] * 1e6 / pairs})
            print(f"scaling: {preset} x {n} boxes: ours {ours_t['median_ms']:.2f} ms, "
                  f"torchvision {peer_t['median_ms']:.2f} ms", file=sys.stderr, flush=True)
    return rows


def extra_markdown(result: dict) -> str:
    """The scaling table (run_all.py puts it after the cases table in the docs)."""
    rows = result.get("scaling")
    if not rows:
        return ""
    lines = [
        (f"Scaling, one batch of {result.get('batch', 32)} images, every image with the same number of "
        "random boxes (ours and torchvision checked equal first; median of "
        f"{min(result['settings']['repeats'], 5)} paired rounds; ns per pair = time / (images x boxes x priors)):"),
        "",
        "| priors | boxes / image | IoU pairs | ours ms | torchvision ms | ratio | ours ns / pair | torchvision ns / pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} ({r['priors']}) | {r['boxes_per_image']} | {r['pairs'] / 1e6:.2f} M "
                     f"| {r['ours_ms']:.2f} | {r['peer_ms']:.2f} | {r['ratio']:.2f}x "
                     f"| {r['ours_ns_per_pair']:.2f} | {r['peer_ns_per_pair']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
