"""The served endpoint: :func:`run_serve` takes a :class:`~ssd.jobs.serve.ServeRequest` from the
checks to a running Ray Serve application, serves until Ctrl-C / SIGTERM, and shuts Serve down.

Cluster choice and connection are ``ssd.distributed.cluster``'s (a private loopback cluster with
token auth unless ``--address`` or ``make up`` says otherwise). Serve's HTTP proxy listens on
``--host`` (127.0.0.1 by default); its gRPC proxy stays off (no gRPC servicers are given), and each
replica's inter-deployment gRPC server is bound to the node's address
(``ray_internals.bind_serve_replica_grpc``), so a loopback cluster opens nothing on a wildcard
address.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from ssd.jobs.common import JobError
from ssd.jobs.serve import ResolvedServe, ServeRequest, resolve_serve


class ServeFailed(JobError):
    """Serve could not start the application (the message has Serve's reason)."""


def check_serve_resources(request: ServeRequest, resources: dict[str, float], where: str) -> None:
    """``JobError`` naming the shortfall when the replicas cannot all be placed (Serve would wait
    for them forever on a fixed-size cluster)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if request.replicas * request.cpus > cpus:
        raise JobError(f"{request.replicas} replicas x {request.cpus:g} CPU need {request.replicas * request.cpus:g} "
                       f"CPUs, but {where} has {cpus:g}; lower --replicas or --cpus")
    if request.gpu and request.replicas * request.gpu > gpus:
        raise JobError(f"{request.replicas} replicas x {request.gpu:g} GPU need {request.replicas * request.gpu:g} "
                       f"GPUs, but {where} has {gpus:g}; lower --replicas or --gpu")


def _connect(request: ServeRequest) -> None:
    from ssd.distributed.cluster import ClusterAddressError, connect, machine_resources
    from ssd.distributed.cluster import plan as plan_cluster

    try:
        if plan_cluster(request.address).starts_cluster:  # checked before a cluster starts for nothing
            check_serve_resources(request, machine_resources(), "this machine")
        connect(request.address)
    except (ClusterAddressError, ConnectionError) as err:
        raise JobError(str(err)) from None
    import ray

    check_serve_resources(request, ray.cluster_resources(), "the Ray cluster")


def start_endpoint(resolved: ResolvedServe) -> str:
    """Start Serve (HTTP on ``--host:--port``) and the application on the connected cluster;
    return once every replica has loaded the model. Returns the endpoint's URL.

    Raises:
        ServeFailed: a replica could not start (e.g. the model does not load).
    """
    from ray import serve

    from ssd.distributed.serve_app import build_app

    request = resolved.request
    serve.start(http_options={"host": request.host, "port": request.port})
    app = build_app(resolved.settings, replicas=request.replicas, cpus=request.cpus, gpus=request.gpu,
                    max_ongoing_requests=request.max_ongoing_requests)
    try:
        serve.run(app, name=request.app_name, route_prefix="/", blocking=False)
    except RuntimeError as err:  # Serve's "Deploying application ... failed"
        reason = deployment_failure(request.app_name) or " ".join(str(err).split())
        raise ServeFailed(f"the endpoint did not start: {reason}") from None
    return resolved.url


def deployment_failure(app_name: str) -> str | None:
    """The error a failed replica raised (the last line of the traceback Serve records in the
    deployment's status), or None when Serve has none."""
    from ray import serve

    try:
        status = serve.status().applications.get(app_name)
    except Exception:  # noqa: BLE001 - the status is only a better message
        return None
    if status is None:
        return None
    for deployment in status.deployments.values():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:
            return lines[-1][:1000]
    return None


def stop_endpoint() -> None:
    """Shut Serve down on the connected cluster (its applications, proxies and controller)."""
    from ray import serve

    serve.shutdown()


def run_serve(request: ServeRequest, *, ready: threading.Event | None = None,
              stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until SIGINT / SIGTERM (or ``stop`` is set); print and return a summary.

    Raises:
        BadRequest: the request cannot run (found before Ray starts).
        JobError: no cluster, too small a cluster, or the endpoint does not start.
    """
    resolved = resolve_serve(request)
    _connect(request)
    stop = stop or threading.Event()
    started = time.perf_counter()
    # the handlers go in before Serve starts: a signal during the start (or one that arrives
    # before a caller sees the endpoint answer) still ends in a clean shutdown
    with _stop_on_signals(stop):
        try:
            url = start_endpoint(resolved)
            what = request.model + (f" (version {resolved.version})" if resolved.version else "")
            print(f"serving {what} at {url} with {request.replicas} replica(s), "
                  f"{request.cpus:g} CPU" + (f" + {request.gpu:g} GPU" if request.gpu else "") + " each; "
                  + (f"following the alias every {request.reload_seconds:g} s; " if "@" in request.model else "")
                  + f"ready in {time.perf_counter() - started:.1f} s", flush=True)
            print(f"  curl -s --data-binary @image.jpg {url}      # detections as JSON", flush=True)
            print(f"  curl -s {url}health                           # the model serving now", flush=True)
            if not resolved.loopback_only:
                print(f"warning: --host {request.host} makes the endpoint reachable from the network, without "
                      "authentication", flush=True)
            if ready is not None:
                ready.set()
            while not stop.wait(0.5):
                pass
        finally:
            print("stopping Serve", flush=True)
            stop_endpoint()
    return {"url": url, "model": request.model, "version": resolved.version, "replicas": request.replicas}


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` while inside; a second one, while Serve is still starting
    or stopping, raises KeyboardInterrupt. Signal handlers only in the main thread (elsewhere
    ``stop`` alone ends the wait); the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
