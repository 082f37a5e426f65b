"""Output shapes and memory formats of the ops: one definition each, used by the ops' validation, their fake
(meta) implementations and the outputs they allocate for every backend (the kernels never recompute them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from sparsekern.ops.backend import OnInput

__all__ = ["pair", "conv2d_output_size", "conv2d_geometry", "conv2d_memory_format", "tokens", "Conv2dProblem",
           "like_strides"]


def pair(value: int | Sequence[int], name: str, op: str) -> list[int]:
    """``value`` as a pair of ints (an int is repeated); ``ValueError`` naming ``op`` and ``name`` otherwise."""
    out = [int(value), int(value)] if isinstance(value, int) else [int(v) for v in value]
    if len(out) != 2:
        raise ValueError(f"{op}: {name} must be an int or a pair, got {value!r}")
    return out


def conv2d_output_size(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int]) -> tuple[int, int]:
    """Spatial output size of a convolution: ``(n + 2 p - d (k - 1) - 1) // s + 1`` per axis (may be < 1 when
    the input is smaller than the dilated kernel)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))


def conv2d_geometry(x: torch.Tensor, weight: torch.Tensor, stride: int | Sequence[int], padding: int | Sequence[int],
                    dilation: int | Sequence[int], op: str) -> tuple[list[int], list[int], list[int], tuple[int, ...]]:
    """A 2-D convolution's stride, padding and dilation as pairs, checked, and its output shape
    (B, C_out, H_out, W_out) for x (B, C_in, H, W) and weight (C_out, C_in, kh, kw); ``ValueError`` naming ``op``
    for a bad geometry or an input smaller than the dilated kernel."""
    stride, padding, dilation = pair(stride, "stride", op), pair(padding, "padding", op), pair(dilation, "dilation", op)
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"{op}: bad stride {stride} / padding {padding} / dilation {dilation}")
    h_out, w_out = conv2d_output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"{op}: input {tuple(x.shape)} is smaller than the kernel {tuple(weight.shape[2:])} with "
                         f"padding {padding} and dilation {dilation}")
    return stride, padding, dilation, (x.shape[0], weight.shape[0], h_out, w_out)


def conv2d_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a convolution's output for input ``x`` (B, C, H, W): channels-last when ``x`` is
    channels-last (and not also plainly contiguous, as for C = 1 or 1x1 maps), else contiguous; the rule of
    ``F.conv2d``."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def tokens(shape: Sequence[int]) -> int:
    """Number of rows of a (..., features) tensor: the product of the leading dims (1 for a vector)."""
    t = 1
    for s in shape[:-1]:
        t *= int(s)
    return t


@dataclass(frozen=True)
class Conv2dProblem(OnInput):
    """The validated arguments a 2-D convolution op shares (x (B, C_in, H, W), weight (C_out, C_in, kh, kw),
    bias (C_out,) or None, geometry pairs, a fused ReLU) and the output they produce; each op's problem adds
    its own arguments."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    relu: bool
    out_shape: tuple[int, int, int, int]
    memory_format: torch.memory_format

    def new_output(self, memory_format: torch.memory_format | None = None) -> torch.Tensor:
        """An uninitialised output (in the op's memory format, the input's, unless another is asked for)."""
        return torch.empty(self.out_shape, dtype=self.x.dtype, device=self.x.device,
                           memory_format=memory_format or self.memory_format)


def like_strides(t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor | None:
    """``t`` (``y``'s shape) with ``y``'s strides, for a kernel that reads it at ``y``'s offsets: ``t`` itself when
    the strides already match, else a copy."""
    if t is None or t.stride() == y.stride():
        return t
    return torch.empty_strided(y.shape, y.stride(), dtype=y.dtype, device=y.device).copy_(t)
