"""The MLflow model registry as a hand-off between runs: resolve model references, download the
checkpoint a registered model carries, and move the ``champion`` alias only to a better model
(:func:`apply_champion_rule`, the one rule every pipeline that registers a model follows).

A *model reference* is what the pipelines' ``--model`` / ``--init-from`` flags take:

* a ``save_checkpoint`` directory (``meta.json`` inside), used in place;
* ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``: a registered version of a model logged by
  :func:`ssd.mlflow_model.log_ssd_model`, whose pyfunc carries the checkpoint as its
  ``checkpoint`` artifact (config, classes, prior spec and weights);
* ``runs:/RUN_ID/model`` or ``models:/m-...`` (a logged model id): the same, not registered.

Like ``ssd.mlflow_model`` this imports MLflow; the training library proper does not.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow

#: the alias that names the best version of a registered model
CHAMPION = "champion"
#: version tags this module sets
SCORE_TAG = "mAP"
COMPARISON_TAG = "champion_comparison"

_REGISTERED = re.compile(r"^models:/(?P<name>[^/@]+?)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))/?$")


class ModelReferenceError(ValueError):
    """A model reference that does not name a usable checkpoint; the message says which."""


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local.

    Attributes:
        checkpoint: a local ``save_checkpoint`` directory (config, classes, weights).
        reference: the reference as given.
        name, version: the registered model and version number when the reference named one.
        tags: that version's tags (data hashes, prior spec, mAP, ...); empty otherwise.
        model_id: the MLflow logged-model id, when known (metrics can be attached to it).
    """

    checkpoint: Path
    reference: str
    name: str | None = None
    version: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    model_id: str | None = None

    @property
    def label(self) -> str:
        """``NAME/VERSION`` for lineage tags, else the reference."""
        return f"{self.name}/{self.version}" if self.name else self.reference


def is_model_uri(reference: str) -> bool:
    return reference.startswith(("models:/", "runs:/"))


def parse_registered(reference: str) -> tuple[str, str | None, str | None] | None:
    """``models:/NAME/VERSION`` -> (NAME, VERSION, None); ``models:/NAME@ALIAS`` ->
    (NAME, None, ALIAS); anything else (a logged model id, a path) -> None."""
    match = _REGISTERED.match(reference)
    if match is None:
        return None
    return match["name"], match["version"], match["alias"]


def model_version(client: mlflow.MlflowClient, reference: str) -> Any | None:
    """The ``ModelVersion`` a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` reference names
    (None for other references). Raises ModelReferenceError when it does not exist."""
    parsed = parse_registered(reference)
    if parsed is None:
        return None
    name, version, alias = parsed
    try:
        if alias is not None:
            return client.get_model_version_by_alias(name, alias)
        return client.get_model_version(name, version)
    except mlflow.exceptions.MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise ModelReferenceError(f"{reference}: no such registered model version at "
                                      f"{client.tracking_uri} ({err.message})") from None
        raise ModelReferenceError(f"{reference}: cannot look it up at {client.tracking_uri}: {err.message}") from None
    except Exception as err:  # noqa: BLE001 - an unreachable server raises requests' errors
        raise ModelReferenceError(f"{reference}: cannot reach the registry at {client.tracking_uri}: {err}") from None


def registered_version(reference: str, tracking_uri: str | None = None) -> str:
    """The version number a ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` reference names
    now, without downloading anything (a served model polls it to follow its alias).

    Raises:
        ModelReferenceError: not such a reference, no such model, version or alias, or the
            registry cannot be reached.
    """
    version = model_version(mlflow.MlflowClient(tracking_uri=tracking_uri), reference)
    if version is None:
        raise ModelReferenceError(f"{reference}: not a registered model reference (models:/NAME@ALIAS or "
                                  "models:/NAME/VERSION)")
    return str(version.version)


def registry_uri_for(reference: str, mlflow_uri: str | None) -> str | None:
    """The tracking URI to look ``reference`` up at (``mlflow_uri``, else ``$MLFLOW_TRACKING_URI``,
    else the local store; ``ssd.tracking.resolve_tracking_uri``), or None for a checkpoint folder.
    For a registry reference, MLflow's HTTP retries are capped (unless set) so that an
    unreachable server fails in seconds, not minutes."""
    if not is_model_uri(reference):
        return None
    from ssd.tracking import resolve_tracking_uri

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    return resolve_tracking_uri(mlflow_uri)


