"""GPU dispatch thresholds: measured for the device class when a results file has them, estimates otherwise.

``sparsekern bench gpu`` (:mod:`sparsekern.bench.gpu`) writes a ``thresholds`` section into
``bench/results/cuda-<device name>.json``, derived from its kernel benchmarks. The ops read it here:

* A results file applies to a device when its ``environment.device_name`` equals the device's name
  (``torch.cuda.get_device_name``); failing that, when its ``environment.capability`` equals the device's
  compute capability ``[major, minor]`` (the same device class, e.g. H100 and H200 are both 9.0). A name match
  beats a capability match; among equal matches the file name sorted first wins.
* Every threshold missing from the section (or a file that cannot be read) keeps its estimate
  (:data:`ESTIMATES`), so an absent or partial table changes nothing.
* The folder is ``$SPARSEKERN_GPU_RESULTS`` or ``bench/results`` beside the package (absent in an installed
  wheel: estimates). Files are read once per device; :func:`reload` forgets what was read.

Thresholds (:class:`GpuThresholds`):

* ``lowrank_min_fused_tokens``: ``lowrank_linear`` on CUDA runs the two cuBLAS GEMMs below this many tokens.
* ``lowrank_fused_order``: the fused ``lowrank_linear`` backends in order of preference (the first that can
  run is used).
* ``channel_skip_order``: the ``channel_skip_conv2d`` GPU backends in order of preference.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

__all__ = ["GpuThresholds", "ESTIMATES", "for_device", "lookup", "results_dir", "reload"]


@dataclass(frozen=True)
class GpuThresholds:
    """The GPU dispatch thresholds of one device class (module docstring); ``source`` names the results file
    they came from, or ``"estimate"``."""

    lowrank_min_fused_tokens: int = 128
    lowrank_fused_order: tuple[str, ...] = ("cuda", "triton")
    channel_skip_order: tuple[str, ...] = ("cuda", "triton")
    source: str = "estimate"


#: First guesses from the roofline, used where no measurement exists (no GPU was at hand when they were set).
ESTIMATES = GpuThresholds()
_BACKENDS = {"lowrank_fused_order": {"cuda", "triton"}, "channel_skip_order": {"cuda", "triton"}}

_DEFAULT_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"
_lock = threading.Lock()
_cache: dict[Any, GpuThresholds] = {}


def results_dir() -> Path:
    """Where the ``cuda-*.json`` results files are read from (module docstring)."""
    return Path(os.environ.get("SPARSEKERN_GPU_RESULTS", _DEFAULT_DIR))


def _parse(section: dict[str, Any], source: str) -> GpuThresholds:
    """The thresholds of a ``thresholds`` section; values of the wrong type or backends that do not exist keep
    their estimate."""
    values: dict[str, Any] = {}
    for f in fields(GpuThresholds):
        v = section.get(f.name)
        if f.name == "lowrank_min_fused_tokens" and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            values[f.name] = v
        elif f.name in _BACKENDS and isinstance(v, list) and v and set(v) <= _BACKENDS[f.name]:
            values[f.name] = tuple(v)
    return replace(ESTIMATES, **values, source=source)


def lookup(name: str, capability: tuple[int, int] | None, directory: str | Path | None = None) -> GpuThresholds:
    """The thresholds for a device called ``name`` with compute ``capability`` from the ``cuda-*.json`` files of
    ``directory`` (default :func:`results_dir`), or :data:`ESTIMATES` when none applies."""
    folder = Path(directory) if directory is not None else results_dir()
    best: tuple[int, Path, dict[str, Any]] | None = None
    for path in sorted(folder.glob("cuda-*.json")) if folder.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        env, section = doc.get("environment") or {}, doc.get("thresholds")
        if not isinstance(section, dict):
            continue
        cap = env.get("capability")
        rank = 2 if env.get("device_name") == name else 1 if (
            capability is not None and isinstance(cap, list) and tuple(cap) == tuple(capability)) else 0
        if rank and (best is None or rank > best[0]):
            best = (rank, path, section)
    return ESTIMATES if best is None else _parse(best[2], str(best[1]))


def _identity(device: torch.device) -> tuple[str, tuple[int, int]]:
    return torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device))  # type: ignore


def for_device(device: torch.device | str | int | None = None) -> GpuThresholds:
    """The thresholds for CUDA ``device`` (default: the current one), read once and cached (the ops ask on every
    call)."""
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           os.environ.get("SPARSEKERN_GPU_RESULTS"))
    found = _cache.get(key)
    if found is None:
        with _lock:
            found = _cache.get(key)
            if found is None:
                found = _cache[key] = lookup(*_identity(torch.device("cuda", key[0])))
    return found


def reload() -> None:
    """Forget the thresholds read so far (the next call reads the results files again)."""
    with _lock:
        _cache.clear()
