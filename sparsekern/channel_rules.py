"""The table of channel rules: how each op carries, ties or hides the channel axis of its tensors.

One registry, keyed by what an fx node calls:

* a module **type** (``nn.Conv2d``, ``nn.ReLU``, a user's ``ScaledReLU``) for ``call_module`` nodes; a module
  gets the rule of the nearest class in its MRO that has one (so ``nn.Conv2d`` gets ``_ConvNd``'s rule);
* a **function** (``F.relu``, ``torch.cat``, ``operator.add``) for ``call_function`` nodes (exact object);
* a method **name** (``"relu"``, ``"view"``) for ``call_method`` nodes.

A :class:`ChannelRule` holds up to four things:

``layout(ctx, node, value)``
    How the channel graph (:mod:`sparsekern.graph`) follows the channel axis through the op. ``ctx`` is a
    :class:`LayoutContext` (the running channel analysis), ``node`` the fx node, ``value`` the op's output on
    the example inputs. Return the output's :class:`~sparsekern.graph.Layout` (a tuple of them for ops that
    return several tensors), ``None`` when the output carries no tracked channel, or ``ctx.opaque(node, why)``
    (which pins every tracked input channel and returns ``None``) when the op cannot be sliced. A rule must
    never return ``None`` for an op whose input channels are tracked without pinning them: the layers after it
    would then not be sliced while the layers before it are. ``layout=None`` means "not understood": the
    op's tracked input channels are pinned ("... is not sliceable"), the model stays correct, only unprunable.
``slice(module, in_keep, out_keep)``
    Module rules only: how :func:`sparsekern.compile` slices the module's own per-channel state (weights,
    buffers, attributes such as ``num_features``) to the kept channels. ``in_keep``/``out_keep`` are int64
    tensors of the kept positions along the channel axis of the module's first input / its output, or
    ``None`` where nothing is removed (untracked, or every channel kept). Modules without per-channel state
    need no slice function. The built-in layers (conv, linear, norms, PReLU) register theirs from
    :mod:`sparsekern.slicing`.
``masked(module, mask)``
    Module rules only: for a layer whose statistics pool over channels (LayerNorm, RMSNorm, GroupNorm), its
    reference form in :func:`sparsekern.masked` that pools over the kept channels ``mask`` (bool, ``(C,)``)
    only, as the compiled layer does (:mod:`sparsekern.masked_norms`).
``tags``
    Facts about the op that other parts of the package ask (see :data:`TAGS`): ``"weights"`` (per-channel
    parameters sliced once, so every call of a shared instance must see the same channels), ``"add"``
    (a residual addition), ``"relu"`` (exactly ReLU, for oneDNN fusion), ``"activation"`` (an element-wise
    activation that may follow a residual add, :mod:`sparsekern.depth`), ``"identity_on_nonneg"`` (returns
    every input ``x >= 0`` unchanged), ``"nonneg"`` (output ``>= 0`` whatever the input) and
    ``"keeps_nonneg"`` (output ``>= 0`` when the input is).

A module type registered **exactly** (not only through a base class) is traced as a single node (an fx leaf),
so its rule sees the call; torch's own modules are leaves anyway. Register a rule with
:func:`register_channel_rule`, undo it with :func:`unregister_channel_rule`, or scope it with
:func:`channel_rule_scope` (tests). docs/adding-a-channel-rule.md walks through an example.
"""
from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Protocol, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from sparsekern import slicing
from sparsekern.masked_norms import MaskedGroupNorm, MaskedLayerNorm, MaskedRMSNorm

if TYPE_CHECKING:  # pragma: no cover
    from sparsekern.graph import Layout

__all__ = [
    "TAGS",
    "ChannelRule",
    "LayoutContext",
    "channel_rule",
    "channel_rule_scope",
    "elementwise",
    "is_leaf_rule",
    "module_rule",
    "node_has_tag",
    "node_rule",
    "register_channel_rule",
    "unregister_channel_rule",
]

