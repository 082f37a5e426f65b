"""FLOP budgets for ratio-based methods: the uniform pruning ratio whose compiled model meets a budget.

L1-norm, ThiNet and LASSO keep ``int(C * (1 - ratio))`` channels per prunable layer; the FLOPs of the
result depend only on those counts, not on which channels are kept. :func:`plan_flops` therefore counts a
plan's FLOPs without compiling it (each conv/linear layer's dense FLOPs scaled by its kept input and output
fractions; equal to :func:`sparsekern.flops` of the compiled model), and :func:`ratio_for_budget` bisects on it.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

import sparsekern as sk
from sparsekern.graph import ChannelGraph, Layout, is_depthwise, trace_channels
from sparsekern.plan import GroupKeep, Plan, PlanError

__all__ = ["plan_flops", "ratio_for_budget"]


def plan_flops(cg: ChannelGraph, dense: "sk.cost.FlopReport", plan: Plan) -> int:
    """FLOPs of ``plan`` compiled on the model behind ``cg``, from the dense model's per-layer FLOPs.

    For a plan with ``removed_blocks``, ``cg`` and ``dense`` must describe the model with those blocks removed
    (:func:`sparsekern.depth.channel_graph` and ``sk.flops(sparsekern.depth.remove_blocks(model, blocks), x)``);
    only the channel keep-sets are counted here.
    """
    keep = cg.root_keep(plan)
    total = dense.total
    for node in cg.gm.graph.nodes:
        if node.op != "call_module" or node.target not in dense.layers:
            continue
        m = cg.modules[node.target]
        if not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        cost = dense.layers[node.target]
        per_call = cost.flops / max(cost.calls, 1)

        def kept_fraction(lay: Any) -> float:
            return len(cg.kept_positions(lay, keep)) / lay.size if isinstance(lay, Layout) else 1.0

        out = kept_fraction(cg.layouts.get(node.name))
        src = node.args[0]
        inp = kept_fraction(cg.layouts.get(src.name)) if hasattr(src, "name") else 1.0
        scale = out if is_depthwise(m) else out * inp
        total -= per_call * (1.0 - scale)
    return int(round(total))


def _uniform_plan(cg: ChannelGraph, groups: list[str], ratio: float) -> Plan:
    """Keep the first ``int(C * (1 - ratio))`` channels of each group (counts are all that FLOPs need)."""
    channels = {}
    for g in groups:
        size = cg.groups[g].size
        k = max(1, int(size * (1.0 - ratio)))
        if k < size:
            channels[g] = GroupKeep(size, tuple(range(k)))
    return Plan(channels=channels)


def ratio_for_budget(
    model: nn.Module,
    example_inputs: Any,
    budget: float,
    *,
    scope: str = "internal",
    tolerance: float = 1e-4,
) -> tuple[float, float]:
    """Smallest uniform ratio whose plan compiles to <= ``budget`` x the dense model's FLOPs.

    Args:
        budget: target FLOPs as a fraction of the dense model's, in (0, 1].
        scope: which groups are pruned (see :func:`sparsekern.methods.l1_norm.prune`).
        tolerance: bisection stops when the ratio interval is narrower than this.

    Returns:
        (ratio, achieved FLOPs fraction). Raises :class:`PlanError` if even the largest ratio misses the
        budget (the prunable layers carry too small a share of the FLOPs).
    """
    from sparsekern.methods.l1_norm import prunable_layers

    if not 0.0 < budget <= 1.0:
        raise PlanError(f"FLOPs budget must be a fraction in (0, 1], got {budget}")
    cg = trace_channels(model, example_inputs)
    dense = sk.flops(model, example_inputs)
    groups = list(prunable_layers(cg, scope).values())

    def achieved(ratio: float) -> float:
        return plan_flops(cg, dense, _uniform_plan(cg, groups, ratio)) / dense.total

    if budget == 1.0:
        return 0.0, 1.0
    lo, hi = 0.0, 0.999
    best = achieved(hi)
    if best > budget:
        raise PlanError(
            f"a FLOPs budget of {budget:.1%} is out of reach with scope={scope!r}: pruning all but one "
            f"channel of every prunable layer still leaves {best:.1%}; use scope='all' or a larger budget"
        )
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        value = achieved(mid)
        if value <= budget:
            hi, best = mid, value
        else:
            lo = mid
    return hi, best
