"""A channel-graph front end for models torch.fx cannot trace: capture with ``torch.export``, return to torch level.

``torch.fx`` symbolic tracing fails on much of what users bring (Hugging Face ``transformers`` models among
them: data-dependent Python, proxies that cannot be iterated or assigned to); ``torch.export`` runs the real
Python on fake tensors and records ATen operators instead. The channel rules (:mod:`sparsekern.channel_rules`)
speak the vocabulary of fx symbolic tracing: module calls, torch functions, tensor methods. :func:`export_trace`
translates an exported program into that vocabulary, so the channel graph, the compiler and the passes have
one set of rules for both front ends:

1. every call of a **leaf module** (one fx would keep as a single node: ``torch.nn``'s modules, types with an
   exactly registered channel rule, ``sk_leaf`` modules, ``leaf_modules``) becomes one ``call_module`` node of
   the model's own submodule, found through export's ``nn_module_stack``; a call with more than one tensor
   input or output, or of a module whose ``forward`` requires more than its input, stays as its ATen operators;
2. the ATen operators outside leaves become the torch functions and methods with the same meaning
   (:data:`ATEN_TO_TORCH`: ``aten.view`` -> ``Tensor.view``, ``aten.transpose.int`` -> ``torch.transpose``,
   ``aten.slice``/``select``/``unsqueeze`` -> indexing, ...). An operator without a counterpart stays an ATen
   call: no channel rule knows it, so the channels reaching it are pinned (kept), never sliced wrongly.

Every axis of every example input is left dynamic where export allows (``torch.export.Dim.AUTO``): the graph,
and a model compiled from it, takes other batch sizes and sequence lengths. The graph keeps export's pytree
calling convention: it takes the example inputs' structure and returns the model's own output type (a tuple,
a ``transformers`` ``ModelOutput``, ...). Parameters are shared with the model, as with fx.
"""
from __future__ import annotations

import inspect
import operator
import re
import warnings
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from sparsekern.utils import as_tuple

__all__ = ["export_trace", "ExportError", "ATEN_TO_TORCH"]

aten = torch.ops.aten

# Deep-copying a graph module with export's calling convention copies its pytree specs, and torch 2.13 warns
# about its own leaf spec class when it does (the copy is right); every compile and pass copies graphs.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class ExportError(RuntimeError):
    """``torch.export`` could not capture the model."""


