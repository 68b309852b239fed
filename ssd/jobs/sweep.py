"""A Ray Tune sweep as requested (:class:`SweepRequest`, ``pipelines/tune.py``'s command line)
and as resolved before Ray starts (:class:`ResolvedSweep`): the base config, the search space
checked against it, the shards, and the sweep's name and storage.

A sweep's folder holds ``sweep_setup.json`` (:data:`SETUP_FILE`): the resolved request with the
loaded search space, so that ``--resume NAME`` needs nothing else. ``ssd.distributed.sweep_job``
runs a resolved sweep.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from ssd import storage
from ssd.config import Config, ConfigError, config_from_dict, load_config
from ssd.jobs.common import BadRequest, default_storage_path, local_path, resolve_data
from ssd.jobs.train import check_schedule, epochs_overrides
from ssd.search_space import SearchSpace, SpaceError

SETUP_FILE = "sweep_setup.json"
#: options a resumed sweep takes from the command line that resumes it, not from its setup file
_FROM_THE_RESUMING_COMMAND = ("address", "storage_path", "resume")


@dataclass(frozen=True)
class SweepRequest:
    """One sweep, as asked for: the fields are ``pipelines/tune.py``'s options (same names and
    defaults; ``overrides`` are its trailing ``key=value`` arguments)."""

    space: str | None = None
    config: str = "tiny"
    data: str | None = None
    num_samples: int = 8
    epochs: int | None = None
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0
    min_prior_recall: float = 0.0
    prescreen_images: int = 500
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpu: bool = False
    loader_workers: int | None = None  # None: ssd.jobs.common.loader_workers_for
    amp: str = "auto"
    max_concurrent: int | None = None
    address: str | None = None
    name: str | None = None
    storage_path: str | None = None
    resume: str | None = None
    seed: int = 0
    mlflow_uri: str | None = None
    experiment: str = "ssd-ray-tune"
    no_mlflow: bool = False
    smoke_test: bool = False
    overrides: tuple[str, ...] = ()

    def saved_options(self) -> dict[str, Any]:
        """What the setup file keeps of the request (all but ``resume`` and ``overrides``,
        which the base config already holds)."""
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "overrides")}


@dataclass(frozen=True)
class ResolvedSweep:
    """A sweep checked and resolved. ``request`` is the one that runs: for a resumed sweep, the
    saved options of the sweep (``address`` and ``storage_path`` from the resuming command)."""

    request: SweepRequest
    name: str
    storage: str
    space_file: str  # absolute path of the space YAML when the sweep started
    base: dict[str, Any]  # the base config, as Config.to_dict()
    space_snapshot: dict[str, Any] | None
    train_spec: str
    val_spec: str
    data_hash: str
    resume: bool = False
    parent_run_id: str | None = None  # of a resumed sweep: its MLflow parent run

    @property
    def sweep_dir(self) -> str:
        """The sweep's folder: a path, or a URI on object storage."""
        return storage.join(self.storage, self.name)

    def base_config(self) -> Config:
        return config_from_dict(self.base)

    def search_space(self) -> SearchSpace:
        """The space (from the snapshot: a sweep resumed by another job, in another working dir,
        has no space file)."""
        if self.space_snapshot is not None:
            return SearchSpace.from_snapshot(self.space_snapshot)
        return SearchSpace.load(self.space_file, self.base_config())

    def setup_json(self, parent_run_id: str | None) -> str:
        """The setup file's content (:data:`SETUP_FILE`)."""
        setup = {"name": self.name, "storage": self.storage, "space": self.space_file, "base": self.base,
                 "space_snapshot": self.space_snapshot, "train_spec": self.train_spec, "val_spec": self.val_spec,
                 "data_hash": self.data_hash, "args": self.request.saved_options(), "parent_run_id": parent_run_id}
        return json.dumps(setup, indent=2)


