"""Training checkpoints: one directory per checkpoint, written atomically, loaded weights-only.

Layout of a checkpoint directory (ARCHITECTURE.md, "Contracts")::

    model.pt       the model's state dict (unwrapped from DDP / torch.compile)
    training.pt    optimizer, LR scheduler and grad-scaler states, torch RNG state
    meta.json      epoch, global step, steps into the next epoch, class names, metrics, format version
    config.yaml    the resolved run config (``pipelines/train.py --config`` accepts it)

Atomic: everything is written into a hidden sibling folder, flushed to disk, and renamed into
place, so a reader sees either the whole previous checkpoint or the whole new one, never a torn
mix (a crash mid-write leaves only the hidden folder). Loading uses ``torch.load(...,
weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ssd.config import Config, ConfigError, config_from_dict

FORMAT_VERSION = 1
#: what a model needs to be rebuilt for inference; ``training.pt`` (optimizer state: as large as
#: the model again) only matters for resuming
INFERENCE_FILES = ("model.pt", "meta.json", "config.yaml")
#: the keys of ``training.pt``
TRAINING_STATES = ("optimizer", "scheduler", "scaler", "rng")


class CheckpointError(ValueError):
    """A file of a checkpoint folder that this project did not write (corrupt, foreign or crafted).

    A ValueError, as before: callers that catch ValueError around ``load_checkpoint`` still do.
    """


@dataclass
class Checkpoint:
    """What ``load_checkpoint`` returns; states are plain dicts ready for ``load_state_dict``."""

    model: dict[str, Any]
    epoch: int
    step: int
    config: Config
    classes: list[str]
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    rng: torch.Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    #: run bookkeeping that is not training state (e.g. the MLflow run id)
    extra: dict[str, Any] = field(default_factory=dict)
    #: batches of epoch ``epoch`` (0-based) already trained: 0 at an epoch's end, more in a
    #: checkpoint taken mid-epoch (``train.checkpoint_every_iters`` / ``_minutes``)
    epoch_step: int = 0


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and/or ``torch.compile`` (``._orig_mod``)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@dataclass
class TrainingState:
    """Everything a checkpoint holds, as host (CPU) copies taken at one instant: what
    ``snapshot`` returns and ``write_checkpoint`` writes. Training may go on changing the live
    model and optimizer while another thread writes a snapshot (``ssd.train_hooks``)."""

    model: dict[str, Any]
    training: dict[str, Any]
    meta: dict[str, Any]
    config_yaml: str


def host_copy(value: Any) -> Any:
    """``value`` (nested dicts, lists and tuples of tensors and plain values) with every tensor
    copied to host memory: a copy even of a CPU tensor, so that later in-place updates of the
    live one do not reach it."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(host_copy(v) for v in value)
    return value


def snapshot(
    *,
    model: nn.Module,
    epoch: int,
    step: int,
    config: Config,
    classes: list[str] | tuple[str, ...],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    epoch_step: int = 0,
) -> TrainingState:
    """Host copies of the training state now (``save_checkpoint``'s arguments); on CUDA the
    copies wait for the device once, here, and never again."""
    training = {
        "optimizer": host_copy(optimizer.state_dict()) if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": torch.get_rng_state(),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "epoch": int(epoch),
        "step": int(step),
        "epoch_step": int(epoch_step),
        "classes": list(classes),
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "extra": dict(extra or {}),
    }
    return TrainingState(host_copy(unwrap(model).state_dict()), training, meta, config.to_yaml())


def write_checkpoint(path: str | Path, state: TrainingState) -> Path:
    """Write ``state`` as a checkpoint directory at ``path`` atomically (replacing one there);
    safe to call from a background thread."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(state.model, tmp / "model.pt")
    torch.save(state.training, tmp / "training.pt")
    (tmp / "meta.json").write_text(json.dumps(state.meta, indent=2, sort_keys=True))
    (tmp / "config.yaml").write_text(state.config_yaml)
    _fsync_tree(tmp)
    if path.exists():  # swap: the old one is renamed away first, then deleted
        old = path.parent / f".{path.name}.old-{os.getpid()}-{threading.get_ident()}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)
    return path


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """Write a checkpoint directory at ``path`` atomically (replacing one already there): the
    keyword arguments of :func:`snapshot`.

    ``epoch`` is the number of epochs completed and ``epoch_step`` the steps done in the next
    one (0 at an epoch's end): a run resumed from it starts at epoch ``epoch`` (0-based), after
    ``epoch_step`` batches of it, with the optimizer, scheduler and RNG exactly as they were.
    """
    return write_checkpoint(path, snapshot(**state))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint directory written by ``save_checkpoint`` (weights only, no pickled code).

    Raises FileNotFoundError when a file is missing, CheckpointError (a ValueError) with a
    one-line message naming the file when one is not what ``save_checkpoint`` writes.
    """
    path = Path(path)
    missing = [name for name in INFERENCE_FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a complete checkpoint: missing {', '.join(missing)}")
    meta = _read_meta(path / "meta.json")
    training: dict[str, Any] = dict.fromkeys(TRAINING_STATES)
    if (path / "training.pt").is_file():  # absent from an inference copy (``inference_copy``)
        training = _torch_load(path / "training.pt", map_location)
        if not isinstance(training, dict) or not set(training) >= set(TRAINING_STATES):
            raise CheckpointError(f"{path / 'training.pt'}: not a checkpoint of this project "
                                  f"(not a dict of {', '.join(TRAINING_STATES)})")
    model = _torch_load(path / "model.pt", map_location)
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path / 'model.pt'}: not a checkpoint of this project "
                              "(not a state dict of tensors)")
    config = _read_config(path / "config.yaml")
    return Checkpoint(
        model=model,
        epoch=meta["epoch"],
        step=meta["step"],
        config=config,
        classes=meta["classes"],
        optimizer=training["optimizer"],
        scheduler=training["scheduler"],
        scaler=training["scaler"],
        rng=training["rng"],
        metrics=meta["metrics"],
        extra=meta.get("extra", {}),
        epoch_step=int(meta.get("epoch_step", 0)),  # absent from checkpoints before mid-epoch ones
    )