#: Tags a rule may carry (see the module docstring).
TAGS: frozenset[str] = frozenset(
    {"weights", "add", "relu", "activation", "identity_on_nonneg", "nonneg", "keeps_nonneg"})

#: What a rule is registered for: a module type, a function, or a method name.
OpKey = Union[type, Callable[..., Any], str]


class LayoutContext(Protocol):
    """What a ``layout`` function may use: the channel analysis that is running the model.

    ``lay(arg)``: the layout of an fx argument (``Layout``, tuple, or ``None`` when untracked or not a node).
    ``val(arg)``: its value on the example inputs. ``module_of(node)``: the module a ``call_module`` node calls.
    ``opaque(node, why)``: pin the node's tracked inputs and return ``None``. ``produce(node, size, cdim)``:
    the ``size`` new channels a layer creates on axis ``cdim`` (the same channels at every call of a shared
    module). The built-in propagations are methods too, for rules to reuse: ``passthrough(node, x, value)``,
    ``binary``, ``cat``, ``split``, ``getitem``, ``permute``, ``reduce``, ``sdpa`` (attention by heads),
    ``repeat_interleave``, ``expand`` (``(node, value)``), ``reshape(node, x, value)`` and the module layouts
    ``conv``, ``linear``, ``embedding``, ``group_norm``, ``layer_norm``, ``prelu`` (``(node, value)``).
    """

    def lay(self, arg: Any) -> Any: ...

    def val(self, arg: Any) -> Any: ...

    def module_of(self, node: torch.fx.Node) -> nn.Module: ...

    def opaque(self, node: torch.fx.Node, why: str) -> None: ...

    def produce(self, node: torch.fx.Node, size: int, cdim: int) -> Layout: ...

    def passthrough(self, node: torch.fx.Node, x: Any, value: Any) -> Any: ...


LayoutFn = Callable[[LayoutContext, torch.fx.Node, Any], Any]
SliceFn = Callable[[nn.Module, Union[torch.Tensor, None], Union[torch.Tensor, None]], None]


@dataclass(frozen=True)
class ChannelRule:
    """How one op handles channels: ``layout`` (graph), ``slice`` (compiler), ``tags`` (facts), ``masked`` (the
    reference form of a norm); see the module docstring for each contract. Unknown tags are refused."""

    layout: LayoutFn | None = None
    slice: SliceFn | None = None
    tags: frozenset[str] = frozenset()
    masked: Callable[[nn.Module, torch.Tensor], nn.Module] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tags", frozenset(self.tags))
        unknown = self.tags - TAGS
        if unknown:
            raise ValueError(f"unknown channel-rule tags {sorted(unknown)}; known tags: {sorted(TAGS)}")

    @property
    def shares_weights(self) -> bool:
        """The module has per-channel state (a ``"weights"`` tag or a ``slice`` function)."""
        return "weights" in self.tags or self.slice is not None


_RULES: dict[Any, ChannelRule] = {}


def _check_key(key: Any) -> None:
    if isinstance(key, str):
        return
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"a channel rule's module key must be an nn.Module subclass, got {key!r}")
        return
    if not callable(key):
        raise TypeError(f"a channel rule is keyed by a module type, a function or a method name, got {key!r}")


def register_channel_rule(key: OpKey, rule: ChannelRule | LayoutFn) -> ChannelRule | None:
    """Register ``rule`` for ``key`` (module type, function, or method name) and return the rule it replaces.

    ``rule`` may be a bare ``layout`` function, short for ``ChannelRule(layout=fn)``. A registered rule
    replaces any earlier one for the same key, built-in ones included.
    """
    _check_key(key)
    if not isinstance(rule, ChannelRule):
        if not callable(rule):
            raise TypeError(f"a channel rule is a ChannelRule or a layout function, got {rule!r}")
        rule = ChannelRule(layout=rule)
    previous = _RULES.get(key)
    _RULES[key] = rule
    return previous


def unregister_channel_rule(key: OpKey) -> ChannelRule | None:
    """Remove the rule for ``key`` and return it (``None`` if there was none)."""
    return _RULES.pop(key, None)


