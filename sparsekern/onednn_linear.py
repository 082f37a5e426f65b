"""The ``onednn_linear`` inference pass: linear layers, dense and low-rank, as oneDNN matmuls with their weights
prepacked once and the activation or residual add that follows them fused in.

torch runs ``nn.Linear`` on CPU through its BLAS (MKL in the official wheels), which repacks the weight on every
call and, on CPUs other than Intel's, may not use the widest vector units; oneDNN's matmul with a weight reordered
once for the input shape (``torch.ops.mkldnn._linear_pointwise``, what ``torch.compile`` uses on CPU) does
neither. The pass rewrites, for float32 inputs:

* ``nn.Linear``: one oneDNN matmul, or torch's own call where the tuner measured that faster;
* :class:`~sparsekern.lowrank.LowRankLinear` (``x Q^T P^T + bias``): two prepacked oneDNN matmuls, the second
  with the bias and epilogue, or sparsekern's fused low-rank kernel (:func:`sparsekern.ops.lowrank_linear`,
  backend ``"cpu"``) where measured faster;
* :class:`~sparsekern.lowrank.FeatureSelectLinear` (``x[..., index] W^T + bias``): the gather, then one
  prepacked matmul.

The epilogue fused into the oneDNN call is the single use of the layer's output when it is a GELU (exact or
tanh), a ReLU, or a two-operand add of a tensor of the output's shape (a residual). A LayerNorm over the last
dimension whose only use is a low-rank layer, or a dense one without epilogue, is a candidate prologue: its
``gamma`` folds into the (first) weight, the matmul reads the raw rows, and
:func:`sparsekern.ops.layer_norm_fold.layer_norm_fold` finishes the normalisation on the layer's (first) output,
where the tuner measured that faster than the LayerNorm and the layer apart. Dropout and identity modules
are removed first (the result is for inference). Each rewritten layer's kernel is recorded in the result's
``sk_backends`` (``"onednn"``, ``"torch"``, ``"sparsekern"``; ``"onednn+layer_norm"`` for the fold), chosen by
:func:`sparsekern.tuning.current_tuner` from :class:`~sparsekern.tuning.LinearCall` timings, the same for dense
and pruned models. Without oneDNN
(``torch.backends.mkldnn.is_available()`` false) the pass only removes dropout.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from sparsekern.fusion import as_graph_module, calls_tagged, finish_rewrite, single_user
from sparsekern.lowrank import FeatureSelectLinear, LowRankLinear, select_features
from sparsekern.ops import extension
from sparsekern.ops.layer_norm_fold import MAX_OFFSET, fold_weights, layer_norm_fold
from sparsekern.tuning import LinearCall, Tuner, current_tuner

__all__ = ["onednn_linear", "onednn_linear_weight"]

_POINTWISE = torch.ops.mkldnn._linear_pointwise
#: epilogue name -> (oneDNN unary attribute, its algorithm) for ``_linear_pointwise``
_UNARY = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}
#: the backend name of a layer that folds the LayerNorm before it (:func:`sparsekern.ops.layer_norm_fold`)
_FOLD = "onednn+layer_norm"


def onednn_linear_weight(weight: torch.Tensor, tokens: int) -> torch.Tensor:
    """``weight`` (float32, (out, in)) reordered once into oneDNN's layout for inputs of ``tokens`` rows, for
    ``torch.ops.mkldnn._linear_pointwise`` (other row counts still run, maybe with a reorder)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), tokens)


