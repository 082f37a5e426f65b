"""Residual networks (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Two families, with the module names that the reference implementations use, so that pruning
configurations and checkpoints written against them address the same layers here:

* CIFAR ResNets (``CifarResNet``: ResNet-20/56/110). The CIFAR layout of He et al. 2016, section 4.2:
  a 3x3 stem with 16 channels, three stages of ``n = (depth - 2) / 6`` :class:`BasicBlock` s with
  16 / 32 / 64 channels (the first block of stages 2 and 3 has stride 2), global average pooling and a
  linear classifier. Names follow the code released with Li et al. 2017 (L1-norm) and Liu et al. 2019
  (Rethinking): ``conv1``, ``bn1``, ``layer1``..``layer3``, ``avgpool``, ``fc``. Where the shape changes
  the shortcut is a projection (He et al.'s option B): ``downsample = Sequential(conv1x1, BN)``, so every
  channel of every tensor is produced by a real convolution.

* ImageNet ResNets (``ResNet``: ResNet-18 with :class:`BasicBlock`, ResNet-50 with :class:`Bottleneck`),
  with torchvision's names and shapes: a 7x7 stride-2 stem, ``maxpool``, four stages of 64..512 base
  channels, ``avgpool``, ``fc``. The Bottleneck puts its stride on the 3x3 conv ("ResNet v1.5").
  Parameter counts at 1000 classes: ResNet-18 11,689,512; ResNet-50 25,557,032.

Input (N, in_channels, H, W) -> logits (N, num_classes). All forwards are free of data-dependent
control flow, so ``torch.fx.symbolic_trace`` captures them.
"""
from __future__ import annotations

from typing import Sequence, Type, Union

import torch
from torch import nn

from sparsekern.models.init import init_weights

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "ResNet",
    "cifar_resnet",
    "imagenet_resnet18",
    "imagenet_resnet50",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding = dilation, no bias (a BN follows)."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
        groups=groups, dilation=dilation, bias=False,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Projection shortcut (option B): ``Sequential(conv1x1(stride), BN)`` named ``0`` and ``1``."""
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs and an identity or projection shortcut (He et al. 2016, fig. 2 left).

    (N, inplanes, H, W) -> (N, planes, H / stride, W / stride). Modules: ``conv1, bn1, relu, conv2, bn2``
    and ``downsample`` (``None`` for the identity shortcut).
    """

    expansion: int = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:  # structural, fixed at construction: fx-traceable
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, "v1.5"), 1x1 expand x4, plus shortcut (He et al. 2016, fig. 5).

    (N, inplanes, H, W) -> (N, planes * 4, H / stride, W / stride). Modules: ``conv1..conv3``,
    ``bn1..bn3``, ``relu``, ``downsample`` (``None`` for the identity shortcut).
    """

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


class CifarResNet(nn.Module):
    """CIFAR ResNet of He et al. 2016 (sec. 4.2) with projection shortcuts.

    ``depth = 6 n + 2``; (N, in_channels, 32, 32) -> (N, num_classes). Stage widths 16 / 32 / 64, spatial
    32 -> 32 -> 16 -> 8, then ``avgpool`` (adaptive, to 1x1), ``flatten``, ``fc`` (64 -> num_classes).
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1 (20, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.inplanes = 16
        self.conv1 = conv3x3(in_channels, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = _projection(self.inplanes, planes * BasicBlock.expansion, stride)
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class ResNet(nn.Module):
    """ImageNet ResNet (He et al. 2016, table 1) with torchvision's module names and shapes.

    (N, in_channels, H, W) -> (N, num_classes); at 224x224 the stages run at 56, 28, 14, 7.
    ``layers`` gives the number of blocks per stage (ResNet-18: [2, 2, 2, 2] BasicBlocks, ResNet-50:
    [3, 4, 6, 3] Bottlenecks).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ImageNet ResNet needs 4 stage depths, got {list(layers)}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)
        if zero_init_residual:  # Goyal et al. 2017: each residual branch starts as zero
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = _projection(self.inplanes, planes * block.expansion, stride)
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def cifar_resnet(depth: int, *, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-``depth`` (20, 56, 110, ...). Prefer ``sparsekern.models.build`` (sets ``sk_arch``)."""
    return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels)


def imagenet_resnet18(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-18 (11,689,512 parameters at 1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels,
                  zero_init_residual=zero_init_residual)


def imagenet_resnet50(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-50 v1.5 (25,557,032 parameters at 1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels,
                  zero_init_residual=zero_init_residual)
