"""What each stage trains: parameter groups (checked and named) and the freezing of every other parameter."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsekern.training.config import Stage


@dataclass
class Group:
    """One param group as the step sees it: its parameters, its ``name`` (for hook losses addressed to it)
    and whether the default objective reaches it (``base_loss``)."""

    params: list[Tensor]
    name: str | None
    base_loss: bool


@dataclass
class StageParams:
    """The param groups of one stage: ``dicts`` for the optimizer (``name``/``base_loss`` kept as extra
    keys), ``groups`` for the step, and the :class:`Stage` they came from (``None`` for the main stage)."""

    name: str
    dicts: list[dict]
    groups: list[Group]
    spec: Stage | None


def normalize_groups(params: Iterable[Any], where: str, base_loss_default: bool) -> tuple[list[dict], list[Group]]:
    """Param-group dicts for the optimizer and their :class:`Group` records.

    ``params`` is all leaf floating-point (or complex) tensors, or all param-group dicts; ``where`` names the
    argument in error messages; a group without ``base_loss`` gets ``base_loss_default``.
    """
    items = list(params)
    if not items:
        raise ValueError(f"{where}: no parameters to train")
    if all(isinstance(p, Tensor) for p in items):
        items = [{"params": items}]
    elif not all(isinstance(p, Mapping) for p in items):
        raise TypeError(f"{where}: params must be all tensors or all param-group dicts")
    dicts, groups = [], []
    for g in items:
        d = dict(g)
        ps = d["params"]
        ps = [ps] if isinstance(ps, Tensor) else list(ps)
        for p in ps:
            if not isinstance(p, Tensor) or not p.is_leaf:
                raise TypeError(f"{where}: every parameter must be a leaf tensor")
            if not p.dtype.is_floating_point and not p.dtype.is_complex:
                raise TypeError(f"{where}: parameters must be floating point, got {p.dtype}")
        d["params"] = ps
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"{where}: a group's 'name' must be a string")
        d.setdefault("base_loss", base_loss_default)
        dicts.append(d)
        groups.append(Group(ps, name, bool(d["base_loss"])))
    return dicts, groups


def collect_params(model: nn.Module, params: Iterable[Any] | None, stages: Sequence[Stage]) -> list[StageParams]:
    """The main stage's groups (``params``, default every parameter of ``model`` with ``requires_grad``)
    followed by each stage's, in order. A parameter may belong to one group only; group names are unique."""
    main = params if params is not None else [p for p in model.parameters() if p.requires_grad]
    out = [StageParams("main", *normalize_groups(main, "train(params=...)", True), None)]
    for s in stages:
        out.append(StageParams(s.name, *normalize_groups(s.params, f"Stage {s.name!r}", s.base_loss), s))
    seen: set[int] = set()
    names: list[str] = []
    for stage in out:
        for g in stage.groups:
            if g.name is not None:
                names.append(g.name)
            for p in g.params:
                if id(p) in seen:
                    raise ValueError(f"a parameter is given twice (stage {stage.name!r})")
                seen.add(id(p))
    if len(set(names)) != len(names):
        raise ValueError(f"param-group names must be unique, got {names}")
    return out


def group_names(stages: Sequence[StageParams]) -> set[str]:
    """Names of every named group of every stage."""
    return {g.name for s in stages for g in s.groups if g.name is not None}


class Freezer:
    """Trains exactly the parameters some stage optimises, for the duration of a run.

    :meth:`freeze` sets ``requires_grad`` of every model parameter to whether a stage trains it, moves the
    trained parameters outside the model (:attr:`external`, e.g. a hook's Lagrange multipliers) to the run's
    device and makes them require grad; :meth:`restore` puts every ``requires_grad`` flag back as it was.
    """

    def __init__(self) -> None:
        self.saved: list[tuple[Tensor, bool]] = []
        self.external: list[Tensor] = []
        self.external_ids: set[int] = set()

    def freeze(self, model: nn.Module, stages: Sequence[StageParams], device: torch.device) -> None:
        trained = {id(p) for s in stages for g in s.groups for p in g.params}
        model_params = list(model.parameters())
        model_ids = {id(p) for p in model_params}
        self.external = [p for s in stages for g in s.groups for p in g.params if id(p) not in model_ids]
        self.external_ids = {id(p) for p in self.external}
        self.saved = [(p, p.requires_grad) for p in model_params + self.external]
        for p in model_params:
            p.requires_grad_(id(p) in trained)
        for p in self.external:
            if p.device != device:
                p.data = p.data.to(device)
            p.requires_grad_(True)

    def restore(self) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
