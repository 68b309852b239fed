"""Prior analysis before any training: how well prior specs cover a dataset's ground-truth boxes.

    python pipelines/analyze_priors.py --data shards/voc --config ssd300_vgg16
    python pipelines/analyze_priors.py --data shards/synthetic --config tiny priors.s_min=0.15 --out reports/priors
    python pipelines/analyze_priors.py --data shards/voc --config ssd300_vgg16 \\
        --space tune_spaces/priors_ssd300.yaml --samples 8 --seed 0 --out reports/priors-ssd300

For each spec, over the ground-truth boxes of the shards (crowd and, unless
``--keep-difficult``, difficult objects left out):
the fraction of boxes that some prior overlaps with IoU >= 0.5 (recall), the mean best IoU and
the positives per box, for all boxes and by COCO size bucket (small < 32^2 <= medium < 96^2 <=
large, original pixels). ``--data`` is a shard folder (with dataset.json), or a folder with a
``train/`` split, which is then used. With ``--space`` every sampled spec is analysed after the
base config's own spec (row "base"); a sampled combination that cannot be built is listed with
its error. Prints a markdown table; ``--out`` also writes coverage.md, coverage.json and
coverage.png. No training, no Ray: seconds on a CPU (``ssd.prior_analysis``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from ssd.config import ConfigError, load_config
from ssd.data.shards import ShardSet
from ssd.prior_analysis import (
    analyze_config,
    coverage_table,
    ground_truth_from_shards,
    write_report,
)
from ssd.search_space import SearchSpace, trial_config


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="shard folder (holding dataset.json), or a folder with train/ (then train/ is used)")
    parser.add_argument("--config", default="tiny", help="preset name or YAML path (default: tiny)")
    parser.add_argument("--space", type=Path, default=None,
                        help="search space YAML: analyse --samples sampled specs after the base config's")
    parser.add_argument("--samples", type=int, default=8, help="samples per grid point of --space (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for --space (default 0)")
    parser.add_argument("--iou", type=float, default=None,
                        help="IoU threshold for a positive (default: the config's matching.iou_threshold, 0.5)")
    parser.add_argument("--max-images", type=int, default=None, help="read only the first N images")
    parser.add_argument("--keep-difficult", action="store_true",
                        help="count difficult objects too (training matches them by default; VOC07 mAP ignores them)")
    parser.add_argument("--out", type=Path, default=None, help="also write coverage.md/.json/.png here")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. priors.s_min=0.15")
    return parser


def resolve_data(data: str) -> str:
    """The shard set to read: ``data`` itself, or ``data/train`` when that holds a split."""
    if "://" in data or data.startswith("pipe:"):
        return data
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {data}: no such file or folder")
    if (path / "train" / "dataset.json").is_file():
        return str(path / "train")
    return data


def main(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    base = load_config(args.config, args.overrides)
    space = SearchSpace.load(args.space, base) if args.space is not None else None
    data = resolve_data(args.data)
    start = time.perf_counter()
    gt = ground_truth_from_shards(ShardSet.open(data), args.max_images, keep_difficult=args.keep_difficult)
    left_out = "crowd" if args.keep_difficult else "crowd and difficult"
    print(f"{len(gt)} ground-truth boxes ({left_out} left out) from {gt.num_images} images "
          f"of {data} in {time.perf_counter() - start:.1f} s", flush=True)

    base_name = "base" if space is not None else " ".join([str(args.config), *args.overrides])
    rows = [(base_name, analyze_config(base, gt, args.iou))]
    if space is not None:
        trials = space.sample(args.samples, args.seed)
        width = len(str(len(trials)))
        for i, values in enumerate(trials, 1):
            name = f"sample-{i:0{width}d}"
            try:
                cfg = trial_config(base, values)
            except ConfigError as err:
                rows.append((name, {"error": str(err), "values": values}))
                continue
            rows.append((name, {**analyze_config(cfg, gt, args.iou), "values": values}))
    print()
    print(coverage_table(rows), end="", flush=True)
    if args.out is not None:
        for path in write_report(rows, args.out):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, ValueError) as err:  # ConfigError and SpaceError are ValueErrors
        sys.exit(f"error: {err}")
