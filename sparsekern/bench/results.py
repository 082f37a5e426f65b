"""The per-device results file (``bench/results/<device>.json``): several benchmarks write into one file.

Model benchmarks own the top-level ``command`` / ``environment`` / ``results`` keys; the other benchmarks
(kernels, end-to-end method reports) write one named section each. Writing one part keeps the others.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_part", "command_line"]


def command_line() -> str:
    """The command that is running, as a user would type it."""
    import sys

    argv = list(sys.argv)
    first = argv[0].replace("\\", "/") if argv else ""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if first.endswith("sparsekern") or first.endswith("sparsekern/cli.py"):
        argv[0] = "sparsekern"  # the console script, or python -m sparsekern.cli
    elif spec is not None and spec.name.startswith("sparsekern."):  # python -m sparsekern.<module>
        argv[0:1] = ["python", "-m", spec.name]
    return " ".join(argv)


def write_part(path: str | Path, doc: dict[str, Any], *keys: str) -> Path:
    """Merge ``doc`` into the JSON at ``path``: at ``doc[keys[0]][keys[1]]...`` if keys are given, else its
    top-level keys. Other parts of the file are kept."""
    path = Path(path)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    if keys:
        node = merged
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = doc
    else:
        merged.update(doc)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=1))
    return path
