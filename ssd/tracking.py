"""MLflow tracking for world rank 0: a thin wrapper whose failures never stop training.

Where runs go: ``--mlflow-uri`` if given, else ``$MLFLOW_TRACKING_URI``, else the MLflow server
``make up`` runs on this machine, else a SQLite store and an artifact folder at a fixed absolute
place (``~/.cache/ssd-ray/mlflow``, or ``$SSD_MLFLOW_HOME``): the same place however and from
wherever a job is submitted, and the same store ``infra/local/start.sh`` serves (MLflow 3.17's own default is a ``mlflow.db`` in the
current directory, which moves with a Ray job's working dir).

MLflow being unreachable must not lose a training run: every call is guarded; the first failure
is logged as a warning with the reason, and the tracker turns itself off for the rest of the run
(training, checkpoints and console output go on). HTTP retries are capped (``MLFLOW_HTTP_REQUEST_*``
unless the user set them), so an unreachable server costs seconds, not minutes of backoff.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ssd.local_state import running_mlflow

log = logging.getLogger(__name__)

DEFAULT_HOME_ENV = "SSD_MLFLOW_HOME"


def mlflow_home() -> Path:
    return Path(os.environ.get(DEFAULT_HOME_ENV, Path.home() / ".cache" / "ssd-ray" / "mlflow")).expanduser().resolve()


def resolve_tracking_uri(cli_uri: str | None = None, *, announce: bool = True) -> str:
    """``cli_uri`` > ``$MLFLOW_TRACKING_URI`` > the MLflow server ``make up`` runs (its state
    folder, ``ssd.local_state``) > ``sqlite:///<mlflow_home()>/mlflow.db``.

    The server comes before the SQLite file it serves: a script that wrote the file directly
    while the server runs would be read by nobody, and registry downloads (``models:/``) need the
    server's artifact proxy. With ``announce``, an implicit choice (neither of the first two) is
    named on stderr once per process, so a user sees which store was used.
    """
    if cli_uri:
        return cli_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    server = running_mlflow()
    if server is not None:
        uri, why = server.tracking_uri, f"the server `make up` started (state {server.state})"
    else:
        home = mlflow_home()
        home.mkdir(parents=True, exist_ok=True)
        uri, why = f"sqlite:///{home / 'mlflow.db'}", "a local SQLite store; `make up` serves it with a UI"
    if announce and uri not in _announced:
        _announced.add(uri)
        print(f"MLflow: {uri} ({why}; no --mlflow-uri or MLFLOW_TRACKING_URI given)", file=sys.stderr, flush=True)
    return uri


_announced: set[str] = set()


def experiment_id_for(client: Any, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created if missing. A local store (SQLite or a folder)
    keeps its artifacts under ``mlflow_home()/artifacts/NAME``, not in the working directory."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:") or "://" not in tracking_uri:
        location = (mlflow_home() / "artifacts" / name).as_uri()
    return client.create_experiment(name, artifact_location=location)


T = TypeVar("T")


def is_transient(err: BaseException) -> bool:
    """True for a failure that waiting can cure: no connection, a timeout, a 5xx answer (MLflow
    reports a refused connection as an ``INTERNAL_ERROR``, HTTP 500). False for refusals (4xx:
    unknown run, invalid name) and for errors that are not MLflow's (a broken checkpoint)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return err.get_http_status_code() >= 500
    return isinstance(err, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError))


def retry(
    fn: Callable[[], T],
    *,
    deadline: float,
    what: str,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
) -> T:
    """``fn()``, retried with exponential backoff (``first_delay`` doubling up to ``max_delay``)
    while it fails with a transient error (:func:`is_transient`) and ``time.monotonic()`` is
    before ``deadline``; then the last error is raised. Other errors are raised at once."""
    delay = first_delay
    while True:
        try:
            return fn()
        except Exception as err:
            left = deadline - time.monotonic()
            if left <= 0 or not is_transient(err):
                raise
            wait = min(delay, left)
            log.warning("MLflow: could not %s (%s: %s); retrying in %.0f s, for %.0f s more", what,
                        type(err).__name__, short_error(err), wait, left)
            time.sleep(wait)
            delay = min(2 * delay, max_delay)


def short_error(err: BaseException, keep: int = 120) -> str:
    """The error on one line, its middle cut when long: a wrapped connection error says what was
    asked at the start and why it failed ("Connection refused") at the end."""
    text = " ".join(str(err).split())
    return text if len(text) <= 2 * keep + 5 else f"{text[:keep]} ... {text[-keep:]}"


