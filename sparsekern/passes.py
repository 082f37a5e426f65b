"""Inference passes: graph rewrites that speed up a model without changing what it computes.

Every pass applies to any model, dense or compiled, so that a benchmark can give the dense baseline
exactly the same passes as the pruned model (DESIGN.md, "Measuring"). Passes work on
``torch.fx.GraphModule`` s; plain modules are traced first.

Passes (names for :func:`apply`):

* ``"fold_bn"``: fold eval-mode BatchNorm into the preceding conv or linear (weights and bias rescaled).
  The result is for inference: the folded layers no longer have batch statistics.
* ``"channels_last"``: store 4-D conv weights and the model's 4-D inputs in NHWC order, the layout that
  oneDNN (CPU) and cuDNN (tensor cores) run natively, so no reorder happens at every layer.
* ``"freeze"``: TorchScript-script the model, freeze it and run ``torch.jit.optimize_for_inference``:
  constants folded, conv weights prepacked once into oneDNN's blocked layout, conv+add+relu fused. On CPU
  this removes the per-call weight reorder and primitive set-up that dominate small batches (measured on
  the project's 2-core machine: dense ResNet-50 at batch 1 went from ~560 ms eager to ~45 ms). It must be
  the last pass; the result is a ``torch.jit.ScriptModule`` for inference only.
"""
from __future__ import annotations

import warnings
from typing import Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from sparsekern.graph import symbolic_trace

__all__ = ["apply", "fold_bn", "channels_last", "freeze", "PASSES"]


def _as_graph_module(model: nn.Module) -> torch.fx.GraphModule:
    if isinstance(model, torch.fx.GraphModule):
        return model
    gm = symbolic_trace(model)
    gm.train(model.training)
    for attr in ("sk_plan", "sk_arch", "sk_compile"):
        if hasattr(model, attr):
            setattr(gm, attr, getattr(model, attr))
    return gm


@torch.no_grad()
def _folded_weights(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of ``bn(layer(x))`` as a single layer; weight scaled along dim 0 (output channels)."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    w = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    b = shift if layer.bias is None else layer.bias * scale + shift
    return w, b


def fold_bn(model: nn.Module) -> torch.fx.GraphModule:
    """Fold every BatchNorm whose only input is a conv/linear used by nothing else into that layer.

    Folding uses the running statistics, so it changes nothing in eval mode. Returns a GraphModule (the
    given one, modified, if ``model`` already is one).
    """
    gm = _as_graph_module(model)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules.get(src.target)
        ok_conv = isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd)
        if not (ok_conv or isinstance(layer, nn.Linear)) or bn.running_mean is None:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        w, b = _folded_weights(layer, bn)
        layer.weight = nn.Parameter(w.contiguous(), requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b.contiguous(), requires_grad=layer.weight.requires_grad)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def channels_last(model: nn.Module) -> torch.fx.GraphModule:
    """NHWC weights and inputs: convert 4-D parameters and insert ``contiguous(channels_last)`` on 4-D inputs.

    The input conversion is a graph op, so it is part of the model (the caller keeps passing NCHW).
    """
    gm = _as_graph_module(model)
    gm.to(memory_format=torch.channels_last)
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        with gm.graph.inserting_after(node):
            conv = gm.graph.call_function(_to_channels_last, (node,))
        node.replace_all_uses_with(conv, delete_user_cb=lambda user: user is not conv)
    gm.graph.lint()
    gm.recompile()
    return gm


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC copy of a 4-D tensor; other tensors pass unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


torch.fx.wrap("_to_channels_last")


def freeze(model: nn.Module) -> torch.jit.ScriptModule:
    """Script, freeze and optimize ``model`` for inference (see the module docstring)."""
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # optimize_for_inference is deprecated in favour of torch.compile, which we measured as no better
        # for pruned/dense speed ratios on CPU; TorchScript also notes fx's instance-level annotations
        warnings.filterwarnings("ignore", message=".*optimize_for_inference.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*instance-level annotations.*", category=UserWarning)
        scripted = torch.jit.script(model)
        return torch.jit.optimize_for_inference(torch.jit.freeze(scripted))

PASSES: dict[str, Callable[[nn.Module], torch.fx.GraphModule]] = {
    "fold_bn": fold_bn,
    "channels_last": channels_last,
    "freeze": freeze,
}


def apply(model: nn.Module, passes: Sequence[str]) -> nn.Module:
    """Apply the named passes in order; the model is modified in place when it is a GraphModule."""
    for i, name in enumerate(passes):
        if name == "freeze" and i != len(passes) - 1:
            raise ValueError(f"'freeze' must be the last inference pass, got {list(passes)}")
        if name not in PASSES:
            raise ValueError(f"unknown inference pass {name!r}; available: {sorted(PASSES)}")
        model = PASSES[name](model)
    return model
