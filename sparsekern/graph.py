"""Channel dependency graph: which channels of which layers must be pruned together.

This is the only module that reads a model's dataflow. It traces the model with :mod:`torch.fx` (or, for a
model fx cannot trace, captures it with ``torch.export`` and translates the result back to torch-level fx,
:mod:`sparsekern.export_trace`), runs the graph once on example inputs, and follows every tensor's *channel
axis* through the ops:

* each channel of a producer (a conv or linear output) is an **atom**;
* a tensor's channel axis is a **layout**: one atom per position (a flattened ``(C, H, W)`` feature vector
  repeats each channel's atom ``H * W`` times; a concatenation concatenates layouts);
* ops that tie channels together (residual add, elementwise mul, depthwise conv) **unify** atoms
  position by position (union-find); so does a layer called more than once (shared weights), on its
  inputs at every call site, and every call of a shared conv or linear outputs the same atoms;
* a **dependency group** is the set of producers whose atoms are tied; its channels are the distinct
  atom classes, numbered in topological order. A plan keeps or prunes each class.
* a channel shuffle (a view splitting the channel axis into ``(g, C / g)``, a transpose of the two, a view
  merging them back) permutes the atoms (:class:`ChannelShuffle`; compiled as one gather); a model tensor
  that only an elementwise op reads, per channel (a layer-scale ``nn.Parameter``), is sliced with the
  channels (:class:`AttrSlice`).
* attention **heads**: a view that splits a channel axis into factors, one of which becomes the head axis of
  ``F.scaled_dot_product_attention`` (``qkv.reshape(b, t, 3, H, hd)``, ``q.view(b, t, H, hd)``), ties every
  atom of a head together, so the head is one channel of its group; attention ties the heads of query, key
  and value, and the merge back (``reshape(b, t, H * hd)``) repeats each head's atom ``hd`` times for the
  output projection. Pruning a head removes its query, key and value rows and the projection's columns, and
  the compiled views get the kept head count (the head dimension stays whole). In grouped-query attention
  (key/value heads ``repeat_interleave``-d, ``expand``-ed and merged, or ``enable_gqa``) a key/value head and
  its query heads are one channel.

Channels that must never be pruned are **pinned** with a reason: the model output (logits), and every
channel that reaches an op this module cannot slice (a reduction over channels, a reshape that mixes
channels, an unknown module). Tensors whose channels are not tracked (the model input, outputs of such
ops) are never sliced. Unknown constructs are therefore kept dense, never compiled wrongly.

What each op does to channels is looked up in the public table of channel rules
(:mod:`sparsekern.channel_rules`, re-exported here: :func:`register_channel_rule`, :class:`ChannelRule`,
:func:`channel_rule_scope`); the :class:`_LayoutInterpreter` below is the ``LayoutContext`` those rules run
in, and its public methods are the built-in propagations they may reuse (docs/adding-a-channel-rule.md).

Masks users already have (``torch.nn.utils.prune``'s buffers, weight-shaped dicts) become plans in
:mod:`sparsekern.masks`.

The vocabulary follows Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023);
the union-find formulation over per-position atoms is this package's own.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from sparsekern.channel_rules import (  # noqa: F401 (the public table of channel rules, re-exported)
    ChannelRule,
    LayoutContext,
    channel_rule,
    channel_rule_scope,
    elementwise,
    is_leaf_rule,
    module_rule,
    register_channel_rule,
    unregister_channel_rule,
)
from sparsekern.export_trace import ExportError, export_trace
from sparsekern.head_axis import attention_head_axis
from sparsekern.modes import eval_mode
from sparsekern.plan import GroupKeep, GroupSpec, Plan, PlanError
from sparsekern.slicing import is_depthwise  # noqa: F401 (re-exported: graph users ask it of layers)
from sparsekern.utils import as_tuple, edit_distance, input_spec


class GraphError(RuntimeError):
    """The model cannot be analysed (untraceable); the message names the module or node and a fix."""


@dataclass(frozen=True)
class Layout:
    """Channel axis ``cdim`` of a tensor and the atom at each position along it (int64, length = size)."""

    cdim: int
    atoms: np.ndarray

    @property
    def size(self) -> int:
        return int(self.atoms.shape[0])


@dataclass(frozen=True)
class GroupConstraint:
    """A layer that needs the same number of kept channels in each of ``groups`` equal slices of a layout.

    Grouped convolutions (per conv group, on input and output) and GroupNorm (per norm group).
    """

    node: str
    module: str
    layout: Layout
    groups: int
    what: str


@dataclass(frozen=True)
class ChannelShuffle:
    """A channel shuffle: the chain of fx nodes ``nodes`` (a view splitting the channel axis ``dim`` of size
    ``C`` into ``(g, C / g)``, a transpose of those two axes, an optional ``contiguous``, a view merging them
    back) permutes the channels of ``input``: output position ``q`` holds input position ``source[q]``.
    :func:`sparsekern.compile` replaces the chain by one ``index_select`` over the kept channels, so any plan
    compiles (no per-group count constraint)."""

    nodes: tuple[str, ...]
    dim: int
    source: np.ndarray
    input: Layout


@dataclass(frozen=True)
class AttrSlice:
    """A model tensor read by a ``get_attr`` node (a layer scale ``nn.Parameter``, a per-channel bias) that
    an elementwise op combines with tracked channels along its axis ``axis``: :func:`sparsekern.compile`
    slices it to the kept positions of ``layout``. Only a tensor read once, by that op alone, is sliced;
    others pin the channels (their other readers would see a sliced tensor)."""

    target: str
    axis: int
    layout: Layout


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        parent = self.parent
        root = a
        while parent[root] != root:
            root = parent[root]
        while parent[a] != root:
            parent[a], a = root, parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # keep the older atom as the root so class numbering follows creation order
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


# ----------------------------------------------------------------------------- tracing
class _PathTracer(torch.fx.Tracer):
    """fx tracer that remembers which module it is inside, to name it when tracing fails."""

    def __init__(self, leaf_modules: tuple[type, ...] = ()) -> None:
        super().__init__()
        self.extra_leaves = leaf_modules
        self.stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # sparsekern's own layers (gated, low-rank, ...) set ``sk_leaf = True``: they stay single nodes.
        # so do modules whose exact type has a channel rule (sparsekern.channel_rules).
        return (isinstance(m, self.extra_leaves) or getattr(m, "sk_leaf", False) or is_leaf_rule(m)
                or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):  # noqa: D102 (fx override)
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def symbolic_trace(model: nn.Module, leaf_modules: tuple[type, ...] = ()) -> torch.fx.GraphModule:
    """Trace ``model`` with torch.fx; on failure raise :class:`GraphError` naming the module being traced."""
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, ...); all mean "not traceable"
        where = tracer.failed_in or "<top level>"
        raise GraphError(
            f"cannot trace {type(model).__name__} with torch.fx inside module {where!r}: {type(e).__name__}: {e}. "
            "sparsekern needs a torch.fx-traceable forward: replace data-dependent Python control flow on "
            "tensor values with tensor ops, or pass that submodule's type in `leaf_modules=` to keep it "
            "dense and opaque."
        ) from e
    for node in graph.nodes:
        node.type = None  # fx aliases annotated types in generated code, which TorchScript cannot parse
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


#: How :func:`trace_graph` may capture a model.
TRACERS = ("auto", "fx", "export")


def trace_graph(model: nn.Module, example_inputs: Any, *, leaf_modules: tuple[type, ...] = (),
                tracer: str = "auto") -> torch.fx.GraphModule:
    """A torch-level fx graph of ``model``: fx symbolic tracing, or ``torch.export`` translated back to torch
    level (:func:`sparsekern.export_trace.export_trace`); ``"auto"`` tries fx first and exports what fx cannot
    trace (Hugging Face ``transformers`` models, data-dependent Python).

    Raises:
        GraphError: the model could not be captured; the message gives each front end's reason and the fix.
    """
    if tracer not in TRACERS:
        raise ValueError(f"tracer must be one of {TRACERS}, got {tracer!r}")
    fx_error: GraphError | None = None
    if tracer != "export":
        try:
            return symbolic_trace(model, leaf_modules)
        except GraphError as e:
            if tracer == "fx":
                raise
            fx_error = e
    _register_library_rules(model)
    leaves = _PathTracer(leaf_modules)
    try:
        with eval_mode(model), torch.no_grad():
            return export_trace(model, example_inputs, is_leaf=leaves.is_leaf_module)
    except ExportError as e:
        if fx_error is None:
            raise GraphError(str(e)) from e
        raise GraphError(f"{fx_error}\nCapturing it with torch.export instead failed too: {e}") from e


def _register_library_rules(model: nn.Module) -> None:
    """Channel rules for the layers of libraries the process has imported (``transformers``' ``Conv1D`` and
    RMSNorms), registered on first need so that sparsekern never imports those libraries itself."""
    import sys

    if "transformers" in sys.modules:
        from sparsekern import transformers_rules

        transformers_rules.register()
        transformers_rules.register_model(model)


def keep_attributes(gm: nn.Module, **attrs: Any) -> None:
    """Set plain attributes (``sk_plan``, ``sk_arch``, ...) on ``gm`` so that they survive ``copy.deepcopy``,
    which rebuilds a GraphModule from its graph and would otherwise drop them (other modules, such as the
    ScriptModule of the ``freeze`` pass, just get the attributes)."""
    preserved = gm.meta.setdefault("_user_preserved_attributes", {}) if isinstance(gm, torch.fx.GraphModule) else {}
    for name, value in attrs.items():
        setattr(gm, name, value)
        preserved[name] = value


class ChannelGraph:
    """The channel dependency analysis of one model for one input shape.

    Attributes:
        gm: the traced ``torch.fx.GraphModule`` (shares parameters with the model).
        layouts: fx node name -> :class:`Layout`, tuple of layouts (split outputs), or None (untracked).
        groups: group name -> :class:`~sparsekern.plan.GroupSpec`.
        producers: group name -> the convs/linears whose outputs create its channels (several when a
            residual add ties them).
        constraints: grouped convolutions and GroupNorms that need equal kept counts per group.
        opaque: node name -> why its tracked input channels were pinned.
        shuffles: name of the last node of each channel shuffle -> its :class:`ChannelShuffle`.
        sliced_attrs: ``get_attr`` node name -> the :class:`AttrSlice` that compile applies to its tensor.
        channel_slices: indexing node name -> ``(position in its index, start, stop)`` of a slice of the channel
            axis with step 1 (``qkv[..., :d]``; bounds as on the example inputs), which compile rewrites to the
            kept channels.
    """

    def __init__(self, model: nn.Module, example_inputs: Any, *, leaf_modules: tuple[type, ...] = (),
                 tracer: str = "auto") -> None:
        self.model = model
        self.gm = trace_graph(model, example_inputs, leaf_modules=leaf_modules, tracer=tracer)
        self.modules = dict(self.gm.named_modules())
        self._uf = _UnionFind()
        self._spaces: list[tuple[str, np.ndarray]] = []
        self._pin_reason: dict[int, str] = {}
        self._module_outputs: dict[str, list[Layout]] = {}
        self.layouts: dict[str, Any] = {}
        self.shapes: dict[str, Any] = {}
        self.constraints: list[GroupConstraint] = []
        self.opaque: dict[str, str] = {}
        self.shuffles: dict[str, ChannelShuffle] = {}
        self.sliced_attrs: dict[str, AttrSlice] = {}
        self.channel_slices: dict[str, tuple[int, int, int]] = {}
        inputs = as_tuple(example_inputs)
        self.input_spec = input_spec(inputs)
        with eval_mode(model), torch.no_grad():
            if any(n.target is F.scaled_dot_product_attention for n in self.gm.graph.nodes):
                ShapeProp(self.gm).propagate(*inputs)  # shapes ahead of the run, for attention heads
            _LayoutInterpreter(self).run(*inputs)
        self._finalize()

    # ------------------------------------------------------------------ atoms
    def new_space(self, name: str, n: int) -> np.ndarray:
        atoms = self._uf.add(n)
        self._spaces.append((name, atoms))
        return atoms

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            self._uf.union(x, y)

    def pin(self, layout: Any, reason: str) -> None:
        for lay in _flatten_layouts(layout):
            for a in lay.atoms.tolist():
                self._pin_reason.setdefault(a, reason)

    def record_output(self, module_name: str, layout: Any) -> None:
        if isinstance(layout, Layout):
            self._module_outputs.setdefault(module_name, []).append(layout)

    # ------------------------------------------------------------------ groups
    def _finalize(self) -> None:
        roots = self._uf.roots()
        self.roots = roots
        n = len(roots)
        # group = connected component of spaces that share an atom class
        group_of_root: dict[int, int] = {}
        space_group = list(range(len(self._spaces)))

        def gfind(i: int) -> int:
            while space_group[i] != i:
                space_group[i] = space_group[space_group[i]]
                i = space_group[i]
            return i

        for si, (_, atoms) in enumerate(self._spaces):
            for r in np.unique(roots[atoms]).tolist():
                if r in group_of_root:
                    a, b = gfind(group_of_root[r]), gfind(si)
                    if a != b:
                        space_group[max(a, b)] = min(a, b)
                else:
                    group_of_root[r] = si
        members: dict[int, list[str]] = {}
        producers: dict[int, list[str]] = {}
        classes: dict[int, list[int]] = {}
        for si, (name, atoms) in enumerate(self._spaces):
            g = gfind(si)
            members.setdefault(g, []).append(name)
            producers.setdefault(g, []).append(name)
            seen = classes.setdefault(g, [])
            for r in roots[atoms].tolist():
                if r not in seen:
                    seen.append(r)
        for name, lays in self._module_outputs.items():
            for lay in lays:
                for r in np.unique(roots[lay.atoms]).tolist():
                    g = gfind(group_of_root[r])
                    if name not in members[g]:
                        members[g].append(name)
        pinned_root: dict[int, str] = {}
        for a, reason in self._pin_reason.items():
            pinned_root.setdefault(int(roots[a]), reason)
        self.groups: dict[str, GroupSpec] = {}
        self.producers: dict[str, tuple[str, ...]] = {}
        self.group_classes: dict[str, np.ndarray] = {}
        self.root_group: np.ndarray = np.full(n, -1, dtype=np.int64)
        self._group_names: list[str] = []
        for g in sorted(classes):
            name = self._spaces[g][0]
            cls = np.array(classes[g], dtype=np.int64)
            pinned = {i: pinned_root[r] for i, r in enumerate(cls.tolist()) if r in pinned_root}
            self.groups[name] = GroupSpec(len(cls), tuple(members[g]), pinned)
            self.producers[name] = tuple(producers[g])
            self.group_classes[name] = cls

    def consumers(self, group: str) -> dict[str, np.ndarray]:
        """Conv/linear layers that read ``group``'s channels: layer name -> for each of its input positions,
        the group channel it carries (-1 for positions from other groups or untracked inputs).

        A flattened input repeats a channel's index over its H*W positions.
        """
        index = {int(r): i for i, r in enumerate(self.group_classes[group].tolist())}
        out: dict[str, np.ndarray] = {}
        for node in self.gm.graph.nodes:
            if node.op != "call_module" or not isinstance(self.modules[node.target], (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            lay = self.layouts.get(node.args[0].name) if isinstance(node.args[0], torch.fx.Node) else None
            if not isinstance(lay, Layout):
                continue
            pos = np.array([index.get(int(r), -1) for r in self.roots[lay.atoms].tolist()], dtype=np.int64)
            if (pos >= 0).any():
                out[str(node.target)] = pos
        return out

    def group_of(self, layer: str) -> list[str]:
        """Names of the groups that ``layer``'s output channels belong to."""
        return [g for g, spec in self.groups.items() if layer in spec.members]

    def constrained_groups(self) -> set[str]:
        """Groups touched by a grouped conv or a GroupNorm (their kept counts must match per slice)."""
        out = set()
        for c in self.constraints:
            roots = self.roots[c.layout.atoms]
            for name, cls in self.group_classes.items():
                if np.isin(roots, cls).any():
                    out.add(name)
        return out

    # ------------------------------------------------------------------ plans
    def root_keep(self, plan: Plan) -> np.ndarray:
        """Bool per atom root: False where the plan prunes that channel class. Validates the plan."""
        return self.check_plan(plan)

    def kept_positions(self, layout: Layout, root_keep: np.ndarray) -> np.ndarray:
        """Indices along ``layout``'s channel axis that survive (int64)."""
        return np.nonzero(root_keep[self.roots[layout.atoms]])[0]

    def check_plan(self, plan: Plan) -> np.ndarray:
        """Validate ``plan`` against this model (groups, sizes, pinned channels, per-group equal counts);
        return the bool keep flag per atom root (see :meth:`root_keep`)."""
        plan.validate(self.groups)
        keep = np.ones(len(self.roots), dtype=bool)
        for name, g in plan.channels.items():
            cls = self.group_classes[name]
            pruned = np.ones(len(cls), dtype=bool)
            pruned[list(g.keep)] = False
            keep[cls[pruned]] = False
        for c in self.constraints:
            kept = keep[self.roots[c.layout.atoms]].reshape(c.groups, -1).sum(axis=1)
            if len(set(kept.tolist())) > 1:
                raise PlanError(
                    f"{c.what} {c.module!r} (groups={c.groups}) needs the same number of kept channels in each "
                    f"of its {c.groups} groups, got {kept.tolist()}; keep as many channels in every group"
                )
            if kept[0] == 0:
                raise PlanError(f"{c.what} {c.module!r}: every channel of the layer would be pruned")
        self._check_no_empty_tensor(keep)
        return keep

    def _check_no_empty_tensor(self, keep: np.ndarray) -> None:
        """Refuse a plan that prunes every channel of one tensor (a split/chunk piece, or one producer's whole
        share of a group): the layers reading it would have zero channels."""
        for node in self.gm.graph.nodes:
            lay = self.layouts.get(node.name)
            pieces = list(lay) if isinstance(lay, tuple) else [lay]
            for i, piece in enumerate(pieces):
                if not isinstance(piece, Layout) or piece.size == 0 or keep[self.roots[piece.atoms]].any():
                    continue
                if node.op == "call_module":
                    what = f"layer {node.target!r} ({type(self.modules[node.target]).__name__})"
                elif isinstance(lay, tuple):
                    what = f"piece {i} of {node.name!r} ({node.target if isinstance(node.target, str) else node.target.__name__})"
                else:
                    what = f"tensor {node.name!r}"
                where = [f"{g!r} channels {idx}" for g, idx in self._group_channels(piece.atoms).items()]
                start = list(node.users)
                if isinstance(lay, tuple):
                    start = [u for u in start if u.target is operator.getitem and u.args[1] == i]
                readers = self._reading_layers(start)
                raise PlanError(
                    f"the plan prunes every one of the {piece.size} channels of {what} ({', '.join(where)})"
                    f"{', read by ' + str(readers) if readers else ''}: that would leave a layer with zero "
                    "channels. Keep at least one channel of every split/chunk piece and of every producer's "
                    "share of a group"
                )

    def _group_channels(self, atoms: np.ndarray) -> dict[str, list[int]]:
        """Group name -> the (sorted) group channel indices that ``atoms`` carry."""
        out: dict[str, list[int]] = {}
        roots = set(self.roots[atoms].tolist())
        for gname, cls in self.group_classes.items():
            idx = [i for i, r in enumerate(cls.tolist()) if r in roots]
            if idx:
                out[gname] = idx
        return out

    def _reading_layers(self, start: list[torch.fx.Node], limit: int = 3) -> list[str]:
        """The first modules at or downstream of the nodes ``start`` (breadth first), to name in errors."""
        found: list[str] = []
        frontier, seen = list(start), set()
        while frontier and len(found) < limit:
            user = frontier.pop(0)
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_module":
                found.append(str(user.target))
            else:
                frontier.extend(user.users)
        return found

    def plan_from_masks(self, masks: Mapping[str, Any], *, conflict: str = "error") -> Plan:
        """See :meth:`sparsekern.plan.Plan.from_channel_masks`."""
        if conflict not in ("error", "union", "intersection"):
            raise ValueError(f"conflict must be 'error', 'union' or 'intersection', got {conflict!r}")
        decided: dict[int, tuple[bool, str]] = {}
        keep_root = np.ones(len(self.roots), dtype=bool)
        for name, mask in masks.items():
            for atoms, m in self._mask_targets(name, mask):
                for r, k in zip(self.roots[atoms].tolist(), m.tolist()):
                    if r in decided and decided[r][0] != k:
                        if conflict == "error":
                            g = self._group_name_of_root(r)
                            raise PlanError(
                                f"conflicting masks in dependency group {g!r}: {decided[r][1]!r} "
                                f"{'keeps' if decided[r][0] else 'prunes'} a channel that {name!r} "
                                f"{'keeps' if k else 'prunes'}. Channels in one group are pruned together; give "
                                "one mask per group, or pass conflict='union' or 'intersection'"
                            )
                        k = (decided[r][0] or k) if conflict == "union" else (decided[r][0] and k)
                    decided[r] = (bool(k), name)
                    keep_root[r] = k
        channels: dict[str, GroupKeep] = {}
        for gname, cls in self.group_classes.items():
            kept = keep_root[cls]
            if not kept.all():
                spec = self.groups[gname]
                channels[gname] = GroupKeep(spec.size, tuple(np.nonzero(kept)[0].tolist()), spec.members)
        plan = Plan(channels=channels, meta={"inputs": self.input_spec})
        self.check_plan(plan)
        return plan

    def _mask_targets(self, name: str, mask: Any) -> list[tuple[np.ndarray, np.ndarray]]:
        m = _as_bool_mask(name, mask)
        if name in self._module_outputs:
            layouts = self._module_outputs[name]
            targets = []
            for lay in layouts:
                if lay.size != m.shape[0]:
                    raise PlanError(
                        f"mask for {name!r} has {m.shape[0]} entries but the layer has {lay.size} output "
                        f"channels; give one boolean per output channel"
                    )
                targets.append((lay.atoms, m))
            return targets
        if name in self.groups:
            cls = self.group_classes[name]
            if len(cls) != m.shape[0]:
                raise PlanError(f"mask for group {name!r} has {m.shape[0]} entries, the group has {len(cls)}")
            return [(cls, m)]
        if name in self.modules:
            raise PlanError(
                f"{name!r} ({type(self.modules[name]).__name__}) has no tracked output channels: it is not "
                "called in forward, or its channels pass through an op that is not sliced. Mask a conv, "
                "linear or norm layer whose output feeds the network"
            )
        close = sorted(self._module_outputs, key=lambda k: _edit(k, name))[:3]
        raise PlanError(f"the model has no layer {name!r}; closest names: {close}")

    def _group_name_of_root(self, r: int) -> str:
        for gname, cls in self.group_classes.items():
            if r in cls:
                return gname
        return "?"


def _as_bool_mask(name: str, mask: Any) -> np.ndarray:
    """``mask`` as a 1-D bool array. Only bool and 0/1 numbers are masks: importance scores, NaN or strings
    would all read as "keep" by truthiness, so they are refused."""
    m = mask.detach().cpu() if isinstance(mask, torch.Tensor) else mask
    if isinstance(m, torch.Tensor) and m.dtype == torch.bfloat16:
        m = m.float()
    try:
        m = np.asarray(m)
    except (TypeError, ValueError) as e:
        raise PlanError(f"mask for {name!r} is not an array of booleans: {e}") from e
    if m.ndim != 1:
        raise PlanError(f"mask for {name!r} must be 1-D (one entry per channel), got shape {m.shape}")
    if m.dtype == bool:
        return m
    numeric = m.dtype.kind in "iuf"
    bad = np.ones(m.shape, dtype=bool) if not numeric else ~np.isin(m, (0, 1))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise PlanError(
            f"mask for {name!r} must hold booleans (or 0/1), got {m.dtype} with value {m[i].item()!r} at channel {i}. "
            "For importance scores, threshold them into a keep mask first (e.g. `scores > t` or the top-k)"
        )
    return m.astype(bool)


def _edit(a: str, b: str) -> int:
    return edit_distance(a, b)


def _flatten_layouts(layout: Any) -> Iterable[Layout]:
    if isinstance(layout, Layout):
        yield layout
    elif isinstance(layout, (tuple, list)):
        for item in layout:
            yield from _flatten_layouts(item)
    elif isinstance(layout, dict):
        for item in layout.values():
            yield from _flatten_layouts(item)


def trace_channels(model: nn.Module, example_inputs: Any, *, leaf_modules: tuple[type, ...] = (),
                   tracer: str = "auto") -> ChannelGraph:
    """Analyse ``model``'s channel dependencies on ``example_inputs`` (a tensor or tuple of tensors); ``tracer``
    as :func:`trace_graph`."""
    return ChannelGraph(model, example_inputs, leaf_modules=leaf_modules, tracer=tracer)


# ----------------------------------------------------------------------------- layout propagation
class _LayoutInterpreter(torch.fx.Interpreter):
    """Runs the graph on real inputs and computes each node's :class:`Layout` beside its value."""

    def __init__(self, cg: ChannelGraph) -> None:
        super().__init__(cg.gm)
        self.cg = cg
        self.first_input: dict[str, Any] = {}
        self.shuffle_shapes: dict[str, tuple[int, ...]] = {}
        self.attr_readers: dict[int, int] | None = None  # id(tensor) -> how often the graph reads it

    def run_node(self, n: torch.fx.Node) -> Any:
        value = super().run_node(n)
        self.cg.shapes[n.name] = _shapes(value)
        self.cg.layouts[n.name] = self._layout(n, value)
        return value

    # -- the LayoutContext that channel rules use (sparsekern.channel_rules)
    def lay(self, arg: Any) -> Any:
        """The layout of fx argument ``arg`` (None when untracked or not a node)."""
        return self.cg.layouts.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def val(self, arg: Any) -> Any:
        """The value of fx argument ``arg`` on the example inputs."""
        return self.env[arg] if isinstance(arg, torch.fx.Node) else arg

    def module_of(self, n: torch.fx.Node) -> nn.Module:
        """The module that ``call_module`` node ``n`` calls."""
        return self.cg.modules[n.target]

    def opaque(self, n: torch.fx.Node, why: str) -> None:
        """Pin every tracked input channel of ``n`` (it cannot be sliced, because ``why``); returns None."""
        tracked = [self.lay(a) for a in n.all_input_nodes]
        if any(lay is not None for lay in tracked):
            self.cg.opaque[n.name] = why
            self.cg.pin(tracked, f"it reaches {n.name!r} ({why})")
        return None

    def produce(self, n: torch.fx.Node, size: int, cdim: int) -> Layout:
        """The ``size`` channels that module node ``n`` creates on axis ``cdim``: new ones at the module's first
        call, the same ones at every later call of a shared module."""
        return Layout(cdim, self._output_atoms(str(n.target), size))

    # -- dispatch
    def _layout(self, n: torch.fx.Node, value: Any) -> Any:
        if n.op in ("placeholder", "get_attr"):
            return None
        if n.op == "output":
            self.cg.pin([self.lay(a) for a in n.all_input_nodes], "it is a model output (never prune logits)")
            return None
        if n.op == "call_module":
            return self._module(n, self.cg.modules[n.target], value)
        if n.op == "call_function":
            return self._function(n, n.target, value)
        if n.op == "call_method":
            return self._method(n, n.target, value)
        return self.opaque(n, f"unsupported node kind {n.op}")

    def _module(self, n: torch.fx.Node, m: nn.Module, value: Any) -> Any:
        """Apply ``m``'s channel rule; a module with per-channel state shares its input channels across calls,
        and its output layout is recorded under its name."""
        name = str(n.target)
        rule = module_rule(m)
        if rule is not None and rule.shares_weights:
            self._share_weights(n, name, self.lay(n.args[0]) if n.args else None)
        if rule is None or rule.layout is None:
            return self.opaque(n, f"module {type(m).__name__} is not sliceable")
        return self._record(name, rule.layout(self, n, value))

    def _function(self, n: torch.fx.Node, fn: Callable, value: Any) -> Any:
        rule = channel_rule(fn)
        if rule is not None and rule.layout is not None:
            return rule.layout(self, n, value)
        if not _has_tensor(value):
            return None
        return self.opaque(n, f"function {getattr(fn, '__name__', fn)} is not sliceable")

    def _method(self, n: torch.fx.Node, name: str, value: Any) -> Any:
        if name in ("size", "dim", "numel") or not _has_tensor(value):
            return None
        rule = channel_rule(name)
        if rule is not None and rule.layout is not None:
            return rule.layout(self, n, value)
        return self.opaque(n, f"method .{name}() is not sliceable")

    # -- built-in module layouts
    def conv(self, n: torch.fx.Node, value: Any) -> Any:
        """Convolutions: new output channels; depthwise ones tie output to input channels; grouped ones add
        per-group constraints; transposed ones are opaque."""
        m, name = self.module_of(n), str(n.target)
        x = self.lay(n.args[0]) if n.args else None
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return self.opaque(n, "transposed convolutions are kept dense")
        if name in self.cg._module_outputs:
            # a later call of a shared conv: the first call recorded its channels and constraints
            if x is not None and x.cdim != 1:
                self.opaque(n, "conv input whose channel axis is not dim 1")
            return Layout(1, self._output_atoms(name, m.out_channels))
        if is_depthwise(m) and x is not None:
            # output channel j reads input channel j // multiplier: they live and die together
            return Layout(1, np.repeat(x.atoms, m.out_channels // m.in_channels))
        out = Layout(1, self._output_atoms(name, m.out_channels))
        if is_depthwise(m) and m.out_channels == m.in_channels:
            # untracked inputs stay whole, so each of its groups keeps its single output channel
            self.cg.pin(out, f"depthwise conv {name!r} reads input channels that are not tracked (one "
                             "output channel per input channel)")
        elif m.groups > 1:
            if x is not None:
                self.cg.constraints.append(GroupConstraint(n.name, name, x, m.groups, "grouped conv input of"))
            self.cg.constraints.append(GroupConstraint(n.name, name, out, m.groups, "grouped conv"))
        if x is not None and x.cdim != 1:
            self.opaque(n, "conv input whose channel axis is not dim 1")
        return out

    def linear(self, n: torch.fx.Node, value: Any) -> Any:
        """Linear layers: new output features on the last axis; the input's features must be its last axis."""
        m, x = self.module_of(n), self.lay(n.args[0]) if n.args else None
        ndim = value.dim()
        if x is not None and x.cdim != ndim - 1:
            self.opaque(n, "linear input whose feature axis is not the last dim")
        return Layout(ndim - 1, self._output_atoms(str(n.target), m.out_features))

    def embedding(self, n: torch.fx.Node, value: Any) -> Any:
        """Embeddings: new features on the last axis (one per column of the table); the ids carry none."""
        return Layout(value.dim() - 1, self._output_atoms(str(n.target), self.module_of(n).embedding_dim))

    def group_norm(self, n: torch.fx.Node, value: Any) -> Any:
        """GroupNorm: pass-through on dim 1, with equal kept counts per norm group."""
        m, x = self.module_of(n), self.lay(n.args[0]) if n.args else None
        if x is not None:
            if x.cdim != 1:
                return self.opaque(n, "GroupNorm over a non-channel axis")
            self.cg.constraints.append(GroupConstraint(n.name, str(n.target), x, m.num_groups, "GroupNorm"))
        return self.passthrough(n, x, value)

    def layer_norm(self, n: torch.fx.Node, value: Any) -> Any:
        """LayerNorm and RMSNorm: pass-through when they normalise the channel axis only (the last one)."""
        m, x = self.module_of(n), self.lay(n.args[0]) if n.args else None
        if x is not None and (len(m.normalized_shape) != 1 or x.cdim != value.dim() - 1):
            return self.opaque(n, "LayerNorm over more than the channel axis")
        return self.passthrough(n, x, value)

    def prelu(self, n: torch.fx.Node, value: Any) -> Any:
        """PReLU: pass-through; a per-channel one needs the channel axis on dim 1."""
        m, x = self.module_of(n), self.lay(n.args[0]) if n.args else None
        if m.num_parameters > 1 and x is not None and x.cdim != 1:
            return self.opaque(n, "per-channel PReLU on a non-channel axis")
        return self.passthrough(n, x, value)

    def _output_atoms(self, name: str, n: int) -> np.ndarray:
        """A conv/linear's output channels: new atoms at its first call, the same atoms at every later call
        (one weight row per channel, whichever call computes it)."""
        lays = self.cg._module_outputs.get(name)
        return lays[0].atoms if lays else self.cg.new_space(name, n)

    def _share_weights(self, n: torch.fx.Node, name: str, x: Layout | None) -> None:
        """A layer with per-channel weights that is called more than once has its weights sliced once, so its
        input channels must be pruned alike at every call: unify them with the first call's (or pin both
        when only one of the two is tracked)."""
        first = self.first_input.setdefault(name, x)
        if first is x or (first is None and x is None):
            return
        if first is None or x is None or first.size != x.size:
            self.cg.opaque[n.name] = f"shared module {name!r} is called on tracked and untracked inputs"
            self.cg.pin([first, x], f"module {name!r} is called more than once, at {n.name!r} on input "
                                    "channels that are not tracked the same way")
            return
        self.cg.unify(first.atoms, x.atoms)

    def _record(self, name: str, layout: Any) -> Any:
        self.cg.record_output(name, layout)
        return layout

    def passthrough(self, n: torch.fx.Node, x: Any, value: Any) -> Any:
        if x is None or not isinstance(value, torch.Tensor):
            return None
        in_val = self.val(n.args[0])
        if value.dim() != in_val.dim() or value.shape[x.cdim] != x.size:
            return self.opaque(n, "changes the channel axis")
        return x

    # -- built-in function and method layouts
    def binary(self, n: torch.fx.Node, value: Any) -> Any:
        a, b = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("other")
        la, lb = self.lay(a), self.lay(b)
        if la is None and lb is None:
            return None
        out_dim = value.dim()
        result = None
        for arg, lay in ((a, la), (b, lb)):
            v = self.val(arg)
            if lay is None:
                continue
            cdim = lay.cdim + (out_dim - v.dim())  # broadcasting aligns from the right
            cand = Layout(cdim, lay.atoms)
            if value.shape[cdim] != lay.size:
                return self.opaque(n, "broadcasts a channel axis")
            if result is None:
                result = cand
            elif result.cdim != cand.cdim:
                return self.opaque(n, "combines tensors whose channel axes differ")
            else:
                self.cg.unify(result.atoms, cand.atoms)
        for arg, lay in ((a, la), (b, lb)):
            v = self.val(arg)
            if lay is None and isinstance(v, torch.Tensor) and v.dim() > 0:
                axis = result.cdim - (out_dim - v.dim())
                attr = _attr_under_slices(arg, axis)
                if axis >= 0 and v.shape[axis] == result.size and attr is not None and self._private_attr(attr):
                    # a layer scale, or rows of a learned position table (pos.weight[:t])
                    self.cg.sliced_attrs[attr.name] = AttrSlice(str(attr.target), axis, result)
                elif axis >= 0 and v.shape[axis] != 1:
                    self.cg.opaque[n.name] = "combines tracked channels with an untracked per-channel tensor"
                    self.cg.pin(result, f"it is combined with an untracked tensor at {n.name!r}")
        return result

    def _private_attr(self, arg: Any) -> bool:
        """Whether ``arg`` is a ``get_attr`` node that alone reads its tensor, and is read by one op only: the
        tensor is no parameter or buffer of a layer the graph calls and no other ``get_attr`` reads it."""
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr" or len(arg.users) != 1:
            return False
        if self.attr_readers is None:
            readers: dict[int, int] = {}
            for node in self.cg.gm.graph.nodes:
                if node.op == "get_attr":
                    t = _attr(self.cg.gm, str(node.target))
                    readers[id(t)] = readers.get(id(t), 0) + 1
                elif node.op == "call_module":
                    for t in [*self.cg.modules[node.target].parameters(), *self.cg.modules[node.target].buffers()]:
                        readers[id(t)] = readers.get(id(t), 0) + 2
            self.attr_readers = readers
        t = _attr(self.cg.gm, str(arg.target))
        return isinstance(t, torch.Tensor) and self.attr_readers.get(id(t)) == 1

    def cat(self, n: torch.fx.Node, value: Any) -> Any:
        tensors = n.args[0]
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        lays = [self.lay(t) for t in tensors]
        if all(lay is None for lay in lays):
            return None
        ndim = value.dim()
        dim = dim % ndim
        ref = next(lay for lay in lays if lay is not None)
        if dim == ref.cdim:
            if any(lay is None or lay.cdim != dim for lay in lays):
                # an untracked piece: give it fresh, pinned atoms so offsets stay right
                parts = []
                for t, lay in zip(tensors, lays):
                    if lay is None or lay.cdim != dim:
                        atoms = self.cg.new_space(f"{n.name}:untracked", self.val(t).shape[dim])
                        readers = self.cg._reading_layers([n])
                        self.cg.pin(Layout(dim, atoms), f"it is concatenated at {n.name!r} with untracked data"
                                                        f"{' (read by ' + str(readers) + ')' if readers else ''}")
                        parts.append(atoms)
                    else:
                        parts.append(lay.atoms)
                return Layout(dim, np.concatenate(parts))
            return Layout(dim, np.concatenate([lay.atoms for lay in lays]))
        if any(lay is not None and lay.cdim != ref.cdim for lay in lays) or not all(
                lay is not None or self._broadcast_parameter(t, ref) for t, lay in zip(tensors, lays)):
            return self.opaque(n, "concatenates tracked and untracked tensors along a non-channel axis")
        for lay in lays:
            if lay is not None and lay is not ref:
                self.cg.unify(ref.atoms, lay.atoms)
        return ref

    def _broadcast_parameter(self, t: Any, lay: Layout) -> bool:
        """Whether untracked ``t`` is a model tensor that only this op reads, directly, through row slices or
        through ``expand``, with ``lay``'s channels on ``lay.cdim`` (ViT's class token, concatenated to the
        patch embeddings): it is then sliced with them, and an ``expand`` of it gets their layout."""
        v = self.val(t)
        if not isinstance(t, torch.fx.Node) or not isinstance(v, torch.Tensor) or v.shape[lay.cdim] != lay.size:
            return False
        expanded = t.op == "call_method" and t.target == "expand" and len(t.users) == 1
        src = t.args[0] if expanded else t
        # a value the interpreter has already freed (its last use ran): read a model tensor from the model
        src_val = _attr(self.cg.gm, str(src.target)) if src.op == "get_attr" else self.env.get(src)
        axis = lay.cdim - (v.dim() - src_val.dim()) if isinstance(src_val, torch.Tensor) else -1
        attr = _attr_under_slices(src, axis) if axis >= 0 else None
        if attr is None or src_val.shape[axis] != lay.size or not self._private_attr(attr):
            return False
        self.cg.sliced_attrs[attr.name] = AttrSlice(str(attr.target), axis, lay)
        if expanded:
            self.cg.layouts[t.name] = Layout(lay.cdim, lay.atoms)  # its size argument names the channel count
        return True

    def split(self, n: torch.fx.Node, value: Any) -> Any:
        x = self.lay(n.args[0])
        if x is None:
            return None
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0)
        dim = dim % self.val(n.args[0]).dim()
        if dim != x.cdim:
            return tuple(x for _ in value)
        out, start = [], 0
        for piece in value:
            size = piece.shape[dim]
            out.append(Layout(dim, x.atoms[start : start + size]))
            start += size
        return tuple(out)

    def getitem(self, n: torch.fx.Node, value: Any) -> Any:
        container, index = n.args
        lay = self.lay(container)
        if lay is None:
            return None
        if isinstance(lay, tuple):
            return lay[index]
        src = self.val(container)
        if not isinstance(src, torch.Tensor):
            return None
        idx = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, (torch.fx.Node, torch.Tensor, list)) for i in idx):
            return self.opaque(n, "advanced indexing")
        atoms = lay.atoms
        # walk source dims
        n_explicit = sum(1 for i in idx if i is not None and i is not Ellipsis)
        src_dim, out_dim, new_cdim = 0, 0, None
        for position, i in enumerate(idx):
            if i is Ellipsis:
                skip = src.dim() - n_explicit
                if src_dim <= lay.cdim < src_dim + skip:
                    new_cdim = out_dim + (lay.cdim - src_dim)
                src_dim += skip
                out_dim += skip
            elif i is None:
                out_dim += 1
            elif isinstance(i, int):
                if src_dim == lay.cdim:
                    return self.opaque(n, "indexes a single channel")
                src_dim += 1
            elif isinstance(i, slice):
                if src_dim == lay.cdim:
                    if i != slice(None):
                        bounds = _constant_range(slice(self.val(i.start), self.val(i.stop), self.val(i.step)),
                                                 lay.size)
                        if bounds is None:
                            return self.opaque(n, "slices the channel axis with a step")
                        atoms = lay.atoms[bounds[0]:bounds[1]]  # a fused qkv's query part, ...
                        self.cg.channel_slices[n.name] = (position, *bounds)
                    new_cdim = out_dim
                src_dim += 1
                out_dim += 1
            else:
                return self.opaque(n, "unsupported index")
        if new_cdim is None:
            new_cdim = out_dim + (lay.cdim - src_dim)
        return Layout(new_cdim, atoms)

    def reshape(self, n: torch.fx.Node, x: Any, value: Any) -> Any:
        if n.name in self.cg.shuffles:
            return self._shuffle_end(n, value)
        if x is None:
            return None
        in_shape = tuple(self.val(n.args[0]).shape)
        out_shape = tuple(value.shape)
        lead = int(np.prod(in_shape[: x.cdim]))
        cum = 1
        for p, s in enumerate(out_shape):
            if cum == lead:
                if s == in_shape[x.cdim] and _same_after(in_shape, x.cdim, out_shape, p):
                    return Layout(p, x.atoms)
                if p == len(out_shape) - 1 and s == int(np.prod(in_shape[x.cdim :])):
                    return Layout(p, np.repeat(x.atoms, int(np.prod(in_shape[x.cdim + 1 :]))))
                merged = _merged_axes(in_shape, x.cdim, s)
                if merged and _same_after(in_shape, x.cdim + merged - 1, out_shape, p):
                    # the channel axis merged with the axes after it: each atom repeats over their extent
                    return Layout(p, np.repeat(x.atoms, int(np.prod(in_shape[x.cdim + 1 : x.cdim + merged]))))
            cum *= s
        if self._shuffle_start(n, x, in_shape, out_shape):
            return None  # the chain's inner nodes carry no layout; its last node gets the permuted channels
        heads = self._head_split(n, x, in_shape, out_shape)
        if heads is not None:
            return heads
        return self.opaque(n, f"reshape {in_shape} -> {out_shape} mixes the channel axis")

    def _head_split(self, n: torch.fx.Node, x: Layout, in_shape: tuple, out_shape: tuple) -> Layout | None:
        """A view splitting channel axis ``c`` into ``k >= 2`` factors, one of which reaches attention as its
        head axis (:func:`sparsekern.head_axis.attention_head_axis`): every atom of a head is tied into one,
        and the layout is the head axis with one atom per head. None when the view is not such a split."""
        c = x.cdim
        if tuple(out_shape[:c]) != tuple(in_shape[:c]):
            return None
        for k in range(2, len(out_shape) - c + 1):
            if int(np.prod(out_shape[c:c + k])) == in_shape[c] and tuple(out_shape[c + k:]) == tuple(in_shape[c + 1:]):
                break
        else:
            return None
        axis = attention_head_axis(n, c, k, len(out_shape))
        if axis is None:
            return None
        grid = np.moveaxis(x.atoms.reshape(out_shape[c:c + k]), axis, 0).reshape(out_shape[c + axis], -1)
        for column in range(1, grid.shape[1]):
            self.cg.unify(grid[:, 0], grid[:, column])
        return Layout(c + axis, grid[:, 0].copy())

    def sdpa(self, n: torch.fx.Node, value: Any) -> Any:
        """``F.scaled_dot_product_attention``: query, key and value carry their heads on axis ``-3`` (as
        :meth:`_head_split` tracks them); the heads of the three are tied and the output keeps them."""
        names = ("query", "key", "value", "attn_mask")
        args = [n.args[i] if len(n.args) > i else n.kwargs.get(name) for i, name in enumerate(names)]
        q, k, v = (self.lay(a) for a in args[:3])
        if q is None and k is None and v is None:
            return None
        if not all(isinstance(lay, Layout) for lay in (q, k, v)):
            return self.opaque(n, "attention over query, key and value of which only some carry tracked heads")
        head = value.dim() - 3
        if any(lay.cdim != head for lay in (q, k, v)):
            return self.opaque(n, "attention whose tracked channel axis is not the head axis (-3)")
        if k.size != v.size or q.size % k.size or (q.size != k.size and not n.kwargs.get("enable_gqa")):
            return self.opaque(n, f"attention over {q.size} query, {k.size} key and {v.size} value heads")
        mask = self.val(args[3])
        if isinstance(mask, torch.Tensor) and mask.dim() >= 3 and mask.shape[-3] != 1:
            return self.opaque(n, "a per-head attention mask would need slicing with the heads")
        group = q.size // k.size  # enable_gqa: query head i reads key/value head i // group
        self.cg.unify(q.atoms, np.repeat(k.atoms, group))
        self.cg.unify(q.atoms, np.repeat(v.atoms, group))
        return Layout(head, q.atoms)

    def expand(self, n: torch.fx.Node, value: Any) -> Any:
        """``x.expand(*sizes)``: broadcasts unit axes and may add leading ones; the channel axis keeps its
        size (it moves right by the added axes)."""
        x = self.lay(n.args[0])
        if x is None:
            return None
        cdim = x.cdim + value.dim() - self.val(n.args[0]).dim()
        if value.shape[cdim] != x.size:
            return self.opaque(n, "broadcasts the channel axis")
        return Layout(cdim, x.atoms)

    def repeat_interleave(self, n: torch.fx.Node, value: Any) -> Any:
        """``x.repeat_interleave(r, dim)`` with an int ``r``: along the channel axis each atom repeats ``r``
        times (grouped-query attention's key/value heads, one per query head); along another axis the channels
        stay as they are."""
        x = self.lay(n.args[0])
        if x is None:
            return None
        repeats = n.args[1] if len(n.args) > 1 else n.kwargs.get("repeats")
        dim = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        if not isinstance(repeats, int) or dim is None:
            return self.opaque(n, "repeat_interleave with tensor repeats or without a dim")
        if dim % value.dim() == x.cdim:
            return Layout(x.cdim, np.repeat(x.atoms, repeats))
        return Layout(x.cdim, x.atoms)

    def _shuffle_start(self, n: torch.fx.Node, x: Layout, in_shape: tuple, out_shape: tuple) -> bool:
        """Whether ``n`` starts a channel shuffle (see :class:`ChannelShuffle`): it splits the channel axis
        ``c`` into ``(g, C / g)``, its only user swaps axes ``c`` and ``c + 1``, and the only user of that
        (after an optional ``contiguous``/``clone``) is a view/reshape/flatten. Records the shuffle under the
        last node, which checks that it merges the two axes back (:meth:`_shuffle_end`)."""
        c, ndim = x.cdim, len(out_shape)
        if not (ndim == len(in_shape) + 1 and out_shape[:c] == in_shape[:c] and out_shape[c + 2:] == in_shape[c + 1:]
                and out_shape[c] * out_shape[c + 1] == in_shape[c]):
            return False
        chain = [n]
        swap = _only_user(n)
        if swap is None or not _swaps_axes(swap, c, ndim):
            return False
        chain.append(swap)
        end = _only_user(swap)
        if end is not None and end.target in ("contiguous", "clone"):
            chain.append(end)
            end = _only_user(end)
        if end is None or end.target not in ("view", "reshape", "flatten", torch.reshape, torch.flatten):
            return False
        g, per = out_shape[c], out_shape[c + 1]
        source = np.arange(in_shape[c]).reshape(g, per).T.reshape(-1)
        self.cg.shuffles[end.name] = ChannelShuffle(tuple(m.name for m in chain + [end]), c, source, x)
        self.shuffle_shapes[end.name] = in_shape
        return True

    def _shuffle_end(self, n: torch.fx.Node, value: Any) -> Any:
        """The last node of a channel shuffle: the input's channels, permuted, when it restores the input's
        shape; otherwise the shuffle is not one (the input's channels are pinned)."""
        shuffle = self.cg.shuffles[n.name]
        if isinstance(value, torch.Tensor) and tuple(value.shape) == self.shuffle_shapes[n.name]:
            return Layout(shuffle.dim, shuffle.input.atoms[shuffle.source])
        del self.cg.shuffles[n.name]
        self.cg.opaque[shuffle.nodes[0]] = "splits the channel axis and does not merge it back as a shuffle"
        self.cg.pin(shuffle.input, f"it reaches {shuffle.nodes[0]!r} (a view that splits the channel axis)")
        return None

    def permute(self, n: torch.fx.Node, value: Any) -> Any:
        x = self.lay(n.args[0])
        if x is None:
            return None
        ndim = value.dim()
        if n.target in (torch.transpose, "transpose"):
            d0, d1 = (a % ndim for a in n.args[1:3])
            cdim = d1 if x.cdim == d0 else d0 if x.cdim == d1 else x.cdim
        else:
            perm = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
            cdim = [p % ndim for p in perm].index(x.cdim)
        return Layout(cdim, x.atoms)

    def reduce(self, n: torch.fx.Node, value: Any) -> Any:
        x = self.lay(n.args[0])
        if x is None:
            return None
        src = self.val(n.args[0])
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        keepdim = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
        if dims is None:
            return self.opaque(n, "reduces over all axes")
        dims = {d % src.dim() for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if x.cdim in dims:
            return self.opaque(n, "reduces over the channel axis")
        cdim = x.cdim if keepdim else x.cdim - sum(1 for d in dims if d < x.cdim)
        return Layout(cdim, x.atoms)


def _attr_under_slices(arg: Any, axis: int) -> torch.fx.Node | None:
    """``arg`` when it is a ``get_attr`` node, the ``get_attr`` node it slices when it is ``t[a:b, ...]`` with
    plain slices that leave ``axis`` whole (same axes as the tensor), else None."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "get_attr":
        return arg
    if arg.target is not operator.getitem or not isinstance(arg.args[0], torch.fx.Node) or arg.args[0].op != "get_attr":
        return None
    index = arg.args[1] if isinstance(arg.args[1], tuple) else (arg.args[1],)
    if not all(isinstance(i, slice) for i in index) or (axis < len(index) and index[axis] != slice(None)):
        return None
    if len(arg.args[0].users) != 1:
        return None
    return arg.args[0]


def _constant_range(index: slice, size: int) -> tuple[int, int] | None:
    """``(start, stop)`` of a slice with int (or absent) bounds and step 1 over ``size`` positions, else None
    (a step, or bounds that are not ints)."""
    if index.step not in (None, 1) or not all(b is None or isinstance(b, int) for b in (index.start, index.stop)):
        return None
    start, stop, _ = index.indices(size)
    return start, max(start, stop)


def _attr(root: nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` target names (``"stage1.0.layer_scale"``), or None."""
    owner, _, field = target.rpartition(".")
    try:
        return getattr(root.get_submodule(owner) if owner else root, field, None)
    except AttributeError:
        return None


def _only_user(n: torch.fx.Node) -> torch.fx.Node | None:
    """The single function or method call that uses ``n``, once and as its first argument, or None."""
    users = list(n.users)
    if len(users) != 1 or users[0].op not in ("call_function", "call_method") or not users[0].args:
        return None
    if users[0].args[0] is not n or sum(1 for a in users[0].all_input_nodes if a is n) != 1:
        return None
    return users[0]


def _swaps_axes(n: torch.fx.Node, c: int, ndim: int) -> bool:
    """Whether ``n`` is a transpose/permute (positional arguments) that swaps axes ``c`` and ``c + 1`` only."""
    args = n.args[1:]
    if n.target in (torch.transpose, "transpose") and len(args) == 2 and all(isinstance(a, int) for a in args):
        return {a % ndim for a in args} == {c, c + 1}
    if n.target in (torch.permute, "permute"):
        perm = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        swapped = list(range(ndim))
        swapped[c], swapped[c + 1] = c + 1, c
        return all(isinstance(a, int) for a in perm) and [a % ndim for a in perm] == swapped
    return False


def _merged_axes(in_shape: Sequence[int], c: int, size: int) -> int:
    """How many axes from ``c`` on (at least 2) multiply to ``size``; 0 when none do."""
    extent = in_shape[c]
    for m in range(2, len(in_shape) - c + 1):
        extent *= in_shape[c + m - 1]
        if extent == size:
            return m
        if extent > size:
            break
    return 0


def _same_after(in_shape: Sequence[int], c: int, out_shape: Sequence[int], p: int) -> bool:
    return int(np.prod(in_shape[c + 1 :])) == int(np.prod(out_shape[p + 1 :]))


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return None