@contextlib.contextmanager
def channel_rule_scope(key: OpKey, rule: ChannelRule | LayoutFn) -> Iterator[ChannelRule]:
    """Register ``rule`` for ``key`` inside a ``with`` block; the previous rule (or none) comes back after."""
    previous = register_channel_rule(key, rule)
    try:
        yield _RULES[key]
    finally:
        if previous is None:
            _RULES.pop(key, None)
        else:
            _RULES[key] = previous


def channel_rule(key: OpKey) -> ChannelRule | None:
    """The rule registered for exactly ``key``, or ``None``."""
    try:
        return _RULES.get(key)
    except TypeError:  # an unhashable call target has no rule
        return None


def module_rule(module: nn.Module) -> ChannelRule | None:
    """The rule of the nearest class in ``type(module).__mro__`` that has one, or ``None``."""
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def is_leaf_rule(module: nn.Module) -> bool:
    """``module``'s exact type has a rule, so tracing keeps it as one node."""
    return type(module) in _RULES


def node_rule(node: torch.fx.Node, modules: Mapping[str, nn.Module] | nn.Module) -> ChannelRule | None:
    """The rule for what ``node`` calls; ``modules`` maps qualified names to modules (or is the root module)."""
    if node.op == "call_module":
        if isinstance(modules, nn.Module):
            m = modules.get_submodule(node.target)
        else:
            m = modules.get(node.target)
        return None if m is None else module_rule(m)
    if node.op in ("call_function", "call_method"):
        return channel_rule(node.target)
    return None


def node_has_tag(node: torch.fx.Node, modules: Mapping[str, nn.Module] | nn.Module, tag: str) -> bool:
    """Whether the rule for what ``node`` calls carries ``tag`` (one of :data:`TAGS`)."""
    if tag not in TAGS:
        raise ValueError(f"unknown channel-rule tag {tag!r}; known tags: {sorted(TAGS)}")
    rule = node_rule(node, modules)
    return rule is not None and tag in rule.tags


# ----------------------------------------------------------------------------- built-in layouts
def elementwise(ctx: LayoutContext, node: torch.fx.Node, value: Any) -> Any:
    """Layout of an op that maps each channel to itself (activations, pooling, dropout, a per-channel scale):
    the output has the first input's channel axis and atoms; pinned if the op changes the channel axis."""
    first = node.args[0] if node.args else None
    return ctx.passthrough(node, ctx.lay(first), value)


def _first_arg_passthrough(ctx: Any, n: torch.fx.Node, value: Any) -> Any:
    return ctx.passthrough(n, ctx.lay(n.args[0]), value)


def _module_reshape(ctx: Any, n: torch.fx.Node, value: Any) -> Any:
    return ctx.reshape(n, ctx.lay(n.args[0]) if n.args else None, value)


def _first_arg_reshape(ctx: Any, n: torch.fx.Node, value: Any) -> Any:
    return ctx.reshape(n, ctx.lay(n.args[0]), value)


def _method(name: str) -> LayoutFn:
    """A layout that calls the context's built-in propagation ``name`` with ``(node, value)``."""

    def layout(ctx: Any, n: torch.fx.Node, value: Any) -> Any:
        return getattr(ctx, name)(n, value)

    layout.__name__ = layout.__qualname__ = name
    return layout


_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_CHANNELWISE_FUNCTIONS = (
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.softplus, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.dropout, F.dropout2d, torch.clamp,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.interpolate, torch.abs, torch.exp, operator.neg, torch.neg,
)
_CHANNELWISE_METHODS = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clamp_min", "contiguous", "clone",
    "float", "half", "bfloat16", "to", "detach", "abs", "exp", "neg", "type_as",
)
_BINARY_FUNCTIONS = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
)
_BINARY_METHODS = ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_")