def resolve_model(reference: str, tracking_uri: str | None = None, dst: str | Path | None = None) -> ResolvedModel:
    """A checkpoint directory or an MLflow model reference -> :class:`ResolvedModel`.

    A registered or logged model is downloaded (its pyfunc's ``checkpoint`` artifact only) into
    ``dst`` (default: a new temporary folder, left for the caller or the OS to clean).

    Raises:
        ModelReferenceError: a path that is not a checkpoint, an unknown model or version, or a
            model that carries no SSD checkpoint.
    """
    if not is_model_uri(reference):
        path = Path(reference).expanduser()
        if not (path / "meta.json").is_file():
            raise ModelReferenceError(
                f"{reference}: not a checkpoint folder (no meta.json) and not an MLflow model URI "
                "(models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model)")
        return ResolvedModel(checkpoint=path.resolve(), reference=reference)
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    version = model_version(client, reference)
    source = version.source if version is not None else reference.rstrip("/")
    dst = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="ssd-model-"))
    dst.mkdir(parents=True, exist_ok=True)
    model_id = None
    # a checkpoint is a handful of files: MLflow's per-file progress bars (five lines) are noise
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        if source.startswith("models:/m-"):
            # An MLflow 3 logged model (what a version's source is): download from its own
            # artifact location; download_artifacts would read "m-..." as a registered name.
            model_id = source[len("models:/"):].split("/")[0]
            location = client.get_logged_model(model_id).artifact_location
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/artifacts/checkpoint",
                                                        dst_path=str(dst), tracking_uri=tracking_uri)
        else:  # runs:/RUN_ID/model, or a version logged by MLflow 2 (a run artifact source)
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/artifacts/checkpoint",
                                                        dst_path=str(dst), tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises several types for a missing path
        raise ModelReferenceError(f"{reference}: cannot download its SSD checkpoint from {source}: {err}") from None
    checkpoint = Path(local)
    if not (checkpoint / "meta.json").is_file():
        raise ModelReferenceError(f"{reference}: the model has no SSD checkpoint (artifacts/checkpoint/meta.json); "
                                  "log SSD models with ssd.mlflow_model.log_ssd_model")
    if version is None:
        return ResolvedModel(checkpoint=checkpoint, reference=reference, model_id=model_id)
    return ResolvedModel(checkpoint=checkpoint, reference=reference, name=version.name,
                         version=str(version.version), tags=dict(version.tags or {}),
                         model_id=getattr(version, "model_id", None) or model_id)


@dataclass(frozen=True)
class Promotion:
    """The outcome of :func:`promote_if_better`, also written to the version's tags."""

    name: str
    version: str
    score: float
    champion_version: str | None
    champion_score: float | None
    promoted: bool
    reason: str
    #: where ``champion_score`` came from (e.g. recorded, or evaluated now), when the caller says
    champion_score_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "score": self.score,
                "champion_version": self.champion_version, "champion_score": self.champion_score,
                "champion_score_source": self.champion_score_source,
                "promoted": self.promoted, "reason": self.reason}


