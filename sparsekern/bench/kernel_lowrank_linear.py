"""Microbenchmark of :func:`sparsekern.ops.lowrank_linear` against the dense layer and the unfused two GEMMs.

For every (tokens T, in, out, rank r) with a real FLOP saving (``r < in out / (in + out)``) it times, on the
same random data (never zeros):

* ``dense``: ``F.linear(x, W, bias)`` with ``W = P Q`` (MKL / oneDNN on CPU, cuBLAS on GPU);
* ``two_gemm``: the unfused ``addmm(bias, x Q^T, P^T)`` (:func:`sparsekern.ops.lowrank_linear.two_gemm`);
* ``dispatch``: the public op with its default backend choice, recorded as ``backend`` in the row;
* each fused kernel forced, where it can run: ``cpu`` (the C++ kernel) on CPU, ``triton`` and ``cuda`` (the
  native one, when the extension built) on GPU; ``fused_vs_two_gemm`` = two-GEMM time / best fused time.

Theoretical speedup = ``in out / (r (in + out))`` (FLOPs of dense over FLOPs of the factors); measured speedup
= dense time / candidate time; efficiency = measured / theoretical (docs/design.md#measuring). At small ranks
FLOPs are the wrong yardstick: reading x and writing y cost the same as for the dense layer, so each row also has
a *roofline* speedup, the ratio of the two layers' roofline times (:func:`sparsekern.cost.roofline_seconds`,
bytes from :func:`~sparsekern.cost.linear_bytes` and :func:`~sparsekern.cost.lowrank_bytes`), on roofs measured
in the same run (``roofs``: the best dense FLOP rate of the grid, and the bandwidth of a large copy), and
``roofline_efficiency`` = measured / roofline speedup. CPU candidates are
timed interleaved with :func:`~sparsekern.bench.timing.time_interleaved` (median, spread = IQR / median) at
``threads`` intra-op threads; GPU candidates with ``triton.testing.do_bench`` (median of back-to-back runs
between CUDA events, L2 flushed between runs; spread = IQR / median), round-robin over the candidates.

On CPU the number of timed rounds per row shrinks for large shapes so that one row costs about
``budget_s`` seconds of dense time (never fewer than ``min_repeats``; warm-up rounds shrink likewise); the row
records its count.

    doc = run(device="cpu", quick=True); print(table(doc))
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from sparsekern.bench.timing import environment, set_threads, time_interleaved
from sparsekern.cost import linear_bytes, lowrank_bytes, roofline_seconds
from sparsekern.ops import lowrank_linear, reference
from sparsekern.ops.lowrank_linear import select_backend, two_gemm

__all__ = ["run", "table", "theoretical_speedup", "DEFAULT_TOKENS", "DEFAULT_DIMS", "DEFAULT_RANKS", "GPU_TOKENS",
           "GPU_DIMS", "GPU_RANKS"]

DEFAULT_TOKENS = (1, 16, 256, 1024, 8192)
DEFAULT_DIMS = ((512, 512), (1024, 1024), (4096, 4096), (1024, 4096), (4096, 1024))
DEFAULT_RANKS = (32, 64, 128, 256, 512, 1024)
#: GPU token counts: denser around the fused/unfused crossover (the dispatch's token threshold).
GPU_TOKENS = (1, 16, 64, 128, 256, 512, 1024, 4096, 8192)
#: GPU layer sizes and ranks, the most telling first (rows run dims-major, then ranks, then tokens, so a grid cut
#: short by a deadline has whole token sweeps of the large layers at r = 128 and 32).
GPU_DIMS = ((4096, 4096), (1024, 4096), (4096, 1024), (1024, 1024), (512, 512))
GPU_RANKS = (128, 32, 256, 64)
QUICK_TOKENS = (16, 256, 1024)
QUICK_DIMS = ((1024, 1024), (1024, 4096))
QUICK_RANKS = (32, 128, 256)
_FUSED = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}  # fused backends timed (forced) besides the dispatch


def theoretical_speedup(n_in: int, n_out: int, r: int) -> float:
    """Dense FLOPs over low-rank FLOPs: ``in out / (r (in + out))`` (the token count cancels)."""
    return n_in * n_out / (r * (n_in + n_out))


def _cases(tokens: Iterable[int], dims: Iterable[tuple[int, int]], ranks: Iterable[int]) -> list[tuple[int, ...]]:
    return [(t, i, o, r) for i, o in dims for r in ranks for t in tokens if theoretical_speedup(i, o, r) > 1.0]


def _time_gpu(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    from triton.testing import do_bench

    out = {}
    for name, fn in fns.items():
        q25, med, q75 = do_bench(fn, warmup=max(warmup, 1) * 5, rep=max(repeats, 1) * 4, quantiles=[0.25, 0.5, 0.75])
        out[name] = {"ms": med, "spread": (q75 - q25) / med if med > 0 else float("inf")}
    return out


def _time_cpu(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, budget_s: float,
              min_repeats: int) -> tuple[dict[str, dict[str, float]], int]:
    for fn in fns.values():  # first calls: lazy builds, allocator warm-up
        fn()
    t0 = time.perf_counter()
    fns["dense"]()
    rounds = budget_s / max(time.perf_counter() - t0, 1e-9)
    n = max(min_repeats, min(repeats, int(rounds)))
    timings = time_interleaved(fns, warmup=max(1, min(warmup, int(rounds / 4))), repeats=n)
    return {k: {"ms": v.median_ms, "spread": v.spread} for k, v in timings.items()}, n


def _row(t: int, n_in: int, n_out: int, r: int, device: str, dtype: torch.dtype, warmup: int, repeats: int,
         budget_s: float, min_repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(t * 7919 + n_in * 31 + n_out * 17 + r)
    q = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(device=device, dtype=dtype)
    p = (torch.randn(n_out, r, generator=g) / r**0.5).to(device=device, dtype=dtype)
    b = torch.randn(n_out, generator=g).to(device=device, dtype=dtype)
    x = torch.randn(t, n_in, generator=g).to(device=device, dtype=dtype)
    w = (p.float() @ q.float()).to(dtype)
    backend = select_backend(x, q, p, b)
    fns: dict[str, Callable[[], Any]] = {
        "dense": lambda: F.linear(x, w, b),
        "two_gemm": lambda: two_gemm(x, q, p, b),
        "dispatch": lambda: lowrank_linear(x, q, p, b),
    }
    for fused in _FUSED[device]:
        try:
            select_backend(x, q, p, b, backend=fused)
        except Exception:  # the backend cannot run here (rank too large, extension missing): not timed
            continue
        fns[fused] = lambda fused=fused: lowrank_linear(x, q, p, b, backend=fused)

    ref = reference.lowrank_linear(x, q, p, b).float()
    scale = ref.abs().max().clamp_min(1e-12)
    errors = {k: float((fn().float() - ref).abs().max() / scale) for k, fn in fns.items() if k != "dense"}

    if device == "cuda":
        timed, n = _time_gpu(fns, warmup, repeats), None
    else:
        timed, n = _time_cpu(fns, warmup, repeats, budget_s, min_repeats)
    theo = theoretical_speedup(n_in, n_out, r)
    dense_ms = timed["dense"]["ms"]
    row: dict[str, Any] = {
        "tokens": t, "in": n_in, "out": n_out, "r": r, "theoretical_speedup": theo, "backend": backend,
        "ms": {k: v["ms"] for k, v in timed.items()},
        "speedup": {k: dense_ms / v["ms"] for k, v in timed.items() if k != "dense"},
        "efficiency": {k: dense_ms / v["ms"] / theo for k, v in timed.items() if k != "dense"},
        "spread": {k: v["spread"] for k, v in timed.items()},
        "max_rel_error": errors,
        "repeats": n,
    }
    fused = [k for k in _FUSED[device] if k in timed]
    if fused:
        best = min(fused, key=lambda k: timed[k]["ms"])
        row["best_fused"] = best
        row["fused_vs_two_gemm"] = timed["two_gemm"]["ms"] / timed[best]["ms"]
    return row


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    tokens: Iterable[int] = DEFAULT_TOKENS,
    dims: Iterable[tuple[int, int]] = DEFAULT_DIMS,
    ranks: Iterable[int] = DEFAULT_RANKS,
    threads: int | None = 2,
    warmup: int = 5,
    repeats: int = 30,
    quick: bool = False,
    progress: bool = True,
    budget_s: float = 3.0,
    min_repeats: int = 7,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Benchmark every valid (tokens, in, out, r); returns a JSON-able document (module docstring).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        dtype: float32 on CPU; float16 / bfloat16 (or float32) on GPU.
        tokens, dims, ranks: the grid; ``dims`` holds (in, out) pairs. Cases with ``r >= in out / (in + out)``
            (no FLOP saving) are skipped.
        threads: CPU intra-op threads while timing (``None``: leave as is).
        warmup, repeats: untimed / timed rounds on CPU (repeats may shrink, see ``budget_s``); on GPU they scale
            ``do_bench``'s warm-up and measuring time (5 ms and 4 ms per unit).
        quick: a small grid (tokens 16/256/1024, (in, out) = (1024, 1024) and (1024, 4096), r = 32/128/256)
            instead of the given one.
        progress: print one line per row to stderr.
        budget_s, min_repeats: CPU only: rounds per row = clamp(budget_s / dense time, min_repeats, repeats).
        deadline: a ``time.perf_counter()`` value after which no new row starts (the rows done are returned,
            ``cases`` still counts all of them).

    Returns:
        ``{"op", "environment", "rows", "cases", "roofs"}`` (``cases``: rows planned; ``roofs``: ``peak_flops``
        and ``bandwidth``, module docstring); each row has tokens, in, out, r, theoretical_speedup,
        roofline_speedup, the backend the dispatch picked, and per candidate its median ms, speedup, efficiency
        and roofline_efficiency vs dense, spread and max error relative to the output scale.
    """
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("kernel_lowrank_linear.run: device='cuda' but no CUDA device is available")
    if quick:
        tokens, dims, ranks = QUICK_TOKENS, QUICK_DIMS, QUICK_RANKS
    cases = _cases(tokens, dims, ranks)
    rows = []
    with set_threads(threads if device == "cpu" else None), torch.inference_mode():
        env = environment(device)
        env["dtype"] = str(dtype).replace("torch.", "")
        for i, (t, n_in, n_out, r) in enumerate(cases):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            row = _row(t, n_in, n_out, r, device, dtype, warmup, repeats, budget_s, min_repeats)
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(cases)}] {_line(row)}", file=sys.stderr, flush=True)
        roofs = _roofs(rows, device, dtype) if rows else None
    if roofs is not None:
        for row in rows:
            _add_roofline(row, roofs, torch.tensor([], dtype=dtype).element_size())
    return {"op": "lowrank_linear", "environment": env, "rows": rows, "cases": len(cases), "roofs": roofs}


