"""Depth pruning: residual blocks replaced by their shortcut (the ``removed_blocks`` part of a plan).

A *residual block* is a module whose forward computes ``post(branch(x) + shortcut(x))``: ``shortcut`` is
the identity or a projection submodule (a child named ``downsample``, ``shortcut``, ``skip``, ``proj`` or
``projection``, e.g. a 1x1 conv + BN), ``branch`` is everything else, and ``post`` is an optional chain of
element-wise activations after the add (the post-add ReLU of He et al.'s blocks; none in MobileNetV2's
inverted residuals). The structure is read from the block's own ``torch.fx`` trace, so any traceable block
of that form qualifies: the zoo's ``BasicBlock``, ``Bottleneck`` and residual ``InvertedResidual``.

Removing a block means its residual branch is zero (TAS, Dong & Yang, NeurIPS 2019, searches the number of
blocks per stage and drops the rest):

* :func:`zero_branches` is the **reference**: every layer stays, the branch output is multiplied by 0, so
  the block computes ``post(0 * branch(x) + shortcut(x))`` with unchanged shapes.
* :func:`remove_blocks` is what :func:`sparsekern.compile` uses: the block becomes ``post(shortcut(x))``,
  keeping the submodule names of the shortcut and of the activation (``layer2.0.downsample.0``). That is
  exactly the reference. Where ``post`` is a ReLU (or leaky ReLU), the shortcut is the identity and the
  block's input is provably non-negative (it comes out of a ReLU, as every block input of a post-activation
  ResNet does), the activation is a no-op and the block becomes ``nn.Identity``; otherwise the activation
  is kept, so removal never changes what the model computes beyond zeroing the branch.

Channel keep-sets and removed blocks. The channel part of a plan refers to **the model after its removed
blocks are gone**: :func:`sparsekern.compile` removes the blocks first and slices the result, so group names,
sizes and pinned channels are those of ``remove_blocks(model, blocks)`` (use :func:`channel_graph` to list
them). :func:`zero_branches` places each removed block's shortcut before its branch, so that the reference
model names every dependency group after the same first producer (a removed stage-opening block's group is
named after its ``downsample.0``, not its ``conv2``); its only extra groups are those internal to removed
blocks, which a plan never prunes (``compile`` rejects their names with the closest valid ones).

Block names are validated with clear errors: an unknown name lists the closest residual blocks, a module
that is not a residual block says why, and nested or repeated names are refused.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn

from sparsekern.channel_rules import is_leaf_rule, node_has_tag
from sparsekern.graph import ChannelGraph, GraphError, symbolic_trace, trace_channels
from sparsekern.plan import PlanError
from sparsekern.utils import edit_distance

__all__ = [
    "SHORTCUT_NAMES",
    "ResidualBlock",
    "analyse_block",
    "channel_graph",
    "check_blocks",
    "remove_blocks",
    "residual_blocks",
    "zero_branches",
]

#: Child names that hold a projection shortcut.
SHORTCUT_NAMES: tuple[str, ...] = ("downsample", "shortcut", "skip", "proj", "projection")

@dataclass(frozen=True)
class ResidualBlock:
    """The structure of one residual block, ``post(branch(x) + shortcut(x))``.

    Attributes:
        name: qualified module name in the model (``"layer2.0"``).
        shortcut: child module of the projection shortcut (``"downsample"``), or ``None`` for the identity.
        post: the activations after the add, in order (``("relu",)``; empty for none).
        noop_on_nonneg: every post-add activation returns a non-negative input unchanged (ReLU-like).
    """

    name: str
    shortcut: str | None
    post: tuple[str, ...]
    noop_on_nonneg: bool


@dataclass
class _Analysis:
    block: ResidualBlock
    gm: torch.fx.GraphModule
    add: torch.fx.Node
    branch: torch.fx.Node
    shortcut: torch.fx.Node
    post: list[torch.fx.Node]
    shortcut_nodes: list[torch.fx.Node]
    kind: str


# ----------------------------------------------------------------------------- structure
def _is_add(n: torch.fx.Node) -> bool:
    """``n`` adds two tensors (a function or method whose channel rule is tagged ``"add"``, without alpha)."""
    if n.op not in ("call_function", "call_method") or not node_has_tag(n, {}, "add"):
        return False
    return "alpha" not in n.kwargs and len(n.args) == 2


def _is_activation(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if not n.args or not isinstance(n.args[0], torch.fx.Node):
        return False
    if any(isinstance(a, torch.fx.Node) for a in list(n.args[1:]) + list(n.kwargs.values())):
        return False
    return node_has_tag(n, gm, "activation")


def _identity_on_nonneg(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    return node_has_tag(n, gm, "identity_on_nonneg")


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _describe(n: torch.fx.Node) -> str:
    return str(n.target) if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))


def _not_residual(name: str, module: nn.Module, why: str) -> PlanError:
    return PlanError(
        f"{name!r} ({type(module).__name__}) cannot be removed as a residual block: {why}. A removable block "
        f"computes post(branch(x) + shortcut(x)) with an identity shortcut or a projection child named one of "
        f"{list(SHORTCUT_NAMES)}; give the name of such a block (e.g. 'layer1.1')"
    )


def _analyse(model: nn.Module, name: str) -> _Analysis:
    module = model.get_submodule(name)
    if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        inside = [b for b in residual_blocks(module)][:4]
        hint = f" (residual blocks inside: {[f'{name}.{b}' for b in inside]})" if inside else ""
        raise _not_residual(name, module, f"it is a container of layers, not a block{hint}")
    try:
        gm = symbolic_trace(module)
    except GraphError as e:
        raise _not_residual(name, module, f"its forward cannot be traced ({e})") from e
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise _not_residual(name, module, f"its forward takes {len(inputs)} inputs, not one tensor")
    x = inputs[0]
    out = next(n for n in gm.graph.nodes if n.op == "output")
    node = out.args[0]
    if not isinstance(node, torch.fx.Node):
        raise _not_residual(name, module, "it does not return one tensor")
    post: list[torch.fx.Node] = []
    while not _is_add(node) and _is_activation(node, gm) and len(node.users) == 1:
        post.insert(0, node)
        node = node.args[0]
    if not _is_add(node) or not all(isinstance(a, torch.fx.Node) for a in node.args):
        raise _not_residual(name, module, "its output is not an addition of two tensors (followed by activations)")
    add = node
    a, b = add.args
    candidates = [o for o in (a, b) if o is x] or [o for o in (a, b) if _is_projection(o, x, gm)]
    if len(candidates) != 1 or a is b:
        raise _not_residual(name, module, "cannot tell its shortcut from its residual branch")
    shortcut = candidates[0]
    branch = b if shortcut is a else a
    shortcut_anc = _ancestors(shortcut)
    branch_anc = _ancestors(branch)
    shared = {n for n in shortcut_anc & branch_anc if n.op not in ("placeholder", "get_attr")}
    if shared:
        raise _not_residual(name, module, f"its shortcut and branch share {sorted(_describe(n) for n in shared)}")
    if x not in branch_anc:
        raise _not_residual(name, module, "its residual branch does not read the block input")
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    shortcut_nodes = sorted((n for n in shortcut_anc if n.op != "placeholder"), key=order.__getitem__)
    info = ResidualBlock(
        name=name,
        shortcut=None if shortcut is x else str(shortcut_nodes[0].target).split(".")[0],
        post=tuple(_describe(n) for n in post),
        noop_on_nonneg=all(_identity_on_nonneg(n, gm) for n in post),
    )
    return _Analysis(info, gm, add, branch, shortcut, post, shortcut_nodes, type(module).__name__)


def _is_projection(node: torch.fx.Node, x: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """``node`` is computed from ``x`` by modules under one child named in :data:`SHORTCUT_NAMES` only."""
    heads = set()
    for n in _ancestors(node):
        if n is x or n.op == "get_attr":
            continue
        if n.op != "call_module":
            return False
        heads.add(str(n.target).split(".")[0])
    return len(heads) == 1 and heads.pop() in SHORTCUT_NAMES


def analyse_block(model: nn.Module, name: str) -> ResidualBlock:
    """The structure of residual block ``name`` of ``model``; :class:`PlanError` if it is not one."""
    check_blocks(model, [name])
    return _analyse(model, name).block


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that are removable residual blocks, in module order."""
    out = []
    for name, m in model.named_modules():
        if not name or not any(True for _ in m.children()) or isinstance(m, (nn.Sequential, nn.ModuleList)):
            continue
        if any(name.startswith(o + ".") for o in out):
            continue
        try:
            _analyse(model, name)
        except PlanError:
            continue
        out.append(name)
    return out


