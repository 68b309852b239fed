"""Pretrained backbone weights: where they come from, checking them, loading them into an SSD.

``model.backbone_weights`` names the source:

* ``imagenet``: torchvision's published ImageNet weights for the architecture
  (:data:`PUBLISHED_WEIGHTS`), through torchvision's weights API: the weights enum's ``url``,
  cached like ``torch.hub`` does under ``torch.hub.get_dir()/checkpoints/<file name>``
  (``$TORCH_HOME/hub/checkpoints/``). A file already there is used as is; otherwise it is
  downloaded only if the network answers within :data:`PROBE_TIMEOUT_S`, else
  :class:`BackboneWeightsUnavailable` says which file to pre-stage where;
* a local path, an ``http(s)://`` URL (cached and probed the same way) or an object-store URI
  (``s3://...``, read with ``ssd.storage``), holding a state dict;
* ``none`` or null: train from scratch.

:func:`backbone_weights_for` is the one code path: read the file (sha256 of its bytes), refuse
non-finite tensors naming them, convert a foreign layout with the feature extractor
(torchvision's ``vgg16`` with fc6/fc7 decimated, ``mobilenet_v2``, pytorch-ssd's MobileNetV1) and
check that it fits the backbone (missing, unexpected and mis-shaped keys named). It returns a
:class:`BackboneWeights`, which :func:`apply_backbone_weights` copies into a model.
``ssd.models.resolve_backbone_weights(cfg)`` (the run layer's entry, called once on the driver)
and ``ssd.models.build_model(cfg, backbone=...)`` are built on them.

Each source declares its input convention (``augment.input_convention``): ``rgb`` for
torchvision's weights (RGB, pixels / 255, ImageNet mean and std), ``caffe_bgr`` for Caffe-style
weights such as ssd.pytorch's ``vgg16_reducedfc.pth`` (BGR, 0-255 pixels minus (104, 117, 123),
std 1). ``imagenet`` is always ``rgb``; for a file the config states it (``rgb`` when unset).

The dependency on the model is one-way: ``ssd.models.ssd`` imports this module, and this module
only needs the model's feature extractor (``ssd.models.base``), described by :class:`HasBackbone`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import socket
import threading
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

import torch
from torch import Tensor

from ssd.models.base import FeatureExtractor

if TYPE_CHECKING:
    from ssd.config import Config

log = logging.getLogger(__name__)

#: ``model.backbone_weights`` values that are not locations
IMAGENET, NONE = "imagenet", "none"
#: torchvision's published ImageNet weights per architecture (``Enum.MEMBER`` in
#: ``torchvision.models``); VGG16 with its classifier, whose fc6/fc7 become SSD's conv6/conv7
PUBLISHED_WEIGHTS: dict[str, str] = {
    "vgg16_ssd300": "VGG16_Weights.IMAGENET1K_V1",
    "vgg16_ssd512": "VGG16_Weights.IMAGENET1K_V1",
    "mobilenetv2_ssdlite": "MobileNet_V2_Weights.IMAGENET1K_V1",
}
#: why an architecture has no ``imagenet`` weights (named in the refusal)
NO_PUBLISHED_WEIGHTS: dict[str, str] = {
    "mobilenetv1_ssd": "torchvision has no MobileNetV1",
    "tiny": "it is this project's own small network",
}
#: the input conventions a weights source can declare (see the module docstring)
INPUT_CONVENTIONS = ("rgb", "caffe_bgr")
#: seconds the network may take to answer before a missing ``imagenet`` file is an error
PROBE_TIMEOUT_S = 2.0


class BackboneWeightsUnavailable(ValueError):
    """The weights cannot be had here (no cached file and no network): the message, one line,
    names the file looked for, the cache folder and the ways out."""


@dataclass(frozen=True, eq=False)
class BackboneWeights:
    """Backbone weights ready to load: what the driver resolves once and ships to the workers.

    Attributes:
        state: keys of ``model.features.backbone.state_dict()`` -> tensors (CPU), converted and
            checked against the architecture; a subset when the extractor's
            ``optional_backbone_keys`` (VGG's fc6/fc7) were absent from the file.
        source: a human description (the config value and the file read).
        sha256: hex digest of the file's bytes.
        input_convention: ``rgb`` or ``caffe_bgr`` (see the module docstring).
    """

    state: dict[str, Tensor] = field(repr=False)
    source: str
    sha256: str
    input_convention: str = "rgb"


def is_location(value: str | None) -> bool:
    """True when ``model.backbone_weights`` names a file (path, URL, URI), not a keyword."""
    return bool(value) and value not in (IMAGENET, NONE)


def published_weights(arch: str) -> Any:
    """torchvision's ``WeightsEnum`` member for ``arch``'s ``imagenet`` weights.

    Raises ValueError (one line) for an architecture without published weights.
    """
    name = PUBLISHED_WEIGHTS.get(arch)
    if name is None:
        why = NO_PUBLISHED_WEIGHTS.get(arch, "torchvision publishes none for it")
        raise ValueError(
            f"model.backbone_weights=imagenet: there are no published ImageNet weights for "
            f"{arch} ({why}); pass a weights file with model.backbone_weights=PATH|URL|s3://..., "
            f"or train from scratch with model.backbone_weights=none"
        )
    import torchvision.models

    enum_name, member = name.split(".")
    return getattr(getattr(torchvision.models, enum_name), member)


def hub_cache_dir() -> Path:
    """Where torchvision / ``torch.hub`` keep downloaded weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_file(url: str) -> Path:
    """The file ``torch.hub`` caches ``url`` as (its last path component, in the cache folder)."""
    return hub_cache_dir() / os.path.basename(urlparse(url).path)


def network_reachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host (or the proxy for its scheme) opens within
    ``timeout`` seconds. Bounded even when name resolution hangs (the probe runs in a daemon
    thread that is abandoned at the deadline)."""
    parts = urlparse(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy:
        parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    host = parts.hostname
    if not host:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, name="backbone-weights-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _unavailable(url: str, path: Path, what: str, reason: str) -> BackboneWeightsUnavailable:
    return BackboneWeightsUnavailable(
        f"{what}: {path.name} is not in the cache folder {path.parent} and {reason}; pre-stage "
        f"the file there (from {url}) or on shared storage and pass "
        f"model.backbone_weights=PATH|s3://..., or train from scratch with "
        f"model.backbone_weights=none"
    )


def fetch_to_cache(url: str, what: str, hash_prefix: str | None = None) -> Path:
    """The cached file of ``url``, downloaded first if absent and the network answers quickly.

    Raises :class:`BackboneWeightsUnavailable` (one line, within about ``PROBE_TIMEOUT_S``
    seconds when offline) naming the file, the cache folder and the ways out.
    """
    path = cached_file(url)
    if path.is_file():
        return path
    if not network_reachable(url):
        host = urlparse(url).hostname
        raise _unavailable(url, path, what, f"{host} cannot be reached (no network)")
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, path)
    try:  # to a temporary sibling, renamed into place when complete and its hash prefix checked
        torch.hub.download_url_to_file(url, str(path), hash_prefix, progress=False)
    except Exception as err:  # noqa: BLE001 - urllib and hash errors come in many types
        raise _unavailable(url, path, what, f"the download failed ({err})") from None
    return path


def _locate(value: str, arch: str) -> tuple[str, str]:
    """(location to read, description) of a ``model.backbone_weights`` value."""
    if value == IMAGENET:
        weights = published_weights(arch)
        name = f"torchvision {type(weights).__name__}.{weights.name}"
        match = torch.hub.HASH_REGEX.search(os.path.basename(urlparse(weights.url).path))
        path = fetch_to_cache(
            weights.url,
            f"model.backbone_weights=imagenet ({name}) for {arch}",
            match.group(1) if match else None,
        )
        return str(path), f"imagenet: {name} ({path})"
    if value.startswith(("http://", "https://")):
        path = fetch_to_cache(value, f"model.backbone_weights={value}")
        return str(path), f"{value} ({path})"
    return value, value


def _read_uri(location: str) -> bytes:
    """The bytes of an object-store file (``ssd.storage``; FileNotFoundError naming it)."""
    from ssd import storage

    try:
        return storage.read_bytes(location)
    except FileNotFoundError:
        raise
    except OSError as err:  # unreachable store, credentials: one line naming the URI
        raise BackboneWeightsUnavailable(
            f"backbone weights {location} cannot be read: {err}"
        ) from None


def _load_local(path: Path) -> tuple[Any, str]:
    """(torch.load of ``path``, sha256 of its bytes): memory-mapped when the file is in the zip
    format (a 528 MB VGG16 file is not copied), read whole otherwise (legacy format)."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # e.g. a legacy (non-zip) file, which cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj, digest.hexdigest()


def _read(location: str) -> tuple[dict[str, Tensor], str]:
    """(state dict, sha256 of the file) of a local path or object-store URI."""
    try:
        if "://" in location:
            data = _read_uri(location)
            digest = hashlib.sha256(data).hexdigest()
            obj: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            del data
        else:
            path = Path(location).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"backbone weights file not found: {path}")
            obj, digest = _load_local(path)
    except (FileNotFoundError, BackboneWeightsUnavailable):
        raise
    except Exception as err:  # unpickling errors come in many types; name the file in all
        raise ValueError(f"could not read backbone weights {location}: {err}") from err
    if isinstance(obj, Mapping) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"backbone weights {location}: expected a state dict (names -> tensors), "
            f"got {type(obj).__name__}"
        )
    return dict(obj), digest


