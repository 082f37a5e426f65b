"""Masks users already have, as plans: ``torch.nn.utils.prune``'s ``weight_mask`` buffers and weight-shaped mask
dicts (:meth:`sparsekern.plan.Plan.from_torch_prune`, :meth:`~sparsekern.plan.Plan.from_weight_masks`, which state
the rules), and :func:`remove_torch_prune`, which bakes the masks into a copy so that a pruned model compiles as it
computes.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn

from sparsekern.graph import ChannelGraph, GraphError, trace_channels
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.utils import closest

__all__ = ["CONSTANTS_MODES", "torch_pruned_tensors", "has_torch_prune", "remove_torch_prune", "torch_prune_masks",
           "apply_weight_masks", "checked_weight_masks", "plan_from_torch_prune", "plan_from_weight_masks"]

#: What :func:`plan_from_weight_masks` does with a removed channel that is not zero in the masked model.
CONSTANTS_MODES = ("warn", "error", "ignore")


def torch_pruned_tensors(module: nn.Module) -> list[str]:
    """Names of ``module``'s own tensors that ``torch.nn.utils.prune`` reparametrised: each ``name`` with a
    parameter ``name_orig`` and a buffer ``name_mask`` (``module.name`` is recomputed from them by a forward
    pre-hook)."""
    params = dict(module.named_parameters(recurse=False))
    return [b[: -len("_mask")] for b, _ in module.named_buffers(recurse=False)
            if b.endswith("_mask") and b[: -len("_mask")] + "_orig" in params]


def has_torch_prune(model: nn.Module) -> bool:
    """Whether any layer of ``model`` still carries a ``torch.nn.utils.prune`` reparametrisation."""
    return any(torch_pruned_tensors(m) for m in model.modules())


def remove_torch_prune(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``torch.nn.utils.prune`` reparametrisation baked in.

    On the copy, each pruned tensor ``name`` becomes a plain parameter ``name = name_orig * name_mask`` and
    its forward pre-hook goes (``torch.nn.utils.prune.remove``); the copy computes exactly what the pruned
    model computes. ``model`` itself keeps its masks, hooks and state dict. :func:`sparsekern.compile` and
    :func:`sparsekern.masked` call this on a pruned model, so a plan compiles on it directly.

    Raises:
        GraphError: naming the layer, for a ``name_orig``/``name_mask`` pair without its pruning hook.
    """
    from torch.nn.utils import prune

    # each pruned tensor is computed (orig * mask, not a graph leaf), which deepcopy refuses: its copy is a
    # detached one, replaced below by the baked parameter
    memo: dict[int, Any] = {}
    for m in model.modules():
        for name in torch_pruned_tensors(m):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t.detach().clone()
    out = copy.deepcopy(model, memo)
    for layer, m in out.named_modules():
        for name in torch_pruned_tensors(m):
            try:
                prune.remove(m, name)
            except ValueError as e:
                raise GraphError(
                    f"layer {layer!r} has {name}_orig and {name}_mask but no torch.nn.utils.prune hook for "
                    f"{name!r} ({e}); set `{name}` from them yourself or prune the layer again with "
                    "torch.nn.utils.prune") from e
    return out


