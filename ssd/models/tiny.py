"""A tiny SSD feature extractor for CPU tests and the demo (not from a paper).

Plain 3x3 conv + BN + ReLU stages; for a 128 input the sources are 16, 8, 4, 2, 1 (strides 8 to
128). BN everywhere so it trains quickly from scratch with a large learning rate.
"""

from __future__ import annotations

from torch import Tensor, nn

from ssd.models.base import FeatureExtractor
from ssd.models.layers import conv_bn_relu, kaiming_init_, scale_channels, xavier_init_


class TinyFeatures(FeatureExtractor):
    """Backbone: 4 stride-2 stages (strides 2, 4, 8, 16), sources after the last two; extras:
    three 1x1 -> 3x3/2 blocks. Channels at width 1: 64, 96, 96, 96, 96 (about 0.83M parameters
    with 21 classes, most of them in the heads)."""

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        c16, c32, c48, c64, c96 = (scale_channels(c, width_mult) for c in (16, 32, 48, 64, 96))
        self.backbone = nn.Sequential(
            conv_bn_relu(3, c16, stride=2),  # stride 2
            conv_bn_relu(c16, c32, stride=2),  # stride 4
            nn.Sequential(conv_bn_relu(c32, c64, stride=2), conv_bn_relu(c64, c64)),  # stride 8
            nn.Sequential(conv_bn_relu(c64, c96, stride=2), conv_bn_relu(c96, c96)),  # 16
        )
        self.extras = nn.ModuleList(
            nn.Sequential(conv_bn_relu(c96, c48, 1), conv_bn_relu(c48, c96, stride=2))
            for _ in range(3)
        )
        kaiming_init_(self.backbone)
        xavier_init_(self.extras)  # as the SSD references init their extras

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) -> source maps at strides 8, 16, 32, 64, 128."""
        x = images
        sources: list[Tensor] = []
        for index, stage in enumerate(self.backbone):
            x = stage(x)
            if index >= 2:
                sources.append(x)
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources
