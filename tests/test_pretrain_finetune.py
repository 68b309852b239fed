"""COCO-pretrain -> VOC-finetune through the real MLflow registry: synthetic data written in the COCO
layout with COCO class names, then in the VOC layout with VOC names that overlap in part; the
pipeline submitted as a Ray job to a real Ray head (infra/local/start.sh); champion promotion;
refusals before training."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ssd.checkpoint import save_checkpoint
from ssd.config import load_config
from ssd.data.convert import make_synthetic_shards
from ssd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

#: the six synthetic shape classes, named as COCO classes for stage 1 ...
COCO_NAMES = ("sports ball", "tv", "airplane", "kite", "person", "donut")
#: ... and for stage 2 in VOC style: three have a COCO counterpart (tvmonitor -> tv and
#: aeroplane -> airplane by alias, person by name), three start fresh
VOC_NAMES = ("circle", "tvmonitor", "aeroplane", "diamond", "person", "ring")

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _load_pipeline():
    spec = importlib.util.spec_from_file_location("pretrain_finetune", ROOT / "pipelines" / "pretrain_finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("layouts")
    common = {"workers": 1, "progress": False, "overwrite": True, "log": lambda _: None}
    make_synthetic_shards(root / "coco", {"train": 48, "val": 16}, layout="coco", class_names=COCO_NAMES, **common)
    make_synthetic_shards(root / "voc", {"train": 48, "val": 16}, layout="voc", class_names=VOC_NAMES, **common)
    return SimpleNamespace(coco=root / "coco", voc=root / "voc")


def _hash(folder: Path) -> str:
    return json.loads((folder / "dataset.json").read_text())["content_hash"]


@pytest.fixture(scope="module")
def pipeline_run(services, data, tmp_path_factory):
    """One submitted pipeline run: (summary, job log)."""
    out = tmp_path_factory.mktemp("pipeline")
    summary_path = out / "summary.json"
    job = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", services["dashboard"], "--working-dir", str(ROOT), "--",
         "python", "pipelines/pretrain_finetune.py", "--coco-data", str(data.coco), "--voc-data", str(data.voc),
         "--pretrain-epochs", "2", "--finetune-epochs", "2", "--freeze-backbone-epochs", "1", "--workers", "2",
         "--mlflow-uri", services["mlflow"], "--experiment", "pf-test", "--storage-path", str(out / "runs"),
         "--log-every", "1000", "--summary-json", str(summary_path),
         "--pretrain", "train.batch_size=16", "--finetune", "train.batch_size=16"],  # 8 per worker
        env=services["env"], capture_output=True, text=True, timeout=540, check=False)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-6000:]
    assert re.search(r"Job '(raysubmit_\w+)' succeeded", log), log[-3000:]
    return json.loads(summary_path.read_text()), log


@pytest.mark.timeout(600)
def test_both_stages_register_and_hand_over_through_the_registry(services, data, pipeline_run):
    import mlflow

    summary, log = pipeline_run
    client = mlflow.MlflowClient(services["mlflow"])
    pre, fine = summary["pretrain"], summary["finetune"]
    assert (pre["registered_name"], pre["registered_version"]) == ("ssd-coco", "1")
    assert (fine["registered_name"], fine["registered_version"]) == ("ssd-voc", "1")
    # first versions: promoted (nothing to beat), the decision recorded on the version
    for name in ("ssd-coco", "ssd-voc"):
        assert client.get_model_version_by_alias(name, "champion").version == "1"
        comparison = json.loads(client.get_model_version(name, "1").tags["champion_comparison"])
        assert comparison["promoted"] and comparison["champion_version"] is None

    # stage 2 started from the registry's champion, classes transferred by mapped name
    assert fine["init_from"] == "models:/ssd-coco@champion"
    assert "initialising from ssd-coco/1" in log and "epoch 2: the backbone is unfrozen" in log
    tags = client.get_model_version("ssd-voc", "1").tags
    assert tags["parent_model"] == "ssd-coco/1"
    assert (tags["parent_model_name"], tags["parent_model_version"]) == ("ssd-coco", "1")
    assert tags["parent_run_id"] == pre["mlflow_run_id"]
    assert tags["parent_data_hash"] == _hash(data.coco / "train")
    assert tags["data_hash"] == _hash(data.voc / "train") and tags["val_data_hash"] == _hash(data.voc / "val")
    assert tags["prior_spec"] == "tiny"
    assert json.loads(tags["init_classes_transferred"]) == {"tvmonitor": "tv", "aeroplane": "airplane",
                                                            "person": "person"}
    assert json.loads(tags["init_classes_fresh"]) == ["circle", "diamond", "ring"]
    assert fine.get("VOC07_mAP") is not None  # VOC data: scored with the VOC07 metric too

    # one parent run, the stages its children
    parent = client.get_run(summary["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    for stage in (pre, fine):
        child = client.get_run(stage["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
    assert parent.data.tags["pretrain.model"] == "ssd-coco/1" and parent.data.tags["finetune.model"] == "ssd-voc/1"
    assert parent.data.metrics["finetune/mAP"] == pytest.approx(fine["mAP"])


def _runs(client, experiment: str) -> int:
    found = client.get_experiment_by_name(experiment)
    return 0 if found is None else len(client.search_runs([found.experiment_id]))


@pytest.mark.timeout(300)
def test_a_prior_mismatch_fails_before_anything_trains(services, data, pipeline_run, tmp_path, capsys):
    import mlflow

    pipeline = _load_pipeline()
    client = mlflow.MlflowClient(services["mlflow"])
    before = _runs(client, "pf-test")
    common = ["--voc-data", str(data.voc), "--mlflow-uri", services["mlflow"], "--experiment", "pf-test",
              "--storage-path", str(tmp_path), "--address", "127.0.0.1:1"]  # Ray would fail: it must not be reached
    # from the registry's champion (trained with the tiny prior spec: 4, 6, 6, 4, 4 boxes)
    with pytest.raises(SystemExit, match=r"does not fit the model of models:/ssd-coco@champion: .*boxes per location"):
        pipeline.main(pipeline.get_args_parser().parse_args(
            ["--from-registry", *common, "--finetune", "priors.extra_box=false"]))
    # both stages in one run: refused before stage 1 trains
    with pytest.raises(SystemExit, match=r"does not fit the model of stage 1 \(tiny\)"):
        pipeline.main(pipeline.get_args_parser().parse_args(
            ["--coco-data", str(data.coco), *common, "--finetune", "priors.aspect_ratios=[[2],[2],[2],[2],[2]]"]))
    assert _runs(client, "pf-test") == before  # no MLflow run was even created
    assert client.get_model_version_by_alias("ssd-voc", "champion").version == "1"


@pytest.fixture()
def checkpoints(tmp_path):
    """Two tiny checkpoints with the synthetic classes (seed 0 and seed 1)."""
    from ssd.data.synthetic import CLASSES

    out = []
    for seed in (0, 1):
        cfg = load_config("tiny", ["model.num_classes=7"])
        torch.manual_seed(seed)
        path = tmp_path / f"ckpt{seed}"
        save_checkpoint(path, model=build_model(cfg), epoch=1, step=1, config=cfg, classes=list(CLASSES))
        out.append(path)
    return out


@pytest.mark.timeout(300)
def test_the_champion_moves_only_to_a_better_model(mlflow_server, checkpoints, tmp_path):
    import mlflow

    from ssd.mlflow_model import log_ssd_model
    from ssd.registry import CHAMPION, current_champion, promote_if_better

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.create_experiment("champion-test")

    def register(path: Path) -> str:
        run = client.create_run(experiment)
        version = log_ssd_model(run.info.run_id, mlflow_server, path, register_as="ssd-champ", torch_flavour=False)
        client.set_terminated(run.info.run_id)
        return version["version"]

    v1, v2, v3 = register(checkpoints[0]), register(checkpoints[1]), register(checkpoints[0])
    assert promote_if_better(client, "ssd-champ", v1, 0.30, None).promoted
    worse = promote_if_better(client, "ssd-champ", v2, 0.25, 0.30)
    assert not worse.promoted and current_champion(client, "ssd-champ").version == v1
    recorded = json.loads(client.get_model_version("ssd-champ", v2).tags["champion_comparison"])
    assert recorded == worse.to_dict() and recorded["champion_version"] == v1 and recorded["champion_score"] == 0.30
    assert not promote_if_better(client, "ssd-champ", v3, 0.30, 0.30).promoted  # a tie keeps the champion
    better = promote_if_better(client, "ssd-champ", v2, 0.31, 0.30)
    assert better.promoted and client.get_model_version_by_alias("ssd-champ", CHAMPION).version == v2
    assert "0.31 > champion v1's 0.3 " in better.reason
