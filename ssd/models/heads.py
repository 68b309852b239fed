"""SSD prediction heads: per source level, one conv for box offsets and one for class logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssd.models.layers import xavier_init_


def separable_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """SSDLite predictor (MobileNetV2 paper, section 6.2): every regular conv in the SSD prediction
    layers becomes a 3x3 depthwise conv + BN + ReLU6 followed by a 1x1 pointwise conv."""
    return nn.Sequential(
        nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU6(inplace=True),
        nn.Conv2d(in_channels, out_channels, 1),
    )


def _predictor(in_channels: int, out_channels: int, separable: bool) -> nn.Module:
    if separable:
        return separable_conv(in_channels, out_channels)
    # Paper section 2.1 ("convolutional predictors for detection"): a 3x3 conv per source map.
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)


def flatten_level(output: Tensor, k: int) -> Tensor:
    """(B, A*k, H, W) head output -> (B, H*W*A, k) in the prior order of ``PriorSpec.generate``.

    Channel ``a*k + c`` at cell (i, j) holds value c of anchor a, so the output lands at row
    ``(i*W + j)*A + a``: cells row-major (row outer, column inner), anchors innermost.
    """
    b, _, h, w = output.shape
    return output.permute(0, 2, 3, 1).reshape(b, h * w * (output.shape[1] // k), k)  # (B,H,W,A*k)


class SSDHead(nn.Module):
    """Box-offset and class-logit predictors for every source level.

    Args:
        in_channels: channels C_l of each source map.
        num_anchors: priors per cell A_l of each level (``PriorSpec.boxes_per_location()``).
        num_classes: C, including the background class 0.
        separable: SSDLite depthwise-separable predictors instead of plain 3x3 convs.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int],
        num_classes: int,
        separable: bool = False,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(num_anchors):
            raise ValueError(
                f"SSDHead got {len(in_channels)} source levels but {len(num_anchors)} anchor counts"
            )
        self.num_classes = num_classes
        self.num_anchors = tuple(num_anchors)
        self.loc = nn.ModuleList(
            _predictor(c, a * 4, separable) for c, a in zip(in_channels, num_anchors)
        )
        self.conf = nn.ModuleList(
            _predictor(c, a * num_classes, separable) for c, a in zip(in_channels, num_anchors)
        )
        xavier_init_(self)

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """features: per level (B, C_l, H_l, W_l) -> (loc (B, P, 4), logits (B, P, num_classes))."""
        if len(features) != len(self.loc):
            raise ValueError(f"SSDHead expects {len(self.loc)} feature maps, got {len(features)}")
        loc = [flatten_level(layer(x), 4) for layer, x in zip(self.loc, features)]
        conf = [flatten_level(layer(x), self.num_classes) for layer, x in zip(self.conf, features)]
        return torch.cat(loc, dim=1), torch.cat(conf, dim=1)