def _resumed_sweep(request: SweepRequest, storage_path: str) -> ResolvedSweep:
    saved = storage.join(storage_path, request.resume, SETUP_FILE)
    try:
        setup = json.loads(storage.read_text(saved))
    except FileNotFoundError:
        raise BadRequest(f"--resume {request.resume}: no sweep under {storage.join(storage_path, request.resume)} "
                         f"(no {SETUP_FILE})") from None
    except (OSError, ValueError) as err:  # unreadable, or not JSON
        raise BadRequest(f"--resume {request.resume}: cannot read {saved}: {err}") from None
    names = {f.name for f in fields(SweepRequest)} - set(_FROM_THE_RESUMING_COMMAND)
    options = {k: v for k, v in setup.get("args", {}).items() if k in names}
    return ResolvedSweep(request=replace(request, **options), name=setup["name"], storage=storage_path,
                         space_file=setup["space"], base=setup["base"], space_snapshot=setup.get("space_snapshot"),
                         train_spec=setup["train_spec"], val_spec=setup["val_spec"],
                         data_hash=setup.get("data_hash", ""), resume=True, parent_run_id=setup.get("parent_run_id"))


def resolve_sweep(request: SweepRequest) -> ResolvedSweep:
    """Space, base config and data, all checked before Ray starts; raises BadRequest."""
    storage_path = local_path(request.storage_path or default_storage_path())
    if request.resume:
        return _resumed_sweep(request, storage_path)
    if not request.space:
        raise BadRequest("--space is required (e.g. tune_spaces/priors.yaml)")
    data = resolve_data(request.data, smoke_test=request.smoke_test)
    try:
        preset = load_config(request.config)
        # ASHA compares mAP every epoch, and counts reports: a trial reports once per epoch
        overrides = list(request.overrides) + ["train.eval_every=1", "train.checkpoint_every_iters=0",
                                               "train.checkpoint_every_minutes=0"]
        if request.epochs:
            overrides += epochs_overrides(request.epochs, preset, request.overrides)
        if request.smoke_test:
            overrides = [*epochs_overrides(2, preset, request.overrides), "train.batch_size=8", "optim.warmup_iters=5",
                         *overrides]
        base = load_config(request.config, [f"model.num_classes={data.train_set.num_classes}", *overrides])
    except ConfigError as err:
        raise BadRequest(f"config: {err}") from None
    try:
        space = SearchSpace.load(request.space, base)  # checked here, before Ray
    except SpaceError as err:
        raise BadRequest(f"search space: {err}") from None
    if request.workers_per_trial < 1 or request.num_samples < 1:
        raise BadRequest("--workers-per-trial and --num-samples must be at least 1")
    if base.train.epochs is None:  # ASHA's rungs and the trials' budget are epochs
        raise BadRequest(f"config: a sweep's trials run for train.epochs (ASHA compares them epoch by epoch), but "
                         f"the config gives train.max_iters={base.train.max_iters}: use --epochs N")
    check_schedule(base, data.train_set.num_samples, request.workers_per_trial)
    name = request.name or f"sweep-{Path(request.space).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return ResolvedSweep(request=request, name=name, storage=storage_path, space_file=str(Path(request.space).resolve()),
                         base=base.to_dict(), space_snapshot=space.snapshot(), train_spec=data.train_spec,
                         val_spec=data.val_spec, data_hash=data.train_set.info.get("content_hash", ""))


def prescreen_boxes(train_spec: str, images: int) -> dict[str, Any]:
    """Ground-truth boxes of up to ``images`` training images, as lists, for the prior-recall
    pre-screen (``ssd.distributed.tune.SweepSetup.prescreen_gt``)."""
    from ssd.data.shards import ShardSet
    from ssd.prior_analysis import ground_truth_from_shards

    gt = ground_truth_from_shards(ShardSet.open(train_spec), max_images=images)
    return {"boxes": gt.boxes.tolist(), "areas": gt.areas.tolist(), "num_images": gt.num_images}


def no_result_reason(rows: list[dict[str, Any]]) -> str:
    """Why no trial has a score: the first failed trial's error, or what happened to them all."""
    for row in rows:
        if row["status"] in ("error", "invalid"):
            return (f"all {len(rows)} trial(s) failed; the first, {row['trial_id']} ({row['status']}): "
                    f"{row.get('error') or 'see its log'}")
    counts = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    if counts.get("skipped") == len(rows):
        return f"all {len(rows)} trial(s) were skipped by --min-prior-recall; lower it or widen the prior space"
    return f"no trial reached a validation score ({counts or 'no trials ran'})"
