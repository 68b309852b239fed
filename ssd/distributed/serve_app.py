"""The Ray Serve application of the endpoint: thin glue around ``ssd.endpoint.Endpoint``.

Routes (``route_prefix`` ``/``):

* ``POST /`` (or ``/detect``), the body an encoded image -> 200 and the detections as JSON;
  400 / 413 with ``{"error": "<one line>"}`` for a body that is not an image or too large.
* ``GET /`` (or ``/health``) -> 200 and ``Endpoint.info()`` (the model and version serving).

Body limits: Serve's HTTP proxy forwards the request's headers to the replica at once and its body
as the replica reads it (the proxy queues what the client has sent meanwhile); a replica answers
413 from ``Content-Length`` without reading the body, after which the proxy stops receiving and
the connection is closed. A body without a length is read only up to the limit.

Each replica loads the model in its constructor (a failure fails the deployment, with the reason,
before ``serve.run`` returns) and, for a ``models:/NAME@ALIAS`` reference, polls the alias in a
thread of its own every ``reload_seconds`` (``ssd.endpoint.ModelWatcher``). :func:`build_app` is
what ``pipelines/serve.py`` deploys; :func:`app_builder` is the ``import_path`` of a RayService's
``serveConfigV2`` (infra/k8s/rayservice-serve.yaml), which passes ``args``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from ssd.endpoint import Endpoint, EndpointSettings, ModelWatcher, settings_from_args

#: the deployment's name (Serve's logs and status name it)
DEPLOYMENT = "SSDEndpoint"
POST_PATHS = ("", "/detect")
GET_PATHS = ("", "/health")


class SSDEndpoint:
    """One replica: an ``Endpoint`` and the thread that follows the model's alias."""

    def __init__(self, settings: EndpointSettings) -> None:
        import ray

        from ssd.distributed.ray_internals import bind_serve_replica_grpc

        self._stop = threading.Event()  # first: __del__ runs even when loading the model fails
        # before Serve opens the replica's gRPC server (after this constructor): see there why
        bind_serve_replica_grpc(ray.util.get_node_ip_address())
        # Serve's logger: the replica's log file and stderr, with the replica's name
        self.endpoint = Endpoint(settings, ModelWatcher(settings, log=logging.getLogger("ray.serve")))
        if self.endpoint.watcher.follows_alias:
            threading.Thread(target=self._follow, name="ssd-alias-watcher", daemon=True).start()

    def _follow(self) -> None:
        watcher = self.endpoint.watcher
        # wakes a few times per period: poll() itself decides when one has passed
        while not self._stop.wait(min(1.0, watcher.settings.reload_seconds / 4)):
            watcher.poll()

    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path.rstrip("/")
        if request.method == "POST" and path in POST_PATHS:
            status, payload = await self.endpoint.handle_post(request.headers.get("content-length"),
                                                              request.stream())
            return JSONResponse(payload, status_code=status)
        if request.method in ("GET", "HEAD") and path in GET_PATHS:
            return JSONResponse(self.endpoint.info())
        if path in POST_PATHS or path in GET_PATHS:
            return JSONResponse({"error": f"method {request.method} not allowed: POST an image, GET for "
                                          "the model"}, status_code=405)
        return JSONResponse({"error": f"no route {request.url.path}: POST an image to /, GET /health"},
                            status_code=404)

    def __del__(self) -> None:
        self._stop.set()


def build_app(settings: EndpointSettings, *, replicas: int = 1, cpus: float = 1.0, gpus: float = 0.0,
              max_ongoing_requests: int = 8) -> Any:
    """The Serve application (``serve.Application``) of ``replicas`` replicas, each with ``cpus``
    CPUs (its torch threads) and ``gpus`` GPUs; ``max_ongoing_requests`` per replica (they queue
    for its one forward at a time)."""
    deployment = serve.deployment(
        SSDEndpoint, name=DEPLOYMENT, num_replicas=replicas, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    return deployment.bind(settings)


def app_builder(args: dict[str, Any]) -> Any:
    """``import_path: ssd.distributed.serve_app:app_builder`` in a Serve config: ``args`` are
    ``pipelines/serve.py``'s option names (``ssd.endpoint.settings_from_args``); replicas and
    their resources come from the config's ``deployments`` section."""
    return build_app(settings_from_args(dict(args)))
