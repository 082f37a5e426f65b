"""Per-sample dynamic channel gating (docs/design.md#dynamic-plans): the gated layers and the compiler step.

A **gated layer** is a convolution (``groups=1``) followed by an optional BatchNorm and an optional ReLU,
whose output channels are switched on or off *per sample* by a small **gate** module: ``gate(x)`` maps the
layer's input (B, C_in, H, W) to one logit per group of ``granularity`` consecutive output channels,
(B, ceil(C_out / G)); channel c of sample b is kept iff the logit of its group is > 0. A layer may also be
told the out mask of the gated layer that produced its input (its **in mask**): those input channels are
zero, so they need not be read. A layer with an in mask and no gate is a **consumer** (e.g. the second
conv of a ResNet basic block, whose output joins the dense residual stream).

Both forms of a layer have one call signature, ``layer(x, in_mask=None)``, returning ``(y, out_mask)`` for a
gated layer and ``y`` for a consumer (masks are (B, C) bool tensors at inference):

* :class:`MaskedConv2d`, the dense reference: ``relu(bn(conv(x * in_mask))) * out_mask``; every channel is
  computed, then masked. Methods train subclasses of it (SANP: :mod:`sparsekern.methods.sanp`).
* :class:`GatedConv2d`, the compiled layer: BN folded into the conv (running statistics), the ReLU fused,
  computed by :func:`sparsekern.ops.channel_skip_conv2d`, which neither reads masked-off input channels
  nor computes masked-off output channels.

The plan's dynamic part (:attr:`sparsekern.plan.Plan.dynamic`) names every such layer of the model, one
:class:`~sparsekern.plan.DynamicLayer` each; in JSON::

    {"layer1.0.conv1": {"granularity": 4, "in_from": null, "relu": true, ..., "gate": {"kind": "spm", ...}},
     "layer1.0.conv2": {"granularity": null, "in_from": "layer1.0.conv1", "relu": false, ..., "gate": null}}

``granularity`` (int, or null for a consumer) and ``in_from`` (the gated layer whose out mask is this
layer's in mask, or null) are required; ``relu``, ``in_channels``, ``out_channels``, ``kernel_size`` and
``stride`` are checked against the model's layer when present, and ``gate`` (the gate's architecture)
against the model's gate when that gate has a ``spec()`` method; any other key is refused. The gate's
*weights* live in the model, not in the plan. :func:`compile_dynamic` and :func:`masked_dynamic` check the
plan against the traced model (every named layer is a gated layer there, every gated layer is named, and
the in-mask edges of the graph are those of the plan) and raise :class:`~sparsekern.plan.PlanError` naming
the layer otherwise; then they swap each layer for its compiled or reference form. The masks flow through
the graph as values, so consecutive gated layers pass them on: a layer with both masks costs
``2 k^2 H W |active in| |active out|`` FLOPs per sample, a quadratic saving.

**Hybrid static/dynamic compilation.** :func:`calibrate` (a plan step: ``plan = calibrate(plan, model, data)``)
runs the model on calibration inputs and records, per gated layer, the output channels that were never on and
those always on (``never_on`` / ``always_on`` of :class:`~sparsekern.plan.DynamicLayer`, saved with the plan);
the others switch. ``sk.compile`` turns a calibrated plan into a static model over the channels that are not
never on, with a guard that hands any batch leaving the classes to this module's per-sample model
(:mod:`sparsekern.hybrid`), so it equals :func:`masked_dynamic` on any input.

Per-sample cost (:func:`sparsekern.cost.flops`): :class:`MaskedConv2d` reports what each sample would
cost with the skipped channels skipped (:meth:`MaskedConv2d.sk_flops_per_sample`); a compiled model's
cost is read from the arguments of the op.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import operator
import weakref
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from sparsekern.ops import channel_skip_conv2d
from sparsekern.plan import DynamicLayer, Plan, PlanError
from sparsekern.utils import closest, input_spec

__all__ = [
    "DynamicLayer",
    "GatedConv2d",
    "MaskedConv2d",
    "calibrate",
    "calibration_batches",
    "check_dynamic",
    "compile_dynamic",
    "conv_sample_flops",
    "dynamic_layers",
    "expand_groups",
    "in_mask_arg",
    "gate_flops",
    "mask_source",
    "masked_dynamic",
    "parse_dynamic",
    "set_backend",
]


# ----------------------------------------------------------------------------- helpers
def expand_groups(group_mask: torch.Tensor, granularity: int, channels: int) -> torch.Tensor:
    """One decision per group of ``granularity`` consecutive channels -> one per channel.

    Args:
        group_mask: (B, ceil(channels / granularity)), any dtype.
        granularity: channels per group (the last group may be shorter).
        channels: number of channels C.

    Returns:
        (B, C), same dtype: channel c takes the value of group ``c // granularity``.
    """
    if granularity == 1:
        return group_mask
    return group_mask.repeat_interleave(granularity, dim=1)[:, :channels]


def conv_sample_flops(kernel_area: int, out_hw: int, in_active: torch.Tensor, out_active: torch.Tensor) -> torch.Tensor:
    """FLOPs (multiply-add = 2) of a conv for each sample: ``2 k^2 H_out W_out |in| |out|``.

    ``in_active``, ``out_active``: (B,) active channel counts (integer, or float to differentiate through
    straight-through gates). Returns (B,) in their promoted dtype.
    """
    return 2 * kernel_area * out_hw * in_active * out_active


def gate_flops(gate: nn.Module | None) -> int:
    """FLOPs per sample of a gate: ``2 * in * out`` for each of its linear layers (pooling and
    activations count 0, the convention of :mod:`sparsekern.cost`)."""
    if gate is None:
        return 0
    return sum(2 * m.in_features * m.out_features for m in gate.modules() if isinstance(m, nn.Linear))


def _active(mask: torch.Tensor | None, batch: int, channels: int, device: torch.device) -> torch.Tensor:
    """(B,) active channel counts of a (B, C) mask: int64 for a bool mask (all C when there is none), float
    (differentiable) for a float 0/1 mask."""
    if mask is None:
        return torch.full((batch,), channels, dtype=torch.int64, device=device)
    return mask.sum(1)


def _check_conv(conv: nn.Module, where: str) -> None:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"{where}: a gated layer wraps an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"{where}: gated convolutions need groups=1 (channel_skip_conv2d has no grouped form), "
                         f"got groups={conv.groups}; leave this conv ungated")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"{where}: gated convolutions need explicit zero padding, got padding={conv.padding!r} "
                         f"mode {conv.padding_mode!r}")


# ----------------------------------------------------------------------------- layers
class MaskedConv2d(nn.Module):
    """Dense reference of a gated layer: ``relu(bn(conv(x * in_mask))) * out_mask``.

    Args:
        conv: the convolution (``groups=1``, zero padding); kept as the submodule ``conv``.
        bn: the BatchNorm that follows it, or None; submodule ``bn``.
        relu: apply a ReLU after the BN (before the mask; ``relu(0) = 0``, so the order does not matter).
        gate: module mapping x (B, C_in, H, W) to logits (B, ceil(C_out / granularity)); None for a consumer.
        granularity: output channels per gate logit (None for a consumer).

    Call: ``layer(x, in_mask=None)`` with x (B, C_in, H, W) and in_mask (B, C_in) (bool, or float 0/1 while
    training; it is treated as a constant). Returns ``(y, out_mask)``, y (B, C_out, H_out, W_out) and
    out_mask (B, C_out) bool, for a gated layer; ``y`` for a consumer. :meth:`out_mask` is the only place
    the decision is made: subclasses override it to train the gate (e.g. straight-through binarisation).
    """

    sk_leaf = True  # one fx node under its own name (sparsekern.graph)

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, relu: bool = False,
                 gate: nn.Module | None = None, granularity: int | None = None) -> None:
        super().__init__()
        _check_conv(conv, type(self).__name__)
        if (gate is None) != (granularity is None):
            raise ValueError("a gated layer needs both a gate and a granularity (a consumer neither); got "
                             f"gate={type(gate).__name__ if gate is not None else None}, granularity={granularity}")
        if granularity is not None and not (isinstance(granularity, int) and granularity >= 1):
            raise ValueError(f"granularity must be a positive int, got {granularity!r}")
        if bn is not None and bn.num_features != conv.out_channels:
            raise ValueError(f"BatchNorm of {bn.num_features} channels after a conv with {conv.out_channels} outputs")
        self.conv = conv
        self.bn = bn
        self.relu = bool(relu)
        self.gate = gate
        self.granularity = granularity

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits (B, ceil(C_out / G)) for input x (B, C_in, H, W)."""
        if self.gate is None:
            raise RuntimeError("a consumer layer has no gate")
        return self.gate(x)

    def out_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Inference decision: (B, C_out) bool, channel kept iff its group's logit is > 0."""
        return expand_groups(self.logits(x) > 0, self.granularity, self.out_channels)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn(conv(x)))`` without any mask, (B, C_out, H_out, W_out)."""
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return F.relu(y) if self.relu else y

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> Any:
        if in_mask is not None:
            x = x * in_mask.detach().to(x.dtype)[:, :, None, None]
        y = self.dense(x)
        if self.gate is None:
            return y
        m = self.out_mask(x)
        return y * m.to(y.dtype)[:, :, None, None], m

    def sk_flops_per_sample(self, args: tuple, kwargs: Mapping[str, Any], output: Any) -> torch.Tensor:
        """FLOPs of this call for each sample with masked channels skipped (protocol of
        :func:`sparsekern.cost.flops`): :func:`conv_sample_flops` with the active channel counts of the
        in mask and the out mask, plus the gate's :func:`gate_flops`. Returns (B,) int64."""
        x = args[0]
        in_mask = args[1] if len(args) > 1 else kwargs.get("in_mask")
        y, m = output if self.gate is not None else (output, None)
        b = x.shape[0]
        k = self.conv.kernel_size[0] * self.conv.kernel_size[1]
        cin = _active(None if in_mask is None else in_mask.detach() > 0, b, self.in_channels, x.device)
        cout = _active(None if m is None else m.detach() > 0, b, self.out_channels, x.device)
        return conv_sample_flops(k, y.shape[-2] * y.shape[-1], cin, cout) + gate_flops(self.gate)

    def extra_repr(self) -> str:
        return f"relu={self.relu}, granularity={self.granularity}"


