"""Per-layer kernel choice by measurement: for each layer of a model and its actual input shape, which kernel
runs it.

Neither kernel wins everywhere on a CPU. For a convolution (:class:`ConvCall`), oneDNN's kernels vectorise over
channels and run wide layers near peak, while sparsekern's direct convolution
(:func:`sparsekern.ops.fused_conv2d`) vectorises over output pixels and keeps the SIMD lanes of narrow layers
busy. For a linear or low-rank layer (:class:`LinearCall`), oneDNN's prepacked matmuls against torch's BLAS call
or sparsekern's fused low-rank kernel (:func:`sparsekern.ops.lowrank_linear`). For an attention
(:class:`AttentionCall`), torch's ``scaled_dot_product_attention`` against :func:`sparsekern.ops.attention`. For a
calibrated dynamic model (:class:`GuardedModelCall`), its static part against its per-sample model.
Which is faster depends on the
shapes, the epilogue, the layout, the threads and the CPU's vendor, so the choice is made by timing the
candidates on the layer's own shapes, once per call (like ``torch.backends.cudnn.benchmark``), and remembered.

A :class:`Tuner` holds the timings: a call found in its ``table`` is decided from the table (so a choice is
deterministic given the table, and a table can be saved and reused), a new call is timed when ``measure`` is on
and otherwise gets ``fallback``. The ``onednn``, ``onednn_linear`` and ``attention`` inference passes
(:mod:`sparsekern.passes`) ask :func:`current_tuner`; :func:`use_tuner` replaces it for a block of code. Dense
and pruned models get the same treatment, so a kernel that also speeds up dense layers does not inflate a pruned
model's efficiency.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Iterator, Mapping, Union

import torch

__all__ = ["AttentionCall", "Call", "ConvCall", "GuardedModelCall", "LinearCall", "Tuner", "current_tuner",
           "use_tuner"]


class _Keyed:
    """``key()``: a call's string form for JSON tables, ``kind|field=value|...``."""

    kind: ClassVar[str]

    def key(self) -> str:
        return self.kind + "|" + "|".join(f"{k}={v}" for k, v in asdict(self).items())  # type: ignore[call-overload]


@dataclass(frozen=True)
class ConvCall(_Keyed):
    """What decides which kernel runs a convolution fastest. Shapes as in ``F.conv2d``; ``threads`` is
    torch's intra-op thread count when the call runs."""

    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    bias: bool
    residual: bool
    relu: bool
    channels_last: bool
    threads: int

    kind: ClassVar[str] = "conv"


@dataclass(frozen=True)
class LinearCall(_Keyed):
    """What decides which kernel runs a linear or low-rank layer fastest: the input shape (..., in), the weight
    shapes ((out, in) for a dense layer; (r, in) and (out, r) for a low-rank one), the bias, the fused epilogue
    (``"none"``, ``"relu"``, ``"gelu"``, ``"gelu_tanh"`` or ``"add"``), torch's intra-op thread count and the
    prologue (``"none"``; ``"layer_norm"``: whether to fold the LayerNorm before the layer into its (first) matmul,
    timed on that matmul alone)."""

    input_shape: tuple[int, ...]
    weight_shapes: tuple[tuple[int, ...], ...]
    bias: bool
    epilogue: str
    threads: int
    prologue: str = "none"

    kind: ClassVar[str] = "linear"


@dataclass(frozen=True)
class AttentionCall(_Keyed):
    """What decides which kernel runs an attention fastest: the q (B, H, T_q, E), k (B, H, T_k, E) and
    v (B, H, T_k, E_v) shapes, the causal mask and torch's intra-op thread count."""

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    causal: bool
    threads: int

    kind: ClassVar[str] = "attention"


@dataclass(frozen=True)
class GuardedModelCall(_Keyed):
    """What decides whether a calibrated dynamic model (:class:`sparsekern.hybrid.GuardedModel`) runs its static
    part or its per-sample model: the model (a digest of its plan), its input shapes and torch's intra-op thread
    count."""

    plan_digest: str
    input_shapes: tuple[tuple[int, ...], ...]
    threads: int

    kind: ClassVar[str] = "guarded"


#: A call a :class:`Tuner` decides.
Call = Union[ConvCall, LinearCall, AttentionCall, GuardedModelCall]


class Tuner:
    """Decides, per call (:class:`ConvCall`, :class:`LinearCall`, ...), which of the candidate kernels runs it
    (module docstring).

    Args:
        table: known timings, ``{call: {backend: seconds}}``; new measurements are added to it.
        measure: time a call the table does not have (else answer ``fallback``).
        fallback: the answer for an unknown call when not measuring (``"onednn"``, the candidate every pass
            offers; the first candidate where it is not one).
        warmup, repeats: untimed and timed interleaved runs of each candidate; the median decides.
    """

    def __init__(self, table: Mapping[Call, Mapping[str, float]] | None = None, *, measure: bool = True,
                 fallback: str = "onednn", warmup: int = 3, repeats: int = 15) -> None:
        if not isinstance(fallback, str) or not fallback:
            raise ValueError(f"Tuner: fallback must name a backend, got {fallback!r}")
        self.table: dict[Call, dict[str, float]] = {k: dict(v) for k, v in (table or {}).items()}
        self.measure = measure
        self.fallback = fallback
        self.warmup = warmup
        self.repeats = repeats

    def choose(self, call: Call, candidates: Mapping[str, Callable[[], Any]]) -> str:
        """The backend for ``call`` among ``candidates`` (name -> a function running it once on the call's
        shapes; with one candidate, that one). Ties go to the first candidate."""
        if len(candidates) == 1:
            return next(iter(candidates))
        known = self.table.get(call, {})
        if not all(name in known for name in candidates):
            if not self.measure:
                return self.fallback if self.fallback in candidates else next(iter(candidates))
            known = self.table.setdefault(call, {})
            known.update(self._time(candidates))
        return min(candidates, key=lambda name: known[name])

    def _time(self, candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
        """Median seconds of each candidate, timed interleaved after ``warmup`` rounds
        (:func:`sparsekern.bench.timing.time_interleaved`)."""
        from sparsekern.bench.timing import time_interleaved

        with torch.inference_mode():
            timings = time_interleaved(dict(candidates), warmup=self.warmup, repeats=self.repeats)
        return {name: t.median_ms / 1e3 for name, t in timings.items()}

    def to_dict(self) -> dict[str, dict[str, float]]:
        """The table as JSON: ``{call.key(): {backend: seconds}}``."""
        return {call.key(): dict(times) for call, times in self.table.items()}


_CURRENT: list[Tuner] = [Tuner()]


def current_tuner() -> Tuner:
    """The tuner the inference passes use (a measuring one, shared by the process, unless replaced)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use_tuner(tuner: Tuner) -> Iterator[Tuner]:
    """Make ``tuner`` the :func:`current_tuner` inside the block."""
    _CURRENT.append(tuner)
    try:
        yield tuner
    finally:
        _CURRENT.remove(tuner)
