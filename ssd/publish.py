"""A job's MLflow runs: a training run started with its params, tags and lineage
(:func:`start_tracking`) and finished with best metrics, the model, a registry version, the
``champion`` alias and the run's end (:func:`finish_run`, :func:`publish_run`); the parent run of
a sweep or a pipeline (:func:`start_parent_run`, :func:`finish_sweep_run`,
:func:`record_promotion`). :func:`publish_run` is what ``ssd.distributed.train_job`` does after
training and what ``pipelines/register.py`` does later for a run whose MLflow server was away.

Training never waits for MLflow (``ssd.tracking.Tracker`` turns itself off at the first failure),
but this last step is what a ``--register-as`` job is for: here every MLflow call is retried with
exponential backoff while the failure is one that waiting can cure (no connection, a timeout, a
5xx answer), up to one shared deadline. A refusal (an unknown run, a bad name: 4xx) fails at once.
On failure :class:`PublishError` says what was done and what failed; the run is left as it was,
and :func:`register_command` is the command that finishes the job later.

Imports MLflow lazily, like ``ssd.tracking`` (which has :func:`~ssd.tracking.retry`).
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ssd.tracking import Tracker, is_transient, resolve_tracking_uri, retry, short_error

if TYPE_CHECKING:
    from ssd.distributed.cluster import Scaling
    from ssd.jobs.train import InitSource, ResolvedTrain, TrainRequest

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]

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
                           f"{type(err).__name__}: {short_error(err)}", done, transient) from err
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


# --------------------------------------------------------------------------------------------
# A training job's run: started before training, finished with its best checkpoint


def lineage_tags(parent_model: str | None, source: InitSource | None) -> dict[str, str]:
    """Tags naming the model a run started from (run and model-version tags alike):
    ``parent_model`` (``--parent-model``, else the ``--init-from`` model, else ``none``) and for
    an ``--init-from`` run the registry version, its run and data, and the classes transferred."""
    if source is None:
        return {"parent_model": parent_model or "none"}
    model = source.model
    tags = {"parent_model": parent_model or model.label, "init_from": model.reference}
    if model.name:
        tags |= {"parent_model_name": model.name, "parent_model_version": model.version,
                 "parent_run_id": model.tags.get("run_id", ""),
                 "parent_data_hash": model.tags.get("data_hash", "")}
    if source.report is not None:
        tags["init_classes_transferred"] = json.dumps(source.report.mapped, sort_keys=True)
        tags["init_classes_fresh"] = json.dumps(source.report.fresh)
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             check=False)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except OSError:
        return None


def _ui_address(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"


def run_params(request: TrainRequest, resolved: ResolvedTrain, scaling: Scaling) -> dict[str, Any]:
    """A training run's MLflow params: the flat config, data, Ray scaling, and ``schedule.*``,
    the batch / length / lr plan that every rank follows (``ssd.schedule.plan_schedule``:
    ``schedule.per_worker_batch``, ``schedule.iterations``, ``schedule.lr_effective``, ...)."""
    from ssd.schedule import plan_schedule

    cfg, train_set, val_set = resolved.cfg, resolved.train_set, resolved.val_set
    plan = plan_schedule(cfg, train_set.num_samples, scaling.num_workers)
    return cfg.flat() | {
        "data.train": resolved.train_spec, "data.val": resolved.val_spec,
        "data.train_samples": train_set.num_samples, "data.val_samples": val_set.num_samples,
        "ray.workers": scaling.num_workers, "ray.use_gpu": scaling.use_gpu,
        "ray.cpus_per_worker": scaling.cpus_per_worker, "amp": request.amp,
    } | plan.params() | _backbone_params(resolved.backbone)


def _backbone_params(backbone: Any) -> dict[str, Any]:
    """Where a fresh run's pretrained backbone came from (``ssd.models.BackboneWeights``)."""
    if backbone is None:
        return {}
    return {"backbone.source": backbone.source, "backbone.sha256": backbone.sha256,
            "backbone.input_convention": backbone.input_convention}