def onednn_linear(model: nn.Module, example_inputs: Any, *, inplace: bool = False,
                  tuner: Tuner | None = None) -> torch.fx.GraphModule:
    """Prepacked, fused oneDNN linear layers (module docstring); the result is for inference."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = as_graph_module(model, inplace).eval()
    modules = dict(gm.named_modules())
    _drop_identities(gm, modules)
    backends: dict[str, str] = {}
    if torch.backends.mkldnn.is_available():
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
        tuner = tuner or current_tuner()
        for node in list(gm.graph.nodes):
            layer = modules.get(node.target) if node.op == "call_module" else None
            x = node.args[0] if node.args else None
            meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
            if layer is None or meta is None or meta.dtype != torch.float32 or len(meta.shape) < 2:
                continue
            rewrite = _REWRITES.get(type(layer))
            if rewrite is not None and all(p.dtype == torch.float32 for p in layer.parameters()):
                backend = rewrite(_Site(gm, node, layer, tuple(meta.shape), modules, len(backends), tuner))
                if backend is not None:
                    backends[node.target] = backend
    return finish_rewrite(gm, backends)


def _drop_identities(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> None:
    """Replace calls of dropout and identity modules (identities in eval mode) by their input."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and type(modules.get(node.target)) in (nn.Dropout, nn.Identity) and node.args:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def _epilogue(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[str, torch.fx.Node | None, torch.fx.Node]:
    """(epilogue name, the residual operand for ``"add"`` or None, the last node the fused call replaces)."""
    user = single_user(node)
    if user is None:
        return "none", None, node
    if user.op == "call_module" and type(modules.get(user.target)) is nn.ReLU:
        return "relu", None, user
    if user.op == "call_function" and user.target in (F.relu, torch.relu) and len(user.args) == 1 \
            and not user.kwargs.get("inplace"):
        return "relu", None, user
    approximate = None
    if user.op == "call_module" and type(modules.get(user.target)) is nn.GELU:
        approximate = modules[user.target].approximate
    elif user.op == "call_function" and user.target is F.gelu and len(user.args) == 1:
        approximate = user.kwargs.get("approximate", "none")
    if approximate in ("none", "tanh"):
        return ("gelu" if approximate == "none" else "gelu_tanh"), None, user
    if calls_tagged(user, "add", modules) and len(user.args) == 2 and not user.kwargs:
        a, b = user.args
        other = b if a is node else a
        om = other.meta.get("tensor_meta") if isinstance(other, torch.fx.Node) else None
        um = user.meta.get("tensor_meta")
        if other is not node and om is not None and um is not None and om.shape == um.shape and om.dtype == um.dtype:
            return "add", other, user
    return "none", None, node


def _layer_norm_prologue(node: torch.fx.Node, modules: dict[str, nn.Module],
                         in_features: int) -> tuple[torch.fx.Node, nn.LayerNorm] | None:
    """The LayerNorm call that produces ``node``'s input, when it can fold into the layer: over the last
    dimension (``in_features``), float32, its input of the same shape, its output read by ``node`` alone (or also by
    ``size()`` calls, which its input answers the same)."""
    ln = node.args[0] if node.args else None
    if not isinstance(ln, torch.fx.Node) or ln.op != "call_module" or len(ln.args) != 1 or ln.kwargs:
        return None
    if any(user is not node and not _is_size_call(user) for user in ln.users):
        return None
    module = modules.get(ln.target)
    if type(module) is not nn.LayerNorm or tuple(module.normalized_shape) != (in_features,):
        return None
    if not all(p.dtype == torch.float32 for p in module.parameters()):
        return None
    src = ln.args[0]
    meta, out = (src.meta.get("tensor_meta") if isinstance(src, torch.fx.Node) else None), ln.meta.get("tensor_meta")
    if meta is None or out is None or meta.dtype != torch.float32 or tuple(meta.shape) != tuple(out.shape):
        return None
    return ln, module


def _is_size_call(node: torch.fx.Node) -> bool:
    return node.op == "call_method" and node.target == "size"


