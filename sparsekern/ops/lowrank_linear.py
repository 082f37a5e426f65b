"""``lowrank_linear``: ``y = x Q^T P^T + bias`` with the rank-r intermediate kept on chip.

Shapes: x (..., in), Q (r, in), P (out, r), bias (out,) -> (..., out). One public op,
``torch.ops.sparsekern.lowrank_linear`` (custom op with a fake implementation), whose body runs the first
backend that can take the input. (Backends beyond the reference are being added.)
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsekern.ops import reference
from sparsekern.ops._dispatch import Dispatch

__all__ = ["lowrank_linear", "DISPATCH"]

DISPATCH = Dispatch("lowrank_linear")
DISPATCH.register("reference", lambda *args: None, reference.lowrank_linear)


@torch.library.custom_op("sparsekern::lowrank_linear", mutates_args=())
def _op(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: Optional[torch.Tensor],
        backend: Optional[str]) -> torch.Tensor:
    return DISPATCH(x, q, p, bias, backend=backend)


@_op.register_fake
def _fake(x, q, p, bias, backend):
    return x.new_empty((*x.shape[:-1], p.shape[0]))


def lowrank_linear(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str | None = None) -> torch.Tensor:
    """``x @ Q.T @ P.T + bias``: x (..., in), Q (r, in), P (out, r), bias (out,) -> (..., out)."""
    return _op(x, q, p, bias, backend)
