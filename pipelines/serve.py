"""Serve a trained or registered SSD over HTTP with Ray Serve: POST an image, get detections as JSON.

    python pipelines/serve.py --model models:/ssd-voc@champion
    python pipelines/serve.py --model models:/ssd-voc@champion --replicas 2 --gpu 1 --reload-seconds 60
    python pipelines/serve.py --model runs/exp/checkpoints/best --port 8080 --address local

    curl -s --data-binary @photo.jpg http://127.0.0.1:8000/     # detections
    curl -s http://127.0.0.1:8000/health                        # the model and version serving

``--model`` is a model reference (``ssd.registry``), as for ``pipelines/predict.py``. With
``models:/NAME@ALIAS`` every replica looks the alias up every ``--reload-seconds`` and loads the
version it names when it moves; answers name the version that produced them. A version that fails
to load is logged by the replica, which keeps serving the model it has.

``POST /`` with the image file's bytes as the body (JPEG, PNG, WebP, GIF, BMP, ...; any
Content-Type) answers ``{"model": {"reference", "name", "version"}, "width", "height",
"detections": [{"label", "class_name", "score", "box": [x1, y1, x2, y2]}, ...]}``: every detection
the model returns, by descending score, boxes in pixels of the posted image, equal to
``detections.json`` of ``pipelines/predict.py`` for the same file. A body that is not an image:
HTTP 400 ``{"error": "<reason>"}``; one over ``--max-body-mb`` (refused from its Content-Length
before it is read) or an image over ``--max-pixels``: 413. ``GET /health``: the model serving now.

Ray (``ssd.distributed.cluster``): ``--address`` or ``$RAY_ADDRESS``, else the head ``make up``
started, else a private local cluster (loopback only, token auth) that stops with this script.
Serve's HTTP proxy listens on ``--host`` (127.0.0.1: this machine only; 0.0.0.0 exposes the
endpoint, which has no authentication, to the network) on every node that runs a replica.
Ctrl-C (or SIGTERM) shuts Serve down.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd.distributed.serve_job import run_serve
from ssd.endpoint import DEFAULT_MAX_BODY_MB, DEFAULT_MAX_PIXELS, DEFAULT_RELOAD_SECONDS
from ssd.jobs.common import request_from_args, run_from_cli
from ssd.jobs.serve import ServeRequest


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS (followed), models:/NAME/VERSION, runs:/RUN_ID/model or a checkpoint "
                        "folder")
    p.add_argument("--mlflow-uri", help="tracking/registry URI (default $MLFLOW_TRACKING_URI, else the `make up` "
                                        "server, else the local SQLite store)")
    p.add_argument("--reload-seconds", type=float, default=DEFAULT_RELOAD_SECONDS,
                   help=f"how often replicas look the alias up (default {DEFAULT_RELOAD_SECONDS:g})")
    http = p.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1",
                      help="address the HTTP proxy listens on (default 127.0.0.1; 0.0.0.0 exposes the endpoint, "
                           "which has no authentication)")
    http.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    http.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                      help=f"largest request body accepted, MiB (default {DEFAULT_MAX_BODY_MB:g}); larger: HTTP 413")
    http.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                      help=f"largest image accepted, width x height (default {DEFAULT_MAX_PIXELS}); larger: HTTP 413")
    http.add_argument("--max-ongoing-requests", type=int, default=8,
                      help="requests a replica holds at once (default 8; one forward at a time, the rest wait)")
    scale = p.add_argument_group("Ray")
    scale.add_argument("--address", default=None, help="Ray address: HOST:PORT, or the http:// address of the "
                       "`make up` head (default: RAY_ADDRESS, else the `make up` head, else a private local "
                       "cluster; 'local' always starts a private one)")
    scale.add_argument("--replicas", type=int, default=1, help="model replicas (default 1)")
    scale.add_argument("--cpus", type=float, default=1.0, help="CPUs per replica (= its torch threads; default 1)")
    scale.add_argument("--gpu", type=float, default=0.0,
                       help="GPUs per replica (default 0: the CPU; 1: one GPU each, fractions share one)")
    scale.add_argument("--app-name", default="ssd", help="the Serve application's name (default ssd)")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_from_cli(run_serve, request_from_args(ServeRequest, args), None)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