def _read_mapping(file: Path, kind: str) -> dict[str, Any]:
    """The top-level mapping of a JSON or YAML (``kind``) file of a checkpoint."""
    parse, errors, mapping = ((json.loads, json.JSONDecodeError, "a JSON object") if kind == "JSON"
                              else (yaml.safe_load, yaml.YAMLError, "a YAML mapping"))
    try:
        data = parse(file.read_text())
    except (UnicodeDecodeError, errors):
        raise CheckpointError(f"{file}: not a checkpoint of this project (not {kind})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: not a checkpoint of this project (not {mapping})")
    return data


def _read_meta(file: Path) -> dict[str, Any]:
    meta = _read_mapping(file, "JSON")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version {meta.get('format_version')!r} is not {FORMAT_VERSION}"
        )
    missing = [key for key in ("epoch", "step", "classes", "metrics") if key not in meta]
    if missing:
        raise CheckpointError(f"{file}: not a checkpoint of this project (no {', '.join(missing)})")
    return meta


def _read_config(file: Path) -> Config:
    data = _read_mapping(file, "YAML")
    try:
        return config_from_dict(data)
    except ConfigError as err:  # e.g. a value that a newer version of ssd.config refuses
        raise CheckpointError(f"{file}: {err}") from None


def _torch_load(file: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``, with a one-line CheckpointError for a file it refuses.

    The weights-only unpickler never runs code from the file. What it refuses (a pickle naming a
    function or class, random bytes, a zip that is no torch archive, a truncated file) comes out
    of torch as a 20-line UnpicklingError, or a RuntimeError, EOFError, KeyError, OSError...
    """
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol 4 in the checkpoint": noise before the refusal below
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(file, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise  # about the file system, not the content
    except pickle.UnpicklingError as err:
        reason = f"unsupported pickle content, refused by the weights only loader{_detail(err)}"
    except RuntimeError as err:
        if "deserialize object on" in str(err):
            raise  # not about the file: a CUDA map_location on a machine without that device
        reason = f"not a torch file{_detail(err)}"
    except (EOFError, KeyError, IndexError, ValueError, TypeError, AttributeError, OSError,
            struct.error, AssertionError) as err:
        # what torch's readers raise on other content they cannot parse (found by fuzzing)
        reason = f"not a torch file: {type(err).__name__}{_detail(err)}"
    raise CheckpointError(f"{file}: not a checkpoint of this project ({reason})")


def _detail(err: BaseException) -> str:
    """': <what torch says is wrong, in one short line>', or '' if it says nothing."""
    text = str(err)
    # The weights-only refusal buries its reason among advice: after "WeightsUnpickler error:",
    # or on the line that names the refused GLOBAL.
    _, marker, after = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (after if marker else text).splitlines() if line.strip()]
    line = ([line for line in lines if "GLOBAL" in line] or lines or [""])[0]
    line = re.sub(r"^\[enforce fail at [^]]*\][\s.]*", "", line)  # a C++ assertion's location
    line = line.split(". ")[0].rstrip(".")[:160]  # the first sentence
    return f": {line}" if line else ""


def inference_copy(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint's inference files (no optimizer state) into a new folder ``dst``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for name in INFERENCE_FILES:
        shutil.copy2(src / name, dst / name)
    return dst


def restore(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> None:
    """Load a checkpoint's states into live objects (the model may be DDP-wrapped)."""
    unwrap(model).load_state_dict(checkpoint.model)
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        state = getattr(checkpoint, name)
        if target is not None:
            if state is None:
                raise ValueError(f"the checkpoint holds no {name} state to restore")
            target.load_state_dict(state)
    if restore_rng and checkpoint.rng is not None:
        torch.set_rng_state(checkpoint.rng)


def _fsync_tree(directory: Path) -> None:
    for file in directory.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
