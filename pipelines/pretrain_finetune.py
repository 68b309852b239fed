"""COCO-pretrain then VOC-finetune as one pipeline, with the MLflow model registry as the hand-off.

    ray job submit --working-dir . -- python pipelines/pretrain_finetune.py \\
        --coco-data shards/coco --voc-data shards/voc --config ssd300_coco_to_voc --workers 8 --gpu
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
Configs: ``--config`` is a two-stage recipe or one preset. A two-stage recipe
(``--config ssd300_coco_to_voc``, the paper's COCO -> VOC07+12; docs/recipes.md) names each
stage's preset and overrides (``stages:`` in its YAML, ``ssd.config.read_stages``): stage 1
``ssd300_coco`` with the paper's COCO schedule, stage 2 ``ssd300_voc0712``; ``--pretrain`` /
``--finetune KEY=VALUE ...`` apply after them, and ``--pretrain-epochs`` / ``--finetune-epochs``
replace a stage's iteration schedule with epochs. With one preset, stage 1 is ``--config``
(default tiny) with ``--pretrain KEY=VALUE ...`` and stage 2 the same preset (not stage 1's
overrides) with ``--finetune KEY=VALUE ...`` (e.g. ``--finetune optim.lr=0.01``). Either way
stage 2 takes the model and priors sections from the model it starts from, so it reads no
backbone weights. With ``--from-registry`` and no ``--config``, stage 2 starts from the registry
model's whole config. Ray and the workers are as in ``pipelines/train.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (and from a Ray job's working dir) too

from ssd.distributed.pretrain_finetune_job import run_pretrain_finetune
from ssd.jobs.common import request_from_args, run_from_cli
from ssd.jobs.pretrain_finetune import PipelineRequest


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--coco-data", help="stage 1 data: a folder with train/ and val/ shard sets")
    data.add_argument("--voc-data", help="stage 2 data: a folder with train/ and val/ shard sets")
    stages = p.add_argument_group("stages")
    stages.add_argument("--config", default=None,
                        help="a two-stage recipe (e.g. ssd300_coco_to_voc: each stage's preset and schedule), or a "
                             "preset or YAML of both stages (default tiny); stage 2 keeps the model's model and "
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
    ray_group.add_argument("--loader-workers", type=int, default=None,
                           help="DataLoader processes per worker (default: --cpus-per-worker minus 1 on GPU workers, "
                                "0 on CPU workers)")
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


def main(args: argparse.Namespace) -> dict[str, Any]:
    return run_from_cli(run_pretrain_finetune, request_from_args(PipelineRequest, args), args.summary_json)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