def _best_time(fn: Any, repeats: int = 3) -> float:
    """Seconds of the fastest of ``repeats`` calls of ``fn`` after one warm-up call (the layers' one-off
    measurements of which path to run; never called in tests, which inject the results)."""
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


#: per-layer caches of the dense CPU path (prepacked weights, measured crossovers), outside the modules so that
#: copies, state dicts and saved files never carry oneDNN tensors
_DENSE_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class GatedConv2d(nn.Module):
    """Compiled gated layer: conv with BN folded, ReLU fused, on :func:`sparsekern.ops.channel_skip_conv2d`.

    Same call as :class:`MaskedConv2d`: ``layer(x, in_mask=None)`` -> ``(y, out_mask)`` (gated) or ``y``
    (consumer). The out mask is ``gate(x) > 0`` expanded to channels; the op skips the input channels that
    ``in_mask`` marks off and the output channels ``out_mask`` marks off (they come out exactly zero).
    Inference only: the op has no autograd formula, and the BN is folded with its running statistics.

    Attributes:
        weight (C_out, C_in, kh, kw), bias (C_out,): the folded conv.
        gate, granularity, relu, stride, padding, dilation: as in the reference layer.
        backend: the op backend to force (None: the op's dispatch picks; see :func:`set_backend`).
    """

    sk_leaf = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, stride: Iterable[int] = (1, 1),
                 padding: Iterable[int] = (0, 0), dilation: Iterable[int] = (1, 1), relu: bool = False,
                 gate: nn.Module | None = None, granularity: int | None = None, backend: str | None = None) -> None:
        super().__init__()
        if (gate is None) != (granularity is None):
            raise ValueError("GatedConv2d needs both a gate and a granularity, or neither (a consumer)")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride = tuple(int(s) for s in stride)
        self.padding = tuple(int(p) for p in padding)
        self.dilation = tuple(int(d) for d in dilation)
        self.relu = bool(relu)
        self.gate = gate
        self.granularity = granularity
        self.backend = backend

    @classmethod
    def from_masked(cls, layer: MaskedConv2d, backend: str | None = None) -> "GatedConv2d":
        """The compiled form of ``layer``: BN folded (running statistics), gate copied."""
        from sparsekern.passes import folded_weights

        conv = layer.conv
        if layer.bn is not None:
            w, b = folded_weights(conv, layer.bn)
        else:
            w, b = conv.weight.detach(), None if conv.bias is None else conv.bias.detach()
        return cls(w, b, stride=conv.stride, padding=conv.padding, dilation=conv.dilation, relu=layer.relu,
                   gate=copy.deepcopy(layer.gate), granularity=layer.granularity, backend=backend)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def out_mask(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_out) bool: channel kept iff its group's gate logit is > 0."""
        return expand_groups(self.gate(x) > 0, self.granularity, self.out_channels)

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> Any:
        if in_mask is not None and in_mask.dtype != torch.bool:
            in_mask = in_mask > 0
        m = self.out_mask(x) if self.gate is not None else None
        if x.device.type == "cpu" and not x.is_contiguous():
            x = x.contiguous()  # the C++ kernel's fast path is NCHW (channels-last inputs gather element-wise)
        return self.per_sample(x, in_mask, m)

    def per_sample(self, x: torch.Tensor, in_mask: torch.Tensor | None, m: torch.Tensor | None) -> Any:
        """The layer for masks already computed: ``in_mask`` (B, C_in) and ``m`` (B, C_out) bool or None. The
        kernel skips what the masks mark off; batches denser than the measured crossover run the dense
        convolution, then the mask. Returns what :meth:`forward` returns."""
        if self._dense_is_faster(x, in_mask, m):
            y = self._dense(x)
            return y if m is None else (y.masked_fill_(~m[:, :, None, None], 0.0), m)
        y = channel_skip_conv2d(x, self.weight, self.bias, in_mask, m, self.stride, self.padding, self.dilation,
                                self.relu, backend=self.backend)
        return y if m is None else (y, m)

    # -------------------------------------------------------------------- dense path (CPU)
    # When a batch keeps (nearly) every channel, skipping saves nothing and the dense oneDNN convolution, weights
    # prepacked for the input shape, can be faster than the channel-skipping kernel at full density (more so on
    # wide layers with small maps; sparsekern/bench/kernel_channel_skip_conv2d.py times both). So the layer
    # times both once per input shape at full density (like cudnn.benchmark) and runs the dense convolution,
    # then the output mask, whenever the batch's active fraction sum_b |in_b| |out_b| / (B C_in C_out) is above
    # their ratio. Only the inactive work that would not pay is computed; results equal the kernel's. CPU float32,
    # oneDNN enabled, no forced backend, not under a dispatch mode (FLOP counting sees the op and its active
    # channels, whichever path runs); ``dense_fallback=False`` turns it off.
    dense_fallback = True

    @staticmethod
    def _onednn_ok(x: torch.Tensor) -> bool:
        """Whether oneDNN can run the dense convolution of ``x``: CPU float32, oneDNN enabled, and not under a
        dispatch mode (FLOP counting, fake tensors, export must see the op itself)."""
        return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and torch.backends.mkldnn.enabled and not is_in_torch_dispatch_mode())

    def _dense_is_faster(self, x: torch.Tensor, in_mask: torch.Tensor | None, m: torch.Tensor | None) -> bool:
        if not (self.dense_fallback and self.backend is None and self._onednn_ok(x)):
            return False
        ratio = self._crossover(x)
        if ratio <= 0.0:
            return False
        c_in, c_out = self.in_channels, self.out_channels
        active_in = in_mask.sum(1, dtype=torch.float64) if in_mask is not None else torch.full((x.shape[0],), float(c_in))
        active_out = m.sum(1, dtype=torch.float64) if m is not None else torch.full((x.shape[0],), float(c_out))
        fraction = float((active_in * active_out).sum()) / (x.shape[0] * c_in * c_out)
        return fraction > ratio

    def _cache(self, name: str) -> dict:
        return _DENSE_CACHE.setdefault(self, {}).setdefault(name, {})

    def _packed(self, shape: tuple[int, ...]) -> torch.Tensor:
        cache = self._cache("packed")
        if shape not in cache:
            from sparsekern.passes import onednn_weight

            if len(cache) >= 8:
                cache.clear()
            cache[shape] = onednn_weight(self.weight, self.padding, self.stride, self.dilation, 1, shape)
        return cache[shape]

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise.default(
            x, self._packed(tuple(x.shape)), self.bias, list(self.padding), list(self.stride), list(self.dilation), 1,
            "relu" if self.relu else "none", [], "")

    def _crossover(self, x: torch.Tensor) -> float:
        """Dense time / kernel time at full density for inputs shaped like ``x`` (timed once per shape)."""
        ratios = self._cache("crossover")
        shape = tuple(x.shape)
        if shape not in ratios:
            with torch.no_grad():
                dense = _best_time(lambda: self._dense(x))
                kernel = _best_time(lambda: channel_skip_conv2d(x, self.weight, self.bias, None, None, self.stride,
                                                                self.padding, self.dilation, self.relu))
            ratios[shape] = dense / kernel
        return ratios[shape]

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return (f"{c_in}, {c_out}, kernel_size=({kh}, {kw}), stride={self.stride}, padding={self.padding}, "
                f"relu={self.relu}, granularity={self.granularity}, backend={self.backend}")