def check_blocks(model: nn.Module, blocks: Sequence[str]) -> None:
    """Raise :class:`PlanError` unless every name in ``blocks`` is a distinct, non-nested module of ``model``.

    Whether each is a residual block is checked when it is analysed (:func:`remove_blocks`,
    :func:`zero_branches`, :func:`analyse_block`).
    """
    if isinstance(blocks, str):
        raise PlanError(f"removed blocks must be a list of block names, got the string {blocks!r}")
    names = dict(model.named_modules())
    seen: set[str] = set()
    for b in blocks:
        if not isinstance(b, str) or not b:
            raise PlanError(f"a removed block must be a module name like 'layer1.1', got {b!r}")
        if b in seen:
            raise PlanError(f"block {b!r} is listed twice in removed_blocks; list each block once")
        seen.add(b)
        if b not in names:
            pool = residual_blocks(model) or [n for n in names if n]
            close = sorted(pool, key=lambda n: (edit_distance(n, b), n))[:3]
            raise PlanError(f"the model has no module {b!r} to remove; closest residual blocks: {close}")
    for b in blocks:
        outer = [o for o in blocks if b.startswith(o + ".")]
        if outer:
            raise PlanError(f"block {b!r} lies inside removed block {outer[0]!r}; list only the outer block")


# ----------------------------------------------------------------------------- rewrites
def _copy_nodes(graph: torch.fx.Graph, nodes: Sequence[torch.fx.Node], env: dict) -> None:
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])


