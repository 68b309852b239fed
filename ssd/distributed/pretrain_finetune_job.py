"""COCO-pretrain then VOC-finetune on Ray, with the MLflow model registry as the hand-off:
:func:`run_pretrain_finetune` plans the pipeline (``ssd.jobs.pretrain_finetune``: refused before
anything trains), opens its MLflow parent run, and runs each stage as a training job
(``ssd.distributed.train_job.run_train_job``, in this process and on the same Ray connection)
whose registered version and champion decision are recorded on the parent run.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ssd.distributed.train_job import run_train_job
from ssd.jobs.common import JobError
from ssd.jobs.pretrain_finetune import PipelineError, PipelineRequest, plan_pipeline
from ssd.jobs.train import TrainRequest


def run_stage(request: TrainRequest, what: str) -> dict[str, Any]:
    """One stage's training job; its summary, which must hold a registered version and its
    champion decision (PipelineError otherwise)."""
    print(f"\n=== {what}: train.py {' '.join(request.argv())}", flush=True)
    try:
        summary = run_train_job(request)
    except JobError as err:
        raise PipelineError(f"{what} failed: error: {err}") from None
    if summary.get("error"):
        raise PipelineError(f"{what} failed: error: {summary['error']}")
    if not summary.get("champion_comparison"):  # not registered, or no champion decision
        raise PipelineError(f"{what}: the model was not registered (see above); the checkpoint is "
                            f"{summary.get('best_checkpoint')}")
    return summary


def run_pretrain_finetune(request: PipelineRequest) -> dict[str, Any]:
    """Run the pipeline; print and return its summary (``name``, ``mlflow_run_id``,
    ``mlflow_uri``, and per stage run, ``pretrain`` and ``finetune``: the training job's summary
    with ``promotion``). Raises PipelineError (a refused request, a failed stage) or BadRequest."""
    from ssd.publish import record_promotion, start_parent_run

    plan = plan_pipeline(request)
    parent = start_parent_run(plan.tracking_uri, request.experiment, plan.name, tags={"pipeline": "pretrain_finetune"},
                              params={"coco_data": request.coco_data, "voc_data": request.voc_data,
                                      "config": request.config, "from_registry": request.from_registry,
                                      "freeze_backbone_epochs": request.freeze_backbone_epochs,
                                      "coco_name": request.coco_name, "voc_name": request.voc_name,
                                      "workers": request.workers})
    if not parent.active:
        raise PipelineError(f"MLflow at {plan.tracking_uri} is needed for the registry hand-off: {parent.failure}")
    summary: dict[str, Any] = {"name": plan.name, "mlflow_run_id": parent.run_id, "mlflow_uri": plan.tracking_uri}
    stages = (("pretrain", plan.pretrain, "stage 1: pretrain"),
              ("finetune", plan.finetune, f"stage 2: finetune from {plan.source_ref}"))
    status = "FAILED"
    try:
        for prefix, stage, what in stages:
            if stage is None:
                continue
            result = run_stage(replace(stage, parent_run_id=parent.run_id), what)
            result["promotion"] = record_promotion(parent, prefix, result)
            if prefix == "finetune":
                result["init_from"] = plan.source_ref
            summary[prefix] = result
        status = "FINISHED"
    finally:
        parent.end(status)
    print_summary(summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    lines = [f"\npipeline {summary['name']} (MLflow parent run {summary['mlflow_run_id']} at {summary['mlflow_uri']})"]
    for stage in ("pretrain", "finetune"):
        if stage in summary:
            s = summary[stage]
            promotion = s["promotion"]
            lines.append(f"  {stage}: {s['registered_name']} v{s['registered_version']}  mAP {s['mAP']:.4f}"
                         + (f"  VOC07 mAP {s['VOC07_mAP']:.4f}" if s.get("VOC07_mAP") is not None else "")
                         + f"  ({'promoted to champion' if promotion['promoted'] else 'champion unchanged'})")
    print("\n".join(lines), flush=True)
