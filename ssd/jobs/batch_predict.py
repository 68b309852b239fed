"""Batch inference as a job, without Ray: the request, its checks, and what the job writes.

``pipelines/predict.py --images ...`` builds a :class:`BatchPredictRequest`;
``ssd.distributed.batch_predict.run_batch_predict_job`` resolves it here (:func:`resolve_batch`:
the images and the model, refused in seconds before Ray starts), runs the Ray Data pipeline, and
hands the per-image results back to :func:`finish_batch`, which writes the outputs into ``out``
(a folder or an ``s3://`` prefix):

* ``detections.parquet`` and ``images.parquet`` (``ssd.batch_inference``: one row per detection,
  one row per image with its error, if any);
* ``summary.json``: ``model``, ``name``, ``version``, ``input``, ``out``, ``images`` (count),
  ``detections``, ``unreadable``
  (count) and ``unreadable_images`` (their paths and errors), ``images_per_s`` (images over the
  pipeline's wall time, Ray start-up excluded), ``pipeline_s``, ``ray_startup_s``, ``wall_s``
  (the whole job), ``actors``, ``batch_size``, ``device``, and with ``--annotations`` ``scoring``
  (``ssd.evaluation.bucket.score_results``);
* with ``draw`` N: ``drawn/<stem>.jpg`` (``.png`` for other formats) for the first N readable
  images, detections scoring at least ``score_threshold`` boxed (``ssd.draw``).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ssd import storage
from ssd.jobs.common import BadRequest, local_path
from ssd.jsonsafe import json_safe

#: seconds between two progress lines
PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class BatchPredictRequest:
    """What ``pipelines/predict.py --images`` asks for (field names are its flags)."""

    model: str
    images: str
    out: str
    mlflow_uri: str | None = None
    address: str | None = None
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpu: bool = False
    batch_size: int = 16
    draw: int = 0
    score_threshold: float = 0.3
    annotations: str | None = None
    image_set: str | None = None


@dataclass(frozen=True)
class ImageSource:
    """The input images: ``files`` (paths / URIs) or ``shards`` (URLs with their sample counts)."""

    spec: str
    kind: str
    files: tuple[str, ...] = ()
    shard_urls: tuple[str, ...] = ()
    shard_counts: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return len(self.files) if self.kind == "files" else sum(self.shard_counts)


@dataclass
class ResolvedBatch:
    """A checked request: its images, the model's parts, and the annotations to score against."""

    request: BatchPredictRequest
    source: ImageSource
    model_name: str | None
    model_version: str | None
    config: Any
    classes: list[str]
    state: dict[str, Any]
    annotations: Any = None
    started: float = field(default_factory=time.perf_counter)


def resolve_source(spec: str) -> ImageSource:
    """A folder or ``s3://`` prefix of image files, or a shard set (a folder / prefix holding
    ``dataset.json``, or that file); BadRequest naming ``spec`` otherwise."""
    from ssd.batch_inference import list_images
    from ssd.data.shards import DATASET_JSON, ShardSet

    spec = local_path(spec)
    try:
        if spec.endswith(".json") or storage.is_file(storage.join(spec, DATASET_JSON)):
            shard_set = ShardSet.open(spec)
            return ImageSource(spec, "shards", shard_urls=shard_set.urls, shard_counts=shard_set.counts)
        return ImageSource(spec, "files", files=tuple(list_images(spec)))
    except (OSError, ValueError) as err:
        raise BadRequest(f"--images {spec}: {err}") from None


def resolve_model(reference: str, mlflow_uri: str | None) -> tuple[Any, Any]:
    """(``ssd.registry.ResolvedModel``, ``ssd.checkpoint.Checkpoint``) of ``reference``; a
    registered model's checkpoint is downloaded to a temporary folder and read from it."""
    from ssd.checkpoint import load_checkpoint
    from ssd.registry import ModelReferenceError, registry_uri_for
    from ssd.registry import resolve_model as resolve

    tracking_uri = registry_uri_for(reference, mlflow_uri)
    with tempfile.TemporaryDirectory(prefix="ssd-batch-predict-") as tmp:
        try:
            resolved = resolve(reference, tracking_uri, dst=tmp)
            checkpoint = load_checkpoint(resolved.checkpoint, map_location="cpu")
        except ModelReferenceError as err:
            raise BadRequest(f"--model {err}") from None
        except (OSError, ValueError) as err:
            raise BadRequest(f"--model {reference}: cannot load its checkpoint: {err}") from None
    return resolved, checkpoint


def resolve_batch(request: BatchPredictRequest) -> ResolvedBatch:
    """Check ``request`` and load what the pipeline needs, before Ray starts.

    Raises:
        BadRequest: bad numbers, no images, an unusable model or annotations (one line, naming
            the flag and the file).
    """
    for flag, value, least in (("--actors", request.actors, 1), ("--batch-size", request.batch_size, 1),
                               ("--draw", request.draw, 0)):
        if value < least:
            raise BadRequest(f"{flag} must be >= {least}, got {value}")
    if request.cpus_per_actor <= 0:
        raise BadRequest(f"--cpus-per-actor must be > 0, got {request.cpus_per_actor}")
    source = resolve_source(request.images)
    resolved, checkpoint = resolve_model(request.model, request.mlflow_uri)
    annotations = None
    if request.annotations is not None:
        from ssd.evaluation.bucket import load_annotations

        try:
            annotations = load_annotations(request.annotations, checkpoint.classes, request.image_set)
        except (OSError, ValueError) as err:
            raise BadRequest(str(err) if str(err).startswith("--annotations") else
                             f"--annotations {request.annotations}: {err}") from None
    elif request.image_set is not None:
        raise BadRequest("--image-set needs --annotations (a VOC layout)")
    return ResolvedBatch(request, source, resolved.name, resolved.version, checkpoint.config,
                         list(checkpoint.classes), checkpoint.model, annotations)


