"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf: "Pruning Filters for Efficient ConvNets",
ICLR 2017), as re-implemented in Liu et al., "Rethinking the Value of Network Pruning", ICLR 2019.

Each prunable layer ranks its filters by the sum of absolute kernel weights and keeps the ``int(C * (1 - p))``
largest. The channels of a filter live on in every layer of its dependency group, so the plan prunes the
group. With ``scope="internal"`` (the paper's rule, the default) a layer is prunable when it is the only
producer of its group: in ResNets that is the block-internal convs (the first conv of a basic block; the
first two of a bottleneck), so block outputs, which residual adds tie together, stay untouched. With
``scope="all"`` every unpinned group is pruned, residual streams included, each channel scored by the sum
of the L1 norms of the filters that produce it in every layer of the group.

Predefined configurations from the paper (CIFAR-10), selected with ``config=``:

* ``"resnet56-A"``: p = 0.1 in every stage, skipping blocks 8, 10, 19, 27 (about 10% fewer FLOPs);
* ``"resnet56-B"``: p = (0.6, 0.3, 0.1) per stage, skipping blocks 8, 9, 10, 17, 19, 27 (about 28% fewer);
* ``"vgg16-A"``: halve conv1 and conv8-conv13 (about 34% fewer FLOPs, 64% fewer parameters).

Blocks are numbered 1..27 through the network (block ``b`` is ``layer{(b-1)//9+1}.{(b-1)%9}``).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch.nn as nn

from sparsekern.compiler import group_importance
from sparsekern.graph import ChannelGraph, trace_channels
from sparsekern.methods.budget import ratio_for_budget
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.plan import GroupKeep, Plan, PlanError

__all__ = ["prunable_layers", "config_ratios", "prune", "CONFIGS", "L1Norm"]

_RESNET56_SKIP = {"resnet56-A": (8, 10, 19, 27), "resnet56-B": (8, 9, 10, 17, 19, 27)}
_RESNET56_STAGE_RATIOS = {"resnet56-A": (0.1, 0.1, 0.1), "resnet56-B": (0.6, 0.3, 0.1)}
CONFIGS = ("resnet56-A", "resnet56-B", "vgg16-A")


def prunable_layers(cg: ChannelGraph, scope: str = "internal") -> dict[str, str]:
    """Layer name -> its group for every unpinned group (``scope="all"``), or only for the groups with a
    single conv/linear producer (``scope="internal"``). A group is named after its first producer."""
    if scope not in ("internal", "all"):
        raise ValueError(f"scope must be 'internal' or 'all', got {scope!r}")
    out = {}
    for group, producers in cg.producers.items():
        spec = cg.groups[group]
        if spec.pinned or producers[0] not in cg.modules:
            continue
        if scope == "all" or len(producers) == 1:
            out[producers[0]] = group
    return out


def config_ratios(model: nn.Module, config: str) -> dict[str, float]:
    """Per-layer pruning ratios of one of the paper's predefined configurations (see module docstring)."""
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if config in _RESNET56_SKIP:
        if "layer3.8.conv1" not in names or "layer3.9.conv1" in names:
            raise PlanError(f"config {config!r} is defined for CIFAR ResNet-56 (3 stages of 9 blocks)")
        ratios = {}
        for b in range(1, 28):
            if b not in _RESNET56_SKIP[config]:
                stage, index = (b - 1) // 9, (b - 1) % 9
                ratios[f"layer{stage + 1}.{index}.conv1"] = _RESNET56_STAGE_RATIOS[config][stage]
        return ratios
    if config == "vgg16-A":
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        if len(convs) != 13:
            raise PlanError(f"config 'vgg16-A' is defined for VGG-16 (13 convs); the model has {len(convs)}")
        return {convs[i]: 0.5 for i in (0, 7, 8, 9, 10, 11, 12)}
    raise ValueError(f"unknown L1-norm config {config!r}; known: {list(CONFIGS)}")


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    ratio: float | Mapping[str, float] | None = None,
    config: str | None = None,
    scope: str = "internal",
) -> Plan:
    """Plan L1-norm filter pruning.

    Args:
        model: the trained model.
        example_inputs: a tensor or tuple of tensors to trace with.
        ratio: fraction of filters to remove: one float for every prunable layer (see module docstring), or
            layer name -> ratio for chosen layers.
        config: one of :data:`CONFIGS` instead of ``ratio``.
        scope: which groups a float ``ratio`` prunes: ``"internal"`` or ``"all"`` (see module docstring).

    Returns:
        A plan whose groups keep the ``int(C * (1 - p))`` filters of largest L1 norm; each pruned group
        carries the L1 norms as ``scores`` (used by channel rounding).
    """
    if (ratio is None) == (config is None):
        raise ValueError("give exactly one of ratio= or config=")
    cg = trace_channels(model, example_inputs)
    layers = prunable_layers(cg, "all" if scope == "all" else "internal")
    if config is not None:
        ratios = config_ratios(model, config)
    elif isinstance(ratio, Mapping):
        ratios = dict(ratio)
    else:
        ratios = {name: float(ratio) for name in layers}
    channels: dict[str, GroupKeep] = {}
    for name, p in ratios.items():
        if not 0.0 <= p < 1.0:
            raise PlanError(f"pruning ratio for {name!r} must be in [0, 1), got {p}")
        if name not in layers:
            owner = cg.group_of(name)
            why = f"its channels belong to group {owner[0]!r} with producers {list(cg.producers[owner[0]])}" if owner else "it is not a conv/linear layer that produces channels"
            raise PlanError(f"layer {name!r} cannot be L1-pruned on its own: {why}")
        group = layers[name]
        scores = group_importance(cg, group)
        size = len(scores)
        n_keep = max(1, int(size * (1.0 - p)))
        keep = np.sort(np.argsort(-scores, kind="stable")[:n_keep])
        if n_keep < size:
            channels[group] = GroupKeep(size, tuple(keep.tolist()), cg.groups[group].members, tuple(scores.tolist()))
    meta = {"method": "l1_norm", "scope": scope, "inputs": cg.input_spec}
    meta.update({"config": config} if config else {"ratio": ratio if not isinstance(ratio, Mapping) else dict(ratio)})
    plan = Plan(channels=channels, meta=meta)
    cg.check_plan(plan)
    return plan


@register_method("l1_norm")
class L1Norm(Method):
    """L1-norm filter pruning at a FLOPs budget: one uniform ratio for the block-internal layers, found by
    :func:`sparsekern.methods.budget.ratio_for_budget`, then :func:`prune`."""

    order = 10
    summary = "filters ranked by their L1 norm (Li et al., ICLR 2017)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        ratio, _ = ratio_for_budget(model, ctx.example_inputs, budget, scope="internal")
        return Pruned(prune(model, ctx.example_inputs, ratio=ratio), model)
