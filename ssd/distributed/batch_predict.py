"""Batch inference on Ray Data: :func:`run_batch_predict_job` runs a model over a bucket of images.

The pipeline (thin glue; the work is ``ssd.batch_inference``, the job ``ssd.jobs.batch_predict``)::

    file paths (or one row per shard -> flat_map: the shard's samples)
      -> map_batches(prepare_batch)        CPU tasks: read, decode, resize to (3, S, S) uint8
      -> map_batches(_DetectorActor)       a pool of ``actors`` actors (one GPU each with --gpu):
                                           forward, decode, NMS on the actor's device, boxes in
                                           original pixels
      -> the driver, streaming: progress lines, then the Parquet tables and the summary

Resources. An actor reserves ``cpus_per_actor`` CPUs (its torch threads) and, with ``gpu``, one
GPU; a decode task reserves :data:`DECODE_CPUS`. On a cluster where the actors would take every
CPU (2 CPU actors on 2 cores), the actors' reservation shrinks so that :data:`DECODE_CPUS` stay
free for decoding: otherwise no decode task could ever be scheduled and the pipeline would wait
forever. Their torch threads stay ``cpus_per_actor``.

The cluster is the one ``ssd.distributed.cluster`` picks (``--address``, the ``make up`` head, or
a private loopback cluster with token auth); the model is loaded by the driver (a bad reference
fails before Ray starts) and reaches the actors through the object store. ``s3://`` images are
read by the tasks with the AWS settings of the cluster's processes (``ssd.storage``: a private
cluster inherits this process's; a running cluster has its own, as for Ray Train's storage).
"""

from __future__ import annotations

import math
import time
from typing import Any

from ssd.jobs.batch_predict import (
    BatchPredictRequest,
    Progress,
    ResolvedBatch,
    finish_batch,
    resolve_batch,
)
from ssd.jobs.common import JobError

#: CPUs a decode task reserves (and what stays free for them when actors would take every CPU)
DECODE_CPUS = 0.5


class _DetectorActor:
    """One actor of the pool: ``ssd.batch_inference.BatchDetector`` built from the model's parts
    in the object store (``parts``: a one-element list holding their ObjectRef, so that Ray
    passes the reference itself, not the value, through the constructor)."""

    def __init__(self, parts: list[Any], device: str, threads: int) -> None:
        import ray

        from ssd.batch_inference import BatchDetector

        cfg, classes, state = ray.get(parts[0])
        self.detect = BatchDetector(cfg, classes, state, device=device, threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return self.detect(batch)


def actor_cpus(cluster_cpus: float, actors: int, cpus_per_actor: float, gpu: bool) -> float:
    """The CPUs one actor reserves: ``cpus_per_actor``, shrunk so that :data:`DECODE_CPUS` stay
    free for the decode tasks on a CPU cluster. JobError when the cluster cannot hold them."""
    wanted = actors * cpus_per_actor + DECODE_CPUS
    if wanted <= cluster_cpus:
        return cpus_per_actor
    share = (cluster_cpus - DECODE_CPUS) / actors
    if gpu or share < 0.1:
        raise JobError(f"{actors} actors x {cpus_per_actor:g} CPUs + {DECODE_CPUS:g} CPU for decoding = "
                       f"{wanted:g} CPUs, but the Ray cluster has {cluster_cpus:g}; lower --actors or "
                       "--cpus-per-actor")
    return share


def build_dataset(batch: ResolvedBatch, resources: dict[str, float]) -> Any:
    """The Ray Data pipeline of ``batch`` (lazy: it runs as the driver iterates it)."""
    import ray

    from ssd.batch_inference import prepare_batch, shard_rows

    request, source = batch.request, batch.source
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job prints its own progress lines
    context.execution_options.preserve_order = False  # the driver sorts by index
    if source.kind == "files":
        rows = [{"index": i, "path": path, "image_id": -1} for i, path in enumerate(source.files)]
        # several blocks per actor, so that decoding overlaps the forward passes
        blocks = max(1, min(len(rows), math.ceil(len(rows) / request.batch_size)))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    else:
        offsets = [sum(source.shard_counts[:i]) for i in range(len(source.shard_urls))]
        shards = [{"url": url, "offset": offset} for url, offset in zip(source.shard_urls, offsets, strict=True)]
        dataset = ray.data.from_items(shards, override_num_blocks=len(shards)).flat_map(
            shard_rows, num_cpus=DECODE_CPUS)
    dataset = dataset.map_batches(prepare_batch, batch_size=request.batch_size, fn_kwargs={"cfg": batch.config},
                                  num_cpus=DECODE_CPUS, batch_format="numpy")
    parts = [ray.put((batch.config, batch.classes, batch.state))]
    cpus = actor_cpus(resources.get("CPU", 0.0), request.actors, request.cpus_per_actor, request.gpu)
    return dataset.map_batches(
        _DetectorActor, batch_size=request.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=request.actors),
        num_cpus=cpus, num_gpus=1 if request.gpu else 0,
        fn_constructor_kwargs={"parts": parts, "device": "cuda" if request.gpu else "cpu",
                               "threads": max(1, int(request.cpus_per_actor))})


def run_batch_predict_job(request: BatchPredictRequest) -> dict[str, Any]:
    """Resolve ``request`` (before Ray starts), run the pipeline, write and return the summary
    (``ssd.jobs.batch_predict.finish_batch``). Raises JobError / BadRequest in one line."""
    from ssd.batch_inference import results_from_batch
    from ssd.distributed.cluster import ClusterAddressError, connect

    batch = resolve_batch(request)
    print(f"{request.model}" + (f" ({batch.model_name}/{batch.model_version})" if batch.model_name else "")
          + f": {len(batch.classes)} classes, input {batch.config.priors.image_size}, {batch.source.total} images "
          f"({batch.source.kind}) on {request.actors} {'GPU' if request.gpu else 'CPU'} actor(s), batch "
          f"{request.batch_size}", flush=True)
    started = time.perf_counter()
    try:
        connect(request.address)
    except (ClusterAddressError, ConnectionError) as err:
        raise JobError(str(err)) from None
    import ray

    ray_startup_s = time.perf_counter() - started
    resources = ray.cluster_resources()
    if request.gpu and resources.get("GPU", 0.0) < request.actors:
        raise JobError(f"{request.actors} GPU actors need {request.actors} GPUs, but the Ray cluster has "
                       f"{resources.get('GPU', 0.0):g}; lower --actors or run on the CPU (no --gpu)")
    dataset = build_dataset(batch, resources)
    progress = Progress(batch.source.total)
    results = []
    started = time.perf_counter()
    for out in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        new = list(results_from_batch(out))
        results += new
        progress.update(len(new))
    pipeline_s = time.perf_counter() - started
    progress.update(0, final=True)
    return finish_batch(batch, results, pipeline_s, ray_startup_s, "cuda" if request.gpu else "cpu")
