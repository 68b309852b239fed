"""A Ray Tune sweep: :func:`run_sweep` takes a :class:`~ssd.jobs.sweep.SweepRequest` from the
checks to the results table, ``best_config.yaml`` and the MLflow parent run.

Each trial is one Ray Train run (``ssd.distributed.tune.trial_driver``); the sweep's folder under
the storage path holds Tune's state, each trial's run, the setup file (``ssd.jobs.sweep``: what
``--resume`` reads), ``results.csv``, ``sweep.png`` and ``best_config.yaml``.
"""

from __future__ import annotations

import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from ssd import storage
from ssd.jobs.common import JobError, JobInterrupted, loader_workers_for
from ssd.jobs.sweep import SETUP_FILE, ResolvedSweep, SweepRequest, prescreen_boxes, resolve_sweep
from ssd.jobs.train import resolve_backbone
from ssd.search_space import trial_config


def _connect(resolved: ResolvedSweep, address: str | None) -> Any:
    """Check that one trial fits (this machine before a private cluster starts, then the
    cluster), connect, and return the trials' Scaling; JobError in one line otherwise."""
    from ssd.distributed.cluster import (
        ClusterAddressError,
        ClusterTooSmall,
        Scaling,
        check_cluster_resources,
        connect,
        machine_resources,
    )
    from ssd.distributed.cluster import plan as plan_cluster

    request = resolved.request
    scaling = Scaling(request.workers_per_trial, bool(request.gpu), request.cpus_per_worker)
    try:
        if plan_cluster(address).starts_cluster:  # checked before a cluster starts for nothing
            check_cluster_resources(scaling, machine_resources(), where="this machine")
        connect(address)
        check_cluster_resources(scaling)
    except ClusterTooSmall as err:
        raise JobError(f"one trial does not fit: {err}") from None
    except (ClusterAddressError, ConnectionError) as err:
        raise JobError(str(err)) from None
    return scaling


def run_sweep(request: SweepRequest) -> dict[str, Any]:
    """Run (or with ``resume``, continue) the sweep; print and return its summary.

    The summary's ``best_trial`` is None when no trial trained to a score: the sweep failed
    (``ssd.jobs.sweep.no_result_reason`` says why).

    Raises:
        BadRequest: the request cannot run (found before Ray starts).
        JobError: no cluster, or one trial does not fit it.
        JobInterrupted: Ctrl-C; the sweep's state is saved and ``--resume NAME`` continues it.
    """
    resolved = resolve_sweep(request)
    options = resolved.request  # a resumed sweep's own options
    base = resolved.base_config()
    space = resolved.search_space()
    searched = list(space.params)
    epochs = base.train.epochs
    backbone = resolve_backbone(base)  # once, before Ray: every trial of the base model shares it
    scaling = _connect(resolved, request.address)

    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ssd.distributed.tune import (
        DRIVER_RESOURCES,
        NO_SCORE,
        ReleaseStoppedTrials,
        SweepSetup,
        max_concurrent_trials,
        to_tune_space,
        trial_driver,
        trial_rows,
        write_results_csv,
    )
    from ssd.publish import finish_sweep_run, start_parent_run
    from ssd.tracking import resolve_tracking_uri
    from ssd.training import SCORE, RunOptions
    concurrent = options.max_concurrent or max_concurrent_trials(scaling)

    tracker = None
    if not options.no_mlflow:
        tracker = start_parent_run(
            resolve_tracking_uri(options.mlflow_uri), options.experiment, resolved.name,
            run_id=resolved.parent_run_id if resolved.resume else None,
            tags={"sweep": "true", "data_hash": resolved.data_hash, "space": Path(resolved.space_file).name},
            params={"space": resolved.space_file, "num_samples": options.num_samples, "scheduler": options.scheduler,
                    "grace_period": options.grace_period, "reduction_factor": options.reduction_factor,
                    "epochs": epochs, "min_prior_recall": options.min_prior_recall, "max_concurrent": concurrent,
                    "workers_per_trial": scaling.num_workers, "base_config": options.config},
            artifacts=[resolved.space_file])
    parent_id = tracker.run_id if tracker is not None and tracker.active else None
    sweep_dir = resolved.sweep_dir
    if not resolved.resume:
        storage.write_text(storage.join(sweep_dir, SETUP_FILE), resolved.setup_json(parent_id))

    gt = prescreen_boxes(resolved.train_spec, options.prescreen_images) if options.min_prior_recall else None
    run_options = RunOptions(train_data=resolved.train_spec, val_data=resolved.val_spec, log_every=10**6,
                             sample_images=4, amp=options.amp,
                             loader_workers=loader_workers_for(options.loader_workers, scaling.use_gpu,
                                                               scaling.cpus_per_worker))
    setup = SweepSetup(base_config=resolved.base, options=run_options, scaling=scaling,
                       storage_path=resolved.storage, sweep_name=resolved.name,
                       tracking_uri=tracker.uri if parent_id else None, experiment=options.experiment,
                       parent_run_id=parent_id, min_prior_recall=options.min_prior_recall, prescreen_gt=gt,
                       backbone=ray.put(backbone) if backbone is not None else None)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, setup=setup), DRIVER_RESOURCES)
    if options.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=options.grace_period,
                                  reduction_factor=options.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    print(f"sweep {resolved.name}: {len(space.grid_points()) * options.num_samples} trial(s) of up to {epochs} "
          f"epoch(s), {concurrent} at a time, {options.scheduler}; searching {', '.join(searched)}", flush=True)
    start = time.perf_counter()
    if resolved.resume:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", scheduler=scheduler, num_samples=options.num_samples,
                                        max_concurrent_trials=concurrent,
                                        # explicit: a search algorithm passed in ignores the line above
                                        search_alg=BasicVariantGenerator(random_state=options.seed,
                                                                         max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=resolved.name, storage_path=resolved.storage, verbose=1,
                                      callbacks=[ReleaseStoppedTrials(setup)]))
    # Tune's Ctrl-C handler saves the sweep's state, ends fit() early and puts back the handler
    # it found: finding ours back afterwards is how we know the sweep was interrupted.
    signal.signal(signal.SIGINT, _interrupted_marker)
    results = tuner.fit()
    interrupted = signal.getsignal(signal.SIGINT) is _interrupted_marker
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:  # nothing is final yet
        if tracker is not None:
            tracker.set_tags({"interrupted": "true"})
            tracker.end("KILLED")
        print(f"\nsweep {resolved.name} interrupted; continue it with "
              f"python pipelines/tune.py --resume {resolved.name}" + (f" --storage-path {resolved.storage}"
                                                                       if request.storage_path else ""), flush=True)
        raise JobInterrupted(f"sweep {resolved.name} interrupted")
    rows = trial_rows(results, searched, epochs)
    trial_epochs = sum(r["epochs"] for r in rows)
    best = max((r for r in rows if r["best_mAP"] > NO_SCORE), key=lambda r: r["best_mAP"], default=None)
    summary: dict[str, Any] = {
        "name": resolved.name, "trials": len(rows), "trial_epochs": trial_epochs,
        "full_budget_epochs": len(rows) * epochs, "seconds": round(time.perf_counter() - start, 1),
        "by_status": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "best_trial": best["trial_id"] if best else None, "best_mAP": best["best_mAP"] if best else None,
        "sweep_dir": sweep_dir, "parent_run_id": parent_id, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        from ssd.reporting import plot_sweep

        files = [write_results_csv(rows, Path(tmp) / "results.csv"), plot_sweep(rows, searched, Path(tmp) / "sweep.png")]
        if best is not None:
            best_cfg = trial_config(base, {k: best[k] for k in searched} | space.fixed)
            best_path = Path(tmp) / "best_config.yaml"
            best_path.write_text(f"# best trial {best['trial_id']} of sweep {resolved.name}: validation mAP "
                                 f"{best['best_mAP']:.4f}\n" + best_cfg.to_yaml())
            summary["best_config"] = storage.join(sweep_dir, best_path.name)
            files.append(best_path)
        for path in files:  # next to Tune's own files, wherever the sweep lives
            storage.upload(path, storage.join(sweep_dir, path.name))
        if tracker is not None:
            finish_sweep_run(tracker, rows, files, {
                "best_mAP": summary["best_mAP"] or NO_SCORE, "trial_epochs": trial_epochs,
                "trials_skipped_by_prior_recall": summary["by_status"].get("skipped", 0)})
    print_summary(summary, searched)
    return summary


def _interrupted_marker(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def print_summary(summary: dict[str, Any], searched: list[str]) -> None:
    """The sweep's trials, best first, with their searched values, and the best config."""
    from ssd.distributed.tune import NO_SCORE

    print(f"\nsweep {summary['name']} done in {summary['seconds']:.0f} s: {summary['trials']} trials, "
          f"{summary['trial_epochs']} of {summary['full_budget_epochs']} trial-epochs trained; {summary['by_status']}")
    for row in sorted(summary["rows"], key=lambda r: -r["best_mAP"]):
        values = ", ".join(f"{k}={json.dumps(row.get(k))}" for k in searched)
        score = f"{row['best_mAP']:.4f}" if row["best_mAP"] > NO_SCORE else "n/a   "
        print(f"  {row['trial_id']:>12}  {row['status']:<13} epochs {row['epochs']}  best mAP {score}  {values}"
              + (f"  ({row['error']})" if row.get("error") else ""))
    if summary.get("best_config"):
        print(f"best config: {summary['best_config']}  (python pipelines/train.py --config {summary['best_config']})")
