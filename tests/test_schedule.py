"""ssd.schedule: the global batch split over workers, the length in iterations (epochs as a
shorthand), the lr drops and the linear scaling rule; and how run_training, the job requests and
the MLflow params follow the one plan."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from ssd.checkpoint import load_checkpoint
from ssd.config import ConfigError, config_from_dict, load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.engine import build_scheduler, lr_factor
from ssd.schedule import ScheduleError, per_worker_batch, plan_schedule
from ssd.training import NOT_EVALUATED, PermanentValueError, RunOptions, run_training

#: the SSD references (ssd.pytorch, the paper): batch 32 in total, 120k iterations, drops at 80k / 100k
REFERENCE = ["train.batch_size=32", "train.epochs=null", "train.max_iters=120000", "optim.schedule=multistep",
             "optim.milestones=null", "optim.lr_steps=[80000, 100000]", "optim.lr=1e-3", "optim.warmup_iters=500"]


def _lrs(plan, cfg) -> list[float]:
    """The lr of every optimizer step of ``plan`` (what the optimizer uses at step i)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    scheduler = build_scheduler(optimizer, cfg.optim, plan.iterations, plan.lr_scale)
    out = []
    for _ in range(plan.iterations):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("length", [["train.epochs=3"], ["train.epochs=null", "train.max_iters=50"]])
def test_one_and_two_workers_make_the_same_steps_with_the_same_lr(length):
    cfg = load_config("tiny", ["train.batch_size=32", "optim.schedule=multistep", "optim.warmup_iters=7", *length])
    one, two = plan_schedule(cfg, 1000, 1), plan_schedule(cfg, 1000, 2)
    assert (one.per_worker_batch, two.per_worker_batch) == (32, 16)
    assert one.iters_per_epoch == two.iters_per_epoch == 1000 // 32
    assert one.iterations == two.iterations == (3 * 31 if "train.epochs=3" in length else 50)
    same = {k: v for k, v in vars(one).items() if k not in ("world_size", "per_worker_batch")}
    assert same == {k: v for k, v in vars(two).items() if k not in ("world_size", "per_worker_batch")}
    assert _lrs(one, cfg) == _lrs(two, cfg)


