"""A served endpoint as requested (:class:`ServeRequest`, ``pipelines/serve.py``'s command line)
and as resolved before Ray starts (:class:`ResolvedServe`): the model reference checked against
the registry, the endpoint's settings, where it listens. ``ssd.distributed.serve_job`` runs it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from ssd.endpoint import (
    DEFAULT_MAX_BODY_MB,
    DEFAULT_MAX_PIXELS,
    DEFAULT_RELOAD_SECONDS,
    MIB,
    EndpointSettings,
)
from ssd.jobs.common import BadRequest


@dataclass(frozen=True)
class ServeRequest:
    """One endpoint, as asked for: the fields are ``pipelines/serve.py``'s options."""

    model: str
    address: str | None = None
    replicas: int = 1
    cpus: float = 1.0
    gpu: float = 0.0
    host: str = "127.0.0.1"
    port: int = 8000
    mlflow_uri: str | None = None
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    reload_seconds: float = DEFAULT_RELOAD_SECONDS
    max_ongoing_requests: int = 8
    app_name: str = "ssd"


@dataclass(frozen=True)
class ResolvedServe:
    """A checked request: ``settings`` go to every replica; ``version`` is the registered version
    the reference names now (None for a checkpoint folder)."""

    request: ServeRequest
    settings: EndpointSettings
    version: str | None

    @property
    def url(self) -> str:
        host = self.request.host
        shown = "127.0.0.1" if host == "0.0.0.0" else "[::1]" if host == "::" else (
            f"[{host}]" if ":" in host else host)
        return f"http://{shown}:{self.request.port}/"

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.request.host)


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_numbers(request: ServeRequest) -> None:
    checks = [
        (request.replicas >= 1, f"--replicas must be >= 1, got {request.replicas}"),
        (request.cpus > 0, f"--cpus must be > 0, got {request.cpus}"),
        (request.gpu >= 0, f"--gpu must be >= 0 (GPUs per replica), got {request.gpu}"),
        (1 <= request.port <= 65535, f"--port must be 1..65535, got {request.port}"),
        (request.max_body_mb > 0, f"--max-body-mb must be > 0, got {request.max_body_mb}"),
        (request.max_pixels > 0, f"--max-pixels must be > 0, got {request.max_pixels}"),
        (request.reload_seconds > 0, f"--reload-seconds must be > 0, got {request.reload_seconds}"),
        (request.max_ongoing_requests >= 1,
         f"--max-ongoing-requests must be >= 1, got {request.max_ongoing_requests}"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(message)
    if request.host not in ("localhost", "0.0.0.0", "::"):
        try:
            ipaddress.ip_address(request.host)
        except ValueError:
            raise BadRequest(f"--host {request.host!r} is not an IP address (or localhost)") from None


def resolve_serve(request: ServeRequest) -> ResolvedServe:
    """Check the request before Ray starts; ``BadRequest`` in one line otherwise.

    A registry reference is looked up (not downloaded: each replica downloads its model) so that
    an unknown model, version or alias, or an unreachable server, fails in seconds; a folder must
    be a checkpoint (``meta.json``).
    """
    _check_numbers(request)
    from ssd.registry import ModelReferenceError, is_model_uri, parse_registered, registry_uri_for

    version = None
    tracking_uri = registry_uri_for(request.model, request.mlflow_uri)
    if tracking_uri is not None:
        if parse_registered(request.model) is not None:
            from ssd.registry import registered_version

            try:
                version = registered_version(request.model, tracking_uri)
            except ModelReferenceError as err:
                raise BadRequest(f"--model {err}") from None
    elif not (Path(request.model).expanduser() / "meta.json").is_file():
        raise BadRequest(f"--model {request.model}: not a checkpoint folder (no meta.json) and not an MLflow "
                         "model URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model)")
    model = request.model if is_model_uri(request.model) else str(Path(request.model).expanduser().resolve())
    settings = EndpointSettings(model=model, tracking_uri=tracking_uri,
                                max_body_bytes=int(request.max_body_mb * MIB), max_pixels=request.max_pixels,
                                reload_seconds=request.reload_seconds,
                                device="cuda" if request.gpu > 0 else "cpu")
    return ResolvedServe(request, settings, version)
