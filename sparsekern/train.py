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

from typing import Any, Iterable, Sequence

from torch import nn

from sparsekern.modes import preserve_buffers
from sparsekern.training.adversary import PGD, Adversary, pgd_attack
from sparsekern.training.config import Stage, TrainConfig, finetune_config, lr_factor, scratch_b_epochs
from sparsekern.training.evaluate import evaluate
from sparsekern.training.hooks import Hook, TrainResult, TrainState
from sparsekern.training.losses import LossFn, default_loss, distillation_loss
from sparsekern.training.trainer import Trainer

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
    return Trainer(
        model, train_data, config, hooks=list(hooks), eval_data=eval_data, teacher=teacher,
        distill_alpha=distill_alpha, distill_temperature=distill_temperature, adversary=adversary,
        adversarial_weight=adversarial_weight, eval_adversary=eval_adversary, params=params,
        stages=list(stages), loss_fn=loss_fn or default_loss,
    ).run()
