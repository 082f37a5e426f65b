"""Hybrid static/dynamic compilation of a calibrated gated model (docs/design.md#dynamic-plans).

SANP (Chen et al., ICONIP 2019) learns masks that are close to static per layer: most output channels are on
for every image or off for every image, and a minority switches. :func:`sparsekern.dynamic.calibrate` records
the classes of each gated layer's outputs on calibration data: **never on**, **always on**, **switching**.
:func:`compile_hybrid` turns a model with such a plan into a :class:`GuardedModel` of two parts:

* ``fast``: a plain ``torch.fx.GraphModule`` of static convolutions. Each gated layer becomes an ``nn.Conv2d``
  (BN folded) over its *live* channels: the output channels that are not never on, read from the live output
  channels of the layer that produced its input. Switching outputs are computed for the whole batch, then
  multiplied in place by the per-sample mask. A layer's output is **compact** (only its live channels) when
  every use of it reaches only the layers that read its mask (its consumers), possibly through channel-wise
  ops (pooling, ReLU); otherwise it keeps every channel, and its never-on channels get zero weights and bias,
  so they come out exactly zero.
  Next to each conv, a :class:`GateGuard` evaluates the gate on the same (compact) input and says whether
  the batch leaves the classes: a never-on channel on, or an always-on channel off, for any sample. ``fast``
  returns ``(output, outside)``. Being static, it goes through every inference pass of
  :mod:`sparsekern.passes` (``sk.optimize(..., script=True)`` included): NHWC convolutions by oneDNN or the
  direct kernel, ReLU fused, no Python call per layer.
* ``exact``: the per-sample compiled model (:func:`sparsekern.dynamic.compile_dynamic`), run for a batch
  that ``fast`` flags as outside the classes (the guard), and under dispatch modes (FLOP counting sees the
  per-sample work; export cannot express the guard).

So the result equals :func:`sparsekern.dynamic.masked_dynamic` on any input. The cost of staying exact is one
gate evaluation per layer (the gate runs anyway) and one host read per batch; a batch outside the classes is
computed twice. Switching channels cost what a dense convolution of them costs: the fast part does not skip
them per sample. So when inference passes are applied with example inputs (``sk.optimize``), the model times
its guarded static part against the per-sample model once per input shape (:class:`~sparsekern.tuning.Tuner`,
as for kernels) and runs the faster for every batch.

The state dict holds both parts (``fast.*`` derived from ``exact.*`` at compile time); the class indices
are non-persistent buffers (they come from the plan).
"""
from __future__ import annotations

import copy
import hashlib
import json
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from sparsekern.dynamic import MaskedConv2d, check_dynamic, compile_dynamic, in_mask_arg
from sparsekern.ops.gate_guard import gate_guard, guard_outputs
from sparsekern.plan import DynamicLayer, Plan, PlanError
from sparsekern.tuning import GuardedModelCall, Tuner, current_tuner

__all__ = ["GateGuard", "GuardedModel", "compile_hybrid", "is_calibrated"]

#: ops through which a gated layer's output may reach its consumers and stay compact (they act per channel)
_CHANNELWISE_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.ReLU, nn.Identity, nn.Dropout)
_CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d)
_CHANNELWISE_METHODS = ("relu",)


def is_calibrated(plan: Plan) -> bool:
    """Whether every gated layer of ``plan``'s dynamic part has calibration classes (and there is one)."""
    gated = [layer for layer in plan.dynamic_layers().values() if layer.gated]
    return bool(gated) and all(layer.never_on is not None for layer in gated)


