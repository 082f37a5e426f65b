"""``attention``: ``softmax(scale q k^T) v``, causal or not, without storing the score matrix.

Shapes: q (B, H, T_q, E), k (B, H, T_k, E), v (B, H, T_k, E_v) -> (B, H, T_q, E_v); ``scale`` defaults to
``1 / sqrt(E)``; with ``causal`` query i sees keys 0..i (``torch.nn.functional.scaled_dot_product_attention``'s
``is_causal``, top-left aligned). This is the attention of the Transformer (Vaswani et al., NeurIPS 2017) that
pruning the linear layers does not shrink: with FLOP's low-rank layers (Wang, Wohlwend and Lei, EMNLP 2020) it
becomes a large share of a pruned model's time, so it must run near the machine's peak for the model's speedup to
follow its FLOPs.

One torch op, ``torch.ops.sparsekern.attention`` (with a fake implementation). Its body validates the arguments
once (:func:`problem`), allocates the output, laid out (B, T_q, H, E_v) in memory so that the usual
``o.transpose(1, 2).reshape(B, T_q, H * E_v)`` costs no copy (as torch's CPU kernel does), and runs one backend of
:data:`DISPATCH`:

==========  ==========================================================================================
cpu         ``csrc/cpu/attention.cpp``: the running softmax of FlashAttention (Dao et al., NeurIPS 2022),
            one task per (batch, head), query blocks against key tiles in registers, causal tiles above
            the diagonal skipped (CPU float32 tensors, unit stride along E and E_v)
torch       ``torch.nn.functional.scaled_dot_product_attention`` (always)
==========  ==========================================================================================

The ``cpu`` backend runs when it can (``backend=`` forces one). :func:`sparsekern.cost.flops` counts the op
like torch's attention kernels: ``2 (E + E_v)`` FLOPs per (query, key) pair computed. The op is for inference: it
has no autograd formula.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils import flop_counter

from sparsekern.ops import _ext
from sparsekern.ops.backend import FLOATS, Backend, Dispatch, OnInput

__all__ = ["attention", "problem", "AttentionProblem", "select_backend", "flop_count", "DISPATCH"]

_OP = "attention"


@dataclass(frozen=True)
class AttentionProblem(OnInput):
    """Validated arguments of one call: q (B, H, T_q, E), k (B, H, T_k, E), v (B, H, T_k, E_v)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    scale: float

    @property
    def x(self) -> torch.Tensor:  # OnInput reads device and dtype from x
        return self.q

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        b, h, t_q, _ = self.q.shape
        return b, h, t_q, self.v.shape[-1]

    def new_output(self) -> torch.Tensor:
        """An uninitialised (B, H, T_q, E_v) output stored as (B, T_q, H, E_v)."""
        b, h, t_q, e_v = self.out_shape
        return torch.empty((b, t_q, h, e_v), dtype=self.q.dtype, device=self.q.device).transpose(1, 2)


def problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
            scale: float | None = None) -> AttentionProblem:
    """Validate the arguments of :func:`attention` (errors name the argument, its shape and the expected one)."""
    if q.dim() != 4:
        raise ValueError(f"{_OP}: q must be (B, H, T_q, E), got shape {tuple(q.shape)}")
    b, h, _, e = q.shape
    if k.dim() != 4 or tuple(k.shape[:2]) != (b, h) or k.shape[3] != e:
        raise ValueError(f"{_OP}: k must be (B, H, T_k, E) = ({b}, {h}, T_k, {e}) for q of shape {tuple(q.shape)}, "
                         f"got shape {tuple(k.shape)} (repeat grouped key/value heads to H first)")
    if v.dim() != 4 or tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(f"{_OP}: v must be (B, H, T_k, E_v) with (B, H, T_k) = {tuple(k.shape[:3])} (from k), got "
                         f"shape {tuple(v.shape)}")
    if q.dtype not in FLOATS or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{_OP}: q, k and v must share one of float32/float16/bfloat16, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but q is on {q.device}; move them to one device")
    return AttentionProblem(q, k, v, bool(causal), 1.0 / math.sqrt(e) if scale is None else float(scale))


def _cpu_limits(pr: AttentionProblem) -> list[str]:
    if any(t.stride(-1) != 1 for t in (pr.q, pr.k, pr.v)):
        return ["q, k and v need unit stride along their last dimension"]
    return []


def _run_cpu(pr: AttentionProblem) -> torch.Tensor:
    o = pr.new_output()
    _ext.kernel("attention_cpu")(pr.q, pr.k, pr.v, pr.causal, pr.scale, o)
    return o


def _run_torch(pr: AttentionProblem) -> torch.Tensor:
    o = pr.new_output()
    o.copy_(F.scaled_dot_product_attention(pr.q, pr.k, pr.v, is_causal=pr.causal, scale=pr.scale))
    return o


DISPATCH = Dispatch(_OP, problem)
DISPATCH.register(Backend("cpu", _run_cpu, devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("attention_cpu"), limits=_cpu_limits))
DISPATCH.register(Backend("torch", _run_torch))


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                   scale: float | None = None, *, backend: str | None = None) -> str:
    """Name of the backend :func:`attention` runs for these inputs (``backend`` forces one)."""
    return DISPATCH.select(problem(q, k, v, causal, scale), backend, ()).name


_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define(f"{_OP}(Tensor q, Tensor k, Tensor v, bool causal=False, float? scale=None, str? backend=None) -> Tensor")


def _impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: Optional[float] = None,
          backend: Optional[str] = None) -> torch.Tensor:
    pr = problem(q, k, v, causal, scale)
    return DISPATCH.select(pr, backend, ()).run(pr)


def _fake(q, k, v, causal=False, scale=None, backend=None) -> torch.Tensor:
    return problem(q, k, v, causal, scale).new_output()


_LIB.impl(_OP, _impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"sparsekern::{_OP}", _fake, lib=_LIB)

# The cpu backend as a torch operator of its own, which the attention pass inserts once it has chosen that kernel
# for a call: its CPU implementation is registered by the C++ extension, so that a traced graph runs it without
# Python (the public op validates and dispatches in Python); elsewhere it is the public op.
_LIB.define("_attention(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> Tensor")


def _prepared(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    return attention(q, k, v, causal, scale)


def _prepared_fake(q, k, v, causal, scale) -> torch.Tensor:
    return problem(q, k, v, causal, scale).new_output()


_LIB.impl("_attention", _prepared, "CompositeExplicitAutograd")
torch.library.register_fake("sparsekern::_attention", _prepared_fake, lib=_LIB)


def flop_count(q_shape, k_shape, v_shape, causal: bool = False, *args, **kwargs) -> int:
    """FLOPs of one call: :func:`sparsekern.cost.attention_flops` (``2 (E + E_v)`` per visible pair)."""
    from sparsekern.cost import attention_flops

    return attention_flops(tuple(q_shape), tuple(k_shape), tuple(v_shape), bool(causal))


for _packet in (torch.ops.sparsekern.attention, torch.ops.sparsekern._attention):
    if _packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_packet)(flop_count)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False, scale: float | None = None, *,
              backend: str | None = None) -> torch.Tensor:
    """``softmax(scale q k^T) v`` (module docstring); q (B, H, T_q, E), k (B, H, T_k, E), v (B, H, T_k, E_v) ->
    (B, H, T_q, E_v), float32/float16/bfloat16. ``backend`` forces ``"cpu"`` or ``"torch"``. Not differentiable."""
    return torch.ops.sparsekern.attention(q, k, v, causal, scale, backend)
