"""Benchmark of :func:`sparsekern.ops.attention` on CPU: GFLOP/s of its C++ kernel and of torch's
``scaled_dot_product_attention``, against the rate of the matmul beside it in a Transformer layer.

Attention is the part of a Transformer that pruning its linear layers leaves whole, so a pruned model follows
its FLOPs only if attention runs at about the rate of the matmuls around it. Each row is one shape
(B, H, T, E) with T_q = T_k = T and E_v = E, causal or not, on random float32 inputs; candidates, timed
interleaved (:func:`~sparsekern.bench.timing.time_interleaved`):

* ``sparsekern``: the op's ``cpu`` backend (``csrc/cpu/attention.cpp``);
* ``torch``: ``torch.nn.functional.scaled_dot_product_attention``;
* ``matmul``: the reference rate, a (B T) x (H E) by (H E) x (H E) matmul (the output projection of the same
  layer) through torch.

FLOPs are those :func:`sparsekern.cost.attention_flops` counts: ``2 (E + E_v)`` per visible (query, key) pair,
so a causal row counts only the pairs the mask keeps (torch's CPU kernel computes the masked ones too). ``vs
matmul`` is the sparsekern kernel's GFLOP/s over the matmul's. Each row also records the largest difference of
the kernel's output from a float64 reference, relative to its scale. Tests never time; this benchmark is run
by hand::

    sparsekern bench kernels --op attention --device cpu --threads 2 --out bench/results/cpu.json
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

from sparsekern.bench.timing import cpu_float32_run, time_interleaved
from sparsekern.cost import attention_flops
from sparsekern.ops.attention import attention

__all__ = ["SHAPES", "run", "table"]

#: (B, H, T, E): a GPT-2-small layer at 512 and 1024 tokens, a batch of short sequences, a narrow model.
SHAPES = ((1, 12, 512, 64), (1, 12, 1024, 64), (4, 12, 128, 64), (1, 4, 512, 32))


def _row(b: int, h: int, t: int, e: int, causal: bool, warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, e, generator=g) for _ in range(3))
    x, w = torch.randn(b * t, h * e, generator=g), torch.randn(h * e, h * e, generator=g)
    fns = {"sparsekern": lambda: attention(q, k, v, causal, backend="cpu"),
           "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
           "matmul": lambda: x @ w}
    with torch.inference_mode():
        truth = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        error = float((fns["sparsekern"]().double() - truth).abs().max() / truth.abs().max())
        timed = time_interleaved(fns, warmup=warmup, repeats=repeats)
    flops = {"sparsekern": attention_flops(q.shape, k.shape, v.shape, causal),
             "matmul": 2 * b * t * (h * e) ** 2}
    flops["torch"] = flops["sparsekern"]
    gflops = {n: flops[n] / (timed[n].median_ms * 1e6) for n in fns}
    return {"shape": [b, h, t, e], "causal": causal, "flops": flops["sparsekern"], "gflops": gflops,
            "ms": {n: timed[n].median_ms for n in fns}, "spread": {n: timed[n].spread for n in fns},
            "vs_matmul": gflops["sparsekern"] / gflops["matmul"], "max_rel_error": error}


def run(*, device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = 2, warmup: int = 10,
        repeats: int = 40, quick: bool = False, progress: bool = True, seed: int = 0,
        shapes: tuple[tuple[int, int, int, int], ...] = SHAPES, **_: Any) -> dict[str, Any]:
    """Time every (B, H, T, E) of ``shapes``, causal and not (``quick``: the first shape only); returns a JSON-able
    document with one row per (shape, causal): GFLOP/s, median ms and spread per candidate, ``vs_matmul`` and
    ``max_rel_error``. CPU float32 only (the kernel measured); the time-budget options of the other kernel
    benchmarks are accepted and unused (every row runs ``repeats`` times)."""
    rows = []
    with cpu_float32_run("attention", device, dtype, threads) as env:
        _row(*shapes[0], True, 1, 1, seed)  # untimed: the extension's build, thread pool, allocator
        for shape in shapes[:1] if quick else shapes:
            for causal in (True, False):
                rows.append(_row(*shape, causal, warmup, repeats, seed))
                if progress:
                    r = rows[-1]
                    print(f"{'x'.join(map(str, shape))} causal={causal}: " + ", ".join(
                        f"{n} {v:.0f}" for n, v in r["gflops"].items()) + " GFLOP/s", file=sys.stderr, flush=True)
    return {"op": "attention", "environment": env, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    env = doc["environment"]
    lines = [f"attention, float32 on {env['device_name']} ({env['threads']} threads); GFLOP/s of the visible pairs "
             f"(spread = IQR / median)",
             f"{'B x H x T x E':>16} {'causal':>6} {'sparsekern':>16} {'torch':>14} {'matmul':>14} {'vs matmul':>9} "
             f"{'max err':>8}"]
    for r in doc["rows"]:
        g, s = r["gflops"], r["spread"]
        lines.append(f"{' x '.join(map(str, r['shape'])):>16} {str(r['causal']):>6} "
                     f"{g['sparsekern']:>9.0f} ({s['sparsekern']:>4.0%}) {g['torch']:>7.0f} ({s['torch']:>4.0%}) "
                     f"{g['matmul']:>7.0f} ({s['matmul']:>4.0%}) {r['vs_matmul']:>9.2f} {r['max_rel_error']:>8.1e}")
    return "\n".join(lines)
