"""Settings of a training run: :class:`TrainConfig` (and :func:`train_defaults`, its defaults for a block of
code), further optimisation :class:`Stage` s, lr schedules."""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from torch.utils.data import DataLoader, Dataset

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "constant", "noam")
#: :class:`TrainConfig` fields whose defaults :func:`train_defaults` may replace
DEFAULTABLE = ("momentum", "weight_decay", "nesterov", "schedule", "milestones", "gamma", "warmup_steps")
_DEFAULTS: ContextVar[Mapping[str, Any]] = ContextVar("sparsekern_train_defaults", default=MappingProxyType({}))


def _defaultable(name: str, value: Any) -> Any:
    """A dataclass field defaulting to ``value`` unless :func:`train_defaults` is active for ``name``."""
    return field(default_factory=lambda: _DEFAULTS.get().get(name, value))


@contextmanager
def train_defaults(**fields: Any) -> Iterator[None]:
    """Within the block, every :class:`TrainConfig` built without one of ``fields`` (names from
    :data:`DEFAULTABLE`) takes the value given here instead of the usual default; explicit arguments win.

    This is how a recipe's training settings (:mod:`sparsekern.recipes`: schedule, milestones, weight decay,
    ...) reach the trainers that pipelines build internally (the Rethinking protocol's stages). Nested blocks
    merge, the inner values winning; the previous defaults return when the block exits.
    """
    unknown = sorted(set(fields) - set(DEFAULTABLE))
    if unknown:
        raise ValueError(f"train_defaults: {unknown} cannot be defaulted; choose from {list(DEFAULTABLE)}")
    token = _DEFAULTS.set(MappingProxyType({**_DEFAULTS.get(), **fields}))
    try:
        yield
    finally:
        _DEFAULTS.reset(token)


@dataclass
class TrainConfig:
    """Settings of one :func:`sparsekern.train.train` run.

    Attributes:
        epochs: passes over the training data; fractional values train ``ceil(epochs * steps_per_epoch)``
            steps (Scratch-B budgets, see :func:`scratch_b_epochs`).
        batch_size: used when ``train_data`` is a ``Dataset`` (a ``DataLoader`` keeps its own).
        eval_batch_size: batch size for a ``Dataset`` given as ``eval_data`` (default: ``batch_size``).
        shuffle: reshuffle a ``Dataset`` every epoch (permutation seeded by ``(seed, epoch)``).
        drop_last: drop the last incomplete batch of a ``Dataset``.
        num_workers: DataLoader workers for a ``Dataset``.
        lr, momentum, weight_decay, nesterov, betas: optimizer settings (``momentum``/``nesterov`` for SGD,
            ``betas`` for Adam/AdamW); a param-group dict may override any of them.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        schedule: ``"cosine"`` (to zero over the steps after warm-up), ``"step"`` (multiply by ``gamma`` at
            each of ``milestones``, given as fractions of the total steps), ``"constant"`` or ``"noam"``
            (decay as the inverse square root of the step after warm-up); see :func:`lr_factor`. The schedule spans the steps actually trained (``max_steps`` included).
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``.
        grad_clip: clip the global L2 norm of each stage's gradients to this value (after the hooks'
            gradient edits).
        seed: seeds torch (``seed + rank``), numpy and ``random`` at the start of training, and the
            per-epoch data permutation.
        device: ``"cuda"``/``"cpu"``/...; default CUDA when available (``cuda:LOCAL_RANK`` under torchrun).
        progress: show a tqdm bar with loss / accuracy / lr (rank 0 only).
        checkpoint: path; written at the end of every epoch (:func:`sparsekern.serialize.save_state`, no
            pickle), and resumed from when it exists.
        eval_every: evaluate ``eval_data`` every this many epochs (and always after the last one).
        max_steps: hard cap on optimizer steps (tests, demos).
        deterministic: ``torch.use_deterministic_algorithms(True)`` for the run (CPU runs are
            bit-reproducible for a fixed seed even without it).
        find_unused_parameters: passed to ``DistributedDataParallel``.

    The defaults of the fields in :data:`DEFAULTABLE` can be replaced for a block of code with
    :func:`train_defaults`.
    """

    epochs: float = 1
    batch_size: int = 128
    eval_batch_size: int | None = None
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = 0
    lr: float = 0.1
    momentum: float = _defaultable("momentum", 0.9)
    weight_decay: float = _defaultable("weight_decay", 1e-4)
    nesterov: bool = _defaultable("nesterov", False)
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "sgd"
    schedule: str = _defaultable("schedule", "cosine")
    milestones: tuple[float, ...] = _defaultable("milestones", (0.5, 0.75))
    gamma: float = _defaultable("gamma", 0.1)
    warmup_steps: int = _defaultable("warmup_steps", 0)
    grad_clip: float | None = None
    seed: int = 0
    device: str | None = None
    progress: bool = True
    checkpoint: str | None = None
    eval_every: int = 1
    max_steps: int | None = None
    deterministic: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        self.milestones = tuple(float(m) for m in self.milestones)
        if any(not 0.0 <= m <= 1.0 for m in self.milestones) or list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"milestones must be sorted fractions in [0, 1], got {self.milestones}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))


