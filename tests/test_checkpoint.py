"""Checkpoints: atomic directories, weights-only loading, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import json

import pytest
import torch

from ssd.checkpoint import load_checkpoint, restore, save_checkpoint, unwrap
from ssd.config import load_config
from ssd.data.synthetic import CLASSES, SyntheticDetection
from ssd.engine import Trainer, build_optimizer, build_scheduler, collate
from ssd.models import build_model
from ssd.transforms import build_transform


def _setup():
    cfg = load_config("tiny", [f"model.num_classes={len(CLASSES) + 1}", "train.batch_size=4", "optim.warmup_iters=2"])
    torch.manual_seed(0)
    tf = build_transform(cfg.priors.image_size, 0.5, train=True)
    data = SyntheticDetection(8, transform=tf)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 20)
    return cfg, data, model, optimizer, scheduler


def _epoch(trainer: Trainer, data) -> None:
    # augmentation draws from the global RNG, so the restored RNG state must reproduce it
    batches = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    trainer.train_epoch(batches)


def test_resumed_training_equals_unbroken_training(tmp_path):
    cfg, data, model, optimizer, scheduler = _setup()
    trainer = Trainer(model, cfg, optimizer, scheduler, "cpu")
    _epoch(trainer, data)
    save_checkpoint(tmp_path / "ckpt", model=model, epoch=1, step=trainer.iteration, config=cfg, classes=CLASSES,
                    optimizer=optimizer, scheduler=scheduler, metrics={"AP": 0.5})
    lr_at_save = optimizer.param_groups[0]["lr"]
    for _ in range(2):
        _epoch(trainer, data)
    unbroken = {k: v.clone() for k, v in model.state_dict().items()}

    def resume(restore_rng: bool) -> dict:
        cfg2, data2, model2, optimizer2, scheduler2 = _setup()  # a fresh process, as after a failure
        checkpoint = load_checkpoint(tmp_path / "ckpt")
        assert (checkpoint.epoch, checkpoint.step, checkpoint.classes) == (1, 2, list(CLASSES))
        assert checkpoint.config == cfg and checkpoint.metrics == {"AP": 0.5}
        restore(checkpoint, model2, optimizer2, scheduler2, restore_rng=restore_rng)
        assert scheduler2.last_epoch == 2 and optimizer2.param_groups[0]["lr"] == lr_at_save
        resumed = Trainer(model2, cfg2, optimizer2, scheduler2, "cpu")
        for _ in range(2):
            _epoch(resumed, data2)
        return model2.state_dict()

    assert all(torch.equal(value, unbroken[key]) for key, value in resume(restore_rng=True).items())
    # control: without the RNG state the shuffling and augmentation differ, and so do the weights
    assert not all(torch.equal(value, unbroken[key]) for key, value in resume(restore_rng=False).items())


def test_save_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    cfg, _, model, optimizer, _ = _setup()
    for epoch in (1, 2):
        save_checkpoint(tmp_path / "last", model=model, epoch=epoch, step=10 * epoch, config=cfg, classes=CLASSES,
                        optimizer=optimizer)
    assert json.loads((tmp_path / "last" / "meta.json").read_text())["epoch"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["config.yaml", "meta.json", "model.pt", "training.pt"]


def test_ddp_style_wrappers_are_unwrapped(tmp_path):
    cfg, _, model, _, _ = _setup()

    class Wrapper(torch.nn.Module):  # what DDP and torch.compile look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    assert unwrap(Wrapper(model)) is model
    save_checkpoint(tmp_path / "c", model=Wrapper(model), epoch=0, step=0, config=cfg, classes=CLASSES)
    keys = set(load_checkpoint(tmp_path / "c").model)
    assert keys == set(model.state_dict()) and not any(k.startswith("module.") for k in keys)


def test_incomplete_or_foreign_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="missing meta.json, config.yaml"):
        load_checkpoint(tmp_path / "half")
    cfg, _, model, _, _ = _setup()
    save_checkpoint(tmp_path / "c", model=model, epoch=0, step=0, config=cfg, classes=CLASSES)
    # a pickle that runs code is refused by the weights-only loader
    torch.save({"f": print}, tmp_path / "c" / "model.pt")
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_checkpoint(tmp_path / "c")


def test_inference_copy_loads_without_optimizer_state(tmp_path):
    from ssd.checkpoint import inference_copy

    cfg = load_config("tiny", ["model.num_classes=3"])
    model = build_model(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    full = save_checkpoint(tmp_path / "full", model=model, epoch=2, step=10, config=cfg, classes=["a", "b"],
                           optimizer=optimizer)
    copy = inference_copy(full, tmp_path / "copy")
    assert sorted(p.name for p in copy.iterdir()) == ["config.yaml", "meta.json", "model.pt"]
    loaded = load_checkpoint(copy)
    assert loaded.optimizer is None and loaded.rng is None and loaded.epoch == 2
    assert all(torch.equal(loaded.model[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="no optimizer state"):
        restore(loaded, build_model(cfg), optimizer)
