"""``channel_skip_conv2d``: a convolution that skips, per sample, masked-off input and output channels.

Semantics (docs/design.md#dynamic-plans): for sample b, input channels with ``in_mask[b, c] == False`` are zero and
are never read; output channels with ``out_mask[b, o] == False`` are zero (bias included) and are never
computed. With ``relu`` the kept outputs go through a ReLU. The reference is the dense convolution of the
masked input, times the output mask (:func:`sparsekern.ops.reference.channel_skip_conv2d`).

One torch op, ``torch.ops.sparsekern.channel_skip_conv2d`` (with a fake implementation, so ``torch.compile``
and ``torch.export`` see it). Its body validates the arguments once (:func:`problem`), allocates the output
(shape and memory format from :mod:`sparsekern.ops.shapes`) and runs the first backend of :data:`DISPATCH` that
can take the problem:

=========  ===========================================================================================
cuda       ``csrc/cuda``: implicit GEMM per sample over its active channels (CUDA tensors)
cpu        ``csrc/cpu``: per-sample gathered GEMM over active channels, parallel over samples and tiles
triton     ``sparsekern/kernels/triton``: implicit GEMM per sample (CUDA tensors, or any tensor under
           ``TRITON_INTERPRET=1``)
reference  dense conv times the masks (always)
=========  ===========================================================================================

Each backend declares its devices, dtypes and limits (:class:`sparsekern.ops.backend.Backend`);
``DISPATCH.reasons(...)`` lists all of each backend's reasons for refusing an input. On CUDA tensors ``cuda``
and ``triton`` are tried in the device's preference order
(:func:`sparsekern.ops.thresholds.for_device`: measured by ``sparsekern bench gpu`` when its results file for
the device class is committed, else ``cuda`` first); :func:`select_backend` names the choice.

Inference only: no autograd formula is registered (train with the dense masked form; see
:mod:`sparsekern.methods.sanp`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sparsekern.ops import _ext, reference, thresholds
from sparsekern.ops.backend import FLOATS, Backend, Dispatch
from sparsekern.ops.shapes import Conv2dProblem, conv2d_geometry, conv2d_memory_format, pair

__all__ = ["channel_skip_conv2d", "select_backend", "problem", "ConvProblem", "DISPATCH"]

_OP = "channel_skip_conv2d"
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ConvProblem(Conv2dProblem):
    """Validated arguments of one call (shapes in the op's docstring) and the output they produce."""

    in_mask: torch.Tensor | None = None
    out_mask: torch.Tensor | None = None


def _check_tensors(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, in_mask: torch.Tensor | None,
                   out_mask: torch.Tensor | None) -> None:
    if x.dim() != 4:
        raise ValueError(f"{_OP}: x must be (B, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{_OP}: weight must be (C_out, C_in, kh, kw), got {tuple(weight.shape)}")
    b, c_in = x.shape[:2]
    c_out = weight.shape[0]
    if weight.shape[1] != c_in:
        raise ValueError(
            f"{_OP}: weight {tuple(weight.shape)} expects {weight.shape[1]} input channels but x {tuple(x.shape)} "
            f"has {c_in}; grouped and depthwise convolutions are not supported (groups=1 only)")
    if x.dtype not in FLOATS or weight.dtype != x.dtype:
        raise TypeError(f"{_OP}: x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (c_out,) or bias.dtype != x.dtype):
        raise ValueError(f"{_OP}: bias must be ({c_out},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, mask, c in (("in_mask", in_mask, c_in), ("out_mask", out_mask, c_out)):
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (b, c)):
            raise ValueError(f"{_OP}: {name} must be a bool tensor of shape ({b}, {c}), got {mask.dtype} "
                             f"{tuple(mask.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("in_mask", in_mask), ("out_mask", out_mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")


def problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            in_mask: torch.Tensor | None = None, out_mask: torch.Tensor | None = None,
            stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1,
            relu: bool = False) -> ConvProblem:
    """Validate the arguments of :func:`channel_skip_conv2d` (errors name the argument, its shape and the
    expected one) and return them with their output shape."""
    _check_tensors(x, weight, bias, in_mask, out_mask)
    stride, padding, dilation, out_shape = conv2d_geometry(x, weight, stride, padding, dilation, _OP)
    return ConvProblem(x, weight, bias, stride, padding, dilation, bool(relu), out_shape, conv2d_memory_format(x),
                       in_mask=in_mask, out_mask=out_mask)


# ----------------------------------------------------------------------------- backends
def _extent(t: torch.Tensor, dims: Sequence[int]) -> int:
    """Largest element offset reachable through ``dims``."""
    return sum((t.shape[d] - 1) * abs(t.stride(d)) for d in dims)


def _gpu_kernel_limits(pr: ConvProblem) -> list[str]:
    """The GPU kernels' grid (65535 samples) and int32 index limits."""
    out = []
    if pr.x.shape[0] > 65535:
        out.append(f"batch {pr.x.shape[0]} exceeds the grid's 65535 samples per launch; split the batch")
    _, c_out, h_out, w_out = pr.out_shape
    if _extent(pr.x, (1, 2, 3)) > _INT32_MAX or _extent(pr.weight, (0, 1, 2, 3)) > _INT32_MAX \
            or c_out * h_out * w_out > _INT32_MAX:
        out.append("a sample of x, the weight or an output sample spans more than 2^31 elements; split the layer")
    return out


def _run_cpu(pr: ConvProblem) -> torch.Tensor:
    y = pr.new_output()
    _ext.kernel("channel_skip_conv2d_cpu")(pr.x, pr.weight, pr.bias, pr.in_mask, pr.out_mask, None, pr.stride,
                                           pr.padding, pr.dilation, pr.relu, y)
    return y


def _run_cuda(pr: ConvProblem) -> torch.Tensor:
    y = pr.new_output(torch.contiguous_format)  # the kernel writes NCHW
    _ext.kernel("channel_skip_conv2d_cuda")(pr.x, pr.weight, pr.bias, pr.in_mask, pr.out_mask, pr.stride,
                                            pr.padding, pr.dilation, pr.relu, y)
    return y.contiguous(memory_format=pr.memory_format)


def _run_triton(pr: ConvProblem) -> torch.Tensor:
    from sparsekern.kernels.triton.channel_skip_conv2d import channel_skip_conv2d as launch

    y = pr.new_output()
    launch(pr.x, pr.weight, pr.bias, pr.in_mask, pr.out_mask, pr.stride, pr.padding, pr.dilation, pr.relu, y)
    return y


def _run_reference(pr: ConvProblem) -> torch.Tensor:
    y = reference.channel_skip_conv2d(pr.x, pr.weight, pr.bias, pr.in_mask, pr.out_mask, pr.stride, pr.padding,
                                      pr.dilation, pr.relu)
    return y.contiguous(memory_format=pr.memory_format)


DISPATCH = Dispatch(_OP, problem)
DISPATCH.register(Backend("cuda", _run_cuda, devices=("cuda",), available=_ext.requirement("channel_skip_conv2d_cuda"),
                          limits=_gpu_kernel_limits))
DISPATCH.register(Backend("cpu", _run_cpu, devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("channel_skip_conv2d_cpu")))
DISPATCH.register(Backend("triton", _run_triton, devices=("cuda",), interpreted=True,
                          available=_ext.triton_requirement, limits=_gpu_kernel_limits))
DISPATCH.register(Backend("reference", _run_reference, devices=None))


def _order(pr: ConvProblem) -> Sequence[str]:
    """On CUDA tensors, the device's preferred order of the GPU backends; else registration order."""
    return thresholds.for_device(pr.x.device).channel_skip_order if pr.x.is_cuda else ()


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   in_mask: torch.Tensor | None = None, out_mask: torch.Tensor | None = None,
                   stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
                   dilation: int | Sequence[int] = 1, relu: bool = False, *, backend: str | None = None) -> str:
    """Name of the backend :func:`channel_skip_conv2d` runs for these arguments (``backend`` forces one; an
    error lists why it cannot run them)."""
    pr = problem(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu)
    return DISPATCH.select(pr, backend, _order(pr)).name