def finetune_config(epochs: float = 40, lr: float = 1e-3, **overrides: Any) -> TrainConfig:
    """Fine-tuning settings of the Rethinking protocol (Liu et al. 2019): SGD at a constant lr 0.001.

    ``overrides`` are further :class:`TrainConfig` fields.
    """
    return TrainConfig(**{"epochs": epochs, "lr": lr, "schedule": "constant", **overrides})


def scratch_b_epochs(
    epochs: float, flops_full: float, flops_pruned: float, *, max_factor: float | None = None
) -> float:
    """Scratch-B budget (Liu et al. 2019): ``epochs * flops_full / flops_pruned``, optionally capped.

    The pruned network gets the same total computation as the full one; the result is fractional and is
    meant for :attr:`TrainConfig.epochs`. ``max_factor`` caps the scaling (e.g. 2.0) for extreme prunings.
    """
    if flops_pruned <= 0 or flops_full <= 0:
        raise ValueError(f"FLOPs must be positive, got full={flops_full}, pruned={flops_pruned}")
    factor = flops_full / flops_pruned
    if max_factor is not None:
        factor = min(factor, max_factor)
    return epochs * factor


def lr_factor(
    step: int,
    total_steps: int,
    schedule: str = "cosine",
    *,
    warmup_steps: int = 0,
    milestones: Sequence[float] = (0.5, 0.75),
    gamma: float = 0.1,
) -> float:
    """Multiplier of the base lr for the optimizer update with 0-based index ``step``.

    * warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps``;
    * ``"cosine"``: ``0.5 * (1 + cos(pi * p))`` with ``p = (step - warmup) / (total - warmup)`` in [0, 1);
    * ``"step"``: ``gamma ** k`` where ``k`` counts the milestones ``m`` with ``step >= m * total_steps``;
    * ``"constant"``: 1;
    * ``"noam"``: ``sqrt(max(1, warmup) / (step + 1))``, the inverse-square-root decay of Vaswani et al. (2017,
      eq. 3), scaled so that the factor is 1 where the warm-up ends: the peak lr is ``lr``. (The schedule's
      original form ``d_model^-0.5 * min(n^-0.5, n * warmup^-1.5)`` for update ``n = step + 1`` is this curve
      times ``(d_model * warmup)^-0.5``; the FLOP and SRU enwik8 scripts use it with an lr flag that scales
      it, so their peak is ``lr_flag / sqrt(d_model * warmup)``.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "noam":
        return math.sqrt(max(1, warmup_steps) / (step + 1))
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        p = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if schedule == "step":
        return gamma ** sum(1 for m in milestones if step >= m * total_steps)
    raise ValueError(f"unknown schedule {schedule!r}")


@dataclass
class Stage:
    """A further optimizer over its own parameters, run inside every step after the main one.

    The bilevel search of TAS (Dong & Yang 2019) is the main stage (weights, SGD, on one half of the
    data) plus ``Stage("arch", arch_params, data=other_half, optimizer="adam", lr=1e-3,
    betas=(0.5, 0.999), weight_decay=1e-3)``. Each stage zeroes its own gradients, runs its own forward
    (and adversary) on its batch, adds the hooks' terms (hooks see ``state.stage == name``; dict terms keyed
    by one of this stage's group names reach only that group), back-propagates into its own parameters
    only, and steps its own optimizer and schedule.

    Attributes:
        name: shown to hooks as ``state.stage`` and used in metric names (``"<name>/loss"``).
        params: parameters or param-group dicts (same rules as ``train(params=...)``).
        data: ``DataLoader``/``Dataset`` cycled independently (restarted at each epoch start); ``None``
            reuses the main stage's batch (and its adversarial example) of the same step.
        optimizer, lr, momentum, weight_decay, nesterov, betas: this stage's optimizer.
        schedule: lr schedule over this stage's steps (``"constant"`` by default: architecture parameters
            and multipliers usually keep a fixed lr); warm-up, milestones and gamma come from the config.
        every: run on steps whose index is a multiple of ``every``.
        base_loss: default for the groups of this stage: include the default objective or not.
    """

    name: str
    params: Iterable[Any]
    data: DataLoader | Dataset | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "constant"
    every: int = 1
    base_loss: bool = True

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"Stage {self.name!r}: optimizer must be one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Stage {self.name!r}: schedule must be one of {SCHEDULES}")
        if self.every < 1:
            raise ValueError(f"Stage {self.name!r}: every must be >= 1")


def schedule_lambda(
    total_steps: int, schedule: str, *, warmup_steps: int, milestones: Sequence[float], gamma: float
) -> Callable[[int], float]:
    """``step -> lr_factor(step, total_steps, schedule, ...)`` for ``torch.optim.lr_scheduler.LambdaLR``."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, schedule, warmup_steps=warmup_steps, milestones=milestones, gamma=gamma)

    return factor
