"""Losses of the default objective and the accuracy count: cross-entropy, distillation, logits lookup."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Any, Tensor], Tensor]

def logits_of(outputs: Any) -> Tensor:
    """The logits of a model output: the tensor itself, its ``logits`` (a Hugging Face ``ModelOutput``) or the
    first element of a tuple/list."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(getattr(outputs, "logits", None), Tensor):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise TypeError(f"cannot find logits in model outputs of type {type(outputs).__name__}")


def flatten_classes(logits: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(..., C) logits with (...) targets -> (N, C), (N,); (N, C) stays."""
    if logits.dim() > 2 and (targets is None or targets.shape == logits.shape[:-1]):
        logits = logits.reshape(-1, logits.shape[-1])
        targets = None if targets is None else targets.reshape(-1)
    return logits, targets


def default_loss(outputs: Any, targets: Tensor) -> Tensor:
    """Mean cross-entropy. Logits (N, C) with targets (N,), or (..., C) with (...) (e.g. a language
    model's (B, L, V) with (B, L): mean over tokens), or any shape ``F.cross_entropy`` accepts."""
    logits, flat_targets = flatten_classes(logits_of(outputs), targets)
    return F.cross_entropy(logits, flat_targets)


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over samples (Hinton et al. 2015).

    Logits (N, C) or (..., C) (flattened to rows). The ``T^2`` keeps gradient magnitudes comparable to the
    hard-label loss across temperatures. The trainer mixes ``(1 - a) * CE + a * distillation_loss``.
    """
    s, _ = flatten_classes(student_logits)
    t, _ = flatten_classes(teacher_logits.detach())
    kl = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.softmax(t / temperature, dim=-1), reduction="batchmean")
    return kl * (temperature * temperature)


def count_correct(outputs: Any, targets: Tensor) -> tuple[int, int] | None:
    """(number of correct argmax predictions, number of predictions), or None if not a classification."""
    try:
        logits = logits_of(outputs)
    except TypeError:
        return None
    if not isinstance(targets, Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        return None
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        return None
    pred = logits.detach().argmax(dim=-1)
    return int((pred == targets).sum()), targets.numel()

