"""The hook protocol: :class:`Hook` (what a hook may implement), :class:`TrainState` (what it sees),
:class:`TrainResult` (what a run returns) and :func:`call_hooks`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sparsekern.training.config import TrainConfig

class Hook:
    """Base class of training hooks; every method is a no-op. Subclass and override what you need.

    Any object with a subset of these methods works as a hook too. Hooks with state that must survive a
    checkpoint/resume implement :meth:`state_dict` / :meth:`load_state_dict` (tensors, numbers, strings,
    lists, tuples and dicts only: checkpoints are :func:`sparsekern.serialize.save_state` files, no pickle).
    """

    def on_train_start(self, state: TrainState) -> None:
        """Once, after optimizers are built and a checkpoint (if any) was loaded."""

    def on_epoch_start(self, state: TrainState) -> None:
        """At the start of every epoch (the model is in train mode)."""

    def on_step_start(self, state: TrainState) -> None:
        """Before the first stage of every step (e.g. anneal a temperature from ``state.step``)."""

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> Tensor | Mapping[str, Tensor] | None:
        """Extra objective terms for this stage's forward.

        ``batch`` is the ``(x, y)`` batch on the device, ``outputs`` the model outputs on the clean ``x``;
        ``state.extra`` holds ``"x_adv"``, ``"outputs_adv"``, ``"teacher_outputs"`` when they exist.
        Return a scalar tensor (added to every group's objective), a mapping ``{group_name: scalar}``
        (added to that named group of this stage only), or ``None``.
        """
        return None

    def after_backward(self, state: TrainState) -> None:
        """Gradients of the stage's parameters are final (and averaged across ranks); edit ``p.grad``."""

    def after_step(self, state: TrainState) -> None:
        """After ``optimizer.step()`` (e.g. project parameters onto a constraint set)."""

    def on_epoch_end(self, state: TrainState) -> None:
        """After the epoch's evaluation (``state.history[-1]`` holds it), before the checkpoint."""

    def on_train_end(self, state: TrainState) -> None:
        """Once, after the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


@dataclass
class TrainState:
    """What hooks see. ``model`` is the plain module (never the DDP wrapper)."""

    model: nn.Module
    config: TrainConfig
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    stage_names: list[str]
    device: torch.device
    total_steps: int
    steps_per_epoch: int | None
    epoch: int = 0
    step: int = 0
    stage: str = "main"
    phase: str = "idle"  # "attack" | "clean" | "adversarial" | "teacher" | "loss" | "idle" | "eval"
    batch: Any = None
    last_loss: float = float("nan")
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    rank: int = 0
    world_size: int = 1
    stop: bool = False  # set by a hook to end training after the current step

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The main stage's optimizer."""
        return self.optimizers[0]

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """The main stage's lr scheduler."""
        return self.schedulers[0]

    @property
    def lr(self) -> float:
        """Current lr of the main stage's first param group."""
        return float(self.optimizers[0].param_groups[0]["lr"])

    @property
    def progress(self) -> float:
        """Fraction of the run done, ``step / total_steps`` in [0, 1]."""
        return self.step / max(1, self.total_steps)


@dataclass
class TrainResult:
    """Outcome of :func:`sparsekern.train.train`.

    ``history``: one dict per epoch (``epoch``, ``step``, ``lr``, ``train_loss``, ``train_accuracy``,
    ``train_<metric>`` for every metric hooks logged, and ``eval_*`` when evaluated). ``final``: the last
    evaluation's metrics (``loss``, ``accuracy``, ``n``, ...) or, without ``eval_data``, the last epoch's
    ``train_*`` entries. ``steps``: optimizer steps done in total (resumed runs included).
    """

    history: list[dict[str, float]]
    final: dict[str, float]
    steps: int
    state: TrainState


def call_hooks(hooks: Sequence[Any], name: str, state: TrainState) -> None:
    """Call ``hook.<name>(state)`` on every hook that has such a method, in order."""
    for h in hooks:
        fn = getattr(h, name, None)
        if fn is not None:
            fn(state)
