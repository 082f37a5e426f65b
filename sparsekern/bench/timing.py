"""The one timing helper every sparsekern benchmark uses.

Rules (docs/design.md#measuring): candidates are timed in the same process, *interleaved* (each
repeat runs every candidate once, in a rotating order, so that clock drift, thermal throttling
and background load hit all of them alike), after warm-up, and summarised by the median of many
repeats with the spread reported next to it. CPU: ``time.perf_counter``; CUDA: a pair of
``torch.cuda.Event`` around each call, synchronised before the call.
"""
from __future__ import annotations

import ctypes
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["SERVING_BLOCK", "Timing", "time_interleaved", "set_threads", "cpu_float32_run", "environment",
           "allocator", "hold_freed_memory", "rotation", "CudaGraphed"]


@dataclass
class Timing:
    """Summary of the samples of one timed callable. All times in milliseconds.

    Attributes:
        median_ms: median of the samples (the figure to report).
        mean_ms: arithmetic mean.
        p10_ms, p90_ms: 10th / 90th percentiles (linear interpolation).
        iqr_ms: interquartile range, p75 - p25.
        spread: ``iqr_ms / median_ms`` (dimensionless; 0.05 = 5 % spread).
        n: number of samples.
        samples: the raw samples in ms, in the order they were taken.
    """

    median_ms: float
    mean_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    spread: float
    n: int
    samples: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> "Timing":
        """Summarise raw samples (ms)."""
        if not samples_ms:
            raise ValueError("no samples")
        xs = sorted(samples_ms)
        med = _quantile(xs, 0.5)
        iqr = _quantile(xs, 0.75) - _quantile(xs, 0.25)
        return cls(
            median_ms=med,
            mean_ms=sum(xs) / len(xs),
            p10_ms=_quantile(xs, 0.10),
            p90_ms=_quantile(xs, 0.90),
            iqr_ms=iqr,
            spread=iqr / med if med > 0 else float("inf"),
            n=len(xs),
            samples=list(samples_ms),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serializable dict (``from_dict`` inverts it)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Timing":
        return cls(**d)


def _quantile(sorted_xs: list[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default)."""
    pos = (len(sorted_xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def rotation(names: list[str], r: int) -> list[str]:
    """Order in which round ``r`` runs the candidates: ``names`` rotated left by ``r``."""
    k = r % len(names)
    return names[k:] + names[:k]


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


#: timed calls per turn with which the model benchmarks (``sparsekern bench models``, ``sparsekern demo``, the SANP
#: models) time whole models: each model as a process serving it runs it (:func:`time_interleaved`).
SERVING_BLOCK = 10


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    warmup: int = 10,
    repeats: int = 50,
    device: str | torch.device = "cpu",
    min_time_s: float | None = None,
    block: int = 1,
) -> dict[str, Timing]:
    """Time several zero-argument callables against each other, interleaved.

    Round ``r`` gives every function a turn, in the order ``rotation(names, r)``, so each function
    runs first, second, ... equally often. ``warmup`` untimed rounds come first (same rotation).
    A turn is one timed call, or with ``block`` > 1 one untimed call and then ``block`` timed calls:
    each function is then timed after its own previous calls, as in a process that serves one model,
    while the turns still alternate, so slow drift of a shared machine reaches every function alike.
    (Alternating single calls times each function just after the others ran, and a small model can
    take several calls to get back to its steady speed after a large one: docs/design.md.)

    Args:
        fns: name -> callable with no arguments (close over inputs; return value is ignored).
        warmup: untimed rounds before timing.
        repeats: timed rounds (samples per function), at least 1.
        device: ``"cpu"`` times with ``time.perf_counter``; a CUDA device times each call with
            a pair of ``torch.cuda.Event`` after a ``torch.cuda.synchronize``.
        min_time_s: if given, keep adding rounds after ``repeats`` until the wall time spent in
            timed rounds (all functions together) reaches ``min_time_s`` seconds.
        block: timed calls per turn, at least 1; ``repeats`` is rounded up to whole turns.

    Returns:
        name -> :class:`Timing` (times in ms), in the order of ``fns``.
    """
    if not fns:
        raise ValueError("nothing to time")
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if block < 1:
        raise ValueError("block must be >= 1")
    names = list(fns)
    cuda = _is_cuda(device)
    timer = _cuda_call_ms if cuda else _cpu_call_ms

    for r in range(warmup):
        for name in rotation(names, r):
            fns[name]()
    if cuda:
        torch.cuda.synchronize(device)

    samples: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    r = 0
    while True:
        for name in rotation(names, warmup + r):
            if block > 1:
                fns[name]()
            samples[name].extend(timer(fns[name], device) for _ in range(block))
        r += 1
        if r * block >= repeats and (min_time_s is None or time.perf_counter() - start >= min_time_s):
            break
    return {n: Timing.from_samples(samples[n]) for n in names}


def _cpu_call_ms(fn: Callable[[], Any], device: str | torch.device) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _cuda_call_ms(fn: Callable[[], Any], device: str | torch.device) -> float:
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    fn()
    end.record()
    end.synchronize()
    return float(begin.elapsed_time(end))


class CudaGraphed(torch.nn.Module):
    """``model`` replayed from a CUDA graph: one launch per call instead of one per kernel, so the timing
    measures the GPU's work rather than Python and launch overhead.

    The first call with CUDA tensor inputs of a new (shape, dtype, stride) signature runs ``model`` three times
    on a side stream (autotuning, cuDNN algorithm choice, lazy initialisation) and captures a fourth call.
    Every later call copies its inputs into the captured input buffers, replays the graph and returns the
    captured output tensor, which the next call overwrites. Calls under a dispatch mode (FLOP counting, fake
    tensors) or with non-CUDA inputs run ``model`` eagerly. Inference only (no autograd through the graph).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self._graph: torch.cuda.CUDAGraph | None = None
        self._signature: tuple | None = None
        self._inputs: list[torch.Tensor] = []
        self._output: Any = None

    def forward(self, *args: torch.Tensor) -> Any:
        if torch._C._len_torch_dispatch_stack() > 0 or not all(isinstance(a, torch.Tensor) and a.is_cuda for a in args):
            return self.model(*args)
        signature = tuple((tuple(a.shape), a.dtype, a.stride(), a.device) for a in args)
        if signature != self._signature:
            self._capture(args, signature)
        for buffer, a in zip(self._inputs, args):
            buffer.copy_(a)
        self._graph.replay()  # type: ignore[union-attr]
        return self._output

    def _capture(self, args: tuple[torch.Tensor, ...], signature: tuple) -> None:
        self._inputs = [a.clone() for a in args]
        side = torch.cuda.Stream(args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self.model(*self._inputs)
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self.model(*self._inputs)
        self._graph, self._signature = graph, signature


@contextmanager
def set_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(n)``, restoring the previous value after.

    ``None`` leaves the thread count alone.
    """
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def cpu_float32_run(op: str, device: str, dtype: torch.dtype, threads: int | None) -> Iterator[dict[str, Any]]:
    """The setting of a benchmark of CPU float32 kernels: refuses another ``device`` or ``dtype`` (naming ``op``),
    runs the block with ``threads`` (:func:`set_threads`) and yields its environment record (dtype float32, no
    batch) for the document."""
    if device != "cpu" or dtype != torch.float32:
        raise ValueError(f"the {op} benchmark measures CPU float32 kernels; got {device} {dtype}")
    with set_threads(threads):
        env = environment("cpu")
        env.update(dtype="float32", batch=None)
        yield env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


#: The glibc settings :func:`hold_freed_memory` applied in this process (empty until it succeeds).
_HELD: dict[str, int] = {}


def hold_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed memory for reuse, for this whole process; returns whether it applied.

    With its defaults glibc serves large blocks by ``mmap`` and gives freed memory back to the system, both
    behind thresholds it adjusts as the process allocates, so whether a forward pays page faults for its
    activations (a 4 MiB activation: about 0.8 ms on a 2-core VM, as much as a convolution) depends on what
    ran before it, and a timed comparison of two models depends on their order. This sets
    ``M_MMAP_THRESHOLD`` (at most 32 MiB on 64-bit glibc; larger blocks still use ``mmap``) and
    ``M_TRIM_THRESHOLD`` through ``mallopt``, what a caching allocator (jemalloc, tcmalloc) does in deployment.
    It cannot be undone (glibc's adaptive thresholds stay off) and costs memory that is freed but kept. Does
    nothing and returns False where the C library is not glibc or an allocator is preloaded.
    """
    if _HELD == {"mmap_threshold": mmap_threshold, "trim_threshold": trim_threshold}:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or allocator().startswith("LD_PRELOAD"):
        return False
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, mmap_threshold) == 1 and libc.mallopt(m_trim_threshold,
                                                                                 trim_threshold) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _HELD.update(mmap_threshold=mmap_threshold, trim_threshold=trim_threshold)
    return ok


def allocator() -> str:
    """The host memory allocator this process runs with: a preloaded jemalloc/tcmalloc/mimalloc, else the C
    library's malloc with any ``MALLOC_*`` tunables set and what :func:`hold_freed_memory` applied.

    It matters for CPU timings of large activations: glibc returns freed blocks above its mmap threshold to
    the system, and the next allocation of that size faults its pages in again, a cost that scales with the
    bytes a model allocates rather than with its FLOPs.
    """
    preload = [p for p in os.environ.get("LD_PRELOAD", "").split() if any(
        name in os.path.basename(p) for name in ("jemalloc", "tcmalloc", "mimalloc"))]
    if preload:
        return "LD_PRELOAD " + " ".join(os.path.basename(p) for p in preload)
    tunables = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    tunables += [f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"] if "GLIBC_TUNABLES" in os.environ else []
    if _HELD:
        tunables.append(f"freed memory held: mmap threshold {_HELD['mmap_threshold'] >> 20} MiB, trim threshold "
                        f"{_HELD['trim_threshold'] >> 20} MiB")
    return "default malloc" + (f" ({', '.join(tunables)})" if tunables else "")


def environment(device: str | torch.device | None = None) -> dict[str, Any]:
    """What a benchmark figure depends on; hostname-free, JSON-serializable.

    Args:
        device: the device benchmarked (default: ``"cuda"`` if available else ``"cpu"``).

    Keys: ``device`` (type), ``device_name`` (GPU name or CPU model), ``cpu_model``, ``cpu_isa`` (the
    vector ISA torch's CPU kernels dispatch to: ``AVX512``, ``AVX2``, ...), ``cpu_count``, ``threads``
    (torch intra-op), ``interop_threads``, ``torch``, ``cuda`` (CUDA runtime version or None), ``python``,
    ``platform``, ``allocator`` (:func:`allocator`), ``dtype`` and ``batch`` (None placeholders that the
    caller fills in).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    cpu = _cpu_model()
    name = cpu
    if dev.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(dev)
    return {
        "device": dev.type,
        "device_name": name,
        "cpu_model": cpu,
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "allocator": allocator(),
        "dtype": None,
        "batch": None,
    }
