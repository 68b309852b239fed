"""The SSD module and ``build_model``: one factory per architecture holding the paper's layout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssd.coding import BoxCoding
from ssd.config import Config
from ssd.models.base import FeatureExtractor
from ssd.models.heads import SSDHead
from ssd.models.mobilenet import MobileNetV1Features, MobileNetV2LiteFeatures
from ssd.models.tiny import TinyFeatures
from ssd.models.vgg import VGG16Features, ssd300_extras, ssd512_extras
from ssd.models.weights import (
    IMAGENET,
    BackboneWeights,
    apply_backbone_weights,
    backbone_weights_for,
    is_location,
)
from ssd.priors import PriorSpec

log = logging.getLogger(__name__)


class SSD(nn.Module):
    """Single Shot MultiBox Detector: feature extractor + per-level prediction heads.

    Attributes:
        features: backbone + extras returning the source maps.
        head: the box-offset and class-logit predictors.
        coding: the priors the outputs are aligned with, and the box coder and matcher that
            go with them (``ssd.coding.BoxCoding``): training's targets and inference's
            decoding both come from here. Plain Python, not part of the state dict.
        num_classes: C, including the background class 0.
        arch: the architecture name it was built as.
    """

    def __init__(
        self,
        features: FeatureExtractor,
        head: SSDHead,
        coding: BoxCoding,
        num_classes: int,
        arch: str = "custom",
    ) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.coding = coding
        self.num_classes = num_classes
        self.arch = arch

    @property
    def prior_spec(self) -> PriorSpec:
        """The prior spec of :attr:`coding`."""
        return self.coding.spec

    @property
    def backbone(self) -> nn.Module:
        """The pretrainable classification network (what ``backbone_weights`` loads into)."""
        return self.features.backbone

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, S, S) float, S = prior_spec.image_size ->
        (loc offsets (B, P, 4), class logits (B, P, num_classes)), P = prior_spec.num_priors(),
        row p aligned with row p of ``coding.priors()``."""
        size = self.prior_spec.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(
                f"{self.arch} expects images of shape (B, 3, {size}, {size}) to match its "
                f"{self.prior_spec.num_priors()} priors, got {tuple(images.shape)}"
            )
        return self.head(self.features(images))


@dataclass(frozen=True)
class _Arch:
    features: Callable[[float], FeatureExtractor]  # width_mult -> extractor
    separable_heads: bool = False


def _vgg(extras: Callable[[], nn.ModuleList], arch: str) -> Callable[[float], FeatureExtractor]:
    def make(width_mult: float) -> FeatureExtractor:
        if width_mult != 1.0:
            raise ValueError(f"model.width_mult is not supported by {arch}, got {width_mult}")
        return VGG16Features(extras())

    return make


_ARCHS: dict[str, _Arch] = {
    "vgg16_ssd300": _Arch(_vgg(ssd300_extras, "vgg16_ssd300")),
    "vgg16_ssd512": _Arch(_vgg(ssd512_extras, "vgg16_ssd512")),
    "mobilenetv1_ssd": _Arch(MobileNetV1Features),
    "mobilenetv2_ssdlite": _Arch(MobileNetV2LiteFeatures, separable_heads=True),
    "tiny": _Arch(TinyFeatures),
}
ARCHITECTURES: tuple[str, ...] = tuple(_ARCHS)


def source_shapes(
    make_features: Callable[[float], FeatureExtractor], width_mult: float, image_size: int
) -> list[tuple[int, int, int]]:
    """(channels, height, width) of every source map for a square input, without any compute:
    the extractor is built and run on the meta device, which only propagates shapes."""
    with torch.device("meta"):
        probe = make_features(width_mult).eval()  # eval: BN accepts a 1x1 map of batch 1
        with torch.no_grad():
            maps = probe(torch.empty(1, 3, image_size, image_size))
    return [(int(m.shape[1]), int(m.shape[2]), int(m.shape[3])) for m in maps]


