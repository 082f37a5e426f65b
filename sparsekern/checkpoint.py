"""Stage checkpoints of a long run, so that an interrupted run resumes where it stopped.

A run (``sparsekern prune``: full-model training, pruning, one stage per trained arm; FLOP: training) is a
sequence of named stages. After a stage completes, :meth:`Checkpoints.save` writes one file
``<folder>/<stage>.safetensors`` with :func:`sparsekern.serialize.save_state` (safetensors + a JSON skeleton,
no pickle): the state dicts of the stage's models, a JSON record of its results (``info``) and the run's
arguments. Loading a checkpoint cannot execute code; the run rebuilds its models and loads the tensors.

Rules:

* ``save_state`` writes to a temporary name and renames, so an interruption never leaves a half-written
  stage: a stage's file exists only if the stage completed.
* With ``resume=True``, :meth:`Checkpoints.load` returns a completed stage, but only if the arguments
  recorded in it equal this run's; otherwise :class:`CheckpointMismatch` names every argument that differs.
  With ``resume=False`` it returns ``None`` and stages are recomputed (and their files replaced).
* ``Checkpoints(None)`` checkpoints nothing: ``load`` returns ``None`` and ``save`` does nothing, so a run
  takes the same code path with or without checkpoints.
* Each stage should start from a fixed random state (the run seeds torch before it), so that a resumed run
  computes what an uninterrupted one does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["Checkpoints", "CheckpointMismatch", "Stage", "FORMAT", "diff_args"]

FORMAT = "sparsekern.stage"
_SUFFIX = ".safetensors"


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a run with other arguments (or is not a stage checkpoint)."""


@dataclass
class Stage:
    """A completed stage read back from its checkpoint."""

    name: str
    info: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def load_into(self, model: nn.Module, key: str) -> nn.Module:
        """Load the state dict saved under ``key`` into ``model`` (strict: every key must match)."""
        prefix = f"{key}."
        state = {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        if not state:
            raise CheckpointMismatch(f"checkpoint of stage {self.name!r} holds no model {key!r} "
                                     f"(it holds {sorted({k.split('.', 1)[0] for k in self.tensors})})")
        model.load_state_dict(state, strict=True)
        return model


class Checkpoints:
    """The stage checkpoints of one run in ``folder`` (see the module docstring for the rules).

    Args:
        folder: where the stage files live (created on the first save); ``None`` disables checkpointing.
        args: the run's arguments (JSON values); a checkpoint is reused only by a run with equal arguments.
        resume: reuse completed stages; without it every stage is recomputed.
    """

    def __init__(self, folder: str | Path | None, args: Mapping[str, Any] | None = None, *,
                 resume: bool = False) -> None:
        self.folder = None if folder is None else Path(folder)
        self.args = json.loads(json.dumps(dict(args or {})))  # as it will read back (tuples -> lists)
        self.resume = bool(resume)

    def path(self, stage: str) -> Path:
        if self.folder is None:
            raise ValueError("checkpointing is disabled (folder None): no stage has a path")
        return self.folder / f"{stage}{_SUFFIX}"

    def completed(self) -> list[str]:
        """Names of the stages with a checkpoint file in the folder, oldest first."""
        if self.folder is None or not self.folder.is_dir():
            return []
        files = sorted(self.folder.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns)
        return [p.name[: -len(_SUFFIX)] for p in files]

    def clear(self) -> list[Path]:
        """Delete this run's stage files (only ``*.safetensors`` in the folder); returns what was deleted."""
        if self.folder is None or not self.folder.is_dir():
            return []
        removed = sorted(self.folder.glob(f"*{_SUFFIX}"))
        for p in removed:
            p.unlink()
        return removed

    def check(self) -> None:
        """With ``resume``, raise :class:`CheckpointMismatch` now if any stage file has other arguments."""
        if self.resume:
            for name in self.completed():
                self._read(name)

    def load(self, stage: str) -> Stage | None:
        """The completed ``stage`` when resuming and its checkpoint exists, else ``None``."""
        if self.folder is None or not self.resume or not self.path(stage).is_file():
            return None
        info, tensors = self._read(stage)
        return Stage(stage, info, tensors)

    def save(self, stage: str, info: Mapping[str, Any], models: Mapping[str, nn.Module] | None = None) -> None:
        """Record that ``stage`` completed with results ``info`` (JSON values) and the weights of ``models``."""
        if self.folder is None:
            return
        from sparsekern.serialize import save_state

        try:
            json.dumps(dict(info))
        except TypeError as e:
            raise TypeError(f"stage {stage!r}: the stage's info must be JSON values: {e}") from e
        state = {"format": FORMAT, "stage": stage, "args": self.args, "info": dict(info),
                 "models": {key: dict(model.state_dict()) for key, model in (models or {}).items()}}
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(stage)
        try:
            save_state(state, path)
        finally:
            path.with_name(path.name + ".tmp").unlink(missing_ok=True)  # save_state's partial file, if interrupted

    def _read(self, stage: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from sparsekern.serialize import SerializationError, load_state

        path = self.path(stage)
        try:
            state = load_state(path)
        except SerializationError as e:
            raise CheckpointMismatch(f"{path} is not a readable stage checkpoint ({e}); delete it to recompute "
                                     "the stage") from e
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("stage") != stage:
            raise CheckpointMismatch(f"{path} is not the checkpoint of stage {stage!r}; delete it to recompute "
                                     "the stage")
        differ = diff_args(state.get("args", {}), self.args)
        if differ:
            raise CheckpointMismatch(f"cannot resume from {path.parent}: it was written with other arguments ("
                                     f"{'; '.join(differ)}); rerun with the checkpoint's arguments, or without "
                                     "resuming to start over")
        tensors = {f"{key}.{name}": t for key, sd in state.get("models", {}).items() for name, t in sd.items()}
        return state.get("info", {}), tensors


def diff_args(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"name: checkpoint X, now Y"`` for every argument whose value differs (or is missing on one side)."""
    missing = object()
    lines = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, missing), current.get(key, missing)
        if a != b:
            show = lambda v: "unset" if v is missing or v is None else json.dumps(v)  # noqa: E731
            lines.append(f"{key}: checkpoint {show(a)}, now {show(b)}")
    return lines
