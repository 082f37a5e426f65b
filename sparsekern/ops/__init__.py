"""sparsekern's ops: one file per op with its public function, its torch op, fake and dispatch.

Each op validates its arguments once into a *problem* and runs one of its backends
(:mod:`sparsekern.ops.backend`); ``dispatch_of(op).reasons(...)`` lists every reason each backend refuses an
input. ``reference`` holds the plain-torch ground truth of every op; :mod:`sparsekern.ops.shapes` the output
shapes shared by validation, fakes and kernels.
"""
from __future__ import annotations

from sparsekern.ops import gate_guard as _gate_guard  # noqa: F401 (defines the private operator)
from sparsekern.ops import layer_norm_fold as _layer_norm_fold  # noqa: F401 (defines the private operator)
from sparsekern.ops import reference
from sparsekern.ops.attention import attention
from sparsekern.ops.backend import Backend, Dispatch, NoBackendError
from sparsekern.ops.channel_skip_conv2d import channel_skip_conv2d
from sparsekern.ops.fused_conv2d import fused_conv2d
from sparsekern.ops.lowrank_linear import lowrank_linear
from sparsekern.ops.sru_recurrence import sru_recurrence

__all__ = ["attention", "channel_skip_conv2d", "fused_conv2d", "lowrank_linear", "sru_recurrence", "reference",
           "Backend", "Dispatch", "NoBackendError", "dispatch_of"]


def dispatch_of(op: str) -> Dispatch:
    """The :class:`Dispatch` of ``op`` (``"attention"``, ``"channel_skip_conv2d"``, ``"fused_conv2d"``,
    ``"lowrank_linear"`` or ``"sru_recurrence"``)."""
    import importlib

    return importlib.import_module(f"sparsekern.ops.{op}").DISPATCH
