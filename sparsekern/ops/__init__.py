"""sparsekern's ops: one file per op with its public function, torch custom op, fake and dispatch.

``reference`` holds the plain-torch ground truth of every op; ``backends(op)`` lists an op's backends and
whether each can run on this machine.
"""
from __future__ import annotations

from sparsekern.ops import reference
from sparsekern.ops._dispatch import Dispatch, NoBackendError
from sparsekern.ops.channel_skip_conv2d import channel_skip_conv2d
from sparsekern.ops.lowrank_linear import lowrank_linear

__all__ = ["channel_skip_conv2d", "lowrank_linear", "reference", "Dispatch", "NoBackendError", "dispatch_of"]


def dispatch_of(op: str) -> Dispatch:
    """The :class:`Dispatch` of ``op`` (``"channel_skip_conv2d"`` or ``"lowrank_linear"``)."""
    import importlib

    return importlib.import_module(f"sparsekern.ops.{op}").DISPATCH
