"""Checkpoints: atomic directories, weights-only loading, and a resumed run equal to an unbroken one."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from ssd.checkpoint import CheckpointError, load_checkpoint, restore, save_checkpoint, unwrap
from ssd.config import load_config
from ssd.data.synthetic import CLASSES, SyntheticDetection
from ssd.engine import StepRunner, build_optimizer, build_scheduler, collate
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


def _epoch(trainer: StepRunner, data) -> None:
    # augmentation draws from the global RNG, so the restored RNG state must reproduce it
    batches = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate)
    trainer.train_epoch(batches)


def test_resumed_training_equals_unbroken_training(tmp_path):
    cfg, data, model, optimizer, scheduler = _setup()
    trainer = StepRunner(model, cfg, optimizer, scheduler, "cpu")
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
        resumed = StepRunner(model2, cfg2, optimizer2, scheduler2, "cpu")
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
    # a pickle that names a function is refused by the weights-only loader, in one line
    torch.save({"f": print}, tmp_path / "c" / "model.pt")
    with pytest.raises(CheckpointError, match=r"model\.pt: .*weights only loader: .*GLOBAL print") as err:
        load_checkpoint(tmp_path / "c")
    assert "\n" not in str(err.value)


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


# --- crafted files: refused without running anything, with one line that names the file --------

class _RunsCode:
    """Unpickling this runs a shell command (``os.system``): what a malicious model.pt holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    cfg = load_config("tiny", ["model.num_classes=3"])
    path = tmp_path_factory.mktemp("ckpt") / "c"
    return save_checkpoint(path, model=build_model(cfg), epoch=1, step=4, config=cfg, classes=["a", "b"])


def _with(saved: Path, tmp_path: Path, name: str, content: bytes) -> Path:
    """A copy of the saved checkpoint with ``name`` replaced by ``content``."""
    folder = tmp_path / "crafted"
    folder.mkdir()
    for file in saved.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / name).write_bytes(content)
    return folder


def _refused(folder: Path, name: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    message = str(err.value)
    assert isinstance(err.value, ValueError)  # what the pipelines catch around load_checkpoint
    assert "\n" not in message and len(message) < 400
    assert message.startswith(f"{folder / name}: not a checkpoint of this project (")
    return message


def _torch_zip(pickled: bytes) -> bytes:
    """A torch-format zip archive whose data.pkl is ``pickled``."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("wrap", ["raw pickle", "torch zip"])
def test_a_pickle_that_runs_code_is_refused_and_runs_nothing(saved, tmp_path, protocol, wrap):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker), protocol=protocol)
    # control: the payload does run code when unpickled without the weights-only loader
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    folder = _with(saved, tmp_path, "model.pt", _torch_zip(payload) if wrap == "torch zip" else payload)
    message = _refused(folder, "model.pt")
    assert not marker.exists()
    assert "unsupported pickle content, refused by the weights only loader" in message
    if protocol == 2:  # the opcode that names the callable is the one refused
        assert "GLOBAL posix.system" in message or "GLOBAL os.system" in message


@pytest.mark.parametrize("name", ["model.pt", "training.pt"])
def test_random_bytes_are_refused_in_one_line(saved, tmp_path, name):
    message = _refused(_with(saved, tmp_path, name, os.urandom(4096)), name)
    assert "weights only loader" in message or "not a torch file" in message


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "not a torch file: EOFError"),
        (b"hello world", "not a torch file"),
        (_torch_zip(b"")[:100], "not a torch file: PytorchStreamReader failed reading zip archive"),
    ],
    ids=["empty", "text", "truncated zip"],
)
def test_a_file_that_is_no_torch_file_is_refused(saved, tmp_path, content, reason):
    assert reason in _refused(_with(saved, tmp_path, "model.pt", content), "model.pt")


def test_a_zip_that_is_no_torch_archive_is_refused(saved, tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes.txt", "hello")
    message = _refused(_with(saved, tmp_path, "model.pt", buffer.getvalue()), "model.pt")
    assert "not a torch file: file in archive is not in a subdirectory: notes.txt" in message


def test_a_torch_file_that_is_not_a_state_dict_is_refused(saved, tmp_path):
    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    assert "(not a state dict of tensors)" in _refused(_with(saved, tmp_path, "model.pt", buffer.getvalue()),
                                                       "model.pt")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("meta.json", b"{", "not a checkpoint of this project (not JSON)"),
        ("meta.json", b'{"format_version": 1}', "not a checkpoint of this project (no epoch, step, classes, metrics)"),
        ("config.yaml", b"model: [", "not a checkpoint of this project (not YAML)"),
        ("config.yaml", b"- 1\n", "not a checkpoint of this project (not a YAML mapping)"),
        ("config.yaml", b"priors: {preset: tiny}\nloss: {neg_ratio: -1}\n", "loss.neg_ratio must be > 0, got -1"),
    ],
)
def test_bad_meta_or_config_is_a_one_line_checkpoint_error(saved, tmp_path, name, content, reason):
    folder = _with(saved, tmp_path, name, content)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder)
    assert str(err.value) == f"{folder / name}: {reason}"
