"""The C++/CUDA extension (``csrc/``), built by ninja through torch's cpp_extension at first use and cached.

The extension is a Python module of kernel functions (``channel_skip_conv2d_cpu``, ``lowrank_linear_cuda``,
...: csrc/ops.cpp), each a backend of one op of :mod:`sparsekern.ops`; it registers no torch ops.
:func:`load` returns the loaded module or ``None``; it never raises. When the build fails, or the
sources are not there (an installed wheel without ``csrc/``), it warns once and the ops fall back to their
other backends. :func:`status` says why the extension is unavailable, for the dispatch's error messages.

The build directory is ``$SPARSEKERN_CACHE`` (default ``~/.cache/sparsekern``)``/ext-<key>``, where the key
hashes the sources, the torch version, the compiler flags and whether CUDA sources are included, so a
changed kernel rebuilds and an unchanged one loads in a fraction of a second. ``SPARSEKERN_NO_EXT=1``
disables the extension; ``SPARSEKERN_EXT_VERBOSE=1`` shows the compiler output.

CUDA sources (``csrc/cuda/*.cu``) are compiled only when torch has CUDA and a device is present.
An extension built ahead of time (``SPARSEKERN_BUILD_EXT=1 pip install --no-build-isolation .``, see
setup.py) is used instead when it is installed.
"""
from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch

__all__ = ["load", "status", "kernel", "requirement", "triton_requirement", "csrc_dir", "CPU_FLAGS", "CUDA_FLAGS"]

CPU_FLAGS = ["-O3", "-march=native", "-std=c++17"]
CUDA_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]

_lock = threading.Lock()
_state: dict[str, object] = {}


def csrc_dir() -> Path:
    """Where the C++/CUDA sources are: ``$SPARSEKERN_CSRC`` or ``csrc/`` beside the package."""
    return Path(os.environ.get("SPARSEKERN_CSRC", Path(__file__).resolve().parents[2] / "csrc"))


def _with_cuda() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and torch.cuda.is_available() and CUDA_HOME is not None


def _sources(root: Path, with_cuda: bool) -> list[Path]:
    sources = [root / "ops.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        sources += sorted((root / "cuda").glob("*.cu"))
    return sources


def _key(root: Path, sources: list[Path], with_cuda: bool) -> str:
    h = hashlib.sha256()
    headers = sorted(root.glob("*.h")) + sorted((root / "cpu").glob("*.h"))
    if with_cuda:
        headers += sorted((root / "cuda").glob("*.cuh")) + sorted((root / "cuda").glob("*.h"))
    for path in sources + headers:
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    h.update(f"{torch.__version__}|{with_cuda}|{CPU_FLAGS}|{CUDA_FLAGS}".encode())
    return h.hexdigest()[:16]


def _prebuilt() -> ModuleType | None:
    """The extension built ahead of time by ``SPARSEKERN_BUILD_EXT=1 pip install`` (setup.py), if installed."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("sparsekern._C") is None:
        return None
    return importlib.import_module("sparsekern._C")


def _build() -> ModuleType:
    from torch.utils import cpp_extension

    root = csrc_dir()
    if not (root / "ops.cpp").is_file():
        raise FileNotFoundError(f"the C++ sources are not at {root} (set SPARSEKERN_CSRC to a csrc/ folder)")
    with_cuda = _with_cuda()
    sources = _sources(root, with_cuda)
    key = _key(root, sources, with_cuda)
    build_dir = Path(os.environ.get("SPARSEKERN_CACHE", Path.home() / ".cache" / "sparsekern")) / f"ext-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_define = ["-DSPARSEKERN_WITH_CUDA"] if with_cuda else []
    return cpp_extension.load(
        name=f"sparsekern_ext_{key}",
        sources=[str(s) for s in sources],
        extra_include_paths=[str(root)],
        extra_cflags=CPU_FLAGS + cuda_define,
        extra_cuda_cflags=CUDA_FLAGS + cuda_define,
        build_directory=str(build_dir),
        is_python_module=True,
        verbose=os.environ.get("SPARSEKERN_EXT_VERBOSE") == "1",
    )


def load() -> ModuleType | None:
    """The extension module (built on first use), or ``None`` with a warning if it cannot be built."""
    with _lock:
        if "module" in _state:
            return _state["module"]  # type: ignore[return-value]
        if os.environ.get("SPARSEKERN_NO_EXT") == "1":
            _state.update(module=None, error="disabled by SPARSEKERN_NO_EXT=1")
            return None
        try:
            module = _prebuilt() or _build()
            _state.update(module=module, error=None)
        except Exception as e:  # a compiler error, a missing toolchain: the ops fall back, never fail import
            _state.update(module=None, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            warnings.warn(f"sparsekern: the C++ extension could not be built ({_state['error']}); falling back "
                          "to the other backends. SPARSEKERN_EXT_VERBOSE=1 shows the compiler output.",
                          RuntimeWarning, stacklevel=2)
        return _state["module"]  # type: ignore[return-value]


def status() -> str | None:
    """``None`` when the extension is loaded, else why not (loading it first if nobody has tried)."""
    if "module" not in _state:
        load()
    return _state.get("error")  # type: ignore[return-value]


def kernel(name: str) -> Callable[..., None] | None:
    """The extension's kernel function ``name`` (e.g. ``"channel_skip_conv2d_cpu"``), or ``None`` when the
    extension is unavailable or was built without it (CUDA kernels need a CUDA build)."""
    module = load()
    return getattr(module, name, None) if module is not None else None


def requirement(name: str) -> Callable[[], str | None]:
    """A backend's ``available`` check for the kernel ``name``: ``None`` when the extension has it, else why
    not (the build error, or a build without that kernel)."""

    def check() -> str | None:
        if kernel(name) is not None:
            return None
        why = status()
        if why is not None:
            return f"extension unavailable ({why})"
        device = name.rsplit("_", 1)[-1].upper()
        return f"the extension was built without {device} kernels"

    return check


def triton_requirement() -> str | None:
    """A Triton backend's ``available`` check: ``None`` when Triton imports."""
    import importlib.util

    return None if importlib.util.find_spec("triton") is not None else "triton is not installed"
