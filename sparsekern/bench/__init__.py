"""Benchmark harness: theoretical FLOP speedup vs measured wall-clock speedup.

Everything here times through :func:`time_interleaved` (docs/design.md#measuring). Importing
this package does not import matplotlib; :func:`plot_speedup` / :func:`plot_layers` do, lazily.

    report = sk.bench.compare(dense, fast, x, threads=1, label="resnet18 l1 50%")
    print(report.table()); report.save_json("results/cpu.json")
"""
from sparsekern.bench.plot import plot_layers, plot_speedup
from sparsekern.bench.report import BenchReport, LayerBench, check_not_zero, compare
from sparsekern.bench.timing import Timing, environment, set_threads, time_interleaved

__all__ = [
    "compare",
    "BenchReport",
    "LayerBench",
    "check_not_zero",
    "time_interleaved",
    "Timing",
    "set_threads",
    "environment",
    "plot_speedup",
    "plot_layers",
]
