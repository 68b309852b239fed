"""VGG16 feature extractor for SSD300 / SSD512 (Liu et al. 2016, "SSD: Single Shot MultiBox
Detector", arXiv:1512.02325v5).

The backbone is one ``nn.Sequential`` indexed exactly like ssd.pytorch's ``vgg`` list, whose
indices 0-29 are also torchvision's ``vgg16().features``:

    0-3 conv1_x | 4 pool1 | 5-8 conv2_x | 9 pool2 | 10-15 conv3_x | 16 pool3 (ceil) |
    17-22 conv4_x | 23 pool4 | 24-29 conv5_x | 30 pool5 (3x3 s1) | 31-32 fc6 | 33-34 fc7

so torchvision ``features.N.*`` keys map to ``N.*`` (its classifier's fc6/fc7 decimated into
conv6/conv7 by :func:`convert_torchvision_vgg16`; ``model.backbone_weights=imagenet``), and
ssd.pytorch's ``vgg16_reducedfc.pth`` loads with its keys unchanged. The two take different
input: torchvision's RGB / 255 with ImageNet's mean and std, the reduced-fc file Caffe's BGR
0-255 minus (104, 117, 123), so that one needs ``augment.input_convention=caffe_bgr``
(``ssd.models.weights``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd.models.base import FeatureExtractor
from ssd.models.layers import kaiming_init_, xavier_init_

# VGG16 configuration "D" (Simonyan & Zisserman 2015, table 1). "M" is a 2x2/2 max-pool, "C" the
# same with ceil_mode: SSD section 3 / Caffe reference rounds pool3 up so a 300 input gives a
# 38x38 conv4_3 map (75 -> 38) instead of 37x37.
_VGG16_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512,
)  # fmt: skip
#: index of the first layer after conv4_3's ReLU: the conv4_3 source is taken here
CONV4_3_END = 23
FC6_INDEX, FC7_INDEX = 31, 33


def vgg16_layers() -> nn.Sequential:
    """VGG16 conv1_1..conv5_3 plus SSD's fc6/fc7 as convolutions (paper section 3, "Base network")."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16_D:
        if v in ("M", "C"):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=v == "C"))
        else:
            layers += [nn.Conv2d(channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(v)
    kaiming_init_(nn.Sequential(*layers))  # torchvision's VGG init, for training from scratch
    # Section 3: "we change pool5 from 2x2-s2 to 3x3-s1, and use the atrous algorithm to fill the
    # holes": fc6 becomes a 3x3 conv with dilation 6, fc7 a 1x1 conv, both subsampled to 1024.
    fc = [
        nn.MaxPool2d(kernel_size=3, stride=1, padding=1),  # pool5
        nn.Conv2d(512, 1024, kernel_size=3, padding=6, dilation=6),  # fc6
        nn.ReLU(inplace=True),
        nn.Conv2d(1024, 1024, kernel_size=1),  # fc7
        nn.ReLU(inplace=True),
    ]
    xavier_init_(nn.Sequential(*fc))
    return nn.Sequential(*layers, *fc)


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale.

    Section 3.1 (and ParseNet): conv4_3 has a different feature scale from the later layers, so
    its features are L2-normalised and rescaled, with the scale initialised to 20 and learned.
    """

    def __init__(self, channels: int, scale: float = 20.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W), each pixel's C-vector of unit norm times ``weight``."""
        return F.normalize(x, dim=1) * self.weight.view(1, -1, 1, 1)


def _extra(
    in_channels: int,
    mid: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 2,
    padding: int = 1,
) -> nn.Sequential:
    """One SSD extra block: 1x1 reduce, then a 3x3 (or 4x4) conv that usually halves the size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid, kernel_size=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_channels, kernel_size, stride=stride, padding=padding),
        nn.ReLU(inplace=True),
    )


def ssd300_extras() -> nn.ModuleList:
    """Figure 2 of the paper: conv8_2 (19 -> 10), conv9_2 (-> 5), conv10_2 (-> 3), conv11_2 (-> 1);
    the last two are unpadded 3x3 convs (Caffe ssd_pascal.py)."""
    return nn.ModuleList(
        [
            _extra(1024, 256, 512),  # conv8_1, conv8_2
            _extra(512, 128, 256),  # conv9_1, conv9_2
            _extra(256, 128, 256, stride=1, padding=0),  # conv10_1, conv10_2
            _extra(256, 128, 256, stride=1, padding=0),  # conv11_1, conv11_2
        ]
    )


def ssd512_extras() -> nn.ModuleList:
    """SSD512 (paper section 3.6 footnote, Caffe ssd_pascal_512.py): four stride-2 blocks
    32 -> 16 -> 8 -> 4 -> 2, then conv12_2 a 4x4 conv with padding 1 (2 -> 1)."""
    return nn.ModuleList(
        [
            _extra(1024, 256, 512),  # conv8_2
            _extra(512, 128, 256),  # conv9_2
            _extra(256, 128, 256),  # conv10_2
            _extra(256, 128, 256),  # conv11_2
            _extra(256, 128, 256, kernel_size=4, stride=1, padding=1),  # conv12_2
        ]
    )


def convert_torchvision_vgg16(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """torchvision ``vgg16`` state dict -> keys of :func:`vgg16_layers`.

    ``features.N.*`` map to ``N.*``. If the classifier is present, fc6 and fc7 are converted to
    convolutions and subsampled as in paper section 3 (DeepLab-LargeFOV's decimation): fc6
    (4096, 512*7*7) -> keep every 4th filter and every 3rd tap -> (1024, 512, 3, 3) used with
    dilation 6; fc7 (4096, 4096) -> every 4th filter and input -> (1024, 1024, 1, 1). The 1000-way
    ImageNet classifier (``classifier.6``) has no SSD counterpart and is dropped.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("features."):
            out[key[len("features.") :]] = value
        elif key.startswith("classifier.6."):
            continue
        elif key in ("classifier.0.weight", "classifier.0.bias"):
            if key.endswith("bias"):
                out[f"{FC6_INDEX}.bias"] = value[::4].clone()
            elif value.dim() != 2 or value.shape[1] != 512 * 7 * 7:
                raise ValueError(
                    f"classifier.0.weight (fc6) must be (N, 25088) to become a conv, "
                    f"got {tuple(value.shape)}"
                )
            else:
                conv = value.reshape(value.shape[0], 512, 7, 7)
                out[f"{FC6_INDEX}.weight"] = conv[::4, :, ::3, ::3].clone()
        elif key in ("classifier.3.weight", "classifier.3.bias"):
            if key.endswith("bias"):
                out[f"{FC7_INDEX}.bias"] = value[::4].clone()
            elif value.dim() != 2:
                raise ValueError(f"classifier.3.weight (fc7) must be 2-D, got {tuple(value.shape)}")
            else:
                out[f"{FC7_INDEX}.weight"] = value[::4, ::4, None, None].clone()
        else:
            out[key] = value  # left for the loader to report as unexpected
    return out


class VGG16Features(FeatureExtractor):
    """VGG16 + L2Norm(conv4_3) + extras -> [conv4_3, fc7, extra_1, ..., extra_n] source maps.

    For a 300 input the maps are 38, 19, 10, 5, 3, 1 (512, 1024, 512, 256, 256, 256 channels);
    for 512 with :func:`ssd512_extras`, 64, 32, 16, 8, 4, 2, 1.
    """

    # A features-only checkpoint (e.g. torchvision's vgg16().features) leaves fc6/fc7 at init.
    optional_backbone_keys = frozenset(
        f"{i}.{p}" for i in (FC6_INDEX, FC7_INDEX) for p in ("weight", "bias")
    )

    def __init__(self, extras: nn.ModuleList) -> None:
        super().__init__()
        self.backbone = vgg16_layers()
        self.l2norm = L2Norm(512, scale=20.0)
        self.extras = extras
        xavier_init_(self.extras)

    def convert_backbone_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        if any(k.startswith(("features.", "classifier.")) for k in state):
            return convert_torchvision_vgg16(state)
        return dict(state)

    def forward(self, images: Tensor) -> list[Tensor]:
        """images (B, 3, S, S) -> list of source maps (B, C_l, f_l, f_l)."""
        x = images
        sources: list[Tensor] = []
        for index, layer in enumerate(self.backbone):
            if index == CONV4_3_END:
                sources.append(self.l2norm(x))
            x = layer(x)
        sources.append(x)  # fc7
        for block in self.extras:
            x = block(x)
            sources.append(x)
        return sources
