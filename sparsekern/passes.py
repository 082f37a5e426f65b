"""Inference passes: graph rewrites that speed up a model without changing what it computes.

Every pass applies to any model, dense or compiled, so that a benchmark can give the dense baseline
exactly the same passes as the pruned model (docs/design.md#measuring). Passes work on
``torch.fx.GraphModule`` s; plain modules are traced first. A pass returns a new model and leaves the one it
was given untouched (parameters, buffers, train/eval flags), unless called with ``inplace=True``, which may
then modify and reuse it.

Passes (names for :func:`apply`):

* ``"fold_bn"``: fold eval-mode BatchNorm into the preceding conv or linear (weights and bias rescaled).
  The result is for inference: the folded layers no longer have batch statistics.
* ``"channels_last"``: store 4-D conv weights and the model's 4-D inputs in NHWC order, the layout that
  oneDNN (CPU) and cuDNN (tensor cores) run natively, so no reorder happens at every layer.
* ``"onednn"``: the CPU inference path. Every 2-D conv becomes one call that fuses the ReLU that follows it,
  or the residual add (and ReLU) that consumes it: oneDNN's convolution with weights prepacked once for the
  actual input shape (no per-call weight reorder), or sparsekern's direct convolution
  (:func:`sparsekern.ops.fused_conv2d`) where :mod:`sparsekern.tuning` measured it faster for that layer and
  shape. Activations stay NHWC (``view`` becomes ``reshape``); the result's ``sk_backends`` maps each conv to
  its backend. Needs ``example_inputs``; run ``"fold_bn"`` first. Other batch sizes still run correctly
  (oneDNN may then reorder).
* ``"conv_chain"``: each run of consecutive direct convolutions left by ``"onednn"`` becomes one operator call
  (:mod:`sparsekern.conv_chain`): the threads stay in one parallel region, synchronised between layers, which
  removes most of the per-call cost that dominates small convolutions at batch 1.
* ``"onednn_linear"``: the CPU inference path of linear layers (:mod:`sparsekern.onednn_linear`): ``nn.Linear``
  and the low-rank and feature-selecting layers of compiled FLOP models become oneDNN matmuls with weights
  prepacked once, fusing the GELU, ReLU or residual add that follows (or torch's / sparsekern's kernel where
  measured faster); dropout is removed. Needs ``example_inputs``.
* ``"attention"``: ``scaled_dot_product_attention`` calls without mask or dropout run by
  :func:`sparsekern.ops.attention` (causal tiles above the diagonal skipped) where measured faster than torch's
  kernel (:mod:`sparsekern.attention_pass`). Needs ``example_inputs``.
* ``"freeze"``: TorchScript-script the model, freeze it and run ``torch.jit.optimize_for_inference``:
  constants folded, conv weights prepacked once into oneDNN's blocked layout, conv+add+relu fused. On CPU
  this removes the per-call weight reorder and primitive set-up that dominate small batches. It must be
  the last pass; the result is a ``torch.jit.ScriptModule`` for inference only.
* ``"script"``: the graph after the other passes, traced for the example inputs and frozen, so that a forward
  is one call into TorchScript's interpreter instead of one Python call per layer
  (:mod:`sparsekern.script_pass`). It must be the last pass; the result is a ``torch.jit.ScriptModule`` (with
  the ``sk_backends`` of the passes before it). Dynamic (per-sample gated) layers are refused. Needs
  ``example_inputs``.
"""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from sparsekern.attention_pass import attention
from sparsekern.conv_chain import conv_chain
from sparsekern.fusion import as_graph_module, calls_tagged, finish_rewrite, single_user
from sparsekern.onednn_linear import onednn_linear
from sparsekern.script_pass import script
from sparsekern.tuning import ConvCall, Tuner, current_tuner, use_tuner

__all__ = ["apply", "optimize", "register_pass", "fold_bn", "channels_last", "onednn", "conv_chain", "onednn_linear",
           "attention",
           "freeze", "script", "PASSES", "DEVICE_PASSES"]