def _roofs(rows: list[dict[str, Any]], device: str, dtype: torch.dtype) -> dict[str, float]:
    """The machine's roofs as this run sees them: the best dense FLOP rate of the grid (FLOP/s) and the bandwidth
    of copying 256 MiB (bytes/s, read + write)."""
    peak = max(2 * r["tokens"] * r["in"] * r["out"] / (r["ms"]["dense"] / 1e3) for r in rows)
    src = torch.randn(64 * 2**20, device=device).to(dtype)
    dst = torch.empty_like(src)
    timed = time_interleaved({"copy": lambda: dst.copy_(src)}, warmup=2, repeats=10, device=device)["copy"]
    return {"peak_flops": peak, "bandwidth": 2 * src.numel() * src.element_size() / (timed.median_ms / 1e3)}


def _add_roofline(row: dict[str, Any], roofs: dict[str, float], size: int) -> None:
    t, n_in, n_out, r = row["tokens"], row["in"], row["out"], row["r"]
    dense = roofline_seconds(2 * t * n_in * n_out, linear_bytes(t, n_in, n_out, size), **roofs)
    low = roofline_seconds(2 * t * r * (n_in + n_out), lowrank_bytes(t, n_in, n_out, r, size), **roofs)
    row["roofline_speedup"] = dense / low
    row["roofline_efficiency"] = {k: v / row["roofline_speedup"] for k, v in row["speedup"].items()}


