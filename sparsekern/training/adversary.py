"""Adversarial inputs: the L-inf PGD attack (its buffer guard, :func:`sparsekern.modes.preserve_buffers`, keeps
attacks from moving BN statistics; ``eval_mode=True`` runs it on the model in evaluation mode, as the official
ANP-VS attack does during training)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from sparsekern.modes import eval_mode as evaluation_mode
from sparsekern.modes import preserve_buffers
from sparsekern.training.losses import LossFn, default_loss

Adversary = Callable[[nn.Module, Any, Tensor], Any]


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
    eval_mode: bool = False,
) -> Tensor:
    """L-infinity projected gradient descent attack (Madry et al. 2018, "Towards Deep Learning Models
    Resistant to Adversarial Attacks").

    ``x_0 = x + U(-eps, eps)`` (if ``random_start``), then ``steps`` times
    ``x_{k+1} = clip(proj_eps(x_k + step * sign(grad_x loss_fn(model(x_k), y))))``.

    Args:
        model: used in its current mode unless ``eval_mode``. In train mode its buffers (BN running stats) are
            restored after the attack, so the attack does not shift them; in eval mode nothing changes.
        x: inputs, any shape (e.g. (N, C, H, W)), in the units of the data the model sees.
        y: targets for ``loss_fn`` (class indices (N,) by default).
        eps: radius of the L-inf ball around ``x`` (a float or a tensor broadcastable to ``x``, e.g. a
            per-channel radius in normalised units).
        step: step size per iteration (same units as ``eps``).
        steps: number of iterations (0 returns the random start).
        random_start: start from a uniform sample of the ball instead of ``x``.
        clamp: data range ``(lo, hi)`` (floats or broadcastable tensors, ``None`` = unbounded side).
        loss_fn: loss to maximise, ``loss_fn(outputs, y)``; mean cross-entropy by default.
        eval_mode: attack the model in evaluation mode (``model.eval()`` inside the attack: BN uses its running
            statistics, dropout and stochastic masks their test-time form), every submodule's own flag restored
            afterwards (:func:`sparsekern.modes.eval_mode`). The ANP-VS official code attacks this way while
            training (Madaan et al. 2020).

    Returns:
        ``x_adv`` with ``|x_adv - x|_inf <= eps`` and inside ``clamp``; detached, same shape as ``x``.
        Parameter gradients (``p.grad``) are not touched.
    """
    loss_fn = loss_fn or default_loss
    x = x.detach()
    eps_t = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    step_t = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if eval_mode:
        guard: Any = evaluation_mode(model)
    else:
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
    """An adversary for :func:`sparsekern.train.train` / :func:`sparsekern.train.evaluate`:
    ``PGD(eps, step, steps)(model, x, y)``.

    ANP-VS on CIFAR (Madaan et al. 2020): ``PGD(0.03, 0.007, 10, clamp=(0, 1), eval_mode=True)`` for
    training, 40 steps for evaluation (on [0, 1] pixels; pass per-channel tensors for normalised data).
    ``eval_mode``: see :func:`pgd_attack`.
    """

    eps: float | Tensor
    step: float | Tensor
    steps: int
    random_start: bool = True
    clamp: tuple[Any, Any] | None = None
    loss_fn: LossFn | None = None
    eval_mode: bool = False

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return pgd_attack(
            model, x, y, eps=self.eps, step=self.step, steps=self.steps,
            random_start=self.random_start, clamp=self.clamp, loss_fn=self.loss_fn, eval_mode=self.eval_mode,
        )

