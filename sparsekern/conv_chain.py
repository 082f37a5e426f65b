"""The ``conv_chain`` inference pass: consecutive direct convolutions run as one operator call.

After the ``onednn`` pass, a CIFAR ResNet at batch 1 is a line of direct convolutions
(:class:`~sparsekern.ops.fused_conv2d.PreparedFusedConv2d`) that each compute for 4-20 us, and each call costs
2-3 us besides: the call, the output's allocation, and waking torch's threads and joining them. Pruning divides
the computing, not that cost, so it is what keeps a pruned model at batch 1 from its FLOP ratio.

This pass replaces each run of consecutive direct convolutions in the graph (no other node between them) by a
:class:`ConvChain`, whose forward is one call of ``sparsekern::_conv2d_nhwc_chain``: the same kernel and the
same work split per layer, the threads kept in one parallel region and synchronised between layers, and the
layers' outputs in one buffer whose blocks are reused once the values in them are no longer read. Results are
bitwise those of the separate calls. At larger batches the saving is small beside the layers' work, and the
chain costs nothing there.

A calibrated SANP model's static part (:mod:`sparsekern.hybrid`) puts a gate next to each gated convolution and
multiplies the convolution's output by the gate's per-sample scale in place. Both join the chain when the gate is
a pooled MLP (a module with ``sk_chain_gate()``, :class:`sparsekern.hybrid.GateGuard`): the gate as a step of
its own (the pooling shared by the threads), the multiply as the convolution's last step, and the gate's flag
(a sample left the calibration classes) as the chain's last output. Without that, every gate would cut the
chain, and a hybrid ResNet would make three calls per block.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx
import torch.nn as nn

from sparsekern.fusion import as_graph_module, finish_rewrite
from sparsekern.ops.fused_conv2d import GATE_TENSORS, PreparedFusedConv2d

__all__ = ["ConvChain", "conv_chain"]


class ConvChain(nn.Module):
    """Direct convolutions, and the gates that scale them, run in order by one call: ``forward(*inputs)`` returns
    the list of ``outputs``, then (with gates) whether some sample left a gate's calibration classes (0-d bool).

    Values are numbered as the operator numbers them: the ``n_inputs`` inputs, then each layer's output. Layer
    ``i`` computes ``layers[i](value[sources[i][0]], value[sources[i][1]])`` (the second: its residual, or -1 for
    none) and may read only the inputs and earlier layers' outputs. Gate ``k`` (a module with ``sk_chain_gate()``,
    as :class:`sparsekern.hybrid.GateGuard`) reads ``value[gate_sources[k][0]]`` while layer
    ``gate_sources[k][1]`` runs (``len(layers)``: after the last); a layer with ``scales[i] = k`` (that layer or a
    later one) multiplies its output by gate ``k``'s per-sample scale, last. Float32 CPU 4-D inputs with the
    channels the layers expect run as one call (any batch and map size; channels-last copies of other layouts);
    any other input runs through the modules one by one, which take any input their convolution takes.
    """

    def __init__(self, layers: Sequence[PreparedFusedConv2d], sources: Sequence[tuple[int, int]], n_inputs: int,
                 outputs: Sequence[int], gates: Sequence[nn.Module] = (),
                 gate_sources: Sequence[tuple[int, int]] = (), scales: Sequence[int] | None = None) -> None:
        super().__init__()
        if len(layers) != len(sources) or not layers or n_inputs < 1:
            raise ValueError(f"ConvChain: {len(layers)} layers, {len(sources)} sources and {n_inputs} inputs; one "
                             "source pair per layer, at least one layer and one input")
        for i, (m, (src, res)) in enumerate(zip(layers, sources)):
            if not (isinstance(m, PreparedFusedConv2d) and m.packed is not None):
                raise ValueError(f"ConvChain: layer {i} ({type(m).__name__}) is not a direct convolution prepared "
                                 "for channels-last inputs (PreparedFusedConv2d with packed weights)")
            if not (0 <= src < n_inputs + i and -1 <= res < n_inputs + i):
                raise ValueError(f"ConvChain: layer {i} reads values {src} and {res}; it may read only the inputs and "
                                 f"earlier layers' outputs (0 to {n_inputs + i - 1})")
        if any(not n_inputs <= o < n_inputs + len(layers) for o in outputs):
            raise ValueError(f"ConvChain: outputs {list(outputs)} must name layers' outputs ({n_inputs} to "
                             f"{n_inputs + len(layers) - 1})")
        scales = list(scales) if scales is not None else [-1] * len(layers)
        if len(gates) != len(gate_sources) or len(scales) != len(layers):
            raise ValueError(f"ConvChain: {len(gates)} gates with {len(gate_sources)} sources and {len(scales)} "
                             f"scales for {len(layers)} layers; one source pair per gate and one scale per layer")
        args = [_chain_gate(g) for g in gates]
        for k, (g, a, (src, at)) in enumerate(zip(gates, args, gate_sources)):
            if a is None:
                raise ValueError(f"ConvChain: gate {k} ({type(g).__name__}) has no sk_chain_gate() tensors")
            if not (0 <= at <= len(layers) and 0 <= src < n_inputs + at):
                raise ValueError(f"ConvChain: gate {k} runs with layer {at} and reads value {src}; it may read only "
                                 f"the inputs and the outputs of the layers before it (0 to {n_inputs + at - 1})")
        for i, k in enumerate(scales):
            if not (k == -1 or (0 <= k < len(gates) and gate_sources[k][1] <= i)):
                raise ValueError(f"ConvChain: layer {i} is scaled by gate {k}, which is not one of the {len(gates)} "
                                 "gates or runs after it")
            if k >= 0 and args[k][6].numel() != layers[i].out_shape[1]:
                raise ValueError(f"ConvChain: layer {i} writes {layers[i].out_shape[1]} channels, but gate {k} scales "
                                 f"{args[k][6].numel()}")
        self.layers = nn.ModuleList(layers)
        self.gates = nn.ModuleList(gates)
        self.register_buffer("_no_bias", torch.empty(0), persistent=False)  # the operator's "no bias"
        self.sources = [tuple(s) for s in sources]
        self.gate_sources = [tuple(s) for s in gate_sources]
        self.scales = scales
        self.n_inputs, self.outputs = n_inputs, list(outputs)
        self.spec = [v for m, (src, res), k in zip(layers, self.sources, scales) for v in (
            src, res, *m._kernel_size, *m.stride, *m.padding, *m.dilation, m.out_shape[1], int(m.relu), k)]
        self.gate_spec = [v for a, (src, at) in zip(args, self.gate_sources) for v in (src, *a[GATE_TENSORS:], at)]
        # channels each value has, for the check that sends other inputs through the modules one by one
        self._in_channels = [-1] * n_inputs
        for m, (src, _) in zip(layers, self.sources):
            if src < n_inputs:
                self._in_channels[src] = m.weight.shape[1]

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        if len(inputs) == self.n_inputs and all(
                t.dtype == torch.float32 and t.is_cpu and t.dim() == 4 and c in (-1, t.shape[1])
                for t, c in zip(inputs, self._in_channels)):
            xs = [t.contiguous(memory_format=torch.channels_last) for t in inputs]
            return torch.ops.sparsekern._conv2d_nhwc_chain(
                xs, [m.packed for m in self.layers], [self._no_bias if m.bias is None else m.bias for m in self.layers],
                self.spec, self.outputs, [t for g in self.gates for t in _chain_gate(g)[:GATE_TENSORS]],
                self.gate_spec)
        return self.forward_modules(*inputs)

    def forward_modules(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """What ``forward`` returns, computed by the layers and gates one by one (any input they take)."""
        values, scale, flags = list(inputs), [None] * len(self.gates), []
        for i in range(len(self.layers) + 1):
            for k, (src, at) in enumerate(self.gate_sources):
                if at == i:
                    _, scale[k], outside = self.gates[k](values[src])
                    flags.append(outside)
            if i < len(self.layers):
                m, (src, res), k = self.layers[i], self.sources[i], self.scales[i]
                y = m(values[src], None if res < 0 else values[res])
                values.append(y if k < 0 else y.mul_(scale[k]))
        outputs = [values[o] for o in self.outputs]
        return outputs + [torch.stack(flags).any()] if flags else outputs

    def extra_repr(self) -> str:
        gates = f", {len(self.gates)} gates" if len(self.gates) else ""
        return f"{len(self.layers)} layers{gates}, {self.n_inputs} inputs, outputs={self.outputs}"


def _chain_gate(module: nn.Module) -> tuple | None:
    """``module.sk_chain_gate()``: the GATE_TENSORS tensors and the granularity and output channels the operator
    takes for a pooled-MLP gate (None where the module cannot run as a gate step)."""
    gate = getattr(module, "sk_chain_gate", None)
    return gate() if callable(gate) else None


def _chainable(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = modules.get(node.target) if node.op == "call_module" else None
    return (isinstance(m, PreparedFusedConv2d) and m.packed is not None and not node.kwargs
            and 1 <= len(node.args) <= 2)


def _getitems(node: torch.fx.Node) -> dict[int, torch.fx.Node] | None:
    """``{i: node[i]}`` when every use of ``node`` is an ``operator.getitem`` with a constant index, else None."""
    items = {}
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int)):
            return None
        items[user.args[1]] = user
    return items


def _roles(gm: torch.fx.GraphModule, modules: dict[str, nn.Module]) -> dict[torch.fx.Node, str]:
    """The nodes a chain may hold, by role: ``conv``; ``gate`` (a module with ``sk_chain_gate()`` whose uses are
    ``[0]`` (its mask, unused), ``[1]`` (its scale, read only by ``scale`` nodes) and ``[2]`` (its flag));
    ``item`` (such a ``gate[i]``); ``scale`` (``conv.mul_(gate[1])``, the conv used only there)."""
    roles = {n: "conv" for n in gm.graph.nodes if _chainable(n, modules)}

    def scaling(node: torch.fx.Node) -> bool:
        conv = node.args[0] if node.op == "call_method" and node.target == "mul_" and len(node.args) == 2 else None
        return isinstance(conv, torch.fx.Node) and roles.get(conv) == "conv" and len(conv.users) == 1 \
            and not node.kwargs

    for node in gm.graph.nodes:
        if not (node.op == "call_module" and len(node.args) == 1 and not node.kwargs
                and _chain_gate(modules[node.target]) is not None):
            continue
        items = _getitems(node)
        if items is None or set(items) - {0, 1, 2} or (0 in items and items[0].users):
            continue
        if 1 in items and not all(scaling(u) and u.args[1] is items[1] for u in items[1].users):
            continue
        roles[node] = "gate"
        roles.update((item, "item") for item in items.values())
        if 1 in items:
            roles.update((u, "scale") for u in items[1].users)
    return roles


def _valid(run: list[torch.fx.Node], roles: dict[torch.fx.Node, str]) -> list[bool]:
    """Per node of ``run``: whether every node it needs as a chain member is in the run (a gate's items and their
    scale nodes, an item's gate, a scale's conv and item)."""
    members = set(run)
    ok = []
    for node in run:
        role = roles[node]
        if role == "gate":
            ok.append(all(item in members and (item.args[1] != 1 or all(u in members for u in item.users))
                          for item in node.users))
        elif role == "item":
            ok.append(node.args[0] in members)
        elif role == "scale":
            ok.append(node.args[0] in members and node.args[1] in members)
        else:
            ok.append(True)
    return ok


def _runs(gm: torch.fx.GraphModule, roles: dict[torch.fx.Node, str]) -> list[list[torch.fx.Node]]:
    """Maximal runs of consecutive chain members, cut where a member lacks a node it needs (:func:`_valid`)
    until none does."""
    runs: list[list[torch.fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if node in roles:
            runs[-1].append(node)
        elif runs[-1]:
            runs.append([])
    stable = False
    while not stable:
        stable, cut = True, []
        for run in runs:
            ok = _valid(run, roles)
            stable &= all(ok)
            part: list[torch.fx.Node] = []
            for node, good in zip(run, ok):
                if good:
                    part.append(node)
                elif part:
                    cut.append(part)
                    part = []
            if part:
                cut.append(part)
        runs = cut
    return runs


def conv_chain(model: nn.Module, *, inplace: bool = False) -> torch.fx.GraphModule:
    """Every run of consecutive direct convolutions of ``model``'s graph with two or more convolutions, or one
    and a gate, as one :class:`ConvChain` (see the module docstring); run after ``onednn``. A gate
    (:class:`sparsekern.hybrid.GateGuard`) and the in-place multiply of a convolution's output by its scale join
    the chain as a gate step and the convolution's scale. ``model`` is not modified unless ``inplace``."""
    gm = as_graph_module(model, inplace)
    modules = dict(gm.named_modules())
    roles = _roles(gm, modules)
    k = 0
    for run in _runs(gm, roles):
        convs = sum(roles[n] == "conv" for n in run)
        if convs >= 2 or (convs and any(roles[n] == "gate" for n in run)):
            while hasattr(gm, f"_sk_chain{k}"):  # a graph chained before keeps its chains' names
                k += 1
            _replace(gm, run, roles, f"_sk_chain{k}", modules)
    return finish_rewrite(gm, {})


