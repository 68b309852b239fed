"""SSD models: ``build_model(cfg)`` and the architectures it knows (``ARCHITECTURES``).

Example::

    >>> model = build_model(load_config("ssd300_vgg16"))
    >>> loc, logits = model(images)  # (B, P, 4), (B, P, C), rows aligned with model.coding.priors()
"""

from ssd.models.heads import SSDHead
from ssd.models.ssd import ARCHITECTURES, SSD, build_model
from ssd.models.weights import load_backbone_weights

__all__ = ["ARCHITECTURES", "SSD", "SSDHead", "build_model", "load_backbone_weights"]