# ----------------------------------------------------------------------------- capture
def _export(model: nn.Module, inputs: tuple) -> torch.export.ExportedProgram:
    """Export ``model`` on ``inputs`` with every tensor axis dynamic where possible, else with static shapes."""
    dynamic = tuple({d: torch.export.Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None
                    for x in inputs)
    first: Exception | None = None
    for shapes in (dynamic, None):
        try:
            return torch.export.export(model, inputs, dynamic_shapes=shapes, strict=False)
        except Exception as e:  # export raises many types; each means "not captured this way"
            first = first or e
    hint = ""
    if "DynamicCache" in str(first) or "Cache" in type(first).__name__:
        hint = (" The model returns a key/value cache: build it with use_cache=False (transformers: "
                "config.use_cache = False).")
    raise ExportError(f"torch.export could not capture {type(model).__name__}: {type(first).__name__}: "
                      f"{str(first)[:600]}.{hint}") from first


def export_trace(model: nn.Module, example_inputs: Any, *,
                 is_leaf: Callable[[nn.Module, str], bool]) -> torch.fx.GraphModule:
    """Capture ``model`` on ``example_inputs`` with ``torch.export`` and return a torch-level fx graph of it.

    Args:
        model: the model (put in eval mode by the caller; not modified).
        example_inputs: a tensor or tuple of tensors.
        is_leaf: ``(module, qualified_name) -> bool``: which module calls become single ``call_module`` nodes
            (the fx tracer's own predicate, so both front ends cut the model at the same modules).

    Returns:
        A ``torch.fx.GraphModule`` whose ``call_module`` targets are ``model``'s own submodules (by qualified
        name) and whose other nodes are torch functions, tensor methods, or ATen operators without a torch-level
        counterpart.

    Raises:
        ExportError: ``torch.export`` failed, with its message and, for models returning a key/value cache,
            the fix.
    """
    inputs = as_tuple(example_inputs)
    ep = _export(model, inputs)
    gm = ep.module()
    graph = torch.fx.Graph()  # a graph of no module: call_module targets name the model's submodules
    graph.output(graph.graph_copy(gm.graph, {}))
    graph._codegen = gm.graph._codegen  # export's pytree calling convention
    for node in list(graph.nodes):  # export's input-shape guards: the model is called on other shapes too
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    modules = dict(model.named_modules())
    _collapse_leaf_calls(graph, modules, gm, is_leaf)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in ATEN_TO_TORCH:
            ATEN_TO_TORCH[node.target](node)
    for node in reversed(list(graph.nodes)):  # dead code: the parameters the leaf calls now read themselves
        if not node.users and (node.op == "get_attr" or (node.op in ("call_function", "call_method")
                                                        and not node.is_impure())):
            graph.erase_node(node)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            root[str(node.target)] = modules[str(node.target)]
        elif node.op == "get_attr":
            root[str(node.target)] = _get(gm, str(node.target))
    for node in graph.nodes:
        node.type = None
    out = torch.fx.GraphModule(root, graph, type(model).__name__)
    out.train(model.training)
    return out


def _get(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# ----------------------------------------------------------------------------- leaf module calls
_CALL_SUFFIX = re.compile(r"@\d+$")


def _leaf_call(node: torch.fx.Node, modules: dict[str, nn.Module],
               is_leaf: Callable[[nn.Module, str], bool]) -> tuple[str, str] | None:
    """``(stack key, qualified name)`` of the outermost leaf module whose call recorded ``node``, or None."""
    for key, entry in (node.meta.get("nn_module_stack") or {}).items():
        path = _CALL_SUFFIX.sub("", str(entry[0]))
        m = modules.get(path)
        if path and m is not None and is_leaf(m, path):
            return str(key), path
    return None


def _collapse_leaf_calls(graph: torch.fx.Graph, modules: dict[str, nn.Module], gm: nn.Module,
                         is_leaf: Callable[[nn.Module, str], bool]) -> None:
    """Replace each run of consecutive nodes recorded inside one call of a leaf module by a ``call_module``."""
    runs: list[tuple[str, list[torch.fx.Node]]] = []
    current: tuple[str, str] | None = None
    for node in graph.nodes:
        call = _leaf_call(node, modules, is_leaf) if node.op == "call_function" else None
        if call is None:
            current = None if node.op != "get_attr" else current
            continue
        if call != current:
            runs.append((call[1], []))
            current = call
        runs[-1][1].append(node)
    for path, nodes in runs:
        _collapse(graph, path, modules[path], nodes, gm)


def _one_argument(module: nn.Module) -> bool:
    """Whether ``module`` can be called with its input alone (no other required argument: unlike
    ``nn.MultiheadAttention(query, key, value)``, whose self-attention call also reads one tensor)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return len(required) <= 1


def _collapse(graph: torch.fx.Graph, path: str, module: nn.Module, nodes: list[torch.fx.Node],
              gm: nn.Module) -> None:
    if not _one_argument(module):
        return  # its ATen operators stay
    inside = set(nodes)
    own = {id(t) for t in [*module.parameters(), *module.buffers()]}
    inputs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in inside or arg in inputs:
                continue
            if arg.op == "get_attr" and id(_get(gm, str(arg.target))) in own:
                continue  # the module reads its own parameters itself
            inputs.append(arg)
    tensors = [a for a in inputs if isinstance(a.meta.get("val"), torch.Tensor)]
    if len(tensors) == 1:
        for node in nodes:  # ``x.to(x.dtype)`` inside the call is x itself: export lets later code read it
            if node.target in _TO and node.args[0] is tensors[0] and _same_tensor(node, tensors[0]):
                node.replace_all_uses_with(tensors[0], delete_user_cb=lambda user: user not in inside)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(tensors) != 1 or len(outputs) != 1 or not isinstance(outputs[0].meta.get("val"), torch.Tensor):
        return  # not a one-tensor-in, one-tensor-out call: its ATen operators stay
    if any(not isinstance(a.meta.get("val"), (torch.SymInt, int)) for a in inputs if a is not tensors[0]):
        return
    out = outputs[0]
    with graph.inserting_after(nodes[-1]):
        call = graph.create_node("call_module", path, (tensors[0],))
    call.meta = dict(out.meta)
    out.replace_all_uses_with(call)
    for node in reversed(nodes):
        graph.erase_node(node)


def _same_tensor(a: torch.fx.Node, b: torch.fx.Node) -> bool:
    va, vb = a.meta.get("val"), b.meta.get("val")
    return (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.dtype == vb.dtype
            and va.device == vb.device and va.shape == vb.shape)


# ----------------------------------------------------------------------------- ATen -> torch
def _as_function(fn: Callable[..., Any], arity: int | None = None) -> Callable[[torch.fx.Node], None]:
    def rewrite(node: torch.fx.Node) -> None:
        node.target = fn
        if arity is not None:
            node.args = node.args[:arity]

    return rewrite


def _as_method(name: str, arity: int | None = None) -> Callable[[torch.fx.Node], None]:
    def rewrite(node: torch.fx.Node) -> None:
        node.op, node.target = "call_method", name
        if arity is not None:
            node.args = node.args[:arity]

    return rewrite


def _ndim(node: Any) -> int:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else -1


def _static_size(node: torch.fx.Node, dim: int) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    size = val.shape[dim]
    return int(size) if isinstance(size, int) else None


def _index(node: torch.fx.Node, index: tuple) -> None:
    node.target, node.args, node.kwargs = operator.getitem, (node.args[0], index), {}


def _slice(node: torch.fx.Node) -> None:
    """``aten.slice.Tensor(x, dim, start, end, step)`` -> ``x[..., start:end:step]`` (``:`` when it is whole)."""
    x, dim, start, end, step = (list(node.args) + [0, 0, None, None, 1][len(node.args):])[:5]
    if _ndim(x) < 0:
        return
    dim %= _ndim(x)
    size = _static_size(x, dim)
    whole = start in (0, None) and step == 1 and (end is None or (isinstance(end, int) and size is not None
                                                                  and end >= size))
    _index(node, (slice(None),) * dim + (slice(None) if whole else slice(start, end, step),))


def _select(node: torch.fx.Node) -> None:
    x, dim, i = node.args
    if _ndim(x) >= 0:
        _index(node, (slice(None),) * (dim % _ndim(x)) + (i,))


def _unsqueeze(node: torch.fx.Node) -> None:
    x, dim = node.args
    if _ndim(x) >= 0:
        _index(node, (slice(None),) * (dim % (_ndim(x) + 1)) + (None,))


_TO = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device)


def _to(node: torch.fx.Node) -> None:
    """``aten._to_copy``/``aten.to.*`` -> ``x.to(device=..., dtype=...)`` (forms with other options stay)."""
    names = {aten.to.dtype: ("dtype",), aten.to.device: ("device", "dtype")}.get(node.target, ())
    options = {**dict(zip(names, node.args[1:])), **node.kwargs}
    if any(v is not None for k, v in options.items() if k not in ("dtype", "device", "layout", "pin_memory")):
        return
    if options.get("layout") not in (None, torch.strided) or len(node.args) > 1 + len(names):
        return
    kwargs = {k: options[k] for k in ("device", "dtype") if options.get(k) is not None}
    node.op, node.target, node.args, node.kwargs = "call_method", "to", (node.args[0],), kwargs


def _alias(node: torch.fx.Node) -> None:
    """``aten.alias(x)`` is ``x`` (a view of all of it): its uses read ``x``."""
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _dropout(node: torch.fx.Node) -> None:
    node.target, node.args = F.dropout, tuple(node.args[:3])


#: ATen overload -> in-place rewrite of its node into the torch function or method with the same meaning.
ATEN_TO_TORCH: dict[Any, Callable[[torch.fx.Node], None]] = {
    aten.view.default: _as_method("view"),
    aten._unsafe_view.default: _as_method("view"),
    aten.reshape.default: _as_method("reshape"),
    aten.expand.default: _as_method("expand", 2),
    aten.permute.default: _as_method("permute"),
    aten.transpose.int: _as_function(torch.transpose),
    aten.flatten.using_ints: _as_function(torch.flatten),
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.unsqueeze.default: _unsqueeze,
    aten.split.Tensor: _as_function(torch.split),
    aten.split_with_sizes.default: _as_function(torch.split),
    aten.chunk.default: _as_function(torch.chunk),
    aten.cat.default: _as_function(torch.cat),
    aten.add.Tensor: _as_function(torch.add),
    aten.add.Scalar: _as_function(torch.add),
    aten.sub.Tensor: _as_function(torch.sub),
    aten.sub.Scalar: _as_function(torch.sub),
    aten.mul.Tensor: _as_function(torch.mul),
    aten.mul.Scalar: _as_function(torch.mul),
    aten.div.Tensor: _as_function(torch.div),
    aten.div.Scalar: _as_function(torch.div),
    aten.relu.default: _as_function(torch.relu),
    aten.gelu.default: _as_function(F.gelu),
    aten.silu.default: _as_function(F.silu),
    aten.tanh.default: _as_function(torch.tanh),
    aten.sigmoid.default: _as_function(torch.sigmoid),
    aten.abs.default: _as_function(torch.abs),
    aten.exp.default: _as_function(torch.exp),
    aten.neg.default: _as_function(torch.neg),
    aten.dropout.default: _dropout,
    aten.clone.default: _as_method("clone"),
    aten.contiguous.default: _as_method("contiguous"),
    aten.detach.default: _as_method("detach"),
    aten.alias.default: _alias,
    **{op: _to for op in _TO},
    aten.pow.Tensor_Scalar: _as_function(torch.pow),
    aten.mean.dim: _as_function(torch.mean),
    aten.sum.dim_IntList: _as_function(torch.sum),
    aten.amax.default: _as_function(torch.amax),
    aten.amin.default: _as_function(torch.amin),
    aten.scaled_dot_product_attention.default: _as_function(F.scaled_dot_product_attention),
    aten.repeat_interleave.self_int: _as_function(torch.repeat_interleave, 3),
    aten.sym_size.int: _as_method("size"),
}

