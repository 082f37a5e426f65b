"""The zoo's weight initialisation (as in the torchvision and CIFAR reference implementations)."""
from __future__ import annotations

import torch.nn as nn


def init_weights(model: nn.Module, *, linear_std: float | None = None) -> None:
    """Kaiming-normal (fan_out, ReLU gain) convs with zero bias; BN/GroupNorm weight 1, bias 0.

    Linear layers get N(0, ``linear_std``) weights and zero bias when ``linear_std`` is given (VGG,
    MobileNetV2), else keep PyTorch's default initialisation (ResNet).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
