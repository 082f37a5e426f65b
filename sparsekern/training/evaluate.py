"""Evaluation of a model in eval mode: loss, accuracy and (with an adversary) robust accuracy."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekern.modes import restore_flags, training_flags
from sparsekern.training.adversary import Adversary
from sparsekern.training.data import count_samples, detach_inputs, make_loader, module_device, split_batch, to_device
from sparsekern.training.losses import LossFn, count_correct, default_loss

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
    device = torch.device(device) if device is not None else module_device(model)
    loader, _ = make_loader(data, batch_size=batch_size, shuffle=False, seed=0, rank=0, world_size=1)
    flags = training_flags(model)
    model.eval()
    sums = {"loss": 0.0, "correct": 0, "count": 0, "robust_loss": 0.0, "robust_correct": 0}
    n = 0
    classification = True
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(to_device(batch, device))
            b = count_samples(x)
            with torch.no_grad():
                out = model(x)
                sums["loss"] += float(loss_fn(out, y)) * b
            corr = count_correct(out, y)
            if corr is None:
                classification = False
            else:
                sums["correct"] += corr[0]
                sums["count"] += corr[1]
            if adversary is not None:
                with torch.enable_grad():
                    x_adv = adversary(model, x, y)
                with torch.no_grad():
                    out_adv = model(detach_inputs(x_adv))
                    sums["robust_loss"] += float(loss_fn(out_adv, y)) * b
                corr = count_correct(out_adv, y)
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

