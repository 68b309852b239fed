"""Ray Tune glue (the Train V2 pattern): a driver function per trial that builds one
``TorchTrainer`` from the trial's sampled config and forwards its reports to Tune.

Each trial: sampled values -> ``ssd.search_space.trial_config`` (a combination that cannot be
built ends that trial with an ``invalid`` status, not the sweep) -> optional prior-recall
pre-screen (specs whose ground-truth coverage is below ``min_prior_recall`` are skipped before
any training) -> an MLflow child run of the sweep's parent run -> ``build_torch_trainer(...,
callbacks=[TuneReportCallback()])`` -> ``fit()``. The driver itself holds no CPU (its trainer's
workers do), so a 2-CPU machine runs trials without deadlocking.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
import ray.tune
from ray import tune

from ssd import storage
from ssd.config import ConfigError
from ssd.distributed.failures import summarize
from ssd.distributed.trainer import Scaling, build_torch_trainer
from ssd.search_space import SearchSpace, trial_config
from ssd.tracking import Tracker
from ssd.training import SCORE, RunOptions

#: what a trial that never trained reports (below any real mAP, so ASHA and "best" ignore it)
NO_SCORE = -1.0
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


@dataclass(frozen=True)
class SweepSetup:
    """Everything a trial needs besides its sampled values (shipped once via the object store)."""

    base_config: dict[str, Any]  # as saved in sweep_setup.json; each trial sets its values in it
    options: RunOptions
    scaling: Scaling
    storage_path: str
    sweep_name: str
    tracking_uri: str | None = None
    experiment: str = "ssd-ray"
    parent_run_id: str | None = None
    min_prior_recall: float = 0.0
    #: ground-truth boxes (N,4) relative xyxy and areas (N,) for the pre-screen, as lists
    prescreen_gt: dict[str, Any] | None = field(default=None, repr=False)
    #: the base config's pretrained backbone (an object ref of ``ssd.models.BackboneWeights``)
    backbone: Any = None


def to_tune_space(space: SearchSpace) -> dict[str, Any]:
    """The param_space for ``tune.Tuner``: one Tune domain per searched key, fixed values as is."""
    out: dict[str, Any] = dict(space.fixed)
    for key, param in space.params.items():
        if param.kind == "uniform":
            out[key] = tune.uniform(*param.args)
        elif param.kind == "loguniform":
            out[key] = tune.loguniform(*param.args)
        elif param.kind == "randint":
            out[key] = tune.randint(*param.args)
        elif param.kind == "choice":
            out[key] = tune.choice(list(param.args))
        else:
            out[key] = tune.grid_search(list(param.args))
    return out


def max_concurrent_trials(scaling: Scaling, resources: dict[str, float] | None = None) -> int:
    """How many trials fit the cluster's free resources at once (each needs its workers' CPUs
    and GPUs; the trial drivers themselves take none). At least 1: a busy cluster queues."""
    resources = ray.available_resources() if resources is None else resources
    by_cpu = resources.get("CPU", 0.0) // (scaling.num_workers * scaling.cpus_per_worker)
    fit = by_cpu if not scaling.use_gpu else min(by_cpu, resources.get("GPU", 0.0) // scaling.num_workers)
    return max(1, int(fit))


def prior_recall(cfg: Any, gt: dict[str, Any]) -> float:
    """Fraction of the pre-screen's ground-truth boxes with a prior at IoU >= the config's
    ``matching.iou_threshold`` (0.5): the boxes its matcher can match by threshold."""
    import torch

    from ssd.prior_analysis import GroundTruth, analyze_config

    truth = GroundTruth(boxes=torch.tensor(gt["boxes"], dtype=torch.float32).reshape(-1, 4),
                        areas=torch.tensor(gt["areas"], dtype=torch.float32), num_images=gt["num_images"])
    return float(analyze_config(cfg, truth)["coverage"]["all"]["recall"])


def _trial_backbone(cfg: Any, setup: SweepSetup) -> Any:
    """The sweep's backbone if the trial samples no ``model.*`` / input convention, else the
    trial's own (resolved here, in the trial's driver: e.g. a sampled architecture)."""
    base = setup.base_config
    same = (cfg.to_dict()["model"] == base.get("model")
            and cfg.augment.input_convention == (base.get("augment") or {}).get("input_convention"))
    if same:
        return setup.backbone
    from ssd.models import resolve_backbone_weights

    return resolve_backbone_weights(cfg)


def _trial_id() -> str:
    return ray.tune.get_context().get_trial_id()


def trial_driver(values: dict[str, Any], setup: SweepSetup) -> None:
    """One Tune trial: build, screen, track, train; every outcome is reported to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = _trial_id()
    tags = {"trial_id": trial_id, "sampled": json.dumps(values, sort_keys=True, default=str)}
    try:
        cfg = trial_config(setup.base_config, values)
    except ConfigError as err:
        print(f"trial {trial_id}: invalid config: {err}", flush=True)
        _untrained_child(setup, trial_id, values, tags | {"status": "invalid", "error": str(err)[:5000]})
        tune.report({SCORE: NO_SCORE, "invalid": 1, "skipped": 0, "error": str(err)[:1000]})
        return
    if setup.min_prior_recall > 0 and setup.prescreen_gt is not None:
        recall = prior_recall(cfg, setup.prescreen_gt)
        if recall < setup.min_prior_recall:
            print(f"trial {trial_id}: skipped, prior recall {recall:.3f} < {setup.min_prior_recall}", flush=True)
            _untrained_child(setup, trial_id, values, tags | {"status": "skipped", "prior_recall": f"{recall:.4f}"})
            tune.report({SCORE: NO_SCORE, "invalid": 0, "skipped": 1, "prior_recall": recall})
            return
    run_name = f"{setup.sweep_name}-train-{trial_id}"
    finished = _finished_run_metrics(setup, run_name, cfg.train.epochs)
    if finished is not None:  # a resumed sweep: this trial's training had ended before the stop
        tune.report(finished)
        return
    tracker = None
    if setup.tracking_uri and setup.parent_run_id:
        tracker = Tracker(setup.tracking_uri, setup.experiment, f"trial-{trial_id}", tags=tags | {"status": "running"},
                          parent_run_id=setup.parent_run_id)
        tracker.log_params({**values, "num_priors": cfg.priors.num_priors(),
                            "boxes_per_location": list(cfg.priors.boxes_per_location())})
    options = setup.options
    if tracker is not None and tracker.active:
        options = replace(options, tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
    trainer = build_torch_trainer(cfg, options, setup.scaling, name=run_name,
                                  storage_path=setup.storage_path, max_failures=0, keep_checkpoints=1,
                                  callbacks=[TuneReportCallback()],
                                  placement_group_file=placement_group_file(setup, trial_id),
                                  backbone=_trial_backbone(cfg, setup))
    try:
        trainer.fit()
    except BaseException:
        if tracker is not None:
            tracker.set_tags({"status": "failed"})
            tracker.end("FAILED")
        raise
    if tracker is not None:
        tracker.set_tags({"status": "completed"})
        tracker.end("FINISHED")


def _finished_run_metrics(setup: SweepSetup, run_name: str, epochs: int) -> dict[str, Any] | None:
    """The last epoch's metrics of a trial's Train run that already trained every epoch.

    Ray Train would "resume" such a run by returning at once, with nothing reported to Tune.
    """
    from ssd.jobs.common import latest_checkpoint

    last = latest_checkpoint(storage.join(setup.storage_path, run_name))
    if last is None:
        return None
    meta = json.loads(storage.read_text(storage.join(last, "meta.json")))
    return meta["metrics"] if meta["epoch"] >= epochs else None


def _untrained_child(setup: SweepSetup, trial_id: str, values: dict[str, Any], tags: dict[str, str]) -> None:
    if setup.tracking_uri and setup.parent_run_id:
        tracker = Tracker(setup.tracking_uri, setup.experiment, f"trial-{trial_id}", tags=tags,
                          parent_run_id=setup.parent_run_id)
        tracker.log_params(values)
        tracker.end("FAILED" if tags.get("status") == "invalid" else "FINISHED")


def placement_group_file(setup: SweepSetup, trial_id: str) -> str:
    """Where the trial's rank 0 records its placement group (a path, or a URI: one tiny object)."""
    return storage.join(setup.storage_path, setup.sweep_name, "placement_groups", trial_id)


class ReleaseStoppedTrials(tune.Callback):
    """Frees the workers of a trial that ended, above all one that ASHA stopped.

    Tune stops a trial by ending its driver actor; the driver's Train controller dies with it,
    but in Ray 2.60 the placement group it reserved stays, holding the workers' CPUs, and the
    next trials wait for CPUs that never come back (measured here: a 2-CPU sweep hung after its
    first early stop). Rank 0 of every trial records its group; this releases it.
    """

    def __init__(self, setup: SweepSetup) -> None:
        self.sweep = setup

    def _release(self, trial: Any) -> None:
        from ssd.distributed.trainer import release_placement_group

        try:
            release_placement_group(placement_group_file(self.sweep, trial.trial_id))
        except Exception as err:  # noqa: BLE001 - never break the sweep over bookkeeping
            print(f"warning: could not release trial {trial.trial_id}'s workers: {err}", flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._release(trial)


def trial_rows(results: Any, searched: list[str], epochs: int) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``: sampled values, best mAP, epochs run, outcome."""
    rows = []
    for result in results:
        df = result.metrics_dataframe
        metrics = result.metrics or {}
        scores = [v for v in (df[SCORE].tolist() if df is not None and SCORE in df else []) if v is not None]
        trained = [v for v in scores if v != NO_SCORE and not (isinstance(v, float) and math.isnan(v))]
        epochs_run = int(df["epoch"].max()) if df is not None and "epoch" in df and len(trained) else 0
        error = None
        if result.error is not None:
            status, error = "error", summarize(result.error)
        elif metrics.get("invalid"):
            status, error = "invalid", metrics.get("error")
        elif metrics.get("skipped"):
            status = "skipped"
        elif epochs_run < epochs:
            status = "stopped early"
        else:
            status = "completed"
        row = {"trial_id": metrics.get("trial_id", ""), "status": status, "epochs": epochs_run,
               "best_mAP": max(trained) if trained else NO_SCORE,
               "final_mAP": trained[-1] if trained else NO_SCORE}
        if error:
            row["error"] = error
        row.update({key: result.config.get(key) for key in searched})
        if "prior_recall" in metrics:
            row["prior_recall"] = metrics["prior_recall"]
        rows.append(row)
    return rows


def write_results_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    import csv

    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return path
