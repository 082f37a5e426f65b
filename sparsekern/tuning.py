"""Per-layer kernel choice by measurement: for each convolution of a model and its actual input shape, which of
oneDNN's prepacked call and sparsekern's direct convolution (:func:`sparsekern.ops.fused_conv2d`) runs it.

Neither wins everywhere on a CPU: oneDNN's kernels vectorise over channels and run wide layers near peak, while
the direct convolution vectorises over output pixels and keeps the SIMD lanes of narrow layers busy. Which is
faster depends on the channel counts, the map size, the batch, the epilogue, the layout and the threads, so the
choice is made by timing both on the layer's own shapes, once per :class:`ConvCall` (like
``torch.backends.cudnn.benchmark``), and remembered.

A :class:`ConvTuner` holds the timings: a call found in its ``table`` is decided from the table (so a choice is
deterministic given the table, and a table can be saved and reused), a new call is timed when ``measure`` is on
and otherwise gets ``fallback``. The ``onednn`` inference pass (:mod:`sparsekern.passes`) asks
:func:`current_tuner`; :func:`use_tuner` replaces it for a block of code. Dense and pruned models get the same
treatment, so a kernel that also speeds up dense layers does not inflate a pruned model's efficiency.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping

import torch

__all__ = ["ConvCall", "ConvTuner", "BACKENDS", "current_tuner", "use_tuner"]

#: The choices for a convolution: oneDNN's prepacked call, or the direct convolution.
BACKENDS = ("onednn", "direct")


@dataclass(frozen=True)
class ConvCall:
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

    def key(self) -> str:
        """A string form for JSON tables."""
        return "|".join(f"{k}={v}" for k, v in asdict(self).items())


class ConvTuner:
    """Decides, per :class:`ConvCall`, which backend of :data:`BACKENDS` runs it (module docstring).

    Args:
        table: known timings, ``{call: {backend: seconds}}``; new measurements are added to it.
        measure: time a call the table does not have (else answer ``fallback``).
        fallback: the answer for an unknown call when not measuring.
        warmup, repeats: untimed and timed interleaved runs of each candidate; the median decides.
    """

    def __init__(self, table: Mapping[ConvCall, Mapping[str, float]] | None = None, *, measure: bool = True,
                 fallback: str = "onednn", warmup: int = 3, repeats: int = 15) -> None:
        if fallback not in BACKENDS:
            raise ValueError(f"ConvTuner: fallback must be one of {BACKENDS}, got {fallback!r}")
        self.table: dict[ConvCall, dict[str, float]] = {k: dict(v) for k, v in (table or {}).items()}
        self.measure = measure
        self.fallback = fallback
        self.warmup = warmup
        self.repeats = repeats

    def choose(self, call: ConvCall, candidates: Mapping[str, Callable[[], Any]]) -> str:
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


_CURRENT: list[ConvTuner] = [ConvTuner()]


def current_tuner() -> ConvTuner:
    """The tuner the inference passes use (a measuring one, shared by the process, unless replaced)."""
    return _CURRENT[-1]


@contextlib.contextmanager
def use_tuner(tuner: ConvTuner) -> Iterator[ConvTuner]:
    """Make ``tuner`` the :func:`current_tuner` inside the block."""
    _CURRENT.append(tuner)
    try:
        yield tuner
    finally:
        _CURRENT.remove(tuner)