def start_tracking(request: TrainRequest, resolved: ResolvedTrain, scaling: Scaling) -> Tracker | None:
    """The run's MLflow run (created here, or the resumed run's), with params, tags and inputs;
    None with ``no_mlflow``. An unreachable MLflow gives a tracker that is off (it warned)."""
    if request.no_mlflow:
        return None
    uri = resolve_tracking_uri(request.mlflow_uri)
    cfg = resolved.cfg
    train_set, val_set = resolved.train_set, resolved.val_set
    previous = resolved.resumed.extra.get("mlflow_run_id") if resolved.resumed is not None else None
    if previous and request.resume == resolved.name:
        tracker = Tracker.attach(uri, previous)
        tracker.set_tags({"resumed_at_epoch": resolved.resumed.epoch})
        return tracker
    tags = {
        "data_hash": train_set.info.get("content_hash", ""),
        "val_data_hash": val_set.info.get("content_hash", ""),
        "classes": json.dumps(list(train_set.classes)),
        "prior_spec": cfg.priors.name,
        "ray_run_name": resolved.name,
        "storage_path": resolved.storage,
        **lineage_tags(request.parent_model, resolved.source),
    }
    if resolved.resume_from:
        tags["resumed_from_checkpoint"] = resolved.resume_from
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    tracker = Tracker(uri, request.experiment, resolved.name, tags=tags, parent_run_id=request.parent_run_id)
    tracker.log_params(run_params(request, resolved, scaling))
    from ssd.data.shards import DATASET_JSON

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(cfg.to_yaml())
        tracker.log_artifact(config_path)
        for split, shards in (("train", train_set), ("val", val_set)):
            info = Path(tmp) / split / DATASET_JSON
            info.parent.mkdir()
            info.write_text(json.dumps(shards.info, indent=2, sort_keys=True))
            tracker.log_artifact(info, f"data/{split}")
    return tracker


def finish_run(request: TrainRequest, resolved: ResolvedTrain, tracker: Tracker | None, checkpoint: Path,
               checkpoint_path: str) -> dict[str, Any]:
    """Finish the MLflow run with the best checkpoint (:func:`publish_run`: best metrics, the
    model, with ``register_as`` a version and the champion rule, the run ended FINISHED),
    retrying an unreachable server for ``register_timeout`` seconds; the summary.

    Training never waited for MLflow; this step does, because a ``--register-as`` job exists to
    register. If it still fails, the run is ended FAILED if the server answers, and the summary
    holds ``registration_error`` and ``register_command`` (``pipelines/register.py``, which
    finishes the job later); with ``register_as`` also ``error``: the job must exit non-zero.
    """
    from ssd.checkpoint import load_checkpoint

    best = load_checkpoint(checkpoint)
    summary: dict[str, Any] = {
        "best_checkpoint": checkpoint_path, "best_epoch": best.epoch,
        "mAP": best.metrics.get("mAP"), "AP50": best.metrics.get("AP50"),
        "VOC07_mAP": best.metrics.get("VOC07_mAP"), "epochs": resolved.cfg.train.epochs,
        "mlflow_run_id": None, "registered_name": None, "registered_version": None, "alias": request.alias,
        "champion": None, "champion_comparison": None, "registration_error": None, "register_command": None,
        "error": None,
    }
    register_as = request.register_as
    if tracker is None or tracker.run_id is None:  # --no-mlflow, or MLflow unreachable when the run started
        if register_as:
            why = ("--no-mlflow" if tracker is None
                   else f"MLflow was unreachable when the run started ({tracker.failure})")
            summary["registration_error"] = f"nothing was logged or registered: {why}"
            summary["error"] = (f"the model was not registered as {register_as}: {why}; the best checkpoint is "
                                f"{checkpoint_path}")
        return summary
    summary.update(mlflow_run_id=tracker.run_id, mlflow_uri=tracker.uri, mlflow_ui=_ui_address(tracker.uri))
    lineage: dict[str, str] | None = lineage_tags(request.parent_model, resolved.source)
    if resolved.source is None and resolved.resumed is not None and not request.parent_model:
        lineage = None  # a resumed finetune: its lineage was tagged on the run when it started; read there
    try:
        published = publish_run(
            tracker.run_id, tracker.uri, checkpoint, register_as=register_as,
            data_hash=resolved.train_set.info.get("content_hash", ""),
            val_data_hash=resolved.val_set.info.get("content_hash", ""), lineage=lineage,
            val_data=resolved.val_spec, alias=request.alias, eval_device=request.eval_device,
            timeout=request.register_timeout, say=lambda line: print(line, flush=True))
        summary.update(published)
    except PublishError as err:
        summary.update({k: v for k, v in err.done.items() if v is not None})
        command = register_command(tracker.run_id, checkpoint_path, name=register_as, tracking_uri=tracker.uri,
                                   alias=request.alias)
        summary.update(registration_error=str(err), register_command=command)
        # The job fails (with --register-as): so does its run, if the server answers now. register.py
        # ends it FINISHED when it completes the job.
        tracker.end("FAILED" if register_as else "FINISHED", retry_for=0)
        if register_as:
            summary["error"] = (f"the model was not registered as {register_as}: {err}; "
                                f"finish it later with: {command}")
        else:
            print(f"warning: the model was not logged to MLflow: {err}; log it later with: {command}",
                  file=sys.stderr, flush=True)
    return summary


