"""Per-stage optimizers, lr schedules and data: the runtime record :class:`StageRun` of each stage."""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import Tensor

from sparsekern.training.config import Stage, TrainConfig, schedule_lambda
from sparsekern.training.data import SeededSampler, make_loader
from sparsekern.training.params import StageParams

# Seed offset between the data permutations of consecutive stages (a prime, so streams never coincide).
STAGE_SEED_STRIDE = 7919


def build_optimizer(kind: str, groups: list[dict], settings: TrainConfig | Stage) -> torch.optim.Optimizer:
    """``kind`` over ``groups`` with the defaults of ``settings`` (``lr``, ``weight_decay``; ``momentum``
    and ``nesterov`` for SGD, ``betas`` for Adam/AdamW); a group dict may override any of them."""
    s = settings
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


class StageRun:
    """Runtime record of one stage: its groups, optimizer, scheduler, and its own data (``loader is None``:
    the stage reuses the main stage's batch). Runs on steps whose index is a multiple of ``every``."""

    def __init__(
        self, params: StageParams, optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Any, sampler: SeededSampler | None, every: int,
    ) -> None:
        self.name, self.dicts, self.groups = params.name, params.dicts, params.groups
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loader, self.sampler, self.every = loader, sampler, every
        self.params: list[Tensor] = [p for g in self.groups for p in g.params]
        self.names = {g.name for g in self.groups if g.name is not None}
        self.iterator: Iterator[Any] | None = None
        self.cycle = 0

    def restart(self) -> None:
        """Start the stage's data over (at every epoch start)."""
        self.iterator, self.cycle = None, 0

    def next_batch(self, epoch: int) -> Any:
        """The next batch of the stage's own data, cycling through it (reseeded by ``(epoch, cycle)``)."""
        if self.iterator is None:
            self.iterator = iter(self.loader)
        try:
            return next(self.iterator)
        except StopIteration:
            self.cycle += 1
            if self.sampler is not None:
                self.sampler.set_epoch(epoch, self.cycle)
            self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:
                raise ValueError(f"Stage {self.name!r}: data yields no batches") from None


def build_stage_runs(
    stages: list[StageParams], cfg: TrainConfig, total_steps: int, *, rank: int, world_size: int
) -> list[StageRun]:
    """A :class:`StageRun` per stage: the main stage takes optimizer and schedule from ``cfg``, a further
    stage from its :class:`Stage` (its schedule spans its own ``ceil(total_steps / every)`` steps; warm-up,
    milestones and gamma come from ``cfg``), and a stage with ``data`` gets a loader of its own."""
    runs = []
    for k, sp in enumerate(stages):
        settings: TrainConfig | Stage = cfg if sp.spec is None else sp.spec
        optimizer = build_optimizer(settings.optimizer, sp.dicts, settings)
        loader, sampler, every = None, None, 1 if sp.spec is None else sp.spec.every
        if sp.spec is not None and sp.spec.data is not None:
            loader, sampler = make_loader(
                sp.spec.data, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed + STAGE_SEED_STRIDE * k,
                rank=rank, world_size=world_size, drop_last=cfg.drop_last, num_workers=cfg.num_workers,
            )
        factor = schedule_lambda(
            math.ceil(total_steps / every), settings.schedule, warmup_steps=cfg.warmup_steps,
            milestones=cfg.milestones, gamma=cfg.gamma,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        runs.append(StageRun(sp, optimizer, scheduler, loader, sampler, every))
    return runs