def read_state_dict(source: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state dict from a local file, an object-store URI or an http(s) URL (cached like
    ``torch.hub``). Read with ``weights_only=True``; a checkpoint that wraps its weights in a
    single ``{"state_dict": ...}`` or ``{"model": ...}`` entry is unwrapped."""
    name = os.fspath(source)
    if name.startswith(("http://", "https://")):
        name = str(fetch_to_cache(name, f"backbone weights {name}"))
    return _read(name)[0]


def check_finite(state: Mapping[str, Tensor], name: str) -> None:
    """Raise ValueError naming the first tensor of ``state`` with NaN or Inf values."""
    for key, value in state.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        # A float sum is finite when every value is (fast); an overflowing sum is checked exactly.
        if math.isfinite(float(value.sum())):
            continue
        bad = int(value.numel() - torch.isfinite(value).sum())
        if bad:
            raise ValueError(
                f"backbone weights {name}: tensor {key} {tuple(value.shape)} has {bad} NaN/Inf "
                f"values; refusing a broken weights file"
            )


class HasBackbone(Protocol):
    """What :func:`apply_backbone_weights` needs of a model (``ssd.models.SSD`` has both)."""

    features: FeatureExtractor  # its ``backbone`` is what the weights load into
    arch: str  # named in error messages


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def fit_backbone_state(
    state: dict[str, Tensor], features: FeatureExtractor, arch: str, name: str
) -> dict[str, Tensor]:
    """``state`` converted to ``features.backbone``'s keys and checked against it.

    The feature extractor first maps known foreign layouts onto its own keys. Then the check is
    strict: unexpected keys, missing keys (other than the extractor's ``optional_backbone_keys``)
    and shape mismatches raise a ValueError that names the file and the keys. ``features`` may
    live on the meta device (only its keys and shapes are read).
    """
    try:
        state = features.convert_backbone_state_dict(state)
    except ValueError as err:
        raise ValueError(f"backbone weights {name}: {err}") from None
    target = features.backbone.state_dict()
    optional = features.optional_backbone_keys
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
            f"backbone weights {name} do not fit the {arch} backbone: " + "; ".join(problems)
        )
    return state


def read_backbone_weights(
    value: str | os.PathLike[str],
    features: FeatureExtractor,
    arch: str,
    input_convention: str = "rgb",
) -> BackboneWeights:
    """Read, check and convert the weights named by ``value`` (``imagenet``, a path, a URL or
    an object-store URI) for ``features``; see the module docstring."""
    if input_convention not in INPUT_CONVENTIONS:
        raise ValueError(f"unknown input convention {input_convention!r}: {INPUT_CONVENTIONS}")
    value = os.fspath(value)
    location, source = _locate(value, arch)
    state, digest = _read(location)
    check_finite(state, source)
    state = fit_backbone_state(state, features, arch, source)
    # Own memory, not the file's mapping (the file may change; the state travels to workers).
    state = {key: value.clone() for key, value in state.items()}
    return BackboneWeights(state, source, digest, input_convention)


def _stats_text(mean: tuple[float, ...], std: tuple[float, ...]) -> str:
    return f"mean {tuple(round(m, 5) for m in mean)}, std {tuple(round(s, 5) for s in std)}"


def check_input_convention(cfg: Config, convention: str, source: str) -> None:
    """Raise ConfigError when ``cfg.augment`` normalises otherwise than weights of
    ``convention`` need (an explicit ``augment.input_convention`` or ``augment.mean/std`` that
    conflicts with them), naming both."""
    from ssd.config import AugmentConfig, ConfigError

    augment = cfg.augment
    if augment.input_convention is not None and augment.input_convention != convention:
        raise ConfigError(
            f"augment.input_convention={augment.input_convention} conflicts with the backbone "
            f"weights {source}, which take {convention} input: drop augment.input_convention "
            f"or set it to {convention}"
        )
    mean, std = AugmentConfig.convention_stats(convention)
    close = all(
        math.isclose(a, b, rel_tol=1e-6) for a, b in zip((*augment.mean, *augment.std), (*mean, *std))
    )
    if not close:
        raise ConfigError(
            f"augment.mean/std ({_stats_text(augment.mean, augment.std)}) conflict with the "
            f"backbone weights {source}, which take {convention} input "
            f"({_stats_text(mean, std)}): drop augment.mean/std, or train from scratch with "
            f"model.backbone_weights=none"
        )


def backbone_weights_for(cfg: Config, features: FeatureExtractor) -> BackboneWeights | None:
    """The weights ``cfg.model.backbone_weights`` names, fitted to ``features`` (None for
    ``none`` / null), after checking that ``cfg.augment`` follows their input convention.

    ``imagenet`` weights are ``rgb``; a file's convention is ``augment.input_convention``
    (``rgb`` when unset).
    """
    value = cfg.model.backbone_weights
    if not value or value == NONE:
        return None
    convention = "rgb" if value == IMAGENET else (cfg.augment.input_convention or "rgb")
    label = f"model.backbone_weights={value}"
    if value == IMAGENET and cfg.model.width_mult != 1.0:
        from ssd.config import ConfigError

        raise ConfigError(
            f"{label}: torchvision's ImageNet weights for {cfg.model.arch} are for "
            f"model.width_mult=1.0, got {cfg.model.width_mult}; train this width from scratch "
            f"with model.backbone_weights=none"
        )
    check_input_convention(cfg, convention, label)  # before any download or read
    weights = read_backbone_weights(value, features, cfg.model.arch, convention)
    log.info(
        "backbone weights: %s, sha256 %s, %d tensors, input convention %s",
        weights.source, weights.sha256, len(weights.state), weights.input_convention,
    )
    return weights


def apply_backbone_weights(model: HasBackbone, weights: BackboneWeights) -> None:
    """Copy ``weights.state`` into ``model.features.backbone`` (nothing else changes), after
    checking again that it fits (weights resolved for another architecture are refused)."""
    state = fit_backbone_state(weights.state, model.features, model.arch, weights.source)
    model.features.backbone.load_state_dict(state, strict=False)
    kept = sorted(model.features.optional_backbone_keys - set(state))
    log.info(
        "loaded %d backbone tensors from %s%s",
        len(state),
        weights.source,
        f"; left at init: {_listing(kept)}" if kept else "",
    )


def load_backbone_weights(model: HasBackbone, source: str | os.PathLike[str]) -> None:
    """Read the weights at ``source`` (a path, URL or object-store URI, or ``imagenet``) and
    copy them into ``model.features.backbone``: :func:`read_backbone_weights` then
    :func:`apply_backbone_weights`, without the config's input-convention check."""
    apply_backbone_weights(model, read_backbone_weights(source, model.features, model.arch))