# ----------------------------------------------------------------------------- the model
class GuardedModel(nn.Module):
    """``fast`` where the batch stays inside the calibration classes, ``exact`` otherwise (module docstring).

    Args:
        fast: module returning ``(output, outside)``, ``outside`` a 0-d bool tensor.
        exact: module returning ``output``, exact on any input.
        plan_digest: identifies the model in a :class:`~sparsekern.tuning.Tuner`'s table.

    Attributes:
        path: ``"static"`` (``fast``, guarded) or ``"per-sample"`` (``exact`` for every batch): which one runs,
            chosen by measurement when inference passes are applied with example inputs (:meth:`choose_path`).
        fallbacks: number of forwards that ``fast`` flagged and ``exact`` computed (a plain counter).
    """

    def __init__(self, fast: nn.Module, exact: nn.Module, plan_digest: str = "") -> None:
        super().__init__()
        self.fast = fast
        self.exact = exact
        self.plan_digest = plan_digest
        self.path = "static"
        self.fallbacks = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.path == "per-sample" or is_in_torch_dispatch_mode():
            return self.exact(*args, **kwargs)
        return self._guarded(*args, **kwargs)

    def _guarded(self, *args: Any, **kwargs: Any) -> Any:
        out, outside = self.fast(*args, **kwargs)
        if bool(outside):
            self.fallbacks += 1
            return self.exact(*args, **kwargs)
        return out

    def choose_path(self, example_inputs: Any, tuner: Tuner | None = None) -> str:
        """Set :attr:`path` to whichever of the guarded static part and the per-sample model ``tuner`` (default
        :func:`~sparsekern.tuning.current_tuner`) finds faster on ``example_inputs`` (timed once per model, input
        shapes and thread count, or read from the tuner's table); returns it."""
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        call = GuardedModelCall(self.plan_digest, tuple(tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)),
                                torch.get_num_threads())
        fallbacks = self.fallbacks
        with torch.no_grad():
            self.path = (tuner or current_tuner()).choose(
                call, {"static": lambda: self._guarded(*inputs), "per-sample": lambda: self.exact(*inputs)})
        self.fallbacks = fallbacks
        return self.path

    def sk_apply_passes(self, run: Callable[[nn.Module, Sequence[str]], nn.Module], passes: Sequence[str],
                        example_inputs: Any = None) -> "GuardedModel":
        """Inference passes (:func:`sparsekern.passes.apply`): all of them on ``fast``; on ``exact`` those
        that keep Python control flow (not ``freeze`` or ``script``, which would trace one path). With example
        inputs, the faster path is then chosen (:meth:`choose_path`)."""
        self.fast = run(self.fast, tuple(passes))
        self.exact = run(self.exact, tuple(p for p in passes if p not in ("freeze", "script")))
        if example_inputs is not None:
            self.choose_path(example_inputs)
        return self

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


