"""One training loop for every pruning method, extended through hooks.

Every method in ``sparsekern.methods`` trains through :func:`train`; none writes its own loop. What
differs between methods is expressed with a few orthogonal mechanisms:

================================  ===========================================================
need (method)                     mechanism
================================  ===========================================================
extra loss terms (SANP cost,      :meth:`Hook.loss` returns a scalar added to the objective
PFS sparsity, FLOP Lagrangian)
gradient edits (Network           :meth:`Hook.after_backward` edits ``p.grad`` before the step
Slimming's ``s * sign(gamma)``)
post-step projections (PFS        :meth:`Hook.after_step`
gates clamped to [0, 1])
train only some parameters        ``params=``: parameters (or param-group dicts) to optimise;
(PFS gates, frozen weights)       every other parameter of the model is frozen while training
gradient ascent (FLOP's           a param group with ``maximize=True`` (torch optimizers
Lagrange multipliers)             support it per group)
bilevel optimisation (TAS:        ``stages=``: further :class:`Stage` s, each with its own
weights by SGD on one half of     parameters, optimizer, schedule and data, run one after the
the data, architecture by Adam    other inside every step
on the other half)
separate losses for two param     :meth:`Hook.loss` may return ``{group_name: term}``; a term
groups from one forward (ANP-VS)  then reaches only that named group, and ``base_loss=False``
                                  in a group dict keeps the default objective away from it
adversarial training (ANP-VS)     ``adversary(model, x, y) -> x_adv`` (e.g. :class:`PGD`)
knowledge distillation (TAS)      ``teacher=``: (1 - a) CE + a T^2 KL (Hinton et al. 2015)
================================  ===========================================================

Order of calls (``state.step`` is the 0-based index of the current step while it runs and the number of
completed steps afterwards)::

    on_train_start
    for each epoch:       on_epoch_start
        for each step:    on_step_start
            for each stage due this step (the main stage first, then ``stages`` in order):
                [adversary] -> forward -> loss (every hook) -> backward
                -> after_backward -> grad clipping -> optimizer.step / scheduler.step -> after_step
        evaluation (if due) -> on_epoch_end -> checkpoint
    on_train_end

Default objective of a step, for a batch ``(x, y)`` with model outputs ``f(x)``::

    c(x)      = loss_fn(f(x), y)                                   (cross-entropy by default)
    c(x)      = (1 - a) loss_fn(f(x), y) + a T^2 KL(q_T || p_T)     with a teacher, p_T = softmax(f(x)/T),
                                                                   q_T = softmax(teacher(x)/T)
    objective = (c(x) + w c(x_adv)) / (1 + w)                       with an adversary, else c(x)

plus the hooks' terms. Batch-norm and the adversary: the adversary runs with the model in *train* mode
(so that the attack sees the same normalisation, dropout and stochastic masks as the training forward),
but every buffer the attack's forwards change in place (BN running statistics, ``num_batches_tracked``)
is restored afterwards (:func:`preserve_buffers`); the clean and the adversarial training forwards then
both update the running statistics, as in the usual PyTorch adversarial-training code.

Distributed: when launched by ``torchrun`` (environment ``WORLD_SIZE > 1``), :func:`train` initialises
the process group (NCCL on CUDA, gloo on CPU), wraps the model in ``DistributedDataParallel``, shards the
data with a per-epoch seeded sampler, shows the progress bar and writes checkpoints on rank 0 only.
Steps with several forward or backward passes (an adversary, several stages, per-group losses) run under
``no_sync()`` and average the gradients with one all-reduce per parameter afterwards. Evaluation runs on
every rank over the whole evaluation set.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import os
import random
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, TensorDataset

from sparsekern.modes import restore_flags, training_flags
from sparsekern.serialize import load_state, save_state

__all__ = [
    "Hook",
    "PGD",
    "Stage",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "default_loss",
    "distillation_loss",
    "evaluate",
    "finetune_config",
    "lr_factor",
    "pgd_attack",
    "preserve_buffers",
    "scratch_b_epochs",
    "train",
]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_SCHEDULES = ("cosine", "step", "constant")
_CHECKPOINT_VERSION = 1

LossFn = Callable[[Any, Tensor], Tensor]
Adversary = Callable[[nn.Module, Any, Tensor], Any]


# ------------------------------------------------------------------------------------------- config


@dataclass
class TrainConfig:
    """Settings of one :func:`train` run.

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
            each of ``milestones``, given as fractions of the total steps) or ``"constant"``; see
            :func:`lr_factor`. The schedule spans the steps actually trained (``max_steps`` included).
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
    """

    epochs: float = 1
    batch_size: int = 128
    eval_batch_size: int | None = None
    shuffle: bool = True
    drop_last: bool = False
    num_workers: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_steps: int = 0
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
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
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
    * ``"constant"``: 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
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
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"Stage {self.name!r}: optimizer must be one of {_OPTIMIZERS}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"Stage {self.name!r}: schedule must be one of {_SCHEDULES}")
        if self.every < 1:
            raise ValueError(f"Stage {self.name!r}: every must be >= 1")


# -------------------------------------------------------------------------------------------- hooks


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
    """Outcome of :func:`train`.

    ``history``: one dict per epoch (``epoch``, ``step``, ``lr``, ``train_loss``, ``train_accuracy``,
    ``train_<metric>`` for every metric hooks logged, and ``eval_*`` when evaluated). ``final``: the last
    evaluation's metrics (``loss``, ``accuracy``, ``n``, ...) or, without ``eval_data``, the last epoch's
    ``train_*`` entries. ``steps``: optimizer steps done in total (resumed runs included).
    """

    history: list[dict[str, float]]
    final: dict[str, float]
    steps: int
    state: TrainState


# ------------------------------------------------------------------------------------------- losses


def _logits(outputs: Any) -> Tensor:
    """The logits of a model output: the tensor itself or the first element of a tuple/list."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}")


def _flatten_classes(logits: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(..., C) logits with (...) targets -> (N, C), (N,); (N, C) stays."""
    if logits.dim() > 2 and (targets is None or targets.shape == logits.shape[:-1]):
        logits = logits.reshape(-1, logits.shape[-1])
        targets = None if targets is None else targets.reshape(-1)
    return logits, targets


def default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy. Logits (N, C) with targets (N,), or (..., C) with (...) (e.g. a language
    model's (B, L, V) with (B, L): mean over tokens), or any shape ``F.cross_entropy`` accepts."""
    logits, flat_targets = _flatten_classes(_logits(outputs), targets)
    return F.cross_entropy(logits, flat_targets)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over samples (Hinton et al. 2015).

    Logits (N, C) or (..., C) (flattened to rows). The ``T^2`` keeps gradient magnitudes comparable to the
    hard-label loss across temperatures. The trainer mixes ``(1 - a) * CE + a * distillation_loss``.
    """
    s, _ = _flatten_classes(student_logits)
    t, _ = _flatten_classes(teacher_logits.detach())
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="batchmean")
    return kl * (temperature * temperature)


def _correct(outputs: Any, targets: Tensor) -> tuple[int, int] | None:
    """(number of correct argmax predictions, number of predictions), or None if not a classification."""
    try:
        logits = _logits(outputs)
    except TypeError:
        return None
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return None
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        return None
    pred = logits.detach().argmax(dim=-1)
    return int((pred == targets).sum()), targets.numel()


# ---------------------------------------------------------------------------------------- adversary


@contextlib.contextmanager
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


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, clamp: tuple[Any, Any] | None) -> Tensor:
    x_adv = torch.maximum(torch.minimum(x_adv, x + eps), x - eps)
    if clamp is not None:
        lo, hi = clamp
        x_adv = torch.clamp(
            x_adv,
            min=torch.as_tensor(lo, dtype=x.dtype, device=x.device) if lo is not None else None,
            max=torch.as_tensor(hi, dtype=x.dtype, device=x.device) if hi is not None else None,
        )
    return x_adv


def pgd_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float | Tensor,
    step: float | Tensor,
    steps: int,
    random_start: bool = True,
    clamp: tuple[float | Tensor | None, float | Tensor | None] | None = None,
    loss_fn: LossFn | None = None,
) -> Tensor:
    """L-infinity projected gradient descent attack (Madry et al. 2018, "Towards Deep Learning Models
    Resistant to Adversarial Attacks").

    ``x_0 = x + U(-eps, eps)`` (if ``random_start``), then ``steps`` times
    ``x_{k+1} = clip(proj_eps(x_k + step * sign(grad_x loss_fn(model(x_k), y))))``.

    Args:
        model: used in its current mode. In train mode its buffers (BN running stats) are restored after
            the attack, so the attack does not shift them; in eval mode nothing changes.
        x: inputs, any shape (e.g. (N, C, H, W)), in the units of the data the model sees.
        y: targets for ``loss_fn`` (class indices (N,) by default).
        eps: radius of the L-inf ball around ``x`` (a float or a tensor broadcastable to ``x``, e.g. a
            per-channel radius in normalised units).
        step: step size per iteration (same units as ``eps``).
        steps: number of iterations (0 returns the random start).
        random_start: start from a uniform sample of the ball instead of ``x``.
        clamp: data range ``(lo, hi)`` (floats or broadcastable tensors, ``None`` = unbounded side).
        loss_fn: loss to maximise, ``loss_fn(outputs, y)``; mean cross-entropy by default.

    Returns:
        ``x_adv`` with ``|x_adv - x|_inf <= eps`` and inside ``clamp``; detached, same shape as ``x``.
        Parameter gradients (``p.grad``) are not touched.
    """
    loss_fn = loss_fn or default_loss
    x = x.detach()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    step_t = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    guard = preserve_buffers(model) if model.training else contextlib.nullcontext()
    with guard, torch.enable_grad():
        if random_start:
            x_adv = x + (torch.rand_like(x) * 2 - 1) * eps_t
        else:
            x_adv = x.clone()
        x_adv = _project(x_adv, x, eps_t, clamp)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            loss = loss_fn(model(x_adv), y)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = _project(x_adv.detach() + step_t * grad.sign(), x, eps_t, clamp)
    return x_adv.detach()


@dataclass
class PGD:
    """An adversary for :func:`train` / :func:`evaluate`: ``PGD(eps, step, steps)(model, x, y)``.

    ANP-VS on CIFAR (Madaan et al. 2020): ``PGD(0.03, 0.007, 10, clamp=(0, 1))`` for training, 40 steps
    for evaluation (on [0, 1] pixels; pass per-channel tensors for normalised data).
    """

    eps: float | Tensor
    step: float | Tensor
    steps: int
    random_start: bool = True
    clamp: tuple[Any, Any] | None = None
    loss_fn: LossFn | None = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd_attack(
            model, x, y, eps=self.eps, step=self.step, steps=self.steps,
            random_start=self.random_start, clamp=self.clamp, loss_fn=self.loss_fn,
        )


# --------------------------------------------------------------------------------------------- data


class _SeededSampler(Sampler[int]):
    """Indices of a dataset of size ``n``: a permutation seeded by ``(seed, epoch key)`` (or the identity),
    padded to a multiple of ``world_size`` by wrapping around and sharded ``rank::world_size``."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.key: tuple[int, ...] = (0,)

    def set_epoch(self, *key: int) -> None:
        self.key = tuple(key)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(hash((self.seed,) + self.key) & 0x7FFF_FFFF_FFFF_FFFF)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        if total > len(order) and order:
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return iter(order[self.rank:total:self.world_size])


def _as_dataset(data: Any) -> Any:
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return TensorDataset(*data)
    return data


def _make_loader(
    data: Any, *, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
    drop_last: bool = False, num_workers: int = 0,
) -> tuple[Any, _SeededSampler | None]:
    """A loader for ``data`` (DataLoader, Dataset or an (X, Y) tensor pair) and its seeded sampler, if any.

    A user's DataLoader is kept as is in one process; under DDP it is rebuilt around a sharding sampler
    (shuffled if it used a ``RandomSampler``).
    """
    data = _as_dataset(data)
    if isinstance(data, DataLoader):
        if world_size == 1:
            return data, None
        if data.batch_size is None:
            raise ValueError("under DDP a DataLoader must have a batch_size (custom batch samplers are not sharded)")
        sampler = _SeededSampler(
            len(data.dataset), shuffle=isinstance(data.sampler, RandomSampler), seed=seed,
            rank=rank, world_size=world_size,
        )
        loader = DataLoader(
            data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
            collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
        )
        return loader, sampler
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a DataLoader, a map-style Dataset or an (X, Y) pair, got {type(data).__name__}")
    sampler = _SeededSampler(len(data), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)
    return loader, sampler


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _split_batch(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be an (inputs, targets) tuple or list, got {type(batch).__name__}")


def _batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return _batch_size(x[0])
    if isinstance(x, dict) and x:
        return _batch_size(next(iter(x.values())))
    return 1


def _module_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------- evaluate


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    device: str | torch.device | None = None,
    adversary: Adversary | None = None,
    loss_fn: LossFn | None = None,
    batch_size: int = 256,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` in eval mode over ``data`` (per-module train/eval flags restored).

    Args:
        data: a DataLoader, a Dataset or an ``(X, Y)`` tensor pair (batched by ``batch_size`` in order).
        device: where inputs go; default the model's device.
        adversary: ``adversary(model, x, y) -> x_adv``, run in eval mode; adds ``robust_loss`` and
            ``robust_accuracy``.
        loss_fn: ``loss_fn(outputs, targets)`` -> mean loss; cross-entropy by default.
        max_batches: stop after this many batches.

    Returns:
        ``{"loss", "accuracy", "n"}`` (+ ``"robust_loss"``, ``"robust_accuracy"``): ``loss`` is the mean
        of the per-batch mean loss weighted by batch size, ``accuracy`` the fraction of correct argmax
        predictions (per token for sequence outputs; NaN when outputs are not class scores), ``n`` the
        number of samples.
    """
    loss_fn = loss_fn or default_loss
    device = torch.device(device) if device is not None else _module_device(model)
    loader, _ = _make_loader(data, batch_size=batch_size, shuffle=False, seed=0, rank=0, world_size=1)
    flags = training_flags(model)
    model.eval()
    sums = {"loss": 0.0, "correct": 0, "count": 0, "robust_loss": 0.0, "robust_correct": 0}
    n = 0
    classification = True
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _split_batch(_to_device(batch, device))
            b = _batch_size(x)
            with torch.no_grad():
                out = model(x)
                sums["loss"] += float(loss_fn(out, y)) * b
            corr = _correct(out, y)
            if corr is None:
                classification = False
            else:
                sums["correct"] += corr[0]
                sums["count"] += corr[1]
            if adversary is not None:
                with torch.enable_grad():
                    x_adv = adversary(model, x, y)
                with torch.no_grad():
                    out_adv = model(_detach(x_adv))
                    sums["robust_loss"] += float(loss_fn(out_adv, y)) * b
                corr = _correct(out_adv, y)
                if corr is not None:
                    sums["robust_correct"] += corr[0]
            n += b
    finally:
        restore_flags(flags)
    if n == 0:
        raise ValueError("evaluate: no data")
    acc = sums["correct"] / sums["count"] if classification and sums["count"] else float("nan")
    result = {"loss": sums["loss"] / n, "accuracy": acc, "n": float(n)}
    if adversary is not None:
        result["robust_loss"] = sums["robust_loss"] / n
        result["robust_accuracy"] = (
            sums["robust_correct"] / sums["count"] if classification and sums["count"] else float("nan")
        )
    return result


def _detach(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(_detach(v) for v in x)
    return x


# ------------------------------------------------------------------------------------ param groups


class _Group:
    __slots__ = ("params", "name", "base_loss")

    def __init__(self, params: list[Tensor], name: str | None, base_loss: bool) -> None:
        self.params, self.name, self.base_loss = params, name, base_loss


def _normalize_groups(params: Iterable[Any], where: str, base_loss_default: bool) -> tuple[list[dict], list[_Group]]:
    """Param-group dicts for the optimizer (``name``/``base_loss`` kept as extra keys) and their records."""
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
        groups.append(_Group(ps, name, bool(d["base_loss"])))
    return dicts, groups


def _build_optimizer(
    kind: str, groups: list[dict], *, lr: float, momentum: float, weight_decay: float, nesterov: bool,
    betas: tuple[float, float],
) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {kind!r}")


class _StageRun:
    """Runtime record of one stage: groups, optimizer, scheduler, data."""

    def __init__(
        self, name: str, dicts: list[dict], groups: list[_Group], optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler, loader: Any, sampler: _SeededSampler | None,
        every: int,
    ) -> None:
        self.name, self.dicts, self.groups = name, dicts, groups
        self.optimizer, self.scheduler = optimizer, scheduler
        self.loader, self.sampler, self.every = loader, sampler, every
        self.params = [p for g in groups for p in g.params]
        self.names = {g.name for g in groups if g.name is not None}
        self.iterator: Iterator[Any] | None = None
        self.cycle = 0


# ---------------------------------------------------------------------------------------- checkpoint


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    nps = state["numpy"]
    np.random.set_state(
        ("MT19937", nps["keys"].numpy().astype(np.uint32), nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# -------------------------------------------------------------------------------------- distributed


def _setup_distributed(device: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Initialises the process group under torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        dev = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
    else:
        dev = torch.device(device)
        if world > 1 and dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
    if world <= 1:
        return 0, 1, dev
    import torch.distributed as dist

    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        atexit.register(lambda: dist.destroy_process_group() if dist.is_initialized() else None)
    return dist.get_rank(), dist.get_world_size(), dev


def _allreduce_mean(params: Sequence[Tensor], world_size: int) -> None:
    """Average ``p.grad`` over ranks; a parameter without a gradient on every rank keeps ``None``."""
    import torch.distributed as dist

    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    for p, h in zip(params, has.tolist()):
        if h == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world_size)


# -------------------------------------------------------------------------------------------- train


def train(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig | None = None,
    *,
    hooks: Sequence[Any] = (),
    eval_data: Any = None,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.9,
    distill_temperature: float = 4.0,
    adversary: Adversary | None = None,
    adversarial_weight: float = 2.0,
    eval_adversary: Adversary | None = None,
    params: Iterable[Any] | None = None,
    stages: Sequence[Stage] = (),
    loss_fn: LossFn | None = None,
) -> TrainResult:
    """Train ``model`` in place and return the history; see the module docstring for the step anatomy.

    Args:
        model: any module taking ``x`` (``model(x)``) and returning logits (or a tuple whose first item is
            the logits, or anything ``loss_fn`` understands). Moved to the run's device.
        train_data: DataLoader, map-style Dataset (batched by ``config.batch_size``) or an ``(X, Y)``
            tensor pair. Batches are ``(x, y, ...)`` tuples/lists.
        config: :class:`TrainConfig` (defaults if None).
        hooks: :class:`Hook` objects (or anything with some of its methods), called in the given order.
        eval_data: evaluated with :func:`evaluate` every ``config.eval_every`` epochs and at the end.
        teacher: distillation teacher (eval mode, no grad; its flags are restored afterwards); the
            default objective becomes ``(1 - a) loss_fn + a T^2 KL`` with ``a = distill_alpha``,
            ``T = distill_temperature`` (TAS: 0.9 and 4; Hinton et al. 2015).
        adversary: ``adversary(model, x, y) -> x_adv`` (e.g. :class:`PGD`), called on the plain module in
            train mode with its buffers restored afterwards; the default objective becomes
            ``(c(x) + w c(x_adv)) / (1 + w)`` with ``w = adversarial_weight`` (ANP-VS: 2).
        eval_adversary: adversary for evaluation (adds ``eval_robust_accuracy`` to the history).
        params: what the main stage optimises: parameters or param-group dicts (per-group ``lr``,
            ``weight_decay``, ``maximize=True`` for gradient ascent, ``name`` to address the group from
            hook losses, ``base_loss=False`` to leave the default objective out of its gradient). Default:
            every parameter of ``model`` with ``requires_grad``. Model parameters that no stage optimises
            are frozen (``requires_grad=False``) for the run and restored afterwards; parameters outside
            the model (e.g. Lagrange multipliers owned by a hook) may be given too.
        stages: further :class:`Stage` s run after the main one in every step (bilevel search).
        loss_fn: ``loss_fn(outputs, targets)`` -> scalar; mean cross-entropy by default.

    Returns:
        :class:`TrainResult`. The model is left trained, on the run's device, with its per-module
        train/eval flags and ``requires_grad`` flags as they were on entry.
    """
    config = config or TrainConfig()
    return _Trainer(
        model, train_data, config, hooks=list(hooks), eval_data=eval_data, teacher=teacher,
        distill_alpha=distill_alpha, distill_temperature=distill_temperature, adversary=adversary,
        adversarial_weight=adversarial_weight, eval_adversary=eval_adversary, params=params,
        stages=list(stages), loss_fn=loss_fn or default_loss,
    ).run()


class _Trainer:
    def __init__(
        self, model: nn.Module, train_data: Any, config: TrainConfig, *, hooks: list[Any], eval_data: Any,
        teacher: nn.Module | None, distill_alpha: float, distill_temperature: float,
        adversary: Adversary | None, adversarial_weight: float, eval_adversary: Adversary | None,
        params: Iterable[Any] | None, stages: list[Stage], loss_fn: LossFn,
    ) -> None:
        if not 0.0 <= distill_alpha <= 1.0:
            raise ValueError(f"distill_alpha must be in [0, 1], got {distill_alpha}")
        if distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {distill_temperature}")
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        names = [s.name for s in stages]
        if "main" in names or len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique and not 'main', got {names}")
        self.model, self.config, self.hooks = model, config, hooks
        self.train_data, self.eval_data = train_data, eval_data
        self.teacher = teacher
        self.alpha, self.temperature = distill_alpha, distill_temperature
        self.adversary, self.adv_weight, self.eval_adversary = adversary, adversarial_weight, eval_adversary
        self.params_arg, self.stage_specs, self.loss_fn = params, stages, loss_fn
        self._warned_no_grad = False

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.config
        self.rank, self.world, self.device = _setup_distributed(cfg.device)
        self.is_main = self.rank == 0
        self.model.to(self.device)
        if self.teacher is not None:
            self.teacher.to(self.device)

        # Parameter groups of every stage; freeze what nobody trains.
        main_params = self.params_arg
        if main_params is None:
            main_params = [p for p in self.model.parameters() if p.requires_grad]
        specs: list[tuple[str, list[dict], list[_Group], Stage | None]] = []
        dicts, groups = _normalize_groups(main_params, "train(params=...)", True)
        specs.append(("main", dicts, groups, None))
        for s in self.stage_specs:
            d, g = _normalize_groups(s.params, f"Stage {s.name!r}", s.base_loss)
            specs.append((s.name, d, g, s))
        seen: set[int] = set()
        all_names: list[str] = []
        for name, _, groups, _ in specs:
            for g in groups:
                if g.name is not None:
                    all_names.append(g.name)
                for p in g.params:
                    if id(p) in seen:
                        raise ValueError(f"a parameter is given twice (stage {name!r})")
                    seen.add(id(p))
        if len(set(all_names)) != len(all_names):
            raise ValueError(f"param-group names must be unique, got {all_names}")
        self.all_group_names = set(all_names)

        model_params = list(self.model.parameters())
        model_ids = {id(p) for p in model_params}
        self.external: list[Tensor] = [
            p for _, _, groups, _ in specs for g in groups for p in g.params if id(p) not in model_ids
        ]
        self.external_ids = {id(p) for p in self.external}
        self.saved_requires_grad = [(p, p.requires_grad) for p in model_params + self.external]
        for p in model_params:
            p.requires_grad_(id(p) in seen)
        for p in self.external:
            if p.device != self.device:
                p.data = p.data.to(self.device)
            p.requires_grad_(True)

        # Data.
        self.main_loader, self.main_sampler = _make_loader(
            self.train_data, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed, rank=self.rank,
            world_size=self.world, drop_last=cfg.drop_last, num_workers=cfg.num_workers,
        )
        try:
            self.steps_per_epoch: int | None = len(self.main_loader)
        except TypeError:
            self.steps_per_epoch = None
        if self.steps_per_epoch == 0:
            raise ValueError("train_data yields no batches")
        if self.steps_per_epoch is None:
            if cfg.max_steps is None:
                raise ValueError("train_data has no length: set config.max_steps")
            self.total_steps = cfg.max_steps
            self.num_epochs: int | None = None
        else:
            self.total_steps = max(1, math.ceil(cfg.epochs * self.steps_per_epoch))
            if cfg.max_steps is not None:
                self.total_steps = min(self.total_steps, cfg.max_steps)
            self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

        # Optimizers and schedules.
        self.stages: list[_StageRun] = []
        for k, (name, dicts, groups, spec) in enumerate(specs):
            if spec is None:
                opt = _build_optimizer(
                    cfg.optimizer, dicts, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                    nesterov=cfg.nesterov, betas=cfg.betas,
                )
                schedule, every, loader, sampler = cfg.schedule, 1, None, None
            else:
                opt = _build_optimizer(
                    spec.optimizer, dicts, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay,
                    nesterov=spec.nesterov, betas=spec.betas,
                )
                schedule, every = spec.schedule, spec.every
                loader, sampler = (None, None)
                if spec.data is not None:
                    loader, sampler = _make_loader(
                        spec.data, batch_size=cfg.batch_size, shuffle=cfg.shuffle, seed=cfg.seed + 7919 * k,
                        rank=self.rank, world_size=self.world, drop_last=cfg.drop_last, num_workers=cfg.num_workers,
                    )
            n_steps = math.ceil(self.total_steps / every)
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, _make_lambda(n_steps, schedule, cfg))
            self.stages.append(_StageRun(name, dicts, groups, opt, scheduler, loader, sampler, every))

        # Distributed wrapper.
        self.ddp = None
        self.manual_sync = False
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            main_groups = self.stages[0].groups
            # More than one forward or backward per step: DDP's own reducer cannot follow; average by hand.
            multi = (
                self.adversary is not None
                or len(self.stages) > 1
                or (len(main_groups) > 1 and any(g.name is not None or not g.base_loss for g in main_groups))
            )
            if any(p.requires_grad for p in self.model.parameters()):
                self.ddp = DDP(
                    self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=cfg.find_unused_parameters,
                )
            self.manual_sync = multi or self.ddp is None
        self.module: nn.Module = self.ddp if self.ddp is not None else self.model

        self.state = TrainState(
            model=self.model, config=cfg, optimizers=[s.optimizer for s in self.stages],
            schedulers=[s.scheduler for s in self.stages], stage_names=[s.name for s in self.stages],
            device=self.device, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
            rank=self.rank, world_size=self.world,
        )

    # ------------------------------------------------------------------ checkpoint

    def _checkpoint_payload(self) -> dict[str, Any]:
        st = self.state
        return {
            "version": _CHECKPOINT_VERSION,
            "epoch": st.epoch + 1,
            "step": st.step,
            "total_steps": self.total_steps,
            "stages": [s.name for s in self.stages],
            "model": self.model.state_dict(),
            "external_params": [p.detach().clone() for p in self.external],
            "optimizers": [s.optimizer.state_dict() for s in self.stages],
            "schedulers": [s.scheduler.state_dict() for s in self.stages],
            "hooks": [
                [type(h).__qualname__, h.state_dict() if callable(getattr(h, "state_dict", None)) else {}]
                for h in self.hooks
            ],
            "history": list(st.history),
            "rng": _rng_state(),
            "loader_generators": self._loader_generator_states(),
        }

    def _loaders(self) -> list[Any]:
        return [self.main_loader] + [s.loader for s in self.stages[1:]]

    def _loader_generator_states(self) -> list[Tensor | None]:
        out = []
        for loader in self._loaders():
            gen = getattr(loader, "generator", None)
            out.append(gen.get_state() if isinstance(gen, torch.Generator) else None)
        return out

    def _save_checkpoint(self) -> None:
        path = self.config.checkpoint
        if path is None:
            return
        if self.is_main:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            save_state(self._checkpoint_payload(), path)
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _load_checkpoint(self) -> int:
        """Load ``config.checkpoint`` if it exists; return the epoch to start from."""
        path = self.config.checkpoint
        if path is None or not os.path.exists(path):
            return 0
        # On the CPU: RNG states must stay CPU byte tensors; state dicts are copied to their devices.
        ck = load_state(path)
        if ck.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"{path}: unsupported checkpoint version {ck.get('version')}")
        if ck["total_steps"] != self.total_steps or ck["stages"] != [s.name for s in self.stages]:
            raise ValueError(
                f"{path} belongs to a different run (total_steps {ck['total_steps']} vs {self.total_steps}, "
                f"stages {ck['stages']} vs {[s.name for s in self.stages]}); delete it or change config.checkpoint"
            )
        if len(ck["external_params"]) != len(self.external):
            raise ValueError(f"{path}: the number of parameters outside the model differs from this run")
        self.model.load_state_dict(ck["model"])
        with torch.no_grad():
            for p, v in zip(self.external, ck["external_params"]):
                p.copy_(v)
        for s, o, sch in zip(self.stages, ck["optimizers"], ck["schedulers"]):
            s.optimizer.load_state_dict(o)
            s.scheduler.load_state_dict(sch)
        # Hook states go back to hooks of the same class, in order; hooks may be added or dropped.
        saved = [(name, hs) for name, hs in ck["hooks"]]
        for h in self.hooks:
            if not callable(getattr(h, "load_state_dict", None)):
                continue
            for i, (name, hs) in enumerate(saved):
                if name == type(h).__qualname__:
                    h.load_state_dict(hs)
                    del saved[i]
                    break
        lost = [name for name, hs in saved if hs]
        if lost:
            warnings.warn(f"{path}: no hook of this run takes the saved state of {lost}", stacklevel=3)
        self.state.history = list(ck["history"])
        self.state.step = int(ck["step"])
        _set_rng_state(ck["rng"])
        if self.rank:  # each rank keeps its own stream of dropout / attack randomness
            torch.manual_seed(self.config.seed + self.rank + 104729 * self.state.step)
        for loader, gs in zip(self._loaders(), ck["loader_generators"]):
            gen = getattr(loader, "generator", None)
            if gs is not None and isinstance(gen, torch.Generator):
                gen.set_state(gs.cpu())
        return int(ck["epoch"])

    # ------------------------------------------------------------------ step

    def _call(self, name: str, *args: Any) -> None:
        for h in self.hooks:
            fn = getattr(h, name, None)
            if fn is not None:
                fn(*args)

    def _next_stage_batch(self, stage: _StageRun) -> Any:
        if stage.iterator is None:
            stage.iterator = iter(stage.loader)
        try:
            return next(stage.iterator)
        except StopIteration:
            stage.cycle += 1
            if stage.sampler is not None:
                stage.sampler.set_epoch(self.state.epoch, stage.cycle)
            stage.iterator = iter(stage.loader)
            try:
                return next(stage.iterator)
            except StopIteration:
                raise ValueError(f"Stage {stage.name!r}: data yields no batches") from None

    def _criterion(self, outputs: Any, y: Any, teacher_outputs: Any) -> Tensor:
        task = self.loss_fn(outputs, y)
        if teacher_outputs is None:
            return task
        kd = distillation_loss(_logits(outputs), _logits(teacher_outputs), self.temperature)
        return (1.0 - self.alpha) * task + self.alpha * kd

    def _teacher(self, x: Any) -> Any:
        st = self.state
        st.phase = "teacher"
        with torch.no_grad():
            return self.teacher(x)

    def _run_stage(self, stage: _StageRun, batch: Any, reuse_adv: Any) -> Any:
        """Forward, objective, backward, step of one stage. Returns the adversarial input it used."""
        st = self.state
        cfg = self.config
        x, y = _split_batch(batch)
        st.batch = batch
        for p in stage.params:
            p.grad = None
        sync_ctx = self.ddp.no_sync() if (self.ddp is not None and self.manual_sync) else contextlib.nullcontext()
        prefix = "" if stage.name == "main" else f"{stage.name}/"
        with sync_ctx:
            x_adv = None
            if self.adversary is not None:
                if reuse_adv is not None:
                    x_adv = reuse_adv
                else:
                    st.phase = "attack"
                    with preserve_buffers(self.model):
                        x_adv = _detach(self.adversary(self.model, x, y))
                st.extra["x_adv"] = x_adv
            st.phase = "clean"
            outputs = self.module(x)
            st.extra["outputs"] = outputs
            t_out = self._teacher(x) if self.teacher is not None else None
            if t_out is not None:
                st.extra["teacher_outputs"] = t_out
            out_adv = t_adv = None
            if x_adv is not None:
                st.phase = "adversarial"
                out_adv = self.module(x_adv)
                st.extra["outputs_adv"] = out_adv
                t_adv = self._teacher(x_adv) if self.teacher is not None else None
                if t_adv is not None:
                    st.extra["teacher_outputs_adv"] = t_adv
            st.phase = "loss"
            base = None
            if any(g.base_loss for g in stage.groups):
                base = self._criterion(outputs, y, t_out)
                if out_adv is not None:
                    base = (base + self.adv_weight * self._criterion(out_adv, y, t_adv)) / (1.0 + self.adv_weight)
            shared: Tensor | None = None
            targeted: dict[str, Tensor] = {}
            for h in self.hooks:
                fn = getattr(h, "loss", None)
                term = fn(st, batch, outputs) if fn is not None else None
                if term is None:
                    continue
                if isinstance(term, Mapping):
                    for key, t in term.items():
                        if key not in self.all_group_names:
                            raise KeyError(f"hook {type(h).__name__} returned a loss for unknown group {key!r}")
                        if key in stage.names and t is not None:
                            targeted[key] = targeted[key] + t if key in targeted else t
                else:
                    shared = term if shared is None else shared + term
            common = _add(base, shared)
            value = float(common.detach()) if common is not None else 0.0
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value} at step {st.step} (stage {stage.name!r})")
            st.metrics[f"{prefix}loss"] = value
            for key, t in targeted.items():
                st.metrics[f"{prefix}loss[{key}]"] = float(t.detach())
            if stage.name == "main":
                st.last_loss = value
                corr = _correct(outputs, y)
                if corr is not None and corr[1]:
                    st.metrics["accuracy"] = corr[0] / corr[1]

            # One backward per distinct objective: groups sharing (base?, targeted term) share it.
            buckets: dict[tuple[bool, str | None], list[Tensor]] = {}
            for g in stage.groups:
                key = (g.base_loss, g.name if g.name in targeted else None)
                buckets.setdefault(key, []).extend(g.params)
            jobs = []
            for (use_base, name), ps in buckets.items():
                obj = _add(base if use_base else None, shared)
                if name is not None:
                    obj = _add(obj, targeted[name])
                if obj is not None and obj.requires_grad:
                    jobs.append((obj, ps))
            if not jobs and not self._warned_no_grad:
                self._warned_no_grad = True
                warnings.warn(
                    f"stage {stage.name!r}: the objective does not depend on any of its parameters at step "
                    f"{st.step}; nothing is updated (are the right parameters given?)", stacklevel=4,
                )
            plain = len(self.stages) == 1 and len(jobs) == 1 and len(buckets) == 1
            for i, (obj, ps) in enumerate(jobs):
                if plain:
                    obj.backward()
                else:
                    torch.autograd.backward(obj, inputs=ps, retain_graph=i < len(jobs) - 1)
        st.phase = "idle"
        if self.world > 1:
            # Native DDP averages the model's gradients itself; parameters outside the model need it by hand.
            todo = stage.params if self.manual_sync else [p for p in stage.params if id(p) in self.external_ids]
            _allreduce_mean(todo, self.world)
        self._call("after_backward", st)
        if cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in stage.params if p.grad is not None], cfg.grad_clip)
        stage.optimizer.step()
        stage.scheduler.step()
        self._call("after_step", st)
        return x_adv

    def _step(self, main_batch: Any) -> None:
        st = self.state
        st.extra.clear()
        st.metrics.clear()
        self._call("on_step_start", st)
        main_batch = _to_device(main_batch, self.device)
        x_adv = None
        for stage in self.stages:
            if st.step % stage.every:
                continue
            st.stage = stage.name
            if stage.name == "main":
                x_adv = self._run_stage(stage, main_batch, None)
            elif stage.loader is None:
                self._run_stage(stage, main_batch, x_adv)
            else:
                self._run_stage(stage, _to_device(self._next_stage_batch(stage), self.device), None)
        st.stage = "main"

    # ------------------------------------------------------------------ loop

    def run(self) -> TrainResult:
        cfg = self.config
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        teacher_flags = training_flags(self.teacher) if self.teacher is not None else []
        model_flags = training_flags(self.model)
        self.saved_requires_grad: list[tuple[Tensor, bool]] = []
        bar = None
        try:
            if cfg.deterministic:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
                torch.use_deterministic_algorithms(True)
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
            self._setup()
            torch.manual_seed(cfg.seed + self.rank)
            np.random.seed(cfg.seed % 2**32)
            random.seed(cfg.seed)
            if self.teacher is not None:
                self.teacher.eval()
            start_epoch = self._load_checkpoint()
            st = self.state
            self.model.train()
            self._call("on_train_start", st)
            if cfg.progress and self.is_main:
                from tqdm.auto import tqdm

                bar = tqdm(total=self.total_steps, initial=st.step, desc="train", dynamic_ncols=True)
            epoch = start_epoch
            while st.step < self.total_steps and not st.stop:
                if self.num_epochs is not None and epoch >= self.num_epochs:
                    break
                self._run_epoch(epoch, bar)
                epoch += 1
            self._call("on_train_end", st)
        finally:
            if bar is not None:
                bar.close()
            for p, flag in self.saved_requires_grad:
                p.requires_grad_(flag)
            restore_flags(model_flags)
            restore_flags(teacher_flags)
            torch.use_deterministic_algorithms(prev_det)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn
        history = self.state.history
        if history:
            last = history[-1]
            evals = {k[5:]: v for k, v in last.items() if k.startswith("eval_")}
            final = evals or {k: v for k, v in last.items() if k.startswith("train_")}
        else:
            final = {}
        return TrainResult(history=list(history), final=final, steps=self.state.step, state=self.state)

    def _run_epoch(self, epoch: int, bar: Any) -> None:
        st, cfg = self.state, self.config
        st.epoch = epoch
        for s in [self.main_sampler] + [x.sampler for x in self.stages[1:]]:
            if s is not None:
                s.set_epoch(epoch, 0)
        for s in self.stages[1:]:
            s.iterator, s.cycle = None, 0
        self.model.train()
        self._call("on_epoch_start", st)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}
        for batch in self.main_loader:
            if st.step >= self.total_steps:
                break
            self._step(batch)
            b = float(_batch_size(_split_batch(batch)[0]))
            for k, v in st.metrics.items():
                try:
                    v = float(v.detach()) if isinstance(v, Tensor) else float(v)
                except (TypeError, ValueError):
                    continue
                sums[k] = sums.get(k, 0.0) + v * b
                weights[k] = weights.get(k, 0.0) + b
            st.step += 1
            if bar is not None:
                post = {"loss": f"{sums['loss'] / weights['loss']:.4f}"} if "loss" in sums else {}
                if "accuracy" in sums:
                    post["acc"] = f"{sums['accuracy'] / weights['accuracy']:.3f}"
                post["lr"] = f"{st.lr:.3g}"
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if st.stop:
                break
        entry: dict[str, float] = {"epoch": float(epoch + 1), "step": float(st.step), "lr": st.lr}
        for k in sums:
            entry[f"train_{k}"] = sums[k] / weights[k]
        last_epoch = st.step >= self.total_steps or st.stop
        if self.eval_data is not None and ((epoch + 1) % cfg.eval_every == 0 or last_epoch):
            st.phase = "eval"
            metrics = evaluate(
                self.model, self.eval_data, device=self.device, adversary=self.eval_adversary,
                loss_fn=self.loss_fn, batch_size=cfg.eval_batch_size or cfg.batch_size,
            )
            st.phase = "idle"
            entry.update({f"eval_{k}": v for k, v in metrics.items()})
            if bar is not None and "accuracy" in metrics:
                bar.write(f"epoch {epoch + 1}: eval loss {metrics['loss']:.4f} acc {metrics['accuracy']:.4f}")
        st.history.append(entry)
        self._call("on_epoch_end", st)
        self._save_checkpoint()


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _make_lambda(total_steps: int, schedule: str, cfg: TrainConfig) -> Callable[[int], float]:
    warmup, milestones, gamma = cfg.warmup_steps, cfg.milestones, cfg.gamma

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, schedule, warmup_steps=warmup, milestones=milestones, gamma=gamma)

    return factor
