"""How long a checkpoint stops training: host copies (what the training thread now does) vs
writing the checkpoint in the training thread (what it did before issue 17).

    .venv/bin/python benchmarks/bench_checkpoint_stall.py                  # ssd300_vgg16, repeats 5
    .venv/bin/python benchmarks/bench_checkpoint_stall.py --preset tiny --repeats 7

Ours: ``ssd.checkpoint.snapshot`` (model and optimizer states copied to host memory, RNG and
config captured); the files are then written by a background thread (Ray's upload thread in a
Ray Train run), which is timed too but does not stop training. Peer: the same checkpoint written
in the training thread, ``write_checkpoint(path, snapshot(...))``: ``torch.save`` of model and
optimizer, metadata, fsync, atomic rename, as ``save_checkpoint`` did inline before.

Both on the same model (the preset's network with SGD momentum buffers after one step: a
checkpoint as large as a real one, 2x the weights) into a folder under ``--tmp`` (default: the
system's temporary folder: a local disk here; on a cluster the upload to NFS or S3 comes on
top of the peer's time, not ours).
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from _common import case_result, finish, get_args_parser, stats_ms, time_side_by_side

from ssd.checkpoint import load_checkpoint, snapshot, write_checkpoint
from ssd.config import load_config
from ssd.engine import build_optimizer
from ssd.models import build_model

NAME = "checkpoint_stall"


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser(NAME, (__doc__ or "").splitlines()[0], repeats=5, warmup=1)
    parser.add_argument("--preset", default="ssd300_vgg16")
    parser.add_argument("--tmp", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    cfg = load_config(args.preset, ["model.backbone_weights=none"] if args.preset != "tiny" else [])
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    size = cfg.priors.image_size
    loc, logits = model(torch.rand(2, 3, size, size))
    (loc.square().mean() + logits.square().mean()).backward()
    optimizer.step()  # momentum buffers exist: the optimizer state is as large as the weights
    state = {"model": model, "epoch": 3, "step": 1234, "epoch_step": 17, "config": cfg, "classes": ["a"],
             "optimizer": optimizer}

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        folder = Path(tmp)

        def ours() -> None:  # the training thread's share: the host copies
            snapshot(**state)

        def peer() -> None:  # the whole checkpoint written in the training thread
            write_checkpoint(folder / "inline", snapshot(**state))

        ours_t, peer_t = time_side_by_side(ours, peer, args.repeats, args.warmup, args.number)

        # the background thread's time for the same checkpoint (does not stop training)
        background = []
        for _ in range(args.repeats):
            copy = snapshot(**state)
            start = time.perf_counter()
            writer = threading.Thread(target=write_checkpoint, args=(folder / "background", copy))
            writer.start()
            writer.join()
            background.append(time.perf_counter() - start)
        written = load_checkpoint(folder / "background")  # what was written reads back whole
        assert written.epoch_step == 17 and set(written.model) == set(model.state_dict())
        megabytes = sum(f.stat().st_size for f in (folder / "background").iterdir()) / 2**20

    parameters = sum(p.numel() for p in model.parameters())
    case = f"{args.preset} ({parameters / 1e6:.1f} M parameters, checkpoint {megabytes:.0f} MiB)"
    return finish(
        NAME, args, " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        [case_result(case, ours_t, peer_t, goal=5.0,
                     note="ours: host copies in the training thread; peer: the checkpoint written there")],
        background_write=stats_ms(background),
        table={"peer": "written inline", "ratio": "inline / ours"},
    )


if __name__ == "__main__":
    main()