class _Site:
    """One layer being rewritten: its node, input shape, epilogue, the LayerNorm it may fold, and the graph edits
    the rewrites share."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, layer: nn.Module, in_shape: tuple[int, ...],
                 modules: dict[str, nn.Module], count: int, tuner: Tuner) -> None:
        self.gm, self.node, self.layer, self.in_shape, self.tuner = gm, node, layer, in_shape, tuner
        self.epilogue, self.other, self.last = _epilogue(node, modules)
        in_features = getattr(layer, "in_features", None)
        self.layer_norm = (_layer_norm_prologue(node, modules, in_features)
                           if isinstance(in_features, int) and extension.status() is None else None)
        self.tokens = 1
        for d in in_shape[:-1]:
            self.tokens *= int(d)
        self.prefix = f"_sk_linear{count}"
        self.out_shape = tuple(node.meta["tensor_meta"].shape)

    def buffer(self, name: str, value: torch.Tensor | None) -> torch.fx.Node | None:
        if value is None:
            return None
        self.gm.register_buffer(f"{self.prefix}_{name}", value, persistent=False)
        return self.gm.graph.get_attr(f"{self.prefix}_{name}")

    def choose(self, weight_shapes: tuple[tuple[int, ...], ...], candidates: dict[str, Callable[[], Any]]) -> str:
        call = LinearCall(self.in_shape, weight_shapes, self.layer.bias is not None, self.epilogue,
                          torch.get_num_threads())
        return self.tuner.choose(call, candidates)

    def random_input(self, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return torch.randn(shape or self.in_shape)

    def fold(self, a: torch.Tensor, a_packed: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
        """Whether the LayerNorm folds into the oneDNN matmul by ``a`` (r, in; ``a_packed`` as the layer runs it,
        ``bias`` added to it): timed as the LayerNorm and that matmul against the matmul by ``W = a diag(gamma)``
        and :func:`sparsekern.ops.layer_norm_fold.layer_norm_fold` (the rest of the layer is the same either way),
        under its own :class:`~sparsekern.tuning.LinearCall` (prologue ``"layer_norm"``). Returns (W packed, W,
        ``s``, ``shift``, eps) when folding is faster, else None."""
        module = self.layer_norm[1]
        w, row_sum, shift = fold_weights(module, a, bias)
        w_packed, eps = onednn_linear_weight(w, self.tokens), float(module.eps)
        x = self.random_input()
        call = LinearCall(self.in_shape, (tuple(a.shape),), bias is not None, "none", torch.get_num_threads(),
                          "layer_norm")
        choice = self.tuner.choose(call, {
            "onednn": lambda: _POINTWISE(module(x), a_packed, bias, "none", [], ""),
            _FOLD: lambda: layer_norm_fold(_POINTWISE(x, w_packed, None, "none", [], ""), x, w, row_sum, shift, eps),
        })
        return (w_packed, w, row_sum, shift, eps) if choice == _FOLD else None

    def folded_matmul(self, folded: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                      name: str) -> torch.fx.Node:
        """The nodes of a folded first matmul (``folded`` from :meth:`fold`, its packed weight registered as
        ``name``): the matmul on the LayerNorm's raw input, then ``_layer_norm_fold``."""
        w_packed, w, row_sum, shift, eps = folded
        raw, graph = self.layer_norm[0].args[0], self.gm.graph
        z = graph.call_function(_POINTWISE.default, (raw, self.buffer(name, w_packed), None, "none", [], ""))
        return graph.call_function(torch.ops.sparsekern._layer_norm_fold.default,
                                   (z, raw, self.buffer("fold_w", w), self.buffer("fold_s", row_sum),
                                    self.buffer("fold_shift", shift), eps, MAX_OFFSET))

    def drop_layer_norm(self) -> None:
        """Erase the folded LayerNorm call (the layer is gone; its ``size()`` users ask its input instead)."""
        ln = self.layer_norm[0]
        ln.replace_all_uses_with(ln.args[0])
        self.gm.graph.erase_node(ln)

    def other_input(self) -> torch.Tensor | None:
        return torch.randn(self.out_shape) if self.epilogue == "add" else None

    def replace(self, build: Callable[[torch.fx.Node], torch.fx.Node], fused: bool = True) -> None:
        """Insert ``build(x)`` before the last fused node; it replaces the layer (and its epilogue if ``fused``)."""
        last = self.last if fused else self.node
        with self.gm.graph.inserting_before(last):
            new = build(self.node.args[0])
        new.meta = dict(last.meta)
        last.replace_all_uses_with(new)
        if fused and last is not self.node:
            self.gm.graph.erase_node(last)
        self.gm.graph.erase_node(self.node)


def _pointwise_node(graph: torch.fx.Graph, x: Any, w: torch.fx.Node, b: torch.fx.Node | None, epilogue: str,
                    other: torch.fx.Node | None) -> torch.fx.Node:
    if epilogue == "add":
        return graph.call_function(_POINTWISE.binary, (x, other, w, b, "add"))
    attr, algorithm = _UNARY[epilogue]
    return graph.call_function(_POINTWISE.default, (x, w, b, attr, [], algorithm))


def _pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, epilogue: str,
               other: torch.Tensor | None) -> torch.Tensor:
    if epilogue == "add":
        return _POINTWISE.binary(x, other, w, b, "add")
    attr, algorithm = _UNARY[epilogue]
    return _POINTWISE(x, w, b, attr, [], algorithm)


