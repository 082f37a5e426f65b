"""Checkpoints of a run (:func:`sparsekern.serialize.save_state` files, no pickle): what is saved, what
a resumed run takes back, and the random-number states that make a resumed run equal an uninterrupted one."""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from sparsekern.serialize import load_state, save_state
from sparsekern.training.distributed import barrier
from sparsekern.training.hooks import TrainState
from sparsekern.training.optim import StageRun

CHECKPOINT_VERSION = 1

def rng_state() -> dict[str, Any]:
    """The states of the torch (CPU and every CUDA device), numpy and ``random`` generators, as tensors,
    numbers and tuples that :func:`sparsekern.serialize.save_state` can store."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`rng_state` (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    nps = state["numpy"]
    np.random.set_state(
        ("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def loader_generator_states(loaders: Sequence[Any]) -> list[Tensor | None]:
    """The state of each loader's own ``torch.Generator`` (``None`` for a loader without one)."""
    out = []
    for loader in loaders:
        gen = getattr(loader, "generator", None)
        out.append(gen.get_state() if isinstance(gen, torch.Generator) else None)
    return out


def set_loader_generator_states(loaders: Sequence[Any], states: Sequence[Tensor | None]) -> None:
    """Inverse of :func:`loader_generator_states`."""
    for loader, gs in zip(loaders, states):
        gen = getattr(loader, "generator", None)
        if gs is not None and isinstance(gen, torch.Generator):
            gen.set_state(gs.cpu())


def checkpoint_payload(
    state: TrainState, stages: Sequence[StageRun], external: Sequence[Tensor], hooks: Sequence[Any],
    loaders: Sequence[Any],
) -> dict[str, Any]:
    """Everything a resumed run needs after the epoch ``state.epoch`` (the next epoch is saved)."""
    return {
        "version": CHECKPOINT_VERSION,
        "epoch": state.epoch + 1,
        "step": state.step,
        "total_steps": state.total_steps,
        "stages": [s.name for s in stages],
        "model": state.model.state_dict(),
        "external_params": [p.detach().clone() for p in external],
        "optimizers": [s.optimizer.state_dict() for s in stages],
        "schedulers": [s.scheduler.state_dict() for s in stages],
        "hooks": [
            [type(h).__qualname__, h.state_dict() if callable(getattr(h, "state_dict", None)) else {}]
            for h in hooks
        ],
        "history": list(state.history),
        "rng": rng_state(),
        "loader_generators": loader_generator_states(loaders),
    }


def save_checkpoint(path: str, payload: dict[str, Any], *, rank: int, world_size: int) -> None:
    """Rank 0 writes ``payload`` to ``path`` (directories created); every rank waits for it."""
    if rank == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_state(payload, path)
    barrier(world_size)


def read_checkpoint(path: str, *, total_steps: int, stage_names: list[str], n_external: int) -> dict[str, Any]:
    """The checkpoint at ``path``, checked to belong to a run with these steps, stages and external params."""
    # On the CPU: RNG states must stay CPU byte tensors; state dicts are copied to their devices.
    ck = load_state(path)
    if ck.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {ck.get('version')}")
    if ck["total_steps"] != total_steps or ck["stages"] != stage_names:
        raise ValueError(
            f"{path} belongs to a different run (total_steps {ck['total_steps']} vs {total_steps}, "
            f"stages {ck['stages']} vs {stage_names}); delete it or change config.checkpoint"
        )
    if len(ck["external_params"]) != n_external:
        raise ValueError(f"{path}: the number of parameters outside the model differs from this run")
    return ck


def restore_hook_states(hooks: Sequence[Any], saved: Sequence[Sequence[Any]], path: str) -> None:
    """Saved hook states go back to hooks of the same class, in order; hooks may be added or dropped (a
    non-empty state nobody takes is warned about)."""
    left = [(name, hs) for name, hs in saved]
    for h in hooks:
        if not callable(getattr(h, "load_state_dict", None)):
            continue
        for i, (name, hs) in enumerate(left):
            if name == type(h).__qualname__:
                h.load_state_dict(hs)
                del left[i]
                break
    lost = [name for name, hs in left if hs]
    if lost:
        warnings.warn(f"{path}: no hook of this run takes the saved state of {lost}", stacklevel=6)


def restore_run(
    ck: Mapping[str, Any], *, model: nn.Module, external: Sequence[Tensor], stages: Sequence[StageRun],
    hooks: Sequence[Any], path: str,
) -> None:
    """Model, external parameters, optimizers, schedulers and hook states of ``ck`` back into this run."""
    model.load_state_dict(ck["model"])
    with torch.no_grad():
        for p, v in zip(external, ck["external_params"]):
            p.copy_(v)
    for s, o, sch in zip(stages, ck["optimizers"], ck["schedulers"]):
        s.optimizer.load_state_dict(o)
        s.scheduler.load_state_dict(sch)
    restore_hook_states(hooks, ck["hooks"], path)
