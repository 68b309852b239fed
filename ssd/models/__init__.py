"""SSD models: ``build_model(cfg)`` and the architectures it knows (``ARCHITECTURES``).

Example::

    >>> cfg = load_config("ssd300_vgg16")
    >>> weights = resolve_backbone_weights(cfg)  # once, on the driver: ImageNet VGG16, decimated
    >>> model = build_model(cfg, backbone=weights)  # build_model(cfg) alone keeps the init
    >>> loc, logits = model(images)  # (B, P, 4), (B, P, C), rows aligned with model.coding.priors()
"""

from ssd.models.heads import SSDHead
from ssd.models.ssd import ARCHITECTURES, SSD, build_model, resolve_backbone_weights
from ssd.models.weights import BackboneWeights, BackboneWeightsUnavailable, load_backbone_weights

__all__ = [
    "ARCHITECTURES",
    "SSD",
    "BackboneWeights",
    "BackboneWeightsUnavailable",
    "SSDHead",
    "build_model",
    "load_backbone_weights",
    "resolve_backbone_weights",
]
