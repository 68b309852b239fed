"""Worker failures that a restart cannot fix end a Ray Train run at once.

Ray Train 2.60 restarts the worker group on any worker error, up to
``FailureConfig(max_failures)`` times, from the last checkpoint. That is right for a dead node or
a killed process, and wrong for a bad config or unreadable data, which fail again on every
restart (seen: 3 attempts, 84 s and 6 tracebacks for a typo in a config value). Errors of type
``ssd.training.PermanentError`` (raised for config and data errors found before the first step,
and for any error the code marks so) make :class:`StopOnPermanentErrors` end the run on the
first occurrence; every other failure keeps Ray's default policy.

Ray 2.60 has no public hook for this: the policy is passed where ``TorchTrainer.fit`` passes
its default one (``_initialize_and_run_controller``), so it travels to the controller actor,
which imports this module (the package is importable there, as the training function is).
"""

from __future__ import annotations

import re
import traceback
from typing import Any

from ray.exceptions import RayActorError
from ray.train import TrainingFailedError, WorkerGroupError
from ray.train.torch import TorchTrainer

from ssd.distributed.console import quiet_train_console
from ssd.distributed.ray_internals import train_failure_policy_types
from ssd.training import PermanentError

FailurePolicy, FailureDecision = train_failure_policy_types()


def permanent_cause(error: BaseException | None) -> BaseException | None:
    """The ``PermanentError`` in ``error``'s cause chain (a worker's exception as Ray wraps it)."""
    return next((e for e in _chain(error) if isinstance(e, PermanentError)), None)


def worker_errors(error: BaseException) -> list[BaseException]:
    """The per-rank exceptions inside a Ray Train failure (the error itself otherwise)."""
    failures = getattr(error, "worker_failures", None)
    return list(failures.values()) if failures else [error]


def summarize(error: BaseException) -> str:
    """One line for a training failure: the root cause's type and message, rank named.

    Of several failed ranks the one that explains the others is named: a permanent error first,
    then a worker process that died (the others then fail in their collectives), then the lowest.
    """
    failures = next((getattr(e, "worker_failures", None) for e in _chain(error)
                     if getattr(e, "worker_failures", None)), None) or {}
    if failures:
        def rank_order(item: tuple[int, BaseException]) -> tuple[int, int]:
            rank, failure = item
            return (0 if permanent_cause(failure) else 1 if _died(failure) else 2), rank

        rank, failure = min(failures.items(), key=rank_order)
        return f"rank {rank}: {_describe(failure)}"
    return _describe(error)


def _died(error: BaseException) -> bool:
    """A worker whose process died (Ray Train reports it as a failed health check)."""
    return isinstance(error, RayActorError) or isinstance(getattr(error, "health_check_failure", None), RayActorError)


def _describe(error: BaseException) -> str:
    if _died(error) and permanent_cause(error) is None:
        detail = re.search(r"Worker exit detail: ([^.]*)", str(error))
        return "the worker process died" + (f" ({detail.group(1).strip()})" if detail else "")
    root = permanent_cause(error) or _root(error)
    return f"{type(root).__name__}: {_first_line(root)}"


def _chain(error: BaseException | None) -> list[BaseException]:
    """``error`` and its causes (Ray's wrappers keep the original as ``cause``)."""
    chain: list[BaseException] = []
    while error is not None and all(error is not e for e in chain):
        chain.append(error)
        error = getattr(error, "cause", None) or error.__cause__
    return chain


def _root(error: BaseException) -> BaseException:
    return _chain(error)[-1]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    if not text:
        return "".join(traceback.format_exception_only(type(error), error)).strip()
    # Ray's wrappers put the remote traceback before the message: keep the last line
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if len(lines) > 1 and "Traceback" in text else lines[0].strip()


class StopOnPermanentErrors(FailurePolicy):
    """Ray's default failure policy, except that a ``PermanentError`` on any worker ends the run."""

    def __init__(self, default: FailurePolicy) -> None:
        super().__init__(default.failure_config)
        self._default = default

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        quiet_train_console()  # this runs in the controller: its console gets the one line below
        cause = summarize(training_failed_error)
        if isinstance(training_failed_error, WorkerGroupError) and any(
                permanent_cause(e) is not None for e in worker_errors(training_failed_error)):
            print(f"worker error that a restart cannot fix, not retried: {cause}", flush=True)
            return FailureDecision.RAISE
        decision = self._default.make_decision(training_failed_error)
        if decision == FailureDecision.RETRY:
            # the one line a recovered failure prints (Ray Train's own report is in its log files)
            print(f"worker failure, restarting the workers from the last checkpoint: {cause}", flush=True)
        return decision


class SSDTorchTrainer(TorchTrainer):
    """A ``TorchTrainer`` whose failure policy is :class:`StopOnPermanentErrors`."""

    def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
        if "failure_policy" in kwargs:
            kwargs["failure_policy"] = StopOnPermanentErrors(kwargs["failure_policy"])
        return super()._initialize_and_run_controller(**kwargs)
