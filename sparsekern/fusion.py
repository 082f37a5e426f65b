"""fx helpers the inference passes share: the graph module a pass rewrites and the patterns it fuses."""
from __future__ import annotations

import copy

import torch
import torch.fx
import torch.nn as nn

from sparsekern.channel_rules import node_has_tag
from sparsekern.graph import keep_attributes, symbolic_trace

__all__ = ["as_graph_module", "single_user", "calls_tagged", "finish_rewrite", "share_prepacked_on_copy"]


def as_graph_module(model: nn.Module, inplace: bool) -> torch.fx.GraphModule:
    """``model`` as a GraphModule the pass may modify: a copy unless ``inplace`` (a traced plain module
    shares its submodules with ``model``)."""
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, torch.fx.GraphModule):
        return model
    gm = symbolic_trace(model)
    gm.train(model.training)
    keep_attributes(gm, **{a: getattr(model, a) for a in ("sk_plan", "sk_arch", "sk_compile") if hasattr(model, a)})
    return gm


def single_user(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one node that uses ``node``, or None when it has none or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def calls_tagged(node: torch.fx.Node, tag: str, modules: dict[str, nn.Module]) -> bool:
    """``node`` calls an op whose channel rule carries ``tag`` (``"add"``: a plain two-operand add, no alpha)."""
    if not node_has_tag(node, modules, tag):
        return False
    if node.op == "call_module":
        return True
    return not node.kwargs.get("alpha") and (len(node.args) < 3 or tag != "add")


def finish_rewrite(gm: torch.fx.GraphModule, backends: dict[str, str]) -> torch.fx.GraphModule:
    """Close a kernel-choosing pass: drop dead nodes and submodules, check and recompile the graph, record
    ``backends`` (layer name -> kernel) in ``gm.sk_backends`` next to what earlier passes recorded, and let copies
    share prepacked weights (:func:`share_prepacked_on_copy`). Returns ``gm``."""
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    keep_attributes(gm, sk_backends={**getattr(gm, "sk_backends", {}), **backends})
    share_prepacked_on_copy(gm)
    return gm


def share_prepacked_on_copy(gm: torch.fx.GraphModule) -> None:
    """Let ``copy.deepcopy(gm)`` work when ``gm`` holds oneDNN-prepacked (opaque) weights, which torch cannot copy:
    a copy shares them with ``gm`` (they are read-only inference constants) and copies everything else."""
    cls = type(gm)
    if cls.__qualname__.endswith("GraphModuleImpl"):  # fx gives every GraphModule its own class: only gm changes
        cls.__deepcopy__ = _deepcopy_sharing_prepacked


def _deepcopy_sharing_prepacked(self: torch.fx.GraphModule, memo: dict[int, object]) -> torch.fx.GraphModule:
    for t in self.buffers():
        if t.is_mkldnn:
            memo.setdefault(id(t), t)
    res = torch.fx.GraphModule.__deepcopy__(self, memo)
    share_prepacked_on_copy(res)
    return res