class GateGuard(nn.Module):
    """A gated layer's gate in the fast part: ``x`` (B, |live in|, H, W) -> ``(mask, scale, outside)``.

    ``mask`` (B, C_out) bool is the layer's out mask (``gate > 0`` per group, expanded); ``scale``
    (B, |computed|, 1, 1) in x's dtype is the mask of the channels the conv computes (the mask itself when no
    computed channel needs one); ``outside`` (0-d bool) is True when a never-on channel is on or an
    always-on channel is off for some sample. The classes are per group of ``granularity`` channels (a gate
    decides per group, so calibration never splits one). A gate that says it is a pooled MLP
    (``sk_pooled_mlp() -> (w1, b1, w2, b2)``, SANP's SPM) runs as one call of the operator
    ``sparsekern::_gate_guard`` (:mod:`sparsekern.ops.gate_guard`); any other gate as a module, then the same
    outputs from its logits.

    Args:
        gate: the gate, reading the compact input (:func:`_input_sliced_gate`).
        granularity, out_channels: as in the gated layer.
        never, always: (C_out,) bool, the calibration classes.
        computed: indices of the output channels the conv computes (the compact output's channels).
        scaled: whether the conv's output needs the mask (some computed channel is not always on).
    """

    def __init__(self, gate: nn.Module, granularity: int, out_channels: int, never: torch.Tensor,
                 always: torch.Tensor, computed: torch.Tensor, scaled: bool) -> None:
        super().__init__()
        self.granularity = granularity
        self.out_channels = out_channels
        self.scaled = scaled
        first = torch.arange(0, out_channels, granularity)  # a channel of each group
        self.register_buffer("group_always", always[first], persistent=False)
        self.register_buffer("group_fixed", (never | always)[first], persistent=False)
        self.register_buffer("computed", computed if scaled else computed[:0], persistent=False)
        mlp = getattr(gate, "sk_pooled_mlp", None)
        self.gate = None if callable(mlp) else gate
        for name, value in zip(("w1", "b1", "w2", "b2"), mlp() if callable(mlp) else (None,) * 4):
            self.register_buffer(name, None if value is None else value.detach().clone())

    def sk_chain_gate(self) -> tuple | None:
        """The pooled-MLP gate as a step of a convolution chain (:class:`sparsekern.conv_chain.ConvChain`): ``(w1,
        b1, w2, b2, group_always, group_fixed, computed, granularity, out_channels)``, or None for a gate run as a
        module or of another dtype than float32."""
        if self.gate is not None or self.w1.dtype != torch.float32:
            return None
        return (self.w1, self.b1, self.w2, self.b2, self.group_always, self.group_fixed, self.computed,
                self.granularity, self.out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.gate is None:
            m, scale, outside = gate_guard(x, self.w1, self.b1, self.w2, self.b2, self.group_always, self.group_fixed,
                                           self.computed, self.granularity, self.out_channels)
        else:
            m, scale, outside = guard_outputs(self.gate(x), self.group_always, self.group_fixed, self.computed,
                                              self.granularity, self.out_channels)
        return m, scale if self.scaled else m, outside


class _ExpandedInput(nn.Module):
    """A gate that reads every input channel, fed a compact input: scatters it to full width first."""

    def __init__(self, gate: nn.Module, index: torch.Tensor, channels: int) -> None:
        super().__init__()
        self.gate = gate
        self.channels = channels
        self.register_buffer("index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        full = x.new_zeros(x.shape[0], self.channels, *x.shape[2:])
        return self.gate(full.index_copy(1, self.index, x))


def _input_sliced_gate(gate: nn.Module, live_in: torch.Tensor | None, channels: int) -> nn.Module:
    """A copy of ``gate`` that reads only the input channels ``live_in`` (None: all) and gives the logits the
    full gate gives when the other channels are zero: the gate's own ``sk_slice_inputs(index)`` where it has
    one (SANP's SPM), else the compact input scattered back to ``channels``."""
    gate = copy.deepcopy(gate)
    if live_in is None:
        return gate
    slicer = getattr(gate, "sk_slice_inputs", None)
    return slicer(live_in) if callable(slicer) else _ExpandedInput(gate, live_in, channels)


# ----------------------------------------------------------------------------- compile
def compile_hybrid(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any = None) -> GuardedModel:
    """The :class:`GuardedModel` of a traced model whose gated layers are :class:`MaskedConv2d` and whose
    plan is calibrated (:func:`is_calibrated`).

    Args:
        gm: traced model (modified: it becomes the fast part).
        plan: the calibrated plan.
        example_inputs: unused; accepted for the compiler's uniform call.

    Raises:
        PlanError: the plan does not fit the model (as :func:`sparsekern.dynamic.compile_dynamic`), is not
            calibrated, or a gated layer's output is used other than through ``[0]`` and ``[1]``.
    """
    if not is_calibrated(plan):
        raise PlanError("compile_hybrid: the plan's gated layers have no calibration classes; run "
                        "sparsekern.dynamic.calibrate(plan, model, data) first")
    exact = compile_dynamic(copy.deepcopy(gm), plan)
    digest = hashlib.sha256(json.dumps(plan.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
    return GuardedModel(_fast_graph(gm, plan), exact, digest)


def _fast_graph(gm: torch.fx.GraphModule, plan: Plan) -> torch.fx.GraphModule:
    """``gm`` with every gated layer replaced by its static convolution and gate guard (module docstring)."""
    nodes = check_dynamic(gm, plan)
    layers = plan.dynamic_layers()
    order = [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in nodes]
    modules = dict(gm.named_modules())
    reached, compact = set(), {}
    for name in order:
        readers, exclusive = _readers_reached(nodes[name], name, nodes, layers, modules)
        reached |= readers
        compact[name] = layers[name].gated and exclusive
    live: dict[str, torch.Tensor | None] = {}  # output channels computed, per layer (None: all)
    flags: list[torch.fx.Node] = []
    for name in order:
        layer, spec, node = gm.get_submodule(name), layers[name], nodes[name]
        live_in = live.get(spec.in_from) if spec.in_from is not None else None
        never = _channel_mask(spec.never_on, layer.out_channels)
        always = _channel_mask(spec.always_on, layer.out_channels) if spec.gated else ~never
        live[name] = _computed_channels(never) if compact[name] else None
        with gm.graph.inserting_before(node):
            if spec.in_from is not None and node not in reached:  # its input is not the producer's masked output
                node.args = (gm.graph.call_function(_masked_input, (node.args[0], in_mask_arg(node))),
                             *node.args[1:])
            y, mask = _static_layer(gm, name, layer, node, live_in, live[name], never, always, flags)
        _replace_outputs(node, y, mask, name)
        gm.graph.erase_node(node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        outside = gm.graph.call_method("any", (gm.graph.call_function(torch.stack, (flags,)),))
    output.args = ((output.args[0], outside),)
    for node in reversed(list(gm.graph.nodes)):  # masks that only the replaced layers read
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def _masked_input(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x * mask`` for a (B, C) bool mask: what a gated layer reads when its input is not already zero there."""
    return x * mask[:, :, None, None].to(x.dtype)


def _computed_channels(never: torch.Tensor) -> torch.Tensor:
    """The output channels a compact layer computes: those not never on (sorted indices), or, where every channel
    is never on, one of them (zero weights: it comes out exactly zero), so that the layer and its readers stay
    convolutions, which the inference passes run and chain. None is added to fill a vector block: the CPU kernels
    compute an output block of 5 or of 8 channels in the same time (their lanes hold a whole block either way,
    sparsekern.ops.fused_conv2d), but the layers reading the output pay for every input channel."""
    live = (~never).nonzero().flatten()
    return live if live.numel() else never.nonzero().flatten()[:1]


def _channel_mask(indices: Sequence[int] | None, channels: int) -> torch.Tensor:
    mask = torch.zeros(channels, dtype=torch.bool)
    if indices:
        mask[torch.as_tensor(list(indices), dtype=torch.int64)] = True
    return mask


def _static_layer(gm: torch.fx.GraphModule, name: str, layer: MaskedConv2d, node: torch.fx.Node,
                  live_in: torch.Tensor | None, live_out: torch.Tensor | None, never: torch.Tensor,
                  always: torch.Tensor, flags: list[torch.fx.Node]) -> tuple[torch.fx.Node, torch.fx.Node | None]:
    """Insert the static form of one gated layer before ``node``; returns its output node and its mask node
    (None for a consumer), and appends its guard's ``outside`` node to ``flags``."""
    from sparsekern.passes import folded_weights

    graph, x = gm.graph, node.args[0]
    conv = layer.conv
    if layer.bn is not None:
        w, b = folded_weights(conv, layer.bn)
    else:
        w = conv.weight.detach()
        b = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=w.dtype)
    computed = live_out if live_out is not None else torch.arange(layer.out_channels)
    w, b = w.index_select(0, computed), b.index_select(0, computed)
    if live_in is not None:
        w = w.index_select(1, live_in)
    mask = scale = None
    if layer.gated:  # never-on outputs (kept for a whole kernel block, or a full-width output) are exact zeros
        dead = never[computed]
        w, b = w.masked_fill(dead[:, None, None, None], 0.0), b.masked_fill(dead, 0.0)
        scaled = not bool((always | never)[computed].all())
        guard = GateGuard(_input_sliced_gate(layer.gate, live_in, layer.in_channels), layer.granularity,
                          layer.out_channels, never, always, computed, scaled)
        gm.add_submodule(f"{name}_guard", guard)
        g = graph.call_module(f"{name}_guard", (x,))
        mask, flags_node = graph.call_function(operator.getitem, (g, 0)), graph.call_function(operator.getitem, (g, 2))
        flags.append(flags_node)
        scale = graph.call_function(operator.getitem, (g, 1)) if scaled else None
    kernel, padding, dilation = conv.kernel_size, conv.padding, conv.dilation
    if layer.gated and bool(never[computed].all()) and all(
            2 * p == d * (k - 1) for p, d, k in zip(padding, dilation, kernel)):
        # nothing on: zeros, which a 1x1 kernel with the same stride gives on the same output size
        kernel, padding, dilation = (1, 1), (0, 0), (1, 1)
        w = w.new_zeros(w.shape[0], w.shape[1], 1, 1)
    static = nn.Conv2d(w.shape[1], w.shape[0], kernel, conv.stride, padding, dilation)
    with torch.no_grad():
        static.weight.copy_(w)
        static.bias.copy_(b)
    static.requires_grad_(False)
    gm.delete_submodule(name)
    gm.add_submodule(name, static)
    y = graph.call_module(name, (x,))
    if layer.relu:
        y = graph.call_function(torch.relu, (y,))
    if scale is not None:
        y = graph.call_method("mul_", (y, scale))
    return y, mask


def _replace_outputs(node: torch.fx.Node, y: torch.fx.Node, mask: torch.fx.Node | None, name: str) -> None:
    """Point the uses of a gated-layer call (``[0]``: the output, ``[1]``: the mask) or of a consumer call (the
    output) at the static layer's nodes."""
    if mask is None:
        node.replace_all_uses_with(y)
        return
    for user in list(node.users):
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if index not in (0, 1):
            raise PlanError(f"dynamic layer {name!r}: its (output, mask) pair is used by {user.name!r}; hybrid "
                            "compilation needs it unpacked as [0] and [1] (compile the uncalibrated plan instead)")
        user.replace_all_uses_with(y if index == 0 else mask)
        user.graph.erase_node(user)


def _readers_reached(node: torch.fx.Node, name: str, nodes: dict[str, torch.fx.Node],
                     layers: dict[str, DynamicLayer], modules: dict[str, nn.Module]) -> tuple[set[torch.fx.Node], bool]:
    """For gated layer ``name``: the calls of the layers that read its mask and take its output ``[0]`` as their
    input through channel-wise ops only (so their masked-off input channels are already zero), and whether that
    is every use of its output and every reader of its mask (then its never-on channels need not exist)."""
    readers = {nodes[n] for n, spec in layers.items() if spec.in_from == name}
    frontier = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    reached, only = set(), True
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if user in readers and user.args[0] is value and all(a is not value for a in user.args[1:]):
                reached.add(user)
            elif _channelwise(user, modules) and user.args[0] is value:
                frontier.append(user)
            else:
                only = False
    return reached, only and reached == readers


def _channelwise(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _CHANNELWISE_MODULES)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _CHANNELWISE_METHODS