def _zeroed(an: _Analysis) -> torch.fx.GraphModule:
    """``post(0 * branch(x) + shortcut(x))`` with every layer kept; shortcut nodes first (group names)."""
    old = an.gm.graph
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    tail = {an.add, *an.post}
    _copy_nodes(graph, [n for n in old.nodes if n.op == "placeholder"], env)
    _copy_nodes(graph, an.shortcut_nodes, env)
    done = set(env)
    _copy_nodes(graph, [n for n in old.nodes if n not in done and n not in tail and n.op != "output"], env)
    zero = graph.call_function(torch.mul, (env[an.branch], 0.0))
    args = tuple(zero if a is an.branch else env[a] for a in an.add.args)
    env[an.add] = graph.create_node(an.add.op, an.add.target, args, dict(an.add.kwargs))
    _copy_nodes(graph, an.post, env)
    graph.output(env[an.post[-1] if an.post else an.add])
    graph.lint()
    return torch.fx.GraphModule(an.gm, graph, f"ZeroBranch{an.kind}")


def _shortcut_only(an: _Analysis, drop_post: bool) -> nn.Module:
    """``post(shortcut(x))``, or ``shortcut(x)`` when ``drop_post``; ``nn.Identity`` when that is all."""
    post = [] if drop_post else an.post
    if not an.shortcut_nodes and not post:
        return nn.Identity()
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    _copy_nodes(graph, [n for n in an.gm.graph.nodes if n.op == "placeholder"], env)
    _copy_nodes(graph, an.shortcut_nodes, env)
    env[an.add] = env[an.shortcut]
    _copy_nodes(graph, post, env)
    graph.output(env[post[-1] if post else an.shortcut])
    graph.lint()
    return torch.fx.GraphModule(an.gm, graph, f"Removed{an.kind}")


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (qualname in self.leaves or getattr(m, "sk_leaf", False) or is_leaf_rule(m)
                or super().is_leaf_module(m, qualname))


