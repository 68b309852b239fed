"""Ray Tune sweep: each trial is one Ray Train run of pipelines/train.py's training function.

    ray job submit --working-dir . -- python pipelines/tune.py --space tune_spaces/priors.yaml \\
        --data DIR --num-samples 8 --epochs 6
    python pipelines/tune.py --space tune_spaces/default.yaml --data DIR --num-samples 16 --min-prior-recall 0.8
    python pipelines/tune.py --resume NAME        # continue an interrupted sweep (same --storage-path)
    python pipelines/tune.py --smoke-test         # 3 tiny trials of 2 epochs on synthetic data

The space (``tune_spaces/*.yaml``, grammar in ``ssd/search_space.py``) is checked against the
config before anything starts: an unknown key or an invalid range is an error naming the key.
Trials run concurrently as far as the cluster's CPUs (GPUs) allow (``--workers-per-trial`` x
``--cpus-per-worker`` each); ASHA (``--scheduler asha``, the default) stops trials whose
validation mAP trails after ``--grace-period`` epochs, keeping 1/``--reduction-factor`` per rung.
``--min-prior-recall R`` skips, before training, every sampled prior spec that gives fewer than
R of the training boxes a prior at IoU >= 0.5 (``pipelines/analyze_priors.py``).

MLflow: one parent run for the sweep (its settings as params; the results table
``results.csv``, ``sweep.png`` (mAP against each searched key) and ``best_config.yaml`` as
artifacts) and one child run per trial (sampled values as params, metrics per epoch).
``best_config.yaml`` is the best trial's whole config: ``pipelines/train.py --config
best_config.yaml`` trains it as is.

Storage: ``--storage-path`` is a folder every node mounts, or ``s3://BUCKET/PREFIX``. The sweep's
folder there holds Tune's state, each trial's Train run, ``sweep_setup.json`` (the request,
including the loaded search space, so that ``--resume`` needs nothing else), ``best_config.yaml``
and ``results.csv``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

from train import BadRequest, _local, _open, default_storage_path, init_ray

from ssd import storage
from ssd.config import ConfigError, load_config
from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.data.shards import join_spec
from ssd.search_space import SearchSpace, SpaceError, trial_config
from ssd.tracking import Tracker, resolve_tracking_uri

SETUP_FILE = "sweep_setup.json"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="search space YAML (tune_spaces/...)")
    p.add_argument("--config", default="tiny", help="base config: preset name or YAML path (default tiny)")
    p.add_argument("--data", help="folder with train/ and val/ shard sets (default: the synthetic dataset)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (per grid point)")
    p.add_argument("--epochs", type=int, help="epochs per trial (train.epochs); evaluation every epoch")
    p.add_argument("--scheduler", choices=["asha", "fifo"], default="asha")
    p.add_argument("--grace-period", type=int, default=1, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA: keep 1/this many per rung")
    p.add_argument("--min-prior-recall", type=float, default=0.0,
                   help="skip specs whose prior recall at IoU 0.5 on the training boxes is below this")
    p.add_argument("--prescreen-images", type=int, default=500, help="training images used by the pre-screen")
    p.add_argument("--workers-per-trial", type=int, default=1)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="DataLoader processes per training worker (default 0; a few per GPU worker)")
    p.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"], help="as pipelines/train.py")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the cluster holds)")
    p.add_argument("--address", default=None, help="Ray address (as pipelines/train.py)")
    p.add_argument("--name", help="sweep name (default: sweep-<space>-<time>)")
    p.add_argument("--storage-path", default=None, help="as pipelines/train.py (default ~/.cache/ssd-ray/runs)")
    p.add_argument("--resume", metavar="NAME", help="continue the interrupted sweep NAME")
    p.add_argument("--seed", type=int, default=0, help="search seed")
    p.add_argument("--mlflow-uri", help="tracking URI (default $MLFLOW_TRACKING_URI, else local SQLite)")
    p.add_argument("--experiment", default="ssd-ray-tune")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--summary-json", type=Path, help="also write the sweep summary as JSON here")
    p.add_argument("--smoke-test", action="store_true", help="3 trials of 2 epochs on a small synthetic set")
    p.add_argument("overrides", nargs="*", help="overrides of the base config, e.g. train.batch_size=8")
    return p


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Space, base config and data, all checked before Ray starts; raises BadRequest."""
    storage_path = _local(args.storage_path or default_storage_path())
    if args.resume:
        saved = storage.join(storage_path, args.resume, SETUP_FILE)
        try:
            setup = json.loads(storage.read_text(saved))
        except FileNotFoundError:
            raise BadRequest(f"--resume {args.resume}: no sweep under {storage.join(storage_path, args.resume)} "
                             f"(no {SETUP_FILE})") from None
        except (OSError, ValueError) as err:  # unreadable, or not JSON
            raise BadRequest(f"--resume {args.resume}: cannot read {saved}: {err}") from None
        return {**setup, "resume": True, "storage": storage_path}
    if not args.space:
        raise BadRequest("--space is required (e.g. tune_spaces/priors.yaml)")
    overrides = list(args.overrides) + ["train.eval_every=1"]  # ASHA compares mAP every epoch
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.smoke_test:
        overrides = ["train.epochs=2", "train.batch_size=8", "optim.warmup_iters=5", *overrides]
    if args.data:
        train_spec, val_spec = join_spec(args.data, "train"), join_spec(args.data, "val")
    else:
        home = default_data_home() / ("synthetic-smoke" if args.smoke_test else "synthetic")
        counts = (64, 32) if args.smoke_test else (1536, 256)
        ensure_synthetic_shards(home, *counts, log=lambda line: print(line, flush=True))
        train_spec, val_spec = str(home / "train"), str(home / "val")
    train_spec, val_spec = _local(train_spec), _local(val_spec)
    train_set, val_set = _open(train_spec, "training"), _open(val_spec, "validation")
    if list(train_set.classes) != list(val_set.classes):
        raise BadRequest("training and validation shards have different classes")
    try:
        base = load_config(args.config, [f"model.num_classes={train_set.num_classes}", *overrides])
    except ConfigError as err:
        raise BadRequest(f"config: {err}") from None
    try:
        space = SearchSpace.load(args.space, base)  # checked here, before Ray
    except SpaceError as err:
        raise BadRequest(f"search space: {err}") from None
    if args.workers_per_trial < 1 or args.num_samples < 1:
        raise BadRequest("--workers-per-trial and --num-samples must be at least 1")
    name = args.name or f"sweep-{Path(args.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return {"name": name, "storage": storage_path, "space": str(Path(args.space).resolve()), "base": base.to_dict(),
            "space_snapshot": space.snapshot(),
            "train_spec": train_spec, "val_spec": val_spec, "resume": False,
            "data_hash": train_set.info.get("content_hash", ""), "args": {
                k: v for k, v in vars(args).items() if k not in ("summary_json", "resume", "overrides")
                and not isinstance(v, Path)}}


