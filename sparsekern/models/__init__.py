"""Model zoo: the networks that the pruning papers reproduced in ``methods/`` use, written from scratch
(no torchvision) with the module names of the usual reference implementations.

======================  ==========================================================  ==========  =====
name                    architecture                                                classes     input
======================  ==========================================================  ==========  =====
``resnet20/56/110``     CIFAR ResNet, projection shortcuts (He et al. 2016)         10          32
``resnet18/50``         ImageNet ResNet, torchvision layout (He et al. 2016)        1000        224
``vgg16_bn/vgg19_bn``   VGG-BN (Simonyan & Zisserman 2015), CIFAR layout of the     10 (1000)   32
                        Network Slimming code; ``imagenet=True``: torchvision's                 (224)
                        (``classifier="two_fc"``: ANP-VS's 512-512 FC + BN head)
``mobilenet_v2``        MobileNetV2 (Sandler et al. 2018), torchvision layout       1000        224
======================  ==========================================================  ==========  =====

Every constructor takes ``num_classes`` and ``in_channels`` keyword arguments. :func:`build` records
the architecture on the model as ``model.sk_arch = {"name": ..., "kwargs": {...}}`` (plain JSON), so
``build(**model.sk_arch)`` rebuilds the same architecture (e.g. when loading a saved model).

    >>> from sparsekern import models
    >>> m = models.build("resnet56", num_classes=100)
    >>> m.sk_arch
    {'name': 'resnet56', 'kwargs': {'num_classes': 100}}
"""
from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from torch import nn

from .lm import sru_lm as _sru_lm
from .lm import transformer_lm as _transformer_lm
from .mobilenet import InvertedResidual, MobileNetV2
from .mobilenet import mobilenet_v2 as _mobilenet_v2
from .resnet import BasicBlock, Bottleneck, CifarResNet, ResNet, cifar_resnet, imagenet_resnet18, imagenet_resnet50
from .vgg import VGG, vgg_bn

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "InvertedResidual",
    "MobileNetV2",
    "ResNet",
    "VGG",
    "arch_of",
    "build",
    "default_input_size",
    "list_models",
    "mobilenet_v2",
    "resnet110",
    "resnet18",
    "resnet20",
    "resnet50",
    "resnet56",
    "vgg16_bn",
    "vgg19_bn",
]

_CIFAR_INPUT = 32
_IMAGENET_INPUT = 224

# name -> (constructor taking keyword arguments, default input size)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], int]] = {
    "resnet20": (lambda **kw: cifar_resnet(20, **kw), _CIFAR_INPUT),
    "resnet56": (lambda **kw: cifar_resnet(56, **kw), _CIFAR_INPUT),
    "resnet110": (lambda **kw: cifar_resnet(110, **kw), _CIFAR_INPUT),
    "resnet18": (imagenet_resnet18, _IMAGENET_INPUT),
    "resnet50": (imagenet_resnet50, _IMAGENET_INPUT),
    "vgg16_bn": (lambda **kw: vgg_bn(16, **kw), _CIFAR_INPUT),
    "vgg19_bn": (lambda **kw: vgg_bn(19, **kw), _CIFAR_INPUT),
    "mobilenet_v2": (_mobilenet_v2, _IMAGENET_INPUT),
    # byte-level language models (FLOP): input (B, T) int64 bytes; the "input size" is the context length
    "transformer_lm": (_transformer_lm, 128),
    "sru_lm": (_sru_lm, 128),
}


def list_models() -> list[str]:
    """Names accepted by :func:`build`, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> tuple[Callable[..., nn.Module], int]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def build(name: str, kwargs: dict[str, Any] | None = None, **extra: Any) -> nn.Module:
    """Construct zoo model ``name`` and record ``model.sk_arch = {"name": name, "kwargs": kwargs}``.

    Keyword arguments go to the constructor (``num_classes``, ``in_channels``; ``imagenet``, ``cfg`` and
    ``classifier`` for VGG; ``width_mult`` and ``dropout`` for MobileNetV2; ``zero_init_residual`` for ImageNet ResNets).
    They may also be given as one ``kwargs`` dict, so that ``build(**model.sk_arch)`` round-trips.
    They must be JSON-serialisable (``TypeError`` otherwise); ``sk_arch`` holds their JSON round-trip
    (tuples become lists). Unknown names raise ``ValueError`` listing the known ones.
    """
    ctor, _ = _lookup(name)
    merged = dict(kwargs or {})
    overlap = sorted(set(merged) & set(extra))
    if overlap:
        raise TypeError(f"build({name!r}): arguments given twice (in kwargs and as keywords): {overlap}")
    merged.update(extra)
    try:
        plain = json.loads(json.dumps(merged))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"build({name!r}): model kwargs must be JSON-serialisable: {exc}") from None
    model = ctor(**plain)
    model.sk_arch = {"name": name, "kwargs": plain}
    return model


def arch_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``sk_arch`` record that :func:`build` set on ``model``, or ``None`` for models built elsewhere."""
    return getattr(model, "sk_arch", None)


