"""Side-by-side benchmark of a dense model and its compiled (pruned) counterpart.

``compare(dense, fast, x)`` reports, from one process and one interleaved timing run:

* theoretical speedup = ``flops(dense).total / flops(fast).total`` (:mod:`sparsekern.cost`),
* measured speedup = dense median time / fast median time,
* efficiency = measured / theoretical (1.0 = the FLOP reduction was fully turned into time),

for the whole model and, per layer, for every conv/linear module name present in both models,
timed on the very inputs that layer saw during a forward pass of its own model.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from sparsekern.bench.timing import Timing, environment, hold_freed_memory, set_threads, time_interleaved
from sparsekern.cost import FlopReport, align_columns, flops, is_layer
from sparsekern.modes import eval_mode

__all__ = ["LayerBench", "BenchReport", "compare"]


@dataclass
class LayerBench:
    """One layer timed dense vs fast on its captured inputs (one call each). Times in ms.

    ``theoretical_speedup`` is ``dense_flops / fast_flops`` (FLOPs per call; ``None`` when the
    fast layer counts 0 FLOPs), ``measured_speedup = dense_ms / fast_ms`` (medians),
    ``efficiency = measured / theoretical``. ``*_backend``: the kernel the inference passes chose for the
    layer (``"onednn"`` or ``"direct"``, :mod:`sparsekern.tuning`; empty without passes).
    """

    name: str
    dense_kind: str
    fast_kind: str
    dense_flops: int
    fast_flops: int
    theoretical_speedup: float | None
    measured_speedup: float
    efficiency: float | None
    dense_ms: float
    fast_ms: float
    dense_spread: float
    fast_spread: float
    dense_input_shape: list[int] | None = None
    fast_input_shape: list[int] | None = None
    dense_backend: str = ""
    fast_backend: str = ""


@dataclass
class BenchReport:
    """Result of :func:`compare`. Times in ms, FLOPs with multiply-add = 2.

    Attributes:
        label: free text naming the run (model, plan, ...).
        device: ``"cpu"`` / ``"cuda"``; ``device_name``: CPU model or GPU name.
        dtype: dtype of the (first floating) input, or of the dense model's parameters when no input is floating
            (token ids); ``batch``: the input's dim 0.
        threads: torch intra-op threads used while timing.
        warmup, repeats: untimed interleaved rounds and timed calls per model.
        block: consecutive timed calls per model and turn (each turn after one untimed call when above 1,
            :func:`~sparsekern.bench.timing.time_interleaved`).
        dense_flops, fast_flops: total FLOPs of one forward of each model.
        theoretical_speedup: ``dense_flops / fast_flops``.
        measured_speedup: ``dense.median_ms / fast.median_ms``.
        efficiency: ``measured_speedup / theoretical_speedup``.
        dense, fast: :class:`Timing` of a whole forward of each model.
        layers: per-layer audit (empty when ``per_layer=False``).
        unmatched_layers: dense conv/linear names that had no running counterpart in ``fast``.
        env: :func:`~sparsekern.bench.timing.environment` (hostname-free).
    """

    label: str
    device: str
    device_name: str
    dtype: str
    batch: int | None
    threads: int
    warmup: int
    repeats: int
    dense_flops: int
    fast_flops: int
    theoretical_speedup: float
    measured_speedup: float
    efficiency: float
    dense: Timing
    fast: Timing
    layers: list[LayerBench] = field(default_factory=list)
    unmatched_layers: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    block: int = 1

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict; :meth:`from_dict` inverts it."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BenchReport":
        d = dict(d)
        d["dense"] = Timing.from_dict(d["dense"])
        d["fast"] = Timing.from_dict(d["fast"])
        d["layers"] = [LayerBench(**row) for row in d.get("layers", [])]
        return cls(**d)

    def save_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as indented JSON."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load_json(cls, path: str | os.PathLike[str]) -> "BenchReport":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    # ------------------------------------------------------------------ text
    def table(self) -> str:
        """Header (device, dtype, batch, threads, repeats), then the model line and one line per
        layer, aligned columns."""
        head = (
            f"{self.label or 'compare'}: device={self.device} ({self.device_name}) "
            f"dtype={self.dtype} batch={self.batch} threads={self.threads} "
            f"warmup={self.warmup} repeats={self.repeats}" + (f" block={self.block}" if self.block > 1 else "")
        )
        rows: list[tuple[str, ...]] = [(
            "layer", "kind", "dense MFLOPs", "fast MFLOPs", "theory x", "measured x",
            "efficiency", "dense ms", "fast ms", "spread d/f", "backend d/f",
        )]
        rows.append((
            "<model>", "", _mf(self.dense_flops), _mf(self.fast_flops),
            _x(self.theoretical_speedup), _x(self.measured_speedup), _pct(self.efficiency),
            f"{self.dense.median_ms:.3f}", f"{self.fast.median_ms:.3f}",
            f"{_pct(self.dense.spread)}/{_pct(self.fast.spread)}", "",
        ))
        for lb in self.layers:
            kind = lb.dense_kind if lb.dense_kind == lb.fast_kind else f"{lb.dense_kind}>{lb.fast_kind}"
            rows.append((
                lb.name, kind, _mf(lb.dense_flops), _mf(lb.fast_flops),
                _x(lb.theoretical_speedup), _x(lb.measured_speedup), _pct(lb.efficiency),
                f"{lb.dense_ms:.3f}", f"{lb.fast_ms:.3f}",
                f"{_pct(lb.dense_spread)}/{_pct(lb.fast_spread)}",
                f"{lb.dense_backend or '-'}/{lb.fast_backend or '-'}",
            ))
        if not any(lb.dense_backend or lb.fast_backend for lb in self.layers):
            rows = [row[:-1] for row in rows]
        lines = [head, align_columns(rows, right=tuple(range(2, 10)))]
        if self.unmatched_layers:
            lines.append("not in fast model: " + ", ".join(self.unmatched_layers))
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.table()


# ---------------------------------------------------------------------------- compare
def compare(
    dense: nn.Module,
    fast: nn.Module,
    example_inputs: torch.Tensor | tuple[Any, ...],
    *,
    warmup: int = 10,
    repeats: int = 50,
    per_layer: bool = True,
    threads: int | None = None,
    label: str = "",
    device: str | torch.device | None = None,
    passes: Sequence[str] = (),
    hold_memory: bool = True,
    block: int = 1,
) -> BenchReport:
    """Benchmark ``dense`` against ``fast`` on ``example_inputs``: theoretical vs measured speedup.

    Both models run in eval mode (restored afterwards) under ``torch.inference_mode``, timed
    interleaved by :func:`~sparsekern.bench.timing.time_interleaved` (median of ``repeats``
    rounds after ``warmup``). With ``per_layer``, each conv/linear module name of ``dense`` that
    also runs in ``fast`` is timed the same way on the inputs captured during one forward of
    each model (dense layer on dense activations, fast layer on the fast model's activations).

    Args:
        dense: the reference model (already on ``device``).
        fast: the compiled model (plain module or ``torch.fx.GraphModule``), same qualified names.
        example_inputs: a tensor or tuple of positional inputs; no floating input may be all
            zeros.
        warmup, repeats: untimed interleaved rounds and timed calls (model and each layer).
        per_layer: also run the per-layer audit.
        threads: ``torch.set_num_threads`` during the run (None: leave as is).
        label: free text stored in the report.
        device: where to time; inputs are moved there. Default: the first input tensor's device.
        passes: inference passes (:mod:`sparsekern.passes`, e.g. ``("fold_bn", "onednn")``) applied to
            copies of both models, and of each audited layer, before timing; FLOPs are counted on the
            models as given, so both sides get exactly the same treatment.
        hold_memory: first make the process's allocator keep freed memory
            (:func:`~sparsekern.bench.timing.hold_freed_memory`, process-wide and permanent), so that neither
            model's timing includes page faults that depend on what ran before it; ``False`` times with the
            allocator as it is. The report's environment names the allocator either way.
        block: the models' timed calls per turn (:func:`~sparsekern.bench.timing.time_interleaved`): above 1,
            each model is timed after its own previous calls, as a process serving it runs it, the turns
            alternating between the models; 1 alternates single calls. Layers are timed with 1.

    Raises:
        ValueError: an input is all zeros, or there is no tensor input.
    """
    args, device, dtype, batch = _prepare_inputs(example_inputs, device)
    if hold_memory and device.type == "cpu":
        hold_freed_memory()
    if not any(isinstance(a, torch.Tensor) and a.is_floating_point() for a in args):  # e.g. token ids
        dtype = next((str(p.dtype).replace("torch.", "") for p in dense.parameters() if p.is_floating_point()), dtype)
    with set_threads(threads), eval_mode(dense), eval_mode(fast):
        n_threads = torch.get_num_threads()
        dense_cost = flops(dense, args)
        fast_cost = flops(fast, args)
        if fast_cost.total <= 0:
            raise ValueError("the fast model counts 0 FLOPs (uncounted ops: "
                             f"{sorted(fast_cost.uncounted_ops)}); theoretical speedup undefined")
        run_dense, run_fast = _with_passes(dense, passes, args), _with_passes(fast, passes, args)
        with torch.inference_mode():
            t = time_interleaved(
                {"dense": lambda: run_dense(*args), "fast": lambda: run_fast(*args)},
                warmup=warmup, repeats=repeats, device=device, block=block,
            )
            layers: list[LayerBench] = []
            unmatched: list[str] = []
            if per_layer:
                layers, unmatched = _layer_audit(dense, fast, args, dense_cost, fast_cost, warmup=warmup,
                                                 repeats=repeats, device=device, passes=passes)

    env = environment(device)
    env.update(dtype=dtype, batch=batch, threads=n_threads)
    theory = dense_cost.total / fast_cost.total
    measured = t["dense"].median_ms / t["fast"].median_ms
    return BenchReport(
        label=label, device=device.type, device_name=env["device_name"], dtype=dtype,
        batch=batch, threads=n_threads, warmup=warmup, repeats=repeats,
        dense_flops=dense_cost.total, fast_flops=fast_cost.total,
        theoretical_speedup=theory, measured_speedup=measured, efficiency=measured / theory,
        dense=t["dense"], fast=t["fast"], layers=layers, unmatched_layers=unmatched, env=env, block=block,
    )


def _prepare_inputs(
    example_inputs: torch.Tensor | tuple[Any, ...], device: str | torch.device | None
) -> tuple[tuple[Any, ...], torch.device, str, int | None]:
    """:func:`compare`'s inputs as a tuple moved to ``device``, with that device, the dtype name (of the first
    floating tensor, else the first tensor) and the batch (first dim of the first tensor; None for a scalar).

    Raises ``ValueError`` when there is no tensor input, then when a floating input is all zeros; ``device``
    None means the first tensor's device.
    """
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not tensors:
        raise ValueError("compare needs at least one tensor input")
    check_not_zero(args)
    if device is None:
        device = tensors[0].device
    device = torch.device(device)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    floating = [t for t in tensors if t.is_floating_point()]
    dtype = str((floating or tensors)[0].dtype).replace("torch.", "")
    batch = int(tensors[0].shape[0]) if tensors[0].dim() > 0 else None
    return args, device, dtype, batch


def check_not_zero(args: tuple[Any, ...]) -> None:
    """Reject all-zero floating inputs.

    Timing on zeros is misleading: zero activations let hardware and libraries take shortcuts
    (sparsity-aware paths, no denormals, trivially predictable data) and make every pruned
    channel look free, so the numbers would not hold on real data (docs/design.md#measuring).
    """
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() > 0:
            if not bool(a.detach().ne(0).any()):
                raise ValueError(
                    f"example input {i} is all zeros: benchmarks never run on zeros, because zero "
                    "data lets kernels and hardware take shortcuts that real inputs do not allow; "
                    "use random or real data (e.g. torch.randn)")


# ---------------------------------------------------------------------------- per layer
def _layer_audit(
    dense: nn.Module,
    fast: nn.Module,
    args: tuple[Any, ...],
    dense_cost: FlopReport,
    fast_cost: FlopReport,
    *,
    warmup: int,
    repeats: int,
    device: torch.device,
    passes: Sequence[str] = (),
) -> tuple[list[LayerBench], list[str]]:
    """Time every conv/linear name of ``dense`` that also names a FLOP-counted module of ``fast``,
    on the (args, kwargs) each model passed to it on its first call.

    Returns the rows (dense execution order) and the names that dense ran but fast has no
    counted counterpart for (removed, or replaced by an identity).
    """
    fast_modules = dict(fast.named_modules())

    def counterpart(name: str) -> bool:
        # any module type (swap-in layers need not subclass nn.Conv2d), but it must do counted
        # work: a name now holding an Identity / pool (removed block) is not a counterpart
        m = fast_modules.get(name)
        return m is not None and (is_layer(m) or name in fast_cost.layers)

    dense_layers = [n for n, m in dense.named_modules() if is_layer(m)]
    names = [n for n in dense_layers if counterpart(n)]
    unmatched = [n for n in dense_layers if not counterpart(n)]
    dense_in = _capture_inputs(dense, names, args)
    fast_in = _capture_inputs(fast, names, args)
    unmatched = [n for n in unmatched if n in dense_cost.layers]  # only layers dense ran

    rows = []
    order = [n for n in dense_cost.layers if n in dense_in]  # execution order
    order += [n for n in dense_in if n not in dense_cost.layers]
    for name in order:
        if name not in fast_in:
            unmatched.append(name)
            continue
        (da, dk), (fa, fk) = dense_in[name], fast_in[name]
        dm = _layer_with_passes(dense.get_submodule(name), passes, da)
        fm = _layer_with_passes(fast_modules[name], passes, fa)
        t = time_interleaved(
            {"dense": lambda: dm(*da, **dk), "fast": lambda: fm(*fa, **fk)},
            warmup=warmup, repeats=repeats, device=device,
        )
        dflops, dkind = _per_call(dense_cost, name, dm)
        fflops, fkind = _per_call(fast_cost, name, fm)
        theory = dflops / fflops if fflops > 0 else None
        measured = t["dense"].median_ms / t["fast"].median_ms
        rows.append(LayerBench(
            name=name, dense_kind=dkind, fast_kind=fkind, dense_flops=dflops, fast_flops=fflops,
            theoretical_speedup=theory, measured_speedup=measured,
            efficiency=measured / theory if theory else None,
            dense_ms=t["dense"].median_ms, fast_ms=t["fast"].median_ms,
            dense_spread=t["dense"].spread, fast_spread=t["fast"].spread,
            dense_input_shape=_shape(da), fast_input_shape=_shape(fa),
            dense_backend=_backend(dm), fast_backend=_backend(fm),
        ))
    return rows, unmatched


def _layer_with_passes(layer: nn.Module, passes: Sequence[str], args: tuple[Any, ...]) -> nn.Module:
    """One layer after ``passes``, held in a container so that the passes see it as the module call they
    rewrite in a whole model (traced alone, its forward would be inlined into plain functional calls)."""
    return _with_passes(nn.Sequential(layer), passes, args) if passes else layer


def _backend(layer: nn.Module) -> str:
    """The kernel the passes chose for a single layer (:func:`_layer_with_passes`), or ``""``."""
    return ",".join(sorted(set(getattr(layer, "sk_backends", {}).values())))


def _with_passes(model: nn.Module, passes: Sequence[str], args: tuple[Any, ...]) -> nn.Module:
    """A copy of ``model`` after ``passes``, specialised to ``args`` where a pass needs shapes (the model
    itself when there are no passes)."""
    if not passes:
        return model
    from sparsekern.passes import apply

    with torch.no_grad():
        return apply(copy.deepcopy(model), passes, args)


def _per_call(cost: FlopReport, name: str, module: nn.Module) -> tuple[int, str]:
    """FLOPs of one call of layer ``name`` (its total over calls / calls) and its kind."""
    lc = cost.layers.get(name)
    if lc is None:
        return 0, type(module).__name__
    return lc.flops // max(lc.calls, 1), lc.kind


def _capture_inputs(
    model: nn.Module, names: list[str], args: tuple[Any, ...]
) -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """Run one forward, keeping each named module's first-call (args, kwargs)."""
    captured: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    handles = []
    modules = dict(model.named_modules())

    def make(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, a: tuple, k: dict) -> None:
            captured.setdefault(name, (a, dict(k)))
        return hook

    try:
        for n in names:
            if n in modules:
                handles.append(modules[n].register_forward_pre_hook(make(n), with_kwargs=True))
        model(*args)
    finally:
        for h in handles:
            h.remove()
    return captured


# ---------------------------------------------------------------------------- formatting
def _shape(a: tuple[Any, ...]) -> list[int] | None:
    for x in a:
        if isinstance(x, torch.Tensor):
            return list(x.shape)
    return None


def _mf(n: int) -> str:
    return f"{n / 1e6:.3f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"
