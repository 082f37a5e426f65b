"""The ``script`` inference pass: an optimized graph run by TorchScript's interpreter instead of Python.

After ``fold_bn`` and ``onednn`` (and the other passes of :func:`sparsekern.optimize`), a model is a straight
line of kernel calls, and at small batch the Python that makes each call (the module call, the argument
checks, the dispatch) costs as much as the kernel: a few microseconds per layer, against a 4-10 us 8-channel
convolution. This pass traces the graph for the example inputs' shapes (``torch.jit.trace``) and freezes it
(``torch.jit.freeze``: weights become constants), so a forward is one call into C++.

What it needs from the graph: ops that TorchScript can call. sparsekern's prepared direct convolution calls a
native torch operator (``sparsekern::_conv2d_nhwc_prepacked``); oneDNN's fused calls take a ``Scalar?[]``
argument that the tracer cannot record as a constant, so they are routed through the scripted wrappers below.
Ops implemented in Python (``sparsekern::attention``, ``sparsekern::lowrank_linear``) still run, called back
from TorchScript. Like ``freeze``, it must be the last pass; the result is a ``torch.jit.ScriptModule``
specialised to the example inputs' shapes (other batch sizes run, through the same kernels).

TorchScript is deprecated upstream (``torch.jit`` warns) in favour of ``torch.compile`` and ``torch.export``;
it is what runs a graph of these kernels without Python or a C++ compiler at run time today, as the ``freeze``
pass does. Tracing records one path through the code, so the result is exact only where no module decides what
to compute from the data. A graph traced by ``torch.fx`` satisfies that for its own nodes; leaf modules must
too. The per-sample gated layers of dynamic plans (:mod:`sparsekern.dynamic`) do not, and are refused; a
calibrated model (:class:`sparsekern.hybrid.GuardedModel`) gets this pass on its static part only.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, List, Optional, Union

import torch
import torch.nn as nn

from sparsekern.fusion import as_graph_module

__all__ = ["script"]

# what oneDNN's fused calls take for their (always empty) list of scalar arguments, typed for TorchScript
_Scalars = List[Optional[Union[int, float, complex]]]


def _conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], padding: List[int], stride: List[int],
          dilation: List[int], groups: int, attr: str, algorithm: Optional[str]) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, dilation, groups, attr,
                                                   torch.jit.annotate(_Scalars, []), algorithm)


def _conv_binary(x: torch.Tensor, other: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor],
                 padding: List[int], stride: List[int], dilation: List[int], groups: int, binary: str,
                 unary: Optional[str], algorithm: Optional[str]) -> torch.Tensor:
    return torch.ops.mkldnn._convolution_pointwise(x, other, w, b, padding, stride, dilation, groups, binary, None,
                                                   unary, torch.jit.annotate(_Scalars, []), algorithm)


def _linear(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], attr: str,
            algorithm: Optional[str]) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, attr, torch.jit.annotate(_Scalars, []), algorithm)


@functools.cache
def _scripted(name: str) -> Callable[..., torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script({"conv": _conv, "conv_binary": _conv_binary, "linear": _linear}[name])


def _traceable_conv(x, w, b, padding, stride, dilation, groups, attr, scalars, algorithm):
    _no_scalars(scalars)
    return _scripted("conv")(x, w, b, padding, stride, dilation, groups, attr, algorithm)


def _traceable_conv_binary(x, other, w, b, padding, stride, dilation, groups, binary, alpha, unary, scalars,
                           algorithm):
    _no_scalars(scalars, alpha)
    return _scripted("conv_binary")(x, other, w, b, padding, stride, dilation, groups, binary, unary, algorithm)


def _traceable_linear(x, w, b, attr, scalars, algorithm):
    _no_scalars(scalars)
    return _scripted("linear")(x, w, b, attr, algorithm)


def _no_scalars(scalars: Any, alpha: Any = None) -> None:
    if scalars or alpha is not None:
        raise ValueError(f"script: oneDNN calls with scalar arguments ({scalars}, alpha {alpha}) are not supported")


_TRACEABLE = {
    torch.ops.mkldnn._convolution_pointwise.default: _traceable_conv,
    torch.ops.mkldnn._convolution_pointwise.binary: _traceable_conv_binary,
    torch.ops.mkldnn._linear_pointwise.default: _traceable_linear,
}


def script(model: nn.Module, example_inputs: Any, *, inplace: bool = False) -> torch.jit.ScriptModule:
    """``model`` (an optimized graph) traced for ``example_inputs`` and frozen (see the module docstring); its
    ``sk_backends`` (the kernel choices of the earlier passes) are carried over. ``model`` is not modified."""
    from sparsekern.dynamic import dynamic_layers

    dynamic = dynamic_layers(model)
    if dynamic:
        raise ValueError(f"script: {dynamic[0]} ({len(dynamic)} layers in all) computes per-sample channel masks, "
                         "which tracing would fix to the example inputs' masks; run dynamic models without 'script'")
    gm = as_graph_module(model, inplace).eval()
    backends = dict(getattr(gm, "sk_backends", {}))
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _TRACEABLE:
            node.target = _TRACEABLE[node.target]
    gm.recompile()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's; see the module docstring
            frozen = torch.jit.freeze(torch.jit.trace(gm, inputs, check_trace=False))
    except RuntimeError as e:
        raise RuntimeError(f"script: TorchScript could not trace this model ({str(e).splitlines()[0]}); run it "
                           "without the 'script' pass") from e
    frozen.sk_backends = backends
    return frozen
