"""Detect objects in image files with a trained or registered SSD; write JSON and drawn images,
or, with ``--images``, run it over a bucket of images on Ray Data and write Parquet.

    python pipelines/predict.py --model models:/ssd-voc@champion photos/ --out predictions/
    python pipelines/predict.py --model models:/ssd-voc/3 a.jpg b.png --out out/ --no-draw
    python pipelines/predict.py --model runs/exp/checkpoints/best a.jpg --out out/ --device cpu
    python pipelines/predict.py --model models:/ssd-voc@champion --images s3://bucket/photos --out s3://bucket/dets \
        --actors 4 --gpu --batch-size 64 --draw 20
    python pipelines/predict.py --model models:/ssd-voc@champion --images VOCdevkit/VOC2007/JPEGImages \
        --out dets/ --annotations VOCdevkit/VOC2007 --image-set test

``--model`` is a model reference (``ssd.registry``): ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/RUN_ID/model``, ``models:/m-...``, or a checkpoint folder.
Registered models are looked up at ``--mlflow-uri`` (default ``$MLFLOW_TRACKING_URI``, else the
local SQLite store of ``ssd.tracking``) and their checkpoint is downloaded to a temporary folder.

Inputs are image files and folders; a folder stands for its image files (``.jpg``, ``.jpeg``,
``.png``, ``.bmp``, ``.webp``, any case; not recursive), sorted by name. Images are decoded as
the served model decodes them (torchvision, RGB, no EXIF rotation), formats torchvision cannot
read (BMP, ...) by Pillow. Preprocessing is the evaluation path (``ssd.serving.Detector``):
boxes are in pixels of the original image.

Writes into ``--out``:

* ``detections.json``: ``{"model", "name", "version", "classes", "score_threshold",
  "images": [{"file", "width", "height", "drawn", "detections": [{"label", "class_name",
  "score", "box": [x1, y1, x2, y2]}, ...]}, ...]}``: EVERY detection the model returns (its
  ``postprocess`` config sets their score floor and count), by descending score.
  ``--score-threshold`` filters only what is drawn, so the JSON can be re-thresholded later.
* ``<stem>.jpg`` per JPEG input (``<stem>.png`` for other formats) unless ``--no-draw``: the
  image at its original resolution with the detections scoring at least ``--score-threshold``
  boxed in a colour per class and captioned "class score". Inputs with the same stem get
  ``<stem>-1``, ``<stem>-2``, ...; ``drawn`` in the JSON names the file.

Prints one line per image on stdout. An input that is missing or cannot be decoded stops the run
with an error naming the file (exit status 1); nothing is written then but the drawn images of
the images before it.

Batch inference (``--images DIR|s3://PREFIX|SHARDS``, instead of the positional inputs): the
image files directly in a folder or under an ``s3://`` prefix (same endings as above), or a shard
set of ``pipelines/make_shards.py`` (a folder or prefix holding ``dataset.json``), read, decoded
and resized in Ray Data CPU tasks and detected by a pool of ``--actors`` actors (``--gpu``: one
GPU each; ``--batch-size`` images per forward), decoded exactly as above, so the detections are
those of the single-process mode. Ray: ``--address`` / ``$RAY_ADDRESS``, else the ``make up``
head, else a private local cluster (loopback only, token auth; ``ssd.distributed.cluster``).
``--out`` (a folder or an ``s3://`` prefix) gets ``detections.parquet`` (one row per detection:
``path, label, class_name, score, x1, y1, x2, y2`` in original pixels), ``images.parquet`` (one
row per image: ``path, image_id, width, height, detections, error``), ``summary.json`` and, with
``--draw N``, ``drawn/`` with the first N images drawn. Progress lines give images/s and the ETA.
An unreadable image does not stop the run: it is a row of ``images.parquet`` with its error,
listed and counted in the summary. ``--annotations`` (a COCO instances JSON, or a VOC layout
``VOCdevkit/VOC2007`` with ``--image-set``, default ``test``) also prints the COCO AP suite (and
the VOC07 mAP for VOC) of the written detections, as ``pipelines/evaluate.py`` computes it;
inputs without an annotation are not scored, and counted (``ssd.evaluation.bucket``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout too

#: file name endings of the images a folder argument expands to (compared lower-cased)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint folder")
    p.add_argument("inputs", nargs="*", metavar="IMAGES_OR_FOLDERS",
                   help="image files, and folders whose image files (jpg, jpeg, png, bmp, webp) are used")
    p.add_argument("--out", required=True, help="output folder (created); with --images also s3://PREFIX")
    p.add_argument("--mlflow-uri", help="tracking/registry URI (default $MLFLOW_TRACKING_URI, else the local "
                                        "SQLite store)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="draw detections scoring at least this (default 0.3); detections.json keeps ALL "
                        "detections the model returns, whatever this threshold")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where the network runs (default: cuda if available, else cpu)")
    p.add_argument("--no-draw", action="store_true", help="write detections.json only")
    batch = p.add_argument_group("batch inference on Ray Data (instead of IMAGES_OR_FOLDERS)")
    batch.add_argument("--images", metavar="DIR|s3://PREFIX|SHARDS",
                       help="the image files in a folder or under an s3:// prefix, or a shard set (dataset.json)")
    batch.add_argument("--actors", type=int, default=1, help="model actors (default 1)")
    batch.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs (torch threads) per actor (default 1)")
    batch.add_argument("--gpu", action="store_true", help="one GPU per actor")
    batch.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else the `make up` head, "
                       "else a private local cluster; 'local' always starts a private one)")
    batch.add_argument("--draw", type=int, default=0, metavar="N", help="also draw the first N images (default 0)")
    batch.add_argument("--annotations", metavar="COCO_JSON|VOC_DIR",
                       help="score the detections against a COCO instances JSON or a VOC layout (VOCdevkit/VOC2007)")
    batch.add_argument("--image-set", help="the VOC image set of --annotations (default test)")
    return p


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files as given; folders -> their image files sorted by name. Raises SystemExit for a
    missing path or a folder without images."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise SystemExit(f"error: folder {item} has no image files ({', '.join(IMAGE_SUFFIXES)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"error: no such image file or folder: {item}")
    return files


def pick_device(requested: str | None) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available here")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve(reference: str, mlflow_uri: str | None, dst: Path) -> Any:
    """``ssd.registry.resolve_model`` with errors as ``SystemExit("error: ...")``."""
    from ssd.registry import ModelReferenceError, registry_uri_for, resolve_model

    tracking_uri = registry_uri_for(reference, mlflow_uri)
    try:
        return resolve_model(reference, tracking_uri, dst=dst)
    except ModelReferenceError as err:
        raise SystemExit(f"error: --model {err}") from None


def load_image(path: Path, index: int) -> Any:
    """The file as a uint8 (3, H, W) RGB tensor: decoded as ``ssd.serving.Detector`` decodes
    paths (torchvision: JPEG, PNG, WebP, GIF), else by Pillow (BMP, TIFF, ...). SystemExit naming
    the file when neither can read it."""
    import numpy as np
    import torch
    from PIL import Image

    from ssd.serving import to_image_tensor

    try:
        return to_image_tensor(path, index)
    except (ValueError, TypeError) as err:
        first = err
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError):
        detail = str(first).split(": ", 1)[-1]  # without the "image <index>" prefix
        raise SystemExit(f"error: {path}: not a readable image ({detail})") from None


def _output_names(files: list[Path]) -> list[str]:
    """``<stem>.jpg`` (JPEG inputs) or ``<stem>.png``, unique among the inputs."""
    used: set[str] = set()
    names = []
    for path in files:
        suffix = ".jpg" if path.suffix.lower() in (".jpg", ".jpeg") else ".png"
        name, n = f"{path.stem}{suffix}", 0
        while name.lower() in used:
            n += 1
            name = f"{path.stem}-{n}{suffix}"
        used.add(name.lower())
        names.append(name)
    return names


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the detector over the inputs; write ``detections.json`` (and drawn images). With
    ``--images``: the batch job on Ray Data (``ssd.distributed.batch_predict``); its summary."""
    if args.images is not None:
        return main_batch(args)
    if not args.inputs:
        raise SystemExit("error: give image files or folders, or --images DIR|s3://PREFIX|SHARDS")
    if args.batch_size < 1:
        raise SystemExit(f"error: --batch-size must be >= 1, got {args.batch_size}")
    args.out = Path(args.out)
    files = expand_inputs(args.inputs)
    device = pick_device(args.device)

    from ssd.serving import Detector

    with tempfile.TemporaryDirectory(prefix="ssd-predict-") as tmp:
        resolved = resolve(args.model, args.mlflow_uri, Path(tmp))
        try:
            detector = Detector.from_checkpoint(resolved.checkpoint, device=device)
        except (OSError, ValueError, RuntimeError) as err:
            raise SystemExit(f"error: --model {args.model}: cannot load its checkpoint: {err}") from None
    print(f"{args.model}" + (f" ({resolved.label})" if resolved.name else "")
          + f": {len(detector.classes)} classes, input {detector.size}x{detector.size}, {len(files)} image(s), "
          f"device {device}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    names = _output_names(files)
    records: list[dict[str, Any]] = []
    for start in range(0, len(files), args.batch_size):
        chunk = files[start:start + args.batch_size]
        images = [load_image(path, i) for i, path in enumerate(chunk, start)]
        detections = detector.predict_tensors(images, args.batch_size)
        for i, (path, image, det) in enumerate(zip(chunk, images, detections), start):
            records.append(_image_record(args, detector, path, image, det, names[i]))
    result = {
        "model": args.model, "name": resolved.name, "version": resolved.version,
        "classes": list(detector.classes), "score_threshold": args.score_threshold, "images": records,
    }
    path = args.out / "detections.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}" + ("" if args.no_draw else f" and {len(records)} drawn image(s)"), flush=True)
    return result