def _replace(gm: torch.fx.GraphModule, run: list[torch.fx.Node], roles: dict[torch.fx.Node, str], name: str,
             modules: dict[str, nn.Module]) -> None:
    convs = [n for n in run if roles[n] == "conv"]
    gates = [n for n in run if roles[n] == "gate"]
    layer_of = {n: i for i, n in enumerate(convs)}
    layer_of.update((n, layer_of[n.args[0]]) for n in run if roles[n] == "scale")  # a scaled conv's value
    inputs: list[torch.fx.Node] = []
    for node in convs + gates:
        for a in node.args:
            if a is not None and a not in layer_of and a not in inputs:
                inputs.append(a)

    def value(a: torch.fx.Node | None) -> int:
        return -1 if a is None else inputs.index(a) if a not in layer_of else len(inputs) + layer_of[a]

    sources = [(value(n.args[0]), value(n.args[1] if len(n.args) > 1 else None)) for n in convs]
    order = {n: i for i, n in enumerate(run)}
    position = {g: sum(1 for c in convs if order[c] < order[g]) for g in gates}  # the layer each gate runs with
    scales = [-1] * len(convs)
    for n in run:
        if roles[n] == "scale":
            scales[layer_of[n]] = gates.index(n.args[1].args[0])
    # a layer's value leaves the chain through its last node (the scale where there is one)
    last = {layer_of[n]: n for n in run if n in layer_of}
    members = set(run)
    escaping = [i for i, n in sorted(last.items()) if any(u not in members for u in n.users)]
    chain = ConvChain([modules[n.target] for n in convs], sources, len(inputs),
                      [len(inputs) + i for i in escaping], [modules[g.target] for g in gates],
                      [(value(g.args[0]), position[g]) for g in gates], scales)
    gm.add_submodule(name, chain)
    with gm.graph.inserting_before(run[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        for j, i in enumerate(escaping):
            item = gm.graph.call_function(operator.getitem, (call, j))
            item.meta = dict(last[i].meta)
            last[i].replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
        if gates:
            outside = gm.graph.call_function(operator.getitem, (call, len(escaping)))
            for n in run:
                if roles[n] == "item" and n.args[1] == 2:
                    n.replace_all_uses_with(outside, delete_user_cb=lambda user: user not in members)
    for node in reversed(run):
        gm.graph.erase_node(node)
    if gates:
        _merge_flags(gm, outside)


def _merge_flags(gm: torch.fx.GraphModule, flag: torch.fx.Node) -> None:
    """``torch.stack([..., flag, ..., flag, ...]).any()`` (the hybrid compile's guard, once the chain's one flag
    replaced its gates' flags) with ``flag`` listed once, and as ``flag`` itself where it is the only one."""
    for stack in list(flag.users):
        if not (stack.op == "call_function" and stack.target is torch.stack and len(stack.args) == 1
                and not stack.kwargs and isinstance(stack.args[0], (list, tuple)) and stack.users
                and all(u.op == "call_method" and u.target == "any" and len(u.args) == 1 and not u.kwargs
                        for u in stack.users)):
            continue
        flags = list(dict.fromkeys(stack.args[0]))
        if flags == [flag]:
            for u in list(stack.users):
                u.replace_all_uses_with(flag)
                gm.graph.erase_node(u)
            gm.graph.erase_node(stack)
        else:
            stack.args = (flags,)