def current_champion(client: mlflow.MlflowClient, name: str, alias: str = CHAMPION) -> Any | None:
    """The version ``name@alias`` points at, or None (no such model or alias yet).

    Raises MlflowException when the registry cannot answer (unreachable, 5xx): reading that as
    "no champion" would promote any newcomer.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as err:
        if err.get_http_status_code() >= 500:
            raise
        return None  # RESOURCE_DOES_NOT_EXIST (no model) or INVALID_PARAMETER_VALUE (no alias)


def promote_if_better(
    client: mlflow.MlflowClient,
    name: str,
    version: str,
    score: float,
    champion_score: float | None,
    *,
    alias: str = CHAMPION,
    metric: str = SCORE_TAG,
    champion: Any | None = None,
    champion_score_source: str | None = None,
) -> Promotion:
    """Point ``name@alias`` at ``version`` if its ``score`` beats the current champion's.

    The scores must come from the same validation set (the caller makes sure: it re-evaluates
    the champion when its recorded score is on other data). Ties keep the current champion. With
    no champion yet the version is promoted. The comparison is recorded on the candidate version
    (tag ``champion_comparison``, JSON) whether or not it is promoted.

    Args:
        champion: the current champion version (``current_champion``); looked up when None.
        champion_score: the champion's score on the candidate's validation set (ignored
            without a champion).
        champion_score_source: how that score was obtained, recorded with the comparison.
    """
    champion = champion if champion is not None else current_champion(client, name, alias)
    if champion is not None and str(champion.version) == str(version):
        champion = None  # re-promoting itself: nothing to compare against
    if champion is None:
        promoted, reason = True, f"no {alias} yet"
        champion_version, champion_score = None, None
    else:
        champion_version = str(champion.version)
        if champion_score is None:
            raise ValueError(f"{name}@{alias} is version {champion_version}: its score is needed to compare")
        promoted = score > champion_score
        relation = ">" if promoted else "<=" if score <= champion_score else "?"
        reason = (f"{metric} {score:.4g} {relation} {alias} v{champion_version}'s {champion_score:.4g} on the same "
                  "validation set")
    result = Promotion(name=name, version=str(version), score=float(score), champion_version=champion_version,
                       champion_score=None if champion_score is None else float(champion_score),
                       promoted=promoted, reason=reason,
                       champion_score_source=champion_score_source if champion_version else None)
    client.set_model_version_tag(name, str(version), COMPARISON_TAG, json.dumps(result.to_dict(), sort_keys=True))
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
    return result


def champion_score(
    client: mlflow.MlflowClient,
    champion: Any,
    val_data: str | None,
    val_data_hash: str,
    *,
    device: str = "cpu",
    say: Callable[[str], None] = print,
) -> tuple[float, str]:
    """The champion's mAP on the candidate's validation shards, and where it came from.

    Its recorded mAP (version tags ``mAP`` and ``val_data_hash``) when it was measured on the
    same shards (same content hash); else the champion is downloaded and evaluated on
    ``val_data`` now (``ssd.scoring.evaluate_checkpoint``). A champion that cannot be scored on
    them (other classes) scores -inf: it cannot be compared, so the candidate wins.
    """
    tags = champion.tags or {}
    if tags.get("val_data_hash") and tags.get("val_data_hash") == val_data_hash and SCORE_TAG in tags:
        return float(tags[SCORE_TAG]), "recorded on the same validation shards"
    if not val_data:
        raise ValueError(f"{champion.name} v{champion.version}'s mAP is on other validation data, and no "
                         "validation shards were given to evaluate it on")
    from ssd.scoring import evaluate_checkpoint

    say(f"evaluating {champion.name} v{champion.version} on {val_data}: its recorded mAP is on other data")
    with tempfile.TemporaryDirectory(prefix="ssd-champion-") as tmp:
        model = resolve_model(f"models:/{champion.name}/{champion.version}", client.tracking_uri, dst=tmp)
        try:
            result = evaluate_checkpoint(model.checkpoint, val_data, device=device)
        except ValueError as err:  # e.g. other classes
            say(f"warning: cannot evaluate the champion on {val_data}: {err}")
            return float("-inf"), f"not comparable ({err})"
    return float(result["AP"]), "evaluated on the same validation shards now"


def apply_champion_rule(
    client: mlflow.MlflowClient,
    name: str,
    version: str,
    score: float,
    val_data: str | None,
    val_data_hash: str,
    *,
    alias: str = CHAMPION,
    device: str = "cpu",
    say: Callable[[str], None] = print,
) -> Promotion:
    """The one rule for the ``champion`` alias, for every pipeline that registers a model.

    A first version becomes champion. A later one takes the alias only if its ``score`` (mAP on
    the validation shards ``val_data`` with content hash ``val_data_hash``) is strictly better
    than the champion's on the same shards (:func:`champion_score`). The comparison is recorded on
    the version either way (tag ``champion_comparison``).
    """
    champion = current_champion(client, name, alias)
    if champion is not None and str(champion.version) == str(version):
        recorded = (champion.tags or {}).get(COMPARISON_TAG)
        if recorded:  # decided by an earlier attempt (e.g. interrupted before the run ended)
            return Promotion(**json.loads(recorded))
    previous, how = None, None
    if champion is not None and str(champion.version) != str(version):
        previous, how = champion_score(client, champion, val_data, val_data_hash, device=device, say=say)
    return promote_if_better(client, name, str(version), score, previous, alias=alias, champion=champion,
                             champion_score_source=how)


def data_name(spec: str) -> str:
    """The shard set's folder name: ``shards/voc/val`` and ``shards/voc/val/dataset.json`` ->
    ``val``; ``s3://bucket/voc/val/`` -> ``val``."""
    text = spec.rstrip("/")
    if text.endswith(".json"):
        text = text.rsplit("/", 1)[0] if "/" in text else "."
    name = text.rsplit("/", 1)[-1]
    if name in ("", ".", "..") and "://" not in text:
        name = Path(text or ".").resolve().name
    return name or "data"


