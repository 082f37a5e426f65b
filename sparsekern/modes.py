"""Module state saved and restored around a pass: the train/eval flags of every submodule
(``model.train(flag)`` would overwrite each submodule's own flag with one value) and buffers."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

__all__ = ["training_flags", "restore_flags", "eval_mode", "preserve_buffers"]


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


@contextmanager
def preserve_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BN running statistics, counters) on exit.

    Buffers must be updated in place (as batch norm does); a module that rebinds a buffer attribute
    during forward is not covered.
    """
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)