@torch.no_grad()
def folded_weights(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
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


def fold_bn(model: nn.Module, *, inplace: bool = False) -> torch.fx.GraphModule:
    """Fold every BatchNorm whose only input is a conv/linear used by nothing else into that layer.

    Folding uses the running statistics, so it changes nothing in eval mode. A conv or BatchNorm module
    called more than once (shared weights) is left unfolded. Returns a GraphModule (``model`` itself,
    modified, only with ``inplace=True`` when it already is one).
    """
    gm = as_graph_module(model, inplace)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[node.target]
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue
        layer = modules.get(src.target)
        ok_conv = isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd)
        if not (ok_conv or isinstance(layer, nn.Linear)) or bn.running_mean is None:
            continue
        if layer.weight.shape[0] != bn.num_features:
            continue
        w, b = folded_weights(layer, bn)
        layer.weight = nn.Parameter(w.contiguous(), requires_grad=layer.weight.requires_grad)
        layer.bias = nn.Parameter(b.contiguous(), requires_grad=layer.weight.requires_grad)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        gm.delete_submodule(node.target)
    gm.graph.lint()
    gm.recompile()
    return gm


def channels_last(model: nn.Module, *, inplace: bool = False) -> torch.fx.GraphModule:
    """NHWC weights and inputs: convert 4-D parameters and insert ``contiguous(channels_last)`` on 4-D inputs.

    The input conversion is a graph op, so it is part of the model (the caller keeps passing NCHW).
    """
    gm = as_graph_module(model, inplace)
    gm.to(memory_format=torch.channels_last)
    _channels_last_inputs(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _channels_last_inputs(gm: torch.fx.GraphModule) -> None:
    """Convert 4-D inputs to NHWC at the top of the graph, and make ``view`` calls ``reshape`` (a view of an
    NHWC tensor across its channel axis is not expressible; reshape copies where it must)."""
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target == "view":
            node.target = "reshape"
    for node in list(gm.graph.nodes):
        if node.op != "placeholder":
            continue
        with gm.graph.inserting_after(node):
            conv = gm.graph.call_function(_to_channels_last, (node,))
        node.replace_all_uses_with(conv, delete_user_cb=lambda user: user is not conv)


def _to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """NHWC copy of a 4-D tensor; other tensors pass unchanged."""
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


torch.fx.wrap("_to_channels_last")


def _fusable_chain(
    conv: torch.fx.Node, modules: dict[str, nn.Module]
) -> tuple[list[torch.fx.Node], str | None, torch.fx.Node | None]:
    """The nodes oneDNN can run as one call: conv [-> add(other)] [-> relu].

    Returns (chain of nodes starting at ``conv``, ``"relu"`` or None, the add's other operand or None).
    """
    chain, unary, other = [conv], None, None
    user = single_user(conv)
    if user is not None and calls_tagged(user, "add", modules) and len(user.args) == 2:
        a, b = user.args
        candidate = b if a is conv else a
        cm = candidate.meta.get("tensor_meta") if isinstance(candidate, torch.fx.Node) else None
        om = user.meta.get("tensor_meta")
        if candidate is not conv and cm is not None and om is not None and cm.shape == om.shape and cm.dtype == om.dtype:
            chain.append(user)
            other = candidate
            user = single_user(user)
    if user is not None and user is not chain[-1] and calls_tagged(user, "relu", modules):
        chain.append(user)
        unary = "relu"
    return chain, unary, other


def onednn_weight(weight: torch.Tensor, padding: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
                  groups: int, input_shape: Sequence[int]) -> torch.Tensor:
    """``weight`` (float32, (C_out, C_in / groups, kh, kw)) reordered once into oneDNN's layout for inputs of
    ``input_shape``, for ``torch.ops.mkldnn._convolution_pointwise`` (no per-call reorder)."""
    return torch._C._nn.mkldnn_reorder_conv2d_weight(
        weight.detach().to_mkldnn(), list(padding), list(stride), list(dilation), groups, list(input_shape))


def onednn(model: nn.Module, example_inputs: Any, *, inplace: bool = False,
           tuner: Tuner | None = None) -> torch.fx.GraphModule:
    """Prepacked, fused oneDNN convolutions, or the direct convolution where it measured faster (see the module
    docstring); the result is for inference and records each conv's backend in ``sk_backends``."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = as_graph_module(model, inplace).eval()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    modules = dict(gm.named_modules())
    tuner = tuner or current_tuner()
    backends: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
            continue
        x = node.args[0]
        meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
        if meta is None or meta.dtype != torch.float32 or conv.weight.dtype != torch.float32:
            continue
        backends[node.target] = _fuse_conv(gm, node, conv, tuple(meta.shape), modules, len(backends), tuner)
    _channels_last_inputs(gm)
    return finish_rewrite(gm, backends)


def _fuse_conv(gm: torch.fx.GraphModule, node: torch.fx.Node, conv: nn.Conv2d, in_shape: tuple[int, ...],
               modules: dict[str, nn.Module], count: int, tuner: Tuner) -> str:
    """Replace ``conv`` [-> add] [-> relu] by one call of the backend ``tuner`` picks; return its name."""
    chain, unary, other = _fusable_chain(node, modules)
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation))
    packed = onednn_weight(conv.weight, *geometry, conv.groups, in_shape)
    bias = None if conv.bias is None else conv.bias.detach().clone()
    direct = _prepared_direct(conv, in_shape, unary == "relu")
    backend = "onednn" if direct is None else _choose_backend(conv, in_shape, packed, bias, direct,
                                                              other is not None, unary == "relu", tuner)
    last = chain[-1]
    x = node.args[0]
    with gm.graph.inserting_before(last):
        if backend == "direct":
            gm.add_submodule(f"_sk_conv{count}", direct)
            fused = gm.graph.call_module(f"_sk_conv{count}", (x, other))
        else:
            wname, bname = f"_sk_onednn_w{count}", f"_sk_onednn_b{count}"
            gm.register_buffer(wname, packed, persistent=False)
            gm.register_buffer(bname, bias, persistent=False)
            w = gm.graph.get_attr(wname)
            b = gm.graph.get_attr(bname) if bias is not None else None
            if other is None:
                fused = gm.graph.call_function(torch.ops.mkldnn._convolution_pointwise.default,
                                               (x, w, b, *geometry, conv.groups, unary or "none", [], ""))
            else:
                fused = gm.graph.call_function(torch.ops.mkldnn._convolution_pointwise.binary,
                                               (x, other, w, b, *geometry, conv.groups, "add", None, unary, [], ""))
    fused.meta = dict(last.meta)
    last.replace_all_uses_with(fused)
    for dead in reversed(chain):
        gm.graph.erase_node(dead)
    return backend


def _prepared_direct(conv: nn.Conv2d, in_shape: tuple[int, ...], relu: bool) -> nn.Module | None:
    """The direct convolution of ``conv`` prepared for NHWC inputs of ``in_shape``, or None where it cannot run
    (grouped convs, no C++ extension)."""
    from sparsekern.ops.fused_conv2d import PreparedFusedConv2d

    if conv.groups != 1:
        return None
    prepared = PreparedFusedConv2d(conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, relu, in_shape)
    return prepared if prepared.direct else None


def _choose_backend(conv: nn.Conv2d, in_shape: tuple[int, ...], packed: torch.Tensor, bias: torch.Tensor | None,
                    direct: nn.Module, residual: bool, relu: bool, tuner: Tuner) -> str:
    """``"onednn"`` or ``"direct"`` for this conv on NHWC inputs of ``in_shape``: the tuner times both calls as
    the graph would make them, on random data of the layer's shapes (or answers from its table)."""
    x = torch.randn(in_shape).contiguous(memory_format=torch.channels_last)
    other = torch.randn(direct.out_shape).contiguous(memory_format=torch.channels_last) if residual else None
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
    if other is None:
        onednn_call = lambda: torch.ops.mkldnn._convolution_pointwise(  # noqa: E731
            x, packed, bias, *geometry, "relu" if relu else "none", [], "")
    else:
        onednn_call = lambda: torch.ops.mkldnn._convolution_pointwise.binary(  # noqa: E731
            x, other, packed, bias, *geometry, "add", None, "relu" if relu else None, [], "")
    call = ConvCall(tuple(in_shape), tuple(conv.weight.shape), tuple(conv.stride), tuple(conv.padding),
                    tuple(conv.dilation), bias is not None, residual, relu, True, torch.get_num_threads())
    return tuner.choose(call, {"onednn": onednn_call, "direct": lambda: direct(x, other)})


def freeze(model: nn.Module, *, inplace: bool = False) -> torch.jit.ScriptModule:
    """Script, freeze and optimize ``model`` for inference (see the module docstring)."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    with torch.no_grad(), warnings.catch_warnings():
        # optimize_for_inference is deprecated in favour of torch.compile, which we measured as no better
        # for pruned/dense speed ratios on CPU; TorchScript also notes fx's instance-level annotations
        warnings.filterwarnings("ignore", message=".*optimize_for_inference.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*instance-level annotations.*", category=UserWarning)
        scripted = torch.jit.script(model)
        return torch.jit.optimize_for_inference(torch.jit.freeze(scripted))

PASSES: dict[str, Callable[..., nn.Module]] = {
    "fold_bn": fold_bn,
    "channels_last": channels_last,
    "onednn": onednn,
    "conv_chain": conv_chain,
    "onednn_linear": onednn_linear,
    "attention": attention,
    "freeze": freeze,
    "script": script,
}
_NEEDS_INPUTS = {"onednn", "onednn_linear", "attention", "script"}


def register_pass(name: str, fn: Callable[..., nn.Module], *, needs_inputs: bool = False,
                  replace: bool = False) -> None:
    """Make ``fn`` available to :func:`apply` as ``name``.

    ``fn(model, *, inplace)`` (or ``fn(model, example_inputs, *, inplace)`` with ``needs_inputs``) returns the
    rewritten model and must leave what the model computes unchanged, for dense and compiled models alike;
    with ``inplace=False`` it must not modify ``model``. A taken name is refused unless ``replace``.
    """
    if name in PASSES and not replace:
        raise ValueError(f"inference pass {name!r} is already registered; pass replace=True to replace it")
    PASSES[name] = fn
    if needs_inputs:
        _NEEDS_INPUTS.add(name)
    else:
        _NEEDS_INPUTS.discard(name)


def apply(model: nn.Module, passes: Sequence[str], example_inputs: Any = None, *, inplace: bool = False) -> nn.Module:
    """Apply the named passes in order and return the result.

    ``example_inputs`` (a tensor or tuple) are needed by the passes that specialise to input shapes
    (``"onednn"``). ``model`` is left untouched (the passes run on a copy) unless ``inplace=True``. A model
    with a method ``sk_apply_passes(run, passes, example_inputs)`` applies them to its parts itself, calling
    ``run(part, names)`` for each part and returning the model (:class:`sparsekern.hybrid.GuardedModel`).
    """
    for i, name in enumerate(passes):
        if name in ("freeze", "script") and i != len(passes) - 1:
            raise ValueError(f"{name!r} must be the last inference pass, got {list(passes)}")
        if name not in PASSES:
            raise ValueError(f"unknown inference pass {name!r}; available: {sorted(PASSES)}")
        if name in _NEEDS_INPUTS and example_inputs is None:
            raise ValueError(f"inference pass {name!r} needs example_inputs (it prepacks for their shapes)")
    if passes and not inplace:
        model = copy.deepcopy(model)
    parts = getattr(model, "sk_apply_passes", None)
    if passes and callable(parts):  # a model of several parts applies the passes to each (sparsekern.hybrid)
        return parts(lambda part, names: apply(part, names, example_inputs, inplace=True), tuple(passes),
                     example_inputs)
    for name in passes:
        if name in _NEEDS_INPUTS:
            model = PASSES[name](model, example_inputs, inplace=True)
        else:
            model = PASSES[name](model, inplace=True)
    return model


#: The inference path :func:`optimize` takes per device type.
DEVICE_PASSES: dict[str, tuple[str, ...]] = {
    "cpu": ("fold_bn", "onednn", "conv_chain", "onednn_linear", "attention"),
    "cuda": ("fold_bn", "channels_last"),
}


def optimize(model: nn.Module, example_inputs: Any, *, device: str = "cpu", tuner: Tuner | None = None,
             script: bool = False) -> nn.Module:
    """The best inference path sparsekern has for ``device``, for any model, dense or compiled (give the dense
    baseline the same call): a copy of ``model`` after :data:`DEVICE_PASSES` ``[device]``.

    On CPU that is BatchNorm folding, the ``onednn`` pass (every conv with its ReLU or residual add fused, run by
    oneDNN with weights prepacked for ``example_inputs``' shapes or by the direct convolution), the
    ``conv_chain`` pass (consecutive direct convolutions in one call), the ``onednn_linear`` pass (every
    linear or low-rank layer with its GELU, ReLU or residual add fused, run by
    oneDNN's prepacked matmuls or by torch's or sparsekern's kernel) and the ``attention`` pass (attention by
    torch's kernel or sparsekern's), each kernel the one ``tuner`` (default
    :func:`sparsekern.tuning.current_tuner`) measured faster for that layer; the result's ``sk_backends`` names
    each layer's choice. With ``script`` (CPU), the result is then traced and frozen into a
    ``torch.jit.ScriptModule`` that runs without per-layer Python calls (the ``script`` pass; per-sample
    dynamic models are refused, a calibrated one traces its static part). ``model`` is not modified.
    """
    if device not in DEVICE_PASSES:
        raise ValueError(f"optimize: no inference path for device {device!r}; known: {sorted(DEVICE_PASSES)}")
    if script and device != "cpu":
        raise ValueError(f"optimize: script=True is the CPU path's last step, not one for device {device!r}")
    with contextlib.ExitStack() as stack:
        if tuner is not None:
            stack.enter_context(use_tuner(tuner))
        return apply(model, DEVICE_PASSES[device] + (("script",) if script else ()), example_inputs)
