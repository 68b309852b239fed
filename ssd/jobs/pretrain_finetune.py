"""COCO-pretrain then VOC-finetune as requested (:class:`PipelineRequest`,
``pipelines/pretrain_finetune.py``'s command line), and planned (:func:`plan_pipeline`): the two
stages as :class:`~ssd.jobs.train.TrainRequest` s, checked before anything trains.

The check resolves both stages' configs with ``ssd.jobs.train.train_config``, the function a
training run resolves its own config with: stage 2's from stage 1's (or the registry model's)
model and priors sections, so an incompatible finetune (other architecture, other boxes per
location) is refused before stage 1 trains. ``ssd.distributed.pretrain_finetune_job`` runs a plan.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

from ssd.config import ConfigError
from ssd.jobs.common import BadRequest, JobError, resolve_data
from ssd.jobs.train import TrainRequest, train_config
from ssd.tracking import resolve_tracking_uri


class PipelineError(JobError):
    """A request that cannot run, or a stage whose result cannot be handed on."""


@dataclass(frozen=True)
class PipelineRequest:
    """The pipeline, as asked for: the fields are ``pipelines/pretrain_finetune.py``'s options
    (same names and defaults)."""

    coco_data: str | None = None
    voc_data: str | None = None
    config: str | None = None
    pretrain_epochs: int | None = None
    finetune_epochs: int | None = None
    pretrain: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()
    freeze_backbone_epochs: int = 0
    from_registry: str | None = None  # "": the champion of coco_name; None: run stage 1
    pretrain_only: bool = False
    coco_name: str = "ssd-coco"
    voc_name: str = "ssd-voc"
    alias: str = "champion"
    mlflow_uri: str | None = None
    experiment: str = "ssd-ray"
    workers: int = 2
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    loader_workers: int | None = None  # None: ssd.jobs.common.loader_workers_for
    amp: str = "auto"
    max_failures: int = 2
    keep_checkpoints: int = 3
    address: str | None = None
    storage_path: str | None = None
    name: str | None = None
    log_every: int = 20
    eval_device: str = "cpu"

    @property
    def runs_stage1(self) -> bool:
        return self.from_registry is None

    @property
    def source_ref(self) -> str:
        """The model stage 2 starts from: ``from_registry``, else stage 1's champion."""
        return self.from_registry or f"models:/{self.coco_name}@{self.alias}"

    def stage_configs(self) -> tuple[tuple[str, tuple[str, ...]], tuple[str | None, tuple[str, ...]]]:
        """((stage 1's config, overrides), (stage 2's config, overrides)).

        A two-stage recipe (``--config ssd300_coco_to_voc``, ``ssd.config.read_stages``) names
        each stage's preset and overrides; ``--pretrain`` / ``--finetune`` come after them.
        Otherwise stage 1 is ``--config`` (default tiny) and stage 2 the same preset (its training
        settings, not stage 1's overrides), or with ``from_registry`` the one given (None: all of
        the registry model's)."""
        from ssd.config import read_stages

        stages = read_stages(self.config) if self.config else None
        if stages is not None:
            pre, fine = stages["pretrain"], stages["finetune"]
            return ((pre["config"], (*pre["overrides"], *self.pretrain)),
                    (fine["config"], (*fine["overrides"], *self.finetune)))
        finetune = (self.config or "tiny") if self.runs_stage1 else self.config
        return (self.config or "tiny", tuple(self.pretrain)), (finetune, tuple(self.finetune))


@dataclass(frozen=True)
class PipelinePlan:
    """A checked pipeline: its name, MLflow URI, and the stages to run (None: not run)."""

    name: str
    tracking_uri: str
    source_ref: str
    pretrain: TrainRequest | None
    finetune: TrainRequest | None


def stage_requests(request: PipelineRequest, name: str, tracking_uri: str) -> tuple[TrainRequest, TrainRequest]:
    """The training runs of the two stages (their ``parent_run_id`` is set once the pipeline's
    run exists)."""
    common = TrainRequest(
        workers=request.workers, use_gpu=request.use_gpu, cpus_per_worker=request.cpus_per_worker,
        mlflow_uri=tracking_uri, experiment=request.experiment, log_every=request.log_every,
        loader_workers=request.loader_workers, amp=request.amp, max_failures=request.max_failures,
        keep_checkpoints=request.keep_checkpoints, alias=request.alias, eval_device=request.eval_device,
        address=request.address, storage_path=request.storage_path)
    try:
        (config1, overrides1), (config2, overrides2) = request.stage_configs()
    except ConfigError as err:
        raise BadRequest(f"config: {err}") from None
    pretrain = replace(common, config=config1, data=request.coco_data,
                       register_as=request.coco_name, name=f"{name}-pretrain", epochs=request.pretrain_epochs,
                       overrides=overrides1)
    finetune = replace(common, config=config2, init_from=request.source_ref,
                       data=request.voc_data, register_as=request.voc_name, name=f"{name}-finetune",
                       freeze_backbone_epochs=request.freeze_backbone_epochs, epochs=request.finetune_epochs,
                       overrides=overrides2)
    return pretrain, finetune


def _num_classes(folder: str, flag: str) -> int:
    try:
        return resolve_data(folder).train_set.num_classes
    except BadRequest as err:
        raise PipelineError(f"{flag} {folder}: {err}") from None


def plan_pipeline(request: PipelineRequest) -> PipelinePlan:
    """Everything that can be refused, refused before any training: missing options, unreadable
    data, an unknown registry model, invalid configs, a finetune config that does not fit the
    model it starts from. Raises PipelineError (or BadRequest for a config)."""
    from ssd.transfer import IncompatibleModels, check_compatible

    stage1 = request.runs_stage1
    if stage1 and not request.coco_data:
        raise PipelineError("give --coco-data (stage 1), or --from-registry to start from a registered model")
    if not request.pretrain_only and not request.voc_data:
        raise PipelineError("give --voc-data (stage 2), or --pretrain-only")
    if request.pretrain_only and not stage1:
        raise PipelineError("--pretrain-only and --from-registry leave nothing to run")
    uri = resolve_tracking_uri(request.mlflow_uri)
    name = request.name or f"pretrain-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    pretrain, finetune = stage_requests(request, name, uri)

    coco_classes = _num_classes(request.coco_data, "--coco-data") if stage1 else None
    voc_classes = _num_classes(request.voc_data, "--voc-data") if not request.pretrain_only else None
    if stage1:
        source_config = train_config(pretrain, coco_classes)
    else:
        from ssd.checkpoint import load_checkpoint
        from ssd.registry import ModelReferenceError, resolve_model

        try:
            source = resolve_model(request.source_ref, uri)
        except ModelReferenceError as err:
            raise PipelineError(f"--from-registry: {err}") from None
        source_config = load_checkpoint(source.checkpoint).config
    if voc_classes is not None:
        cfg2 = train_config(finetune, voc_classes, source_config=source_config)
        try:
            for warning in check_compatible(source_config, cfg2):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except IncompatibleModels as err:
            origin = f"stage 1 ({pretrain.config})" if stage1 else request.source_ref
            raise PipelineError(f"the finetune config does not fit the model of {origin}: {err}") from None
    return PipelinePlan(name=name, tracking_uri=uri, source_ref=request.source_ref,
                        pretrain=pretrain if stage1 else None,
                        finetune=finetune if not request.pretrain_only else None)
