"""Slicing a layer's per-channel state to the kept channels: the ``slice`` functions of the built-in channel
rules (:mod:`sparsekern.channel_rules`), which :func:`sparsekern.compile` calls for every module it shrinks.

Each ``slice_*(module, in_keep, out_keep)`` takes int64 tensors of the kept positions along the channel axis
of the module's first input and of its output, or ``None`` where nothing is removed, and updates the module
in place: parameters (a new ``nn.Parameter`` with the old ``requires_grad``), buffers and the attributes that
record sizes (``out_channels``, ``num_features``, ...).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["is_depthwise", "slice_param", "slice_conv", "slice_linear", "slice_batch_norm", "slice_layer_norm",
           "slice_group_norm", "slice_prelu"]


def is_depthwise(m: nn.Module) -> bool:
    """True for a depthwise convolution: ``groups == in_channels > 1`` (one filter group per input channel)."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels


def slice_param(module: nn.Module, name: str, index: torch.Tensor | None, dim: int) -> None:
    """Keep the entries ``index`` of ``module.<name>`` along ``dim`` (nothing when either is ``None``)."""
    p = getattr(module, name, None)
    if p is None or index is None:
        return
    data = p.data.index_select(dim, index.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(data, requires_grad=p.requires_grad))
    else:
        setattr(module, name, data)


def slice_conv(m: nn.Module, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """A convolution (any dimension, any groups): weight rows and columns, bias, channel counts. A depthwise
    conv whose inputs are sliced keeps one group per kept input channel; other grouped convs keep their group
    count, each group reading its own slice of inputs (equal kept counts per group, checked by the plan)."""
    if out_keep is None and in_keep is None:
        return
    if is_depthwise(m) and in_keep is not None:
        slice_param(m, "weight", out_keep, 0)  # weight (C * mult, 1, k, k): only output rows go
        slice_param(m, "bias", out_keep, 0)
        m.out_channels = m.weight.shape[0]
        m.in_channels = m.groups = len(in_keep)
        return
    g = m.groups
    if g == 1:
        slice_param(m, "weight", out_keep, 0)
        slice_param(m, "weight", in_keep, 1)
        slice_param(m, "bias", out_keep, 0)
        m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1]
        return
    out_per, in_per = m.out_channels // g, m.in_channels // g
    out_all = torch.arange(m.out_channels) if out_keep is None else out_keep
    in_all = torch.arange(m.in_channels) if in_keep is None else in_keep
    w = m.weight.data
    blocks = []
    for i in range(g):
        rows = out_all[(out_all >= i * out_per) & (out_all < (i + 1) * out_per)]
        cols = in_all[(in_all >= i * in_per) & (in_all < (i + 1) * in_per)] - i * in_per
        blocks.append(w.index_select(0, rows.to(w.device)).index_select(1, cols.to(w.device)))
    m.weight = nn.Parameter(torch.cat(blocks).clone(), requires_grad=m.weight.requires_grad)
    slice_param(m, "bias", out_keep, 0)
    m.out_channels, m.in_channels = len(out_all), len(in_all)


def slice_linear(m: nn.Linear, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.Linear``: weight rows (outputs) and columns (inputs), bias, feature counts."""
    slice_param(m, "weight", out_keep, 0)
    slice_param(m, "weight", in_keep, 1)
    slice_param(m, "bias", out_keep, 0)
    m.out_features, m.in_features = m.weight.shape


def slice_embedding(m: nn.Embedding, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.Embedding``: the table's columns (features) and ``embedding_dim``; the ids are not channels."""
    slice_param(m, "weight", out_keep, 1)
    m.embedding_dim = m.weight.shape[1]


def slice_batch_norm(m: nn.Module, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """BatchNorm of any dimension: affine parameters and running statistics."""
    for name in ("weight", "bias", "running_mean", "running_var"):
        slice_param(m, name, out_keep, 0)
    if out_keep is not None:
        m.num_features = len(out_keep)


def slice_layer_norm(m: nn.LayerNorm, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.LayerNorm`` over one (channel) dimension: affine parameters and ``normalized_shape``."""
    slice_param(m, "weight", out_keep, 0)
    slice_param(m, "bias", out_keep, 0)
    if out_keep is not None:
        m.normalized_shape = (len(out_keep),)


def slice_rms_norm(m: nn.RMSNorm, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.RMSNorm`` over one (channel) dimension: its weight and ``normalized_shape``."""
    slice_param(m, "weight", out_keep, 0)
    if out_keep is not None:
        m.normalized_shape = (len(out_keep),)


def slice_group_norm(m: nn.GroupNorm, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.GroupNorm``: affine parameters and ``num_channels`` (the group count stays)."""
    slice_param(m, "weight", out_keep, 0)
    slice_param(m, "bias", out_keep, 0)
    if out_keep is not None:
        m.num_channels = len(out_keep)


def slice_prelu(m: nn.PReLU, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``nn.PReLU`` with one slope per channel (a single shared slope has nothing to slice)."""
    if m.num_parameters > 1 and out_keep is not None:
        slice_param(m, "weight", out_keep, 0)
        m.num_parameters = len(out_keep)
