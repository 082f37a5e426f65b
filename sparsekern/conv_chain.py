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
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx
import torch.nn as nn

from sparsekern.fusion import as_graph_module, finish_rewrite
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d

__all__ = ["ConvChain", "conv_chain"]


class ConvChain(nn.Module):
    """Direct convolutions run in order by one call: ``forward(*inputs)`` returns the list of ``outputs``.

    Values are numbered as the operator numbers them: the ``n_inputs`` inputs, then each layer's output. Layer
    ``i`` computes ``layers[i](value[sources[i][0]], value[sources[i][1]])`` (the second: its residual, or -1 for
    none) and may read only the inputs and earlier layers' outputs. Float32 CPU 4-D inputs with the channels the
    layers expect run as one call (any batch and map size; channels-last copies of other layouts); any other
    input runs through the layers one by one, which take any input their convolution takes.
    """

    def __init__(self, layers: Sequence[PreparedFusedConv2d], sources: Sequence[tuple[int, int]], n_inputs: int,
                 outputs: Sequence[int]) -> None:
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
        self.layers = nn.ModuleList(layers)
        self.register_buffer("_no_bias", torch.empty(0), persistent=False)  # the operator's "no bias"
        self.sources = [tuple(s) for s in sources]
        self.n_inputs, self.outputs = n_inputs, list(outputs)
        self.spec = [v for m, (src, res) in zip(layers, self.sources) for v in (
            src, res, *m._kernel_size, *m.stride, *m.padding, *m.dilation, m.out_shape[1], int(m.relu))]
        # channels each value has, for the check that sends other inputs through the layers one by one
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
                self.spec, self.outputs)
        values = list(inputs)
        for m, (src, res) in zip(self.layers, self.sources):
            values.append(m(values[src], None if res < 0 else values[res]))
        return [values[o] for o in self.outputs]

    def extra_repr(self) -> str:
        return f"{len(self.layers)} layers, {self.n_inputs} inputs, outputs={self.outputs}"


def _chainable(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    m = modules.get(node.target) if node.op == "call_module" else None
    return (isinstance(m, PreparedFusedConv2d) and m.packed is not None and not node.kwargs
            and 1 <= len(node.args) <= 2)


def conv_chain(model: nn.Module, *, inplace: bool = False) -> torch.fx.GraphModule:
    """Every run of two or more consecutive direct convolutions of ``model``'s graph as one :class:`ConvChain`
    (see the module docstring); run after ``onednn``. ``model`` is not modified unless ``inplace``."""
    gm = as_graph_module(model, inplace)
    modules = dict(gm.named_modules())
    runs: list[list[torch.fx.Node]] = [[]]
    for node in gm.graph.nodes:
        if _chainable(node, modules):
            runs[-1].append(node)
        elif runs[-1]:
            runs.append([])
    k = 0
    for run in (r for r in runs if len(r) >= 2):
        while hasattr(gm, f"_sk_chain{k}"):  # a graph chained before keeps its chains' names
            k += 1
        _replace(gm, run, f"_sk_chain{k}", modules)
    return finish_rewrite(gm, {})


def _replace(gm: torch.fx.GraphModule, run: list[torch.fx.Node], name: str, modules: dict[str, nn.Module]) -> None:
    members = {node: i for i, node in enumerate(run)}
    inputs: list[torch.fx.Node] = []
    for node in run:
        for a in node.args:
            if a is not None and a not in members and a not in inputs:
                inputs.append(a)

    def value(a: torch.fx.Node | None) -> int:
        return -1 if a is None else inputs.index(a) if a not in members else len(inputs) + members[a]

    sources = [(value(node.args[0]), value(node.args[1] if len(node.args) > 1 else None)) for node in run]
    escaping = [node for node in run if any(u not in members for u in node.users)]
    chain = ConvChain([modules[node.target] for node in run], sources, len(inputs),
                      [len(inputs) + members[node] for node in escaping])
    gm.add_submodule(name, chain)
    with gm.graph.inserting_before(run[0]):
        call = gm.graph.call_module(name, tuple(inputs))
        for j, node in enumerate(escaping):
            item = gm.graph.call_function(operator.getitem, (call, j))
            item.meta = dict(node.meta)
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in members)
    for node in reversed(run):
        gm.graph.erase_node(node)
