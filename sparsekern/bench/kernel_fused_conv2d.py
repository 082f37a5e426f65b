"""Benchmark of narrow convolutions: GFLOP/s of oneDNN's prepacked call and of sparsekern's direct convolution on
the layers of pruned CIFAR ResNets, against the dense layers they replace.

A pruned network is as fast as its FLOPs say only if its narrow layers run at the dense layers' rate. Each row
is one 3x3, stride-1, padding-1 convolution with bias, residual-free ReLU, channels-last float32, as the
``onednn`` pass runs it: a stage of a CIFAR ResNet (``C`` channels in and out on an ``H x H`` map) at a kept
fraction of its channels (1.0: the dense layer; 0.7 and 0.5: L1-norm pruning by 30% and 50%). Candidates, timed
interleaved (:func:`~sparsekern.bench.timing.time_interleaved`) on random inputs:

* ``onednn``: ``torch.ops.mkldnn._convolution_pointwise`` with weights prepacked for the shape;
* ``direct``: :class:`~sparsekern.ops.fused_conv2d.PreparedFusedConv2d` (the channels-last kernel).

``best`` is the faster one, the choice the pass makes; ``vs_dense`` is a pruned row's best GFLOP/s over the
best GFLOP/s of the dense row of the same stage and batch (the goal is >= 0.9: a pruned layer as fast per FLOP
as the one it replaces). Tests never time; this benchmark is run by hand::

    sparsekern bench kernels --op fused_conv2d --device cpu --threads 2 --out bench/results/cpu.json
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from sparsekern.bench.timing import cpu_float32_run, time_interleaved
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d
from sparsekern.passes import onednn_weight

__all__ = ["STAGES", "KEEP", "STAGE_HEADER", "run", "stage_cases", "stage_table", "table"]

#: (network, dense channels, map size) of the stages measured: CIFAR ResNet-20/56 on 32x32 images, and on the
#: 16x16 digits of ``sparsekern demo``.
STAGES = (("cifar", 16, 32), ("cifar", 32, 16), ("cifar", 64, 8), ("demo", 16, 16), ("demo", 32, 8), ("demo", 64, 4))
KEEP = (1.0, 0.7, 0.5)


def _row(c: int, h: int, batch: int, warmup: int, repeats: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, c, 3, 3, generator=g), torch.randn(c, generator=g)
    packed = onednn_weight(w, [1, 1], [1, 1], [1, 1], 1, x.shape)
    direct = PreparedFusedConv2d(w, b, (1, 1), (1, 1), (1, 1), True, x.shape)
    fns = {"onednn": lambda: torch.ops.mkldnn._convolution_pointwise(x, packed, b, [1, 1], [1, 1], [1, 1], 1, "relu",
                                                                     [], ""),
           "direct": lambda: direct(x)}
    with torch.inference_mode():
        timed = time_interleaved(fns, warmup=warmup, repeats=repeats)
    flops = 2 * batch * c * c * 9 * h * h
    gflops = {k: flops / (t.median_ms * 1e6) for k, t in timed.items()}
    best = max(gflops, key=gflops.get)
    return {"channels": c, "size": h, "batch": batch, "flops": flops, "gflops": gflops, "best": best,
            "spread": {k: t.spread for k, t in timed.items()}}


def run(*, device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int | None = 2, warmup: int = 10,
        repeats: int = 40, quick: bool = False, progress: bool = True, batches: tuple[int, ...] = (64, 1),
        seed: int = 0, **_: Any) -> dict[str, Any]:
    """Time every stage x kept fraction x batch (module docstring; ``quick``: the demo's stages at batch 64);
    returns a JSON-able document with one row per layer: its GFLOP/s per candidate, the faster candidate, the
    spreads, and ``vs_dense``. CPU float32 only (the kernels compared); the time-budget options of the other
    kernel benchmarks are accepted and unused (every row runs ``repeats`` times)."""
    rows = []
    with cpu_float32_run("fused_conv2d", device, dtype, threads) as env:
        _row(STAGES[0][1], STAGES[0][2], batches[0], warmup, 1, seed)  # untimed: thread pool, kernels, allocator
        base = 0.0
        for case in stage_cases(KEEP, quick, batches):
            r = {**case, **_row(case["channels"], case["size"], case["batch"], warmup, repeats, seed)}
            base = r["gflops"][r["best"]] if r["keep"] == KEEP[0] else base  # the dense row comes first
            r["vs_dense"] = r["gflops"][r["best"]] / base
            rows.append(r)
            if progress:
                print(f"{r['network']} C={r['channels']} {r['size']}x{r['size']} b{r['batch']}: " + ", ".join(
                    f"{k} {v:.0f}" for k, v in r["gflops"].items()) + f" GFLOP/s, {r['vs_dense']:.2f} of dense",
                    file=sys.stderr, flush=True)
    return {"op": "fused_conv2d", "environment": env, "rows": rows}


def stage_cases(keeps: tuple[float, ...], quick: bool, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Every stage x batch x kept fraction, in that nesting (``quick``: the demo's stages and the first batch):
    the row fields ``network``, ``dense_channels``, ``size``, ``batch``, ``keep`` and ``channels``."""
    stages = STAGES[3:] if quick else STAGES
    return [{"network": net, "dense_channels": dense, "size": h, "batch": batch, "keep": keep,
             "channels": max(1, round(dense * keep))}
            for net, dense, h in stages for batch in (batches[:1] if quick else batches) for keep in keeps]


#: the first columns of a fixed-width table of stage rows (:func:`stage_table`)
STAGE_HEADER = f"{'stage':>14} {'keep':>5} {'C':>4} {'batch':>5}"


def stage_table(doc: dict[str, Any], layers: str, unit: str, columns: str,
                cells: Callable[[dict[str, Any]], str]) -> str:
    """A fixed-width text table of a document whose rows are stages x kept fractions x batches: ``layers``
    (what was timed) and ``unit`` in the title, the stage columns, then ``columns`` filled by ``cells(row)``."""
    env = doc["environment"]
    lines = [f"{layers}, channels-last float32 on {env['device_name']} ({env['threads']} threads); {unit} "
             "(spread = IQR / median)", f"{STAGE_HEADER} {columns}"]
    for r in doc["rows"]:
        stage = f"{r['network']} {r['dense_channels']}@{r['size']}"
        lines.append(f"{stage:>14} {r['keep']:>5.1f} {r['channels']:>4} {r['batch']:>5} {cells(r)}")
    return "\n".join(lines)


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    def cells(r: dict[str, Any]) -> str:
        g, s = r["gflops"], r["spread"]
        return (f"{g['onednn']:>7.0f} ({s['onednn']:>4.0%}) {g['direct']:>7.0f} ({s['direct']:>4.0%}) "
                f"{r['best']:>7} {r['vs_dense']:>9.2f}")

    return stage_table(doc, "3x3 convolutions + bias + ReLU", "GFLOP/s",
                       f"{'onednn':>14} {'direct':>14} {'best':>7} {'vs dense':>9}", cells)
