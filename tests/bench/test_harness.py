"""sparsekern.bench: structure and bookkeeping of the harness. No assertion on measured speed."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import sparsekern as sk
from sparsekern.bench import (
    BenchReport,
    Timing,
    compare,
    environment,
    plot_speedup,
    set_threads,
    time_interleaved,
)
from sparsekern.bench.plot import plot_layers
from sparsekern.bench import timing
from sparsekern.bench.timing import allocator, hold_freed_memory, rotation
from sparsekern.cost import flops

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FAST = {"warmup": 1, "repeats": 3}


def toy_cnn(w: int) -> nn.Module:
    torch.manual_seed(w)
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.BatchNorm2d(w),
        nn.ReLU(),
        nn.Conv2d(w, w, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(w, 10),
    )


@pytest.fixture(scope="module")
def report() -> BenchReport:
    dense, fast = toy_cnn(16), toy_cnn(8)
    return compare(dense, fast, torch.randn(2, 3, 16, 16), label="toy", threads=1, **FAST)


# ----------------------------------------------------------------------------- timing
def test_time_interleaved_structure_and_rotating_order() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = time_interleaved(fns, warmup=2, repeats=5)
    assert list(out) == ["a", "b", "c"]
    for t in out.values():
        assert isinstance(t, Timing)
        assert t.n == 5 and len(t.samples) == 5
        assert t.p10_ms <= t.median_ms <= t.p90_ms
        assert t.iqr_ms >= 0 and t.spread >= 0
    assert len(calls) == 3 * (2 + 5)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert rounds == [rotation(["a", "b", "c"], r) for r in range(7)]
    assert rounds[0] == ["a", "b", "c"] and rounds[1] == ["b", "c", "a"] and rounds[2] == ["c", "a", "b"]
    # every function runs in every position equally often over a full cycle
    assert {tuple(r) for r in rounds[:3]} == {tuple(r) for r in rounds[3:6]}


def test_time_interleaved_blocks_rewarm_then_time_consecutive_calls() -> None:
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    out = time_interleaved(fns, warmup=1, repeats=5, block=3)
    assert out["a"].n == out["b"].n == 6  # 5 timed calls rounded up to two turns of 3
    assert calls[:2] == ["a", "b"]  # the warm-up round
    turns = [calls[i:i + 4] for i in range(2, len(calls), 4)]  # one untimed call, then 3 timed ones
    assert [t[0] for t in turns] == [name for r in range(1, 3) for name in rotation(["a", "b"], r)]
    assert all(len(set(t)) == 1 and len(t) == 4 for t in turns)
    with pytest.raises(ValueError, match="block"):
        time_interleaved(fns, block=0)


def test_time_interleaved_min_time_adds_rounds() -> None:
    import time

    n = {"x": 0}

    def f() -> None:
        n["x"] += 1
        time.sleep(0.004)

    out = time_interleaved({"f": f}, warmup=0, repeats=1, min_time_s=0.02)
    assert out["f"].n >= 2  # one 4 ms round cannot reach 20 ms
    assert n["x"] == out["f"].n


def test_time_interleaved_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        time_interleaved({})
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, repeats=0)


def test_timing_summary_statistics() -> None:
    t = Timing.from_samples([5.0, 1.0, 4.0, 2.0, 3.0])
    assert t.median_ms == 3.0
    assert t.mean_ms == 3.0
    assert t.p10_ms == pytest.approx(1.4)
    assert t.p90_ms == pytest.approx(4.6)
    assert t.iqr_ms == pytest.approx(2.0)
    assert t.spread == pytest.approx(2.0 / 3.0)
    assert t.samples == [5.0, 1.0, 4.0, 2.0, 3.0]  # order taken is kept
    assert Timing.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_set_threads_restores() -> None:
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1  # a count different from the session's, so that a missing restore shows
    with set_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with set_threads(None):
        assert torch.get_num_threads() == before


def test_environment_is_json_and_hostname_free() -> None:
    env = environment()
    text = json.dumps(env)
    for key in ("device", "device_name", "torch", "threads", "dtype", "batch"):
        assert key in env
    assert env["torch"] == torch.__version__
    host = socket.gethostname()
    if len(host) >= 6:
        assert host not in text
    assert env["cpu_isa"] == torch.backends.cpu.get_cpu_capability()


def test_environment_names_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MALLOC_")] + ["LD_PRELOAD", "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(timing, "_HELD", {})
    assert allocator() == "default malloc"
    if platform.libc_ver()[0] == "glibc":  # compare() holds freed memory first, and the report says so
        monkeypatch.setattr(timing, "_HELD", {})
        report = compare(nn.Linear(4, 4), nn.Linear(4, 2), torch.randn(2, 4), warmup=1, repeats=1, per_layer=False)
        assert "freed memory held: mmap threshold 32 MiB, trim threshold 1024 MiB" in report.env["allocator"]
        assert hold_freed_memory()  # applied once; asking again with the same settings is a no-op
        monkeypatch.setattr(timing, "_HELD", {})
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "33554432")
    assert allocator() == "default malloc (MALLOC_MMAP_THRESHOLD_=33554432)"
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /opt/other.so")
    assert allocator() == "LD_PRELOAD libjemalloc.so.2" == environment()["allocator"]


# ----------------------------------------------------------------------------- compare
def test_compare_theoretical_speedup_is_flop_ratio(report: BenchReport) -> None:
    x = torch.randn(2, 3, 16, 16)
    fd, ff = flops(toy_cnn(16).eval(), x).total, flops(toy_cnn(8).eval(), x).total
    assert report.dense_flops == fd and report.fast_flops == ff
    assert report.theoretical_speedup == pytest.approx(fd / ff)
    assert report.measured_speedup == pytest.approx(report.dense.median_ms / report.fast.median_ms)
    assert report.efficiency == pytest.approx(report.measured_speedup / report.theoretical_speedup)
    assert report.dense.n == 3 and report.fast.n == 3
    assert (report.device, report.dtype, report.batch, report.threads) == ("cpu", "float32", 2, 1)
    assert report.env["dtype"] == "float32" and report.env["batch"] == 2


def test_compare_per_layer_rows(report: BenchReport) -> None:
    assert [row.name for row in report.layers] == ["0", "3", "7"]
    conv0, conv3, fc = report.layers
    # conv0: C_in=3 fixed, C_out halves -> 2x; conv3: both halve -> 4x; linear: in halves -> 2x
    assert conv0.theoretical_speedup == pytest.approx(2.0)
    assert conv3.theoretical_speedup == pytest.approx(4.0)
    assert fc.theoretical_speedup == pytest.approx(2.0)
    assert conv3.dense_input_shape == [2, 16, 16, 16] and conv3.fast_input_shape == [2, 8, 16, 16]
    for row in report.layers:
        assert row.dense_kind in ("Conv2d", "Linear") and row.fast_kind == row.dense_kind
        assert row.dense_ms > 0 and row.fast_ms > 0
        assert row.efficiency == pytest.approx(row.measured_speedup / row.theoretical_speedup)
    assert report.unmatched_layers == []


def test_compare_json_round_trip_and_table(report: BenchReport, tmp_path: Path) -> None:
    d = json.loads(json.dumps(report.to_dict()))
    assert BenchReport.from_dict(d) == report
    path = tmp_path / "r.json"
    report.save_json(path)
    assert BenchReport.load_json(path) == report
    text = report.table()
    for col in ("layer", "dense MFLOPs", "fast MFLOPs", "theory x", "measured x", "efficiency",
                "dense ms", "fast ms", "spread"):
        assert col in text
    for item in ("device=cpu", "dtype=float32", "batch=2", "threads=1", "<model>"):
        assert item in text
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + 1 + 3  # header, column names, model, three layers
    assert len({len(line) for line in lines[1:]}) == 1  # aligned: last column right-justified


def test_compare_graph_module_and_restores_modes() -> None:
    dense, fast = toy_cnn(16), fx.symbolic_trace(toy_cnn(8))
    dense.train()
    r = compare(dense, fast, torch.randn(2, 3, 16, 16), **FAST)
    assert dense.training and dense[1].training  # restored
    assert [row.name for row in r.layers] == ["0", "3", "7"]


def test_compare_reports_unmatched_layers() -> None:
    dense = toy_cnn(8)
    fast = nn.Sequential(*list(toy_cnn(8).children())[:3], nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10))  # "3" is a pool here, "7" does not exist
    r = compare(dense, fast, torch.randn(1, 3, 8, 8), **FAST)
    assert [row.name for row in r.layers] == ["0"]
    assert set(r.unmatched_layers) == {"3", "7"}
    assert "not in fast model" in r.table()


def test_compare_rejects_zero_input() -> None:
    with pytest.raises(ValueError, match="all zeros"):
        compare(toy_cnn(8), toy_cnn(4), torch.zeros(1, 3, 8, 8), **FAST)


def test_sk_bench_namespace() -> None:
    assert sk.bench.compare is compare


def test_import_is_light() -> None:
    code = "import sys, sparsekern.bench; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- plots
def test_plot_speedup_writes_png(report: BenchReport, tmp_path: Path) -> None:
    other = report.to_dict()
    other.update(batch=8, theoretical_speedup=2.0, measured_speedup=1.5)
    for x in ("theoretical", "reduction"):
        path = tmp_path / f"speedup_{x}.png"
        assert plot_speedup([report.to_dict(), other, report], path, x=x) == str(path)
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_plot_layers_writes_png(report: BenchReport, tmp_path: Path) -> None:
    path = tmp_path / "layers.png"
    plot_layers(report, path)
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_static_language_model_case_prunes_heads_and_mlps_on_token_inputs() -> None:
    from sparsekern.bench.models import Case, lm_table, run_case

    kwargs = (("d_model", 32), ("layers", 1), ("heads", 4), ("context", 16))
    case = Case("transformer_lm", 0.5, 1, 16, scope="internal", round_to=None, passes=(), model_kwargs=kwargs)
    report = run_case(case, threads=1, warmup=1, repeats=2)
    assert report.theoretical_speedup > 1.2  # half the heads and MLP neurons of the only block
    doc = {"results": [{"case": {**case.__dict__, "model_kwargs": dict(kwargs)}, **report.to_dict()}]}
    assert "L1, 50% of heads and MLP" in lm_table(doc)
