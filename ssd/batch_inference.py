"""Batch inference, the Ray-free parts: list and read images, decode + resize one image, detect
a batch, and turn the results into the rows of the output tables.

``ssd.distributed.batch_predict`` runs these in Ray Data (CPU tasks decode and resize, a pool of
actors detects); ``ssd.jobs.batch_predict`` writes the tables. Nothing here imports Ray, so the
same functions are unit-tested, and give the same numbers, in one process.

Identical outputs to ``pipelines/predict.py`` (``ssd.serving.Detector``) by construction: the
same decoders (:func:`decode_image`: torchvision in RGB mode, else Pillow), the same evaluation
transform (``ssd.evaluation.inference.eval_transform``: uint8 (3, S, S)), the same
``BatchPredictor`` (normalise on the device, forward, decode, NMS) with boxes mapped to pixels of
the original image.

The tables (one Parquet file each, columns in this order):

* detections (:data:`DETECTION_COLUMNS`): one row per detection: ``path`` (the image, as listed),
  ``label`` (1..C), ``class_name``, ``score``, ``x1, y1, x2, y2`` (float32 pixels of the original
  image); each image's rows by descending score, images in input order.
* images (:data:`IMAGE_COLUMNS`): one row per input image: ``path``, ``image_id`` (the shard
  sample's id; -1 for files), ``width``, ``height`` (0 when unreadable), ``detections`` (their
  count) and ``error`` (empty when the image was read; else why not).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssd import storage
from ssd.config import Config

#: file name endings of the images a folder or prefix stands for (compared lower-cased); the
#: same as ``pipelines/predict.py``'s
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

DETECTION_COLUMNS: tuple[str, ...] = ("path", "label", "class_name", "score", "x1", "y1", "x2", "y2")
IMAGE_COLUMNS: tuple[str, ...] = ("path", "image_id", "width", "height", "detections", "error")


class ImageDecodeError(ValueError):
    """Bytes that neither torchvision nor Pillow can decode; the message says why."""


# --------------------------------------------------------------------------------------------
# Listing and reading


def list_images(location: str) -> list[str]:
    """The image files directly in a folder or under an ``s3://`` prefix, sorted by name, as
    paths / URIs (not recursive). Raises FileNotFoundError naming ``location`` when it holds none.
    """
    names = storage.list_names(location)
    found = [storage.join(location, name) for name in names if name.lower().endswith(IMAGE_SUFFIXES)]
    if not storage.is_uri(location):
        found = [path for path in found if os.path.isfile(path)]
    if not found:
        raise FileNotFoundError(f"{location}: no image files there ({', '.join(IMAGE_SUFFIXES)})")
    return found


def decode_image(data: bytes) -> Tensor:
    """Encoded image bytes -> uint8 (3, H, W) RGB, decoded as ``pipelines/predict.py`` decodes
    files: torchvision (JPEG, PNG, WebP, GIF; ``ssd.serving.to_image_tensor``), else Pillow (BMP,
    TIFF, ...). Raises :class:`ImageDecodeError` with torchvision's reason when neither can."""
    from PIL import Image

    from ssd.serving import to_image_tensor

    try:
        return to_image_tensor(data)
    except (ValueError, TypeError) as err:
        first = err
    try:
        import io

        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError):
        detail = str(first).split(": ", 1)[-1]  # without the "image <index>" prefix
        raise ImageDecodeError(f"not a readable image ({detail})") from None


# --------------------------------------------------------------------------------------------
# One image: read, decode, resize (a CPU task)


class Preparer:
    """Reads, decodes and resizes one image for the network: what a CPU task does per row.

    Args:
        cfg: the model's config (``priors.image_size`` = S).
    """

    def __init__(self, cfg: Config) -> None:
        from ssd.evaluation.inference import eval_transform

        self.size = cfg.priors.image_size
        self.transform = eval_transform(cfg)
        self._no_boxes = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        """``{"index", "path", "image_id", "data"}`` (``data``: the encoded bytes, or None to read
        ``path``) -> ``{"index", "path", "image_id", "width", "height", "error", "image"}`` with
        ``image`` uint8 (3, S, S) as numpy (zeros when ``error`` is not empty)."""
        out = {key: row[key] for key in ("index", "path", "image_id")}
        try:
            data = row.get("data")  # absent or None: read the file
            if data is None:
                data = storage.read_bytes(row["path"])
            image = decode_image(bytes(data))
        except (OSError, ValueError) as err:  # unreadable file, undecodable bytes: a row, no crash
            reason = str(err) if isinstance(err, ImageDecodeError) else f"cannot read the file: {err}"
            return out | {"width": 0, "height": 0, "error": reason,
                          "image": np.zeros((3, self.size, self.size), dtype=np.uint8)}
        resized = self.transform(image, self._no_boxes)[0]
        return out | {"width": int(image.shape[2]), "height": int(image.shape[1]), "error": "",
                      "image": resized.numpy()}


