"""LASSO regression channel pruning (He, Zhang, Sun: "Channel Pruning for Accelerating Very Deep Neural
Networks", ICCV 2017), the "regression-based feature reconstruction" of Liu et al. 2019.

A layer's channels are selected by how well the next layer's output can be reconstructed from a subset of
them. With the per-channel contributions ``Z[:, c]`` to the consumer's sampled outputs and the target ``T``
(:mod:`sparsekern.methods._reconstruction`), the paper's channel-selection step solves

    beta = argmin_beta  1 / (2 n) ||T - sum_c beta_c Z[:, c]||^2 + alpha ||beta||_1,

increasing ``alpha`` until exactly the target number of coefficients ``n_keep = int(C * (1 - ratio))`` stay
nonzero; the kept channels are the nonzero betas, and the consumer's weights on them are then refit by least
squares. (The paper may alternate beta and weight steps while alpha grows; this is the single pass, one
LASSO selection then one least-squares refit.) "Increase alpha until the count is reached" is a bisection in
log space between ``alpha_max * 1e-6`` and ``alpha_max = ||Z^T T||_inf / n``, where every beta is 0.

The LASSO is solved by scikit-learn's coordinate descent (``sklearn.linear_model.Lasso``) on an equivalent
small problem: with ``G = Z^T Z = V diag(l) V^T``, ``||T - Z beta||^2 = ||y' - X' beta||^2 + const`` for
``X' = diag(sqrt l) V^T`` and ``y' = diag(1 / sqrt l) V^T Z^T T`` (eigenvalues ``l > 1e-12 max l``), so each
fit costs O(C^2) per sweep whatever the number of samples (the 1/(2n) factor changes only alpha's scale).

Scores: a channel's score is the largest alpha tried in the search (relative to ``alpha_max``) at which its
beta was nonzero, i.e. how much L1 pressure it survives; channel rounding adds back the highest first.
When the search cannot hit the count exactly (ties on the LASSO path; dead channels with ``Z[:, c] = 0``
never enter), the solution with the fewest nonzeros above the target is cut to its largest
``|beta_c| * ||Z[:, c]||`` (with a warning, and ``exact = False`` in the plan's per-layer meta).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from sparsekern.methods._reconstruction import LayerStats, Selection, prune_by_reconstruction
from sparsekern.methods.budget import ratio_for_budget
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.plan import Plan

__all__ = ["LassoSelection", "lasso_select", "select", "prune", "Lasso"]


@dataclass
class LassoSelection:
    """Result of :func:`lasso_select`.

    Attributes:
        keep: sorted kept channels (int64, length ``n_keep``); beta: (C,) LASSO coefficients at ``alpha``
            (nonzero exactly on ``keep`` when ``exact``); alpha: the alpha chosen, relative to alpha_max;
        exact: whether some alpha gave exactly ``n_keep`` nonzeros; fits: LASSO solves done;
        scores: (C,) largest relative alpha tried at which each beta was nonzero (0 if never).
    """

    keep: np.ndarray
    beta: np.ndarray
    alpha: float
    exact: bool
    fits: int
    scores: np.ndarray


def _reduce(gram: np.ndarray, zty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(X', y')`` with ``X'^T X' = G`` and ``X'^T y' = b`` (the projection of T onto span(Z))."""
    lam, vec = np.linalg.eigh(gram)
    ok = lam > 1e-12 * max(float(lam.max()), 1e-300)
    root = np.sqrt(lam[ok])
    x = root[:, None] * vec[:, ok].T
    y = (vec[:, ok].T @ zty) / root
    return x, y


