"""Single-process quick start: train the tiny SSD on the embedded synthetic dataset.

    python pipelines/quickstart.py                       # ~2 minutes on 2 CPU cores
    python pipelines/quickstart.py --epochs 20 optim.lr=0.02
    python pipelines/quickstart.py --smoke-test          # a few steps, for CI

No download, no GPU needed (a GPU is used when present). Prints the loss per epoch and the COCO
mAP on held-out synthetic images before and after training. The distributed job on Ray is
``pipelines/train.py``; this script is the library used directly, without Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from ssd.config import load_config
from ssd.data.synthetic import CLASSES, SyntheticDetection
from ssd.engine import Trainer, build_optimizer, build_scheduler, collate, evaluate
from ssd.evaluate import CocoEvaluator
from ssd.models import build_model
from ssd.transforms import build_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-images", type=int, default=1536)
    parser.add_argument("--val-images", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    parser.add_argument("--smoke-test", action="store_true", help="2 epochs of a few steps")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=0.02")
    return parser


def _loader(dataset: SyntheticDetection, batch_size: int, train: bool, workers: int):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train,
        drop_last=train,
        num_workers=workers,
        persistent_workers=workers > 0,
        collate_fn=collate,
    )


def _map(model, loader, cfg, device) -> dict:
    return evaluate(model, loader, cfg, CocoEvaluator(list(CLASSES)), device).compute()


def main(args: argparse.Namespace) -> dict:
    if args.smoke_test:
        args.epochs, args.train_images, args.val_images = 2, 64, 32
    cfg = load_config(args.config, [f"model.num_classes={len(CLASSES) + 1}", *args.overrides])
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.priors.image_size
    train_tf = build_transform(size, cfg.augment.strength, train=True, mean=cfg.augment.mean, std=cfg.augment.std)
    # min_size=0: evaluation keeps every annotated object, however small at the network size.
    eval_tf = build_transform(size, 0.0, train=False, mean=cfg.augment.mean, std=cfg.augment.std, min_size=0.0)
    train_loader = _loader(SyntheticDetection(args.train_images, seed=cfg.train.seed, transform=train_tf, cache=True), cfg.train.batch_size, True, args.workers)
    # A different seed: validation images are never seen in training.
    val_loader = _loader(SyntheticDetection(args.val_images, seed=cfg.train.seed + 10_000, transform=eval_tf, cache=True), cfg.train.batch_size, False, 0)

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, args.epochs * len(train_loader))
    trainer = Trainer(model, cfg, optimizer, scheduler, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny SSD: {params / 1e6:.2f} M parameters, {cfg.priors.num_priors()} priors, "
          f"{args.train_images} training images, device {device}", flush=True)

    before = _map(model, val_loader, cfg, device)["AP50"]
    losses = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        m = trainer.train_epoch(train_loader)
        losses.append(m["loss"])
        print(f"epoch {epoch:2d}/{args.epochs}  loss {m['loss']:.3f} (loc {m['loss_loc']:.3f}, "
              f"conf {m['loss_conf']:.3f})  lr {m['lr']:.4f}  {m['images_per_s']:.0f} img/s", flush=True)
    metrics = _map(model, val_loader, cfg, device)
    print(f"trained in {time.perf_counter() - start:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"validation AP50: {before:.3f} before training -> {metrics['AP50']:.3f} after; "
          f"COCO AP {metrics['AP']:.3f}")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
