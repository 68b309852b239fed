"""MobileNet feature extractors: MobileNetV1-SSD and MobileNetV2-SSDLite.

MobileNetV1-SSD follows the widely used pytorch-ssd (qfgaohao) ``mobilenetv1_ssd``: sources at
conv11 (stride 16, 512 ch) and conv13 (stride 32, 1024 ch), then four 1x1 -> 3x3/2 extras.
MobileNetV2-SSDLite follows Sandler et al. 2018 ("MobileNetV2", section 6.2): the first source is
the expansion layer of block 14 (stride 16), the second the last 1x1 conv (1280 ch), then
inverted-residual extras.
"""

from __future__ import annotations

import torchvision
from torch import Tensor, nn
from torchvision.models.mobilenetv2 import InvertedResidual

from ssd.models.base import FeatureExtractor
from ssd.models.layers import conv_bn_relu, kaiming_init_, scale_channels, xavier_init_

# MobileNetV1 (Howard et al. 2017, table 1): (output channels, stride) of the 13 depthwise-
# separable blocks after the stride-2 3x3 stem of 32 channels.
_MOBILENET_V1: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1),  # conv7..conv11: stride 16
    (1024, 2), (1024, 1),  # conv12, conv13: stride 32
)  # fmt: skip
#: backbone blocks up to and including conv11 (the stem is block 0): the stride-16 source
V1_CONV11_END = 12


def depthwise_separable(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv + BN + ReLU, then 1x1 pointwise conv + BN + ReLU (MobileNetV1 fig. 3).

    One flat Sequential (indices 0-5), the layout of pytorch-ssd's ``conv_dw`` so its ImageNet
    checkpoints load.
    """
    return nn.Sequential(
        *conv_bn_relu(in_channels, in_channels, 3, stride=stride, groups=in_channels),
        *conv_bn_relu(in_channels, out_channels, 1),
    )


def mobilenet_v1(width_mult: float = 1.0) -> nn.Sequential:
    """The MobileNetV1 conv trunk (no pooling/classifier): (B, 3, S, S) -> (B, 1024*w, S/32, S/32)."""
    channels = scale_channels(32, width_mult)
    blocks: list[nn.Module] = [conv_bn_relu(3, channels, 3, stride=2)]
    for out, stride in _MOBILENET_V1:
        out = scale_channels(out, width_mult)
        blocks.append(depthwise_separable(channels, out, stride))
        channels = out
    trunk = nn.Sequential(*blocks)
    kaiming_init_(trunk)
    return trunk


def _extra_v1(in_channels: int, mid: int, out_channels: int) -> nn.Sequential:
    """pytorch-ssd extra: 1x1 reduce + ReLU, 3x3 stride-2 conv + ReLU (no BN)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel_size=3, stride=2, padding=1),
        nn.ReLU(inplace=True),
    )


class MobileNetV1Features(FeatureExtractor):
    """MobileNetV1 + SSD extras -> 6 maps (19, 10, 5, 3, 2, 1 for a 300 input).

    Channels at width 1: 512, 1024, 512, 256, 256, 256.
    """

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = mobilenet_v1(width_mult)
        last = scale_channels(1024, width_mult)
        self.extras = nn.ModuleList(
            [
                _extra_v1(last, 256, 512),
                _extra_v1(512, 128, 256),
                _extra_v1(256, 128, 256),
                _extra_v1(256, 128, 256),
            ]
        )
        xavier_init_(self.extras)

    def convert_backbone_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # pytorch-ssd's ImageNet MobileNetV1 keeps the trunk under "model." beside an "fc" layer.
        if not any(k.startswith("model.") for k in state):
            return dict(state)
        return {k.removeprefix("model."): v for k, v in state.items() if not k.startswith("fc.")}

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) -> list of source maps (B, C_l, f_l, f_l)."""
        x = images
        sources: list[Tensor] = []
        for index, block in enumerate(self.backbone):
            if index == V1_CONV11_END:
                sources.append(x)  # conv11, stride 16
            x = block(x)
        sources.append(x)  # conv13, stride 32
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources


#: torchvision ``mobilenet_v2().features`` index of the block whose expansion output is a source
V2_SOURCE_BLOCK = 14


class MobileNetV2LiteFeatures(FeatureExtractor):
    """MobileNetV2 + SSDLite extras -> 6 maps (19, 10, 5, 3, 2, 1 for a 300 input).

    Channels at width 1: 576, 1280, 512, 256, 256, 64. The backbone is torchvision's
    ``mobilenet_v2(width_mult=w).features``, so its ImageNet state dict loads.
    """

    def __init__(self, width_mult: float = 1.0) -> None:
        super().__init__()
        self.backbone = torchvision.models.mobilenet_v2(
            weights=None, width_mult=width_mult
        ).features
        block = self.backbone[V2_SOURCE_BLOCK]
        # The source is taken inside this block; that is only valid without a residual branch.
        if not isinstance(block, InvertedResidual) or block.use_res_connect:
            raise RuntimeError(
                "mobilenet_v2 block 14 is expected to be a stride-2 InvertedResidual"
            )
        last = self.backbone[-1].out_channels  # 1280 * max(1, w)
        # Section 6.2 / pytorch-ssd mobilenetv2_ssd_lite: inverted residual extras (stride 2) with
        # expansion ratios 0.2, 0.25, 0.5, 0.25 (i.e. 1x1 reduce -> 3x3 dw/2 -> 1x1 linear).
        self.extras = nn.ModuleList(
            [
                InvertedResidual(last, 512, stride=2, expand_ratio=0.2),  # type: ignore[arg-type]
                InvertedResidual(512, 256, stride=2, expand_ratio=0.25),  # type: ignore[arg-type]
                InvertedResidual(256, 256, stride=2, expand_ratio=0.5),  # type: ignore[arg-type]
                InvertedResidual(256, 64, stride=2, expand_ratio=0.25),  # type: ignore[arg-type]
            ]
        )
        xavier_init_(self.extras)

    def convert_backbone_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        # torchvision's mobilenet_v2 state dict: "features.N.*" plus the ImageNet "classifier".
        if not any(k.startswith("features.") for k in state):
            return dict(state)
        return {
            k.removeprefix("features."): v
            for k, v in state.items()
            if not k.startswith("classifier.")
        }

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) -> list of source maps (B, C_l, f_l, f_l)."""
        x = images
        for block in self.backbone[:V2_SOURCE_BLOCK]:
            x = block(x)
        conv = self.backbone[V2_SOURCE_BLOCK].conv
        expanded = conv[0](x)  # 1x1 expansion + BN + ReLU6 at stride 16
        sources = [expanded]
        x = conv[1:](expanded)  # rest of the stride-2 block (no residual, checked in __init__)
        for block in self.backbone[V2_SOURCE_BLOCK + 1 :]:
            x = block(x)
        sources.append(x)  # last 1x1 conv, stride 32
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources
