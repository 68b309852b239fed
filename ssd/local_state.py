"""The services that ``infra/local/start.sh`` (``make up``) started on this machine, if running.

start.sh keeps everything in one state folder (``$SSD_LOCAL_STATE``, default
``~/.cache/ssd-ray/local``): pid files, logs, the Ray token, and ``ray.json`` / ``mlflow.json``
describing the running head and tracking server. Scripts read them to attach to *that* Ray head
and MLflow server, never to "whatever Ray cluster started last on this machine".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

STATE_ENV = "SSD_LOCAL_STATE"


def state_dir() -> Path:
    """The folder start.sh uses: ``$SSD_LOCAL_STATE`` or ``~/.cache/ssd-ray/local``."""
    return Path(os.environ.get(STATE_ENV) or Path.home() / ".cache" / "ssd-ray" / "local").expanduser()


@dataclass(frozen=True)
class LocalRay:
    """A running Ray head started by start.sh."""

    gcs_address: str  # host:port, what ray.init() takes
    dashboard: str  # http://host:port, what `ray job submit` takes
    token_file: str  # RAY_AUTH_TOKEN_PATH for its clients
    temp_dir: str
    state: Path


@dataclass(frozen=True)
class LocalMlflow:
    """A running MLflow server started by start.sh."""

    tracking_uri: str
    state: Path


def same_endpoint(a: str, b: str) -> bool:
    """Two ``[scheme://]host:port`` addresses naming the same endpoint (loopback spellings equal):
    whether an address a user gave is that of a service start.sh runs."""
    def split(address: str) -> tuple[str, str]:
        host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
        return ("127.0.0.1" if host in ("localhost", "::1", "[::1]") else host), port

    return split(a) == split(b)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _read(name: str, state: Path | None) -> tuple[dict, Path] | None:
    """``state/<name>.json`` if the process it names is alive (a stale file is ignored)."""
    state = state or state_dir()
    try:
        info = json.loads((state / f"{name}.json").read_text())
        pid = int((state / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return (info, state) if _alive(pid) else None


def running_ray(state: Path | None = None) -> LocalRay | None:
    """The Ray head start.sh runs from ``state`` (default ``state_dir()``), or None."""
    found = _read("ray", state)
    if found is None:
        return None
    info, folder = found
    return LocalRay(info["gcs_address"], info["dashboard"].rstrip("/"), info["token_file"], info["temp_dir"], folder)


def running_mlflow(state: Path | None = None) -> LocalMlflow | None:
    """The MLflow server start.sh runs from ``state`` (default ``state_dir()``), or None."""
    found = _read("mlflow", state)
    return LocalMlflow(found[0]["tracking_uri"], found[1]) if found else None
