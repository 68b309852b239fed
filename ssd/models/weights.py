"""Loading pretrained weights into an SSD's backbone.

The dependency on the model is one-way: ``ssd.models.ssd`` imports this module, and this module
only needs the model's feature extractor (``ssd.models.base``), described by :class:`HasBackbone`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ssd.models.base import FeatureExtractor

log = logging.getLogger(__name__)


def read_state_dict(source: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a local file or an http(s) URL (cached by ``torch.hub``).

    Read with ``weights_only=True``. A checkpoint that wraps its weights in a single
    ``{"state_dict": ...}`` or ``{"model": ...}`` entry is unwrapped.
    """
    name = os.fspath(source)
    try:
        if name.startswith(("http://", "https://")):
            obj: Any = torch.hub.load_state_dict_from_url(
                name, map_location="cpu", weights_only=True
            )
        else:
            path = Path(name).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file not found: {path}")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # unpickling errors come in many types; name the file in all
        raise ValueError(f"could not read backbone weights {name}: {err}") from err
    if isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"backbone weights {name}: expected a state dict (names -> tensors), "
            f"got {type(obj).__name__}"
        )
    return dict(obj)


class HasBackbone(Protocol):
    """What :func:`load_backbone_weights` needs of a model (``ssd.models.SSD`` has both)."""

    features: FeatureExtractor  # its ``backbone`` is what the weights load into
    arch: str  # named in error messages


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_backbone_weights(model: HasBackbone, source: str | os.PathLike[str]) -> None:
    """Copy a state dict from ``source`` into ``model.features.backbone`` (nothing else changes).

    The feature extractor first maps known foreign layouts onto its own keys (torchvision's
    ``vgg16`` / ``mobilenet_v2``, pytorch-ssd's MobileNetV1). Then loading is strict: unexpected
    keys, missing keys (other than the extractor's ``optional_backbone_keys``) and shape
    mismatches raise a ValueError that names the file and the keys.
    """
    name = os.fspath(source)
    state = read_state_dict(source)
    try:
        state = model.features.convert_backbone_state_dict(state)
    except ValueError as err:
        raise ValueError(f"backbone weights {name}: {err}") from None
    backbone = model.features.backbone
    target = backbone.state_dict()
    optional = model.features.optional_backbone_keys
    unexpected = sorted(set(state) - set(target))
    missing = sorted(set(target) - set(state) - optional)
    mismatched = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(target[k].shape)})"
        for k in sorted(set(state) & set(target))
        if state[k].shape != target[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise ValueError(
            f"backbone weights {name} do not fit the {model.arch} backbone: " + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=False)
    kept = sorted(optional - set(state))
    log.info(
        "loaded %d backbone tensors from %s%s",
        len(state),
        name,
        f"; left at init: {_listing(kept)}" if kept else "",
    )
