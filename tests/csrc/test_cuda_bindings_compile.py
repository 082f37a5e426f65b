"""Every CUDA source, the torch bindings (``csrc/cuda/*.cu``) and the Python module with its CUDA functions
(``csrc/ops.cpp``) included, compiled by nvcc for sm_80 and sm_90a
against torch's headers with the extension builder's flags (sparsekern/bench/gpu_compile.py), without a GPU.

Runs in CI (``CI`` set, as CI services do) or on request (``SPARSEKERN_NVCC_FULL=1``): nvcc over torch's
headers costs about 170 s of CPU for the two ``.cu`` files and two architectures (measured on the project's
2-core machine with ``--threads 2``), too much for every local run of the suite. The same check runs alone
with ``sparsekern bench gpu --compile-check``.
"""
from __future__ import annotations

import os
import shutil

import pytest

from sparsekern.bench.gpu_compile import nvcc_check

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("SPARSEKERN_NVCC_FULL") != "1" and os.environ.get("CI", "").lower() in ("", "0", "false"),
        reason="runs in CI or with SPARSEKERN_NVCC_FULL=1",
    ),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed"),
]


def test_every_cuda_source_compiles_for_sm80_and_sm90a() -> None:
    results = nvcc_check(threads=2)
    assert {r["source"].rsplit(".", 1)[1] for r in results} == {"cu", "cuh", "cpp"}
    failed = [f"{r['source']}:\n{r['stderr']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
