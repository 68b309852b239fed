"""COCO-pretrain then VOC-finetune as one pipeline, with the MLflow model registry as the hand-off.

    ray job submit --working-dir . -- python pipelines/pretrain_finetune.py \\
        --coco-data shards/coco --voc-data shards/voc --config ssd300_vgg16 --workers 8 --gpu
    python pipelines/pretrain_finetune.py --from-registry --voc-data shards/voc   # stage 2 only

Stage 1 trains on ``--coco-data`` (a folder with ``train/`` and ``val/`` shard sets) and registers
a version of ``--coco-name`` (default ``ssd-coco``). The alias ``champion`` moves to it only if its
mAP beats the current champion's on the same validation set: the champion's recorded mAP is used
when it was measured on the same shards (same content hash), else the champion is evaluated on
them now. ``train.py --register-as`` applies this rule (``ssd.registry.apply_champion_rule``); the
comparison is recorded on the version (tag ``champion_comparison``) and here on the parent run.

Stage 2 looks up ``models:/<coco-name>@champion`` (or the model ``--from-registry`` names), builds
the VOC model from it (``pipelines/train.py --init-from``: backbone, extras and box head as they
are; the class head class by class, VOC's ``aeroplane`` from COCO's ``airplane`` and so on;
classes without a counterpart fresh), optionally with the backbone frozen for the first
``--freeze-backbone-epochs``, finetunes on ``--voc-data`` and registers ``--voc-name`` (default
``ssd-voc``) with lineage tags (parent model name and version, data hashes, prior spec); its
``champion`` alias follows the same rule.

Both stages are child runs of one MLflow parent run. The two stages' configs must be compatible
(same architecture, same boxes per location): that is checked before stage 1 trains, and again
against the registry model before stage 2 trains. ``--pretrain-only`` stops after stage 1.
Configs: stage 1 is ``--config`` (default tiny) with ``--pretrain KEY=VALUE ...``; stage 2 takes
the model and priors sections from the model it starts from and the rest from ``--config`` (not
from stage 1's overrides), then ``--finetune KEY=VALUE ...`` (e.g. ``--finetune optim.lr=0.01``).
With ``--from-registry`` and no ``--config``, stage 2 starts from the registry model's whole config. Ray and the workers are as in ``pipelines/train.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too
sys.path.insert(0, str(ROOT / "pipelines"))

import train  # pipelines/train.py, importable after the path set-up

from ssd.config import ConfigError, load_config
from ssd.data.shards import ShardSet, join_spec
from ssd.tracking import Tracker, resolve_tracking_uri
from ssd.transfer import IncompatibleModels, check_compatible, finetune_config


class PipelineError(Exception):
    """A request that cannot run, or a stage whose result cannot be handed on."""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--coco-data", help="stage 1 data: a folder with train/ and val/ shard sets")
    data.add_argument("--voc-data", help="stage 2 data: a folder with train/ and val/ shard sets")
    stages = p.add_argument_group("stages")
    stages.add_argument("--config", default=None,
                        help="preset or YAML of both stages (default tiny); stage 2 keeps the model's model and "
                             "priors sections. With --from-registry, default: the registry model's whole config")
    stages.add_argument("--pretrain-epochs", type=int, help="stage 1 train.epochs")
    stages.add_argument("--finetune-epochs", type=int, help="stage 2 train.epochs")
    stages.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE", help="stage 1 config overrides")
    stages.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="stage 2 config overrides")
    stages.add_argument("--freeze-backbone-epochs", type=int, default=0,
                        help="stage 2: backbone frozen for the first N epochs (default 0)")
    stages.add_argument("--from-registry", nargs="?", const="", metavar="MODEL",
                        help="skip stage 1: start stage 2 from MODEL (default models:/<coco-name>@champion)")
    stages.add_argument("--pretrain-only", action="store_true", help="stop after stage 1")
    reg = p.add_argument_group("MLflow")
    reg.add_argument("--coco-name", default="ssd-coco", help="registered model of stage 1 (default ssd-coco)")
    reg.add_argument("--voc-name", default="ssd-voc", help="registered model of stage 2 (default ssd-voc)")
    reg.add_argument("--alias", default="champion", help="the alias of the best version (default champion)")
    reg.add_argument("--mlflow-uri", help="tracking and registry URI (default $MLFLOW_TRACKING_URI, else local SQLite)")
    reg.add_argument("--experiment", default="ssd-ray", help="MLflow experiment (default ssd-ray)")
    ray_group = p.add_argument_group("Ray (as pipelines/train.py)")
    ray_group.add_argument("--workers", type=int, default=2)
    gpu = ray_group.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="use_gpu", action="store_true", default=None)
    gpu.add_argument("--cpu", dest="use_gpu", action="store_false")
    ray_group.add_argument("--cpus-per-worker", type=float, default=1.0)
    ray_group.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    ray_group.add_argument("--amp", default="auto", choices=["auto", "bf16", "none"])
    ray_group.add_argument("--max-failures", type=int, default=2)
    ray_group.add_argument("--keep-checkpoints", type=int, default=3)
    ray_group.add_argument("--address", default=None)
    ray_group.add_argument("--storage-path", default=None)
    ray_group.add_argument("--name", help="pipeline run name (default pretrain-finetune-<time>)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--eval-device", default="cpu", help="where a champion is re-evaluated (default cpu)")
    p.add_argument("--summary-json", type=Path, help="also write the pipeline summary as JSON here")
    return p


def _shards(folder: str, flag: str) -> dict[str, ShardSet]:
    try:
        return {split: ShardSet.open(join_spec(folder, split)) for split in ("train", "val")}
    except (FileNotFoundError, ValueError) as err:
        raise PipelineError(f"{flag} {folder}: {err}") from None


def finetune_config_name(args: argparse.Namespace) -> str | None:
    """Stage 2's ``--config``: stage 1's preset (its training settings, not stage 1's overrides),
    or with ``--from-registry`` the one given (None: all of the registry model's config)."""
    if args.from_registry is None:
        return args.config or "tiny"
    return args.config


def stage_configs(args: argparse.Namespace, coco: dict[str, ShardSet] | None, voc: dict[str, ShardSet] | None,
                  source_config: Any | None = None) -> tuple[Any | None, Any | None]:
    """The configs the two stages will train with, as ``pipelines/train.py`` resolves them, to
    check their compatibility before anything trains."""
    try:
        cfg1 = None
        if coco is not None:
            extra = [f"train.epochs={args.pretrain_epochs}"] if args.pretrain_epochs else []
            cfg1 = load_config(args.config or "tiny", [f"model.num_classes={coco['train'].num_classes}", *args.pretrain, *extra])
            source_config = cfg1
        cfg2 = None
        if voc is not None and source_config is not None:
            name = finetune_config_name(args)
            extra = [f"train.epochs={args.finetune_epochs}"] if args.finetune_epochs else []
            cfg2 = finetune_config(source_config, load_config(name) if name else None, [*args.finetune, *extra],
                                   voc["train"].num_classes)
    except ConfigError as err:
        raise PipelineError(f"config: {err}") from None
    return cfg1, cfg2


def _common_train_args(args: argparse.Namespace, uri: str, parent_run_id: str) -> list[str]:
    argv = ["--workers", str(args.workers), "--cpus-per-worker", str(args.cpus_per_worker),
            "--mlflow-uri", uri, "--experiment", args.experiment, "--parent-run-id", parent_run_id,
            "--log-every", str(args.log_every), "--loader-workers", str(args.loader_workers), "--amp", args.amp,
            "--max-failures", str(args.max_failures), "--keep-checkpoints", str(args.keep_checkpoints),
            "--alias", args.alias, "--eval-device", args.eval_device]
    if args.use_gpu is not None:
        argv.append("--gpu" if args.use_gpu else "--cpu")
    if args.address:
        argv += ["--address", args.address]
    if args.storage_path:
        argv += ["--storage-path", args.storage_path]
    return argv


def run_stage(argv: list[str], what: str) -> dict[str, Any]:
    """``pipelines/train.py`` in this process (same Ray connection); its summary."""
    print(f"\n=== {what}: train.py {' '.join(argv)}", flush=True)
    try:
        summary = train.main(train.get_args_parser().parse_args(argv))
    except SystemExit as err:
        raise PipelineError(f"{what} failed: {err}") from None
    if summary.get("error") or not summary.get("champion_comparison"):  # not registered, or no champion decision
        raise PipelineError(f"{what}: {summary.get('error') or 'the model was not registered (see above)'}; the "
                            f"checkpoint is {summary.get('best_checkpoint')}")
    return summary


def record_promotion(parent: Tracker, prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    """Put a stage's champion decision (made by train.py, ``ssd.registry.apply_champion_rule``)
    on the parent run: tags ``<prefix>.model``, ``.promoted``, ``.champion_comparison`` and
    metrics ``<prefix>/mAP``, ``<prefix>/champion_mAP``. Returns the comparison."""
    record = summary["champion_comparison"]
    name, version = summary["registered_name"], summary["registered_version"]
    parent.set_tags({f"{prefix}.model": f"{name}/{version}", f"{prefix}.promoted": record["promoted"],
                     f"{prefix}.champion_comparison": json.dumps(record, sort_keys=True)})
    previous = record["champion_score"]
    parent.log_metrics({f"{prefix}/mAP": record["score"]} | ({f"{prefix}/champion_mAP": previous}
                                                             if previous not in (None, float("-inf")) else {}))
    return record


def main(args: argparse.Namespace) -> dict[str, Any]:
    try:
        return _main(args)
    except PipelineError as err:
        raise SystemExit(f"error: {err}") from None


def _main(args: argparse.Namespace) -> dict[str, Any]:
    from ssd.registry import ModelReferenceError, resolve_model

    stage1 = args.from_registry is None
    if stage1 and not args.coco_data:
        raise PipelineError("give --coco-data (stage 1), or --from-registry to start from a registered model")
    if not args.pretrain_only and not args.voc_data:
        raise PipelineError("give --voc-data (stage 2), or --pretrain-only")
    if args.pretrain_only and not stage1:
        raise PipelineError("--pretrain-only and --from-registry leave nothing to run")
    uri = resolve_tracking_uri(args.mlflow_uri)

    # --- everything that can be refused is refused before any training ---------------------
    coco = _shards(args.coco_data, "--coco-data") if stage1 else None
    voc = _shards(args.voc_data, "--voc-data") if not args.pretrain_only else None
    source_ref = args.from_registry or f"models:/{args.coco_name}@{args.alias}"
    source = None
    if not stage1:
        try:
            source = resolve_model(source_ref, uri)
        except ModelReferenceError as err:
            raise PipelineError(f"--from-registry: {err}") from None
        from ssd.checkpoint import load_checkpoint

        source_config = load_checkpoint(source.checkpoint).config
    else:
        source_config = None
    cfg1, cfg2 = stage_configs(args, coco, voc, source_config)
    if cfg2 is not None:
        try:
            for warning in check_compatible(cfg1 if stage1 else source_config, cfg2):
                print(f"warning: {warning}", file=sys.stderr, flush=True)
        except IncompatibleModels as err:
            origin = f"stage 1 ({args.config or 'tiny'})" if stage1 else source_ref
            raise PipelineError(f"the finetune config does not fit the model of {origin}: {err}") from None

    name = args.name or f"pretrain-finetune-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = Tracker(uri, args.experiment, name, tags={"pipeline": "pretrain_finetune"})
    if not parent.active:
        raise PipelineError(f"MLflow at {uri} is needed for the registry hand-off: {parent.failure}")
    parent.log_params({"coco_data": args.coco_data, "voc_data": args.voc_data, "config": args.config,
                       "from_registry": args.from_registry, "freeze_backbone_epochs": args.freeze_backbone_epochs,
                       "coco_name": args.coco_name, "voc_name": args.voc_name, "workers": args.workers})
    summary: dict[str, Any] = {"name": name, "mlflow_run_id": parent.run_id, "mlflow_uri": uri}
    status = "FAILED"
    try:
        common = _common_train_args(args, uri, parent.run_id)
        if stage1:
            argv = ["--config", args.config or "tiny", "--data", args.coco_data, "--register-as", args.coco_name,
                    "--name", f"{name}-pretrain", *common, *(["--epochs", str(args.pretrain_epochs)]
                                                             if args.pretrain_epochs else []), *args.pretrain]
            result = run_stage(argv, "stage 1: pretrain")
            result["promotion"] = record_promotion(parent, "pretrain", result)
            summary["pretrain"] = result
        if not args.pretrain_only:
            name2 = finetune_config_name(args)
            argv = [*(["--config", name2] if name2 else []), "--init-from", source_ref, "--data", args.voc_data,
                    "--register-as", args.voc_name,
                    "--name", f"{name}-finetune", "--freeze-backbone-epochs", str(args.freeze_backbone_epochs),
                    *common, *(["--epochs", str(args.finetune_epochs)] if args.finetune_epochs else []),
                    *args.finetune]
            result = run_stage(argv, f"stage 2: finetune from {source_ref}")
            result["promotion"] = record_promotion(parent, "finetune", result)
            result["init_from"] = source_ref
            summary["finetune"] = result
        status = "FINISHED"
    finally:
        parent.end(status)
    print_summary(summary)
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, default=str))
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


if __name__ == "__main__":
    main(get_args_parser().parse_args())
