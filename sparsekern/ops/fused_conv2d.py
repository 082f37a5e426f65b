"""``fused_conv2d``: a dense convolution (groups=1) with its epilogue fused: ``act(conv(x, W) + bias + residual)``.

The epilogue is what follows a convolution in an inference graph once BatchNorm is folded into it: the bias,
the residual addition of a ResNet block and the ReLU. Semantics: ``y = conv2d(x, weight, bias)``, then
``y + residual`` when a residual is given, then ``relu`` when asked (the ``aten`` backend computes exactly that).

One torch op, ``torch.ops.sparsekern.fused_conv2d`` (with a fake implementation), validated once
(:func:`problem`) and run by the first backend of :data:`DISPATCH` that can take it:

========  ============================================================================================
cpu       CPU float32 direct convolutions with bias, residual and ReLU applied in registers. Channels-last
          inputs: ``csrc/cpu/conv2d_nhwc.cpp``, a GEMM over output pixels taken across rows and samples
          (so 4x4 and 8x8 maps fill a register tile), vectors along output channels, layers of up to one
          and a half vectors of outputs packing two or four input channels into each output's lanes where
          that takes fewer FMAs (channel groups); the weights are packed once per call, or once per layer
          by :class:`PreparedFusedConv2d`. NCHW inputs: ``csrc/cpu/channel_skip_conv2d.cpp``, the kernel
          of :func:`channel_skip_conv2d` without masks, vectors along output pixels. Narrow layers (a few
          to a few dozen channels) and small maps are where they pay.
aten      ``F.conv2d`` (oneDNN on CPU, cuDNN on GPU), then the add and the ReLU (any device and dtype)
========  ============================================================================================

Which of oneDNN's prepacked call and this op runs a given layer is decided per layer and input shape by
measurement (:mod:`sparsekern.tuning`, used by the ``onednn`` inference pass and :func:`sparsekern.optimize`).
Inference only: no autograd formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from sparsekern.ops import _ext
from sparsekern.ops.backend import FLOATS, Backend, Dispatch
from sparsekern.ops.shapes import (Conv2dProblem, conv2d_geometry, conv2d_memory_format, conv2d_output_size,
                                   like_strides, pair)

__all__ = ["fused_conv2d", "select_backend", "problem", "FusedConvProblem", "PreparedFusedConv2d", "DISPATCH"]

_OP = "fused_conv2d"


@dataclass(frozen=True)
class FusedConvProblem(Conv2dProblem):
    """Validated arguments of one call and the output they produce."""

    residual: torch.Tensor | None = None


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"{_OP}: x must be (B, C_in, H, W) and weight (C_out, C_in, kh, kw), got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{_OP}: weight {tuple(weight.shape)} expects {weight.shape[1]} input channels but x "
                         f"{tuple(x.shape)} has {x.shape[1]}; groups=1 only")
    if x.dtype not in FLOATS or weight.dtype != x.dtype:
        raise TypeError(f"{_OP}: x and weight must share a float dtype, got {x.dtype} and {weight.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != x.dtype):
        raise ValueError(f"{_OP}: bias must be ({weight.shape[0]},) {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}")


def problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, stride: int | Sequence[int] = 1, padding: int | Sequence[int] = 0,
            dilation: int | Sequence[int] = 1, relu: bool = False) -> FusedConvProblem:
    """Validate the arguments of :func:`fused_conv2d` and return them with their output shape."""
    _check(x, weight, bias)
    stride, padding, dilation, out_shape = conv2d_geometry(x, weight, stride, padding, dilation, _OP)
    if residual is not None and (tuple(residual.shape) != out_shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"{_OP}: residual must match the output, {out_shape} {x.dtype} on {x.device}, got "
                         f"{tuple(residual.shape)} {residual.dtype} on {residual.device}")
    return FusedConvProblem(x, weight, bias, stride, padding, dilation, bool(relu), out_shape,
                            conv2d_memory_format(x), residual=residual)


def _run_cpu(pr: FusedConvProblem) -> torch.Tensor:
    if pr.memory_format == torch.channels_last:
        return torch.ops.sparsekern._conv2d_nhwc_prepacked(
            pr.x, _ext.kernel("conv2d_nhwc_pack_cpu")(pr.weight, any(pr.padding)),
            None if pr.bias is None else pr.bias.contiguous(),
            pr.residual, list(pr.weight.shape[2:]), pr.stride, pr.padding, pr.dilation, pr.weight.shape[0], pr.relu)
    y = pr.new_output()
    _ext.kernel("channel_skip_conv2d_cpu")(pr.x, pr.weight, pr.bias, None, None, like_strides(pr.residual, y),
                                           pr.stride, pr.padding, pr.dilation, pr.relu, y)
    return y


def _run_aten(pr: FusedConvProblem) -> torch.Tensor:
    y = F.conv2d(pr.x, pr.weight, pr.bias, pr.stride, pr.padding, pr.dilation)
    if pr.residual is not None:
        y = y.add_(pr.residual)
    if pr.relu:
        y = y.relu_()
    return y.contiguous(memory_format=pr.memory_format)


DISPATCH = Dispatch(_OP, problem)
DISPATCH.register(Backend("cpu", _run_cpu, devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("conv2d_nhwc_pack_cpu")))
DISPATCH.register(Backend("aten", _run_aten))


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   residual: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                   padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, relu: bool = False, *,
                   backend: str | None = None) -> str:
    """Name of the backend :func:`fused_conv2d` runs for these arguments."""
    return DISPATCH.select(problem(x, weight, bias, residual, stride, padding, dilation, relu), backend).name


_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define(f"{_OP}(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, int[2] stride, int[2] padding, "
            "int[2] dilation, bool relu, str? backend=None) -> Tensor")


def _impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          stride: list[int], padding: list[int], dilation: list[int], relu: bool,
          backend: Optional[str] = None) -> torch.Tensor:
    return DISPATCH.run(problem(x, weight, bias, residual, stride, padding, dilation, relu), backend)


def _fake(x, weight, bias, residual, stride, padding, dilation, relu, backend=None) -> torch.Tensor:
    return problem(x, weight, bias, residual, stride, padding, dilation, relu).new_output()


_LIB.impl(_OP, _impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"sparsekern::{_OP}", _fake, lib=_LIB)

# The channels-last kernel with prepacked weights as a torch operator (its CPU implementation is registered by the
# C++ extension when it loads): what the cpu backend and PreparedFusedConv2d call, so that a traced graph runs it
# without Python.
_LIB.define("_conv2d_nhwc_prepacked(Tensor x, Tensor packed, Tensor? bias, Tensor? residual, int[2] kernel_size, "
            "int[2] stride, int[2] padding, int[2] dilation, int out_channels, bool relu) -> Tensor")


@torch.library.register_fake("sparsekern::_conv2d_nhwc_prepacked", lib=_LIB)
def _prepacked_fake(x, packed, bias, residual, kernel_size, stride, padding, dilation, out_channels, relu):
    h, w = conv2d_output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return torch.empty((x.shape[0], out_channels, h, w), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


# Several prepacked convolutions, and pooled-MLP gates (sparsekern.ops.gate_guard's), run one after another in one
# parallel region, without a return to the caller between them (sparsekern.conv_chain builds the calls). ``spec``
# holds CHAIN_SPEC values per layer: (input value, residual value or -1, kh, kw, sh, sw, ph, pw, dh, dw,
# out_channels, relu, gate or -1), values numbering the inputs and then each layer's output; an empty bias is none
# (TorchScript's tracer takes no list of optional tensors). Gate k has GATE_SPEC values in ``gate_spec`` (input
# value, granularity, out_channels, the layer it runs with: n for after the last) and GATE_TENSORS tensors in
# ``gates`` (w1, b1, w2, b2, group_always, group_fixed, computed); a layer naming it (the one it runs with or a
# later one) multiplies its output by the gate's per-sample mask of the computed channels, last. Returns the values named by ``outputs``, then, with gates, whether some sample left
# a gate's calibration classes (0-d bool).
CHAIN_SPEC, GATE_SPEC, GATE_TENSORS = 13, 4, 7
_LIB.define("_conv2d_nhwc_chain(Tensor[] inputs, Tensor[] packed, Tensor[] bias, int[] spec, int[] outputs, "
            "Tensor[] gates, int[] gate_spec) -> Tensor[]")


@torch.library.register_fake("sparsekern::_conv2d_nhwc_chain", lib=_LIB)
def _chain_fake(inputs, packed, bias, spec, outputs, gates, gate_spec):
    shapes = [tuple(t.shape) for t in inputs]
    for layer in range(len(packed)):
        src, _, kh, kw, sh, sw, ph, pw, dh, dw, c_out, _, _ = spec[layer * CHAIN_SPEC:(layer + 1) * CHAIN_SPEC]
        b, _, h, w = shapes[src]
        shapes.append((b, c_out, *conv2d_output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))))
    x = inputs[0]
    values = [torch.empty(shapes[o], dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
              for o in outputs]
    return values + [x.new_empty((), dtype=torch.bool)] if gate_spec else values


def _flop_count(x_shape, w_shape, *args, out_val=None, **kwargs) -> int:
    """FLOPs of the convolution, multiply-add = 2 (the epilogue counts 0, as torch counts a conv's bias)."""
    c_out, c_in, kh, kw = (int(s) for s in w_shape)
    b, _, h_out, w_out = out_val.shape
    return 2 * int(b) * c_out * int(h_out) * int(w_out) * c_in * kh * kw


def _register_flops() -> None:
    from torch.utils import flop_counter

    if torch.ops.sparsekern.fused_conv2d not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(torch.ops.sparsekern.fused_conv2d, get_raw=True)(_flop_count)


_register_flops()


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] = 0, dilation: int | Sequence[int] = 1, relu: bool = False, *,
                 backend: str | None = None) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding, dilation) + residual)``, the add and the ReLU optional.

    Args:
        x: (B, C_in, H, W), float32/float16/bfloat16, any memory layout.
        weight: (C_out, C_in, kh, kw) (groups=1), same dtype and device.
        bias: (C_out,) or None.
        residual: (B, C_out, H_out, W_out) or None: added before the ReLU.
        stride, padding, dilation: as in ``torch.nn.functional.conv2d``.
        relu: apply a ReLU last.
        backend: force ``"cpu"`` or ``"aten"``; default: the first that can take the input.

    Returns:
        (B, C_out, H_out, W_out) in x's dtype, channels-last when x is (as ``F.conv2d``).
    """
    stride, padding, dilation = pair(stride, "stride", _OP), pair(padding, "padding", _OP), \
        pair(dilation, "dilation", _OP)
    return torch.ops.sparsekern.fused_conv2d(x, weight, bias, residual, stride, padding, dilation, relu, backend)


class PreparedFusedConv2d(torch.nn.Module):
    """:func:`fused_conv2d` with fixed weights, validated once for one input shape and memory format.

    An inference graph calls the same convolution on the same shapes every time; this module checks the
    weights and geometry when it is built and packs them for the channels-last kernel, so an NHWC call on
    ``input_shape`` costs a shape comparison, the output allocation and the kernel (a few microseconds where
    the op's validation and dispatch cost about ten). Any other input (another shape, an NCHW layout, which
    is also what a 1-channel or 1x1 tensor reads as, another dtype or device) goes through
    :func:`fused_conv2d`, with its full checks and dispatch. ``forward(x, residual=None)`` computes
    ``relu(conv(x) + bias + residual)`` as the op.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int], relu: bool, input_shape: Sequence[int],
                 memory_format: torch.memory_format = torch.channels_last) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        example = torch.empty(tuple(input_shape), dtype=weight.dtype, device=weight.device,
                              memory_format=memory_format)
        pr = problem(example, self.weight, self.bias, None, stride, padding, dilation, relu)
        self.stride, self.padding, self.dilation, self.relu = pr.stride, pr.padding, pr.dilation, pr.relu
        self.input_shape, self.out_shape, self.memory_format = tuple(example.shape), pr.out_shape, pr.memory_format
        self.direct = not DISPATCH["cpu"].reasons(pr)
        # a 1-channel or 1x1 input is NHWC- and NCHW-contiguous at once: the channels-last kernel takes it
        nhwc = self.direct and example.is_contiguous(memory_format=torch.channels_last)
        self.register_buffer("packed", _ext.kernel("conv2d_nhwc_pack_cpu")(self.weight, any(self.padding))
                             if nhwc else None, persistent=False)
        self._kernel_size = list(self.weight.shape[2:])

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        prepared = (self.direct and x.shape == self.input_shape and x.dtype == torch.float32 and x.is_cpu
                    and (residual is None or (residual.shape == self.out_shape and residual.dtype == torch.float32
                                              and residual.is_cpu)))
        if prepared and self.packed is not None and x.is_contiguous(memory_format=torch.channels_last):
            return torch.ops.sparsekern._conv2d_nhwc_prepacked(x, self.packed, self.bias, residual, self._kernel_size,
                                                               self.stride, self.padding, self.dilation,
                                                               self.out_shape[1], self.relu)
        # every other call through the op: a tracer (the script pass) records only torch ops, so no extension
        # function may write the result here
        return fused_conv2d(x, self.weight, self.bias, residual, self.stride, self.padding, self.dilation, self.relu)

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return (f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, relu={self.relu}, input_shape={self.input_shape}")
