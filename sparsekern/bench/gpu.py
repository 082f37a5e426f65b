"""``sparsekern bench gpu``: build, check and measure every GPU path in one process, within a time budget.

GPU time comes in short windows, so one command does everything, most informative first, and leaves data when
it is cut short. It runs the steps of :func:`plan` in order:

1. ``environment``: torch, CUDA runtime, cuDNN, driver, Triton, nvcc and device versions, compute capability.
2. ``build``: the C++/CUDA extension (every ``csrc/cuda/*.cu`` and ``*.cuh``; ninja, cached) and which native
   kernels registered; ``warm_kernels``: every GPU backend of the ops once in fp16 (Triton compiles and
   autotunes), checked against the reference.
3. ``gpu_tests``: ``pytest -m gpu`` on the test files that hold GPU-marked tests, in a subprocess; its output
   is kept.
4. Headlines: one row of each kernel family (:mod:`~sparsekern.bench.kernel_channel_skip_conv2d` on a ResNet-50
   3x3 layer at keep 0.5, batch 64; :mod:`~sparsekern.bench.kernel_lowrank_linear` at 4096 x 4096, r = 128) and
   static ResNet-50 50 % at batch 64 (fp16, channels-last; eager, then CUDA graphs).
5. The rest: the kernel grids (ResNet-50/18 and VGG-16 shapes, keep 0.25/0.5/0.75, batch 1/8/64, fp16, bf16,
   fp32; tokens 1-8192, ranks 32-1024), ResNet-50 30 %/50 % at batch 1/8/64 with and without CUDA graphs and
   ``round_to`` 8/32/64, SANP VGG-16/ResNet-18 and FLOP Transformer/SRU (:mod:`~sparsekern.bench.models`).
6. ``thresholds``: the dispatch thresholds derived from the kernel rows
   (:func:`~sparsekern.bench.gpu_report.derive_thresholds`, read back by
   :mod:`sparsekern.ops.thresholds`); ``plot``: the speedup plot of the model rows.

Budget: before each step the time left (``--budget-s`` from the start of the command) is compared with the
step's estimate (seconds on an H100 with cold caches; for a kernel grid, the least time worth starting it); a
step that does not fit is skipped with the reason, and so is every later step that does not fit. Kernel grids
start no new row after ``GRID_LIMIT_S`` or ``budget - RESERVE_S`` (their document says how many of its
``cases`` ran; ``--only`` with a larger budget continues the grids in a later window); steps
estimated at 0 (environment, thresholds, plot) always run. A failing step records its traceback and the run
goes on.
``--only STEP ...`` reruns the named steps and keeps the other steps' records (and model rows) from ``--out``.

Results: ``bench/results/cuda-<device name>.json`` (:func:`default_out`), rewritten after every step through
:func:`~sparsekern.bench.results.write_part` (read by :mod:`sparsekern.bench.gpu_report`): ``command``, ``mode``
(``"gpu"`` / ``"dry-run"``), ``budget_s``, ``environment``, ``plan`` (name, title, estimate_s, needs_cuda of every
step), ``steps`` (name -> ``status`` ``"ok"`` / ``"failed"`` / ``"skipped"``, ``seconds``, ``reason``,
``traceback``, ``result``), ``results`` (the model rows, :meth:`~sparsekern.bench.report.BenchReport.to_dict`
plus ``case`` and ``step``, as in ``cpu.json``), ``goals`` (the issue's GPU targets against what was measured)
and ``thresholds``.

Dry run (``--dry-run``): the same steps, in the same order, into the same JSON structure, on CPU: Triton kernels
in the interpreter (``TRITON_INTERPRET=1``), kernels on tiny shapes, the CNN cases on ResNet-20 at 16x16 (the
same builders, compiler and passes), GPU tests skipped (``CUDA_VISIBLE_DEVICES=""``), estimates counted as 0.
Steps that exist only for a CUDA feature (CUDA graphs) are skipped with the reason ``"no CUDA device"``. It writes
to ``--out`` or a temporary file, never to ``bench/results/cuda-*.json``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparsekern.bench.gpu_report import derive_thresholds, goals, summary_table

__all__ = ["Step", "Context", "plan", "run_plan", "default_out", "versions", "add_parser", "NO_CUDA"]

NO_CUDA = "no CUDA device"
#: Seconds of the budget kept for the last steps (thresholds, plot) and writing: kernel grids stop before.
RESERVE_S = 15.0
#: Seconds a kernel grid step may take before it starts no new row (so one grid cannot starve the steps after it).
GRID_LIMIT_S = 45.0
#: Seconds ``pytest -m gpu`` may take before it is stopped (its output so far is kept): with cold caches Triton
#: compiles every autotuning config of every dtype the tests use.
GPU_TESTS_LIMIT_S = 150.0
GPU_PASSES = ("fold_bn", "channels_last")


@dataclass(frozen=True)
class Step:
    """One unit of work: ``run(ctx)`` returns a JSON-able result. ``estimate_s``: seconds it is expected to take
    on an H100 with cold caches (the budget check). ``needs_cuda``: the dry run skips it (``NO_CUDA``).
    ``limit_s``: a kernel grid starts no new row after this many seconds of the step (``ctx.deadline``)."""

    name: str
    title: str
    estimate_s: float
    run: Callable[["Context"], Any]
    needs_cuda: bool = False
    limit_s: float | None = None


@dataclass
class Context:
    """What the steps share: ``dry`` (CPU dry run), ``device`` (``"cuda"`` / ``"cpu"``), ``out`` (the JSON),
    ``plot`` (the PNG), ``progress`` (per-row lines on stderr), ``repo`` (the checkout: ``tests/``, ``csrc/``),
    ``results`` (model rows so far, each naming its ``step``), ``steps`` (step records so far), ``current``
    (the step running) and ``deadline`` (``time.perf_counter()`` value after which a kernel grid starts no new
    row)."""

    dry: bool
    out: Path
    plot: Path
    progress: bool = True
    repo: Path = field(default_factory=lambda: Path(__file__).resolve().parents[2])
    results: list[dict[str, Any]] = field(default_factory=list)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    current: str = ""
    deadline: float | None = None

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"


def default_out(device_name: str, folder: str | Path | None = None) -> Path:
    """``cuda-<device name, lower case, runs of other characters as '-'>.json`` in ``folder``, by default the one
    the dispatch thresholds are read from (:func:`sparsekern.ops.thresholds.results_dir`, ``bench/results``)."""
    from sparsekern.ops.thresholds import results_dir

    slug = re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") or "unknown"
    return (results_dir() if folder is None else Path(folder)) / f"cuda-{slug}.json"


# ----------------------------------------------------------------------------------------- environment

def _command_output(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def versions(device: str) -> dict[str, Any]:
    """The environment of :func:`sparsekern.bench.timing.environment` plus what GPU figures depend on:
    ``capability`` ([major, minor]), ``sm_count``, ``memory_gib``, ``cudnn``, ``driver``, ``triton``, ``nvcc``,
    ``git`` (commit, ``+dirty`` when the tree has changes). Missing pieces are None."""
    import torch

    from sparsekern.bench.timing import environment

    env = environment(device)
    env.update(capability=None, sm_count=None, memory_gib=None, driver=None)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(capability=list(torch.cuda.get_device_capability(0)), sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
        env["driver"] = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    nvcc = _command_output(["nvcc", "--version"])
    env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    repo = Path(__file__).resolve().parents[2]
    commit = _command_output(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    env["git"] = None if commit is None else commit + ("+dirty" if dirty else "")
    return env


def _environment(ctx: Context) -> dict[str, Any]:
    return versions(ctx.device)


# ----------------------------------------------------------------------------------------- build and checks

def _build(ctx: Context) -> dict[str, Any]:
    """Build (or load the cached) extension; on GPU both ops must have registered a CUDA kernel."""
    from sparsekern.ops import extension

    start = time.perf_counter()
    module = extension.load()
    path = getattr(module, "__file__", None)
    kernels = {f"{op}/{dev}": extension.kernel(f"{op}_{dev}") is not None
               for op in ("channel_skip_conv2d", "lowrank_linear") for dev in ("cpu", "cuda")}
    from torch.utils.cpp_extension import CUDA_HOME

    result = {"library": path, "error": extension.status(), "seconds": round(time.perf_counter() - start, 1),
              "kernels": kernels, "cuda_home": CUDA_HOME, "with_cuda": extension.with_cuda()}
    missing = [k for k, ok in kernels.items() if not ok and k.endswith("/" + ctx.device)]
    if missing:
        if path is None:  # load() keeps one line of the error; building again gives the compiler's whole log
            try:
                extension.build()
            except Exception as e:  # the log is the point
                result["log"] = str(e)[-20000:]
        raise _StepFailed(f"the extension has no kernel for {missing} ({result['error'] or 'built without them'})",
                          result)
    return result


def _warm_kernels(ctx: Context) -> dict[str, Any]:
    """Run every GPU backend of the ops once on small fp16 inputs (compile, autotune) and check it."""
    import torch

    from sparsekern.ops import channel_skip_conv2d, lowrank_linear, reference, sru_recurrence
    from sparsekern.ops.sru_recurrence import sru_recurrence_reference

    g = torch.Generator().manual_seed(0)
    backends = ("triton",) if ctx.dry else ("triton", "cuda")
    out: dict[str, Any] = {}
    to = {"device": ctx.device, "dtype": torch.float16}
    x = torch.randn(2, 16, 8, 8, generator=g).to(**to)
    w = (torch.randn(24, 16, 3, 3, generator=g) / 12).to(**to)
    b = torch.randn(24, generator=g).to(**to)
    im = (torch.rand(2, 16, generator=g) < 0.5).to(ctx.device)
    om = (torch.rand(2, 24, generator=g) < 0.5).to(ctx.device)
    conv_args = (x, w, b, im, om, [1, 1], [1, 1], [1, 1], True)
    t = torch.randn(64, 48, generator=g).to(**to)
    q = (torch.randn(16, 48, generator=g) / 7).to(**to)
    p = (torch.randn(40, 16, generator=g) / 4).to(**to)
    lb = torch.randn(40, generator=g).to(**to)
    sru_args = [torch.randn(*shape, generator=g).to(**to) for shape in ((2, 9, 60), (2, 9, 20), *[(20,)] * 4)]
    for backend in backends:
        for op, got, want in (
            ("channel_skip_conv2d", lambda: channel_skip_conv2d(*conv_args, backend=backend),
             lambda: reference.channel_skip_conv2d(*conv_args)),
            ("lowrank_linear", lambda: lowrank_linear(t, q, p, lb, backend=backend),
             lambda: reference.lowrank_linear(t, q, p, lb)),
            ("sru_recurrence", lambda: sru_recurrence(*sru_args, backend=backend),
             lambda: sru_recurrence_reference(*sru_args)),
        ):
            key = f"{op}/{backend}/float16"
            start = time.perf_counter()
            try:
                y, ref = got().float(), want().float()
                if ctx.device == "cuda":
                    torch.cuda.synchronize()
            except Exception as e:  # the other backends still warm up
                out[key] = {"error": f"{type(e).__name__}: {e}"}
                continue
            err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
            out[key] = {"max_rel_error": err, "seconds": round(time.perf_counter() - start, 2)}
            if not err <= 1e-2:
                out[key]["error"] = f"max error {err:.2e} x output scale against the reference"
    bad = {k: v["error"] for k, v in out.items() if "error" in v}
    if bad:
        raise _StepFailed(f"{len(bad)} of {len(out)} kernels failed: {bad}", out)
    return out


def gpu_test_files(tests: Path) -> list[Path]:
    """The test modules under ``tests`` that hold ``pytest.mark.gpu`` tests."""
    return sorted(p for p in tests.rglob("test_*.py") if "mark.gpu" in p.read_text(errors="replace"))


def _gpu_tests(ctx: Context, timeout_s: float) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess; fails when a test failed or errored (skips are fine in the dry run)."""
    files = gpu_test_files(ctx.repo / "tests")
    if not files:
        raise FileNotFoundError(f"no GPU-marked test files under {ctx.repo / 'tests'} (run from a checkout)")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rfEs", "-p", "no:cacheprovider",
           *map(str, files)]
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if ctx.dry else {})}
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ctx.repo, capture_output=True, text=True, timeout=max(timeout_s, 1.0), env=env)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:  # its captured output is bytes, whatever text= says
        output = "".join(b.decode(errors="replace") if isinstance(b, bytes) else b for b in (e.stdout, e.stderr) if b)
        output, code = output + f"\n[stopped after {timeout_s:.0f} s]", None
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", output)}
    result = {"command": " ".join(cmd), "returncode": code, "counts": counts,
              "seconds": round(time.perf_counter() - start, 1), "output": output[-20000:]}
    if code not in (0, 5) or counts.get("failed") or counts.get("error") or counts.get("errors"):
        raise _StepFailed(f"pytest -m gpu: exit {code}, {counts}", result)
    if not ctx.dry and not counts.get("passed"):
        raise _StepFailed(f"pytest -m gpu ran no test on the GPU: {counts}", result)
    return result