def log_evaluation(result: dict[str, Any], metrics: dict[str, float], resolved: ResolvedModel, data: str,
                   tracking_uri: str, experiment: str) -> str:
    """Log an evaluation of a model on a shard set to MLflow; returns the new run's id.

    The run ``evaluate <NAME/VERSION or reference> on <data folder name>`` in ``experiment``
    (created if missing) gets the params ``model``, ``data``, ``data_hash``, ``images``, the
    ``metrics`` (linked to the logged model and the dataset when ``resolved.model_id`` is known)
    and ``result`` as the artifact ``evaluation.json``; a registered version gets the version
    tags ``eval/<data folder name>/{mAP, AP50, VOC07_mAP (VOC data), data_hash, run_id}``.

    Args:
        result: the evaluation as strict-JSON data (``ssd.scoring.evaluate_reference``), with
            ``AP``, ``AP50``, ``data_hash``, ``images`` and, for VOC data, ``VOC07``.
        metrics: ``ssd.evaluation.service.flat_metrics`` of the result (the run's metrics).
        resolved: the evaluated model.
        data: the shard set spec as given.
    Raises:
        Any MLflow failure (the run, if created, is then marked FAILED).
    """
    import logging
    import time

    from mlflow.entities import Metric, Param

    from ssd.tracking import experiment_id_for

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    name = data_name(data)
    data_hash = result.get("data_hash")
    tags = {"ssd.model": resolved.reference, "ssd.data_name": name}
    if resolved.name:
        tags.update({"ssd.model_name": resolved.name, "ssd.model_version": str(resolved.version)})
    run = client.create_run(experiment_id_for(client, experiment, tracking_uri),
                            run_name=f"evaluate {resolved.label} on {name}", tags=tags)
    run_id = run.info.run_id
    try:
        params = {"model": resolved.reference, "data": data, "data_hash": data_hash or "",
                  "images": result.get("images")}
        client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        if resolved.model_id:
            digest = data_hash[:36] if data_hash else None
            for key, value in metrics.items():
                client.log_metric(run_id, key, value, step=0, model_id=resolved.model_id,
                                  dataset_name=name, dataset_digest=digest)
        else:
            client.log_batch(run_id, metrics=[Metric(k, v, int(time.time() * 1000), 0) for k, v in metrics.items()])
        with tempfile.TemporaryDirectory(prefix="ssd-evaluate-") as tmp:
            path = Path(tmp) / "evaluation.json"
            path.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
            client.log_artifact(run_id, str(path))
        if resolved.name and resolved.version:
            prefix = f"eval/{name}"
            version_tags = {f"{prefix}/mAP": f"{float(result['AP']):.6f}",
                            f"{prefix}/AP50": f"{float(result['AP50']):.6f}"}
            if result.get("VOC07") is not None:
                voc_map = result["VOC07"]["mAP"]  # None: no class had ground truth
                version_tags[f"{prefix}/VOC07_mAP"] = "nan" if voc_map is None else f"{float(voc_map):.6f}"
            version_tags.update({f"{prefix}/data_hash": data_hash or "", f"{prefix}/run_id": run_id})
            for key, value in version_tags.items():
                client.set_model_version_tag(resolved.name, str(resolved.version), key, value)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        try:
            client.set_terminated(run_id, "FAILED")
        except Exception:  # noqa: BLE001, S110 - the original error is the one to report
            pass
        raise
    logging.getLogger(__name__).info("logged the evaluation as MLflow run %s (experiment %s) at %s", run_id,
                                     experiment, tracking_uri)
    return run_id


def log_version_artifact(
    tracking_uri: str,
    name: str,
    version: str,
    local_path: str | Path,
    artifact_path: str,
    tags: dict[str, str] | None = None,
) -> str:
    """Log a file to the run a registered model version came from, and tag the version.

    The file goes to ``<artifact_path>/<file name>`` of the version's run (its ``run_id``);
    the version gets ``tags`` plus ``<artifact_path>/uri`` = ``runs:/RUN_ID/<artifact_path>/<file
    name>``, so that the version says where its derived artifact is (e.g. an ONNX export).

    Returns:
        that ``runs:/`` URI.
    Raises:
        ModelReferenceError: no such version, or one without a run to log to.
        Any MLflow failure of the upload or the tags.
    """
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    found = model_version(client, f"models:/{name}/{version}")
    run_id = getattr(found, "run_id", None)
    if not run_id:
        raise ModelReferenceError(f"models:/{name}/{version} has no run to log {Path(local_path).name} to")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client.log_artifact(run_id, str(local_path), artifact_path)
    uri = f"runs:/{run_id}/{artifact_path}/{Path(local_path).name}"
    for key, value in {**(tags or {}), f"{artifact_path}/uri": uri}.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    return uri
