"""Cost model: theoretical FLOPs, parameters and bytes moved, per layer.

``sk.flops(model, example_inputs)`` runs one forward pass under a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` and counts every aten op that
:class:`torch.utils.flop_counter.FlopCounterMode` counts, with *the same formulas* (it reads
torch's own ``flop_registry``), so that ``flops(model, x).total`` equals
``FlopCounterMode().get_total_flops()`` for the same forward. Conventions (torch's):

* FLOPs count a multiply-add as 2 FLOPs; biases, activations and normalisations count 0.
* convolution: ``2 * N * C_out * prod(out_spatial) * (C_in / groups) * prod(kernel)``;
  transposed convolution: ``2 * N * C_in * prod(in_spatial) * (C_out / groups) * prod(kernel)``.
* ``mm`` / ``addmm`` / ``bmm`` / ``baddbmm`` (hence ``linear`` and ``matmul``): ``2 * m * n * k``
  (times the batch for ``bmm``).
* fused attention (``scaled_dot_product_attention``'s forward kernels, CPU and GPU): ``2 (E + E_v)`` per
  (query, key) pair the kernel computes, per batch and head, where E and E_v are the query/key and value
  head dims; with ``is_causal`` only the pairs the mask keeps (query i sees keys 0..i) count, the work a
  causal kernel does. torch counts every pair on GPU and has no formula for the CPU kernel, so
  ``flops(...).total`` differs from ``FlopCounterMode`` for causal or CPU attention; every other op is
  counted as torch counts it.

Attribution ("layers"): each counted op is charged to the innermost module whose ``forward`` is
running, keyed by its qualified name (``""`` is the root). Every ``nn.Conv{1,2,3}d``,
``nn.ConvTranspose{1,2,3}d`` and ``nn.Linear`` that runs gets an entry; any other module gets an
entry only when FLOP-counted ops run directly in its own ``forward`` (e.g. a ``torch.matmul`` in an
attention block). For a :class:`torch.fx.GraphModule`, ``call_function`` / ``call_method`` nodes
are charged to the original module recorded in the node's ``nn_module_stack`` (what
``symbolic_trace`` stores), so a traced model reports the same names as the eager one. A module
called twice accumulates both calls (``LayerCost.calls == 2``). A module registered under two
names is charged to the first name ``named_modules()`` gives.

Bytes moved (``LayerCost.bytes``): for every FLOP-counted op, the logical size of all its tensor
operands (weights, bias and input activations read) plus its outputs (written), each at its own
dtype size (``numel * element_size``). It is a lower bound on memory traffic assuming every
operand is touched exactly once (no re-reads, no cache effects); ops that count 0 FLOPs (ReLU,
BN, adds) are not included.

Parameters: ``LayerCost.params`` counts the parameters owned directly by that module
(``recurse=False``; for a conv/linear layer that is weight + bias). ``FlopReport.params`` is the
number of unique parameters of the whole model (including BN and other uncounted layers).

Custom ops (``torch.ops.sparsekern.*``) are counted if they have a formula registered with
:func:`torch.utils.flop_counter.register_flop_formula` (then ``FlopCounterMode`` agrees too).
Non-aten ops that ran without a formula are listed in ``FlopReport.uncounted_ops`` so that a kernel
silently counted as 0 FLOPs is visible. Higher-order ops (``torch.cond`` and friends) are not
supported in the counted forward. ``sparsekern::channel_skip_conv2d`` has a formula (registered
here): ``2 k^2 H_out W_out |active in| |active out|`` summed over the samples, read from the masks it
was called with, so a compiled dynamic model counts only the work its kernels do.

Per-sample accounting (dynamic models, docs/design.md#dynamic-plans). When the forward contains per-sample
work, ``FlopReport.per_sample`` and every ``LayerCost.per_sample`` hold the FLOPs of each sample of
the batch (a :class:`SampleFlops`: a list of ints with ``mean``, ``min``, ``max``, ``std`` and
``tensor()``); otherwise they are ``None``. Two sources:

* ops with a per-sample formula (``channel_skip_conv2d``: the formula above, per sample);
* modules that define ``sk_flops_per_sample(args, kwargs, output) -> Tensor (B,)``: the FLOPs each
  sample of that call needs when the channels it masks off are skipped (the dense masked reference
  layers of :mod:`sparsekern.dynamic`, and SANP's training form, which compute densely). The ops run
  inside such a module still count in ``total`` (they ran), but its per-sample cost is the declared
  one, charged to the module's own name.

Every other counted op costs each sample ``flops / batch``. ``sum(per_sample)`` is the cost of the batch
with every per-sample skip taken (:attr:`FlopReport.skipped_total`); for a compiled dynamic model it
equals ``total`` (up to rounding of the even shares).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils import flop_counter as _fc
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sparsekern.modes import eval_mode, preserve_buffers
from sparsekern.utils import as_tuple

__all__ = [
    "LayerCost",
    "FlopReport",
    "SampleFlops",
    "flops",
    "theoretical_speedup",
    "attention_flops",
    "roofline_seconds",
    "linear_bytes",
    "lowrank_bytes",
    "LAYER_TYPES",
    "is_layer",
]

#: Module types that always get their own entry in a :class:`FlopReport`.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)

# Queries that FlopCounterMode refuses to see; we skip them the same way.
_SKIPPED_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in (
        "is_contiguous",
        "is_strides_like_format",
        "is_non_overlapping_and_dense",
        "size",
        "sym_size",
        "stride",
        "sym_stride",
        "storage_offset",
        "sym_storage_offset",
        "numel",
        "sym_numel",
        "dim",
    )
    if hasattr(torch.ops.aten, name)
)


def is_layer(module: nn.Module) -> bool:
    """True for conv / transposed conv / linear modules (the layers a report always lists)."""
    return isinstance(module, LAYER_TYPES)


Shape = tuple[int, ...]


class SampleFlops(list):
    """FLOPs of each sample of a batch (a plain list of ints, JSON-friendly), with summary statistics."""

    def tensor(self) -> torch.Tensor:
        """The values as an int64 tensor of shape (B,)."""
        return torch.tensor(list(self), dtype=torch.int64)

    @property
    def mean(self) -> float:
        return float(sum(self)) / len(self) if self else 0.0

    @property
    def min(self) -> int:
        return min(self) if self else 0

    @property
    def max(self) -> int:
        return max(self) if self else 0

    @property
    def std(self) -> float:
        """Population standard deviation over the batch."""
        if not self:
            return 0.0
        mu = self.mean
        return (sum((v - mu) ** 2 for v in self) / len(self)) ** 0.5


@dataclass
class LayerCost:
    """Cost of one layer (one module name), summed over all its calls in the forward.

    Attributes:
        kind: module class name (e.g. ``"Conv2d"``) for leaf/conv/linear modules; for other modules
            the aten ops charged to them, e.g. ``"bmm+mm"``.
        flops: FLOPs (multiply-add = 2), all calls together.
        params: parameters owned directly by the module (count, not bytes).
        bytes: bytes moved by its FLOP-counted ops (operands read + outputs written), all calls.
        input_shape: shape of the first tensor input on the first call.
        output_shape: shape of the first tensor output on the first call.
        calls: forward calls of the module; for a name that was not called as a module (an fx
            node scope, the root of a traced GraphModule) the number of counted ops charged to it.
        per_sample: FLOPs of each sample of the batch in this layer when per-sample skips are taken
            (see the module docstring); ``None`` for static models (every sample costs
            ``flops / batch``).
    """

    kind: str
    flops: int
    params: int
    bytes: int
    input_shape: Shape | None
    output_shape: Shape | None
    calls: int = 0
    per_sample: SampleFlops | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerCost":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        d = dict(d)
        for key in ("input_shape", "output_shape"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        if d.get("per_sample") is not None:
            d["per_sample"] = SampleFlops(d["per_sample"])
        return cls(**d)


@dataclass
class FlopReport:
    """Theoretical cost of one forward pass of a model on given inputs.

    Attributes:
        total: total FLOPs (multiply-add = 2); equals ``FlopCounterMode``'s total.
        params: unique parameters of the whole model (count).
        bytes: sum of ``LayerCost.bytes`` over layers (bytes).
        layers: qualified module name -> :class:`LayerCost`, in execution order.
        batch: size of dim 0 of the first input tensor (``None`` for 0-d inputs).
        uncounted_ops: non-aten ops that ran without a FLOP formula -> number of calls.
        per_sample: total FLOPs of each sample of the batch when per-sample skips are taken
            (a :class:`SampleFlops`; see the module docstring). ``None`` for static models.
    """

    total: int
    params: int
    bytes: int
    layers: dict[str, LayerCost] = field(default_factory=dict)
    batch: int | None = None
    uncounted_ops: dict[str, int] = field(default_factory=dict)
    per_sample: SampleFlops | None = None

    @property
    def skipped_total(self) -> int:
        """FLOPs of the batch with every per-sample skip taken: ``sum(per_sample)``, else ``total``."""
        return int(sum(self.per_sample)) if self.per_sample is not None else self.total

    # ----------------------------------------------------------------- views
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict (shapes as lists); :meth:`from_dict` inverts it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlopReport":
        """Rebuild a report from :meth:`to_dict` output (possibly after ``json`` round trip)."""
        d = dict(d)
        d["layers"] = {k: LayerCost.from_dict(v) for k, v in d.get("layers", {}).items()}
        if d.get("per_sample") is not None:
            d["per_sample"] = SampleFlops(d["per_sample"])
        return cls(**d)

    def table(self, top: int | None = None) -> str:
        """Aligned text table of layers, most FLOPs first; ``top`` keeps the first ``top`` rows."""
        rows = sorted(self.layers.items(), key=lambda kv: kv[1].flops, reverse=True)
        if top is not None:
            rows = rows[:top]
        header = ("layer", "kind", "MFLOPs", "%", "params", "MB moved", "input", "output")
        lines = [header]
        for name, lc in rows:
            share = 100.0 * lc.flops / self.total if self.total else 0.0
            lines.append((
                name or "<root>",
                lc.kind + (f" x{lc.calls}" if lc.calls > 1 else ""),
                f"{lc.flops / 1e6:.3f}",
                f"{share:.1f}",
                str(lc.params),
                f"{lc.bytes / 1e6:.3f}",
                _fmt_shape(lc.input_shape),
                _fmt_shape(lc.output_shape),
            ))
        lines.append((
            "total", "", f"{self.total / 1e6:.3f}", "100.0" if self.total else "0.0",
            str(self.params), f"{self.bytes / 1e6:.3f}", "", "",
        ))
        text = align_columns(lines, right=(2, 3, 4, 5))
        if self.uncounted_ops:
            text += "\nuncounted ops (no FLOP formula): " + ", ".join(sorted(self.uncounted_ops))
        return text

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.table()


def theoretical_speedup(dense: FlopReport, pruned: FlopReport) -> float:
    """``dense.total / pruned.skipped_total``: the speedup a perfect implementation would reach (for a
    dynamic model, averaged over the batch; ``skipped_total`` is ``total`` for static models)."""
    if pruned.skipped_total <= 0:
        raise ValueError("pruned model counts 0 FLOPs; theoretical speedup is undefined")
    return dense.total / pruned.skipped_total


def roofline_seconds(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """The roofline time (Williams, Waterman and Patterson, CACM 2009) of work that does ``flops`` FLOPs and moves
    ``nbytes`` bytes to or from memory on a machine with ``peak_flops`` FLOP/s and ``bandwidth`` bytes/s: the
    larger of the compute time and the memory time (s)."""
    return max(flops / peak_flops, nbytes / bandwidth)


def linear_bytes(tokens: int, n_in: int, n_out: int, element_size: int = 4) -> int:
    """Bytes a dense linear layer must move at least: x (tokens, in) read, W (out, in) and bias read, y written."""
    return element_size * (tokens * (n_in + n_out) + n_in * n_out + n_out)


def lowrank_bytes(tokens: int, n_in: int, n_out: int, rank: int, element_size: int = 4) -> int:
    """Bytes a low-rank layer ``x Q^T P^T + bias`` must move at least when its rank-r intermediate stays on chip:
    x read, Q (r, in), P (out, r) and bias read, y written."""
    return element_size * (tokens * (n_in + n_out) + rank * (n_in + n_out) + n_out)


# --------------------------------------------------------------------------- counting
class _LayerAcc:
    """Mutable accumulator for one layer while counting."""

    __slots__ = ("kind", "ops", "flops", "bytes", "params", "n_ops", "in_shape", "out_shape", "sample")

    def __init__(self, kind: str | None, params: int) -> None:
        self.kind = kind
        self.ops: set[str] = set()
        self.flops = 0
        self.bytes = 0
        self.params = params
        self.n_ops = 0  # counted ops charged here
        self.in_shape: Shape | None = None  # of the first counted op
        self.out_shape: Shape | None = None
        self.sample: torch.Tensor | float = 0.0  # per-sample FLOPs (float64 (B,)) or an even share

    def add_sample(self, value: torch.Tensor | float) -> None:
        self.sample = self.sample + value

    def finish(self, calls: int | None, in_shape: Shape | None, out_shape: Shape | None) -> LayerCost:
        """Module entries pass their call count and first-call shapes; others use the ops'."""
        kind = self.kind if self.kind is not None else "+".join(sorted(self.ops)) or "?"
        if calls is None:
            calls, in_shape, out_shape = self.n_ops, self.in_shape, self.out_shape
        return LayerCost(kind, self.flops, self.params, self.bytes, in_shape, out_shape, calls)

    def per_sample(self, batch: int) -> SampleFlops:
        v = self.sample if isinstance(self.sample, torch.Tensor) else torch.full((batch,), float(self.sample),
                                                                                 dtype=torch.float64)
        return SampleFlops(int(round(float(x))) for x in v.tolist())