# ----------------------------------------------------------------------------- the op
_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define(f"{_OP}(Tensor x, Tensor weight, Tensor? bias, Tensor? in_mask, Tensor? out_mask, int[2] stride, "
            "int[2] padding, int[2] dilation, bool relu, str? backend=None) -> Tensor")


def _impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_mask: Optional[torch.Tensor],
          out_mask: Optional[torch.Tensor], stride: list[int], padding: list[int], dilation: list[int], relu: bool,
          backend: Optional[str] = None) -> torch.Tensor:
    pr = problem(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu)
    return DISPATCH.run(pr, backend, _order(pr))


def _fake(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu, backend=None) -> torch.Tensor:
    pr = problem(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu)
    return pr.new_output()


_LIB.impl(_OP, _impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"sparsekern::{_OP}", _fake, lib=_LIB)


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
        (B, C_out, H_out, W_out) in x's dtype, channels-last when x is (as ``F.conv2d``); exactly zero where
        ``out_mask`` is False.
    """
    stride, padding, dilation = pair(stride, "stride", _OP), pair(padding, "padding", _OP), \
        pair(dilation, "dilation", _OP)
    return torch.ops.sparsekern.channel_skip_conv2d(x, weight, bias, in_mask, out_mask, stride, padding, dilation,
                                                    relu, backend)
