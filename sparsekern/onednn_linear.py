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
tanh), a ReLU, or a two-operand add of a tensor of the output's shape (a residual). Dropout and identity modules
are removed first (the result is for inference). Each rewritten layer's kernel is recorded in the result's
``sk_backends`` (``"onednn"``, ``"torch"``, ``"sparsekern"``), chosen by :func:`sparsekern.tuning.current_tuner`
from :class:`~sparsekern.tuning.LinearCall` timings, the same for dense and pruned models. Without oneDNN
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
from sparsekern.tuning import LinearCall, Tuner, current_tuner

__all__ = ["onednn_linear", "onednn_linear_weight"]

_POINTWISE = torch.ops.mkldnn._linear_pointwise
#: epilogue name -> (oneDNN unary attribute, its algorithm) for ``_linear_pointwise``
_UNARY = {"none": ("none", ""), "relu": ("relu", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


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


class _Site:
    """One layer being rewritten: its node, input shape, epilogue, and the graph edits the rewrites share."""

    def __init__(self, gm: torch.fx.GraphModule, node: torch.fx.Node, layer: nn.Module, in_shape: tuple[int, ...],
                 modules: dict[str, nn.Module], count: int, tuner: Tuner) -> None:
        self.gm, self.node, self.layer, self.in_shape, self.tuner = gm, node, layer, in_shape, tuner
        self.epilogue, self.other, self.last = _epilogue(node, modules)
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
    if backend == "onednn":
        graph = site.gm.graph
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
    if backend == "onednn":
        def build(x: Any) -> torch.fx.Node:
            h = graph.call_function(_POINTWISE.default, (x, site.buffer("q", q_packed), None, "none", [], ""))
            return _pointwise_node(graph, h, site.buffer("p", p_packed), site.buffer("b", bias), site.epilogue,
                                   site.other)

        site.replace(build)
    else:
        site.replace(lambda x: graph.call_function(torch.ops.sparsekern.lowrank_linear.default,
                                                   (x, site.buffer("q", q), site.buffer("p", p),
                                                    site.buffer("b", bias), "cpu")), fused=False)
    return backend


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
