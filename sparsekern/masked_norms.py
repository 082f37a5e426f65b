"""Reference forms of normalisation layers whose statistics pool over channels, for :func:`sparsekern.masked`.

A pruned channel is absent, not zero (docs/design.md#semantics): a LayerNorm, RMSNorm or GroupNorm of the
compiled model computes its statistics over the kept channels only. The masked reference keeps every shape,
so it replaces such a layer by one of these, which pools over the kept channels ``mask`` (bool, ``(C,)``)
while the pruned ones (zero in the masked model) are left out. Channel rules name them (``ChannelRule.masked``).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["MaskedLayerNorm", "MaskedRMSNorm", "MaskedGroupNorm"]


class MaskedLayerNorm(nn.Module):
    """LayerNorm over the last axis whose statistics use only the kept channels ``mask`` (bool, (C,))."""

    def __init__(self, ln: nn.LayerNorm, mask: torch.Tensor) -> None:
        super().__init__()
        self.ln = ln
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask.to(x.dtype)
        k = m.sum()
        mean = (x * m).sum(-1, keepdim=True) / k
        var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / k
        y = (x - mean) / torch.sqrt(var + self.ln.eps)
        if self.ln.weight is not None:
            y = y * self.ln.weight
        if self.ln.bias is not None:
            y = y + self.ln.bias
        return y


class MaskedRMSNorm(nn.Module):
    """RMSNorm over the last axis whose mean square uses only the kept channels ``mask`` (bool, (C,)).

    ``norm`` is ``nn.RMSNorm`` or a layer computing ``weight * x / sqrt(mean(x^2) + eps)`` with its epsilon in
    ``eps`` or ``variance_epsilon`` (the Llama family's RMSNorm in ``transformers``, which computes in float32).
    """

    def __init__(self, norm: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.norm = norm
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        eps = getattr(self.norm, "eps", getattr(self.norm, "variance_epsilon", None))
        x = x.float() if hasattr(self.norm, "variance_epsilon") else x
        m = self.mask.to(x.dtype)
        eps = eps if eps is not None else torch.finfo(x.dtype).eps
        y = (x * torch.rsqrt((x * x * m).sum(-1, keepdim=True) / m.sum() + eps)).to(dtype)
        return y * self.norm.weight if self.norm.weight is not None else y


class MaskedGroupNorm(nn.Module):
    """GroupNorm whose per-group statistics use only the kept channels ``mask`` (bool, (C,))."""

    def __init__(self, gn: nn.GroupNorm, mask: torch.Tensor) -> None:
        super().__init__()
        self.gn = gn
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        g = self.gn.num_groups
        xs = x.reshape(n, g, c // g, -1)
        m = self.mask.to(x.dtype).reshape(1, g, c // g, 1)
        count = m.sum(dim=2, keepdim=True) * xs.shape[-1]
        mean = (xs * m).sum(dim=(2, 3), keepdim=True) / count
        var = (((xs - mean) * m) ** 2).sum(dim=(2, 3), keepdim=True) / count
        y = ((xs - mean) / torch.sqrt(var + self.gn.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
        if self.gn.weight is not None:
            y = y * self.gn.weight.reshape(shape) + self.gn.bias.reshape(shape)
        return y