def _unfused(y: torch.Tensor, epilogue: str, other: torch.Tensor | None) -> torch.Tensor:
    """The epilogue as separate torch ops (what the graph keeps when a non-oneDNN kernel runs the layer)."""
    if epilogue == "relu":
        return torch.relu(y)
    if epilogue in ("gelu", "gelu_tanh"):
        return F.gelu(y, approximate="none" if epilogue == "gelu" else "tanh")
    return y + other if epilogue == "add" else y


def _rewrite_linear(site: _Site) -> str | None:
    layer: nn.Linear = site.layer
    if type(layer).forward is not nn.Linear.forward:
        return None
    packed = onednn_linear_weight(layer.weight, site.tokens)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    x, other = site.random_input(), site.other_input()
    backend = site.choose((tuple(layer.weight.shape),), {
        "onednn": lambda: _pointwise(x, packed, bias, site.epilogue, other),
        "torch": lambda: _unfused(F.linear(x, layer.weight, layer.bias), site.epilogue, other),
    })
    graph = site.gm.graph
    # the fold's output is the layer's: only without an epilogue
    folded = (site.fold(layer.weight.detach(), packed, bias)
              if backend == "onednn" and site.layer_norm is not None and site.epilogue == "none" else None)
    if folded is not None:
        site.replace(lambda _: site.folded_matmul(folded, "w"))
        site.drop_layer_norm()
        return _FOLD
    if backend == "onednn":
        site.replace(lambda x: _pointwise_node(graph, x, site.buffer("w", packed), site.buffer("b", bias),
                                               site.epilogue, site.other))
    return backend


def _rewrite_lowrank(site: _Site) -> str | None:
    layer: LowRankLinear = site.layer
    if layer.rank == 0:
        return None
    from sparsekern.ops.lowrank_linear import DISPATCH, problem

    q, p = layer.Q.detach().contiguous(), layer.P.detach().contiguous()
    bias = None if layer.bias is None else layer.bias.detach().clone()
    q_packed, p_packed = onednn_linear_weight(q, site.tokens), onednn_linear_weight(p, site.tokens)
    x, other = site.random_input(), site.other_input()
    candidates = {"onednn": lambda: _pointwise(_POINTWISE(x, q_packed, None, "none", [], ""), p_packed, bias,
                                               site.epilogue, other)}
    if not DISPATCH["cpu"].reasons(problem(x, q, p, bias)):
        candidates["sparsekern"] = lambda: _unfused(torch.ops.sparsekern.lowrank_linear(x, q, p, bias, "cpu"),
                                                    site.epilogue, other)
    backend = site.choose((tuple(q.shape), tuple(p.shape)), candidates)
    graph = site.gm.graph
    if backend == "sparsekern":
        site.replace(lambda x: graph.call_function(torch.ops.sparsekern.lowrank_linear.default,
                                                   (x, site.buffer("q", q), site.buffer("p", p),
                                                    site.buffer("b", bias), "cpu")), fused=False)
        return backend
    folded = site.fold(q, q_packed, None) if site.layer_norm is not None else None

    def build(x: Any) -> torch.fx.Node:
        if folded is None:
            h = graph.call_function(_POINTWISE.default, (x, site.buffer("q", q_packed), None, "none", [], ""))
        else:
            h = site.folded_matmul(folded, "q")
        return _pointwise_node(graph, h, site.buffer("p", p_packed), site.buffer("b", bias), site.epilogue,
                               site.other)

    site.replace(build)
    if folded is None:
        return backend
    site.drop_layer_norm()
    return _FOLD


def _rewrite_feature_select(site: _Site) -> str | None:
    layer: FeatureSelectLinear = site.layer
    if layer.in_features == 0:
        return None
    packed = onednn_linear_weight(layer.weight, site.tokens)
    bias = None if layer.bias is None else layer.bias.detach().clone()
    graph = site.gm.graph

    def build(x: Any) -> torch.fx.Node:
        selected = graph.call_function(select_features, (x, site.buffer("index", layer.index.clone())))
        return _pointwise_node(graph, selected, site.buffer("w", packed), site.buffer("b", bias), site.epilogue,
                               site.other)

    site.replace(build)
    return "onednn"


_REWRITES: dict[type, Callable[[_Site], str | None]] = {
    nn.Linear: _rewrite_linear,
    LowRankLinear: _rewrite_lowrank,
    FeatureSelectLinear: _rewrite_feature_select,
}