# --------------------------------------------------------------------------------------------
# The parent run of a sweep or a pipeline


def start_parent_run(
    uri: str,
    experiment: str,
    name: str,
    *,
    tags: dict[str, str],
    params: dict[str, Any],
    artifacts: Iterable[str | Path] = (),
    run_id: str | None = None,
) -> Tracker:
    """The parent run of a sweep or a pipeline, with its ``tags``, ``params`` and ``artifacts``;
    with ``run_id``, that run continued instead (a resumed sweep). Check ``.active``."""
    if run_id:
        return Tracker.attach(uri, run_id)
    tracker = Tracker(uri, experiment, name, tags=tags)
    tracker.log_params(params)
    for path in artifacts:
        tracker.log_artifact(path)
    return tracker


def finish_sweep_run(tracker: Tracker, rows: list[dict[str, Any]], files: Iterable[Path],
                     metrics: dict[str, float]) -> None:
    """End a sweep's parent run FINISHED with its result ``files`` and ``metrics``, and every
    trial's child run in the state of its trial (:func:`close_trial_runs`)."""
    for path in files:
        tracker.log_artifact(path)
    tracker.log_metrics(metrics)
    close_trial_runs(tracker, rows)
    tracker.end("FINISHED")


def close_trial_runs(tracker: Tracker, rows: list[dict[str, Any]]) -> None:
    """Child runs end in the state of their trial: the drivers of trials that ASHA stopped (even
    at their last epoch) are ended mid-run, leaving the run RUNNING or FAILED. Stopped early ->
    KILLED, completed -> FINISHED, anything else still RUNNING -> KILLED ("interrupted")."""
    import mlflow

    client = mlflow.MlflowClient(tracker.uri)
    stopped = {r["trial_id"] for r in rows if r["status"] == "stopped early"}
    completed = {r["trial_id"] for r in rows if r["status"] == "completed"}
    try:
        run = client.get_run(tracker.run_id)
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{tracker.run_id}'")
        for child in children:
            trial = child.data.tags.get("trial_id")
            if trial in stopped:
                client.set_tag(child.info.run_id, "status", "stopped early")
                client.set_terminated(child.info.run_id, "KILLED")
            elif trial in completed and child.info.status != "FINISHED":
                # ASHA also stops every trial that reaches max_t, which can beat its driver's end()
                client.set_tag(child.info.run_id, "status", "completed")
                client.set_terminated(child.info.run_id, "FINISHED")
            elif child.info.status == "RUNNING":
                client.set_tag(child.info.run_id, "status", "interrupted")
                client.set_terminated(child.info.run_id, "KILLED")
    except Exception as err:  # noqa: BLE001 - bookkeeping only
        print(f"warning: could not close the trials' MLflow runs: {err}", file=sys.stderr)


def record_promotion(parent: Tracker, prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Put a stage's champion decision (made when its run was finished,
    ``ssd.registry.apply_champion_rule``) on the pipeline's parent run: tags ``<prefix>.model``,
    ``.promoted``, ``.champion_comparison`` and metrics ``<prefix>/mAP``,
    ``<prefix>/champion_mAP``. Returns the comparison."""
    record = summary["champion_comparison"]
    name, version = summary["registered_name"], summary["registered_version"]
    parent.set_tags({f"{prefix}.model": f"{name}/{version}", f"{prefix}.promoted": record["promoted"],
                     f"{prefix}.champion_comparison": json.dumps(record, sort_keys=True)})
    previous = record["champion_score"]
    parent.log_metrics({f"{prefix}/mAP": record["score"]} | ({f"{prefix}/champion_mAP": previous}
                                                             if previous not in (None, float("-inf")) else {}))
    return record
