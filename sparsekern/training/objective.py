"""The objective of one stage's step: the default loss (task loss, distillation, adversarial mix), the
hooks' terms, and how they are merged into one backward pass per distinct objective."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import Tensor

from sparsekern.training.hooks import TrainState
from sparsekern.training.losses import LossFn, distillation_loss, logits_of
from sparsekern.training.params import Group


def add_terms(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where a missing term (``None``) counts as absent, not as zero."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


@dataclass
class Forward:
    """Model (and teacher) outputs of one stage's forward passes; ``x_adv`` and the ``*_adv`` outputs only
    with an adversary, the ``teacher*`` outputs only with a teacher."""

    outputs: Any
    teacher: Any = None
    x_adv: Any = None
    outputs_adv: Any = None
    teacher_adv: Any = None


@dataclass
class Objective:
    """The default objective: ``c = loss_fn`` or, with a teacher, ``(1 - alpha) loss_fn + alpha T^2 KL``;
    with an adversary ``(c(x) + w c(x_adv)) / (1 + w)``, ``w = adversarial_weight``."""

    loss_fn: LossFn
    alpha: float
    temperature: float
    adversarial_weight: float

    def criterion(self, outputs: Any, y: Any, teacher_outputs: Any) -> Tensor:
        task = self.loss_fn(outputs, y)
        if teacher_outputs is None:
            return task
        kd = distillation_loss(logits_of(outputs), logits_of(teacher_outputs), self.temperature)
        return (1.0 - self.alpha) * task + self.alpha * kd

    def base(self, fwd: Forward, y: Any) -> Tensor:
        loss = self.criterion(fwd.outputs, y, fwd.teacher)
        if fwd.outputs_adv is None:
            return loss
        w = self.adversarial_weight
        return (loss + w * self.criterion(fwd.outputs_adv, y, fwd.teacher_adv)) / (1.0 + w)


@dataclass
class StageLoss:
    """The terms of one stage's objective: ``base`` (default objective, ``None`` when no group takes it),
    ``shared`` (hooks' scalar terms, reaching every group) and ``targeted`` (hooks' terms per group name)."""

    base: Tensor | None
    shared: Tensor | None = None
    targeted: dict[str, Tensor] = field(default_factory=dict)

    @property
    def common(self) -> Tensor | None:
        """What every group of the stage gets: ``base + shared``."""
        return add_terms(self.base, self.shared)


def add_hook_terms(
    loss: StageLoss, hooks: Sequence[Any], state: TrainState, batch: Any, outputs: Any, *,
    stage_groups: set[str], all_groups: set[str],
) -> None:
    """Add every hook's ``loss(state, batch, outputs)`` to ``loss``, in hook order: a tensor to ``shared``,
    a mapping's terms to ``targeted`` when keyed by one of this stage's groups (other known groups belong to
    other stages; an unknown group name is an error)."""
    for h in hooks:
        fn = getattr(h, "loss", None)
        term = fn(state, batch, outputs) if fn is not None else None
        if term is None:
            continue
        if isinstance(term, Mapping):
            for key, t in term.items():
                if key not in all_groups:
                    raise KeyError(f"hook {type(h).__name__} returned a loss for unknown group {key!r}")
                if key in stage_groups and t is not None:
                    loss.targeted[key] = loss.targeted[key] + t if key in loss.targeted else t
        else:
            loss.shared = term if loss.shared is None else loss.shared + term


def backward_jobs(groups: Sequence[Group], loss: StageLoss) -> tuple[list[tuple[Tensor, list[Tensor]]], int]:
    """``(objective, parameters)`` pairs, one per distinct objective, and the number of distinct objectives.

    Groups that share ``(base_loss, targeted term)`` share one objective; an objective that does not
    require grad (it depends on none of the stage's parameters) is left out.
    """
    buckets: dict[tuple[bool, str | None], list[Tensor]] = {}
    for g in groups:
        key = (g.base_loss, g.name if g.name in loss.targeted else None)
        buckets.setdefault(key, []).extend(g.params)
    jobs = []
    for (use_base, name), ps in buckets.items():
        obj = add_terms(loss.base if use_base else None, loss.shared)
        if name is not None:
            obj = add_terms(obj, loss.targeted[name])
        if obj is not None and obj.requires_grad:
            jobs.append((obj, ps))
    return jobs, len(buckets)