class Progress:
    """Progress lines ``N/TOTAL images (P %), R images/s, ETA S s`` at most every ``every_s``
    seconds, and one at the end."""

    def __init__(self, total: int, every_s: float = PROGRESS_EVERY_S,
                 emit: Callable[[str], None] = lambda line: print(line, flush=True)) -> None:
        self.total, self.every_s, self.emit = total, every_s, emit
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, count: int, final: bool = False) -> None:
        self.done += count
        now = time.perf_counter()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.emit(f"progress: {self.done}/{self.total} images ({100 * self.done / max(self.total, 1):.0f} %), "
                  f"{rate:.1f} images/s, ETA {eta:.0f} s")


def finish_batch(batch: ResolvedBatch, results: list[Any], pipeline_s: float, ray_startup_s: float,
                 device: str) -> dict[str, Any]:
    """Write the outputs of ``results`` (``ssd.batch_inference.ImageResult``, any order) into
    ``request.out``; score them with annotations; print and return the summary."""
    from ssd.batch_inference import detection_table, image_table, parquet_bytes

    request = batch.request
    results = sorted(results, key=lambda r: r.index)
    if len(results) != batch.source.total:  # a lost block would silently shorten the tables
        raise RuntimeError(f"the pipeline returned {len(results)} images of {batch.source.total}")
    out = local_path(request.out)
    storage.write_bytes(storage.join(out, "detections.parquet"), parquet_bytes(detection_table(results, batch.classes)))
    storage.write_bytes(storage.join(out, "images.parquet"), parquet_bytes(image_table(results)))
    unreadable = [{"path": r.path, "error": r.error} for r in results if r.error]
    for item in unreadable:
        print(f"unreadable: {item['path']}: {item['error']}", flush=True)
    summary: dict[str, Any] = {
        "model": request.model, "name": batch.model_name, "version": batch.model_version,
        "input": batch.source.spec, "out": out, "images": len(results),
        "detections": int(sum(len(r.labels) for r in results)),
        "unreadable": len(unreadable), "unreadable_images": unreadable,
        "images_per_s": len(results) / pipeline_s if pipeline_s > 0 else None,
        "pipeline_s": pipeline_s, "ray_startup_s": ray_startup_s,
        "actors": request.actors, "batch_size": request.batch_size, "device": device,
    }
    if request.draw:
        summary["drawn"] = draw_results(results, batch.classes, out, request.draw, request.score_threshold)
    if batch.annotations is not None:
        from ssd.evaluation.bucket import score_results

        summary["scoring"] = score_results(batch.annotations, results, by_id=batch.source.kind == "shards")
    summary["wall_s"] = time.perf_counter() - batch.started
    summary = json_safe(summary)  # NaN (VOC07 AP of a class without ground truth) -> null
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=1, allow_nan=False) + "\n")
    print_summary(summary)
    return summary


def draw_results(results: list[Any], classes: list[str], out: str, count: int, score_threshold: float) -> list[str]:
    """``out/drawn/<name>`` for the first ``count`` readable results; returns the names."""
    import io

    from ssd.batch_inference import decode_image, drawn_names, read_image_bytes
    from ssd.draw import draw_detections

    chosen = [r for r in results if not r.error][:count]
    names = drawn_names([r.path for r in chosen])
    for result, name in zip(chosen, names, strict=True):
        image = decode_image(read_image_bytes(result))
        picture = draw_detections(image, result.boxes, result.scores, result.labels, classes,
                                  score_threshold=score_threshold)
        buffer = io.BytesIO()
        if name.endswith(".jpg"):
            picture.save(buffer, format="JPEG", quality=92)
        else:
            picture.save(buffer, format="PNG")
        storage.write_bytes(storage.join(out, "drawn", name), buffer.getvalue())
    return names


def print_summary(summary: dict[str, Any]) -> None:
    """The job's closing lines: counts, rate, and the scores when there are some."""
    rate = summary["images_per_s"]
    print(f"{summary['images']} images ({summary['unreadable']} unreadable), {summary['detections']} detections "
          f"in {summary['pipeline_s']:.1f} s ({rate or 0:.1f} images/s; Ray start-up {summary['ray_startup_s']:.1f} s"
          f" more), written to {summary['out']}", flush=True)
    scoring = summary.get("scoring")
    if scoring is None:
        return
    print(f"scored {scoring['scored']} images against the annotations; not scored: "
          f"{len(scoring['not_annotated'])} without an annotation, {len(scoring['unreadable'])} unreadable, "
          f"{len(scoring['annotation_skipped'])} whose annotation was skipped; {scoring['annotated_not_given']} "
          "annotated images were not among the inputs", flush=True)
    metrics = scoring["metrics"]
    if metrics is None:
        print("no image could be scored", flush=True)
        return
    from ssd.evaluation.coco import COCO_STAT_NAMES

    def number(value: float | None) -> str:  # None: NaN made JSON-safe (no ground truth at all)
        return "n/a" if value is None else f"{value:.4f}"

    print("COCO: " + ", ".join(f"{name} {number(metrics[name])}" for name in COCO_STAT_NAMES), flush=True)
    if "VOC07" in metrics:
        print(f"VOC07 mAP (11-point): {number(metrics['VOC07']['mAP'])}", flush=True)
