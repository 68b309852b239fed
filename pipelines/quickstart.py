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
from ssd.data.shards import ShardSet
from ssd.evaluation.service import evaluate_on_shards
from ssd.models import build_model, resolve_backbone_weights
from ssd.training import RunOptions, run_training


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
    # evaluated once, at the end (and once before training, below)
    cfg = load_config(args.config, [f"model.num_classes={train_set.num_classes}", f"train.epochs={args.epochs}",
                                    f"train.eval_every={args.epochs}", *args.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        backbone = resolve_backbone_weights(cfg)  # the presets' ImageNet backbone (none for tiny)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: {err}") from None

    torch.manual_seed(cfg.train.seed)  # the initial weights run_training starts from
    before = evaluate_on_shards(build_model(cfg, backbone=backbone), cfg, val_set, device, cfg.train.batch_size)["AP50"]
    losses: list[float] = []
    start = time.perf_counter()
    # The same loop as every Ray worker's (ssd.training), in this process: no Ray, no MLflow.
    metrics = run_training(cfg, RunOptions(str(args.data / "train"), str(args.data / "val"),
                                           loader_workers=args.workers, sample_images=0),
                           # epoch-end reports only (a mid-epoch checkpoint's report has no loss)
                           device=device, report=lambda m, _save: losses.append(m["loss"]) if "loss" in m else None,
                           backbone=backbone)
    print(f"trained in {time.perf_counter() - start:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"validation AP50: {before:.3f} before training -> {metrics['AP50']:.3f} after; "
          f"COCO AP {metrics['mAP']:.3f}")
    if not losses[-1] < losses[0]:
        raise SystemExit(f"the loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
    return metrics


if __name__ == "__main__":
    main(get_args_parser().parse_args())