# what sparsekern.depth and sparsekern.passes ask about ops
_TAGGED: dict[str, tuple[Any, ...]] = {
    "weights": (nn.modules.conv._ConvNd, nn.Linear, nn.Embedding, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                nn.LayerNorm, nn.RMSNorm, nn.PReLU),
    "add": (operator.add, operator.iadd, torch.add, "add", "add_"),
    "relu": (nn.ReLU, F.relu, torch.relu, "relu", "relu_"),
    "activation": (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Identity,
                   F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.mish,
                   "relu", "relu_"),
    "identity_on_nonneg": (nn.ReLU, nn.LeakyReLU, nn.Identity, F.relu, torch.relu, F.leaky_relu, "relu", "relu_"),
    "nonneg": (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Softplus, nn.Hardsigmoid, F.relu, torch.relu, F.relu6,
               torch.sigmoid, F.sigmoid, F.softplus, F.hardsigmoid, torch.abs, "relu", "relu_", "sigmoid", "abs"),
    "keeps_nonneg": (nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
                     nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                     nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.Hardtanh, F.max_pool2d, F.avg_pool2d,
                     F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, "contiguous", "clone", "detach",
                     "float", "to"),
}


def _builtin_layouts() -> dict[Any, LayoutFn]:
    """Key -> layout function of every op the graph understands out of the box."""
    layouts: dict[Any, LayoutFn] = {}

    def put(keys: Iterable[Any], fn: LayoutFn) -> None:
        for k in keys:
            layouts[k] = fn

    put(_CHANNELWISE_MODULES, elementwise)
    put((nn.modules.batchnorm._BatchNorm,), elementwise)
    put((nn.modules.conv._ConvNd,), _method("conv"))
    put((nn.Linear,), _method("linear"))
    put((nn.Embedding,), _method("embedding"))
    put((nn.GroupNorm,), _method("group_norm"))
    put((nn.LayerNorm, nn.RMSNorm), _method("layer_norm"))
    put((nn.PReLU,), _method("prelu"))
    put((nn.Flatten,), _module_reshape)
    put(_CHANNELWISE_FUNCTIONS + _CHANNELWISE_METHODS, _first_arg_passthrough)
    put(_BINARY_FUNCTIONS + _BINARY_METHODS + (torch.pow, "pow"), _method("binary"))
    put((torch.cat, torch.concat, torch.concatenate), _method("cat"))
    put((torch.split, torch.chunk, "split", "chunk"), _method("split"))
    put((torch.flatten, torch.reshape, "view", "reshape", "flatten"), _first_arg_reshape)
    put((torch.permute, torch.transpose, "permute", "transpose"), _method("permute"))
    put((torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"), _method("reduce"))
    put((operator.getitem,), _method("getitem"))
    put((F.scaled_dot_product_attention,), _method("sdpa"))
    put((torch.repeat_interleave, "repeat_interleave"), _method("repeat_interleave"))
    put(("expand",), _method("expand"))
    return layouts


def _install_builtin_rules() -> None:
    """Register the built-in rules through the same table users extend."""
    layouts = _builtin_layouts()
    tags: dict[Any, set[str]] = {}
    for tag, keys in _TAGGED.items():
        for k in keys:
            tags.setdefault(k, set()).add(tag)
    slices = {nn.modules.conv._ConvNd: slicing.slice_conv, nn.Linear: slicing.slice_linear,
              nn.Embedding: slicing.slice_embedding,
              nn.modules.batchnorm._BatchNorm: slicing.slice_batch_norm, nn.LayerNorm: slicing.slice_layer_norm,
              nn.RMSNorm: slicing.slice_rms_norm,
              nn.GroupNorm: slicing.slice_group_norm, nn.PReLU: slicing.slice_prelu}
    masked = {nn.LayerNorm: MaskedLayerNorm, nn.RMSNorm: MaskedRMSNorm, nn.GroupNorm: MaskedGroupNorm}
    for key in list(layouts) + [k for k in tags if k not in layouts]:
        register_channel_rule(key, ChannelRule(layout=layouts.get(key), slice=slices.get(key),
                                               tags=frozenset(tags.get(key, ())), masked=masked.get(key)))


_install_builtin_rules()