def default_input_size(name: str, kwargs: dict[str, Any] | None = None) -> int:
    """Side of the square input the model is meant for: 32 (CIFAR models) or 224 (ImageNet models).

    ``kwargs`` are the build arguments (``default_input_size(**model.sk_arch)`` works); VGG with
    ``imagenet=True`` is an ImageNet model.
    """
    _, size = _lookup(name)
    if kwargs and kwargs.get("imagenet"):
        return _IMAGENET_INPUT
    return size


# Named constructors: each goes through build() so that sk_arch is always set.

def resnet20(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 BasicBlocks, 16/32/64 channels."""
    return build("resnet20", num_classes=num_classes, in_channels=in_channels)  # type: ignore[return-value]


def resnet56(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-56 (He et al. 2016): 3 stages x 9 BasicBlocks, 16/32/64 channels."""
    return build("resnet56", num_classes=num_classes, in_channels=in_channels)  # type: ignore[return-value]


def resnet110(*, num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """CIFAR ResNet-110 (He et al. 2016): 3 stages x 18 BasicBlocks, 16/32/64 channels."""
    return build("resnet110", num_classes=num_classes, in_channels=in_channels)  # type: ignore[return-value]


def resnet18(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-18 (He et al. 2016), torchvision layout; 11,689,512 parameters at 1000 classes."""
    return build("resnet18", num_classes=num_classes, in_channels=in_channels,  # type: ignore[return-value]
                 zero_init_residual=zero_init_residual)


def resnet50(*, num_classes: int = 1000, in_channels: int = 3, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-50 v1.5 (He et al. 2016), torchvision layout; 25,557,032 parameters at 1000 classes."""
    return build("resnet50", num_classes=num_classes, in_channels=in_channels,  # type: ignore[return-value]
                 zero_init_residual=zero_init_residual)


def vgg16_bn(*, num_classes: int | None = None, in_channels: int = 3, imagenet: bool = False,
             cfg: Sequence[int | str] | None = None, classifier: str = "one_fc") -> VGG:
    """VGG-16-BN (Simonyan & Zisserman 2015); CIFAR layout unless ``imagenet``; ``classifier="two_fc"``: the
    ANP-VS head (see ``models.vgg``)."""
    return build("vgg16_bn", num_classes=num_classes, in_channels=in_channels,  # type: ignore[return-value]
                 imagenet=imagenet, cfg=None if cfg is None else list(cfg), classifier=classifier)


def vgg19_bn(*, num_classes: int | None = None, in_channels: int = 3, imagenet: bool = False,
             cfg: Sequence[int | str] | None = None, classifier: str = "one_fc") -> VGG:
    """VGG-19-BN (Simonyan & Zisserman 2015); CIFAR layout unless ``imagenet``; ``classifier="two_fc"``: the
    ANP-VS head (see ``models.vgg``)."""
    return build("vgg19_bn", num_classes=num_classes, in_channels=in_channels,  # type: ignore[return-value]
                 imagenet=imagenet, cfg=None if cfg is None else list(cfg), classifier=classifier)


def mobilenet_v2(*, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0,
                 dropout: float = 0.2) -> MobileNetV2:
    """MobileNetV2 (Sandler et al. 2018), torchvision layout; 3,504,872 parameters at width 1.0, 1000 classes."""
    return build("mobilenet_v2", num_classes=num_classes, in_channels=in_channels,  # type: ignore[return-value]
                 width_mult=width_mult, dropout=dropout)
