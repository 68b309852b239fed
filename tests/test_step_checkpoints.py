"""Checkpoints mid-epoch (train.checkpoint_every_iters / _minutes): written from host copies,
and a run resumed from one continues exactly where it stopped, the batches already trained
passed over without decoding (their random draws replayed)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ssd.checkpoint import load_checkpoint, snapshot, write_checkpoint
from ssd.config import ConfigError, load_config
from ssd.data.convert import ensure_synthetic_shards
from ssd.data.shards import ShardSet
from ssd.data.streaming import ShardLoader, ShardStream
from ssd.device_augment import DeviceAugment, DeviceAugmentLoader
from ssd.jobs.common import latest_checkpoint
from ssd.models import build_model
from ssd.training import RunOptions, run_training
from ssd.transforms import build_transform

STEPS = 48 // 8  # steps per epoch of the shards below at batch 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return ensure_synthetic_shards(tmp_path_factory.mktemp("data") / "synthetic", 48, 16, log=lambda _: None)


def _cfg(epochs: int, **extra):
    overrides = ["model.num_classes=7", f"train.epochs={epochs}", "train.batch_size=8", "optim.warmup_iters=2",
                 "train.eval_every=100", *(f"{k}={v}" for k, v in extra.items())]
    return load_config("tiny", overrides)


def _options(shards: Path, **kw) -> RunOptions:
    return RunOptions(train_data=str(shards / "train"), val_data=str(shards / "val"), log_every=1,
                      sample_images=0, **kw)


class _Recorder:
    """Keeps every report's metrics and writes rank 0's checkpoints, each in its own folder."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.metrics, self.saved = folder, [], []

    def __call__(self, metrics, save) -> None:
        self.metrics.append(metrics)
        if save is not None:
            path = self.folder / f"report-{len(self.metrics):03d}"
            save(path)
            self.saved.append(path)


# ---------------------------------------------------------------------------------------------
# the loader passes over the first batches exactly


def _loader(shards: Path, workers: int, device_augment: bool, epoch: int = 1):
    cfg = load_config("tiny")
    train_set = ShardSet.open(str(shards / "train"))
    if device_augment:
        augment = DeviceAugment(cfg.priors.image_size, 1.0, tuple(cfg.augment.mean))
        loader = DeviceAugmentLoader(ShardLoader(ShardStream(train_set, train=True, seed=3, prepare=augment.prepare,
                                                             shuffle_buffer=10), 4, num_workers=workers),
                                     augment, "cpu")
    else:
        transform = build_transform(cfg.priors.image_size, 1.0, train=True, normalize=False)
        loader = ShardLoader(ShardStream(train_set, transform, train=True, seed=3, shuffle_buffer=10), 4,
                             num_workers=workers)
    loader.set_epoch(epoch)
    return loader


def _epoch(loader, skip: int = 0):
    torch.manual_seed(11)  # as EpochSeed before every epoch: the workers' seeds come from it
    if skip:
        loader.skip_next(skip)
    return list(loader)


@pytest.mark.parametrize(("workers", "device_augment"), [(0, False), (2, False), (0, True), (2, True)])
def test_skip_next_yields_the_unbroken_pass_from_that_batch(shards, workers, device_augment, monkeypatch):
    loader = _loader(shards, workers, device_augment)
    full = _epoch(loader)
    assert len(full) == len(loader) == 12
    decoded = []
    counted = not device_augment and workers == 0  # decoding counted in this process
    if counted:
        from ssd.data import streaming

        real = streaming.decode_sample
        monkeypatch.setattr(streaming, "decode_sample", lambda sample: decoded.append(1) or real(sample))
    for skip in (1, 5):
        decoded.clear()
        rest = _epoch(loader, skip)
        assert len(rest) == len(full) - skip
        for (images_a, targets_a), (images_b, targets_b) in zip(full[skip:], rest, strict=True):
            assert torch.equal(images_a, images_b)
            assert all(torch.equal(a[k], b[k]) for a, b in zip(targets_a, targets_b, strict=True) for k in a)
        if counted:  # the passed-over samples were never decoded
            assert len(decoded) == 4 * (len(full) - skip)
    assert len(_epoch(loader)) == 12  # skip_next holds for one pass only


def test_skip_falls_back_to_decoding_when_passing_over_cannot_align(shards, monkeypatch):
    """When the first batches are not whole batches of every worker (a worker runs out within
    them) they are decoded and dropped instead: slower, the same batches."""
    five = _loader(shards, 5, device_augment=False)
    assert five.stream.worker_counts(5) == [10, 10, 10, 9, 9]
    assert five._pass_over_counts(five.stream, 10) == {w: 8 for w in range(5)}
    assert five._pass_over_counts(five.stream, 11) is None  # worker 0 would need 3 batches of 4 out of 10 samples
    loader = _loader(shards, 2, device_augment=False)
    full = _epoch(loader)
    monkeypatch.setattr(ShardStream, "can_pass_over", lambda self: False)
    rest = _epoch(loader, 5)
    assert len(rest) == len(full) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], rest, strict=True))


