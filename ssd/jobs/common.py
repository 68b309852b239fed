"""What every job shares: its errors, where runs are stored, and which shards it trains on.

A job's request is refused here, in seconds and before Ray starts, when it names data that
cannot be read; the message is one line for the user (:class:`BadRequest`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

from ssd import storage
from ssd.data.convert import default_data_home, ensure_synthetic_shards
from ssd.data.shards import ShardSet, join_spec

R = TypeVar("R")

#: the exit status of a refused request
EXIT_BAD_REQUEST = 2
#: a Ray Train run's checkpoint folders under ``storage_path/NAME`` (``ssd.distributed.trainer``)
CHECKPOINT_PREFIX = "checkpoint-epoch-"
#: synthetic dataset sizes (train, val) when no data is given: normal and ``--smoke-test``
SYNTHETIC_COUNTS = (1536, 256)
SMOKE_TEST_COUNTS = (64, 32)


class JobError(Exception):
    """A job that cannot run or that failed; the message is one line for the user."""


class BadRequest(JobError):
    """A problem with the command line, the config or the data, found before training."""


class JobInterrupted(Exception):
    """The user interrupted the job; what it saved lets it continue (the message says how)."""


def request_from_args(cls: type[R], args: Any, **changes: Any) -> R:
    """A request dataclass from an ``argparse.Namespace`` (or a mapping) whose names are its
    fields; lists become tuples (requests are frozen), names that are no field are ignored."""
    values = args if isinstance(args, Mapping) else vars(args)
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    return cls(**(kept | changes))


def loader_workers_for(requested: int | None, use_gpu: bool, cpus_per_worker: float) -> int:
    """DataLoader processes per training worker: ``requested`` when given (``--loader-workers``),
    else the worker's CPUs minus one on a GPU worker (one CPU stays with the training process;
    the others decode and augment, which a GPU step outpaces), and 0 on a CPU worker (its CPUs
    compute the step; loading in the same process costs least there)."""
    if requested is not None:
        if requested < 0:
            raise ValueError(f"--loader-workers must be >= 0, got {requested}")
        return requested
    return max(int(cpus_per_worker) - 1, 0) if use_gpu else 0


def default_storage_path() -> str:
    return os.environ.get("SSD_STORAGE_PATH") or str(Path.home() / ".cache" / "ssd-ray" / "runs")


def local_path(spec: str) -> str:
    """Local paths made absolute: Ray workers run in another working directory. URLs as given."""
    return spec if "://" in spec or spec.startswith("pipe:") else str(Path(spec).expanduser().resolve())


def open_shards(spec: str, what: str, given: str | None = None) -> ShardSet:
    """``ShardSet.open(spec)``, or :class:`BadRequest` naming ``what`` (training, validation).
    ``given``: the spec as the user wrote it; a relative path that is not there gets a hint."""
    try:
        return ShardSet.open(spec)
    except (OSError, ValueError) as err:  # missing, malformed, or storage refusing access
        hint = ""
        if given and "://" not in given and not Path(given).expanduser().is_absolute() and not Path(spec).exists():
            # `ray job submit --working-dir .` runs the driver in an uploaded copy of the
            # checkout, without its git-ignored data (shards/): a relative path finds nothing there
            hint = (f" ({given!r} is relative to {Path.cwd()}; a job submitted with --working-dir runs in an "
                    "uploaded copy without git-ignored data such as shards/: give an absolute path or an s3:// prefix)")
        raise BadRequest(f"{what} shards {spec!r}: {err}{hint}") from None


@dataclass(frozen=True)
class Data:
    """The two shard sets a job trains and validates on, and their specs (absolute paths or URLs)."""

    train_spec: str
    val_spec: str
    train_set: ShardSet
    val_set: ShardSet


def resolve_data(
    data: str | None = None,
    train: str | None = None,
    val: str | None = None,
    *,
    smoke_test: bool = False,
    fallback: tuple[str | None, str | None] = (None, None),
) -> Data:
    """The shards of a job: ``train``/``val`` (``--train``/``--val``) first, else ``data/train``
    and ``data/val`` (``--data``, a folder or an ``s3://``/http prefix), else ``fallback`` (a
    resumed run's), else the embedded synthetic dataset (made on first use under
    ``default_data_home()``; a small one with ``smoke_test``). Both sets are opened and must
    have the same classes.

    Raises:
        BadRequest: only one of ``train``/``val`` without ``data``; unreadable shards; classes
            that differ.
    """
    train_spec, val_spec = train, val
    if data:
        train_spec = train_spec or join_spec(data, "train")
        val_spec = val_spec or join_spec(data, "val")
    train_spec, val_spec = train_spec or fallback[0], val_spec or fallback[1]
    if not train_spec or not val_spec:
        if (train or val) and not data:
            raise BadRequest("give both --train and --val, or --data DIR with DIR/train and DIR/val")
        home = default_data_home() / ("synthetic-smoke" if smoke_test else "synthetic")
        ensure_synthetic_shards(home, *(SMOKE_TEST_COUNTS if smoke_test else SYNTHETIC_COUNTS),
                                log=lambda line: print(line, flush=True))
        train_spec, val_spec = train_spec or str(home / "train"), val_spec or str(home / "val")
    given = train_spec, val_spec
    train_spec, val_spec = local_path(train_spec), local_path(val_spec)
    train_set, val_set = open_shards(train_spec, "training", given[0]), open_shards(val_spec, "validation", given[1])
    if list(train_set.classes) != list(val_set.classes):
        raise BadRequest(f"training and validation shards have different classes: {list(train_set.classes)} "
                         f"vs {list(val_set.classes)}")
    return Data(train_spec, val_spec, train_set, val_set)


def latest_checkpoint(run_dir: str | Path) -> str | None:
    """The latest checkpoint in a run folder (a path or an ``s3://`` URI): the highest optimizer
    step, then epoch (a mid-epoch checkpoint comes after its epoch's start), or None.

    Only each checkpoint's ``meta.json`` is read, never its weights.
    """
    found = []
    for name in storage.list_names(run_dir):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        folder = storage.join(run_dir, name)
        try:
            meta = json.loads(storage.read_text(storage.join(folder, "meta.json")))
            found.append((int(meta["step"]), int(meta["epoch"]), folder))
        except (OSError, ValueError, KeyError, TypeError):  # a partial upload or a foreign folder
            continue
    return max(found)[2] if found else None


def checkpoint_summary(folder: str | Path) -> dict[str, Any]:
    """A checkpoint's ``meta.json`` plus its ``config`` (a ``Config``), read without its weights,
    from a path or a URI: what a resumed run needs to know before it starts."""
    import yaml

    from ssd.config import config_from_dict

    meta = json.loads(storage.read_text(storage.join(folder, "meta.json")))
    config = config_from_dict(yaml.safe_load(storage.read_text(storage.join(folder, "config.yaml"))))
    return {**meta, "config": config}


def run_from_cli(job: Callable[[R], dict[str, Any]], request: R, summary_json: Path | None) -> dict[str, Any]:
    """What every pipeline script's ``main`` does with its request: run ``job`` (which prints
    its own summary), write ``--summary-json``, and turn a refused request into a one-line
    ``SystemExit("error: ...")`` (an interrupt that saved its state: exit status 130)."""
    try:
        summary = job(request)
    except JobInterrupted:  # the state is saved; the job said how to continue
        raise SystemExit(130) from None
    except JobError as err:
        raise SystemExit(f"error: {err}") from None
    write_summary(summary_json, summary)
    return summary


def write_summary(path: Path | None, summary: dict[str, Any]) -> None:
    """A job's summary as JSON at ``path`` (``--summary-json``), if given."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str))
