"""ThiNet (Luo, Wu, Lin: "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression",
ICCV 2017).

A layer's filters are pruned by how little the *next* layer's output depends on them. On sampled output
elements of the consumer, the output is a sum over its input channels of per-channel contributions
``Z[:, c]`` (rows = sampled (location, output channel) pairs; :mod:`sparsekern.methods._reconstruction`).
ThiNet grows the set ``T`` of removed channels greedily (its Algorithm 1): at each step it adds the channel
whose addition keeps ``||sum_{c in T} Z[:, c]||^2``, the part of the output lost with them, smallest, until
``|T| = C - int(C * (1 - ratio))``. Then it refits the consumer on the kept channels by least squares (the
paper's eq. 6 scales each kept channel; ``refit="weights"``, the default, re-solves every kept weight of the
consumer, which contains the scaling; ``refit="scale"`` is the paper's own variant).

The greedy step works on the Gram matrix ``G = Z^T Z`` (C, C) only:
``||sum_{T + c} Z||^2 = ||sum_T Z||^2 + 2 sum_{i in T} G[i, c] + G[c, c]``, O(C) per candidate.
The greedy is run to the end, so every channel gets a score: its step in the removal order (channels removed
later score higher; channel rounding adds those back first).

Layers are single-producer groups (block-internal convs in ResNets, every conv in VGG), pruned one after the
other, each on the model pruned and refitted so far, with targets from the unpruned model; no fine-tuning in
between (see :mod:`sparsekern.methods._reconstruction`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from sparsekern.methods._reconstruction import LayerStats, Selection, prune_by_reconstruction
from sparsekern.methods.budget import ratio_for_budget
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.plan import Plan

__all__ = ["greedy_removal_order", "select", "prune", "ThiNet"]


def greedy_removal_order(gram: torch.Tensor | np.ndarray) -> np.ndarray:
    """ThiNet's greedy order over all channels: entry ``k`` is the channel removed at step ``k``.

    Args:
        gram: ``G = Z^T Z`` (C, C) of the per-channel contributions ``Z`` (rows, C).

    Returns:
        int64 (C,): each step adds the channel ``c`` minimising ``||sum_{i in T + c} Z[:, i]||^2`` given the
        channels ``T`` removed before it (ties: lowest index).
    """
    g = np.asarray(gram.detach().cpu() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"gram must be square (C, C), got shape {g.shape}")
    c = g.shape[0]
    cross = np.zeros(c)  # sum_{i in T} G[i, :]
    diag = np.diag(g).copy()
    removed = np.zeros(c, dtype=bool)
    order = np.empty(c, dtype=np.int64)
    for step in range(c):
        cost = 2.0 * cross + diag  # ||sum_{T+c} Z||^2 minus the constant ||sum_T Z||^2
        cost[removed] = np.inf
        pick = int(np.argmin(cost))
        order[step] = pick
        removed[pick] = True
        cross += g[pick]
    return order


def select(stats: LayerStats, n_keep: int) -> Selection:
    """ThiNet's selection on a layer's statistics: keep the ``n_keep`` channels removed last."""
    order = greedy_removal_order(stats.gram)
    n_remove = stats.size - n_keep
    scores = np.empty(stats.size)
    scores[order] = np.arange(stats.size, dtype=np.float64)
    removed_part = float(stats.gram[order[:n_remove]][:, order[:n_remove]].sum()) if n_remove else 0.0
    return Selection(
        keep=np.sort(order[n_remove:]),
        scores=scores,
        info={"removed_energy": removed_part / max(stats.yy, 1e-300)},
    )


def prune(
    model: nn.Module,
    example_inputs: Any,
    data: DataLoader | Dataset,
    *,
    ratio: float | Mapping[str, float],
    n_samples: int = 4096,
    batches: int = 8,
    layers: Iterable[str] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    refit: str = "weights",
    ridge: float = 1e-4,
) -> tuple[Plan, nn.Module]:
    """Plan ThiNet pruning and refit the next layers.

    Args:
        model: the trained model (not modified).
        example_inputs: a tensor or tuple of tensors to trace with.
        data: DataLoader or Dataset of ``(x, y)`` (training data); the first ``batches`` batches are used.
        ratio: fraction of each layer's filters to remove: a float for every prunable layer (block-internal
            convs in ResNets, every conv in VGG) or for ``layers``, or layer name -> ratio. A layer keeps
            ``max(1, int(C * (1 - ratio)))`` filters, as in l1_norm.
        n_samples: consumer output locations sampled per layer (each with all its output channels); the
            weight refit wants well over ``kept channels * kh * kw`` of them.
        batches: number of batches of ``data`` to sample from; batch_size: for a Dataset.
        layers: restrict a float ``ratio`` to these layers.
        seed: seeds the data order (Dataset) and the sampled locations.
        refit: ``"weights"`` (least squares on the consumer's kept weights), ``"scale"`` (the paper's
            per-channel scale) or ``"none"``.
        ridge: relative ridge of the refit (toward the current weights).

    Returns:
        ``(plan, refitted)``: the plan (scores = greedy removal step; ``meta["layers"]`` has per-layer
        reconstruction errors on the samples) and a refitted copy of ``model``; compile the plan against the
        copy: ``sparsekern.compile(refitted, plan, x)``.
    """
    return prune_by_reconstruction(
        model, example_inputs, data, ratio=ratio, select=select, method="thinet", n_samples=n_samples,
        batches=batches, layers=layers, batch_size=batch_size, seed=seed, refit=refit, ridge=ridge,
    )


@register_method("thinet")
class ThiNet(Method):
    """ThiNet at a FLOPs budget: one uniform ratio for the block-internal layers, found by
    :func:`sparsekern.methods.budget.ratio_for_budget`, then :func:`prune` (returns the refitted copy)."""

    order = 30
    summary = "greedy channel selection on the next layer's output, least-squares refit (Luo et al., ICCV 2017)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        ratio, _ = ratio_for_budget(model, ctx.example_inputs, budget, scope="internal")
        return Pruned(*prune(model, ctx.example_inputs, ctx.train_data, ratio=ratio, seed=ctx.seed))
