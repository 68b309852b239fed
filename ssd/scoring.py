"""Score a trained model on a validation shard set, in one process, exactly as training does.

No Ray and no ``torch.distributed``: this is what ``pipelines/evaluate.py --model`` runs
(:func:`evaluate_reference`), and what a pipeline calls to re-evaluate a registered champion on a
candidate's validation set (the two scores are then comparable: same code, same data)::

    result = evaluate_checkpoint("runs/exp/checkpoints/best", "shards/voc/val")
    result["AP"], result["AP50"], result.get("VOC07", {}).get("mAP")

The numbers are those of ``ssd.training``'s validation: both run
:func:`ssd.evaluation.service.evaluate_on_shards`. MLflow is imported only to resolve a registered
model or to log an evaluation.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from ssd.data.shards import ShardSet
from ssd.evaluation.service import evaluate_on_shards, flat_metrics
from ssd.jsonsafe import json_safe

__all__ = ["EvaluationRequest", "LoggingFailed", "evaluate_checkpoint", "evaluate_reference"]

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    checkpoint_dir: str | os.PathLike,
    data: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
) -> dict[str, Any]:
    """:func:`~ssd.evaluation.service.evaluate_on_shards` for a ``save_checkpoint`` directory on
    the shard set ``data``.

    The model is rebuilt as ``ssd.serving.Detector.from_checkpoint`` does (config + weights;
    ``model.backbone_weights`` is ignored, the checkpoint holds every weight).

    Args:
        checkpoint_dir: a checkpoint directory (``meta.json``, ``config.yaml``, ``model.pt``).
        data: a shard set spec for ``ShardSet.open``: a folder with ``dataset.json``, a
            ``dataset.json`` path, or an ``s3://`` / http URL.
    Returns:
        ``evaluate_on_shards``' dict (COCO metrics, ``VOC07`` for a VOC set) plus ``"data"``
        (the spec as given), ``"data_hash"`` (``dataset.json``'s ``content_hash``, None if it
        has none) and ``"images"`` (the number of images evaluated).
    Raises:
        FileNotFoundError: no shard set at ``data``, or an incomplete checkpoint.
        ValueError: the checkpoint's classes are not the shards' classes in the same order (the
            message names both lists and the shard set), or malformed shards / checkpoint.
    """
    from ssd.serving import Detector  # here: importing ssd.scoring does not load the serving code

    spec = os.fspath(data)
    shard_set = ShardSet.open(spec)  # bad data fails before the weights are loaded
    detector = Detector.from_checkpoint(checkpoint_dir, device="cpu")
    if list(detector.classes) != list(shard_set.classes):
        raise ValueError(
            f"the checkpoint {os.fspath(checkpoint_dir)} was trained on the classes {list(detector.classes)} "
            f"but the shard set {spec} has the classes {list(shard_set.classes)} (labels are positions in "
            "these lists, so they must be equal and in the same order)")
    result = evaluate_on_shards(detector.model, detector.cfg, shard_set, device=device, batch_size=batch_size)
    return result | {"data": spec, "data_hash": shard_set.info.get("content_hash"),
                     "images": shard_set.num_samples}


@dataclass(frozen=True)
class EvaluationRequest:
    """An evaluation of a model reference on a shard set (``pipelines/evaluate.py --model``).

    Attributes:
        model: ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/RUN_ID/model`` or a
            checkpoint folder (``ssd.registry.resolve_model``).
        data: the shard set spec (see :func:`evaluate_checkpoint`).
        device, batch_size: where the network runs, images per forward pass.
        mlflow_uri: the tracking / registry URI; None: ``ssd.tracking.resolve_tracking_uri``'s.
        experiment: log the evaluation as a run of this MLflow experiment
            (``ssd.registry.log_evaluation``); None: no logging.
    """

    model: str
    data: str
    device: str = "cpu"
    batch_size: int = 32
    mlflow_uri: str | None = None
    experiment: str | None = None


class LoggingFailed(Exception):
    """The evaluation succeeded but logging it to MLflow failed; ``result`` holds it."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def evaluate_reference(request: EvaluationRequest) -> dict[str, Any]:
    """Resolve ``request.model``, evaluate it on ``request.data`` and, when asked, log it.

    Returns:
        Strict-JSON data (NaN -> None): ``model`` (the reference), ``name`` and ``version`` (the
        registered version, else None), then :func:`evaluate_checkpoint`'s keys and, when
        logged, ``mlflow_run_id``.
    Raises:
        ssd.registry.ModelReferenceError: a reference that names no usable checkpoint.
        FileNotFoundError, ValueError: missing or bad shards, a class mismatch (the message names
            the shard set, the checkpoint or the class lists).
        OSError, RuntimeError: unreadable shards, a failing device.
        LoggingFailed: MLflow failed while logging (the run, if created, is marked FAILED).
    """
    from ssd.registry import is_model_uri, log_evaluation, resolve_model
    from ssd.tracking import resolve_tracking_uri

    tracking_uri = None
    if is_model_uri(request.model) or request.experiment is not None:
        tracking_uri = resolve_tracking_uri(request.mlflow_uri)
        # fail in seconds, not minutes of retries, when the server is unreachable (as ssd.tracking)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    with tempfile.TemporaryDirectory(prefix="ssd-evaluate-") as tmp:
        resolved = resolve_model(request.model, tracking_uri, dst=tmp)
        log.info("evaluating %s on %s (%s)", resolved.label, request.data, request.device)
        scored = evaluate_checkpoint(resolved.checkpoint, request.data, device=request.device,
                                     batch_size=request.batch_size)
    result = json_safe({"model": request.model, "name": resolved.name, "version": resolved.version, **scored})
    if request.experiment is not None:
        try:
            run_id = log_evaluation(result, flat_metrics(scored), resolved, request.data, tracking_uri,
                                    request.experiment)
        except Exception as err:  # any MLflow failure fails the explicit request
            raise LoggingFailed(f"logging the evaluation to MLflow at {tracking_uri} failed: "
                                f"{type(err).__name__}: {err}", result) from err
        result["mlflow_run_id"] = run_id
    return result
