"""``sparsekern bench gpu --dry-run``: the GPU command's plan walked on CPU (Triton interpreter, tiny shapes), so
the command cannot rot between GPU windows; and the budget and failure handling of its runner.

The dry run runs as the user types it (``python -m sparsekern.cli bench gpu --dry-run``, in a subprocess with
``CUDA_VISIBLE_DEVICES=""``): it needs Triton imported under ``TRITON_INTERPRET=1``, which must not leak into
this test session, and it sets that up itself. It costs about 20 s of CPU on one thread. No timing figure is
checked.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsekern.bench import gpu
from sparsekern.bench.gpu_report import summary_table

VERSIONS = ("torch", "cuda", "cudnn", "driver", "triton", "nvcc", "device_name", "capability", "python", "git")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("gpu") / "dry.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the command sets it up itself
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "sparsekern.cli", "bench", "gpu", "--dry-run", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, env=env, timeout=900,
                          cwd=Path(gpu.__file__).resolve().parents[2])
    assert out.is_file(), done.stdout + done.stderr
    return done, json.loads(out.read_text())


def test_every_step_runs_or_is_skipped_for_want_of_cuda(dry_run) -> None:
    done, doc = dry_run
    steps = gpu.plan()
    assert [p["name"] for p in doc["plan"]] == [s.name for s in steps] == list(doc["steps"])
    for s in steps:
        rec = doc["steps"][s.name]
        if s.needs_cuda:
            assert (rec["status"], rec["reason"]) == ("skipped", gpu.NO_CUDA), s.name
        else:
            assert rec["status"] == "ok", f"{s.name}: {rec.get('reason')}\n{rec.get('traceback', '')}"
    assert done.returncode == 0, done.stderr[-3000:]
    assert doc["mode"] == "dry-run"
    assert "sparsekern bench gpu (dry-run)" in done.stdout and "goals:" in done.stdout


def test_the_document_records_versions_results_and_goals(dry_run) -> None:
    _, doc = dry_run
    assert set(VERSIONS) <= set(doc["environment"]) and doc["environment"]["triton"]
    assert doc["steps"]["build"]["result"]["kernels"]["lowrank_linear/cpu"]
    assert "skipped" in doc["steps"]["gpu_tests"]["result"]["counts"]  # every GPU test skips on CPU
    models = [p["name"] for p in doc["plan"] if doc["steps"][p["name"]]["status"] == "ok"
              and "case" in (doc["steps"][p["name"]]["result"] or {})]
    assert len(doc["results"]) == len(models) > 0
    assert all(r["case"]["device"] == "cpu" for r in doc["results"])
    kernels = [r["result"] for r in doc["steps"].values()
               if isinstance(r.get("result"), dict) and "rows" in r["result"]]
    assert {k["op"] for k in kernels} == {"channel_skip_conv2d", "lowrank_linear"}
    assert all(k["rows"] for k in kernels)
    assert set(doc["goals"]) == {"resnet50_static_efficiency_b64_fp16", "channel_skip_efficiency_keep0.5_b8plus",
                                 "lowrank_fused_vs_two_gemm_r128_t1024plus"}
    assert all(g["measured"] is None for g in doc["goals"].values())  # nothing measured on a GPU
    assert doc["thresholds"] == {}  # no GPU rows to derive them from
    assert Path(doc["steps"]["plot"]["result"]["path"]).is_file()


def test_budget_cuts_and_failures_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    def boom(ctx: gpu.Context) -> None:
        raise ValueError("broken step")

    steps = [gpu.Step("environment", "", 0, lambda ctx: {"device_name": "test"}),
             gpu.Step("fits", "", 0, lambda ctx: {"value": 1}),
             gpu.Step("too_long", "", 10_000, lambda ctx: pytest.fail("must be skipped")),
             gpu.Step("fails", "", 0, boom),
             gpu.Step("after", "", 0, lambda ctx: {"value": 2}),
             gpu.Step("cuda_only", "", 0, lambda ctx: {"value": 3}, needs_cuda=True)]
    ctx = gpu.Context(dry=False, out=tmp_path / "run.json", plot=tmp_path / "run.png", progress=False)
    doc = gpu.run_plan(ctx, steps, budget_s=60.0)
    on_disk = json.loads((tmp_path / "run.json").read_text())
    st = on_disk["steps"]
    assert [st[n]["status"] for n in st] == ["ok", "ok", "skipped", "failed", "ok", "ok"]
    assert st["too_long"]["reason"].startswith("budget:")
    assert "ValueError: broken step" in st["fails"]["traceback"]
    assert on_disk["environment"] == {"device_name": "test"} and doc["steps"] == st
    assert "fails" in summary_table(on_disk)
    only = gpu.run_plan(gpu.Context(dry=True, out=tmp_path / "dry.json", plot=tmp_path / "d.png", progress=False),
                        steps[:1] + steps[-2:], budget_s=60.0, only={"after"})
    assert {n: r["status"] for n, r in only["steps"].items()} == {"environment": "ok", "after": "ok",
                                                                   "cuda_only": "skipped"}
    assert only["steps"]["cuda_only"]["reason"] == "not selected (--only)"


def test_compile_check_reports_each_source_and_kernel(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """The ``--compile-check`` plumbing, with the compilers stubbed (the real nvcc run costs minutes; see
    tests/csrc/test_cuda_bindings_compile.py and test_triton_ptx.py for the compilers themselves)."""
    import argparse

    from sparsekern.bench import gpu_compile

    nvcc = [{"source": "a.cu", "ok": True, "seconds": 1.0, "stderr": ""},
            {"source": "b.cuh", "ok": False, "seconds": 1.0, "stderr": "error: boom"}]
    ptx = [{"kernel": "k", "arch": 90, "dtype": "fp16", "tensor_cores": "wgmma", "cubin_bytes": 1},
           {"kernel": "k", "arch": 80, "dtype": "bf16", "tensor_cores": "none", "cubin_bytes": 1}]
    monkeypatch.setattr(gpu_compile, "nvcc_check", lambda threads: nvcc)
    monkeypatch.setattr(gpu_compile, "triton_ptx", lambda: ptx)
    parser = argparse.ArgumentParser()
    gpu.add_parser(parser.add_subparsers())
    args = parser.parse_args(["gpu", "--compile-check", "--threads", "3"])
    assert args.run(args) == 1
    out = capsys.readouterr()
    assert "nvcc a.cu: ok" in out.out and "nvcc b.cuh: FAILED" in out.out and "error: boom" in out.err
    assert "triton k sm_90 fp16: wgmma" in out.out and "sm_80 bf16: none (want mma)" in out.out
    nvcc[1]["ok"], ptx[1]["tensor_cores"] = True, "mma"
    assert args.run(args) == 0
