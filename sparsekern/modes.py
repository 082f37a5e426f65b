"""Train/eval flags of every submodule, saved and restored (``model.train(flag)`` would overwrite each
submodule's own flag with one value)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch.nn as nn

__all__ = ["training_flags", "restore_flags", "eval_mode"]


def training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every submodule of ``model`` with its current ``training`` flag."""
    return [(m, m.training) for m in model.modules()]


def restore_flags(flags: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags :func:`training_flags` saved."""
    for m, flag in flags:
        m.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, each submodule's own flag restored afterwards."""
    flags = training_flags(model)
    model.eval()
    try:
        yield model
    finally:
        restore_flags(flags)