# --------------------------------------------------------------------------------------------
# A batch: detect (an actor)


def load_detector(cfg: Config, classes: Sequence[str], state: dict[str, Tensor], device: str | torch.device):
    """``ssd.serving.Detector`` from a checkpoint's parts (what ``Detector.from_checkpoint``
    builds, without a checkpoint folder: an actor gets the parts from the object store)."""
    from ssd.models import build_model
    from ssd.serving import Detector

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone_weights=None))
    model = build_model(cfg)
    model.load_state_dict(state)
    return Detector(model, cfg, classes, device)


class BatchDetector:
    """Detections for a batch of prepared rows (:class:`Preparer` output): what an actor runs.

    Args:
        cfg, classes, state: the checkpoint's config, class names and model state dict.
        device: where the network and the post-processing run (``cuda`` on a GPU actor).
        threads: torch intra-op threads (an actor's CPUs); None leaves torch's default.
    """

    def __init__(self, cfg: Config, classes: Sequence[str], state: dict[str, Tensor],
                 device: str | torch.device = "cpu", threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(max(1, threads))
        self.detector = load_detector(cfg, classes, state, device)
        self.classes = list(classes)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of B prepared rows (``image`` (B, 3, S, S) uint8, ``width``, ``height``,
        ``error``, ...) -> B result rows: the input's ``index``, ``path``, ``image_id``,
        ``width``, ``height``, ``error`` plus ``labels`` (K,) int64, ``scores`` (K,) float32 and
        ``boxes`` (K * 4,) float32 (xyxy pixels of the original image, flattened) per row, as
        object arrays. Rows with an error get no detections and are not run."""
        errors = [str(e) for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
        results = [empty] * len(errors)
        if ok:
            device = self.detector.device
            images = torch.from_numpy(np.ascontiguousarray(batch["image"][ok]))
            sizes = torch.tensor(np.stack([batch["height"][ok], batch["width"][ok]], axis=1), dtype=torch.int64)
            for i, det in zip(ok, self.detector.predictor(images, image_sizes=sizes.to(device)), strict=True):
                results[i] = (det["labels"].cpu().numpy().astype(np.int64),
                              det["scores"].cpu().numpy().astype(np.float32),
                              det["boxes"].cpu().numpy().astype(np.float32).reshape(-1))
        out = {key: batch[key] for key in ("index", "path", "image_id", "width", "height", "error")}
        for position, key in enumerate(("labels", "scores", "boxes")):
            column = np.empty(len(errors), dtype=object)
            column[:] = [r[position] for r in results]
            out[key] = column
        return out


# --------------------------------------------------------------------------------------------
# Result rows -> tables


@dataclass
class ImageResult:
    """One image's result, gathered by the driver. ``boxes`` (K, 4) float32 xyxy pixels."""

    index: int
    path: str
    image_id: int
    width: int
    height: int
    error: str
    labels: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray


def results_from_batch(batch: dict[str, Any]) -> Iterator[ImageResult]:
    """:class:`BatchDetector` output (as Ray Data hands it back: numpy or lists) -> results."""
    for i in range(len(batch["index"])):
        yield ImageResult(
            index=int(batch["index"][i]), path=str(batch["path"][i]), image_id=int(batch["image_id"][i]),
            width=int(batch["width"][i]), height=int(batch["height"][i]), error=str(batch["error"][i]),
            labels=np.array(batch["labels"][i], dtype=np.int64).reshape(-1),  # copies: Ray's are read-only
            scores=np.array(batch["scores"][i], dtype=np.float32).reshape(-1),
            boxes=np.array(batch["boxes"][i], dtype=np.float32).reshape(-1, 4))


def detection_table(results: Sequence[ImageResult], classes: Sequence[str]) -> Any:
    """The detections table (``pyarrow.Table``, :data:`DETECTION_COLUMNS`) of ``results`` in the
    given order."""
    import pyarrow as pa

    counts = [len(r.labels) for r in results]
    labels = np.concatenate([r.labels for r in results]) if results else np.zeros(0, np.int64)
    scores = np.concatenate([r.scores for r in results]) if results else np.zeros(0, np.float32)
    boxes = np.concatenate([r.boxes for r in results]) if results else np.zeros((0, 4), np.float32)
    names = np.asarray(list(classes), dtype=object)
    return pa.table({
        "path": pa.array(np.repeat(np.asarray([r.path for r in results], dtype=object), counts), pa.string()),
        "label": pa.array(labels, pa.int64()),
        "class_name": pa.array(names[labels - 1] if len(labels) else [], pa.string()),
        "score": pa.array(scores, pa.float32()),
        **{name: pa.array(boxes[:, k], pa.float32()) for k, name in enumerate(("x1", "y1", "x2", "y2"))},
    })


def image_table(results: Sequence[ImageResult]) -> Any:
    """The images table (``pyarrow.Table``, :data:`IMAGE_COLUMNS`) of ``results``."""
    import pyarrow as pa

    return pa.table({
        "path": pa.array([r.path for r in results], pa.string()),
        "image_id": pa.array([r.image_id for r in results], pa.int64()),
        "width": pa.array([r.width for r in results], pa.int32()),
        "height": pa.array([r.height for r in results], pa.int32()),
        "detections": pa.array([len(r.labels) for r in results], pa.int32()),
        "error": pa.array([r.error for r in results], pa.string()),
    })


def parquet_bytes(table: Any) -> bytes:
    """``table`` as the bytes of a Parquet file (written with ``ssd.storage``: path or s3://)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def drawn_names(paths: Sequence[str]) -> list[str]:
    """``<stem>.jpg`` for JPEG inputs, ``<stem>.png`` for others, unique among ``paths``
    (``<stem>-1``, ``<stem>-2``, ... for repeats), as ``pipelines/predict.py`` names them."""
    used: set[str] = set()
    names = []
    for path in paths:
        base = path.rsplit("/", 1)[-1].split("#")[-1]
        stem, dot, suffix = base.rpartition(".")
        stem = stem if dot else base
        ext = ".jpg" if f".{suffix.lower()}" in (".jpg", ".jpeg") or not dot else ".png"
        name, n = f"{stem}{ext}", 0
        while name.lower() in used:
            n += 1
            name = f"{stem}-{n}{ext}"
        used.add(name.lower())
        names.append(name)
    return names


def shard_rows(row: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The samples of one shard as rows for :class:`Preparer`: ``{"url", "offset"}`` (the
    shard's URL and the input index of its first sample) -> ``{"index", "path" ("URL#KEY"),
    "image_id", "data" (the stored JPEG bytes)}`` per sample, in shard order."""
    import json

    import webdataset as wds

    from ssd.data.shards import to_readable_url

    url, offset = str(row["url"]), int(row["offset"])
    samples = wds.tarfile_samples([{"url": to_readable_url(url)}])
    for position, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        yield {"index": offset + position, "path": f"{url}#{sample['__key__']}",
               "image_id": int(meta["image_id"]), "data": bytes(sample["jpg"])}


def read_image_bytes(result: ImageResult) -> bytes:
    """The encoded bytes of a result's image again (to draw it): the file, or the shard sample
    (``URL#KEY``, scanned for; shard inputs have ``image_id >= 0``)."""
    if result.image_id < 0:
        return storage.read_bytes(result.path)
    url, key = result.path.rsplit("#", 1)
    for found in shard_rows({"url": url, "offset": 0}):
        if found["path"] == result.path:
            return found["data"]
    raise FileNotFoundError(f"{url}: no sample {key!r}")


def prepare_batch(batch: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """:class:`Preparer` over a batch of rows (columns of equal length: ``index``, ``path``,
    ``image_id`` and optionally ``data``) -> the prepared columns, ``image`` stacked to
    (B, 3, S, S) uint8. What a CPU task of the pipeline runs."""
    preparer = Preparer(cfg)
    count = len(batch["index"])
    rows = [preparer({key: batch[key][i] for key in batch}) for i in range(count)]
    out: dict[str, Any] = {key: np.asarray([row[key] for row in rows]) for key in
                           ("index", "image_id", "width", "height")}
    out["path"] = np.asarray([str(row["path"]) for row in rows], dtype=object)
    out["error"] = np.asarray([row["error"] for row in rows], dtype=object)
    out["image"] = np.stack([row["image"] for row in rows]) if rows else np.zeros((0, 3, preparer.size, preparer.size),
                                                                                  np.uint8)
    return out
