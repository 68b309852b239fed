"""Every use of Ray 2.60's private API in this project, in one place, each with why.

Ray has no public API for these; when one appears, this module is the one place to change. Each
function imports lazily, so importing this module costs nothing and sets nothing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any


def reload_settings(single_machine: bool) -> None:
    """Make a process that imported Ray already see the RAY_* variables set since.

    Ray reads RAY_AUTH_MODE and the token into its config when it is first imported, and
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER into a module constant. Ray itself re-initialises its config
    when it switches token auth on (``authentication_token_setup._enable_token_auth``); the same
    is done here. Without Ray imported there is nothing to reload.
    """
    if "ray._raylet" not in sys.modules:
        return
    from ray._private import ray_constants
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    if single_machine:
        ray_constants.ENABLE_RAY_CLUSTER = False


def worker_log_dispatcher() -> Any | None:
    """The dispatcher that prints the worker logs Ray forwards to this driver (``log_to_driver``):
    the only place to filter Ray's known noise by component and message. None if absent."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        return None
    return global_worker_stdstream_dispatcher


def train_failure_policy_types() -> tuple[type, Any]:
    """Ray Train V2's ``FailurePolicy`` base class and ``FailureDecision`` enum: the controller's
    retry decision has no public hook in 2.60 (see ``ssd.distributed.failures``)."""
    from ray.train.v2._internal.execution.failure_handling import FailurePolicy
    from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

    return FailurePolicy, FailureDecision


def train_report_logger() -> logging.Logger | None:
    """The logger Ray Train V2 logs every report with (all metrics, every rank, at INFO): it is
    named after its module file, outside the ``ray.train`` hierarchy ``LoggingConfig`` sets."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return None
    return logging.getLogger(train_context.__file__)


def placement_group(group_id: str) -> Any:
    """A ``PlacementGroup`` from its hex id (recorded by the run that created it): Ray 2.60 keeps
    a placement group whose creating actor was killed, and only its id survives the actor."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    return PlacementGroup(PlacementGroupID(bytes.fromhex(group_id)))


def walk_working_dir(root: Path, visit: Any, logger: logging.Logger) -> None:
    """Call ``visit(path)`` for every path a ``working_dir`` upload of ``root`` includes, by Ray's
    own rules (``.gitignore``, ``.rayignore``): the rules a pre-flight size check must follow."""
    from ray._private.runtime_env.packaging import _dir_travel

    _dir_travel(root, [], visit, include_gitignore=True, logger=logger)


def pack_working_dir(root: Path, target: Path, logger: logging.Logger) -> None:
    """The zip a ``working_dir`` upload of ``root`` sends, built by Ray's own packaging."""
    from ray._private.runtime_env.packaging import create_package

    create_package(str(root), target, include_parent_dir=False, excludes=[], include_gitignore=True, logger=logger)


def bind_serve_replica_grpc(host: str) -> None:
    """Make this process's Ray Serve replica bind its inter-deployment gRPC server to ``host``
    (the node's address) instead of every interface.

    Ray 2.60's replica opens that server with ``add_port_to_grpc_server(server, "[::]:0")``
    (``ray/serve/_private/replica.py``, ``Replica._on_initialized``), after the deployment's
    constructor has run, and it has no option for the address: on a single-machine cluster it is
    the one Serve port reachable from the network (the HTTP proxy listens where ``http_options``
    says). The name that method looks up is replaced, in this worker process only, by one that
    rewrites exactly the wildcard address; every other address passes unchanged. Called from the
    deployment's constructor, so it is in place before ``_on_initialized``. Idempotent.
    """
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_ssd_bound_to", None) == host:
        return
    original = getattr(original, "_ssd_original", original)
    literal = f"[{host}]" if ":" in host else host  # an IPv6 node address needs brackets

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{literal}:{address[len('[::]:'):]}"
        return original(server, address)

    add_port._ssd_original = original  # type: ignore[attr-defined]
    add_port._ssd_bound_to = host  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port
