"""Small helpers shared by sparsekern's modules and methods.

This module imports nothing from sparsekern and nothing heavy at module level (no torch), so that any module
may use it, :mod:`sparsekern.plan` included, without creating an import cycle.
"""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["as_tuple", "closest", "edit_distance", "input_spec"]


def as_tuple(example_inputs: Any) -> tuple:
    """``example_inputs`` as a tuple of positional arguments: a tuple is returned as is, anything else (one
    tensor) is wrapped as a 1-tuple."""
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def input_spec(example_inputs: Any) -> list[dict[str, Any]]:
    """JSON description of example inputs, recorded in plans and manifests: one ``{"shape": [...], "dtype":
    "float32"}`` per tensor of :func:`as_tuple` ``(example_inputs)`` (dtype without its ``torch.`` prefix)."""
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")} for t in as_tuple(example_inputs)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between ``a`` and ``b`` (insertions, deletions and substitutions cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def closest(name: str, names: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` names nearest to ``name`` by :func:`edit_distance` (ties keep the order of ``names``), for
    "did you mean" hints in error messages."""
    return sorted(names, key=lambda other: edit_distance(other, name))[:n]
