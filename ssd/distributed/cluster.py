"""Which Ray cluster a script runs on, and connecting to it safely.

Ray's own default (``ray.init()`` with no address) attaches to "the latest cluster" recorded
machine-wide in ``/tmp/ray/ray_current_cluster``, which every ``ray start --head`` on the machine
overwrites: another checkout's cluster, a test's, or a dead one. The scripts here never do that.
They run on, in this order:

1. ``--address`` or ``$RAY_ADDRESS`` (set by ``ray job submit`` for a job's driver):
   ``local`` starts a private cluster (below); ``http(s)://HOST:PORT`` (the job-submission
   address ``make up`` prints) is resolved to the Ray head that ``infra/local/start.sh`` runs
   there; anything else (``HOST:PORT``, ``ray://``) is passed to ``ray.init`` as given.
2. The head ``make up`` started (``ssd.local_state``: its state folder says where it is and holds
   its token), when it is running.
3. Otherwise a private local cluster for this process: loopback only, token auth with a token of
   its own, its own temp dir, gone when the process exits.

Token auth: clients of a start.sh head get ``RAY_AUTH_MODE=token`` and its token file; a private
cluster gets a fresh token. ``~/.ray/auth_token`` is never written (Ray's ``ray.init()`` would
write one and switch every later ``ray start`` on the machine to token mode).

Nothing here imports Ray at module level: :func:`plan` must set the environment before Ray is
imported (``ray._private.ray_constants`` reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` at import).
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ssd.distributed.ray_internals import reload_settings
from ssd.local_state import LocalRay, running_ray, same_endpoint, state_dir

#: Ray's single-machine mode: node address 127.0.0.1, so every server of the cluster binds
#: loopback only (see infra/local/start.sh for what it changes)
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class ClusterAddressError(ValueError):
    """An address that names no cluster this script can reach."""


class ClusterTooSmall(RuntimeError):
    """The Ray cluster (or this machine) lacks the CPUs/GPUs the scaling config asks for."""


@dataclass(frozen=True)
class Scaling:
    """Workers and their resources (one DDP process per worker; one GPU each with ``use_gpu``)."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def to_ray(self):  # -> ray.train.ScalingConfig (Ray is imported only here)
        from ray.train import ScalingConfig

        return ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                             resources_per_worker={"CPU": self.cpus_per_worker, **({"GPU": 1} if self.use_gpu else {})})


def check_cluster_resources(scaling: Scaling, resources: dict[str, float] | None = None,
                            where: str = "the Ray cluster") -> None:
    """Raise ``ClusterTooSmall`` naming the shortfall when the cluster cannot hold the workers.

    Without this, Ray Train waits for resources that never come (on a fixed-size cluster).
    ``resources`` defaults to ``ray.cluster_resources()``; ``where`` names them in the message.
    """
    if scaling.num_workers < 1:
        raise ClusterTooSmall(f"--workers must be at least 1, got {scaling.num_workers}")
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need_cpus = scaling.num_workers * scaling.cpus_per_worker
    if need_cpus > cpus:
        raise ClusterTooSmall(
            f"{scaling.num_workers} workers x {scaling.cpus_per_worker:g} CPU = {need_cpus:g} CPUs, but {where} "
            f"has {cpus:g}; lower --workers or --cpus-per-worker")
    if scaling.use_gpu and scaling.num_workers > gpus:
        raise ClusterTooSmall(
            f"{scaling.num_workers} GPU workers need {scaling.num_workers} GPUs, but {where} has {gpus:g}; "
            "lower --workers or train on the CPU (--cpu)")


@dataclass(frozen=True)
class ClusterPlan:
    """Where to run: ``kind`` is ``private`` (start one), ``local-head`` (start.sh's) or ``address``.

    ``address`` is what ``ray.init`` gets; ``env`` is set in this process before Ray starts.
    """

    kind: str
    address: str | None
    description: str
    env: dict[str, str] = field(default_factory=dict)

    @property
    def starts_cluster(self) -> bool:
        return self.kind == "private"


def _head_plan(head: LocalRay, why: str) -> ClusterPlan:
    return ClusterPlan("local-head", head.gcs_address, f"the Ray head started by `make up` ({why}; state "
                       f"{head.state}, jobs at {head.dashboard})",
                       {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.token_file,
                        "RAY_API_SERVER_ADDRESS": head.dashboard, **SINGLE_MACHINE_ENV})