def torch_prune_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Layer name -> a copy of the ``weight_mask`` buffer ``torch.nn.utils.prune`` left on the layer, for
    every layer whose ``weight`` is pruned (weight-shaped, 1 = kept, 0 = pruned)."""
    return {name: m.weight_mask.detach().clone() for name, m in model.named_modules()
            if "weight" in torch_pruned_tensors(m)}


def apply_weight_masks(model: nn.Module, masks: Mapping[str, Any]) -> nn.Module:
    """A copy of ``model`` whose layers' weights are multiplied by ``masks`` (layer name -> weight-shaped
    0/1 mask): the model the masks describe. ``model`` is not modified. Checked as in
    :func:`plan_from_weight_masks`."""
    checked = checked_weight_masks(model, masks)
    out = remove_torch_prune(model) if has_torch_prune(model) else copy.deepcopy(model)
    for name, mask in checked.items():
        m = out.get_submodule(name)
        w = m.weight
        masked_w = w.detach() * mask.to(device=w.device, dtype=w.dtype)
        m.weight = nn.Parameter(masked_w, requires_grad=w.requires_grad) if isinstance(w, nn.Parameter) else masked_w
    return out


def checked_weight_masks(model: nn.Module, masks: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``masks`` (layer name -> weight-shaped mask, bool or 0/1) as bool tensors.

    Raises:
        PlanError: naming the layer and the fix, for a name that is not a layer of ``model``, a layer without
            a ``weight`` tensor, a mask of another shape than the weight, or values other than 0/1.
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, mask in masks.items():
        if name not in modules:
            raise PlanError(f"the model has no layer {name!r} (closest names: {closest(name, [n for n in modules if n])}); "
                            "key the masks by the names of model.named_modules()")
        w = getattr(modules[name], "weight", None)
        if not isinstance(w, torch.Tensor):
            raise PlanError(f"layer {name!r} ({type(modules[name]).__name__}) has no weight tensor to mask; give "
                            "masks for conv, linear or norm layers only")
        m = torch.as_tensor(mask).detach().cpu()
        if tuple(m.shape) != tuple(w.shape):
            raise PlanError(f"the weight mask for {name!r} has shape {tuple(m.shape)} but the layer's weight has "
                            f"shape {tuple(w.shape)}; give a mask of the weight's shape (1 = keep, 0 = pruned), "
                            f"e.g. torch.ones_like(model.get_submodule({name!r}).weight)")
        if m.dtype != torch.bool:
            bad = ~((m == 0) | (m == 1))
            if bad.any():
                raise PlanError(f"the weight mask for {name!r} must hold 0/1 or booleans, got {m.dtype} with value "
                                f"{m[bad][0].item()!r}; threshold scores into a mask first")
        out[name] = m.to(torch.bool)
    return out


def plan_from_torch_prune(model: nn.Module, example_inputs: Any, *, constants: str = "warn") -> Plan:
    """See :meth:`sparsekern.plan.Plan.from_torch_prune`."""
    plan = plan_from_weight_masks(model, torch_prune_masks(model), example_inputs, constants=constants)
    plan.meta["method"] = "torch.nn.utils.prune"
    return plan


def plan_from_weight_masks(model: nn.Module, masks: Mapping[str, Any], example_inputs: Any, *,
                           constants: str = "warn") -> Plan:
    """See :meth:`sparsekern.plan.Plan.from_weight_masks`."""
    if constants not in CONSTANTS_MODES:
        raise ValueError(f"constants must be one of {CONSTANTS_MODES}, got {constants!r}")
    checked = checked_weight_masks(model, masks)
    cg = trace_channels(remove_torch_prune(model) if has_torch_prune(model) else model, example_inputs)
    producers = {p for names in cg.producers.values() for p in names if p in cg.modules}
    keep_root = np.zeros(len(cg.roots), dtype=bool)
    covered = np.zeros(len(cg.roots), dtype=bool)
    for name in producers:
        rows = checked.get(name)
        for lay in cg._module_outputs.get(name, [])[:1]:  # every call of a shared layer has the same atoms
            kept = np.ones(lay.size, dtype=bool) if rows is None else rows.reshape(rows.shape[0], -1).any(1).numpy()
            if len(kept) != lay.size:
                raise PlanError(f"the weight of layer {name!r} has {len(kept)} rows but the layer has {lay.size} "
                                "output channels, so its mask does not say which channels are pruned; leave it out")
            r = cg.roots[lay.atoms]
            np.logical_or.at(keep_root, r, kept)
            covered[r] = True
    keep_root |= ~covered  # channels no producer creates (untracked concat pieces) stay
    channels, kept_pinned = {}, {}
    for gname, cls in cg.group_classes.items():
        spec = cg.groups[gname]
        lost = [i for i in spec.pinned if not keep_root[cls[i]]]
        if lost:
            kept_pinned[gname] = sorted(lost)
            keep_root[cls[lost]] = True
        if not keep_root[cls].all():
            channels[gname] = GroupKeep(spec.size, tuple(np.nonzero(keep_root[cls])[0].tolist()), spec.members)
    meta = {"inputs": cg.input_spec, "method": "weight_masks", "masked_layers": sorted(checked)}
    if kept_pinned:
        meta["kept_pinned"] = kept_pinned
    plan = Plan(channels=channels, meta=meta)
    keep = cg.check_plan(plan)
    if constants != "ignore":
        _check_removed_constants(cg, keep, constants)
    return plan


def _zero_input_output(m: nn.Module) -> torch.Tensor | None:
    """What layer ``m`` outputs per channel when its input is zero (its bias, a BatchNorm's shift); None for
    layers whose zero output is zero or unknown."""
    bias = getattr(m, "bias", None)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        shift = bias.detach() if bias is not None else torch.zeros(m.num_features)
        if m.running_mean is not None:  # eval mode; without running statistics a zero channel stays at the bias
            scale = m.weight.detach() if m.weight is not None else 1.0
            shift = shift - m.running_mean * scale / torch.sqrt(m.running_var + m.eps)
        return shift
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(bias, torch.Tensor):
        return bias.detach()
    return None


def _check_removed_constants(cg: ChannelGraph, keep_root: np.ndarray, mode: str) -> None:
    """Warn or raise (``mode``) when a removed channel is not zero in the masked model: a layer of its group
    gives it a constant (a conv/linear bias, a BatchNorm shift) or normalises over it (LayerNorm, GroupNorm).
    A plan drops such channels with their constants (docs/design.md#semantics)."""
    found = []
    for name, lays in cg._module_outputs.items():
        m, lay = cg.modules.get(name), lays[0]
        gone = ~keep_root[cg.roots[lay.atoms]]
        if m is None or not gone.any():
            continue
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            found.append(f"{name!r} ({type(m).__name__}) normalises over removed channels")
            continue
        const = _zero_input_output(m)
        if const is not None and const.numel() == lay.size:
            idx = np.nonzero(gone & (const.cpu().numpy() != 0))[0]
            if len(idx):
                found.append(f"{name!r} ({type(m).__name__}) gives removed channels {idx[:8].tolist()} a nonzero "
                             "constant (bias or BatchNorm shift)")
    if not found:
        return
    message = ("the masks remove channels that are not zero in the masked model: " + "; ".join(found[:6]) +
               ". The plan drops them with their constants, so the compiled model equals sparsekern.masked(model, "
               "plan), not the masked model. Prune those biases / BatchNorm weights and biases too (so the "
               "channels are exactly zero), or pass constants='ignore' to accept the difference")
    if mode == "error":
        raise PlanError(message)
    warnings.warn(message, stacklevel=4)