def test_the_next_pass_starts_early_with_the_same_batches(shards):
    """set_next_epoch: the next pass's workers start when this pass hands out its last batch;
    its batches are those of a pass started on time (worker seeds: seed, epoch, rank only)."""
    early = _loader(shards, 2, device_augment=False, epoch=1)
    early.set_next_epoch(2)
    first = list(early)
    assert early._ahead is not None and early._ahead[0] == 2  # started before the pass was over
    early.set_epoch(2)
    torch.manual_seed(999)  # the main process's RNG does not matter to the workers
    second = list(early)
    assert early._ahead is None

    on_time = _loader(shards, 2, device_augment=False, epoch=2)
    reference = list(on_time)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(second, reference, strict=True))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, reference, strict=True))  # epochs differ


def test_a_pass_started_early_for_another_epoch_is_not_used(shards):
    loader = _loader(shards, 2, device_augment=False, epoch=1)
    loader.set_next_epoch(2)
    list(loader)
    loader.set_epoch(5)  # not the announced epoch: a fresh pass
    fresh = list(loader)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(fresh, list(_loader(shards, 2, False, epoch=5)), strict=True))


# ---------------------------------------------------------------------------------------------
# snapshots, config, ordering


def test_snapshot_is_a_copy_written_later(tmp_path):
    cfg = load_config("tiny", ["model.num_classes=3"])
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(2, 3, 128, 128))[0].sum().backward()
    optimizer.step()
    state = snapshot(model=model, epoch=2, step=7, epoch_step=3, config=cfg, classes=["a", "b"], optimizer=optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # training goes on while the writer thread runs
        for p in model.parameters():
            p.add_(1.0)
    writer = threading.Thread(target=write_checkpoint, args=(tmp_path / "ckpt", state))
    writer.start()
    writer.join()
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert all(torch.equal(loaded.model[k], before[k]) for k in before)
    assert (loaded.epoch, loaded.step, loaded.epoch_step) == (2, 7, 3)
    assert loaded.optimizer["state"]  # momentum buffers copied too


def test_old_checkpoints_without_epoch_step_read_as_epoch_ends(tmp_path):
    cfg = load_config("tiny", ["model.num_classes=3"])
    write_checkpoint(tmp_path / "c", snapshot(model=build_model(cfg), epoch=1, step=4, config=cfg, classes=["a", "b"]))
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    del meta["epoch_step"]
    (tmp_path / "c" / "meta.json").write_text(json.dumps(meta))
    assert load_checkpoint(tmp_path / "c").epoch_step == 0


def test_config_refuses_negative_intervals():
    with pytest.raises(ConfigError, match="train.checkpoint_every_iters"):
        load_config("tiny", ["train.checkpoint_every_iters=-1"])
    with pytest.raises(ConfigError, match="train.checkpoint_every_minutes"):
        load_config("tiny", ["train.checkpoint_every_minutes=-0.5"])


def test_latest_checkpoint_orders_by_step(tmp_path):
    cfg = load_config("tiny", ["model.num_classes=3"])
    model = build_model(cfg)
    for name, epoch, step in [("checkpoint-epoch-0002", 2, 12), ("checkpoint-epoch-0002-iter-0000015", 2, 15),
                              ("checkpoint-epoch-0001", 1, 6)]:
        write_checkpoint(tmp_path / name, snapshot(model=model, epoch=epoch, step=step, config=cfg, classes=["a", "b"]))
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint-epoch-0002-iter-0000015"


# ---------------------------------------------------------------------------------------------
# the run


def test_resumed_mid_epoch_run_ends_with_the_unbroken_runs_weights(shards, tmp_path):
    """The CPU augmentation path, with a loader worker (the device path's loader passes over the
    same way: test_skip_next_yields_the_unbroken_pass_from_that_batch)."""
    cfg = _cfg(2, **{"train.checkpoint_every_iters": 4, "train.augment_on": "cpu"})
    unbroken = _Recorder(tmp_path / "unbroken")
    run_training(cfg, _options(shards, loader_workers=1), report=unbroken)
    # mid-epoch at iterations 4 and 8 (epoch 2, step 2), 12 is the last epoch's end
    mid = [m for m in unbroken.metrics if m.get("epoch_step")]
    assert [(m["epoch"], m["step"], m["epoch_step"]) for m in mid] == [(0, 4, 4), (1, 8, 2)]
    assert [m["epoch"] for m in unbroken.metrics if not m.get("epoch_step")] == [1, 2]
    checkpoint = load_checkpoint(unbroken.saved[2])  # (1, 8, 2): 2 batches into the second epoch
    assert (checkpoint.epoch, checkpoint.step, checkpoint.epoch_step) == (1, 8, 2)

    resumed = _Recorder(tmp_path / "resumed")
    torch.manual_seed(12345)  # nothing of this process's RNG may leak into the resumed run
    run_training(cfg, _options(shards, loader_workers=1), report=resumed, resume=checkpoint)
    assert [m["epoch"] for m in resumed.metrics] == [2]  # the rest of epoch 2, no mid-epoch one left
    assert resumed.metrics[-1]["step"] == 12
    final_a, final_b = load_checkpoint(unbroken.saved[-1]).model, load_checkpoint(resumed.saved[-1]).model
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


def test_time_rule_checkpoints_at_log_points(shards, tmp_path):
    recorder = _Recorder(tmp_path)
    # any time at all has passed at every log point (every 2 steps): a checkpoint each time
    run_training(_cfg(1, **{"train.checkpoint_every_minutes": 1e-9}), replace(_options(shards), log_every=2),
                 report=recorder)
    assert [m["step"] for m in recorder.metrics] == [2, 4, STEPS]
    assert [bool(m.get("epoch_step")) for m in recorder.metrics] == [True, True, False]