def dynamic_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that choose their channels per sample (:class:`MaskedConv2d`,
    :class:`GatedConv2d` and its subclasses): what a traced or exported graph cannot represent."""
    return [name for name, m in model.named_modules() if isinstance(m, (GatedConv2d, MaskedConv2d))]


def set_backend(model: nn.Module, backend: str | None) -> nn.Module:
    """Force the ``channel_skip_conv2d`` backend (``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or
    None for the op's dispatch) of every :class:`GatedConv2d` in ``model``; returns ``model``."""
    for m in model.modules():
        if isinstance(m, GatedConv2d):
            m.backend = backend
    return model


# ----------------------------------------------------------------------------- plan part
def parse_dynamic(plan: Plan) -> dict[str, DynamicLayer]:
    """The dynamic part of ``plan`` as checked :class:`~sparsekern.plan.DynamicLayer` s
    (:meth:`sparsekern.plan.Plan.dynamic_layers`); :class:`PlanError` names a malformed entry."""
    return plan.dynamic_layers()


def check_dynamic(gm: torch.fx.GraphModule, plan: Plan) -> dict[str, torch.fx.Node]:
    """Check the plan's dynamic part against ``gm`` (see :func:`compile_dynamic` for what is checked); returns
    layer name -> its call_module node."""
    layers = parse_dynamic(plan)
    modules = dict(gm.named_modules())
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(str(node.target), []).append(node)
    gated_in_model = [n for n, m in modules.items() if isinstance(m, (MaskedConv2d, GatedConv2d)) and n in calls]
    nodes: dict[str, torch.fx.Node] = {}
    for name, layer in layers.items():
        m = modules.get(name)
        if m is None:
            near = closest(name, gated_in_model or list(calls))
            raise PlanError(f"dynamic layer {name!r} is not in the model; gated layers it has: {near}")
        if not isinstance(m, MaskedConv2d):
            raise PlanError(
                f"dynamic layer {name!r} is a {type(m).__name__}, not a gated layer (MaskedConv2d): compile the "
                "model in which it is gated (e.g. sparsekern.methods.sanp.to_sanp(model)), not the plain one")
        if name not in calls:
            raise PlanError(f"dynamic layer {name!r} is never called in the traced forward")
        if len(calls[name]) > 1:
            raise PlanError(f"dynamic layer {name!r} is called {len(calls[name])} times; a gated layer must be "
                            "called once (give each call its own layer)")
        if m.granularity != layer.granularity:
            raise PlanError(f"dynamic layer {name!r}: the plan says granularity {layer.granularity}, the model's "
                            f"layer has {m.granularity}")
        for key, have in (("relu", m.relu), ("in_channels", m.in_channels), ("out_channels", m.out_channels),
                          ("kernel_size", tuple(m.conv.kernel_size)), ("stride", tuple(m.conv.stride))):
            want = getattr(layer, key)
            if want is not None and want != have:
                raise PlanError(f"dynamic layer {name!r}: the plan says {key}={want}, the model's layer has {have}")
        for key in ("never_on", "always_on"):
            idx = getattr(layer, key)
            if idx and idx[-1] >= m.out_channels:
                raise PlanError(f"dynamic layer {name!r}: the plan's {key} names channel {idx[-1]}, the model's "
                                f"layer has {m.out_channels} outputs; calibrate the plan on this model")
        describe = getattr(m.gate, "spec", None)
        if layer.gate is not None and m.gate is not None and callable(describe):
            have = json.loads(json.dumps(describe()))  # as it would be recorded in a plan (lists, not tuples)
            if dict(layer.gate) != have:
                raise PlanError(f"dynamic layer {name!r}: the plan says its gate is {dict(layer.gate)}, the model's "
                                f"gate is {have}; the plan was made for a different model")
        nodes[name] = calls[name][0]
    extra = [n for n in gated_in_model if n not in layers]
    if extra:
        raise PlanError(f"the model's gated layers {extra[:4]} are missing from the plan's dynamic part; build the "
                        "plan from this model (e.g. sparsekern.methods.sanp.to_plan)")
    for name, node in nodes.items():
        src = mask_source(node)
        if src != layers[name].in_from:
            raise PlanError(f"dynamic layer {name!r}: the plan says its in mask comes from {layers[name].in_from!r}, "
                            f"but in the model it comes from {src!r}")
    return nodes


def in_mask_arg(node: torch.fx.Node) -> Any:
    """What the gated-layer call ``node`` passes as its in mask (its second argument, or ``in_mask=``), or None."""
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("in_mask")


def mask_source(node: torch.fx.Node) -> str | None:
    """Name of the gated layer whose out mask the gated-layer call ``node`` receives as its in mask (its
    second argument, or ``in_mask=``); None when it receives none.

    Raises:
        PlanError: the in mask is anything but ``[1]`` of a gated layer's output.
    """
    arg = in_mask_arg(node)
    if arg is None:
        return None
    ok = (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is operator.getitem
          and arg.args[1] == 1 and isinstance(arg.args[0], torch.fx.Node) and arg.args[0].op == "call_module")
    if not ok:
        raise PlanError(f"dynamic layer {node.target!r}: its in mask is computed by {getattr(arg, 'name', arg)!r}; "
                        "only the out mask of a gated layer ([1] of its output) may be passed")
    return str(arg.args[0].target)


def compile_dynamic(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any = None) -> torch.fx.GraphModule:
    """Swap every gated layer the plan names for its :class:`GatedConv2d` (BN folded, ReLU fused).

    Args:
        gm: traced model (:func:`sparsekern.graph.symbolic_trace`) whose gated layers are
            :class:`MaskedConv2d` call_module nodes; modified in place.
        plan: a plan whose ``dynamic`` part names those layers (see the module docstring).
        example_inputs: unused (the gated layers need no shapes); accepted for the compiler's uniform call.

    Returns:
        ``gm``, its gated layers replaced; masks keep flowing along the graph's edges, so each layer skips
        the input channels its producer switched off.

    Raises:
        PlanError: a named layer is missing or not gated, a gated layer is not named, or the plan's in-mask
            edges or granularities disagree with the model.
    """
    nodes = check_dynamic(gm, plan)
    for name in nodes:
        gm.set_submodule(name, GatedConv2d.from_masked(gm.get_submodule(name)))
    gm.recompile()
    return gm


def masked_dynamic(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any = None) -> torch.fx.GraphModule:
    """Swap every gated layer the plan names for a plain :class:`MaskedConv2d` (dense conv times the masks,
    the hard ``logit > 0`` decision in every mode): the reference that :func:`compile_dynamic` must equal
    in eval mode. Same arguments and errors as :func:`compile_dynamic`."""
    nodes = check_dynamic(gm, plan)
    for name in nodes:
        m = gm.get_submodule(name)
        ref = MaskedConv2d(copy.deepcopy(m.conv), copy.deepcopy(m.bn), relu=m.relu, gate=copy.deepcopy(m.gate),
                           granularity=m.granularity)
        ref.train(m.training)
        gm.set_submodule(name, ref)
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------- calibration
def calibration_batches(data: Any, batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The input batches of calibration ``data``: a tensor (N, ...) of inputs (split into ``batch_size``
    rows), a map-style Dataset of ``x`` or ``(x, y)`` samples (batched by a DataLoader), or an iterable of
    batches (a DataLoader) whose items are input tensors or ``(inputs, labels, ...)`` sequences (the first
    element is the model's one input)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, torch.Tensor):
        yield from data.split(batch_size)
        return
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration data: a batch's input must be a tensor, got {type(x).__name__}; pass a "
                            "tensor of inputs or a DataLoader of (inputs, labels)")
        yield x


def calibrate(plan: Plan, model: nn.Module, data: Any, *, batch_size: int = 256,
              max_samples: int | None = None) -> Plan:
    """Record each gated layer's channel classes over calibration data: the plan step of hybrid compilation.

    Runs a copy of ``model`` (the gated form the plan compiles against, e.g. SANP's: Chen et al.,
    "Self-Adaptive Network Pruning", ICONIP 2019) in eval mode on ``data`` and, per gated layer, takes the
    per-sample out masks (B, C_out): a channel is **never on** if it is off for every sample, **always on** if
    on for every sample, **switching** otherwise. ``sk.compile`` turns a calibrated plan into a static model over
    the channels that are not never on, guarded by the per-sample one (:func:`sparsekern.hybrid.compile_hybrid`),
    which equals ``sk.masked`` on any input.

    Args:
        plan: a plan with a dynamic part naming the model's gated layers.
        model: the model the plan compiles against (not modified).
        data: inputs (see :func:`calibration_batches`): a tensor, a Dataset or a DataLoader of ``(x, y)``.
        batch_size: rows per forward for a tensor or Dataset.
        max_samples: stop after at least this many samples (default: all of ``data``).

    Returns:
        A new plan whose gated layers carry ``never_on`` / ``always_on``
        (:class:`~sparsekern.plan.DynamicLayer`) and whose meta records ``calibration: {"samples": N}`` (and
        the first batch's shapes as ``inputs`` when the plan has none).

    Raises:
        PlanError: naming a layer of the plan that is not a gated layer of ``model`` or never runs.
        ValueError: ``data`` holds no sample.
    """
    layers = parse_dynamic(plan)
    net = copy.deepcopy(model).eval()
    modules = dict(net.named_modules())
    ever: dict[str, torch.Tensor] = {}
    always: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            m = out[1]
            ever[name] = m.any(0) | ever[name] if name in ever else m.any(0)
            always[name] = m.all(0) & always[name] if name in always else m.all(0)
        return hook

    handles = []
    for name, spec in layers.items():
        m = modules.get(name)
        if not isinstance(m, MaskedConv2d) or m.gated != spec.gated:
            raise PlanError(f"calibrate: dynamic layer {name!r} is not a {'gated' if spec.gated else 'consumer'} "
                            "layer (MaskedConv2d) of the model; calibrate the gated form the plan was made for")
        if spec.gated:
            handles.append(m.register_forward_hook(record(name)))
    seen, first = _run_calibration(net, data, batch_size, max_samples, handles)
    dynamic = {}
    for name, spec in layers.items():
        if spec.gated and name not in ever:
            raise PlanError(f"calibrate: gated layer {name!r} never ran on the calibration data")
        dynamic[name] = spec if not spec.gated else dataclasses.replace(
            spec, never_on=tuple((~ever[name]).nonzero().flatten().tolist()),
            always_on=tuple(always[name].nonzero().flatten().tolist()))
    meta = {"inputs": input_spec((first,)), **plan.meta, "calibration": {"samples": seen}}
    return dataclasses.replace(plan, dynamic=dynamic, meta=meta)


def _run_calibration(net: nn.Module, data: Any, batch_size: int, max_samples: int | None,
                     handles: list) -> tuple[int, torch.Tensor]:
    """Run ``net`` over the calibration batches (no grad), then remove ``handles``; the number of samples and
    the first batch."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    seen, first = 0, None
    try:
        with torch.no_grad():
            for x in calibration_batches(data, batch_size):
                net(x.to(device))
                seen += int(x.shape[0])
                first = x if first is None else first
                if max_samples is not None and seen >= max_samples:
                    break
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("calibrate: the calibration data holds no sample")
    return seen, first