def test_the_references_schedule():
    cfg = load_config("ssd300_vgg16", REFERENCE)
    plan = plan_schedule(cfg, 16551, 4)  # VOC07+12 trainval on 4 GPUs
    assert (plan.iterations, plan.length_from, plan.per_worker_batch) == (120000, "train.max_iters", 8)
    assert plan.lr_drops == (80000, 100000) and plan.lr_effective == pytest.approx(1e-3)
    assert plan.epochs == pytest.approx(120000 / (16551 // 32), abs=1e-4)
    factors = [lr_factor(cfg.optim, i, plan.iterations) for i in (0, 499, 500, 79999, 80000, 99999, 100000, 119999)]
    assert factors == pytest.approx([1 / 501, 500 / 501, 1, 1, 0.1, 0.1, 0.01, 0.01])
    # milestones as fractions are the same drops, rounded up to a whole iteration
    fractions = load_config("ssd300_vgg16", ["optim.lr_steps=null", "optim.milestones=[0.67, 0.89]",
                                            "train.max_iters=null", "train.epochs=1"])
    assert plan_schedule(fractions, 3200, 1).lr_drops == (67, 89)  # 3200 // 32 = 100 iterations
    assert plan_schedule(fractions, 3210, 2).lr_drops == (67, 89)


def test_linear_scaling_rule_keeps_the_warmup():
    cfg = load_config("tiny", ["train.batch_size=128", "optim.reference_batch=32", "optim.lr=1e-3",
                               "optim.schedule=multistep", "optim.warmup_iters=4", "train.epochs=1"])
    plan = plan_schedule(cfg, 1280, 4)
    assert (plan.lr_scale, plan.lr_effective) == (4.0, pytest.approx(4e-3))
    lrs = _lrs(plan, cfg)
    assert lrs[:5] == pytest.approx([4e-3 * k / 5 for k in (1, 2, 3, 4)] + [4e-3])  # warm-up up to the scaled lr
    assert lrs[plan.lr_drops[0]] == pytest.approx(4e-4)
    same = plan_schedule(load_config("tiny", ["train.batch_size=32", "optim.reference_batch=32"]), 320, 1)
    unset = plan_schedule(load_config("tiny", ["train.batch_size=128"]), 1280, 1)
    assert same.lr_scale == unset.lr_scale == 1.0 and unset.reference_batch is None


def test_an_uneven_split_is_an_error_naming_both_numbers():
    with pytest.raises(ScheduleError, match="train.batch_size=30 does not split over 4 workers"):
        per_worker_batch(30, 4)
    with pytest.raises(ValueError, match="train.batch_size=30 does not split over 4 workers"):
        plan_schedule(load_config("tiny", ["train.batch_size=30"]), 1000, 4)
    with pytest.raises(ScheduleError, match="20 training images do not fill one global batch of train.batch_size=32"):
        plan_schedule(load_config("tiny", ["train.batch_size=32"]), 20, 1)


def test_the_length_is_set_once():
    with pytest.raises(ConfigError, match="train.epochs=12 and train.max_iters=100 are both set.*train.epochs=null"):
        load_config("tiny", ["train.max_iters=100"])  # the tiny preset gives train.epochs
    assert load_config("tiny", ["train.epochs=null"]).train.epochs == 10  # neither: the default epochs
    cfg = load_config("tiny", ["train.epochs=null", "train.max_iters=100"])
    assert (cfg.train.epochs, cfg.train.max_iters) == (None, 100)
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg  # as a checkpoint stores it
    with pytest.raises(ConfigError, match=r"optim.lr_steps=\[5\] and optim.milestones=\[0.5\] are both set"):
        load_config("tiny", ["optim.schedule=multistep", "optim.lr_steps=[5]", "optim.milestones=[0.5]"])
    with pytest.raises(ConfigError, match="optim.lr_steps=.* has no effect with optim.schedule=cosine"):
        load_config("tiny", ["optim.lr_steps=[5]"])  # tiny is cosine
    with pytest.raises(ConfigError, match="optim.reference_batch must be"):
        load_config("tiny", ["optim.reference_batch=0"])


# --- run_training follows the plan ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 48, 16, log=lambda _: None)


def _options(shards: Path, **kw) -> RunOptions:
    return RunOptions(train_data=str(shards / "train"), val_data=str(shards / "val"), log_every=1,
                      sample_images=0, **kw)


class _Tracker:
    active = False

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def log_metrics(self, metrics, step=None) -> None:
        if "train/lr" in metrics:
            self.lrs[step] = metrics["train/lr"]


def test_max_iters_stops_mid_epoch_with_a_final_evaluation_and_checkpoint(shards, tmp_path, capsys):
    cfg = load_config("tiny", ["model.num_classes=7", "train.batch_size=8", "train.epochs=null", "train.max_iters=8",
                               "train.eval_every=5", "optim.warmup_iters=2"])
    reports, saved = [], []

    def report(metrics, save) -> None:
        reports.append(metrics)
        save(tmp_path / f"epoch-{metrics['epoch']}")
        saved.append(tmp_path / f"epoch-{metrics['epoch']}")

    tracker = _Tracker()
    last = run_training(cfg, _options(shards), report=report, tracker=tracker)
    assert [(m["epoch"], m["step"]) for m in reports] == [(1, 6), (2, 8)]  # 48 // 8 = 6 a pass, then 2
    assert reports[0]["mAP"] == NOT_EVALUATED and last["mAP"] != NOT_EVALUATED  # the cut last epoch is evaluated
    checkpoint = load_checkpoint(saved[-1])
    assert (checkpoint.epoch, checkpoint.step) == (2, 8)
    assert sorted(tracker.lrs) == list(range(1, 9))
    out = capsys.readouterr().out
    recipe = out[out.index("recipe:"):].splitlines()[:6]
    assert recipe == [
        "recipe:",
        "  batch     8 global = 8 per worker x 1 worker",
        "  length    8 iterations = 1.3333 epochs of 6 iterations (48 images); set by train.max_iters",
        "  lr        0.05 (optim.lr, taken for this batch: optim.reference_batch unset)",
        "  schedule  cosine to 0 at iteration 8",
        "  warm-up   2 iterations, linear up to 0.05",
    ]
    assert "epoch 2/2 step 2/6" in out
    # the block goes on with the weights and the evaluation rule; the run ends with evaluation's share
    assert out[out.index("recipe:"):].splitlines()[6:8] == [
        "  weights   none: the backbone starts from random weights (model.backbone_weights unset or none)",
        "  eval      every 5 epoch(s) and after the last"]
    assert re.search(r"evaluation: 1 run\(s\), [\d.]+ s of [\d.]+ s \([\d.]+ % of the wall time", out)


def test_run_training_refuses_an_uneven_split_as_a_permanent_error(shards, monkeypatch):
    monkeypatch.setattr("ssd.training.world", lambda: (0, 4))
    cfg = load_config("tiny", ["model.num_classes=7", "train.batch_size=30"])
    with pytest.raises(PermanentValueError, match="train.batch_size=30 does not split over 4 workers"):
        run_training(cfg, _options(shards))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_run(rank: int, world_size: int, port: int, shards: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        tracker, steps = _Tracker(), []
        cfg = load_config("tiny", ["model.num_classes=7", "train.batch_size=8", "train.epochs=null",
                                   "train.max_iters=4", "optim.warmup_iters=2"])
        run_training(cfg, _options(Path(shards)), tracker=tracker if rank == 0 else None,
                     report=lambda metrics, save: steps.append(metrics["step"]))
        Path(out, f"rank{rank}.json").write_text(json.dumps({"lrs": tracker.lrs, "steps": steps}))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_ranks_make_the_steps_and_lrs_of_one(shards, tmp_path):
    torch.multiprocessing.spawn(_rank_run, args=(2, _free_port(), str(shards), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == [4]
    tracker = _Tracker()
    cfg = load_config("tiny", ["model.num_classes=7", "train.batch_size=8", "train.epochs=null", "train.max_iters=4",
                               "optim.warmup_iters=2"])
    run_training(cfg, _options(shards), tracker=tracker)
    assert {int(k): v for k, v in ranks[0]["lrs"].items()} == tracker.lrs and len(tracker.lrs) == 4


# --- the driver: requests and MLflow params ------------------------------------------------------------------


def test_the_request_is_refused_before_ray_and_the_params_carry_the_plan(shards, tmp_path):
    from ssd.jobs.common import BadRequest
    from ssd.jobs.sweep import SweepRequest, resolve_sweep
    from ssd.jobs.train import TrainRequest, resolve_train
    from ssd.publish import run_params

    common = {"data": str(shards), "storage_path": str(tmp_path / "runs")}
    with pytest.raises(BadRequest, match="train.batch_size=30 does not split over 4 workers"):
        resolve_train(TrainRequest(**common, workers=4, overrides=("train.batch_size=30",)))
    space = tmp_path / "space.yaml"
    space.write_text("space:\n  optim.lr: {loguniform: [1.0e-3, 1.0e-1]}\n")
    with pytest.raises(BadRequest, match="train.batch_size=30 does not split over 4 workers"):
        resolve_sweep(SweepRequest(**common, space=str(space), workers_per_trial=4, overrides=("train.batch_size=30",)))
    with pytest.raises(BadRequest, match="a sweep's trials run for train.epochs"):
        resolve_sweep(SweepRequest(**common, space=str(space), overrides=("train.epochs=null", "train.max_iters=9")))

    # --epochs N clears a max_iters the config may give
    request = TrainRequest(**common, workers=2, epochs=3, overrides=("train.epochs=null", "train.max_iters=9",
                                                                    "train.batch_size=8", "optim.reference_batch=4"))
    resolved = resolve_train(request)
    assert (resolved.cfg.train.epochs, resolved.cfg.train.max_iters) == (3, None)
    params = run_params(request, resolved, SimpleNamespace(num_workers=2, use_gpu=False, cpus_per_worker=1.0))
    assert params["train.batch_size"] == 8 and params["ray.workers"] == 2
    assert {k: params[f"schedule.{k}"] for k in ("global_batch", "per_worker_batch", "iterations", "iters_per_epoch",
                                                 "lr_scale", "length_from")} == {
        "global_batch": 8, "per_worker_batch": 4, "iterations": 18, "iters_per_epoch": 6, "lr_scale": 2.0,
        "length_from": "train.epochs"}
    assert params["schedule.lr_effective"] == pytest.approx(2 * resolved.cfg.optim.lr)