def _nonneg_input_blocks(model: nn.Module, analyses: dict[str, _Analysis]) -> set[str]:
    """Blocks among ``analyses`` whose every call receives an input that is >= 0 by construction.

    The model is traced with those blocks kept as single nodes; an input counts as non-negative when it is
    produced by a ReLU-like op (or a pool/identity of such an output, or a block whose last op is one).
    A model that cannot be traced as a whole gets no block (their activations are then kept).
    """
    try:
        graph = _LeafTracer(set(analyses)).trace(model)
    except Exception:  # fx raises many types; an untraceable model only loses this optimisation
        return set()
    modules = dict(model.named_modules())
    memo: dict[torch.fx.Node, bool] = {}

    def nonneg(n: Any) -> bool:
        if not isinstance(n, torch.fx.Node):
            return False
        if n not in memo:
            memo[n] = _nonneg(n)
        return memo[n]

    def _nonneg(n: torch.fx.Node) -> bool:
        first = n.args[0] if n.args else None
        if n.op == "call_module":
            if n.target in analyses:
                an = analyses[n.target]
                if an.post:
                    return _nonneg_op(an.post[-1], an.gm) or (an.block.noop_on_nonneg and an.block.shortcut is None
                                                               and nonneg(first))
                return an.block.shortcut is None and nonneg(first)
        return node_has_tag(n, modules, "nonneg") or (node_has_tag(n, modules, "keeps_nonneg") and nonneg(first))

    calls: dict[str, list[bool]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in analyses:
            calls.setdefault(node.target, []).append(nonneg(node.args[0] if node.args else None))
    return {name for name, flags in calls.items() if flags and all(flags)}


def _nonneg_op(n: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    return node_has_tag(n, gm, "nonneg")


def _analyse_all(model: nn.Module, blocks: Sequence[str]) -> dict[str, _Analysis]:
    check_blocks(model, blocks)
    return {b: _analyse(model, b) for b in blocks}


def _replaced(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    out = copy.deepcopy(model)
    for name, module in replacements.items():
        out.set_submodule(name, module)
    return out


def remove_blocks(model: nn.Module, blocks: Sequence[str]) -> nn.Module:
    """A copy of ``model`` with each residual block in ``blocks`` replaced by its shortcut.

    Args:
        model: the model (not modified).
        blocks: qualified names of residual blocks (``["layer1.2", "layer3.1"]``).

    Returns:
        A deep copy in which each named block computes ``post(shortcut(x))`` (see the module docstring),
        equal to :func:`zero_branches` for every input; ``nn.Identity`` where the shortcut is the identity
        and the post-add activation is provably a no-op. Raises :class:`PlanError` for unknown, repeated or
        nested names and for modules that are not residual blocks.
    """
    if not blocks:
        return copy.deepcopy(model)
    analyses = _analyse_all(model, blocks)
    nonneg = _nonneg_input_blocks(model, analyses)
    replacements = {}
    for name, an in analyses.items():
        drop = an.block.shortcut is None and an.block.noop_on_nonneg and name in nonneg
        replacements[name] = _shortcut_only(an, drop_post=drop)
    return _replaced(model, replacements)


def zero_branches(model: nn.Module, blocks: Sequence[str]) -> nn.Module:
    """A copy of ``model`` whose named residual blocks compute ``post(0 * branch(x) + shortcut(x))``.

    The reference semantics of removed blocks (used by :func:`sparsekern.masked`): every layer and shape is
    kept, the residual branch still runs and is multiplied by zero. Each block becomes an fx
    ``GraphModule`` with its original submodule names, the shortcut computed before the branch. Raises
    :class:`PlanError` like :func:`remove_blocks`.
    """
    if not blocks:
        return copy.deepcopy(model)
    analyses = _analyse_all(model, blocks)
    return _replaced(model, {name: _zeroed(an) for name, an in analyses.items()})


def channel_graph(model: nn.Module, blocks: Sequence[str], example_inputs: Any) -> ChannelGraph:
    """The :class:`~sparsekern.graph.ChannelGraph` of ``model`` after ``blocks`` are removed: the dependency
    groups (names, sizes, pinned channels) that a plan with these ``removed_blocks`` refers to."""
    return trace_channels(remove_blocks(model, blocks), example_inputs)
