"""VGG with batch normalisation (Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
Image Recognition", ICLR 2015; BN after every conv as in Ioffe & Szegedy 2015).

Two layouts share the ``features`` stack (conv3x3-BN-ReLU triples and 2x2 max-pools, flat in one
``nn.Sequential``, so ``features.0`` is the first conv, ``features.1`` its BN, ``features.2`` its ReLU):

* CIFAR (default): the layout of the Network Slimming code (Liu et al. 2017), reused by Liu et al. 2019
  (Rethinking the Value of Network Pruning). Convs have no bias; the last max-pool of the ImageNet
  configuration is dropped, so a 32x32 input leaves ``features`` at 2x2; then ``avgpool``, ``flatten``
  and ``classifier = nn.Linear(512, num_classes)``. The reference code pools with ``AvgPool2d(2)``; here
  ``avgpool`` is ``AdaptiveAvgPool2d(1)``, which is the same operation at 32x32 and also accepts other
  input sizes. (N, in_channels, 32, 32) -> (N, num_classes).
  VGG-16: 13 convs, 14.7M parameters at 10 classes.
  ``classifier="two_fc"``: the classifier of the ANP-VS code (Madaan et al. 2020), two FC layers with BN,
  ``classifier = Linear(512, 512)-BatchNorm1d(512)-ReLU-Linear(512, num_classes)`` (``classifier.0``,
  ``classifier.1``, ``classifier.2``, ``classifier.3``), so that both FC inputs carry a mask.

* ImageNet (``imagenet=True``): torchvision's ``vgg16_bn`` / ``vgg19_bn`` exactly. Convs have a bias,
  all five max-pools are kept, ``avgpool = AdaptiveAvgPool2d(7)``, and
  ``classifier = Linear(25088, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-Linear(4096, num_classes)``.
  (N, in_channels, H, W) -> (N, num_classes). vgg16_bn: 138,365,992 parameters at 1000 classes.

A custom ``cfg`` (list of output widths and ``"M"`` for max-pool), as produced by channel pruning methods
such as Network Slimming, rebuilds a thinner network with the same module names.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from sparsekern.models.init import init_weights

__all__ = ["VGG", "CIFAR_CFGS", "CLASSIFIERS", "IMAGENET_CFGS", "TWO_FC_WIDTH", "vgg_bn"]

CfgItem = Union[int, str]

# ImageNet configurations D (VGG-16) and E (VGG-19) of Simonyan & Zisserman 2015, table 1.
IMAGENET_CFGS: dict[int, list[CfgItem]] = {
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
# The CIFAR variants (Network Slimming code) drop the final max-pool.
CIFAR_CFGS: dict[int, list[CfgItem]] = {depth: cfg[:-1] for depth, cfg in IMAGENET_CFGS.items()}
#: CIFAR classifiers: ``"one_fc"`` (Network Slimming / Rethinking code) or ``"two_fc"`` (ANP-VS code).
CLASSIFIERS = ("one_fc", "two_fc")
#: Hidden width of the ``"two_fc"`` classifier.
TWO_FC_WIDTH = 512


def make_features(cfg: Sequence[CfgItem], in_channels: int, *, conv_bias: bool) -> nn.Sequential:
    """conv3x3(pad 1)-BN-ReLU for each int in ``cfg``, ``MaxPool2d(2, 2)`` for each ``"M"``."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        if not isinstance(item, int) or isinstance(item, bool) or item <= 0:
            raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {item!r}")
        layers += [
            nn.Conv2d(channels, item, kernel_size=3, padding=1, bias=conv_bias),
            nn.BatchNorm2d(item),
            nn.ReLU(inplace=True),
        ]
        channels = item
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN; see the module docstring for the two layouts. ``features -> avgpool -> flatten -> classifier``.

    ``classifier`` (CIFAR layout only): ``"one_fc"`` (default) or ``"two_fc"`` (module docstring).
    """

    def __init__(
        self,
        cfg: Sequence[CfgItem],
        num_classes: int,
        in_channels: int = 3,
        imagenet: bool = False,
        dropout: float = 0.5,
        classifier: str = "one_fc",
    ) -> None:
        super().__init__()
        if classifier not in CLASSIFIERS:
            raise ValueError(f"VGG classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        if imagenet and classifier != "one_fc":
            raise ValueError(f"classifier={classifier!r} is a CIFAR-layout option; the ImageNet layout has "
                             "torchvision's three-FC classifier (drop imagenet=True or the classifier)")
        self.cfg = list(cfg)
        self.imagenet = imagenet
        self.features = make_features(self.cfg, in_channels, conv_bias=imagenet)
        widths = [c for c in self.cfg if c != "M"]
        if not widths:
            raise ValueError("VGG cfg needs at least one conv width")
        last = int(widths[-1])
        if imagenet:
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier: nn.Module = nn.Sequential(
                nn.Linear(last * 7 * 7, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(p=dropout),
                nn.Linear(4096, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(last, num_classes) if classifier == "one_fc" else nn.Sequential(
                nn.Linear(last, TWO_FC_WIDTH),
                nn.BatchNorm1d(TWO_FC_WIDTH),
                nn.ReLU(inplace=True),
                nn.Linear(TWO_FC_WIDTH, num_classes),
            )
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg_bn(
    depth: int,
    *,
    num_classes: int | None = None,
    in_channels: int = 3,
    imagenet: bool = False,
    cfg: Sequence[CfgItem] | None = None,
    classifier: str = "one_fc",
) -> VGG:
    """VGG-``depth`` (16 or 19) with BN. ``num_classes`` defaults to 10 (CIFAR) or 1000 (``imagenet``);
    ``classifier="two_fc"`` gives the ANP-VS classifier (CIFAR layout; module docstring).

    Prefer ``sparsekern.models.build("vgg16_bn", ...)``, which records the architecture in ``sk_arch``.
    """
    table = IMAGENET_CFGS if imagenet else CIFAR_CFGS
    if depth not in table:
        raise ValueError(f"VGG depth must be one of {sorted(table)}, got {depth}")
    if num_classes is None:
        num_classes = 1000 if imagenet else 10
    return VGG(table[depth] if cfg is None else cfg, num_classes, in_channels, imagenet=imagenet,
               classifier=classifier)
