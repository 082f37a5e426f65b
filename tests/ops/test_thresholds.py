"""GPU dispatch thresholds read from injected results tables (sparsekern/ops/thresholds.py), and the fallback to
the estimates; on a GPU, the dispatch of both ops follows an injected table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sparsekern.ops import thresholds
from sparsekern.ops.thresholds import ESTIMATES, GpuThresholds, lookup

H100 = "NVIDIA H100 80GB HBM3"
MEASURED = {"lowrank_min_fused_tokens": 512, "lowrank_fused_order": ["triton", "cuda"],
            "channel_skip_order": ["triton", "cuda"]}


def _table(folder: Path, name: str, device: str, capability: list[int] | None, section: object) -> Path:
    path = folder / name
    path.write_text(json.dumps({"environment": {"device_name": device, "capability": capability},
                                "thresholds": section}))
    return path


@pytest.fixture(autouse=True)
def _fresh_cache():
    thresholds.reload()
    yield
    thresholds.reload()


def test_no_table_means_the_estimates(tmp_path: Path) -> None:
    assert lookup(H100, (9, 0), tmp_path) == ESTIMATES
    assert lookup(H100, (9, 0), tmp_path / "missing") == ESTIMATES
    assert ESTIMATES.source == "estimate"


def test_a_table_applies_by_device_name_then_by_capability(tmp_path: Path) -> None:
    path = _table(tmp_path, "cuda-nvidia-h100-80gb-hbm3.json", H100, [9, 0], MEASURED)
    by_name = lookup(H100, None, tmp_path)
    assert by_name == GpuThresholds(512, ("triton", "cuda"), ("triton", "cuda"), source=str(path))
    assert lookup("NVIDIA H200", (9, 0), tmp_path) == by_name  # same device class
    assert lookup("NVIDIA A100-SXM4-80GB", (8, 0), tmp_path) == ESTIMATES


def test_a_name_match_beats_a_capability_match(tmp_path: Path) -> None:
    _table(tmp_path, "cuda-a.json", "NVIDIA H200", [9, 0], {"lowrank_min_fused_tokens": 64})
    _table(tmp_path, "cuda-b.json", H100, [9, 0], {"lowrank_min_fused_tokens": 256})
    assert lookup(H100, (9, 0), tmp_path).lowrank_min_fused_tokens == 256
    assert lookup("NVIDIA H800", (9, 0), tmp_path).lowrank_min_fused_tokens == 64  # first file of equal rank


def test_missing_or_malformed_thresholds_keep_their_estimates(tmp_path: Path) -> None:
    _table(tmp_path, "cuda-x.json", H100, [9, 0], {"lowrank_min_fused_tokens": "many", "channel_skip_order": ["cudnn"],
                                                   "lowrank_fused_order": ["triton"]})
    got = lookup(H100, (9, 0), tmp_path)
    assert got.lowrank_min_fused_tokens == ESTIMATES.lowrank_min_fused_tokens
    assert got.channel_skip_order == ESTIMATES.channel_skip_order
    assert got.lowrank_fused_order == ("triton",)
    (tmp_path / "cuda-x.json").write_text("{not json")
    _table(tmp_path, "cuda-y.json", H100, [9, 0], None)  # a run cut short before the thresholds step
    _table(tmp_path, "other.json", H100, [9, 0], MEASURED)  # not a cuda-*.json results file
    assert lookup(H100, (9, 0), tmp_path) == ESTIMATES


def test_for_device_reads_the_results_folder_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSEKERN_GPU_RESULTS", str(tmp_path))
    monkeypatch.setattr(thresholds, "_identity", lambda device: (H100, (9, 0)))
    assert thresholds.for_device("cuda:0") == ESTIMATES
    _table(tmp_path, "cuda-h100.json", H100, [9, 0], MEASURED)
    assert thresholds.for_device("cuda:0") == ESTIMATES  # cached
    thresholds.reload()
    assert thresholds.for_device("cuda:0").lowrank_min_fused_tokens == 512


def test_derived_thresholds_round_trip(tmp_path: Path) -> None:
    """What ``sparsekern bench gpu`` derives from its kernel rows is what the dispatch reads back."""
    from sparsekern.bench.gpu_report import derive_thresholds

    env = {"device": "cuda", "dtype": "float16"}
    lowrank = [{"tokens": t, "r": 64, "fused_vs_two_gemm": f, "ms": {"cuda": c, "triton": 1.0}}
               for t, f, c in ((16, 0.7, 2.0), (128, 0.9, 2.0), (256, 1.1, 2.0), (1024, 1.3, 2.0))]
    conv = [{"kernels": {"cuda": {"ms": 1.0}, "triton": {"ms": 3.0}}}]
    steps = {"lowrank": {"status": "ok", "result": {"op": "lowrank_linear", "environment": env, "rows": lowrank}},
             "conv": {"status": "ok", "result": {"op": "channel_skip_conv2d", "environment": env, "rows": conv}},
             "cpu": {"status": "ok", "result": {"op": "lowrank_linear", "environment": {"device": "cpu"},
                                                 "rows": [{"tokens": 1, "r": 1, "fused_vs_two_gemm": 9.0}]}}}
    derived = derive_thresholds(steps)
    assert derived == {"lowrank_min_fused_tokens": 256, "lowrank_fused_order": ["triton", "cuda"],
                       "channel_skip_order": ["cuda", "triton"]}
    _table(tmp_path, "cuda-h100.json", H100, [9, 0], derived)
    got = lookup(H100, (9, 0), tmp_path)
    assert (got.lowrank_min_fused_tokens, got.lowrank_fused_order, got.channel_skip_order) == (
        256, ("triton", "cuda"), ("cuda", "triton"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_dispatch_follows_an_injected_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekern.ops import lowrank_linear
    from sparsekern.ops.channel_skip_conv2d import select_backend as conv_backend
    from sparsekern.ops.lowrank_linear import select_backend

    x = torch.randn(4096, 512, device="cuda", dtype=torch.float16)
    q = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    p = torch.randn(512, 64, device="cuda", dtype=torch.float16)
    xc = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.float16)
    w = torch.randn(16, 16, 3, 3, device="cuda", dtype=torch.float16)
    conv = (xc, w, None, None, None, [1, 1], [1, 1], [1, 1], False)
    monkeypatch.setenv("SPARSEKERN_GPU_RESULTS", str(tmp_path))
    _table(tmp_path, "cuda-this.json", torch.cuda.get_device_name(0), None,
           {"lowrank_min_fused_tokens": 10**9, "channel_skip_order": ["triton", "cuda"]})
    thresholds.reload()
    assert select_backend(x, q, p) == "two_gemm"
    assert conv_backend(*conv) == "triton"
    _table(tmp_path, "cuda-this.json", torch.cuda.get_device_name(0), None,
           {"lowrank_min_fused_tokens": 1, "lowrank_fused_order": ["triton", "cuda"]})
    thresholds.reload()
    assert select_backend(x, q, p) == "triton"
    assert lowrank_linear.GPU_MIN_FUSED_TOKENS == ESTIMATES.lowrank_min_fused_tokens
