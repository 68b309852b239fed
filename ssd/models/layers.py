"""Small building blocks shared by the backbones, extra layers and heads."""

from __future__ import annotations

from torch import nn


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every conv in ``module``.

    The SSD Caffe reference, ssd.pytorch, pytorch-ssd and torchvision all initialise the extra
    layers and the prediction heads this way.
    """
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def kaiming_init_(module: nn.Module) -> None:
    """He-normal (fan-out) conv weights, zero biases, unit BN: torchvision's ImageNet backbones."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


def scale_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels * width_mult`` rounded to a multiple of ``divisor`` (MobileNet's rule).

    Rounding never drops more than 10% below the exact value, as in torchvision's
    ``_make_divisible``, so width 1.0 keeps the paper's channel counts.
    """
    exact = channels * width_mult
    rounded = max(divisor, int(exact + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * exact:
        rounded += divisor
    return rounded


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias: BN has one) + BatchNorm + ReLU, "same" padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )
