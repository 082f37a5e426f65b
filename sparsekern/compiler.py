"""Static channel compiler: ``masked`` (the dense reference) and ``compile`` (physically smaller layers).

Both start from the same :class:`~sparsekern.graph.ChannelGraph`, so they agree on which positions of
which tensor a plan removes:

* :func:`masked` keeps every shape and multiplies each tensor that carries a pruned channel by a 0/1 mask,
  right after the op that produced it. Normalisation layers that pool statistics over channels
  (LayerNorm, RMSNorm, GroupNorm) compute them over the kept channels only: a pruned channel is absent, not zero.
* :func:`compile` slices the weights of every conv, linear and norm layer to the kept channels and rewrites
  the few graph arguments that name channel counts (split sizes, chunk, view/reshape sizes); a channel
  shuffle becomes one gather of the kept channels, a per-channel tensor the graph reads directly (a layer
  scale) is sliced. The result is a plain :class:`torch.fx.GraphModule` (scriptable and exportable) with the
  original submodule names.

In eval mode ``compile(model, plan)(x)`` equals ``masked(model, plan)(x)`` at the kept positions, and the
pruned positions do not exist (docs/design.md#semantics).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.fx
import torch.nn as nn

from sparsekern.channel_rules import module_rule
from sparsekern.graph import AttrSlice, ChannelGraph, Layout, keep_attributes, trace_channels
from sparsekern.masks import has_torch_prune, remove_torch_prune
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.slicing import slice_param
from sparsekern.utils import as_tuple, input_spec

__all__ = ["compile", "masked", "round_plan", "example_inputs_for"]


# ----------------------------------------------------------------------------- inputs
def check_input_spec(spec: Any) -> None:
    """Each record of a recorded input spec must be ``{"shape": [ints >= 0], "dtype": torch dtype name}``.

    Raises:
        PlanError: naming the first record that is not.
    """
    for s in spec or ():
        shape, dtype = (s.get("shape"), s.get("dtype")) if isinstance(s, Mapping) else (None, None)
        ok_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
        if not ok_shape or not isinstance(getattr(torch, str(dtype), None), torch.dtype):
            raise PlanError(f"invalid example-input record {s!r}: expected {{'shape': [ints >= 0], "
                            "'dtype': a torch dtype name}")


def example_inputs_for(plan_or_spec: Any, example_inputs: Any = None, *, seed: int = 0) -> tuple:
    """``example_inputs`` if given, else seeded random inputs of the shapes recorded in a plan's meta."""
    if example_inputs is not None:
        return as_tuple(example_inputs)
    spec = plan_or_spec.meta.get("inputs") if isinstance(plan_or_spec, Plan) else plan_or_spec
    if not spec:
        raise PlanError(
            "example_inputs are needed to trace the model: pass example_inputs=..., or build the plan with "
            "Plan.from_channel_masks(..., example_inputs=x), which records the input shapes"
        )
    check_input_spec(spec)
    g = torch.Generator().manual_seed(seed)

    def draw(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if dtype.is_floating_point:
            return torch.randn(shape, generator=g).to(dtype)
        return torch.randint(0, 2, shape, generator=g, dtype=dtype)  # valid indices for embeddings (token ids)

    return tuple(draw(s["shape"], getattr(torch, s["dtype"])) for s in spec)


def _trace(model: nn.Module, plan: Plan, example_inputs: Any) -> tuple[ChannelGraph, tuple]:
    inputs = example_inputs_for(plan, example_inputs)
    return trace_channels(model, inputs), inputs


def _without_torch_prune(model: nn.Module) -> nn.Module:
    """``model``, or for a model pruned with ``torch.nn.utils.prune`` a copy with its masks baked into its
    weights (:func:`sparsekern.masks.remove_torch_prune`): the pruning hook would undo a sliced weight."""
    return remove_torch_prune(model) if has_torch_prune(model) else model


# ----------------------------------------------------------------------------- masked reference
def masked(model: nn.Module, plan: Plan, example_inputs: Any = None) -> torch.fx.GraphModule:
    """The dense reference of ``plan``: same shapes, pruned channels zero in every tensor of their group.

    Removed blocks keep their layers with the residual branch multiplied by zero; dynamic and low-rank parts
    become their dense masked forms (:func:`sparsekern.dynamic.masked_dynamic`,
    :func:`sparsekern.lowrank.masked_lowrank`).

    Args:
        model: the unpruned model (not modified; the result holds copies of its parameters).
        plan: the plan (see :func:`compile`).
        example_inputs: inputs to trace with; defaults to random inputs of the shapes recorded in the plan.

    Returns:
        A ``torch.fx.GraphModule`` with the original submodule names and an extra multiply by a 0/1 channel
        mask after every op whose output carries a pruned channel.
    """
    model = _without_torch_prune(model)
    if plan.removed_blocks:
        from sparsekern.depth import channel_graph, zero_branches

        # the channel keep-sets refer to the model without its removed blocks: validate them there
        channel_graph(model, plan.removed_blocks, example_inputs_for(plan, example_inputs)).check_plan(plan)
        model = zero_branches(model, plan.removed_blocks)
    cg, inputs = _trace(model, plan, example_inputs)
    if plan.removed_blocks:
        # the zeroed branches still run, so their layers join the groups: the members checked above differ
        keep = cg.root_keep(plan.with_channels({n: dataclasses.replace(g, members=()) for n, g in plan.channels.items()}))
    else:
        keep = cg.root_keep(plan)
    gm = copy.deepcopy(cg.gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    count = 0
    for name, lay in list(cg.layouts.items()):
        if not isinstance(lay, Layout):
            continue
        kept = keep[cg.roots[lay.atoms]]
        if kept.all():
            continue
        node = nodes[name]
        shape = [1] * len(cg.shapes[name])
        shape[lay.cdim] = lay.size
        # a bool mask: x * mask keeps x's dtype (a float32 mask would promote fp16/bf16 activations)
        mask = torch.from_numpy(kept).reshape(shape)
        if node.op == "call_module":
            _mask_norm_statistics(gm, node, cg, keep)
        buf = f"_sk_mask_{count}"
        count += 1
        gm.register_buffer(buf, mask)
        with gm.graph.inserting_after(node):
            attr = gm.graph.get_attr(buf)
        with gm.graph.inserting_after(attr):
            mul = gm.graph.call_function(torch.mul, (node, attr))
        node.replace_all_uses_with(mul, delete_user_cb=lambda user: user is not mul)
    gm.graph.lint()
    gm.recompile()
    if plan.dynamic:
        from sparsekern.dynamic import masked_dynamic

        gm = masked_dynamic(gm, plan, inputs)
    if plan.lowrank:
        from sparsekern.lowrank import masked_lowrank

        gm = masked_lowrank(gm, plan, inputs)
    gm.train(model.training)
    keep_attributes(gm, sk_plan=plan)
    return gm


def _mask_norm_statistics(gm: torch.fx.GraphModule, node: torch.fx.Node, cg: ChannelGraph, keep: np.ndarray) -> None:
    """A layer whose statistics pool over channels (its channel rule's ``masked``: LayerNorm, RMSNorm,
    GroupNorm) is replaced by its reference form that pools over the kept channels only."""
    module = gm.get_submodule(node.target)
    rule = module_rule(module)
    if rule is None or rule.masked is None:
        return
    lay = cg.layouts[node.name]
    gm.set_submodule(node.target, rule.masked(module, torch.from_numpy(keep[cg.roots[lay.atoms]])))


# ----------------------------------------------------------------------------- compile
def compile(  # noqa: A001 (public API name, docs/design.md#public-api)
    model: nn.Module,
    plan: Plan,
    example_inputs: Any = None,
    *,
    round_to: int | str | None = None,
    passes: Sequence[str] = (),
) -> nn.Module:
    """Compile ``plan`` into an accelerated model.

    The parts of a plan compile in this order: removed residual blocks are replaced by their shortcut
    (:mod:`sparsekern.depth`); channel keep-sets slice the layers physically; rank keep-sets become low-rank
    layers (:mod:`sparsekern.lowrank`); per-sample gated layers become channel-skipping layers
    (:mod:`sparsekern.dynamic`), or, when the plan is calibrated (:func:`sparsekern.dynamic.calibrate`), static
    layers over the channels that are not never on guarded by the channel-skipping model
    (:mod:`sparsekern.hybrid`); then the inference ``passes`` run.

    Args:
        model: the unpruned model (not modified). A model pruned with ``torch.nn.utils.prune`` compiles as it
            computes: on a copy with its masks baked into the weights (``Plan.from_torch_prune``).
        plan: what to skip (see :class:`~sparsekern.plan.Plan`); channel keep-sets refer to the model after
            its removed blocks are gone.
        example_inputs: a tensor or tuple of tensors to trace with; defaults to random inputs of the shapes
            recorded in the plan.
        round_to: hardware-aware rounding: round every pruned group's kept count up to a multiple of this
            (e.g. 8 or 16), or with ``"auto"`` to the count this CPU's convolution kernels compute anyway
            (:func:`kernel_rounding`), adding back the most important pruned channels (plan scores, else the
            L1 norm of the group's producer weights). The rounded plan is stored on the result as ``sk_plan``;
            its ``meta["round_added"]`` says how many channels each group got back.
        passes: inference passes from :mod:`sparsekern.passes` applied after slicing (e.g.
            ``("fold_bn", "onednn")``), with these example inputs for the passes that specialise to input
            shapes; give the dense baseline the same passes (``sparsekern.passes.apply``) for fair comparisons.

    Returns:
        A ``torch.fx.GraphModule`` with the original submodule names, smaller weights, the model's train/eval
        mode (for a calibrated dynamic plan, a :class:`sparsekern.hybrid.GuardedModel` whose parts are such
        graphs), and attributes ``sk_plan`` (the plan compiled), ``sk_arch`` (the model's architecture
        reference, if any) and ``sk_compile`` (options, for :func:`sparsekern.save`).
    """
    model = _without_torch_prune(model)  # a model pruned with torch.nn.utils.prune compiles as it computes
    if plan.removed_blocks:
        from sparsekern.depth import remove_blocks

        model = remove_blocks(model, plan.removed_blocks)
    cg, inputs = _trace(model, plan, example_inputs)
    if round_to:
        plan = round_plan(cg, plan, round_to)
    keep = cg.root_keep(plan)
    gm = copy.deepcopy(cg.gm)
    sliced: set[str] = set()
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            if node.target not in sliced:  # a shared module: every call has the same kept channels
                _slice_module(gm.get_submodule(node.target), node, cg, keep)
                sliced.add(node.target)
        elif node.name in cg.shuffles:
            _gather_shuffle(gm, node, cg, keep)
        elif node.op in ("call_function", "call_method"):
            _rewrite_channel_args(gm, node, cg, keep)
        elif node.name in cg.sliced_attrs:
            _slice_attr(gm, cg.sliced_attrs[node.name], cg, keep)
    gm.graph.lint()
    gm.recompile()
    if plan.lowrank:
        from sparsekern.lowrank import compile_lowrank

        gm = compile_lowrank(gm, plan, inputs)
    if plan.dynamic:
        from sparsekern.dynamic import compile_dynamic
        from sparsekern.hybrid import compile_hybrid, is_calibrated

        gm = (compile_hybrid if is_calibrated(plan) else compile_dynamic)(gm, plan, inputs)
    gm.train(model.training)
    if passes:
        from sparsekern.passes import apply

        gm = apply(gm, passes, inputs, inplace=True)
    keep_attributes(gm, sk_plan=plan, sk_arch=getattr(model, "sk_arch", None),
                    sk_compile={"round_to": round_to, "passes": list(passes), "inputs": input_spec(inputs)})
    return gm


def _positions(cg: ChannelGraph, lay: Any, keep: np.ndarray, size: int) -> torch.Tensor | None:
    """Kept indices along a tracked layout, or None when nothing is removed (untracked or all kept)."""
    if not isinstance(lay, Layout):
        return None
    idx = cg.kept_positions(lay, keep)
    return None if len(idx) == size else torch.from_numpy(idx)


def _slice_module(m: nn.Module, node: torch.fx.Node, cg: ChannelGraph, keep: np.ndarray) -> None:
    """Slice ``m`` with its channel rule's ``slice`` (:mod:`sparsekern.slicing` for the built-in layers)."""
    rule = module_rule(m)
    if rule is None or rule.slice is None:
        return
    out_lay = cg.layouts.get(node.name)
    in_node = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
    in_lay = cg.layouts.get(in_node.name) if in_node is not None else None
    sizes = [lay.size if isinstance(lay, Layout) else 0 for lay in (in_lay, out_lay)]
    rule.slice(m, _positions(cg, in_lay, keep, sizes[0]), _positions(cg, out_lay, keep, sizes[1]))


def _gather_shuffle(gm: torch.fx.GraphModule, node: torch.fx.Node, cg: ChannelGraph, keep: np.ndarray) -> None:
    """Replace the channel shuffle ending at ``node`` (:class:`~sparsekern.graph.ChannelShuffle`) by one
    ``index_select`` of the kept input channels in the shuffled order (a buffer ``_sk_shuffle_<node>``); a
    shuffle whose channels are all kept stays as it is."""
    shuffle = cg.shuffles[node.name]
    kept_in = cg.kept_positions(shuffle.input, keep)
    if len(kept_in) == shuffle.input.size:
        return
    kept_out = cg.kept_positions(cg.layouts[node.name], keep)
    order = torch.from_numpy(np.searchsorted(kept_in, shuffle.source[kept_out]).astype(np.int64))
    nodes = {n.name: n for n in gm.graph.nodes}
    buf = f"_sk_shuffle_{node.name}"
    gm.register_buffer(buf, order)
    with gm.graph.inserting_before(node):
        index = gm.graph.get_attr(buf)
    # the last node becomes the gather (keeping its name, so the nodes after it find its layout)
    node.target = "index_select" if node.op == "call_method" else torch.index_select
    node.args, node.kwargs = (nodes[shuffle.nodes[0]].args[0], shuffle.dim, index), {}
    for name in reversed(shuffle.nodes[:-1]):
        gm.graph.erase_node(nodes[name])


def _slice_attr(gm: torch.fx.GraphModule, attr: AttrSlice, cg: ChannelGraph, keep: np.ndarray) -> None:
    """Slice a per-channel tensor read by ``get_attr`` (a layer scale) to the kept channels of its op."""
    index = _positions(cg, attr.layout, keep, attr.layout.size)
    owner, _, field = attr.target.rpartition(".")
    slice_param(gm.get_submodule(owner), field, index, attr.axis)


def _rewrite_channel_args(gm: torch.fx.GraphModule, node: torch.fx.Node, cg: ChannelGraph, keep: np.ndarray) -> None:
    """Rewrite graph arguments that spell out channel counts: split/chunk sizes, view/reshape/expand sizes and
    the bounds of a slice of the channel axis."""
    lay = cg.layouts.get(node.name)
    target = node.target
    if node.name in cg.channel_slices:  # bounds counted in kept channels (computed ones become constants)
        position, start, stop = cg.channel_slices[node.name]
        source, index = node.args
        index = list(index) if isinstance(index, tuple) else [index]
        kept = cg.kept_positions(cg.layouts[source.name], keep)
        index[position] = slice(int(np.searchsorted(kept, start)), int(np.searchsorted(kept, stop)))
        node.args = (source, tuple(index))
        return
    is_split = target in (torch.split, torch.chunk, "split", "chunk")
    if is_split and isinstance(lay, tuple) and lay and isinstance(lay[0], Layout):
        src_lay = cg.layouts.get(node.args[0].name)
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not isinstance(src_lay, Layout) or dim % len(cg.shapes[node.args[0].name]) != src_lay.cdim:
            return
        sizes = [int(len(cg.kept_positions(piece, keep))) for piece in lay]
        if sizes == [piece.size for piece in lay]:
            return
        node.target = torch.split if callable(target) else "split"
        node.args = (node.args[0], sizes, *node.args[2:])
        return
    if target in ("view", "reshape", torch.reshape, "expand") and isinstance(lay, Layout):
        new = int(len(cg.kept_positions(lay, keep)))
        if new == lay.size:
            return
        sizes = list(node.args[1:]) or [node.kwargs.get("shape", node.kwargs.get("size"))]
        one = sizes[0]
        if len(sizes) == 1 and (isinstance(one, (tuple, list)) or (
                isinstance(one, torch.fx.Node) and isinstance(cg.shapes.get(one.name), tuple))):
            sizes = _size_entries(gm, node, one, len(cg.shapes[node.name]))  # every size in one argument
        shape = list(sizes)
        if shape[lay.cdim] != -1:  # -1 (inferred) stays right; an int or a computed size becomes the kept count
            shape[lay.cdim] = new
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
        node.args = (node.args[0], tuple(shape))


def _size_entries(gm: torch.fx.GraphModule, node: torch.fx.Node, sizes: Any, ndim: int) -> list[Any]:
    """The ``ndim`` entries of a view/reshape size given as one argument: a tuple/list as is, a computed
    ``torch.Size`` (e.g. ``y.shape``) as one ``getitem`` node per entry."""
    if isinstance(sizes, (tuple, list)):
        return list(sizes)
    with gm.graph.inserting_before(node):
        return [gm.graph.call_function(operator.getitem, (sizes, i)) for i in range(ndim)]


# ----------------------------------------------------------------------------- rounding
def group_importance(cg: ChannelGraph, group: str) -> np.ndarray:
    """L1 norm of the weights that produce each channel of ``group`` (summed over producers), shape (size,)."""
    cls = cg.group_classes[group]
    index = {int(r): i for i, r in enumerate(cls.tolist())}
    score = np.zeros(len(cls), dtype=np.float64)
    for node in cg.gm.graph.nodes:
        lay = cg.layouts.get(node.name)
        if not isinstance(lay, Layout) or node.op != "call_module":
            continue
        rows = _output_rows(cg.modules[node.target])
        if rows is None or rows.shape[0] != lay.size:
            continue
        w = rows.detach().abs().reshape(lay.size, -1).sum(1).double().cpu().numpy()
        for pos, r in enumerate(cg.roots[lay.atoms].tolist()):
            if r in index:
                score[index[r]] += w[pos]
    return score


def _output_rows(m: nn.Module) -> torch.Tensor | None:
    """A conv or linear layer's weight with one row per output channel, else None (``transformers``' ``Conv1D``
    stores its weight as ``(in, out)``)."""
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return m.weight
    if type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers."):
        return m.weight.t()
    return None


def vector_lanes() -> int:
    """float32 lanes of this CPU's SIMD vectors, as torch's kernels use them (AVX-512: 16, AVX2: 8, else 4)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return 16 if capability.startswith("AVX512") else 8 if capability.startswith("AVX2") else 4


def kernel_rounding(kept: int, lanes: int | None = None) -> int:
    """The output-channel count the CPU convolutions compute for ``kept`` output channels: the smallest of a
    quarter, a half, three quarters, one and one and a half vectors of ``lanes`` (default :func:`vector_lanes`)
    that holds them (the channel groups of ``sparsekern.ops.fused_conv2d``'s channels-last kernel: two or four
    input channels per output over up to three vectors), else whole vectors (as oneDNN's blocked kernels).
    Rounding a group's kept count up to it costs its producers nothing; its consumers read the added channels
    (FLOPs that ``sparsekern.flops`` counts)."""
    lanes = lanes or vector_lanes()
    for width in (lanes // 4, lanes // 2, 3 * lanes // 4, lanes, 3 * lanes // 2):
        if kept <= width:
            return width
    return math.ceil(kept / lanes) * lanes


def round_plan(cg: ChannelGraph, plan: Plan, multiple: int | str) -> Plan:
    """Round each pruned group's kept count up (capped at the group size): to a multiple of ``multiple``, or,
    with ``"auto"``, to :func:`kernel_rounding` of it.

    Channels are added back in order of importance: the plan's ``scores`` when it has them, else
    :func:`group_importance`. Groups that the plan leaves whole are untouched. Rounding never breaks a
    constraint: where a grouped conv or GroupNorm needs equal kept counts per slice, the slices below the
    largest count get their most important channels back too, and rounding repeats until both hold (kept
    counts only grow, so it ends, at worst with the whole group kept).
    """
    if multiple == "auto":
        lanes = vector_lanes()
        rounded_count = lambda n: kernel_rounding(n, lanes)  # noqa: E731
    elif isinstance(multiple, int) and not isinstance(multiple, bool) and multiple >= 1:
        rounded_count = lambda n: math.ceil(n / multiple) * multiple  # noqa: E731
    else:
        raise ValueError(f"round_to must be a positive channel multiple or 'auto', got {multiple!r}")
    cg.check_plan(plan)
    keep = {name: set(g.keep) for name, g in plan.channels.items()}
    scores: dict[str, np.ndarray] = {}

    def score(name: str) -> np.ndarray:
        if name not in scores:
            g = plan.channels[name]
            scores[name] = np.asarray(g.scores) if g.scores is not None else group_importance(cg, name)
        return scores[name]

    where = {}  # atom root -> (group, channel), for the groups the plan prunes (other roots are all kept)
    for name in keep:
        for i, r in enumerate(cg.group_classes[name].tolist()):
            where[r] = (name, i)

    def kept(r: int) -> bool:
        return r not in where or where[r][1] in keep[where[r][0]]

    changed = True
    while changed:
        changed = False
        for name, k in keep.items():
            size = plan.channels[name].size
            target = min(size, rounded_count(len(k)))
            if target > len(k):
                s = score(name)
                k.update(sorted((c for c in range(size) if c not in k), key=lambda c: (-s[c], c))[: target - len(k)])
                changed = True
        for c in cg.constraints:
            slices = cg.roots[c.layout.atoms].reshape(c.groups, -1).tolist()
            most = max(sum(map(kept, sl)) for sl in slices)
            for sl in slices:
                if sum(map(kept, sl)) < most:
                    # the slice's most important pruned channel; one at a time, as a channel may fill
                    # several positions of a slice
                    name, ch = max((where[r] for r in sl if not kept(r)), key=lambda gc: (score(gc[0])[gc[1]], -gc[1]))
                    keep[name].add(ch)
                    changed = True
    channels = {
        name: g if len(keep[name]) == g.n_keep else GroupKeep(g.size, tuple(sorted(keep[name])), g.members, g.scores)
        for name, g in plan.channels.items()
    }
    rounded = plan.with_channels(channels)
    rounded.meta["round_to"] = multiple
    rounded.meta["round_added"] = {name: g.n_keep - plan.channels[name].n_keep for name, g in channels.items()
                                   if g.n_keep != plan.channels[name].n_keep}
    return rounded
