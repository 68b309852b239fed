"""Evaluate detections with the COCO metric (pycocotools).

Score a COCO results file against a COCO ground-truth file, from the repository root:

    python pipelines/evaluate.py --coco-gt GT.json --detections DET.json

It prints the metrics as ONE JSON object on stdout (``AP``, ``AP50``, ``AP75``, ``AP_small``,
``AP_medium``, ``AP_large``, ``AR1``, ``AR10``, ``AR100``, ``AR_small``, ``AR_medium``,
``AR_large``, ``per_class_AP``, ``per_class_AP50`` and ``pr_curve50``: the precision at IoU 0.5
over pycocotools' 101 recall points, per class) and nothing else on stdout; logs (and pycocotools' report with
``--verbose``) go to stderr, so ``... | jq .AP`` works. ``--output FILE`` also writes the JSON to
a file. A missing or malformed input exits with status 1 and a message (on stderr) naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

try:
    from ssd.evaluate import coco_evaluate
except ImportError:  # run from a checkout where `ssd` is not installed: use the repo's copy
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ssd.evaluate import coco_evaluate

log = logging.getLogger("evaluate")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate detections with the COCO metric (pycocotools).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--coco-gt",
        type=Path,
        required=True,
        help="COCO ground-truth JSON (images, annotations, categories)",
    )
    parser.add_argument(
        "--detections",
        type=Path,
        required=True,
        help='COCO results JSON: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]',
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the metrics JSON here"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="print pycocotools' report (on stderr)"
    )
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; print the metrics JSON on stdout and return the metrics dict."""
    for flag, path in (("--coco-gt", args.coco_gt), ("--detections", args.detections)):
        if not path.is_file():
            raise SystemExit(f"error: {flag} file not found: {path}")
    log.info("evaluating %s against %s", args.detections, args.coco_gt)
    try:
        metrics = coco_evaluate(args.coco_gt, args.detections, verbose=args.verbose)
    except (ValueError, FileNotFoundError) as e:
        # The library's messages already name the file and the field.
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(metrics)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
        log.info("wrote %s", args.output)
    print(text)
    return metrics


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    main(get_args_parser().parse_args())
