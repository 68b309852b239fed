"""Submitting a script as a Ray job, with the checkout as its working dir.

What ``ray job submit --working-dir . -- python pipelines/...`` does, plus what it leaves to the
user: the job-submission address and token of the head ``make up`` started, a working dir that
fits the upload limit (checked with Ray's own packaging and ignore rules, ``.gitignore`` and
``.rayignore``, and reported in one line naming what to exclude), and a console with the job's
own output only.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ssd.distributed.ray_internals import pack_working_dir, walk_working_dir
from ssd.local_state import running_ray, same_endpoint

#: the dashboard's request-body limit, which a working-dir upload must fit
#: (ray._private.ray_constants.DASHBOARD_CLIENT_MAX_SIZE in Ray 2.60)
UPLOAD_LIMIT = 100 * 2**20

#: Ray's INFO lines about packing and uploading the working dir (one per job): logs, not output
QUIET_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk",
                 "ray.dashboard.modules.job.sdk")
#: Ray 2.60's note, on every submission, that .git and .venv are no longer uploaded (they never
#: were wanted here), and the job log's first line from Ray's job manager
_NOT_OUTPUT = re.compile(r"is now ignored by default when packaging the working directory|"
                         r"job_manager\.py:\d+ -- Runtime env is setting up\.")


class _DropNotOutput(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _NOT_OUTPUT.search(record.getMessage())


class SubmitError(RuntimeError):
    """A job that cannot be submitted; the message says why in one line."""


@dataclass(frozen=True)
class JobTarget:
    """Where a job goes: the job-submission address and the variables its client needs."""

    address: str
    env: dict[str, str]
    description: str


def job_target(address: str | None = None) -> JobTarget:
    """``address`` (or ``$RAY_ADDRESS`` when it is an http(s) address), else the head ``make up``
    started; a start.sh head's token is used unless the caller set RAY_AUTH_* itself."""
    head = running_ray()
    explicit = address or os.environ.get("RAY_ADDRESS") or None
    if explicit and not explicit.startswith(("http://", "https://")):
        raise SubmitError(f"{explicit} is not a job-submission address (http://HOST:8265, the dashboard)")
    if explicit is None:
        if head is None:
            raise SubmitError("no Ray head to submit to: start one with `make up`, or give --address "
                              "http://HOST:8265 (or set RAY_ADDRESS)")
        explicit = head.dashboard
    env: dict[str, str] = {}
    own = head is not None and same_endpoint(explicit, head.dashboard)
    if own and not any(k in os.environ for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.token_file}
    what = f"the Ray head started by `make up` ({explicit})" if own else explicit
    return JobTarget(explicit.rstrip("/"), env, what)


def upload_by_entry(root: Path) -> Counter[str]:
    """Bytes per top-level entry of ``root`` that a working-dir upload would include, by Ray's
    own rules (its packaging walk with ``.gitignore`` / ``.rayignore``)."""
    sizes: Counter[str] = Counter()

    def add(path: Path) -> None:
        if path.is_file():
            sizes[path.relative_to(root).parts[0]] += path.stat().st_size

    walk_working_dir(root, add, logging.getLogger("ssd.distributed.submission.quiet"))
    return sizes


def check_working_dir(root: Path, limit: int = UPLOAD_LIMIT) -> int:
    """The size of ``root``'s upload package (as Ray builds it); ``SubmitError`` naming the
    largest included entries when it exceeds ``limit``."""
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "working_dir.zip"
        pack_working_dir(root, package, logging.getLogger("ssd.distributed.submission.quiet"))
        size = package.stat().st_size
    if size > limit:
        largest = ", ".join(f"{name} ({n / 2**20:.0f} MiB)" for name, n in upload_by_entry(root).most_common(3))
        raise SubmitError(f"the working dir {root} packs to {size / 2**20:.0f} MiB, over Ray's {limit / 2**20:.0f} "
                          f"MiB upload limit; largest: {largest}; list data and outputs in .rayignore (or "
                          f".gitignore), or keep them outside the checkout")
    return size


def submit(command: list[str], *, working_dir: Path, address: str | None = None, wait: bool = True) -> int:
    """Submit ``command`` as a Ray job with ``working_dir``; stream its output until it ends.

    Returns the job's exit status as a process exit code (0 when it succeeded; 1 when it failed or
    was stopped; 0 at once with ``wait=False``).
    """
    target = job_target(address)
    os.environ.update(target.env)  # read by Ray's client when it builds its requests
    check_working_dir(working_dir)
    from ray.job_submission import JobStatus, JobSubmissionClient

    for name in QUIET_LOGGERS:  # after the import: Ray's modules set their loggers to INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(_DropNotOutput())

    try:
        client = JobSubmissionClient(target.address)
        job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env={"working_dir": str(working_dir)})
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"{target.description}: {str(err).strip().splitlines()[0]}") from None
    print(f"job {job_id} submitted to {target.description}", file=sys.stderr, flush=True)
    if not wait:
        return 0

    async def stream() -> None:
        async for chunk in client.tail_job_logs(job_id):
            kept = [line for line in chunk.splitlines(keepends=True) if not _NOT_OUTPUT.search(line)]
            print("".join(kept), end="", flush=True)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        client.stop_job(job_id)
        print(f"\njob {job_id} stopped", file=sys.stderr, flush=True)
        return 130
    info = client.get_job_info(job_id)
    print(f"job {job_id} {info.status.value.lower()}", file=sys.stderr, flush=True)
    if info.status == JobStatus.SUCCEEDED:
        return 0
    return info.driver_exit_code or 1  # the script's own status (2: a refused request) when it ran
