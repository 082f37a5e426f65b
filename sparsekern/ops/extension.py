"""The C++/CUDA extension of the ops, for tools outside :mod:`sparsekern.ops` (``sparsekern.bench``'s GPU
checks, kernel compile checks): build or load it and ask what it holds.

The ops load the extension themselves (the implementation is the ops' private loader); see its rules for
the cache directory, ``SPARSEKERN_NO_EXT``, ``SPARSEKERN_CSRC`` and ahead-of-time builds.
"""
from __future__ import annotations

from types import ModuleType

from sparsekern.ops import _ext
from sparsekern.ops._ext import CPU_FLAGS, CUDA_FLAGS, csrc_dir, kernel, load, status

__all__ = ["CPU_FLAGS", "CUDA_FLAGS", "build", "csrc_dir", "kernel", "load", "status", "with_cuda"]


def with_cuda() -> bool:
    """Whether the extension is built with its CUDA sources: torch has CUDA, a device is present and
    ``CUDA_HOME`` is set."""
    return _ext._with_cuda()


def build() -> ModuleType:
    """Compile the extension now (ninja; an up-to-date build directory makes it quick) and return the module.
    Unlike :func:`load`, it raises with the compiler's whole log when the build fails."""
    return _ext._build()
