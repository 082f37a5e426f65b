"""Plain-torch references of every op: the ground truth for tests and benchmarks.

They compute densely and mask afterwards (exactly what the kernels must avoid), in float32 whatever the
input dtype, and return the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["channel_skip_conv2d", "lowrank_linear"]


def channel_skip_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    in_mask: torch.Tensor | None,
    out_mask: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    """``conv2d(x * in_mask, weight, bias)`` (ReLU if ``relu``) ``* out_mask``.

    Shapes: x (B, C_in, H, W); weight (C_out, C_in, kh, kw); bias (C_out,); in_mask (B, C_in) and out_mask
    (B, C_out), bool. Returns (B, C_out, H_out, W_out) in x's dtype.
    """
    xf = x.float()
    if in_mask is not None:  # masked_fill, not a multiply: NaN/inf in masked-off channels must not leak
        xf = xf.masked_fill(~in_mask[:, :, None, None], 0.0)
    y = F.conv2d(xf, weight.float(), None if bias is None else bias.float(), tuple(stride), tuple(padding),
                 tuple(dilation))
    if relu:
        y = torch.relu(y)
    if out_mask is not None:
        y = y * out_mask.to(y.dtype)[:, :, None, None]
    return y.to(x.dtype)


def lowrank_linear(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x Q^T P^T + bias``. Shapes: x (..., in); Q (r, in); P (out, r); bias (out,). Returns (..., out)."""
    y = (x.float() @ q.float().t()) @ p.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