def _image_record(args: argparse.Namespace, detector: Any, path: Path, image: Any, det: dict[str, Any],
                  name: str) -> dict[str, Any]:
    height, width = image.shape[1:]
    detections = [
        {"label": int(label), "class_name": detector.classes[label - 1], "score": float(score), "box": box}
        for box, score, label in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist())
    ]
    drawn = None
    if not args.no_draw:
        from ssd.draw import draw_detections

        picture = draw_detections(image, det["boxes"], det["scores"], det["labels"], detector.classes,
                                  score_threshold=args.score_threshold)
        if name.endswith(".jpg"):
            picture.save(args.out / name, format="JPEG", quality=92)
        else:
            picture.save(args.out / name, format="PNG")
        drawn = name
    shown = [d for d in detections if d["score"] >= args.score_threshold]
    top = ", ".join(f"{d['class_name']} {d['score']:.2f}" for d in shown[:5])
    print(f"{path}: {width}x{height}, {len(shown)} detection(s) >= {args.score_threshold:g}"
          f" of {len(detections)}" + (f": {top}" if top else "")
          + (f" (+{len(shown) - 5} more)" if len(shown) > 5 else ""), flush=True)
    return {"file": str(path), "width": int(width), "height": int(height), "drawn": drawn, "detections": detections}


def main_batch(args: argparse.Namespace) -> dict[str, Any]:
    """``--images``: batch inference on Ray Data; prints progress and the summary, returns it."""
    if args.inputs:
        raise SystemExit(f"error: give --images or image files/folders, not both (got {args.inputs[0]!r} too)")
    if args.device is not None:
        raise SystemExit("error: --device is for image files; with --images, --gpu puts the actors on GPUs")
    from ssd.distributed.batch_predict import run_batch_predict_job
    from ssd.jobs.batch_predict import BatchPredictRequest
    from ssd.jobs.common import request_from_args, run_from_cli

    return run_from_cli(run_batch_predict_job, request_from_args(BatchPredictRequest, args), None)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
