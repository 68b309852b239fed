"""Convert PASCAL VOC, MS-COCO or the embedded synthetic dataset into WebDataset shards.

    python pipelines/make_shards.py voc --root VOCdevkit --sets 2007:trainval+2012:trainval --out shards/voc/train
    python pipelines/make_shards.py voc --root VOCdevkit --sets 2007:test --out shards/voc/val
    python pipelines/make_shards.py coco --images train2017 --annotations annotations/instances_train2017.json --out shards/coco/train
    python pipelines/make_shards.py synthetic --out shards/synthetic      # writes train/ and val/

Each output folder gets ``shard-000000.tar ...`` and ``dataset.json`` (classes, id mapping, shard
list, counts, content hash). Conversion is parallel over all cores and deterministic (same input,
same shard bytes). Bad input (missing or corrupt images, malformed XML/JSON, unknown classes,
boxes outside the image or without area) is printed with its file, counted, and skipped, clipped
or dropped as the summary table says; ``--strict`` makes the first problem fatal.

``synthetic`` first writes the procedural dataset in the real COCO (or ``--layout voc``) layout
under ``OUT/source`` and then converts it with the same readers as the real datasets.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from ssd.data.convert import (
    ConversionError,
    ConversionReport,
    convert,
    format_summary,
    make_synthetic_shards,
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, shard_size: int) -> None:
        sub.add_argument("--out", required=True, type=Path, help="output folder")
        sub.add_argument("--shard-size", type=int, default=shard_size, help=f"samples per shard (default {shard_size})")
        sub.add_argument("--max-shard-mb", type=float, default=None, help="also close a shard before it passes this size")
        sub.add_argument("--workers", type=int, default=None, help="processes (default: all CPU cores)")
        sub.add_argument("--strict", action="store_true", help="stop at the first problem in the input")
        sub.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar")

    voc = commands.add_parser("voc", help="a VOCdevkit folder")
    voc.add_argument("--root", required=True, type=Path, help="the VOCdevkit folder (holding VOC2007, VOC2012, ...)")
    voc.add_argument("--sets", default="2007:trainval", help="YEAR:SPLIT joined by '+' (default 2007:trainval)")
    voc.add_argument("--classes", default=None,
                     help="class names, comma-separated or a file with one per line (default: the 20 VOC classes)")
    common(voc, 500)

    coco = commands.add_parser("coco", help="a COCO images folder and instances JSON")
    coco.add_argument("--images", required=True, type=Path, help="folder with the images (e.g. train2017)")
    coco.add_argument("--annotations", required=True, type=Path, help="instances_*.json")
    coco.add_argument("--drop-empty", action="store_true", help="leave out images with no annotation")
    common(coco, 500)

    synthetic = commands.add_parser("synthetic", help="the embedded procedural dataset (train/ and val/)")
    synthetic.add_argument("--num-images", type=int, default=1536, help="training images (default 1536)")
    synthetic.add_argument("--num-val", type=int, default=256, help="validation images (default 256)")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--layout", choices=("coco", "voc"), default="coco",
                           help="source layout written under OUT/source and read back (default coco)")
    common(synthetic, 256)
    return parser


def _classes(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    path = Path(value)
    names = path.read_text().split("\n") if path.is_file() else value.split(",")
    return tuple(name.strip() for name in names if name.strip())


def _convert_options(args: argparse.Namespace) -> dict:
    return {
        "shard_size": args.shard_size,
        "max_shard_bytes": int(args.max_shard_mb * 2**20) if args.max_shard_mb else None,
        "strict": args.strict,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }


def _convert(reader, out: Path, args: argparse.Namespace) -> ConversionReport:
    print(f"converting {len(reader.tasks())} images into {out}", flush=True)
    report = convert(reader, out, workers=args.workers, **_convert_options(args))
    print(format_summary(report))
    print(f"wrote {out / 'dataset.json'} (content hash {report.info['content_hash'][:16]})\n", flush=True)
    return report


def main(args: argparse.Namespace) -> list[ConversionReport]:
    from ssd.data.coco import CocoReader
    from ssd.data.voc import VOC_CLASSES, VocReader

    if args.command == "voc":
        reader = VocReader(args.root, args.sets, classes=_classes(args.classes) or VOC_CLASSES)
        return [_convert(reader, args.out, args)]
    if args.command == "coco":
        return [_convert(CocoReader(args.images, args.annotations, drop_empty=args.drop_empty), args.out, args)]

    splits = {"train": args.num_images, "val": args.num_val}
    print(f"rendering {sum(splits.values())} synthetic images ({args.layout} layout) into {args.out / 'source'}", flush=True)
    reports = make_synthetic_shards(
        args.out, splits, seed=args.seed, layout=args.layout, workers=args.workers, **_convert_options(args))
    for split, report in reports.items():
        print(f"\n{split}: {args.out / split}")
        print(format_summary(report))
    return list(reports.values())


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except ConversionError as err:
        sys.exit(f"error: {err}")
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        sys.exit(f"error: {err}")
