"""sparsekern: compile pruning masks into smaller layers and kernels that are really faster.

Public API (see docs/design.md#public-api)::

    import sparsekern as sk
    plan = sk.Plan.from_channel_masks(model, {"layer1.0.conv1": keep}, example_inputs=x)
    ref = sk.masked(model, plan)                     # dense reference semantics
    fast = sk.compile(model, plan, example_inputs=x)  # physically smaller module
    sk.save(fast, "model.sk"); fast = sk.load("model.sk")
    sk.flops(model, x)                                # theoretical FLOPs, per layer (per sample if gated)
    report = sk.bench.compare(model, fast, x)         # theoretical vs measured speedup

Submodules are imported lazily so that ``import sparsekern`` stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Plan": ("sparsekern.plan", "Plan"),
    "PlanError": ("sparsekern.plan", "PlanError"),
    "masked": ("sparsekern.compiler", "masked"),
    "compile": ("sparsekern.compiler", "compile"),
    "save": ("sparsekern.serialize", "save"),
    "load": ("sparsekern.serialize", "load"),
    "flops": ("sparsekern.cost", "flops"),
    "optimize": ("sparsekern.passes", "optimize"),
    "export_onnx": ("sparsekern.onnx_export", "export_onnx"),
    "tuning": ("sparsekern.tuning", None),
    "bench": ("sparsekern.bench", None),
    "models": ("sparsekern.models", None),
    "data": ("sparsekern.data", None),
    "train": ("sparsekern.train", None),
    "graph": ("sparsekern.graph", None),
    "passes": ("sparsekern.passes", None),
    "methods": ("sparsekern.methods", None),
    "ops": ("sparsekern.ops", None),
    "depth": ("sparsekern.depth", None),
    "dynamic": ("sparsekern.dynamic", None),
    "hybrid": ("sparsekern.hybrid", None),
    "lowrank": ("sparsekern.lowrank", None),
    "text_data": ("sparsekern.text_data", None),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'sparsekern' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
