"""Finish a training run in MLflow: best metrics, the model, a registry version, the ``champion``
alias, the run's end. What ``pipelines/train.py`` does after training and what
``pipelines/register.py`` does later for a run whose MLflow server was away.

Training never waits for MLflow (``ssd.tracking.Tracker`` turns itself off at the first failure),
but this last step is what a ``--register-as`` job is for: here every MLflow call is retried with
exponential backoff while the failure is one that waiting can cure (no connection, a timeout, a
5xx answer), up to one shared deadline. A refusal (an unknown run, a bad name: 4xx) fails at once.
On failure :class:`PublishError` says what was done and what failed; the run is left as it was,
and :func:`register_command` is the command that finishes the job later.

Imports MLflow lazily, like ``ssd.tracking``: ``Tracker.end(retry_for=...)`` uses :func:`retry`.
"""

from __future__ import annotations

import logging
import math
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: default seconds to keep retrying MLflow at the end of a run (train.py --register-timeout)
DEFAULT_TIMEOUT = 300.0
#: the metrics of the best checkpoint that are logged as ``best/<name>`` and reported
BEST_METRICS = ("mAP", "AP50", "VOC07_mAP")


class PublishError(Exception):
    """A run could not be finished in MLflow. ``done`` holds what was (model_uri,
    registered_version, ...), ``transient`` whether waiting longer could have helped."""

    def __init__(self, message: str, done: dict[str, Any], transient: bool) -> None:
        super().__init__(message)
        self.done = done
        self.transient = transient


