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
    if argv and (argv[0].endswith("sparsekern") or argv[0].replace("\\", "/").endswith("sparsekern/cli.py")):
        argv[0] = "sparsekern"  # the console script, or python -m sparsekern.cli
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
