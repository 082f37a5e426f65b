"""``channel_skip_conv2d``: a convolution that skips, per sample, masked-off input and output channels.

Semantics (docs/design.md#dynamic-plans): for sample b, input channels with ``in_mask[b, c] == False`` are zero and
are never read; output channels with ``out_mask[b, o] == False`` are zero (bias included) and are never
computed. With ``relu`` the kept outputs go through a ReLU. The reference is the dense convolution of the
masked input, times the output mask (:func:`sparsekern.ops.reference.channel_skip_conv2d`).

One public op, ``torch.ops.sparsekern.channel_skip_conv2d`` (a torch custom op with a fake implementation,
so ``torch.compile`` and ``torch.export`` see it), whose body runs the first backend that can take the input:

=========  ===========================================================================================
cuda       ``csrc/cuda``: implicit GEMM per sample over its active channels (CUDA tensors)
cpu        ``csrc/cpu``: per-sample gathered GEMM over active channels, parallel over samples and tiles
triton     ``sparsekern/kernels/triton``: implicit GEMM per sample (CUDA tensors, or any tensor under
           ``TRITON_INTERPRET=1``)
reference  dense conv times the masks (always)
=========  ===========================================================================================

On CUDA tensors ``cuda`` and ``triton`` are tried in the device's preference order
(:func:`sparsekern.ops.thresholds.for_device`: measured by ``sparsekern bench gpu`` when its results file for
the device class is committed, else ``cuda`` first); :func:`select_backend` names the choice.

Inference only: no autograd formula is registered (train with the dense masked form; see
:mod:`sparsekern.methods.sanp`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from sparsekern.ops import _ext, reference, thresholds
from sparsekern.ops._dispatch import Dispatch

__all__ = ["channel_skip_conv2d", "select_backend", "DISPATCH", "output_size"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _pair(v: int | Sequence[int], name: str) -> list[int]:
    pair = [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]
    if len(pair) != 2:
        raise ValueError(f"channel_skip_conv2d: {name} must be an int or a pair, got {v!r}")
    return pair


def output_size(h: int, w: int, kernel: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> tuple[int, int]:
    """Spatial output size of a convolution (the usual floor formula)."""
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                 for n, k, s, p, d in zip((h, w), kernel, stride, padding, dilation))


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_mask: torch.Tensor | None,
                  out_mask: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int]) -> None:
    if x.dim() != 4:
        raise ValueError(f"channel_skip_conv2d: x must be (B, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"channel_skip_conv2d: weight must be (C_out, C_in, kh, kw), got {tuple(weight.shape)}")
    b, c_in = x.shape[:2]
    c_out = weight.shape[0]
    if weight.shape[1] != c_in:
        raise ValueError(
            f"channel_skip_conv2d: weight {tuple(weight.shape)} expects {weight.shape[1]} input channels but x "
            f"{tuple(x.shape)} has {c_in}; grouped and depthwise convolutions are not supported (groups=1 only)"
        )
    if x.dtype not in _FLOATS or weight.dtype != x.dtype:
        raise TypeError(f"channel_skip_conv2d: x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.shape != (c_out,) or bias.dtype != x.dtype):
        raise ValueError(f"channel_skip_conv2d: bias must be ({c_out},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, mask, c in (("in_mask", in_mask, c_in), ("out_mask", out_mask, c_out)):
        if mask is None:
            continue
        if mask.dtype != torch.bool or tuple(mask.shape) != (b, c):
            raise ValueError(f"channel_skip_conv2d: {name} must be a bool tensor of shape ({b}, {c}), got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("in_mask", in_mask), ("out_mask", out_mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"channel_skip_conv2d: {name} is on {t.device} but x is on {x.device}")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"channel_skip_conv2d: bad stride {stride} / padding {padding} / dilation {dilation}")
    h_out, w_out = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    if h_out < 1 or w_out < 1:
        raise ValueError(f"channel_skip_conv2d: input {tuple(x.shape)} is smaller than the kernel "
                         f"{tuple(weight.shape[2:])} with padding {padding}")


# ----------------------------------------------------------------------------- backends
def _native_check(device: str):
    def check(x: torch.Tensor, *args) -> str | None:
        if x.device.type != device:
            return f"needs a {device.upper()} tensor, got {x.device}"
        if device == "cpu" and x.dtype != torch.float32:
            return f"the CPU kernel takes float32, got {x.dtype}"
        why = _ext.status()
        if why is not None:
            return f"extension unavailable ({why})"
        if not _ext.has_kernel("channel_skip_conv2d_native", device):
            return f"the extension has no {device.upper()} kernel"
        return None

    return check


def _native_run(*args) -> torch.Tensor:
    return torch.ops.sparsekern.channel_skip_conv2d_native(*args)


def _triton_check(x: torch.Tensor, *args) -> str | None:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return f"needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _triton_run(*args) -> torch.Tensor:
    from sparsekern.kernels.triton.channel_skip_conv2d import channel_skip_conv2d as launch

    return launch(*args)


DISPATCH = Dispatch("channel_skip_conv2d")
DISPATCH.register("cuda", _native_check("cuda"), _native_run)
DISPATCH.register("cpu", _native_check("cpu"), _native_run)
DISPATCH.register("triton", _triton_check, _triton_run)
DISPATCH.register("reference", lambda *args: None, reference.channel_skip_conv2d)


def _preferred(x: torch.Tensor, *args) -> str | None:
    """On CUDA tensors, the first GPU backend in the device's preference order that can take the input; else
    None (registration order)."""
    if not x.is_cuda:
        return None
    checks = {b.name: b.check for b in DISPATCH.backends}
    return next((n for n in thresholds.for_device(x.device).channel_skip_order if checks[n](x, *args) is None), None)


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_mask: torch.Tensor | None,
                   out_mask: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int],
                   relu: bool) -> str:
    """Name of the backend :func:`channel_skip_conv2d` runs for these (checked, paired) arguments."""
    args = (x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu)
    return DISPATCH.select(*args, backend=_preferred(*args)).name


# ----------------------------------------------------------------------------- the op
@torch.library.custom_op("sparsekern::channel_skip_conv2d", mutates_args=())
def _op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_mask: Optional[torch.Tensor],
        out_mask: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
        relu: bool, backend: Optional[str]) -> torch.Tensor:
    args = (x, weight, bias, in_mask, out_mask, list(stride), list(padding), list(dilation), relu)
    return DISPATCH(*args, backend=backend or _preferred(*args))


@_op.register_fake
def _fake(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu, backend):
    h, w = output_size(x.shape[2], x.shape[3], weight.shape[2:], stride, padding, dilation)
    return x.new_empty((x.shape[0], weight.shape[0], h, w))


def channel_skip_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    in_mask: torch.Tensor | None = None,
    out_mask: torch.Tensor | None = None,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    relu: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Convolution (groups=1) that neither reads masked-off input channels nor computes masked-off outputs.

    Args:
        x: (B, C_in, H, W), float32/float16/bfloat16 (half types on GPU), any memory layout.
        weight: (C_out, C_in, kh, kw), same dtype and device.
        bias: (C_out,) or None.
        in_mask: (B, C_in) bool: False = that input channel of that sample is zero (it is not read). None = all.
        out_mask: (B, C_out) bool: False = that output channel of that sample is zero and not computed.
        stride, padding, dilation: as in ``torch.nn.functional.conv2d``.
        relu: apply a ReLU to the computed outputs (fused where the backend can).
        backend: force one backend (``"cuda"``, ``"cpu"``, ``"triton"``, ``"reference"``); default: the first
            that can take the input (see the module docstring).

    Returns:
        (B, C_out, H_out, W_out) in x's dtype; exactly zero where ``out_mask`` is False.
    """
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    _check_inputs(x, weight, bias, in_mask, out_mask, stride, padding, dilation)
    return _op(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu, backend)
