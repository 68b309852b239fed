"""What a run prints: the project's own lines plus real warnings; Ray's known noise goes to the
log files only.

Every filter here is narrow (one logger, or one message of one Ray component) and every
dropped line is still in Ray's log files (the session folder's ``logs/``). Real errors pass:
tests/test_console.py checks that a worker's own error still reaches the console.

- Driver side (:func:`install_driver_filter`): the worker log lines Ray forwards to the driver
  (``log_to_driver``) go through :data:`DROPPED_WORKER_LINES`.
- Worker and controller side (:func:`quiet_train_console`): Ray Train logs the full traceback of
  a failing training function on every rank, and the controller another one when it tears down
  the group after a crash: tens of lines per failure. The run prints one line with the cause
  instead (``ssd.distributed.failures``); the tracebacks stay in Ray Train's log files.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

from ssd.distributed.ray_internals import worker_log_dispatcher

#: (component, pattern): a forwarded line of a process whose actor or task name starts with
#: ``component`` ("" for any) and that matches ``pattern`` is not printed
DROPPED_WORKER_LINES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # Ray 2.60's Train controller creates its PreemptionWatcher actor with restartable
    # constructor arguments, and core_worker logs that at E level on every run.
    ("TrainController", re.compile(r"core_worker\.cc:\d+: Actor with class name: 'PreemptionWatcher'")),
    # The placement-group cleaner polls the controller through the State API and says so when
    # the controller is gone at the end of a run (or before the dashboard is up).
    ("PlacementGroupCleaner", re.compile(r"Failed to query Ray Train Controller actor state")),
)

#: Ray Train log records (messages starting so) replaced by one line with the cause
#: (``ssd.distributed.failures``): a failing training function's traceback, logged by every
#: rank, and the controller's traceback for a worker group it could not shut down cleanly after a
#: crash ("This is expected if one of the workers has crashed", Ray says)
QUIET_TRAIN_RECORDS = ("Error in training function", "Graceful shutdown of backend failed")


def keep_line(component: str, line: str) -> bool:
    """False for a forwarded worker line in :data:`DROPPED_WORKER_LINES`."""
    return not any(component.startswith(name) and pattern.search(line) for name, pattern in DROPPED_WORKER_LINES)


def _filtered(handler: Any, data: dict[str, Any]) -> None:
    component = data.get("actor_name") or data.get("task_name") or ""
    lines = [line for line in data.get("lines", []) if keep_line(component, line)]
    if lines:
        handler({**data, "lines": lines})


def install_driver_filter() -> bool:
    """Wrap the handler that prints forwarded worker logs in this driver with :func:`keep_line`.

    Call after ``ray.init``. False when Ray's dispatcher has another shape (nothing filtered).
    """
    dispatcher = worker_log_dispatcher()
    if dispatcher is None:
        return False
    with dispatcher._lock:
        handlers = dispatcher.handlers
        if not handlers or any(isinstance(h, functools.partial) and h.func is _filtered for _, h in handlers):
            return bool(handlers)
        dispatcher.handlers = [(name, functools.partial(_filtered, handler) if name == "ray_print_logs" else handler)
                               for name, handler in handlers]
    return True


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(QUIET_TRAIN_RECORDS)


def quiet_train_console() -> None:
    """In a Ray Train worker or controller process: keep :data:`QUIET_TRAIN_RECORDS` off the
    console (Ray Train's file handlers still get them). Call after Ray Train configured logging;
    calling again does nothing."""
    for handler in logging.getLogger("ray.train").handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        if console and not any(isinstance(f, _DropRecords) for f in handler.filters):
            handler.addFilter(_DropRecords())