def _line(row: dict[str, Any]) -> str:
    ms, eff = row["ms"], row["efficiency"]
    fused = "".join(f" {k} {ms[k]:.3f} ms ({eff[k]:.2f})" for k in ("cpu", "triton", "cuda") if k in ms)
    return (f"T={row['tokens']} {row['in']}x{row['out']} r={row['r']} theo {row['theoretical_speedup']:.1f}x: "
            f"dense {ms['dense']:.3f} ms, two_gemm {ms['two_gemm']:.3f} ms ({eff['two_gemm']:.2f}),{fused} "
            f"dispatch[{row['backend']}] {ms['dispatch']:.3f} ms ({eff['dispatch']:.2f})")


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document: times in ms, efficiency in parentheses."""
    env = doc["environment"]
    rows = doc["rows"]
    fused = [k for k in ("cpu", "triton", "cuda") if any(k in r["ms"] for r in rows)]
    head = (f"lowrank_linear on {env['device_name']} ({env['device']}, {env['dtype']}, {env['threads']} threads, "
            f"torch {env['torch']}); ms (efficiency = measured / theoretical speedup)")
    cols = ["tokens", "in", "out", "r", "theo", "dense", "two_gemm", *fused, "dispatch", "backend", "spread"]
    lines = [head, " ".join(f"{c:>16}" if c in ("two_gemm", "dispatch", *fused) else f"{c:>9}" for c in cols)]
    for r in rows:
        ms, eff = r["ms"], r["efficiency"]

        def cell(k: str) -> str:
            return f"{ms[k]:.3f} ({eff[k]:.2f})" if k in ms else "-"

        spread = max(r["spread"].values())
        vals = [f"{r['tokens']:>9}", f"{r['in']:>9}", f"{r['out']:>9}", f"{r['r']:>9}",
                f"{r['theoretical_speedup']:>9.2f}", f"{ms['dense']:>9.3f}", f"{cell('two_gemm'):>16}",
                *(f"{cell(k):>16}" for k in fused), f"{cell('dispatch'):>16}", f"{r['backend']:>9}",
                f"{spread:>9.1%}"]
        lines.append(" ".join(vals))
    return "\n".join(lines)
