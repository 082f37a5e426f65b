"""pytest-benchmark suite: dense vs compiled zoo models through the frozen inference path.

Run with ``python -m pytest bench/bench_models.py --benchmark-only`` (not part of the test suite). The
figures the README cites come from ``sparsekern bench models --out bench/results/cpu.json``, which uses
the same harness (sparsekern.bench) with interleaved timing; this suite is for quick local comparisons.
"""
from __future__ import annotations

import copy

import pytest
import torch

import sparsekern as sk
from sparsekern.bench.models import DEFAULT_PASSES
from sparsekern.methods import l1_norm
from sparsekern.models import build

CASES = [("resnet56", 32, 64, 4), ("resnet18", 224, 1, 16)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-b{c[2]}")
def models(request):
    name, size, batch, round_to = request.param
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = build(name).eval()
    x = torch.randn(batch, 3, size, size)
    fast = sk.compile(model, l1_norm.prune(model, x, ratio=0.5, scope="all"), x, round_to=round_to)
    run = {k: sk.passes.apply(copy.deepcopy(m), DEFAULT_PASSES, x) for k, m in (("dense", model), ("fast", fast))}
    return run, x


@pytest.mark.parametrize("which", ["dense", "fast"])
def test_forward(benchmark, models, which: str) -> None:
    run, x = models
    with torch.inference_mode():
        benchmark.pedantic(run[which], args=(x,), warmup_rounds=5, rounds=20)