def is_transient(err: BaseException) -> bool:
    """True for a failure that waiting can cure: no connection, a timeout, a 5xx answer (MLflow
    reports a refused connection as an ``INTERNAL_ERROR``, HTTP 500). False for refusals (4xx:
    unknown run, invalid name) and for errors that are not MLflow's (a broken checkpoint)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError))


def retry(
    fn: Callable[[], T],
    *,
    deadline: float,
    what: str,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
) -> T:
    """``fn()``, retried with exponential backoff (``first_delay`` doubling up to ``max_delay``)
    while it fails with a transient error (:func:`is_transient`) and ``time.monotonic()`` is
    before ``deadline``; then the last error is raised. Other errors are raised at once."""
    delay = first_delay
    while True:
        try:
            return fn()
        except Exception as err:
            left = deadline - time.monotonic()
            if left <= 0 or not is_transient(err):
                raise
            wait = min(delay, left)
            log.warning("MLflow: could not %s (%s: %s); retrying in %.0f s, for %.0f s more", what,
                        type(err).__name__, _short(err), wait, left)
            time.sleep(wait)
            delay = min(2 * delay, max_delay)


def _short(err: BaseException, keep: int = 120) -> str:
    """The error on one line, its middle cut when long: a wrapped connection error says what was
    asked at the start and why it failed ("Connection refused") at the end."""
    text = " ".join(str(err).split())
    return text if len(text) <= 2 * keep + 5 else f"{text[:keep]} ... {text[-keep:]}"


def version_tags(
    best: Any,
    *,
    data_hash: str,
    val_data_hash: str,
    lineage: dict[str, str],
) -> dict[str, str]:
    """The tags of a registered version of the ``best`` checkpoint (``ssd.checkpoint.Checkpoint``):
    training and validation data hashes, prior spec (name and JSON), ``lineage``
    (``parent_model``, ``init_from``, ...), the validation mAP and its epoch. The ``mAP`` with
    ``val_data_hash`` is what the champion rule compares later versions against."""
    cfg = best.config
    return {
        "data_hash": data_hash,
        "val_data_hash": val_data_hash,
        "prior_spec": cfg.priors.name,
        "prior_spec_json": cfg.priors.to_json(),
        **lineage,
        "mAP": repr(float(best.metrics.get("mAP", math.nan))),
        "best_epoch": str(best.epoch),
    }


def lineage_from_tags(tags: dict[str, str]) -> dict[str, str]:
    """The lineage tags (``parent_*``, ``init_*``) among a run's tags (train.py sets them when
    the run starts)."""
    return {k: v for k, v in tags.items() if k.startswith(("parent_", "init_"))}


def register_command(
    run_id: str,
    checkpoint: str,
    *,
    name: str | None,
    tracking_uri: str,
    alias: str = "champion",
) -> str:
    """The command that finishes :func:`publish_run` later (``pipelines/register.py``)."""
    argv = ["python", "pipelines/register.py", "--run-id", run_id]
    if name:
        argv += ["--name", name]
    argv += ["--checkpoint", str(checkpoint), "--mlflow-uri", tracking_uri]
    if alias != "champion":
        argv += ["--alias", alias]
    return shlex.join(argv)


def publish_run(
    run_id: str,
    tracking_uri: str,
    checkpoint: str | Path,
    *,
    register_as: str | None = None,
    data_hash: str | None = None,
    val_data_hash: str | None = None,
    lineage: dict[str, str] | None = None,
    val_data: str | None = None,
    alias: str = "champion",
    eval_device: str = "cpu",
    timeout: float = DEFAULT_TIMEOUT,
    torch_flavour: bool = True,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Finish MLflow run ``run_id`` with the ``checkpoint`` folder (the run's best): log its
    metrics as ``best/*`` and its model (``ssd.mlflow_model.log_ssd_model``); with
    ``register_as``, register it (:func:`version_tags`) and apply the champion rule
    (``ssd.registry.apply_champion_rule``); end the run FINISHED. Each step is retried
    (:func:`retry`) until ``timeout`` seconds after the call; a step done is not redone.

    Args:
        data_hash, val_data_hash, lineage: for the version tags; None reads them from the run's
            tags (set when train.py started it).
        val_data: the validation shards, to evaluate the champion on when its recorded mAP is on
            other data; default the checkpoint's own record (``extra.val_data``).
        alias, eval_device: of the champion rule.
    Returns:
        ``{"model_uri", "registered_name", "registered_version", "champion",
        "champion_comparison"}``: ``champion`` is whether the alias moved to this version, the
        comparison ``Promotion.to_dict()``; the last three are None without ``register_as``.
    Raises:
        PublishError: a step refused, or MLflow unreachable until the deadline; the run is left
            as it was.
    """
    import mlflow
    from mlflow.entities import Metric

    from ssd.checkpoint import load_checkpoint
    from ssd.mlflow_model import log_ssd_model, register_ssd_model
    from ssd.registry import apply_champion_rule

    deadline = time.monotonic() + timeout
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    best = load_checkpoint(checkpoint)
    done: dict[str, Any] = {"model_uri": None, "registered_name": None, "registered_version": None,
                            "champion": None, "champion_comparison": None}
    step = "read its tags"
    try:
        if data_hash is None or val_data_hash is None or lineage is None:
            tags = retry(lambda: client.get_run(run_id).data.tags, deadline=deadline, what=step)
            data_hash = tags.get("data_hash", "") if data_hash is None else data_hash
            val_data_hash = tags.get("val_data_hash", "") if val_data_hash is None else val_data_hash
            lineage = lineage_from_tags(tags) if lineage is None else lineage

        step = "log the best metrics"
        now = int(time.time() * 1000)
        metrics = [Metric(f"best/{k}", float(v), now, best.epoch) for k, v in best.metrics.items()
                   if k in BEST_METRICS]
        retry(lambda: client.log_batch(run_id, metrics=metrics), deadline=deadline, what=step)

        # A version registered from this run by an earlier, interrupted attempt is kept: not a second one.
        existing = None
        if register_as:
            step = f"look up the versions of {register_as}"
            existing = retry(lambda: _version_of_run(client, register_as, run_id), deadline=deadline, what=step)
        if existing is None:
            step = "log the model"
            logged = retry(lambda: log_ssd_model(run_id, tracking_uri, checkpoint, torch_flavour=torch_flavour),
                           deadline=deadline, what=step)
            done["model_uri"] = logged["model_uri"]
            if register_as:
                step = f"register the model as {register_as}"
                tags = version_tags(best, data_hash=data_hash, val_data_hash=val_data_hash, lineage=lineage)
                version = retry(lambda: register_ssd_model(tracking_uri, logged["model_uri"], register_as, run_id,
                                                           tags), deadline=deadline, what=step)
                done.update(registered_name=register_as, registered_version=version)
        else:
            say(f"{register_as} v{existing.version} was registered from run {run_id} before: it is kept")
            done.update(model_uri=existing.source, registered_name=register_as,
                        registered_version=str(existing.version))

        if register_as:
            version = done["registered_version"]
            step = f"apply the {alias} rule to {register_as} v{version}"
            val = val_data or best.extra.get("val_data")
            score = float(best.metrics.get("mAP", math.nan))
            promotion = retry(lambda: apply_champion_rule(client, register_as, version, score, val, val_data_hash,
                                                          alias=alias, device=eval_device, say=say),
                              deadline=deadline, what=step)
            done.update(champion=promotion.promoted, champion_comparison=promotion.to_dict())

        step = "end the run"
        retry(lambda: client.set_terminated(run_id, "FINISHED"), deadline=deadline, what=step)
    except Exception as err:  # whatever failed is reported with what was done
        transient = is_transient(err)
        still = f" (still unreachable after {timeout:.0f} s)" if transient else ""
        raise PublishError(f"MLflow run {run_id} at {tracking_uri}: could not {step}{still}: "
                           f"{type(err).__name__}: {_short(err)}", done, transient) from err
    return done


def _version_of_run(client: Any, name: str, run_id: str) -> Any | None:
    """The newest version of ``name`` registered from ``run_id``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException as err:
        if err.get_http_status_code() >= 500:
            raise
        return None  # no such registered model yet
    return max(versions, key=lambda v: int(v.version), default=None)
