"""The gate of a calibrated gated layer in one operator call (:mod:`sparsekern.hybrid`), private.

``torch.ops.sparsekern._gate_guard(x, w1, b1, w2, b2, group_always, group_fixed, computed, granularity,
out_channels) -> (mask, scale, outside)`` evaluates a pooled-MLP gate (SANP's saliency module: Chen et al.,
"Self-Adaptive Network Pruning", ICONIP 2019) and what the hybrid compile needs from it:

* ``logits`` (B, n) = ``w2 relu(w1 mean_hw(x) + b1) + b2`` for x (B, C_in, H, W) (any layout), w1 (h, C_in),
  b1 (h,), w2 (n, h), b2 (n,), n = ceil(out_channels / granularity);
* ``mask`` (B, out_channels) bool: ``logits > 0`` per group of ``granularity`` channels;
* ``outside`` () bool: some sample has a group whose ``group_fixed`` (n,) is set decide other than its
  ``group_always`` (n,) (a never-on group on, or an always-on group off);
* ``scale`` (B, K, 1, 1) in x's dtype: ``mask[:, computed]`` for ``computed`` (K,) int64 channel indices.

The plain-torch formulation (:func:`guard_outputs` on the gate's logits) is the op's implementation for every
device; the C++ extension registers the CPU kernel (csrc/cpu/gate_guard.cpp), so that a traced graph makes one
call per gated layer instead of a dozen.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern.ops import _ext

__all__ = ["gate_guard", "guard_outputs"]

_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define("_gate_guard(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, Tensor group_always, "
            "Tensor group_fixed, Tensor computed, int granularity, int out_channels) -> (Tensor, Tensor, Tensor)")


def guard_outputs(logits: torch.Tensor, group_always: torch.Tensor, group_fixed: torch.Tensor,
                  computed: torch.Tensor, granularity: int,
                  out_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mask, scale, outside)`` of the module docstring from a gate's ``logits`` (B, n)."""
    from sparsekern.dynamic import expand_groups

    on = logits > 0
    outside = ((on ^ group_always) & group_fixed).any()
    mask = expand_groups(on, granularity, out_channels)
    return mask, mask.index_select(1, computed).to(logits.dtype)[:, :, None, None], outside


def _reference(x, w1, b1, w2, b2, group_always, group_fixed, computed, granularity, out_channels):
    logits = F.linear(F.relu(F.linear(x.mean((2, 3)), w1, b1)), w2, b2)
    return guard_outputs(logits, group_always, group_fixed, computed, granularity, out_channels)


_LIB.impl("_gate_guard", _reference, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsekern::_gate_guard", lib=_LIB)
def _fake(x, w1, b1, w2, b2, group_always, group_fixed, computed, granularity, out_channels):
    batch = x.shape[0]
    return (x.new_empty((batch, out_channels), dtype=torch.bool), x.new_empty((batch, computed.shape[0], 1, 1)),
            x.new_empty((), dtype=torch.bool))


def gate_guard(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
               group_always: torch.Tensor, group_fixed: torch.Tensor, computed: torch.Tensor, granularity: int,
               out_channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operator (module docstring); the C++ kernel on CPU float32 where the extension is built (loaded
    here first, so that its kernel is registered). Other CPU dtypes take the plain-torch formulation."""
    if x.device.type == "cpu" and x.dtype != torch.float32:
        return _reference(x, w1, b1, w2, b2, group_always, group_fixed, computed, granularity, out_channels)
    _ext.load()
    return torch.ops.sparsekern._gate_guard(x, w1, b1, w2, b2, group_always, group_fixed, computed, granularity,
                                            out_channels)
