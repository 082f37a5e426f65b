"""Channel rules for the layers of Hugging Face ``transformers`` that are not ``torch.nn`` modules.

* ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a linear layer whose weight is stored
  transposed, ``(in_features, out_features)``, with ``nf`` output features.
* The Llama family's RMSNorm (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ...: one class per model,
  each ``weight * x / sqrt(mean(x^2) + variance_epsilon)``): an RMSNorm over the last axis. Registered per class
  as the channel graph meets it (:func:`register_model`), recognised by its name and its ``variance_epsilon``;
  other norms (Gemma's ``1 + weight``) are left to their ATen operators, which pin their channels.

The channel graph registers these when the process has imported ``transformers``
(:func:`sparsekern.graph.trace_graph`); sparsekern never imports it itself.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from sparsekern.channel_rules import ChannelRule, channel_rule, register_channel_rule
from sparsekern.masked_norms import MaskedRMSNorm
from sparsekern.slicing import slice_param

__all__ = ["register", "register_model"]


def _conv1d_layout(ctx, n: torch.fx.Node, value: torch.Tensor):
    x = ctx.lay(n.args[0]) if n.args else None
    if x is not None and x.cdim != value.dim() - 1:
        ctx.opaque(n, "Conv1D input whose feature axis is not the last dim")
    return ctx.produce(n, ctx.module_of(n).nf, value.dim() - 1)


def _slice_conv1d(m: nn.Module, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    """``Conv1D``: weight ``(in, out)`` columns (outputs) and rows (inputs), bias, ``nf`` (and ``nx``)."""
    slice_param(m, "weight", out_keep, 1)
    slice_param(m, "weight", in_keep, 0)
    slice_param(m, "bias", out_keep, 0)
    m.nf = m.weight.shape[1]
    if hasattr(m, "nx"):
        m.nx = m.weight.shape[0]


def _rms_norm_layout(ctx, n: torch.fx.Node, value: torch.Tensor):
    x = ctx.lay(n.args[0]) if n.args else None
    if x is not None and x.cdim != value.dim() - 1:
        return ctx.opaque(n, "RMSNorm over a non-channel axis")
    return ctx.passthrough(n, x, value)


def _slice_rms_norm(m: nn.Module, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    slice_param(m, "weight", out_keep, 0)


_RMS_NORM = ChannelRule(layout=_rms_norm_layout, slice=_slice_rms_norm, tags={"weights"}, masked=MaskedRMSNorm)


def register() -> None:
    """Register the ``Conv1D`` rule (once; a rule the user registered for it is kept)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover (a transformers without Conv1D)
        return
    if channel_rule(Conv1D) is None:
        register_channel_rule(Conv1D, ChannelRule(layout=_conv1d_layout, slice=_slice_conv1d, tags={"weights"}))


def is_llama_rms_norm(m: nn.Module) -> bool:
    """``m`` is a ``transformers`` RMSNorm of the Llama form: a 1-D ``weight`` and ``variance_epsilon``."""
    weight = getattr(m, "weight", None)
    return (type(m).__module__.startswith("transformers.") and type(m).__name__.endswith("RMSNorm")
            and isinstance(weight, torch.Tensor) and weight.dim() == 1 and hasattr(m, "variance_epsilon"))


def register_model(model: nn.Module) -> None:
    """Register the RMSNorm rule for each Llama-form RMSNorm class in ``model`` that has no rule yet."""
    for m in model.modules():
        if is_llama_rms_norm(m) and channel_rule(type(m)) is None:
            register_channel_rule(type(m), _RMS_NORM)
