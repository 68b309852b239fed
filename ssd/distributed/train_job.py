"""A training job on Ray: :func:`run_train_job` takes a :class:`~ssd.jobs.train.TrainRequest` from
the cluster check to the registered model.

The order keeps bad requests cheap: the cluster is planned (``ssd.distributed.cluster``) and
``workers`` checked against this machine before a private cluster would start, the request
resolved (``ssd.jobs.train.resolve_train``: config, data, ``--init-from``), and only then are
Ray, Ray Train and the training code imported and the cluster connected. Then: the scaling
checked against the cluster, the MLflow run started (``ssd.publish.start_tracking``), a
``TorchTrainer`` built (``ssd.distributed.trainer.build_torch_trainer``) and fitted, and the run
finished with its best checkpoint (``ssd.publish.finish_run``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ssd.distributed.cluster import (
    ClusterAddressError,
    ClusterPlan,
    ClusterTooSmall,
    Scaling,
    check_cluster_resources,
    machine_resources,
)
from ssd.distributed.cluster import plan as plan_cluster
from ssd.jobs.common import JobError, loader_workers_for
from ssd.jobs.train import TrainRequest, print_summary, resolve_train


def connect_cluster(address: str | None) -> ClusterPlan:
    """Connect to the cluster ``ssd.distributed.cluster`` picks; JobError in one line on failure."""
    from ssd.distributed.cluster import connect

    try:
        return connect(address)
    except (ClusterAddressError, ConnectionError) as err:
        raise JobError(str(err)) from None


def check_scaling(request: TrainRequest, resources: dict[str, float], where: str) -> bool:
    """The GPU choice for ``resources`` (``use_gpu``, or GPUs if there is one per worker), or
    JobError naming the shortfall."""
    use_gpu = request.use_gpu if request.use_gpu is not None else resources.get("GPU", 0) >= request.workers
    try:
        check_cluster_resources(Scaling(request.workers, use_gpu, request.cpus_per_worker), resources, where=where)
    except ClusterTooSmall as err:
        raise JobError(str(err)) from None
    return use_gpu


def run_train_job(request: TrainRequest) -> dict[str, Any]:
    """Train as ``request`` says, on Ray, tracked in MLflow; print and return the summary.

    The summary (``ssd.publish.finish_run``'s, plus ``run_name``, ``run_dir``, ``seconds`` and
    ``last_checkpoint``) holds ``error`` when the job failed after training (e.g. the model could
    not be registered): the caller exits non-zero then.

    Raises:
        BadRequest: the request cannot run (found before any worker starts).
        JobError: no cluster to run on, or too small; training failed.
    """
    try:
        target = plan_cluster(request.address)
    except ClusterAddressError as err:
        raise JobError(str(err)) from None
    if target.starts_cluster:  # checked in seconds, not after the minute a cluster start costs
        check_scaling(request, machine_resources(), "this machine")
    resolved = resolve_train(request)

    # Ray, Ray Train and the training code load only now: a bad request fails in a few seconds
    from ssd.distributed.trainer import build_torch_trainer, checkpoint_location
    from ssd.publish import finish_run, start_tracking
    from ssd.training import SCORE, RunOptions

    connect_cluster(request.address)
    import ray

    use_gpu = check_scaling(request, ray.cluster_resources(), "the Ray cluster")
    scaling = Scaling(num_workers=request.workers, use_gpu=use_gpu, cpus_per_worker=request.cpus_per_worker)

    tracker = start_tracking(request, resolved, scaling)
    run_id = tracker.run_id if tracker is not None and tracker.active else None
    uri = tracker.uri if tracker is not None else None
    options = RunOptions(train_data=resolved.train_spec, val_data=resolved.val_spec,
                         loader_workers=loader_workers_for(request.loader_workers, use_gpu, request.cpus_per_worker),
                         log_every=request.log_every, amp=request.amp,
                         tracking_uri=uri, mlflow_run_id=run_id, inject_failure=request.inject_failure)
    print(f"run {resolved.name}: {scaling.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s); checkpoints "
          f"in {resolved.run_dir}" + (f"; MLflow run {run_id} at {uri}" if run_id else "; MLflow off"), flush=True)

    trainer = build_torch_trainer(resolved.cfg, options, scaling, name=resolved.name, storage_path=resolved.storage,
                                  max_failures=request.max_failures, keep_checkpoints=request.keep_checkpoints,
                                  resume_from=resolved.resume_from, init_state=resolved.init_state,
                                  backbone=resolved.backbone)
    start = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as err:  # noqa: BLE001 - whatever failed, the MLflow run must not stay RUNNING
        if tracker is not None:  # ended even if MLflow was away during training, once it answers
            tracker.end("FAILED", retry_for=min(request.register_timeout, 30))
        from ssd.distributed.failures import summarize

        raise JobError(f"training failed: {summarize(err)}") from None
    best = result.get_best_checkpoint(metric=SCORE, mode="max") or result.checkpoint
    with best.as_directory() as folder:
        summary = finish_run(request, resolved, tracker, Path(folder), checkpoint_location(best))
    summary.update(run_name=resolved.name, run_dir=resolved.run_dir, seconds=round(time.perf_counter() - start, 1),
                   last_checkpoint=checkpoint_location(result.checkpoint) if result.checkpoint else None)
    print_summary(summary)
    return summary
