"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

torchvision's module names and shapes: ``features.0`` is the stem (conv3x3 s2-BN-ReLU6, as a Sequential
``features.0.0 / .1 / .2``), ``features.1``..``features.17`` are :class:`InvertedResidual` blocks, each
holding its layers in ``conv`` (expand 1x1-BN-ReLU6 when t != 1, depthwise 3x3-BN-ReLU6, linear 1x1
projection, BN), ``features.18`` is the last 1x1 conv-BN-ReLU6 to 1280 channels; then global average
pooling, ``flatten`` and ``classifier = Sequential(Dropout, Linear(1280, num_classes))``.
(N, in_channels, H, W) -> (N, num_classes). width_mult 1.0: 3,504,872 parameters at 1000 classes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from sparsekern.models.init import init_weights

__all__ = ["ConvBNReLU6", "InvertedResidual", "MobileNetV2", "make_divisible", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s): Sandler et al. 2018, table 2.
INVERTED_RESIDUAL_SETTING: list[list[int]] = [
    [1, 16, 1, 1],
    [6, 24, 2, 2],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without going below 90% of it."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ConvBNReLU6(nn.Sequential):
    """``Sequential(Conv2d(no bias, 'same' padding), BatchNorm2d, ReLU6)`` named ``0``, ``1``, ``2``.

    (N, in_planes, H, W) -> (N, out_planes, H / stride, W / stride). ``groups == in_planes`` is depthwise.
    """

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck (Sandler et al. 2018, fig. 3b and table 1).

    (N, inp, H, W) -> (N, oup, H / stride, W / stride). ``conv`` holds
    ``[ConvBNReLU6(inp, inp*t, 1)] + [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden), Conv2d 1x1, BN]``;
    the input is added back when ``stride == 1 and inp == oup`` (``use_res_connect``).
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # fixed at construction: fx-traceable
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018); see the module docstring for names and shapes."""

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        width_mult: float = 1.0,
        round_nearest: int = 8,
        dropout: float = 0.2,
        inverted_residual_setting: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        setting = [list(s) for s in (inverted_residual_setting or INVERTED_RESIDUAL_SETTING)]
        if any(len(s) != 4 for s in setting):
            raise ValueError(f"inverted_residual_setting rows must be [t, c, n, s], got {setting}")
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU6(in_channels, input_channel, stride=2)]
        for t, c, n, s in setting:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2. Prefer ``sparsekern.models.build("mobilenet_v2", ...)`` (sets ``sk_arch``)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width_mult=width_mult, dropout=dropout)