def prescreen_boxes(train_spec: str, images: int) -> dict[str, Any]:
    from ssd.data.shards import ShardSet
    from ssd.prior_analysis import ground_truth_from_shards

    gt = ground_truth_from_shards(ShardSet.open(train_spec), max_images=images)
    return {"boxes": gt.boxes.tolist(), "areas": gt.areas.tolist(), "num_images": gt.num_images}


def main(args: argparse.Namespace) -> dict[str, Any]:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ssd.config import config_from_dict
    from ssd.distributed.cluster import (
        ClusterAddressError,
        ClusterTooSmall,
        Scaling,
        check_cluster_resources,
        machine_resources,
    )
    from ssd.distributed.cluster import plan as plan_cluster
    from ssd.distributed.tune import (
        DRIVER_RESOURCES,
        NO_SCORE,
        ReleaseStoppedTrials,
        SweepSetup,
        max_concurrent_trials,
        to_tune_space,
        trial_driver,
        trial_rows,
    )
    from ssd.training import SCORE, RunOptions

    try:
        request = resolve(args)
    except BadRequest as err:
        raise SystemExit(f"error: {err}") from None
    saved_args = argparse.Namespace(**{**vars(args), **request["args"]}) if request["resume"] else args
    base = config_from_dict(request["base"])
    # the snapshot: a sweep resumed by another job (another working dir) has no space file
    space = (SearchSpace.from_snapshot(request["space_snapshot"]) if "space_snapshot" in request
             else SearchSpace.load(request["space"], base))
    searched = list(space.params)
    epochs = base.train.epochs

    scaling = Scaling(saved_args.workers_per_trial, bool(saved_args.gpu), saved_args.cpus_per_worker)
    try:
        if plan_cluster(args.address).starts_cluster:  # checked before a cluster starts for nothing
            check_cluster_resources(scaling, machine_resources(), where="this machine")
        init_ray(args.address)
        check_cluster_resources(scaling)
    except ClusterTooSmall as err:
        raise SystemExit(f"error: one trial does not fit: {err}") from None
    except ClusterAddressError as err:
        raise SystemExit(f"error: {err}") from None
    concurrent = saved_args.max_concurrent or max_concurrent_trials(scaling)

    tracker = None
    if not saved_args.no_mlflow:
        uri = resolve_tracking_uri(saved_args.mlflow_uri)
        if request["resume"] and request.get("parent_run_id"):
            tracker = Tracker.attach(uri, request["parent_run_id"])
        else:
            tracker = Tracker(uri, saved_args.experiment, request["name"],
                              tags={"sweep": "true", "data_hash": request["data_hash"],
                                    "space": Path(request["space"]).name})
            tracker.log_params({"space": request["space"], "num_samples": saved_args.num_samples,
                                "scheduler": saved_args.scheduler, "grace_period": saved_args.grace_period,
                                "reduction_factor": saved_args.reduction_factor, "epochs": epochs,
                                "min_prior_recall": saved_args.min_prior_recall, "max_concurrent": concurrent,
                                "workers_per_trial": scaling.num_workers, "base_config": saved_args.config})
            tracker.log_artifact(request["space"])
    parent_id = tracker.run_id if tracker is not None and tracker.active else None
    sweep_dir = storage.join(request["storage"], request["name"])  # a path, or a URI on object storage
    if not request["resume"]:
        storage.write_text(storage.join(sweep_dir, SETUP_FILE),
                           json.dumps({k: v for k, v in request.items() if k != "resume"}
                                      | {"parent_run_id": parent_id}, indent=2))

    gt = prescreen_boxes(request["train_spec"], saved_args.prescreen_images) if saved_args.min_prior_recall else None
    options = RunOptions(train_data=request["train_spec"], val_data=request["val_spec"], log_every=10**6,
                         sample_images=4, loader_workers=saved_args.loader_workers,
                         amp=saved_args.amp)
    setup = SweepSetup(base_config=request["base"], options=asdict(options), scaling=scaling,
                       storage_path=request["storage"], sweep_name=request["name"],
                       tracking_uri=tracker.uri if parent_id else None, experiment=saved_args.experiment,
                       parent_run_id=parent_id, min_prior_recall=saved_args.min_prior_recall, prescreen_gt=gt)
    trainable = tune.with_resources(tune.with_parameters(trial_driver, setup=setup), DRIVER_RESOURCES)
    if saved_args.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=saved_args.grace_period,
                                  reduction_factor=saved_args.reduction_factor)
    else:
        scheduler = FIFOScheduler()
    print(f"sweep {request['name']}: {len(space.grid_points()) * saved_args.num_samples} trial(s) of up to {epochs} "
          f"epoch(s), {concurrent} at a time, {saved_args.scheduler}; searching {', '.join(searched)}", flush=True)
    start = time.perf_counter()
    if request["resume"]:
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable, param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(metric=SCORE, mode="max", scheduler=scheduler, num_samples=saved_args.num_samples,
                                        max_concurrent_trials=concurrent,
                                        # explicit: a search algorithm passed in ignores the line above
                                        search_alg=BasicVariantGenerator(random_state=saved_args.seed,
                                                                         max_concurrent=concurrent)),
            run_config=tune.RunConfig(name=request["name"], storage_path=request["storage"], verbose=1,
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
        print(f"\nsweep {request['name']} interrupted; continue it with "
              f"python pipelines/tune.py --resume {request['name']}" + (f" --storage-path {request['storage']}"
                                                                          if args.storage_path else ""), flush=True)
        raise SystemExit(130)
    rows = trial_rows(results, searched, epochs)
    trial_epochs = sum(r["epochs"] for r in rows)
    best = max((r for r in rows if r["best_mAP"] > NO_SCORE), key=lambda r: r["best_mAP"], default=None)
    summary: dict[str, Any] = {
        "name": request["name"], "trials": len(rows), "trial_epochs": trial_epochs,
        "full_budget_epochs": len(rows) * epochs, "seconds": round(time.perf_counter() - start, 1),
        "by_status": {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})},
        "best_trial": best["trial_id"] if best else None, "best_mAP": best["best_mAP"] if best else None,
        "sweep_dir": sweep_dir, "parent_run_id": parent_id, "rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        from ssd.distributed.tune import write_results_csv
        from ssd.reporting import plot_sweep

        files = [write_results_csv(rows, Path(tmp) / "results.csv"), plot_sweep(rows, searched, Path(tmp) / "sweep.png")]
        if best is not None:
            best_cfg = trial_config(base, {k: best[k] for k in searched} | space.fixed)
            best_path = Path(tmp) / "best_config.yaml"
            best_path.write_text(f"# best trial {best['trial_id']} of sweep {request['name']}: validation mAP "
                                 f"{best['best_mAP']:.4f}\n" + best_cfg.to_yaml())
            summary["best_config"] = storage.join(sweep_dir, best_path.name)
            files.append(best_path)
        for path in files:  # next to Tune's own files, wherever the sweep lives
            storage.upload(path, storage.join(sweep_dir, path.name))
            if tracker is not None:
                tracker.log_artifact(path)
        if tracker is not None:
            tracker.log_metrics({"best_mAP": summary["best_mAP"] or NO_SCORE, "trial_epochs": trial_epochs,
                                 "trials_skipped_by_prior_recall": summary["by_status"].get("skipped", 0)})
            _close_children(tracker, rows)
            tracker.end("FINISHED")
    print_summary(summary, searched)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
    if best is None:  # nothing trained to a score: the sweep failed, whatever Tune says
        raise SystemExit(f"error: sweep {request['name']}: {no_result_reason(rows)}")
    return summary


def no_result_reason(rows: list[dict[str, Any]]) -> str:
    """Why no trial has a score: the first failed trial's error, or what happened to them all."""
    for row in rows:
        if row["status"] in ("error", "invalid"):
            return (f"all {len(rows)} trial(s) failed; the first, {row['trial_id']} ({row['status']}): "
                    f"{row.get('error') or 'see its log'}")
    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    if counts.get("skipped") == len(rows):
        return f"all {len(rows)} trial(s) were skipped by --min-prior-recall; lower it or widen the prior space"
    return f"no trial reached a validation score ({counts or 'no trials ran'})"


def _interrupted_marker(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _close_children(tracker: Tracker, rows: list[dict[str, Any]]) -> None:
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


def print_summary(summary: dict[str, Any], searched: list[str]) -> None:
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


if __name__ == "__main__":
    main(get_args_parser().parse_args())