def resolve_backbone_weights(cfg: Config) -> BackboneWeights | None:
    """The backbone weights ``cfg.model.backbone_weights`` names, read, converted and checked
    for ``cfg.model.arch`` (None for ``none`` / null): what the run layer calls once, on the
    driver before any worker starts, and hands to ``build_model(cfg, backbone=...)``.

    ``imagenet`` comes from torchvision's cache (``$TORCH_HOME/hub/checkpoints``), downloaded
    there only when the network answers quickly; otherwise ``BackboneWeightsUnavailable`` (a
    ValueError, one line) within a few seconds. A file that does not fit the architecture, has
    NaN/Inf tensors, or an ``augment`` normalisation that conflicts with the weights' input
    convention (``ssd.config.ConfigError``) is refused naming the tensor or the keys. Nothing
    is built but the feature extractor on the meta device (shapes only).
    """
    arch = _ARCHS.get(cfg.model.arch)
    if arch is None:
        raise ValueError(f"unknown model.arch {cfg.model.arch!r}; known: {ARCHITECTURES}")
    with torch.device("meta"):
        features = arch.features(cfg.model.width_mult)
    return backbone_weights_for(cfg, features)


def build_model(cfg: Config, backbone: BackboneWeights | None = None) -> SSD:
    """The SSD named by ``cfg.model.arch`` with heads for ``cfg.priors``.

    Backbone weights: ``backbone`` (from :func:`resolve_backbone_weights`, e.g. resolved on the
    driver and shipped to the workers) is loaded into the backbone after checking that its input
    convention is the config's. Without it, a file named by ``model.backbone_weights`` (path,
    URL, ``s3://``) is read and loaded here through the same code; ``imagenet`` is NOT fetched
    or read (tests and benchmarks build these architectures all the time): the model keeps its
    initialisation, as with ``none``.

    Raises ValueError for an unknown arch, fewer than 2 classes, a prior spec whose
    ``feature_maps`` differ from the sizes the architecture produces at ``image_size``, or
    weights that do not fit.
    """
    model_cfg, spec = cfg.model, cfg.priors
    if model_cfg.arch not in _ARCHS:
        raise ValueError(f"unknown model.arch {model_cfg.arch!r}; known: {ARCHITECTURES}")
    if model_cfg.num_classes < 2:
        raise ValueError(
            f"model.num_classes counts the background class too, so must be >= 2, "
            f"got {model_cfg.num_classes}"
        )
    if not model_cfg.width_mult > 0:
        raise ValueError(f"model.width_mult must be positive, got {model_cfg.width_mult}")
    arch = _ARCHS[model_cfg.arch]
    try:
        shapes = source_shapes(arch.features, model_cfg.width_mult, spec.image_size)
    except (RuntimeError, ValueError) as err:  # e.g. an input too small for the strides
        raise ValueError(
            f"{model_cfg.arch} cannot process a {spec.image_size}x{spec.image_size} input: {err}"
        ) from None
    actual = tuple(h if h == w else (h, w) for _, h, w in shapes)
    if actual != tuple(spec.feature_maps):
        raise ValueError(
            f"prior spec {spec.name!r} does not fit {model_cfg.arch}: at image_size "
            f"{spec.image_size} the architecture's feature maps are {actual}, but "
            f"priors.feature_maps is {tuple(spec.feature_maps)}"
        )
    head = SSDHead(
        [c for c, _, _ in shapes],
        spec.boxes_per_location(),
        model_cfg.num_classes,
        separable=arch.separable_heads,
    )
    model = SSD(
        arch.features(model_cfg.width_mult), head, BoxCoding.from_config(cfg), model_cfg.num_classes,
        model_cfg.arch,
    )
    if backbone is None and is_location(model_cfg.backbone_weights):
        backbone = backbone_weights_for(cfg, model.features)
    elif backbone is None and model_cfg.backbone_weights == IMAGENET:
        log.info(
            "%s: model.backbone_weights=imagenet is not loaded by build_model(cfg) (backbone left "
            "at init); the run layer passes backbone=resolve_backbone_weights(cfg)", model_cfg.arch
        )
    if backbone is not None:
        wanted = cfg.augment.input_convention or "rgb"
        if backbone.input_convention != wanted:
            raise ValueError(
                f"backbone weights {backbone.source} take {backbone.input_convention} input, "
                f"but this config normalises for {wanted} (augment.input_convention)"
            )
        apply_backbone_weights(model, backbone)
    return model
