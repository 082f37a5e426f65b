"""What can be checked of the GPU code without a GPU: nvcc compiles of the CUDA sources, and Triton's lowering
of the Triton kernels to PTX.

* :func:`nvcc_check` compiles every ``csrc/cuda/*.cu`` (the torch bindings, against torch's headers with the
  flags torch's extension builder uses plus :data:`sparsekern.ops.extension.CUDA_FLAGS`) and every ``*.cuh`` kernel
  header (alone, with ``-DSPARSEKERN_COMPILE_CHECK``: its explicit float / __half / __nv_bfloat16
  instantiations) for sm_80 and sm_90a, to object files that are thrown away. No driver or device is needed;
  torch's CPU wheel ships the c10/ATen CUDA headers.
* :func:`triton_ptx` compiles each Triton kernel for a :class:`triton.backends.compiler.GPUTarget` (sm_80,
  sm_90) with ``triton.compile(ASTSource(...))``: Triton 3.x lowers to PTX without a driver (ptxas, bundled
  with Triton, then assembles the cubin). It reports per kernel and target which tensor-core instruction the
  matmuls became: ``wgmma`` (``wgmma.mma_async``, Hopper), ``mma`` (``mma.sync``, Ampere and later) or
  ``none``.

    results = nvcc_check(threads=2)           # list of {"source", "ok", "seconds", "stderr"}
    lowered = triton_ptx()                    # list of {"kernel", "arch", "dtype", "tensor_cores", ...}
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["ARCHS", "nvcc_command", "nvcc_check", "triton_ptx", "TRITON_TARGETS"]

#: (virtual architecture, real architecture) pairs the CUDA sources are compiled for.
ARCHS = (("compute_80", "sm_80"), ("compute_90a", "sm_90a"))


def _torch_nvcc_flags() -> list[str]:
    import torch
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths

    from sparsekern.ops.extension import CUDA_FLAGS, csrc_dir

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(csrc_dir())]
    flags = [*COMMON_NVCC_FLAGS, *CUDA_FLAGS, "-DTORCH_API_INCLUDE_EXTENSION_H", "-DSPARSEKERN_WITH_CUDA",
             "-DTORCH_EXTENSION_NAME=sparsekern_check", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
             "--compiler-options", "-fPIC", *(f for inc in includes for f in ("-isystem", inc))]
    # A CPU wheel lacks c10's generated CUDA config header; on Linux it only defines C10_CUDA_BUILD_SHARED_LIBS,
    # which matters for Windows DLL exports, so skipping it compiles exactly what a CUDA wheel would.
    if not any((Path(inc) / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for inc in include_paths()):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def nvcc_command(source: Path, out: Path, *, threads: int = 2, archs: Sequence[tuple[str, str]] = ARCHS,
                 nvcc: str | None = None) -> list[str]:
    """The nvcc command that compiles ``source`` (a ``.cu`` binding or a ``.cuh`` kernel header) to ``out``."""
    nvcc = nvcc or shutil.which("nvcc") or "nvcc"
    gencode = [f for virt, real in archs for f in ("-gencode", f"arch={virt},code={real}")]
    if source.suffix == ".cuh":
        flags = ["-x", "cu", "-std=c++17", "-DSPARSEKERN_COMPILE_CHECK"]
    else:
        flags = _torch_nvcc_flags()
    return [nvcc, *flags, *gencode, "--threads", str(threads), "-c", str(source), "-o", str(out)]


def nvcc_check(sources: Sequence[Path] | None = None, *, threads: int = 2,
               timeout_s: float = 1200) -> list[dict[str, Any]]:
    """Compile each source (default: every ``csrc/cuda/*.cu`` and ``*.cuh``, and the Python bindings
    ``csrc/ops.cpp`` with their CUDA functions) for :data:`ARCHS`.

    Returns:
        One dict per source: ``source`` (file name), ``ok``, ``seconds`` (wall time of that nvcc),
        ``command`` and ``stderr`` (the last 4000 characters, when it failed).

    Raises:
        FileNotFoundError: nvcc is not on ``PATH``.
    """
    from sparsekern.ops.extension import csrc_dir

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    if sources is None:
        cuda = csrc_dir() / "cuda"
        sources = sorted(cuda.glob("*.cu")) + sorted(cuda.glob("*.cuh")) + [csrc_dir() / "ops.cpp"]
    results = []
    with tempfile.TemporaryDirectory(prefix="sparsekern-nvcc-") as tmp:
        for src in sources:
            cmd = nvcc_command(Path(src), Path(tmp) / f"{Path(src).name}.o", threads=threads, nvcc=nvcc)
            start = time.perf_counter()
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
                ok, err = done.returncode == 0, done.stderr
            except subprocess.TimeoutExpired:
                ok, err = False, f"nvcc timed out after {timeout_s} s"
            results.append({"source": Path(src).name, "ok": ok, "seconds": round(time.perf_counter() - start, 1),
                            "command": " ".join(cmd), "stderr": "" if ok else err[-4000:]})
    return results


#: (arch, dtype) pairs each Triton kernel is lowered for: Hopper in fp16, Ampere in bf16.
TRITON_TARGETS = ((90, "fp16"), (80, "bf16"))

_LOWER = textwrap.dedent("""
    import json, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsekern.kernels.triton import channel_skip_conv2d as csk, lowrank_linear as lr

    def sig(kernel, const, dtype, ints=()):
        return {n: ("constexpr" if n in const else "*i32" if n in ints else f"*{dtype}" if n.endswith("_ptr")
                    else "i32") for n in kernel.arg_names}

    def kind(ptx):
        return "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none"

    out = []
    for arch, dtype in json.loads(sys.argv[1]):
        cases = [
            ("channel_skip_conv2d", csk._channel_skip_conv2d_kernel.fn, ("lists_ptr",), 8,
             dict(KH=3, KW=3, HAS_BIAS=True, RELU=True, X_CHANNELS_LAST=arch == 80, W_N_FASTEST=False,
                  INPUT_PRECISION=None, BLOCK_M=128 if arch == 90 else 64, BLOCK_N=128 if arch == 90 else 64,
                  BLOCK_K=32, GROUP_M=8)),
            ("lowrank_linear", lr._lowrank_linear_kernel.fn, (), 8,
             dict(HAS_BIAS=True, INPUT_PRECISION=None, BLOCK_R=128, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64)),
        ]
        for name, fn, ints, warps, const in cases:
            src = ASTSource(fn=fn, signature=sig(fn, const, dtype, ints), constexprs=const)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps))
            out.append({"kernel": name, "arch": arch, "dtype": dtype, "tensor_cores": kind(compiled.asm["ptx"]),
                        "cubin_bytes": len(compiled.asm.get("cubin", b""))})
    print("RESULT " + json.dumps(out))
""")


def triton_ptx(targets: Sequence[tuple[int, str]] = TRITON_TARGETS, *, timeout_s: float = 600) -> list[dict[str, Any]]:
    """Lower the Triton kernels for each (sm arch, dtype) of ``targets`` without a device (module docstring).

    Runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` when it is set at
    import time).

    Returns:
        One dict per kernel and target: ``kernel``, ``arch``, ``dtype``, ``tensor_cores`` (``"wgmma"``,
        ``"mma"`` or ``"none"``) and ``cubin_bytes``.

    Raises:
        RuntimeError: Triton failed to lower a kernel (the message holds its stderr).
    """
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _LOWER, json.dumps([list(t) for t in targets])], capture_output=True,
                          text=True, env=env, timeout=timeout_s)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"Triton could not lower the kernels (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])