class _StepFailed(Exception):
    """A step failed but has a result worth keeping (e.g. the test output)."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


# ----------------------------------------------------------------------------------------- kernel steps

_TINY_CONV = dict(model="tiny", layer="conv", c_in=8, c_out=8, kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                  dilation=(1, 1), h=6, w=6)


def _headline_shape():  # noqa: ANN202
    from sparsekern.bench.kernel_channel_skip_conv2d import model_shapes

    shapes = model_shapes("resnet50")
    return [next((s for s in shapes if (s.c_in, s.c_out, s.kernel, s.h) == (256, 256, (3, 3), 14)), shapes[0])]


def _channel_skip(dtype: str, shapes: Callable[[], list] | tuple[str, ...], batches: tuple[int, ...],
                  keeps: tuple[float, ...], modes: tuple[str, ...] = ("out", "in+out")) -> Callable[[Context], Any]:
    def run(ctx: Context) -> dict[str, Any]:
        import torch

        from sparsekern.bench import kernel_channel_skip_conv2d as bench

        if ctx.dry:
            return bench.run(device="cpu", dtype=torch.float32, shapes=[bench.LayerShape(**_TINY_CONV)],
                             batches=(2,), keeps=(0.5,), modes=modes, threads=1, warmup=1, repeats=2, budget_s=0.01,
                             min_repeats=1, progress=False)
        chosen = shapes() if callable(shapes) else bench.gpu_shapes(shapes)
        return bench.run(device="cuda", dtype=getattr(torch, dtype), shapes=chosen, batches=batches, keeps=keeps,
                         modes=modes, progress=ctx.progress, deadline=ctx.deadline)
    return run


def _lowrank(dtype: str, tokens: tuple[int, ...], dims: tuple[tuple[int, int], ...],
             ranks: tuple[int, ...]) -> Callable[[Context], Any]:
    def run(ctx: Context) -> dict[str, Any]:
        import torch

        from sparsekern.bench import kernel_lowrank_linear as bench

        if ctx.dry:
            return bench.run(device="cpu", dtype=torch.float32, tokens=(16,), dims=((32, 32),), ranks=(4,),
                             threads=1, warmup=1, repeats=2, budget_s=0.01, min_repeats=1, progress=False)
        return bench.run(device="cuda", dtype=getattr(torch, dtype), tokens=tokens, dims=dims, ranks=ranks,
                         progress=ctx.progress, deadline=ctx.deadline)
    return run


# ----------------------------------------------------------------------------------------- model steps

def _dry_case(case):  # noqa: ANN001, ANN202
    """The same case on CPU, tiny: the CNNs replaced by ResNet-20 (same builder, compiler and passes), 16x16
    images or 16-token contexts, batch <= 2, float32, no CUDA graphs."""
    from dataclasses import replace

    model = case.model if case.method == "flop" else "resnet20"
    return replace(case, model=model, batch=min(case.batch, 2), size=16, device="cpu", dtype="float32",
                   cuda_graphs=False, model_kwargs=())


def _model(case_args: dict[str, Any]) -> Callable[[Context], Any]:
    def run(ctx: Context) -> dict[str, Any]:
        import torch

        from sparsekern.bench.models import Case, run_case

        case = Case(**{"device": "cuda", "dtype": "float16", "passes": GPU_PASSES, **case_args})
        if ctx.dry:
            case = _dry_case(case)
        with torch.no_grad():
            report = run_case(case, threads=1 if ctx.dry else None, warmup=1 if ctx.dry else 10,
                              repeats=2 if ctx.dry else 50, per_layer=False)
        row = {"step": ctx.current, "case": {**case.__dict__, "passes": list(case.passes)}, **report.to_dict()}
        ctx.results.append(row)
        if ctx.progress:
            print(report.table(), file=sys.stderr, flush=True)
        return {k: row[k] for k in ("case", "theoretical_speedup", "measured_speedup", "efficiency")} | {
            "dense_ms": report.dense.median_ms, "fast_ms": report.fast.median_ms,
            "spread": max(report.dense.spread, report.fast.spread)}
    return run


def _thresholds(ctx: Context) -> dict[str, Any]:
    return derive_thresholds(ctx.steps)


def _plot(ctx: Context) -> dict[str, Any]:
    from sparsekern.bench.plot import plot_speedup

    if not ctx.results:
        raise RuntimeError("no model benchmark finished: nothing to plot")
    rows = [{**r, "case": {**r["case"], "passes": [*r["case"]["passes"], "cuda_graphs"]}} if r["case"]["cuda_graphs"]
            else r for r in ctx.results]  # one series per inference path, CUDA graphs included
    return {"path": plot_speedup(rows, ctx.plot)}


# ----------------------------------------------------------------------------------------- the plan

def _lm_sizes() -> dict[str, tuple[tuple[str, Any], ...]]:
    from sparsekern.bench.models import LM_SIZES

    return LM_SIZES


def plan() -> list[Step]:
    """Every step, most informative first (module docstring)."""
    from sparsekern.bench.kernel_lowrank_linear import GPU_DIMS, GPU_RANKS, GPU_TOKENS

    steps = [
        Step("environment", "versions and device", 0, _environment),
        Step("build", "C++/CUDA extension (every .cu and .cuh)", 150, _build),
        Step("warm_kernels", "every GPU backend once in fp16 (compile, autotune), checked", 60, _warm_kernels),
        Step("gpu_tests", "pytest -m gpu", 120, lambda ctx: None),  # run by run_plan: needs the time left
        Step("headline_channel_skip", "channel_skip_conv2d fp16, ResNet-50 3x3 256@14, keep 0.5, batch 64", 25,
             _channel_skip("float16", _headline_shape, (64,), (0.5,))),
        Step("headline_lowrank", "lowrank_linear fp16, 4096x4096 r=128, 1024/4096 tokens", 15,
             _lowrank("float16", (1024, 4096), ((4096, 4096),), (128,))),
        Step("headline_resnet50", "ResNet-50 static 50%, batch 64, fp16, channels_last", 40,
             _model(dict(model="resnet50", ratio=0.5, batch=64, size=224))),
        Step("resnet50_graphs_r50_b64", "the same with CUDA graphs", 30,
             _model(dict(model="resnet50", ratio=0.5, batch=64, size=224, cuda_graphs=True)), needs_cuda=True),
        Step("channel_skip_fp16_resnet50", "channel_skip_conv2d fp16, ResNet-50 shapes, keep 0.5, batch 8/64", 30,
             _channel_skip("float16", ("resnet50",), (8, 64), (0.5,)), limit_s=GRID_LIMIT_S),
        Step("lowrank_fp16", "lowrank_linear fp16, tokens 1-8192, r 32-256", 30,
             _lowrank("float16", GPU_TOKENS, GPU_DIMS, GPU_RANKS), limit_s=GRID_LIMIT_S),
    ]
    for ratio in (0.5, 0.3):
        for batch in (1, 8, 64):
            tag = f"r{round(ratio * 100)}_b{batch}"
            if (ratio, batch) != (0.5, 64):
                steps.append(Step(f"resnet50_{tag}", f"ResNet-50 static {ratio:.0%}, batch {batch}, fp16", 25,
                                  _model(dict(model="resnet50", ratio=ratio, batch=batch, size=224))))
                steps.append(Step(f"resnet50_graphs_{tag}", "the same with CUDA graphs", 25,
                                  _model(dict(model="resnet50", ratio=ratio, batch=batch, size=224, cuda_graphs=True)),
                                  needs_cuda=True))
    steps += [Step(f"resnet50_round{k}", f"ResNet-50 static 50%, batch 64, fp16, round_to {k}", 30,
                   _model(dict(model="resnet50", ratio=0.5, batch=64, size=224, round_to=k))) for k in (8, 32, 64)]
    steps += [
        Step("sanp_vgg16", "SANP VGG-16 (random gates), batch 64, 16x16, fp16", 30,
             _model(dict(model="vgg16_bn", method="sanp", ratio=0.5, batch=64, size=16, round_to=None))),
        Step("sanp_resnet18", "SANP ResNet-18 (random gates), batch 8, 224x224, fp16", 30,
             _model(dict(model="resnet18", method="sanp", ratio=0.5, batch=8, size=224, round_to=None))),
        Step("flop_transformer", "FLOP Transformer LM, 50% of ranks off, 8 x 64 tokens, fp16", 20,
             _model(dict(model="transformer_lm", method="flop", ratio=0.5, batch=8, size=64, round_to=None,
                         passes=()))),
        Step("flop_sru", "FLOP SRU LM, 50% of ranks off, 8 x 64 tokens, fp16", 20,
             _model(dict(model="sru_lm", method="flop", ratio=0.5, batch=8, size=64, round_to=None, passes=()))),
        *[Step(f"flop_{m}_real_size", f"FLOP {m} {dict(kw)}, kept rank 0.3, 512 tokens, fp16", 25,
               _model(dict(model=m, method="flop", ratio=0.7, batch=1, size=512, round_to=None, passes=(),
                           model_kwargs=kw))) for m, kw in _lm_sizes().items()],
        Step("channel_skip_fp16_resnet18_vgg", "channel_skip_conv2d fp16, ResNet-18 and VGG-16 shapes, keep 0.5", 30,
             _channel_skip("float16", ("resnet18", "vgg16_bn"), (8, 64), (0.5,)), limit_s=GRID_LIMIT_S),
        Step("channel_skip_fp16_keeps", "channel_skip_conv2d fp16, ResNet-50 shapes, keep 0.25/0.75, batch 1/8/64",
             30, _channel_skip("float16", ("resnet50",), (1, 8, 64), (0.25, 0.75)), limit_s=GRID_LIMIT_S),
        Step("lowrank_fp16_high_rank", "lowrank_linear fp16, r 512/1024 (unfused only)", 30,
             _lowrank("float16", GPU_TOKENS, GPU_DIMS, (512, 1024)), limit_s=GRID_LIMIT_S),
        Step("channel_skip_bf16", "channel_skip_conv2d bf16, ResNet-50 shapes, keep 0.5, batch 8/64", 30,
             _channel_skip("bfloat16", ("resnet50",), (8, 64), (0.5,), ("out",)), limit_s=GRID_LIMIT_S),
        Step("lowrank_bf16", "lowrank_linear bf16, tokens 1-8192, r 32-256", 30,
             _lowrank("bfloat16", GPU_TOKENS, GPU_DIMS, GPU_RANKS), limit_s=GRID_LIMIT_S),
        Step("channel_skip_fp32", "channel_skip_conv2d fp32 (TF32), ResNet-50 shapes, keep 0.5, batch 8/64", 30,
             _channel_skip("float32", ("resnet50",), (8, 64), (0.5,), ("out",)), limit_s=GRID_LIMIT_S),
        Step("lowrank_fp32", "lowrank_linear fp32 (TF32), tokens 1-8192, r 32-256", 30,
             _lowrank("float32", GPU_TOKENS, GPU_DIMS, GPU_RANKS), limit_s=GRID_LIMIT_S),
        Step("thresholds", "dispatch thresholds derived from the kernel rows", 0, _thresholds),
        Step("plot", "measured vs theoretical speedup of the model rows", 0, _plot),
    ]
    return steps


def run_plan(ctx: Context, steps: list[Step], budget_s: float, *, only: set[str] | None = None,
             start: float | None = None) -> dict[str, Any]:
    """Run ``steps`` in order within ``budget_s`` seconds from ``start`` (module docstring), writing ``ctx.out``
    after each; returns the final document."""
    import torch

    from sparsekern.bench.results import command_line, write_part

    start = time.perf_counter() if start is None else start
    previous = json.loads(ctx.out.read_text()) if only is not None and ctx.out.is_file() else {}
    if previous.get("mode") != ("dry-run" if ctx.dry else "gpu"):
        previous = {}
    ctx.results[:] = [r for r in previous.get("results", []) if r.get("step") not in (only or ())]
    doc: dict[str, Any] = {
        "command": command_line(), "mode": "dry-run" if ctx.dry else "gpu", "budget_s": budget_s,
        "environment": None, "plan": [{"name": s.name, "title": s.title, "estimate_s": s.estimate_s,
                                       "needs_cuda": s.needs_cuda} for s in steps],
        "steps": ctx.steps, "results": ctx.results, "goals": None, "thresholds": previous.get("thresholds"),
    }
    for step in steps:
        left = budget_s - (time.perf_counter() - start)
        estimate = 0.0 if ctx.dry else step.estimate_s
        rec: dict[str, Any] = {"status": "skipped", "seconds": 0.0, "estimate_s": step.estimate_s}
        if only is not None and step.name not in only and step.name != "environment":
            rec = previous.get("steps", {}).get(step.name) or {**rec, "reason": "not selected (--only)"}
        elif ctx.dry and step.needs_cuda:
            rec["reason"] = NO_CUDA
        elif estimate > 0 and left < estimate:
            rec["reason"] = f"budget: {max(left, 0):.0f} s left, the step needs about {estimate:.0f} s"
        else:
            if ctx.progress:
                print(f"[{time.perf_counter() - start:6.1f} s] {step.name}: {step.title}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            ctx.deadline = min(start + budget_s - RESERVE_S, t0 + (step.limit_s or float("inf")))
            try:
                ctx.current = step.name
                result = _gpu_tests(ctx, min(left - RESERVE_S, GPU_TESTS_LIMIT_S)) if step.name == "gpu_tests" \
                    else step.run(ctx)
                rec.update(status="ok", result=result)
            except Exception as e:  # every failure is recorded and the run goes on
                rec.update(status="failed", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
                if isinstance(e, _StepFailed):
                    rec["result"] = e.result
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            if step.name == "environment" and rec["status"] == "ok":
                doc["environment"] = rec["result"]
            if step.name == "thresholds" and rec["status"] == "ok":
                doc["thresholds"] = rec["result"]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ctx.steps[step.name] = rec
        doc["goals"] = goals(ctx.steps, ctx.results)
        write_part(ctx.out, doc)
        if ctx.progress and rec["status"] != "ok":
            print(f"  {step.name}: {rec['status']}: {rec.get('reason', '')}", file=sys.stderr, flush=True)
    doc["wall_s"] = round(time.perf_counter() - start, 1)
    write_part(ctx.out, {"wall_s": doc["wall_s"]})
    return doc


# ----------------------------------------------------------------------------------------- command line

def _compile_check(args: argparse.Namespace) -> int:
    from sparsekern.bench.gpu_compile import nvcc_check, triton_ptx

    failed = False
    for r in nvcc_check(threads=args.threads):
        print(f"nvcc {r['source']}: {'ok' if r['ok'] else 'FAILED'} ({r['seconds']} s)")
        if not r["ok"]:
            print(r["stderr"], file=sys.stderr)
            failed = True
    for r in triton_ptx():
        want = "wgmma" if r["arch"] >= 90 else "mma"
        ok = r["tensor_cores"] == want
        verdict = "" if ok else f" (want {want})"
        print(f"triton {r['kernel']} sm_{r['arch']} {r['dtype']}: {r['tensor_cores']}{verdict}")
        failed |= not ok
    return 1 if failed else 0


def _interpreter_ready() -> bool:
    """Whether Triton kernels decorated from now on run in the interpreter: Triton not imported yet, or imported
    with ``TRITON_INTERPRET=1`` (Triton decides at its own import: its library functions, e.g. ``tl.cdiv``, are
    decorated then)."""
    if "triton" not in sys.modules:
        return True
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)


def _dry_run_in_child(args: argparse.Namespace) -> int:
    """The same dry run in a child process with ``TRITON_INTERPRET=1`` from its start; returns its exit code."""
    argv = ["--dry-run", "--budget-s", str(args.budget_s), *(["--out", args.out] if args.out else []),
            *(["--out-dir", args.out_dir] if args.out_dir else []),
            *(["--only", *args.only] if args.only else []), *(["--no-progress"] if args.no_progress else [])]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "sparsekern.cli", "bench", "gpu", *argv], env=env).returncode


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.compile_check:
        return _compile_check(args)
    import torch

    from sparsekern.cli_checks import UsageError, check_json_out

    if args.dry_run:
        if not _interpreter_ready():
            return _dry_run_in_child(args)
        os.environ["TRITON_INTERPRET"] = "1"
        folder = Path(args.out_dir) if args.out_dir else Path(tempfile.gettempdir())
        out = Path(args.out) if args.out else folder / "sparsekern-gpu-dry-run.json"
        from sparsekern.ops.thresholds import results_dir

        if out.name.startswith("cuda-") and out.resolve().parent == results_dir().resolve():
            raise UsageError(f"--out {args.out!r}: the dry run never writes the committed GPU results; pick another "
                             "path")
    else:
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device is available here; 'sparsekern bench gpu --dry-run' checks the command "
                             "on CPU")
        out = Path(args.out) if args.out else default_out(torch.cuda.get_device_name(0), args.out_dir)
        torch.backends.cudnn.benchmark = True  # the dense baseline gets cuDNN's fastest algorithm per shape
    check_json_out(str(out))
    steps = plan()
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            raise UsageError(f"--only: unknown step(s) {', '.join(sorted(unknown))}; known: "
                             f"{', '.join(s.name for s in steps)}")
    ctx = Context(dry=args.dry_run, out=out, plot=out.with_name(out.stem + "_speedup.png"),
                  progress=not args.no_progress)
    doc = run_plan(ctx, steps, args.budget_s, only=set(args.only) if args.only else None, start=start)
    print(summary_table(doc))
    print(f"wrote {out}")
    return 1 if any(r["status"] == "failed" for r in doc["steps"].values()) else 0


def add_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``gpu`` to the ``sparsekern bench`` subcommands (module docstring); returns its parser."""
    from sparsekern.cli_checks import number

    p = bench_subparsers.add_parser(
        "gpu", help="build, test and benchmark every GPU path in one budgeted run (--dry-run: the same on CPU)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-s", type=number(float, low=0, low_open=True), default=420.0,
                   help="seconds for the whole run; steps that no longer fit are skipped (default 420)")
    p.add_argument("--dry-run", action="store_true",
                   help="walk the same steps on CPU (Triton interpreter, tiny shapes); writes --out or a temp file")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", help="results JSON (default: bench/results/cuda-<device name>.json; dry run: "
                                     "sparsekern-gpu-dry-run.json in the temporary folder); the plot goes beside it")
    where.add_argument("--out-dir", help="folder for the default file name (e.g. a folder that is copied back from "
                                         "the GPU machine)")
    p.add_argument("--only", nargs="+", metavar="STEP",
                   help="run only these steps (and environment); the other steps' records in the output are kept")
    p.add_argument("--compile-check", action="store_true",
                   help="no device needed: nvcc every csrc/cuda .cu and .cuh for sm_80 and sm_90a, and lower the "
                        "Triton kernels to PTX for sm_80/sm_90 (tensor-core instructions checked); exit 1 on failure")
    p.add_argument("--threads", type=number(int, low=1), default=2, help="nvcc --threads for --compile-check")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the full traceback of an error")
    p.set_defaults(run=_main)
    return p