def plan(address: str | None = None) -> ClusterPlan:
    """Decide the cluster (see the module docstring) without importing Ray or connecting."""
    explicit = address or os.environ.get("RAY_ADDRESS") or None
    head = running_ray()
    if explicit is None:
        if head is not None:
            return _head_plan(head, "no --address or RAY_ADDRESS given")
        return ClusterPlan("private", None, "a private local Ray cluster (loopback only, token auth, stopped "
                                            "at exit; none was given and `make up` is not running)")
    if explicit == "local":
        return ClusterPlan("private", None, "a private local Ray cluster (--address local)")
    if explicit.startswith(("http://", "https://")):
        if head is not None and same_endpoint(explicit, head.dashboard):
            return _head_plan(head, f"{explicit}")
        where = f"`make up` runs one at {head.dashboard}" if head else f"`make up` is not running (state {state_dir()})"
        raise ClusterAddressError(
            f"{explicit} is a job-submission (dashboard) address, and it is not the head that `make up` "
            f"started ({where}); submit the script to it with `ray job submit --address {explicit} "
            f"--working-dir . -- python ...`, or give --address HOST:PORT of the cluster's GCS")
    if head is not None and same_endpoint(explicit, head.gcs_address):
        return _head_plan(head, explicit)
    return ClusterPlan("address", explicit, f"the Ray cluster at {explicit}")


def apply_environment(target: ClusterPlan) -> None:
    """Set the plan's variables in this process (Ray's child processes inherit them)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.update(target.env)
    if target.kind != "address":
        os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over RAY_AUTH_TOKEN_PATH
    # Ray may have been imported before the plan (a caller's import order): it reads them again
    reload_settings(single_machine=target.env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _private_environment() -> tuple[dict[str, str], str]:
    """A fresh token file (mode 600, removed at exit) and a temp dir (Ray's logs stay there, as
    under Ray's default /tmp/ray) for a private cluster."""
    root = Path(tempfile.gettempdir()) / f"ssd-ray-{os.getuid()}"
    root.mkdir(mode=0o700, exist_ok=True)
    os.chmod(root, 0o700)
    private = Path(tempfile.mkdtemp(prefix="p", dir=root))  # short: Ray's socket paths are limited
    token = private / "auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    atexit.register(token.unlink, missing_ok=True)
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), **SINGLE_MACHINE_ENV}
    return env, str(private)


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = False) -> ClusterPlan:
    """Connect this process to the cluster :func:`plan` picks (start a private one if so).

    Raises ``ClusterAddressError`` for an address that names no reachable cluster, and
    ``ConnectionError`` with the address when the cluster does not answer.
    """
    import ray

    target = plan(address)
    if ray.is_initialized():
        return target
    kwargs: dict = {"logging_level": "WARNING", "log_to_driver": True}
    # The first worker log line printed on this driver creates Ray's tqdm_ray bar manager,
    # which replaces builtins.print for the rest of the process unless this is 0; our jobs print
    # their own progress, and a process that goes on after a job (a notebook, the test suite)
    # would keep a foreign print (it even ends up in pickles of ``print``).
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if target.starts_cluster:
        env, temp_dir = _private_environment()
        # The dashboard stays: Ray Train's placement-group cleaner queries it (State API). It
        # finds it through RAY_API_SERVER_ADDRESS, which its actor inherits; without it Ray
        # looks for "the" cluster on the machine and fails when there are several.
        dashboard_port = _free_port()
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        target = ClusterPlan(target.kind, None, target.description, env)
        kwargs |= {"address": "local", "_temp_dir": temp_dir, "_node_ip_address": "127.0.0.1", "num_cpus": num_cpus,
                   "dashboard_port": dashboard_port}
    else:
        kwargs["address"] = target.address
    apply_environment(target)
    if not quiet:
        print(f"Ray: {target.description}", flush=True)
    try:
        ray.init(**kwargs)
    except ConnectionError as err:
        raise ConnectionError(f"cannot reach the Ray cluster at {target.address}: {err}") from None
    from ssd.distributed.console import install_driver_filter

    install_driver_filter()
    return target


def machine_resources() -> dict[str, float]:
    """What a private cluster on this machine would have: its CPUs and CUDA GPUs."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: no GPUs
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}
