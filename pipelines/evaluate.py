"""Evaluate detections with the COCO metric (pycocotools), or a model on a validation shard set.

Two modes, from the repository root:

    python pipelines/evaluate.py --coco-gt GT.json --detections DET.json
    python pipelines/evaluate.py --model models:/ssd-voc@champion --data shards/voc/val [--log-to-mlflow]

Detections file mode (``--coco-gt`` and ``--detections``): scores a COCO results file against a
COCO ground-truth file.

Model mode (``--model`` and ``--data``): runs a model over every image of a shard set
(``pipelines/make_shards.py``: a folder with ``dataset.json``, that file, or an ``s3://`` / http
URL) and scores it exactly as training's validation does (``ssd.scoring.evaluate_reference``).
``--model`` is a model reference (``ssd.registry``): ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or a checkpoint folder; registered models are
looked up at ``--mlflow-uri`` (default ``$MLFLOW_TRACKING_URI``, else the local SQLite store of
``ssd.tracking``). The model's classes must be the shard set's, in the same order.

Either way it prints the metrics as ONE JSON object on stdout (``AP``, ``AP50``, ``AP75``,
``AP_small``, ``AP_medium``, ``AP_large``, ``AR1``, ``AR10``, ``AR100``, ``AR_small``,
``AR_medium``, ``AR_large``, ``per_class_AP``, ``per_class_AP50`` and ``pr_curve50``: the
precision at IoU 0.5 over pycocotools' 101 recall points, per class) and nothing else on stdout;
logs (and pycocotools' report with ``--verbose``) go to stderr, so ``... | jq .AP`` works. Model
mode adds ``model`` (the reference), ``name`` and ``version`` (the registered version, else
null), ``data``, ``data_hash`` (``dataset.json``'s content hash), ``images`` and, for a shard set
converted from PASCAL VOC, ``VOC07`` (``{"mAP", "per_class_AP"}``, 11-point AP; null for a class
without ground truth: the JSON is strict). ``--output FILE`` also writes the JSON to a file.

``--log-to-mlflow`` (model mode) records the evaluation in MLflow at the tracking URI:

* a run ``evaluate <NAME/VERSION or reference> on <data folder name>`` in ``--experiment``
  (default ``ssd-ray-eval``), with params ``model``, ``data``, ``data_hash``, ``images``, the
  flat metrics (``AP``, ``AP50``, ..., ``mAP`` = ``AP``, ``AP/<class>``, ``VOC07_mAP`` and
  ``VOC07_AP/<class>`` for VOC data), linked to the logged model and the dataset (name = the
  data folder name, digest = the content hash) when the model is an MLflow model, and the JSON
  as the artifact ``evaluation.json``; the printed JSON gets ``mlflow_run_id``;
* for a registered version, version tags ``eval/<data folder name>/mAP`` (COCO AP),
  ``.../AP50``, ``.../VOC07_mAP`` (VOC data), ``.../data_hash`` and ``.../run_id``.

An explicit request: if MLflow fails, the command fails (status 1; ``--output`` is written first).

Errors (a missing or malformed input, an unknown model, missing or bad shards, a class mismatch)
exit with status 1 and a message on stderr naming the file, model or shard set; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

# run from a checkout where `ssd` is not installed: the repo's copy. The library (torch,
# torchvision, pycocotools: seconds to import) loads only once the request is checked, so a
# missing file fails at once.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

log = logging.getLogger("evaluate")

DEFAULT_EXPERIMENT = "ssd-ray-eval"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    files = parser.add_argument_group("detections file mode")
    files.add_argument(
        "--coco-gt",
        type=Path,
        default=None,
        help="COCO ground-truth JSON (images, annotations, categories)",
    )
    files.add_argument(
        "--detections",
        type=Path,
        default=None,
        help='COCO results JSON: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]',
    )
    files.add_argument(
        "--verbose", action="store_true", help="print pycocotools' report (on stderr)"
    )
    model = parser.add_argument_group("model mode")
    model.add_argument(
        "--model",
        default=None,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint folder",
    )
    model.add_argument(
        "--data", default=None, help="validation shard set: folder with dataset.json, that file, or a URL"
    )
    model.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="where the network runs (default: cuda if available, else cpu)",
    )
    model.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    model.add_argument(
        "--mlflow-uri",
        default=None,
        help="tracking/registry URI (default $MLFLOW_TRACKING_URI, else the local SQLite store)",
    )
    model.add_argument(
        "--log-to-mlflow",
        action="store_true",
        help="log the result as an MLflow run (and registered-version tags); failures are errors",
    )
    model.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment of --log-to-mlflow runs (default {DEFAULT_EXPERIMENT})"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="also write the metrics JSON here"
    )
    return parser


def _mode(args: argparse.Namespace) -> str:
    """"files" or "model"; SystemExit for a missing or mixed set of mode flags."""
    files = [flag for flag, value in (("--coco-gt", args.coco_gt), ("--detections", args.detections))
             if value is not None]
    model = [flag for flag, value in (("--model", args.model), ("--data", args.data)) if value is not None]
    if files and model:
        raise SystemExit(f"error: {' and '.join(files)} (detections file mode) cannot be combined with "
                         f"{' and '.join(model)} (model mode)")
    if model:
        if len(model) == 1:
            raise SystemExit(f"error: model mode needs both --model and --data (got only {model[0]})")
        return "model"
    if len(files) != 2:
        if files:
            raise SystemExit(f"error: detections file mode needs both --coco-gt and --detections "
                             f"(got only {files[0]})")
        raise SystemExit("error: give --coco-gt GT.json --detections DET.json, or --model REF --data SHARDS")
    if args.log_to_mlflow:
        raise SystemExit("error: --log-to-mlflow needs model mode (--model and --data)")
    return "files"


def main(args: argparse.Namespace) -> dict:
    """Run the evaluation; print the metrics JSON on stdout and return the metrics dict."""
    if _mode(args) == "model":
        return main_model(args)
    for flag, path in (("--coco-gt", args.coco_gt), ("--detections", args.detections)):
        if not path.is_file():
            raise SystemExit(f"error: {flag} file not found: {path}")
    from ssd.evaluation import coco_evaluate

    log.info("evaluating %s against %s", args.detections, args.coco_gt)
    try:
        metrics = coco_evaluate(args.coco_gt, args.detections, verbose=args.verbose)
    except (ValueError, FileNotFoundError) as e:
        # The library's messages already name the file and the field.
        raise SystemExit(f"error: {e}") from None
    text = json.dumps(metrics)
    _write_output(args.output, text)
    print(text)
    return metrics


def _write_output(path: Path | None, text: str) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n", encoding="utf-8")
        log.info("wrote %s", path)


# --------------------------------------------------------------------------------------------
# Model mode
# --------------------------------------------------------------------------------------------


def main_model(args: argparse.Namespace) -> dict[str, Any]:
    """Model mode: evaluate ``--model`` on ``--data``; print (and log) the result."""
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    import torch

    from ssd.registry import ModelReferenceError
    from ssd.scoring import EvaluationRequest, LoggingFailed, evaluate_reference

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available here")
    request = EvaluationRequest(
        model=args.model, data=args.data, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        batch_size=args.batch_size, mlflow_uri=args.mlflow_uri,
        experiment=args.experiment if args.log_to_mlflow else None)
    try:
        # stdout is for the JSON only (MLflow prints "View run ... at: URL" there)
        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate_reference(request)
    except ModelReferenceError as err:
        raise SystemExit(f"error: --model {err}") from None
    except LoggingFailed as err:  # an explicit request: the command fails, the result is kept
        _write_output(args.output, json.dumps(err.result, allow_nan=False))
        kept = f"; the result is in {args.output}" if args.output is not None else ""
        raise SystemExit(f"error: {err}{kept}") from None
    except (FileNotFoundError, ValueError) as err:
        # The library's messages name the shard set, the checkpoint or the class lists.
        raise SystemExit(f"error: {err}") from None
    except (OSError, RuntimeError) as err:  # unreadable shards, a failing device
        raise SystemExit(f"error: evaluating {args.model} on {args.data} failed: "
                         f"{type(err).__name__}: {err}") from None
    text = json.dumps(result, allow_nan=False)
    _write_output(args.output, text)
    print(text, flush=True)
    return result


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    main(get_args_parser().parse_args())
