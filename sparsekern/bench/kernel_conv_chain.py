"""Benchmark of ``conv_chain``: consecutive direct convolutions as separate calls and as one chain call.

Each row is a stack of ``LAYERS`` identical 3x3, stride-1, padding-1 convolutions with bias and ReLU, every
second one adding the output of the one before last (a ResNet stage's blocks), channels-last float32: a stage of
a CIFAR ResNet or of ``sparsekern demo``'s 16x16 digits (``kernel_fused_conv2d.STAGES``) at a kept fraction of
its channels. Candidates, timed interleaved (:func:`~sparsekern.bench.timing.time_interleaved`) on random inputs:

* ``calls``: one ``sparsekern::_conv2d_nhwc_prepacked`` call per layer from a TorchScript function (what the
  ``script`` pass runs without ``conv_chain``);
* ``chain``: one ``sparsekern::_conv2d_nhwc_chain`` call for the stack (what it runs with it).

Reported: microseconds per layer of each, and ``gain`` = calls / chain. Tests never time; this benchmark is run by
hand::

    sparsekern bench kernels --op conv_chain --device cpu --threads 2 --out bench/results/cpu.json
"""
from __future__ import annotations

import sys
from typing import Any, List

import torch

from sparsekern.bench.kernel_fused_conv2d import stage_cases, stage_table
from sparsekern.bench.timing import cpu_float32_run, time_interleaved
from sparsekern.conv_chain import ConvChain
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d

__all__ = ["LAYERS", "KEEP", "run", "table"]

LAYERS = 18
KEEP = (1.0, 0.5)


def _calls(x: torch.Tensor, packed: List[torch.Tensor], bias: List[torch.Tensor], channels: int) -> torch.Tensor:
    y, previous = x, x
    for i in range(len(packed)):
        residual = previous if i % 2 == 1 else None
        previous = y
        y = torch.ops.sparsekern._conv2d_nhwc_prepacked(y, packed[i], bias[i], residual, [3, 3], [1, 1], [1, 1],
                                                         [1, 1], channels, True)
    return y


def _row(c: int, h: int, batch: int, warmup: int, repeats: int, seed: int, calls: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    weights = [torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5) for _ in range(LAYERS)]
    bias = [torch.randn(c, generator=g) * 0.1 for _ in range(LAYERS)]
    layers = [PreparedFusedConv2d(w, b, (1, 1), (1, 1), (1, 1), True, x.shape) for w, b in zip(weights, bias)]
    # value i + 1 is layer i's output; layer i (odd) adds value i - 1, the input of the layer before it
    chain = ConvChain(layers, [(i, i - 1 if i % 2 == 1 else -1) for i in range(LAYERS)], 1, [LAYERS])
    packed = [m.packed for m in layers]
    op = torch.ops.sparsekern._conv2d_nhwc_chain
    fns = {"calls": lambda: calls(x, packed, bias, c),  # the operator itself: no Python of ConvChain.forward
           "chain": lambda: op([x], packed, bias, chain.spec, chain.outputs, [], [])}
    with torch.inference_mode():
        if not torch.equal(fns["calls"](), fns["chain"]()[0]):
            raise RuntimeError(f"conv_chain benchmark: the chain's result differs from the separate calls' ({c} "
                               f"channels, {h}x{h}, batch {batch})")
        timed = time_interleaved(fns, warmup=warmup, repeats=repeats)
    per_layer = {k: t.median_ms * 1e3 / LAYERS for k, t in timed.items()}
    return {"channels": c, "size": h, "batch": batch, "layers": LAYERS, "us_per_layer": per_layer,
            "gain": per_layer["calls"] / per_layer["chain"], "spread": {k: t.spread for k, t in timed.items()}}


def run(*, device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = 2, warmup: int = 10,
        repeats: int = 40, quick: bool = False, progress: bool = True, batches: tuple[int, ...] = (1, 64),
        seed: int = 0, **_: Any) -> dict[str, Any]:
    """Time every stage x kept fraction x batch (module docstring; ``quick``: the demo's stages at batch 1);
    returns a JSON-able document with one row per stack. CPU float32 only; the time-budget options of the other
    kernel benchmarks are accepted and unused."""
    calls = torch.jit.script(_calls)
    rows = []
    with cpu_float32_run("conv_chain", device, dtype, threads) as env:
        for case in stage_cases(KEEP, quick, batches):
            r = {**case, **_row(case["channels"], case["size"], case["batch"], warmup, repeats, seed, calls)}
            rows.append(r)
            if progress:
                t = r["us_per_layer"]
                print(f"{r['network']} C={r['channels']} {r['size']}x{r['size']} b{r['batch']}: calls "
                      f"{t['calls']:.1f} us, chain {t['chain']:.1f} us per layer ({r['gain']:.2f}x)", file=sys.stderr,
                      flush=True)
    return {"op": "conv_chain", "environment": env, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    def cells(r: dict[str, Any]) -> str:
        t, s = r["us_per_layer"], r["spread"]
        return f"{t['calls']:>7.1f} ({s['calls']:>4.0%}) {t['chain']:>7.1f} ({s['chain']:>4.0%}) {r['gain']:>6.2f}"

    return stage_table(doc, f"{LAYERS} 3x3 convolutions + bias + ReLU (residual every second)",
                       "microseconds per layer", f"{'calls':>14} {'chain':>14} {'gain':>6}", cells)
