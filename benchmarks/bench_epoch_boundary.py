"""The wait for an epoch's first batch: the next pass's loader workers started early
(``ShardLoader.set_next_epoch``, what ``TrainLoop`` does) vs started when the epoch begins.

    .venv/bin/python benchmarks/bench_epoch_boundary.py --data /tmp/voc-mini/train
    .venv/bin/python benchmarks/bench_epoch_boundary.py --data /tmp/voc-mini/train --mode cpu --workers 2

A stand-in for training on a GPU: every batch is followed by ``--step-ms`` of sleep (the GPU
step: the host is free), every epoch by ``--epoch-end-ms`` of sleep (the epoch-end hooks: loss
all-reduce, logging, checkpoint report; an evaluation would be longer and hide more). Measured:
the time from asking for an epoch's first batch to getting it, at each epoch boundary (the first
epoch excluded: both sides start it cold). Both sides read the same shards with the same
workers, in alternating rounds.

``--mode device`` (default): loader workers read JPEG bytes and draw the augmentation
(``train.augment_on=device``, the GPU default); ``cpu``: they decode and augment.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from _common import case_result, finish, get_args_parser, stats_ms

from ssd.config import load_config
from ssd.data.shards import ShardSet
from ssd.data.streaming import ShardLoader, ShardStream
from ssd.device_augment import DeviceAugment
from ssd.transforms import build_transform

NAME = "epoch_boundary"


def first_batch_waits(loader: ShardLoader, epochs: int, early: bool, step_s: float, end_s: float) -> list[float]:
    """Seconds waited for the first batch of epochs 2..``epochs``."""
    waits = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        if early:
            loader.set_next_epoch(epoch + 1 if epoch + 1 < epochs else None)
        start = time.perf_counter()
        for i, _ in enumerate(loader):
            if i == 0 and epoch > 0:
                waits.append(time.perf_counter() - start)
            time.sleep(step_s)
        time.sleep(end_s)
    return waits


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, (__doc__ or "").splitlines()[0], repeats=3, warmup=0)
    parser.add_argument("--data", required=True, help="a training shard folder (make_shards.py output)")
    parser.add_argument("--mode", choices=("device", "cpu"), default="device")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=30.0)
    parser.add_argument("--epoch-end-ms", type=float, default=200.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config("ssd300_vgg16")
    shards = ShardSet.open(args.data)
    size = cfg.priors.image_size
    if args.mode == "device":
        augment = DeviceAugment(size, cfg.augment.strength, tuple(cfg.augment.mean))

        def stream() -> ShardStream:
            return ShardStream(shards, train=True, seed=args.seed, prepare=augment.prepare)
    else:
        transform = build_transform(size, cfg.augment.strength, train=True, mean=cfg.augment.mean, normalize=False)

        def stream() -> ShardStream:
            return ShardStream(shards, transform, train=True, seed=args.seed)

    ours, peer = [], []
    for r in range(args.repeats):
        for early in ((True, False) if r % 2 == 0 else (False, True)):
            loader = ShardLoader(stream(), args.batch, num_workers=args.workers)
            waits = first_batch_waits(loader, args.epochs, early, args.step_ms / 1e3, args.epoch_end_ms / 1e3)
            (ours if early else peer).extend(waits)
    steps = len(ShardLoader(stream(), args.batch, num_workers=args.workers))
    case = (f"{args.mode} augmentation, {args.workers} workers, batch {args.batch}, {steps} steps/epoch, "
            f"step {args.step_ms:g} ms, epoch end {args.epoch_end_ms:g} ms")
    return finish(
        NAME, args, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        [case_result(case, stats_ms(ours), stats_ms(peer), goal=2.0,
                     note="wait for an epoch's first batch (epochs 2..N of each round)")],
        table={"peer": "started at the epoch", "ratio": "at the epoch / early"},
    )


if __name__ == "__main__":
    main()