class _Counter:
    """Module-name stack + per-layer accumulators, shared by the hooks and the dispatch mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stack: list[str] = [""]
        self.node_scope: str | None = None  # fx: module name of the node being interpreted
        self.layers: dict[str, _LayerAcc] = {}
        self.uncounted: dict[str, int] = {}
        self.registry = _fc.flop_registry  # live: picks up register_flop_formula additions
        self.modules: dict[str, nn.Module] = dict(model.named_modules())
        self.mod_calls: dict[str, int] = {}  # forward calls seen by the hooks
        self.mod_in: dict[str, Shape | None] = {}  # first-call input / output shapes
        self.mod_out: dict[str, Shape | None] = {}
        self.batch: int | None = None  # per-sample accounting needs a batch dimension
        self.covered = 0  # depth of modules declaring their own per-sample cost
        self.dynamic = False  # a per-sample formula or a module's declared per-sample cost ran

    # -- attribution
    def current(self) -> str:
        top = self.stack[-1]
        if top == "" and self.node_scope is not None:
            return self.node_scope
        return top

    def acc(self, name: str) -> _LayerAcc:
        if name not in self.layers:
            mod = self.modules.get(name)
            kind = None
            params = 0
            if mod is not None:
                params = sum(p.numel() for p in mod.parameters(recurse=False))
                if (is_layer(mod) or not any(True for _ in mod.children())
                        or hasattr(mod, "sk_flops_per_sample")):
                    kind = type(mod).__name__
            self.layers[name] = _LayerAcc(kind, params)
        return self.layers[name]

    # -- op counting (called by the dispatch mode)
    def count(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        packet = func._overloadpacket
        formula = _attention_formula(func) if packet in _ATTENTION_OPS else self.registry.get(packet)
        if formula is None:
            ns = getattr(func, "namespace", "aten")
            if ns not in ("aten", "prim", "prims"):
                key = str(packet)
                self.uncounted[key] = self.uncounted.get(key, 0) + 1
            return
        n = int(formula(*args, **kwargs, out_val=out))
        acc = self.acc(self.current())
        acc.flops += n
        acc.ops.add(packet.__name__)
        acc.bytes += _nbytes(args) + _nbytes(kwargs) + _nbytes(out)
        if acc.n_ops == 0:
            acc.in_shape = _first_activation_shape(packet.__name__, args)
            acc.out_shape = _first_shape(out)
        acc.n_ops += 1
        if self.batch and not self.covered:
            formula = _PER_SAMPLE.get(packet)
            if formula is None:
                acc.add_sample(n / self.batch)
            else:
                acc.add_sample(self.checked_samples(formula(*args, **kwargs, out_val=out), str(packet)))

    def checked_samples(self, value: torch.Tensor, what: str) -> torch.Tensor:
        value = torch.as_tensor(value).detach().to("cpu", torch.float64).reshape(-1)
        if value.numel() != self.batch:
            raise ValueError(f"per-sample FLOPs of {what} have {value.numel()} entries for a batch of {self.batch}")
        self.dynamic = True
        return value

    def report_layers(self) -> dict[str, LayerCost]:
        out = {}
        for name, acc in self.layers.items():
            if name in self.mod_calls:
                out[name] = acc.finish(self.mod_calls[name], self.mod_in.get(name),
                                       self.mod_out.get(name))
            else:
                out[name] = acc.finish(None, None, None)
            if self.dynamic:
                out[name].per_sample = acc.per_sample(self.batch)
        return out


class _CountingMode(TorchDispatchMode):
    """Dispatch mode that mirrors FlopCounterMode's decomposition rule and counts into a counter."""

    def __init__(self, counter: _Counter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _SKIPPED_OPS or func is torch.ops.prim.layout.default:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            return NotImplemented
        if func._overloadpacket not in self.counter.registry and func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        self.counter.count(func, args, kwargs, out)
        return out


class _ScopedInterpreter(fx.Interpreter):
    """Runs a GraphModule node by node, telling the counter which original module each
    ``call_function`` / ``call_method`` node came from (``nn_module_stack``)."""

    def __init__(self, gm: fx.GraphModule, counter: _Counter) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        scope = None
        if n.op in ("call_function", "call_method"):
            stack = n.meta.get("nn_module_stack")
            if stack:
                scope = _strip_prefix(next(reversed(stack.values()))[0])
        self.counter.node_scope = scope
        try:
            return super().run_node(n)
        finally:
            self.counter.node_scope = None


def _strip_prefix(path: str) -> str:
    # nn_module_stack paths can look like "L['self'].layer1" after dynamo; symbolic_trace gives
    # plain qualified names.
    return path.split("'self'].", 1)[-1] if "'self']" in path else path


@contextmanager
def _module_hooks(model: nn.Module, counter: _Counter) -> Iterator[None]:
    """Push/pop module names around every submodule's forward; record first-call shapes."""
    handles = []

    def pre(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            counter.stack.append(name)
            counter.mod_calls[name] = counter.mod_calls.get(name, 0) + 1
            if name not in counter.mod_in:
                counter.mod_in[name] = _first_shape((args, kwargs))
            if is_layer(mod) or hasattr(mod, "sk_flops_per_sample"):
                counter.acc(name)  # conv/linear always get an entry, in execution order
            if hasattr(mod, "sk_flops_per_sample"):
                counter.covered += 1
        return hook

    def post(name: str) -> Callable:
        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if counter.stack and counter.stack[-1] == name:
                counter.stack.pop()
            if counter.mod_out.get(name) is None:
                counter.mod_out[name] = _first_shape(out)
            if hasattr(mod, "sk_flops_per_sample"):
                counter.covered -= 1
                if counter.batch and not counter.covered:
                    value = mod.sk_flops_per_sample(args, kwargs, out)
                    counter.acc(name).add_sample(counter.checked_samples(value, name or "<root>"))
        return hook

    try:
        for name, mod in counter.modules.items():
            handles.append(mod.register_forward_pre_hook(pre(name), with_kwargs=True))
            handles.append(mod.register_forward_hook(post(name), with_kwargs=True, always_call=True))
        yield
    finally:
        for h in handles:
            h.remove()


def eval_flops(model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...]) -> "FlopReport":
    """:func:`flops` with ``model`` in eval mode (inference costs), every module's train flag restored."""
    with eval_mode(model):
        return flops(model, example_inputs)


def flops(model: nn.Module, example_inputs: torch.Tensor | tuple[Any, ...]) -> FlopReport:
    """Count theoretical FLOPs, parameters and bytes moved of ``model(*example_inputs)``.

    Args:
        model: a plain ``nn.Module`` or a ``torch.fx.GraphModule``. It runs once, under
            ``torch.no_grad()``, in its *current* train/eval mode (callers wanting inference
            costs put it in eval mode). Buffers changed by that pass are restored.
        example_inputs: a tensor or a tuple of positional inputs.

    Returns:
        A :class:`FlopReport`; ``total`` equals ``FlopCounterMode``'s count of the same forward.
        ``per_sample`` is filled when the forward has per-sample work (see the module docstring).
    """
    args = as_tuple(example_inputs)
    counter = _Counter(model)
    first = _first_shape(args)
    counter.batch = first[0] if first else None
    buffers = preserve_buffers(model) if model.training else nullcontext()  # BN stats of a train-mode pass
    with torch.no_grad(), buffers, _module_hooks(model, counter), _CountingMode(counter):
        if isinstance(model, fx.GraphModule):
            _ScopedInterpreter(model, counter).run(*args)
        else:
            model(*args)
    layers = counter.report_layers()
    total = sum(lc.flops for lc in layers.values())
    seen: set[int] = set()
    n_params = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n_params += p.numel()
    per_sample = None
    if counter.dynamic:
        per_sample = SampleFlops(
            int(sum(lc.per_sample[b] for lc in layers.values())) for b in range(counter.batch))
    return FlopReport(
        total=total,
        params=n_params,
        bytes=sum(lc.bytes for lc in layers.values()),
        layers=layers,
        batch=counter.batch,
        uncounted_ops=dict(counter.uncounted),
        per_sample=per_sample,
    )


# --------------------------------------------------------------------------- sparsekern ops
#: op packet -> per-sample formula ``f(*args, out_val=out, **kwargs) -> Tensor (B,)``.
_PER_SAMPLE: dict[Any, Callable[..., torch.Tensor]] = {}


def _channel_skip_per_sample(x: torch.Tensor, weight: torch.Tensor, bias: Any, in_mask: torch.Tensor | None,
                             out_mask: torch.Tensor | None, *rest: Any, out_val: torch.Tensor,
                             **kwargs: Any) -> torch.Tensor:
    """``2 k^2 H_out W_out |active in| |active out|`` for each sample (B,), int64."""
    b = x.shape[0]
    c_out, c_in, kh, kw = weight.shape
    full = lambda c: torch.full((b,), c, dtype=torch.int64)  # noqa: E731
    cin = full(c_in) if in_mask is None else in_mask.detach().to("cpu").sum(1)
    cout = full(c_out) if out_mask is None else out_mask.detach().to("cpu").sum(1)
    return 2 * kh * kw * out_val.shape[-2] * out_val.shape[-1] * cin * cout


def _channel_skip_flops(*args: Any, out_val: torch.Tensor, **kwargs: Any) -> int:
    return int(_channel_skip_per_sample(*args, out_val=out_val, **kwargs).sum())


def _register_sparsekern_ops() -> None:
    """Give sparsekern's channel-skipping conv its FLOP formula (total and per sample)."""
    import sparsekern.ops.channel_skip_conv2d  # noqa: F401 (defines torch.ops.sparsekern.channel_skip_conv2d)

    packet = torch.ops.sparsekern.channel_skip_conv2d
    if packet not in _fc.flop_registry:
        _fc.register_flop_formula(packet, get_raw=True)(_channel_skip_flops)
    _PER_SAMPLE[packet] = _channel_skip_per_sample


_register_sparsekern_ops()


# --------------------------------------------------------------------------- attention
#: The forward kernels of ``torch.nn.functional.scaled_dot_product_attention``.
_ATTENTION_OPS = frozenset(getattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(torch.ops.aten, name))


def attention_flops(q_shape: Shape, k_shape: Shape, v_shape: Shape, causal: bool) -> int:
    """FLOPs of ``softmax(q k^T) v`` for q (..., Tq, E), k (..., Tk, E), v (..., Tk, E_v): ``2 (E + E_v)`` per
    (query, key) pair, per leading index (batch x heads); with ``causal`` (top-left aligned, torch's
    ``is_causal``) only the pairs i >= j count."""
    *lead, t_q, e = q_shape
    t_k, e_v = k_shape[-2], v_shape[-1]
    if causal:
        full = min(t_q, t_k)  # rows 0..full-1 see i + 1 keys, the rest all t_k
        pairs = full * (full + 1) // 2 + (t_q - full) * t_k
    else:
        pairs = t_q * t_k
    n = 1
    for d in lead:
        n *= int(d)
    return 2 * n * pairs * (int(e) + int(e_v))


def _attention_formula(func: Any) -> Callable[..., int]:
    names = [a.name for a in func._schema.arguments]

    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        bound = {**dict(zip(names, args)), **kwargs}
        return attention_flops(bound["query"].shape, bound["key"].shape, bound["value"].shape,
                               bool(bound.get("is_causal", False)))

    return formula


# --------------------------------------------------------------------------- helpers
def _tensors(obj: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _nbytes(obj: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(obj))


def _first_shape(obj: Any) -> Shape | None:
    ts = _tensors(obj)
    return tuple(ts[0].shape) if ts else None


def _first_activation_shape(op: str, args: tuple) -> Shape | None:
    """Activation operand of a counted op: addmm/baddbmm have the bias first."""
    ts = _tensors(args)
    if op in ("addmm", "baddbmm") and len(ts) > 1:
        return tuple(ts[1].shape)
    return tuple(ts[0].shape) if ts else None


def _fmt_shape(shape: Shape | None) -> str:
    return "-" if shape is None else "x".join(str(s) for s in shape)


def align_columns(rows: list[tuple[str, ...]], right: tuple[int, ...] = ()) -> str:
    """``rows`` of strings as a text table, columns padded to their widest cell; the columns in ``right`` are
    right-aligned, the others left-aligned. One line per row."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