def lasso_select(gram: torch.Tensor | np.ndarray, zty: torch.Tensor | np.ndarray, n_keep: int, *,
                 max_fits: int = 60, tol: float = 1e-8) -> LassoSelection:
    """He et al.'s channel selection: the LASSO support of size ``n_keep``, found by searching alpha.

    Args:
        gram: ``G = Z^T Z`` (C, C); zty: ``b = Z^T T`` (C,).
        n_keep: number of channels to keep (1 <= n_keep <= C).
        max_fits: most LASSO solves in the search; tol: coordinate-descent tolerance.
    """
    g = np.asarray(gram.detach().cpu() if isinstance(gram, torch.Tensor) else gram, dtype=np.float64)
    b = np.asarray(zty.detach().cpu() if isinstance(zty, torch.Tensor) else zty, dtype=np.float64)
    c = g.shape[0]
    if not 1 <= n_keep <= c:
        raise ValueError(f"n_keep must be in [1, {c}], got {n_keep}")
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    if n_keep == c:
        return LassoSelection(np.arange(c), np.ones(c), 0.0, True, 0, np.ones(c))
    from sklearn.linear_model import Lasso  # local import: only this method needs scikit-learn

    x, y = _reduce(g, b)
    n = x.shape[0]
    scale = math.sqrt(float(y @ y) / n) or 1.0  # put the target at unit RMS so tol and alpha are O(1)
    x, y = x / scale, y / scale
    alpha_max = float(np.abs(x.T @ y).max()) / n
    if alpha_max <= 0:
        raise ValueError("the target is orthogonal to every channel's contribution; nothing to select")
    scores = np.zeros(c)
    fits = 0

    def fit(rel: float) -> np.ndarray:
        nonlocal fits
        fits += 1
        solver = Lasso(alpha=rel * alpha_max, fit_intercept=False, max_iter=20000, tol=tol, selection="cyclic")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning at tiny alpha; the support is what we use
            solver.fit(x, y)
        beta = solver.coef_.copy()
        np.maximum(scores, np.where(beta != 0, rel, 0.0), out=scores)
        return beta

    lo, hi = 1e-6, 1.0  # relative alphas; nnz(hi) = 0 < n_keep
    beta_lo = fit(lo)
    best: tuple[float, np.ndarray] | None = (lo, beta_lo) if np.count_nonzero(beta_lo) >= n_keep else None
    if np.count_nonzero(beta_lo) == n_keep:
        return _result(beta_lo, lo, True, fits, scores, norms, n_keep)
    while fits < max_fits:
        mid = math.sqrt(lo * hi)
        beta = fit(mid)
        k = int(np.count_nonzero(beta))
        if k == n_keep:
            return _result(beta, mid, True, fits, scores, norms, n_keep)
        if k > n_keep:
            lo = mid
            if best is None or k <= np.count_nonzero(best[1]):
                best = (mid, beta)
        else:
            hi = mid
    warnings.warn(
        f"LASSO alpha search found no alpha with exactly {n_keep} of {c} nonzero coefficients in {fits} fits; "
        "keeping the largest |beta| * ||Z_c|| of the closest larger support",
        stacklevel=2,
    )
    rel, beta = best if best is not None else (lo, beta_lo)
    return _result(beta, rel, False, fits, scores, norms, n_keep)


def _result(beta: np.ndarray, rel: float, exact: bool, fits: int, scores: np.ndarray, norms: np.ndarray,
            n_keep: int) -> LassoSelection:
    if exact:
        keep = np.nonzero(beta)[0]
    else:  # cut (or, if too few are nonzero, fill up) by contribution, ties by score then index
        strength = np.abs(beta) * norms
        keep = np.sort(np.lexsort((np.arange(len(beta)), -scores, -strength))[:n_keep])
    return LassoSelection(np.sort(keep).astype(np.int64), beta, rel, exact, fits, scores.copy())


def select(stats: LayerStats, n_keep: int) -> Selection:
    """He et al.'s selection on a layer's statistics (:func:`lasso_select`)."""
    r = lasso_select(stats.gram, stats.zty, n_keep)
    return Selection(keep=r.keep, scores=r.scores, info={"alpha": r.alpha, "exact": r.exact, "fits": r.fits})


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
    """Plan LASSO channel pruning and refit the next layers.

    Args:
        model: the trained model (not modified).
        example_inputs: a tensor or tuple of tensors to trace with.
        data: DataLoader or Dataset of ``(x, y)`` (training data); the first ``batches`` batches are used.
        ratio: fraction of each layer's channels to remove: a float for every prunable layer (block-internal
            convs in ResNets, every conv in VGG) or for ``layers``, or layer name -> ratio. A layer keeps
            ``max(1, int(C * (1 - ratio)))`` channels.
        n_samples: consumer output locations sampled per layer (each with all its output channels); the
            weight refit wants well over ``kept channels * kh * kw`` of them.
        batches: number of batches of ``data`` to sample from; batch_size: for a Dataset.
        layers: restrict a float ``ratio`` to these layers.
        seed: seeds the data order (Dataset) and the sampled locations.
        refit: ``"weights"`` (the paper's least squares on the consumer's kept weights), ``"scale"``
            (rescale each kept channel) or ``"none"``.
        ridge: relative ridge of the refit (toward the current weights).

    Returns:
        ``(plan, refitted)``: the plan (scores described in the module docstring; ``meta["layers"]`` has the
        alpha found and per-layer reconstruction errors on the samples) and a refitted copy of ``model``;
        compile the plan against the copy: ``sparsekern.compile(refitted, plan, x)``.
    """
    return prune_by_reconstruction(
        model, example_inputs, data, ratio=ratio, select=select, method="lasso", n_samples=n_samples,
        batches=batches, layers=layers, batch_size=batch_size, seed=seed, refit=refit, ridge=ridge,
    )


@register_method("lasso")
class Lasso(Method):
    """Lasso at a FLOPs budget: one uniform ratio for the block-internal layers, found by
    :func:`sparsekern.methods.budget.ratio_for_budget`, then :func:`prune` (returns the refitted copy)."""

    order = 40
    summary = "LASSO channel selection on the next layer's output, least-squares refit (He et al., ICCV 2017)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        ratio, _ = ratio_for_budget(model, ctx.example_inputs, budget, scope="internal")
        return Pruned(*prune(model, ctx.example_inputs, ctx.train_data, ratio=ratio, seed=ctx.seed))