class Tracker:
    """One MLflow run, logged from world rank 0 only; a no-op elsewhere or once MLflow fails.

    Args:
        uri: the tracking URI (see ``resolve_tracking_uri``).
        experiment: experiment name (created when missing; for a local SQLite store its
            artifacts go under ``mlflow_home()/artifacts``).
        run_name: the run's name; ``tags`` are set on it.
        enabled: False (ranks other than 0) makes every method a no-op.

    ``Tracker.attach(uri, run_id)`` continues an existing run instead of creating one.
    """

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        *,
        tags: dict[str, str] | None = None,
        enabled: bool = True,
        parent_run_id: str | None = None,
    ) -> None:
        self._setup(uri, enabled)
        if enabled:
            self._guard("start the run", self._start, experiment, run_name, tags or {}, parent_run_id)

    @classmethod
    def attach(cls, uri: str, run_id: str, *, enabled: bool = True) -> Tracker:
        """Continue an existing run: a resumed training run, or a worker process logging into
        the run its driver created. The run is set back to RUNNING if it was not (e.g. ended by
        an earlier attempt); ``end()`` closes it again. Failures are guarded as everywhere else:
        a missing or deleted run, or an unreachable server, warns once and disables the tracker.
        """
        tracker = cls.__new__(cls)
        tracker._setup(uri, enabled)
        if enabled:
            tracker._guard("attach to the run", tracker._attach, run_id)
        return tracker

    def _setup(self, uri: str, enabled: bool) -> None:
        self.uri = uri
        self.enabled = enabled
        self.run_id: str | None = None
        self.failure: str | None = None
        if enabled:
            # Fail fast instead of MLflow's default 7 retries with exponential backoff (minutes).
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")

    def _attach(self, run_id: str) -> None:
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        run = self._client.get_run(run_id)
        if run.info.lifecycle_stage != "active":
            raise ValueError(f"run {run_id} is {run.info.lifecycle_stage}")
        if run.info.status != "RUNNING":
            # The previous end time stays (MLflow cannot clear it); ``end()`` overwrites it.
            self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        log.debug("MLflow run %s (%s) continued at %s", run.info.run_name, run_id, self.uri)

    def _start(self, experiment: str, run_name: str, tags: dict[str, str], parent_run_id: str | None) -> None:
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        experiment_id = experiment_id_for(self._client, experiment, self.uri)
        if parent_run_id:
            tags = {**tags, "mlflow.parentRunId": parent_run_id}
        run = self._client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        log.info("MLflow run %s (%s) at %s", run_name, self.run_id, self.uri)

    @property
    def active(self) -> bool:
        return self.enabled and self.failure is None and self.run_id is not None

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not self.enabled or self.failure is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self.failure = f"{what}: {type(err).__name__}: {err}"
            log.warning("MLflow at %s failed to %s; tracking is off for the rest of this run, "
                        "training and checkpoints go on (%s)", self.uri, what, err)
            return None

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        self._guard("log params", lambda: self._client.log_batch(self.run_id, params=items))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(str(k), float(v), now, step or 0) for k, v in metrics.items()]
        self._guard("log metrics", lambda: self._client.log_batch(self.run_id, metrics=items))

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self._guard("set tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def run_tags(self) -> dict[str, str]:
        """The run's tags as stored ({} when tracking is off or fails)."""
        return self._guard("read the run's tags", lambda: dict(self._client.get_run(self.run_id).data.tags)) or {}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._guard("log an artifact", lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def end(self, status: str = "FINISHED", *, retry_for: float | None = None) -> bool:
        """Close the run (``FINISHED``, ``FAILED`` or ``KILLED``): never leave it RUNNING.

        Args:
            retry_for: None: one guarded call like every other (a no-op once tracking is off).
                Seconds: the last word of a process, tried even after an earlier failure turned
                tracking off (the server may be back), retried with backoff while MLflow is
                unreachable, for at most that long (:func:`retry`).
        Returns:
            True if the run was ended.
        """
        if retry_for is None:
            self._guard("end the run", lambda: self._client.set_terminated(self.run_id, status))
            return self.active
        if not self.enabled or self.run_id is None:  # no run was ever created: nothing to end
            return False
        try:
            retry(lambda: self._client.set_terminated(self.run_id, status), deadline=time.monotonic() + retry_for,
                  what=f"end run {self.run_id} as {status}")
        except Exception as err:  # noqa: BLE001 - reported; the caller is on its way out
            log.warning("MLflow at %s: could not end run %s as %s within %.0f s (%s); it stays RUNNING",
                        self.uri, self.run_id, status, retry_for, err)
            return False
        return True
