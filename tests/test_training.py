"""ssd.training: the per-rank run loop, in one process (the Ray-driven runs are in
test_train_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssd.checkpoint import load_checkpoint
from ssd.config import load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.training import (
    NOT_EVALUATED,
    RunOptions,
    _parse_failure,
    amp_dtype_for,
    epoch_seed,
    format_duration,
    run_training,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 48, 16, log=lambda _: None)


def _cfg(epochs: int, **extra: str):
    overrides = ["model.num_classes=7", f"train.epochs={epochs}", "train.batch_size=8", "optim.warmup_iters=2",
                 *(f"{k}={v}" for k, v in extra.items())]
    return load_config("tiny", overrides)


def _options(shards: Path, **kw) -> RunOptions:
    return RunOptions(train_data=str(shards / "train"), val_data=str(shards / "val"), log_every=100,
                      sample_images=0, **kw)


class _Recorder:
    """A report function that keeps every epoch's metrics and writes rank 0's checkpoints."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.metrics, self.saved = folder, [], []

    def __call__(self, metrics, save) -> None:
        self.metrics.append(metrics)
        if save is not None:
            path = self.folder / f"epoch-{metrics['epoch']}"
            save(path)
            self.saved.append(path)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model


def test_reports_every_epoch_with_evaluation_every_k(shards, tmp_path):
    recorder = _Recorder(tmp_path)
    last = run_training(_cfg(3, **{"train.eval_every": 2}), _options(shards), report=recorder)
    assert [m["epoch"] for m in recorder.metrics] == [1, 2, 3]
    assert len(recorder.saved) == 3
    evaluated = [m["mAP"] != NOT_EVALUATED for m in recorder.metrics]
    assert evaluated == [False, True, True]  # every 2nd epoch, and always the last
    assert recorder.metrics[1]["AP50"] >= 0 and "AP/circle" in recorder.metrics[1]
    assert recorder.metrics[2]["best_mAP"] == max(recorder.metrics[1]["mAP"], recorder.metrics[2]["mAP"])
    steps = recorder.metrics[0]["step"]
    assert steps == 48 // 8 and last["step"] == 3 * steps
    checkpoint = load_checkpoint(recorder.saved[-1])
    assert checkpoint.epoch == 3 and checkpoint.step == 3 * steps
    assert checkpoint.extra["train_data"] == str(shards / "train")
    assert checkpoint.metrics["mAP"] == pytest.approx(last["mAP"])


def test_resumed_run_ends_with_the_unbroken_runs_weights(shards, tmp_path):
    unbroken = _Recorder(tmp_path / "unbroken")
    run_training(_cfg(3), _options(shards), report=unbroken)
    resumed = _Recorder(tmp_path / "resumed")
    checkpoint = load_checkpoint(unbroken.saved[0])
    # Only rank 0's RNG state is in a checkpoint: the other ranks of a resumed run must get their
    # epoch's augmentation from (seed, epoch, rank) alone. Simulate one with no saved state.
    checkpoint.rng = None
    torch.manual_seed(12345)
    run_training(_cfg(3), _options(shards), report=resumed, resume=checkpoint)
    assert [m["epoch"] for m in resumed.metrics] == [2, 3]  # no finished epoch is redone
    assert resumed.metrics[-1]["loss"] == unbroken.metrics[-1]["loss"]
    final_a, final_b = _weights(unbroken.saved[-1]), _weights(resumed.saved[-1])
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert load_checkpoint(resumed.saved[-1]).optimizer["state"].keys() == load_checkpoint(
        unbroken.saved[-1]).optimizer["state"].keys()


def test_wrong_number_of_classes_is_refused(shards):
    with pytest.raises(ValueError, match="model.num_classes is 21 but the shards have 6 classes"):
        run_training(load_config("tiny", ["train.epochs=1"]), _options(shards))


def test_checkpoint_past_the_last_epoch_is_refused(shards, tmp_path):
    recorder = _Recorder(tmp_path)
    run_training(_cfg(2), _options(shards), report=recorder)
    with pytest.raises(ValueError, match=r"the checkpoint is at epoch 2 \(iteration 12\), past the run's 6 "
                                         r"iterations \(train.epochs=1 of 6 iterations\)"):
        run_training(_cfg(1), _options(shards), resume=load_checkpoint(recorder.saved[-1]))


def test_amp_choice():
    cpu = torch.device("cpu")
    assert amp_dtype_for("auto", cpu) is None and amp_dtype_for("none", cpu) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        amp_dtype_for("bf16", cpu)
    with pytest.raises(ValueError, match="auto, bf16 or none"):
        amp_dtype_for("fp8", cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_amp_auto_is_bf16_on_gpus_that_have_it():
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert amp_dtype_for("auto", torch.device("cuda", 0)) == expected


def test_failure_spec_and_helpers():
    assert _parse_failure(None) is None
    assert _parse_failure("3:5") == (3, 5, 0) and _parse_failure("2:1:1") == (2, 1, 1)
    for bad in ("0:1", "x:1", "1:2:3:4", "2"):
        with pytest.raises(ValueError, match="EPOCH:STEP"):
            _parse_failure(bad)
    assert format_duration(59.6) == "1m00s" and format_duration(3725) == "1h02m"
    seeds = {epoch_seed(0, e, r) for e in range(4) for r in range(4)}
    assert len(seeds) == 16  # every (epoch, rank) draws its own augmentation


def test_voc_data_is_also_scored_with_the_voc07_metric(tmp_path):
    from ssd.data.convert import make_synthetic_shards

    make_synthetic_shards(tmp_path, {"train": 16, "val": 16}, layout="voc", progress=False, log=lambda _: None)
    recorder = _Recorder(tmp_path / "checkpoints")
    last = run_training(_cfg(1), _options(tmp_path), report=recorder)
    assert 0.0 <= last["VOC07_mAP"] <= 1.0
    assert {f"VOC07_AP/{name}" for name in ("circle", "ring")} <= set(last)
    assert load_checkpoint(recorder.saved[0]).metrics["VOC07_mAP"] == pytest.approx(last["VOC07_mAP"])


def test_coco_data_has_no_voc_metric(shards, tmp_path):
    last = run_training(_cfg(1), _options(shards), report=_Recorder(tmp_path))
    assert "VOC07_mAP" not in last and last["mAP"] == last["AP"]
