"""The interface every SSD feature extractor implements."""

from __future__ import annotations

from torch import Tensor, nn


class FeatureExtractor(nn.Module):
    """A backbone plus extra layers that returns the SSD source feature maps.

    Subclasses set:

    * ``backbone``: the classification network that pretrained weights load into
      (``ssd.models.load_backbone_weights``); everything else (extras, L2Norm, heads) is new.
    * ``extras``: the layers SSD adds after the backbone (paper section 2.1, "multi-scale
      feature maps for detection").

    ``forward(images (B, 3, S, S)) -> list`` of source maps, level by level, each (B, C_l, f_l, f_l).
    """

    backbone: nn.Module
    extras: nn.ModuleList
    #: keys of ``backbone.state_dict()`` a weights file may lack; they keep their initialisation
    optional_backbone_keys: frozenset[str] = frozenset()

    def convert_backbone_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Map a foreign state dict (e.g. torchvision's ImageNet model) onto ``backbone`` keys.

        The default accepts ``backbone.state_dict()`` keys as they are. Keys this cannot place are
        returned unchanged so the loader reports them as unexpected. Raises ValueError for a
        recognised key whose tensor cannot be converted.
        """
        return dict(state)

    def forward(self, images: Tensor) -> list[Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
