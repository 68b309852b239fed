"""How much of a training run goes to evaluation, and what one evaluation costs per image.

Two measurements on one shard set (a folder with ``train/`` and ``val/``), in this process:

1. ``--runs``: the same training run (``ssd.training.run_training``, one process) with
   ``train.eval_every=1`` (the old default: after every epoch) and with ``train.eval_every=auto``
   (the default: within ``train.eval_budget`` of the wall time); prints each run's wall time, the
   seconds spent evaluating and their share.
2. ``--costs``: one evaluation of ``--cost-config`` split into its parts, per validation image:
   reading + decoding + resizing (the loader, with 0 and ``--loader-workers`` processes), the
   network forward pass, decoding + NMS, and pycocotools (plus the VOC07 metric for VOC sets).

    python benchmarks/measure_eval_share.py --data /tmp/voc-mini --runs --costs --epochs 6

Nothing here is a peer comparison: it measures where evaluation time goes (docs/BENCHMARKS.md,
"Evaluation's share of a run").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ssd.config import load_config
from ssd.data.shards import ShardSet
from ssd.engine import network_input
from ssd.evaluation.coco import CocoEvaluator
from ssd.evaluation.service import eval_loader, is_voc, results_from_states
from ssd.models import build_model
from ssd.training import RunOptions, run_training


def share_runs(data: Path, config: str, epochs: int, overrides: list[str]) -> list[dict]:
    train, val = ShardSet.open(str(data / "train")), ShardSet.open(str(data / "val"))
    rows = []
    for rule in ("1", "auto"):
        cfg = load_config(config, [f"model.num_classes={train.num_classes}", "train.max_iters=null",
                                   f"train.epochs={epochs}", f"train.eval_every={rule}", *overrides])
        start = time.perf_counter()
        metrics = run_training(cfg, RunOptions(str(data / "train"), str(data / "val"), log_every=10**6,
                                               sample_images=0))
        wall = time.perf_counter() - start
        rows.append({"eval_every": rule, "epochs": epochs, "wall_s": round(wall, 1),
                     "eval_share": round(metrics["eval_share"], 4), "final_mAP": metrics["mAP"],
                     "train_images": train.num_samples, "val_images": val.num_samples})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def evaluation_costs(data: Path, config: str, batch: int, loader_workers: int, overrides: list[str]) -> dict:
    val = ShardSet.open(str(data / "val"))
    cfg = load_config(config, [f"model.num_classes={val.num_classes}", "model.backbone_weights=none", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg).eval().to(memory_format=torch.channels_last)
    out = {"config": config, "images": val.num_samples, "threads": torch.get_num_threads()}
    for workers in sorted({0, loader_workers}):
        start = time.perf_counter()
        batches = list(eval_loader(cfg, val, batch, num_workers=workers))
        out[f"load_ms_per_image_workers{workers}"] = round(1e3 * (time.perf_counter() - start) / val.num_samples, 2)
    forward = decode = 0.0
    evaluator = CocoEvaluator(list(val.classes))
    with torch.no_grad():
        for images, targets in batches:
            start = time.perf_counter()
            loc, logits = model(network_input(images, cfg, torch.device("cpu"), torch.channels_last))
            forward += time.perf_counter() - start
            start = time.perf_counter()
            sizes = torch.stack([t["orig_size"] for t in targets])
            detections = model.coding.detect(loc, logits, cfg.postprocess, image_sizes=sizes)
            decode += time.perf_counter() - start
            for det, target, (height, width) in zip(detections, targets, sizes.tolist(), strict=True):
                scale = torch.tensor([width, height, width, height], dtype=torch.float32)
                evaluator.add(image_id=int(target["image_id"]), width=int(width), height=int(height),
                              gt_boxes=target["boxes"] * scale, gt_labels=target["labels"], det_boxes=det["boxes"],
                              det_scores=det["scores"], det_labels=det["labels"], gt_iscrowd=target.get("iscrowd"),
                              gt_difficult=target.get("difficult"))
    start = time.perf_counter()
    results_from_states([evaluator.state()], is_voc(val))
    metric = time.perf_counter() - start
    n = val.num_samples
    out |= {"forward_ms_per_image": round(1e3 * forward / n, 2), "decode_nms_ms_per_image": round(1e3 * decode / n, 2),
            "metrics_ms_per_image": round(1e3 * metric / n, 2)}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder with train/ and val/ shard sets")
    p.add_argument("--runs", action="store_true", help="measurement 1: eval_every=1 vs auto")
    p.add_argument("--costs", action="store_true", help="measurement 2: one evaluation's parts per image")
    p.add_argument("--config", default="tiny", help="the runs' preset (default tiny)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--cost-config", default="ssd300_vgg16", help="the per-image costs' preset")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="config overrides of both measurements")
    args = p.parse_args()
    results: dict = {}
    if args.runs:
        results["runs"] = share_runs(args.data, args.config, args.epochs, args.overrides)
    if args.costs:
        results["costs"] = evaluation_costs(args.data, args.cost_config, args.batch, args.loader_workers,
                                            args.overrides)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
