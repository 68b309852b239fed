"""Single-process quick start: train the tiny SSD on WebDataset shards of the synthetic dataset.

    python pipelines/quickstart.py                       # ~2 minutes on 2 CPU cores
    python pipelines/quickstart.py --epochs 20 optim.lr=0.02
    python pipelines/quickstart.py --data shards/voc --config ssd300_vgg16   # DIR/train + DIR/val
    python pipelines/quickstart.py --smoke-test          # a few steps, for CI

With no ``--data``, the embedded synthetic dataset is written in the real COCO layout under
``~/.cache/ssd-ray/data/synthetic/source`` (``$SSD_DATA_HOME``) and converted to shards
(``.../synthetic/{train,val}``) by the same
reader and converter as real data, once; later runs reuse it. No download, no GPU needed (a GPU is
used when present). Prints the loss per epoch and the COCO mAP on the validation shards before and
after training. The distributed job on Ray is ``pipelines/train.py``; this script is the library
used directly, without Ray.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, too

from ssd.config import load_config
from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.data.shards import ShardLoader, ShardSet, ShardStream
from ssd.engine import Trainer, build_optimizer, build_scheduler, evaluate
from ssd.evaluate import CocoEvaluator
from ssd.models import build_model
from ssd.transforms import build_transform


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with train/ and val/ shards (default: the synthetic dataset, made on first use)")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--train-images", type=int, default=1536, help="synthetic training images")
    parser.add_argument("--val-images", type=int, default=256, help="synthetic validation images")
    # 0: load in the training process. On a 2-core CPU a loader process costs more than it saves
    # (measured 250 img/s without one, 140 with one: it preempts torch's OpenMP threads).
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--smoke-test", action="store_true", help="2 epochs of a few steps")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. optim.lr=0.02")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.smoke_test:
        args.epochs, args.train_images, args.val_images = 2, 64, 32
    base_cfg = load_config(args.config, args.overrides)
    if args.data is None:
        name = "synthetic-smoke" if args.smoke_test else "synthetic"
        args.data = ensure_synthetic_shards(default_data_home() / name, args.train_images, args.val_images,
                                            seed=base_cfg.train.seed, log=lambda line: print(line, flush=True))
    train_set, val_set = ShardSet.open(args.data / "train"), ShardSet.open(args.data / "val")
    cfg = load_config(args.config, [f"model.num_classes={train_set.num_classes}", *args.overrides])
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = cfg.priors.image_size
    # normalize=False: loaders hand over uint8 batches; the trainer normalises them on the device.
    train_tf = build_transform(size, cfg.augment.strength, train=True, mean=cfg.augment.mean, normalize=False)
    # min_size=0: evaluation keeps every annotated object, however small at the network size.
    eval_tf = build_transform(size, 0.0, train=False, min_size=0.0, normalize=False)
    train_loader = ShardLoader(ShardStream(train_set, train_tf, train=True, seed=cfg.train.seed),
                               cfg.train.batch_size, num_workers=args.workers)
    val_loader = ShardLoader(ShardStream(val_set, eval_tf, train=False), cfg.train.batch_size, num_workers=0)

    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, args.epochs * len(train_loader))
    trainer = Trainer(model, cfg, optimizer, scheduler, device)
    params = sum(p.numel() for p in model.parameters())
    print(f"{cfg.model.arch}: {params / 1e6:.2f} M parameters, {cfg.priors.num_priors()} priors; "
          f"{train_set.num_samples} training images in {len(train_set.urls)} shards "
          f"({len(train_loader)} steps per epoch), {val_set.num_samples} validation images; device {device}",
          flush=True)

    def coco_map() -> dict:
        return evaluate(model, val_loader, cfg, CocoEvaluator(list(val_set.classes)), device).compute()

    before = coco_map()["AP50"]
    losses = []
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        train_loader.set_epoch(epoch)
        m = trainer.train_epoch(train_loader)
        losses.append(m["loss"])
        print(f"epoch {epoch:2d}/{args.epochs}  loss {m['loss']:.3f} (loc {m['loss_loc']:.3f}, "
              f"conf {m['loss_conf']:.3f})  lr {m['lr']:.4f}  {m['images_per_s']:.0f} img/s", flush=True)
    metrics = coco_map()
    print(f"trained in {time.perf_counter() - start:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"validation AP50: {before:.3f} before training -> {metrics['AP50']:.3f} after; "
          f"COCO AP {metrics['AP']:.3f}")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
