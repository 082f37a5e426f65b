"""Network Slimming (Liu, Li, Shen, Huang, Yan, Zhang: "Learning Efficient Convolutional Networks through
Network Slimming", ICCV 2017), as re-implemented in Liu et al., "Rethinking the Value of Network Pruning",
ICLR 2019.

Two steps:

1. **Sparsity training.** Train with an L1 penalty on every BatchNorm scale ``gamma``: the subgradient
   ``s * sign(gamma)`` is added to each ``gamma``'s gradient after the backward pass
   (:class:`SparsityHook`, run by the one trainer :func:`sparsekern.train.train`; :func:`train_sparse` is
   the convenience wrapper). The paper's penalties (:data:`PENALTIES`, :func:`default_penalty`):
   ``s = 1e-4`` for VGG, ``s = 1e-5`` for ResNet and DenseNet, with SGD at lr 0.1 for 160 CIFAR epochs.
   What drives ``gamma`` to zero is the accumulated pull ``s * sum_t lr_t / (1 - momentum)``; much
   shorter runs need a proportionally larger ``s``.
2. **Pruning** (:func:`prune`). Every channel is scored by ``|gamma|`` of the BN that normalises it, and one
   *global* threshold over the whole network removes the channels below it: either the ``percent``
   quantile of all candidate scores (the paper: 0.7 for VGG-19, 0.4 for ResNet-164) or the threshold that
   meets a FLOPs budget (binary search). The architecture per layer follows automatically.

Channels and dependency groups. A plan prunes *dependency groups* (:mod:`sparsekern.graph`): channels tied
by residual adds live and die together in every tensor of their group. Each group channel gets one score
from the BNs among the group's members (a BN whose input is a concatenation contributes to several groups,
position by position). When several BNs normalise one group channel (a ResNet's residual stream, a
candidate under ``scope="all"``: the stem BN, every block's last BN and the projection shortcut's BN), their
``|gamma|`` are combined with ``max`` (default): pruning the group channel zeroes it in *every* one of those tensors, so it is only unimportant
when all of its scales are small, and the largest scale bounds the signal that pruning removes; a mean
would let one large scale hide among many small ones. ``combine="mean"`` is available for comparison.

Scope: the residual stream (Liu et al. 2017 on ResNets). The official code prunes a pre-activation
ResNet-164 through a "channel selection" layer after the first BN of each bottleneck: it selects which
channels of the block's input the block reads, so the residual stream itself keeps its full width and
only the channels internal to each block are pruned. ``scope="internal"`` (default) does the same here: a
dependency group whose channels reach a residual add (an elementwise add of two tracked tensors,
:func:`residual_groups`, found through the channel graph, not by module names) is not a candidate; in a
ResNet that leaves the block-internal BNs (``bn1`` of a basic block, ``bn1``/``bn2`` of a bottleneck). On
networks without residual adds (VGG) the scope changes nothing. ``scope="all"`` ranges the global threshold
over the residual-stream groups too (this package's earlier behaviour).

Candidates are the channels that have a BN score, belong to a group without a per-group count constraint
(grouped convolutions, GroupNorm: the global threshold cannot promise equal counts per slice) and are not
pinned (model outputs, channels reaching ops that cannot be sliced). Everything else is kept: groups
without any BN (e.g. a linear layer's outputs) and BNs without an affine scale are left alone. A group is
never emptied: it keeps at least ``max(1, ceil(min_keep * size))`` channels, those of largest score, even
when they fall below the threshold.

Pruned BN channels and their constant. A channel with ``gamma ~ 0`` still outputs the constant
``beta`` (``relu(beta)`` after the activation) in the original model; that constant reaches the next
layers. The compiler's contract is ``compile == masked``, where a pruned channel is zero everywhere
(docs/design.md#semantics), so the plan is exact against :func:`sparsekern.masked`; the difference to the
*unpruned* model is the dropped constants, which :func:`pruned_constant_error` measures. The paper
fine-tunes after pruning, which absorbs them. (Folding them into the consumer's bias where that is exact
is a possible later extension.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from sparsekern.compiler import masked
from sparsekern.cost import eval_flops
from sparsekern.channel_rules import node_has_tag
from sparsekern.graph import ChannelGraph, Layout, trace_channels
from sparsekern.methods.budget import plan_flops
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.modes import eval_mode
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.train import Hook, TrainConfig, TrainResult, TrainState, train

__all__ = [
    "NetworkSlimming",
    "PENALTIES",
    "SCOPES",
    "SparsityHook",
    "channel_scores",
    "default_penalty",
    "prune",
    "pruned_constant_error",
    "residual_groups",
    "train_sparse",
]

#: Sparsity penalty ``s`` (the paper's lambda) per architecture family, chosen on CIFAR by Liu et al. 2017
#: (sec. 4.3) and reused by Liu et al. 2019.
PENALTIES: dict[str, float] = {"vgg": 1e-4, "resnet": 1e-5, "densenet": 1e-5}
_COMBINE = ("max", "mean")
#: ``"internal"``: the official code's ResNet rule (the residual stream keeps its width); ``"all"``: every group.
SCOPES = ("internal", "all")


# ----------------------------------------------------------------------------- sparsity training
def default_penalty(model_or_name: nn.Module | str) -> float:
    """The paper's ``s`` for a model family: 1e-4 for VGG, 1e-5 for ResNet and DenseNet.

    Args:
        model_or_name: a zoo name (``"vgg16_bn"``, ``"resnet56"``, ...) or a model; a model is identified
            by the ``sk_arch`` record of :func:`sparsekern.models.build`, else by its class name.

    Raises:
        ValueError: for families the paper gives no value for (pass ``s`` explicitly).
    """
    if isinstance(model_or_name, str):
        name = model_or_name
    else:
        arch = getattr(model_or_name, "sk_arch", None)
        name = arch["name"] if isinstance(arch, Mapping) and "name" in arch else type(model_or_name).__name__
    low = name.lower()
    for family, s in PENALTIES.items():
        if family in low:
            return s
    raise ValueError(
        f"Network Slimming gives no sparsity penalty for {name!r} (known families: {sorted(PENALTIES)}); "
        "pass s= explicitly"
    )


def _is_scaled_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None


class SparsityHook(Hook):
    """Adds ``s * sign(gamma)`` to the gradient of BatchNorm scales: the L1 subgradient of
    ``s * sum |gamma|`` (Liu et al. 2017, eq. 1), applied after the backward pass and before the step.

    Args:
        s: penalty strength (>= 0); see :func:`default_penalty` for the paper's values.
        modules: the BN layers to penalise, as modules or qualified names in the trained model; default:
            every BatchNorm with an affine scale.
        stage: the trainer stage whose backward the hook edits (``"main"``; the BN scales live there).

    Gradients of shape (C,) are edited in place; scales without a gradient (frozen) are skipped.
    """

    def __init__(self, s: float, modules: Iterable[nn.Module | str] | None = None, *, stage: str = "main") -> None:
        s = float(s)
        if not (math.isfinite(s) and s >= 0.0):
            raise ValueError(f"sparsity penalty s must be a finite number >= 0, got {s}")
        self.s = s
        self.stage = stage
        self._given = None if modules is None else list(modules)
        self._resolved: tuple[int, list[nn.Module]] | None = None

    def bn_layers(self, model: nn.Module) -> list[nn.Module]:
        """The BN layers this hook penalises in ``model`` (resolved once per model)."""
        if self._resolved is not None and self._resolved[0] == id(model):
            return self._resolved[1]
        if self._given is None:
            layers = [m for m in model.modules() if _is_scaled_bn(m)]
        else:
            layers = []
            for item in self._given:
                m = model.get_submodule(item) if isinstance(item, str) else item
                what = item if isinstance(item, str) else type(item).__name__
                if not _is_scaled_bn(m):
                    raise ValueError(f"SparsityHook: {what!r} is not a BatchNorm layer with an affine scale")
                if not any(m is sub for sub in model.modules()):
                    raise ValueError(f"SparsityHook: the given {what} is not a submodule of the trained model")
                layers.append(m)
        self._resolved = (id(model), layers)
        return layers

    def on_train_start(self, state: TrainState) -> None:
        self.bn_layers(state.model)

    def after_backward(self, state: TrainState) -> None:
        if state.stage != self.stage or self.s == 0.0:
            return
        with torch.no_grad():
            for bn in self.bn_layers(state.model):
                g = bn.weight.grad
                if g is not None:
                    g.add_(self.s * torch.sign(bn.weight.detach()))


def train_sparse(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig | None = None,
    s: float | None = None,
    *,
    modules: Iterable[nn.Module | str] | None = None,
    hooks: Sequence[Any] = (),
    **train_kwargs: Any,
) -> TrainResult:
    """Sparsity training: :func:`sparsekern.train.train` with a :class:`SparsityHook`.

    Args:
        model, train_data, config: as for :func:`sparsekern.train.train`.
        s: the penalty; default :func:`default_penalty` of ``model``.
        modules: BN layers to penalise (default: all).
        hooks: further hooks, called after the sparsity hook.
        train_kwargs: further keyword arguments of :func:`sparsekern.train.train` (``eval_data``, ...).

    Returns:
        The trainer's :class:`~sparsekern.train.TrainResult`. ``model.sk_sparsity_penalty`` records ``s``,
        which :func:`prune` copies into the plan's meta.
    """
    s = default_penalty(model) if s is None else float(s)
    result = train(model, train_data, config, hooks=[SparsityHook(s, modules), *hooks], **train_kwargs)
    model.sk_sparsity_penalty = s
    return result


# ----------------------------------------------------------------------------- scores
def channel_scores(cg: ChannelGraph, combine: str = "max") -> dict[str, np.ndarray]:
    """|gamma| per channel of every dependency group that has a BN among its members.

    Args:
        cg: the model's channel graph.
        combine: how several BNs normalising one group channel are combined: ``"max"`` or ``"mean"``
            (see the module docstring).

    Returns:
        group name -> float64 array of shape (size,), NaN for channels no BN normalises.
    """
    if combine not in _COMBINE:
        raise ValueError(f"combine must be one of {_COMBINE}, got {combine!r}")
    where: dict[int, tuple[str, int]] = {}
    for g, cls in cg.group_classes.items():
        for i, r in enumerate(cls.tolist()):
            where[int(r)] = (g, i)
    total: dict[str, np.ndarray] = {}
    count: dict[str, np.ndarray] = {}
    for node in cg.gm.graph.nodes:
        if node.op != "call_module" or not _is_scaled_bn(cg.modules[node.target]):
            continue
        lay = cg.layouts.get(node.name)
        if not isinstance(lay, Layout):
            continue
        gamma = cg.modules[node.target].weight.detach().abs().double().cpu().numpy()
        for pos, r in enumerate(cg.roots[lay.atoms].tolist()):
            if int(r) not in where:
                continue
            g, i = where[int(r)]
            if g not in total:
                size = len(cg.group_classes[g])
                total[g] = np.full(size, np.nan)
                count[g] = np.zeros(size)
            old = total[g][i]
            if combine == "max":
                total[g][i] = gamma[pos] if np.isnan(old) else max(old, gamma[pos])
            else:
                total[g][i] = gamma[pos] if np.isnan(old) else old + gamma[pos]
            count[g][i] += 1
    if combine == "mean":
        for g in total:
            total[g] = total[g] / np.where(count[g] > 0, count[g], 1)
    return total


def residual_groups(cg: ChannelGraph) -> set[str]:
    """Names of the dependency groups whose channels meet a residual add: an op whose channel rule carries the
    ``"add"`` tag (``+``, ``+=``, ``torch.add``, ``Tensor.add``) applied to two or more tensors whose channels the
    graph tracks.

    In a ResNet these are the residual-stream groups (the stem, every block's last conv and the projection
    shortcuts, tied by the adds); a block's internal channels never reach an add. Adding a constant or an
    untracked tensor (a bias, a positional table) is not a residual add.
    """
    group_of_root = {int(r): g for g, cls in cg.group_classes.items() for r in cls.tolist()}
    modules = dict(cg.gm.named_modules())
    out: set[str] = set()
    for node in cg.gm.graph.nodes:
        if not node_has_tag(node, modules, "add"):  # the channel rules' residual additions
            continue
        tracked = [cg.layouts[a.name] for a in node.all_input_nodes if isinstance(cg.layouts.get(a.name), Layout)]
        if len(tracked) < 2:
            continue
        for lay in tracked:
            out.update(group_of_root[int(r)] for r in cg.roots[lay.atoms].tolist() if int(r) in group_of_root)
    return out


# ----------------------------------------------------------------------------- pruning
@dataclass
class _Candidates:
    """Candidate channels in global order of increasing score (ties: group order, then channel index).

    ``roots``: atom root of each (int64, (n,)); ``scores``: |gamma| (float64, (n,)); ``prunable``: False for
    the channels the per-group floor keeps (bool, (n,)). Pruning ``k`` means pruning the prunable ones
    among the first ``k``: a superset for every larger ``k``, so the FLOPs fall monotonically in ``k``.
    """

    roots: np.ndarray
    scores: np.ndarray
    prunable: np.ndarray

    @property
    def n(self) -> int:
        return len(self.scores)

    def keep(self, k: int, n_roots: int) -> np.ndarray:
        """Keep flag per atom root after pruning the first ``k`` candidates (bool, (n_roots,))."""
        keep = np.ones(n_roots, dtype=bool)
        keep[self.roots[: k][self.prunable[: k]]] = False
        return keep

    def threshold(self, k: int) -> float | None:
        """The score at rank ``k - 1``: the first ``k`` candidates are those with score <= it."""
        return float(self.scores[k - 1]) if k > 0 else None


def _candidates(cg: ChannelGraph, scores: Mapping[str, np.ndarray], min_keep: float) -> _Candidates:
    groups, index, score, keep_floor = [], [], [], []
    for gi, (name, sc) in enumerate(scores.items()):
        spec = cg.groups[name]
        idx = [i for i in range(spec.size) if not np.isnan(sc[i]) and i not in spec.pinned]
        # the floor counts pinned and unscored channels, which are always kept
        floor = max(1, math.ceil(min_keep * spec.size)) - (spec.size - len(idx))
        top = set(sorted(idx, key=lambda i: (-sc[i], i))[: max(0, floor)])
        groups += [gi] * len(idx)
        index += idx
        score += [float(sc[i]) for i in idx]
        keep_floor += [i in top for i in idx]
    order = np.lexsort((np.array(index, dtype=np.int64), np.array(groups, dtype=np.int64), np.array(score)))
    classes = [cg.group_classes[name] for name in scores]
    roots = np.array([classes[groups[j]][index[j]] for j in order], dtype=np.int64)
    return _Candidates(roots, np.array(score)[order], ~np.array(keep_floor, dtype=bool)[order])


def prune(
    model: nn.Module,
    example_inputs: Any,
    *,
    percent: float | None = None,
    flops_budget: float | None = None,
    min_keep: float = 0.0,
    combine: str = "max",
    s: float | None = None,
    scope: str = "internal",
) -> Plan:
    """Plan Network Slimming: remove the channels whose BN scale ``|gamma|`` is below one global threshold.

    Args:
        model: the (sparsity-trained) model.
        example_inputs: a tensor (e.g. (N, 3, H, W)) or tuple of tensors to trace with.
        percent: the threshold is the ``percent`` quantile of all candidate scores, in [0, 1): the
            ``int(percent * n_candidates)`` channels of smallest score are pruned (ties broken by channel
            order), except those the per-group floor keeps. The paper: 0.7 (VGG-19), 0.4 (ResNet-164).
        flops_budget: instead of ``percent``, a fraction in (0, 1]: the threshold is binary-searched so that
            the compiled model's FLOPs (``sk.flops``) are at most ``flops_budget`` times the dense model's
            and as close to it as one global threshold allows.
        min_keep: per-group floor: every group keeps at least ``max(1, ceil(min_keep * size))`` channels.
        combine: ``"max"`` (default) or ``"mean"`` of the scales of BNs tied in one group channel.
        s: the sparsity penalty the model was trained with, recorded in the meta (default: the
            ``sk_sparsity_penalty`` that :func:`train_sparse` left on the model, if any).
        scope: ``"internal"`` (default; the official code on ResNets): groups that reach a residual add
            (:func:`residual_groups`) are kept whole, so the residual stream keeps its width and only the
            channels inside residual blocks are candidates; the same as ``"all"`` on networks without
            residual adds. ``"all"``: every BN-scored group is a candidate, the residual stream included.

    Returns:
        A plan over the pruned groups; each carries the channel scores (|gamma|; channels without a BN
        get the group's largest score). ``plan.meta`` holds ``method``, ``threshold`` (candidates with
        score <= threshold are pruned, up to ties and the floor; None when none is), ``flops_ratio``
        (``sk.flops`` of the compiled model / of the dense model),
        ``pruned_channels`` / ``candidate_channels``, ``percent`` or ``flops_budget``, ``min_keep``,
        ``combine``, ``scope``, ``residual_groups`` (how many groups the scope kept whole) and ``s``.

    Raises:
        ValueError: for bad arguments (neither or both of ``percent`` and ``flops_budget``, out of range).
        PlanError (a ValueError): when the model has no BN-scored channel to prune, or the budget cannot be
            met (the message names the budget and the smallest FLOPs fraction reachable in this scope).
    """
    _check_args(percent, flops_budget, min_keep, scope)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    cg = trace_channels(model, inputs)
    stream = residual_groups(cg) if scope == "internal" else set()
    scores, cands = _scored_candidates(cg, combine, float(min_keep), stream)
    meta = {
        "method": "slimming",
        "criterion": "bn_gamma_abs",
        "combine": combine,
        "scope": scope,
        "residual_groups": len(stream),
        "percent": None if percent is None else float(percent),
        "flops_budget": None if flops_budget is None else float(flops_budget),
        "min_keep": float(min_keep),
        "candidate_channels": cands.n,
        "s": float(s) if s is not None else getattr(model, "sk_sparsity_penalty", None),
        "inputs": cg.input_spec,
    }

    def plan_for(k: int) -> Plan:
        return _plan_for(cg, scores, cands, meta, k)

    # FLOPs of a plan from the dense per-layer counts (methods.budget.plan_flops, equal to sk.flops of the
    # compiled model); eval mode, the model's flags restored
    dense = eval_flops(model, inputs)

    def cost(k: int) -> float:
        return float(plan_flops(cg, dense, plan_for(k))) if cands.prunable[:k].any() else float(dense.total)

    hint = (" (scope='internal' keeps the residual stream at full width; scope='all' prunes it too)"
            if stream else "")
    k = _choose_k(cost, cands.n, dense.total, percent, flops_budget, hint)
    plan = plan_for(k)
    plan.meta["flops_ratio"] = cost(k) / dense.total
    cg.check_plan(plan)
    return plan


def _scored_candidates(cg: ChannelGraph, combine: str, min_keep: float,
                       stream: set[str]) -> tuple[dict[str, np.ndarray], _Candidates]:
    """The candidate groups' scores and the candidates in global order; groups under count constraints and
    the ``stream`` groups (kept whole by ``scope="internal"``) are left out. PlanError when none is left."""
    skipped = cg.constrained_groups() | stream
    scores = {g: sc for g, sc in channel_scores(cg, combine).items() if g not in skipped}
    cands = _candidates(cg, scores, min_keep)
    if cands.n == 0:
        kept_whole = (f"; scope='internal' keeps the {len(stream)} residual-stream groups whole, scope='all' "
                      "prunes them" if stream else "")
        raise PlanError(
            "Network Slimming found no channel to prune: no unpinned dependency group has a BatchNorm with an "
            f"affine scale among its members (groups under grouped-conv/GroupNorm constraints are skipped{kept_whole})"
        )
    return scores, cands


def _check_args(percent: float | None, flops_budget: float | None, min_keep: float, scope: str) -> None:
    """Raise ValueError unless exactly one of ``percent`` / ``flops_budget`` is given and every argument is
    in range (see :func:`prune`)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if (percent is None) == (flops_budget is None):
        raise ValueError("give exactly one of percent= or flops_budget=")
    if percent is not None and not 0.0 <= float(percent) < 1.0:
        raise ValueError(f"percent must be in [0, 1), got {percent}")
    if flops_budget is not None and not 0.0 < float(flops_budget) <= 1.0:
        raise ValueError(f"flops_budget must be a fraction of the dense FLOPs in (0, 1], got {flops_budget}")
    if not 0.0 <= float(min_keep) < 1.0:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep}")


def _plan_for(cg: ChannelGraph, scores: Mapping[str, np.ndarray], cands: _Candidates, meta: Mapping[str, Any],
              k: int) -> Plan:
    """The plan pruning the first ``k`` candidates; ``meta`` plus the threshold and pruned count as its meta."""
    keep = cands.keep(k, len(cg.roots))
    channels: dict[str, GroupKeep] = {}
    for g, sc in scores.items():
        kept = keep[cg.group_classes[g]]
        if not kept.all():
            spec = cg.groups[g]
            filled = np.where(np.isnan(sc), np.nanmax(sc), sc)  # unscored channels: kept, ranked first
            keep_idx = tuple(np.nonzero(kept)[0].tolist())
            channels[g] = GroupKeep(spec.size, keep_idx, spec.members, tuple(filled.tolist()))
    info = {"threshold": cands.threshold(k), "pruned_channels": int(cands.prunable[:k].sum())}
    return Plan(channels=channels, meta={**meta, **info})


def _choose_k(cost: Callable[[int], float], n: int, dense_total: float, percent: float | None,
              flops_budget: float | None, hint: str = "") -> int:
    """How many candidates to prune: the paper's ``int(n * percent)``, or the fewest that meet
    ``flops_budget`` (PlanError naming the budget, the reachable minimum and ``hint`` when even all ``n``
    do not)."""
    if percent is not None:
        return int(math.floor(float(percent) * n + 1e-9))  # the paper's int(total * percent)
    k = _smallest_feasible(cost, n, float(flops_budget) * dense_total)
    if k is None:
        raise PlanError(
            f"flops_budget={flops_budget} cannot be met by Network Slimming: pruning every candidate "
            f"channel (keeping max(1, ceil(min_keep * size)) per group) leaves "
            f"{cost(n) / dense_total:.4f} of the dense FLOPs, the minimum reachable{hint}; raise the budget "
            "or lower min_keep"
        )
    return k


def _smallest_feasible(cost: Callable[[int], float], n: int, target: float) -> int | None:
    """Smallest ``k`` in [0, n] with ``cost(k) <= target`` for a non-increasing ``cost``; None if none."""
    if cost(n) > target:
        return None
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return hi


def pruned_constant_error(model: nn.Module, plan: Plan, example_inputs: Any) -> float:
    """How far the plan's exact reference is from the unpruned model: ``max |masked(x) - model(x)| /
    max |model(x)|`` in eval mode.

    A pruned channel whose ``gamma`` is ~0 still emits the constant ``beta`` (``relu(beta)``) in ``model``;
    the plan drops it (``sk.masked`` / ``sk.compile`` zero the channel). This number shows what that costs
    before fine-tuning; it is 0 when the pruned channels carry exactly nothing.

    Args:
        model: the unpruned model (its train/eval flags are restored).
        plan: a static channel plan for ``model``.
        example_inputs: a tensor (N, ...) or tuple of tensors.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    ref_model = masked(model, plan, inputs).eval()
    with eval_mode(model), torch.no_grad():
        ref = model(*inputs)
        out = ref_model(*inputs)
    scale = ref.abs().max().clamp_min(1e-12)
    return float((out - ref).abs().max() / scale)


@register_method("slimming")
class NetworkSlimming(Method):
    """Network Slimming at a FLOPs budget: the full model trains with the sparsity penalty
    (:class:`SparsityHook`, option ``slimming_penalty``, default :func:`default_penalty`), then one global BN
    threshold is searched for the budget (:func:`prune` with ``flops_budget`` and ``scope`` from option
    ``slimming_scope``, default ``"internal"``: the residual stream keeps its width)."""

    order = 20
    summary = "one global threshold on BatchNorm scales trained with an L1 penalty (Liu et al., ICCV 2017)"
    #: options a run may set (``rethinking.run(method_options=...)``): the candidate scope of :func:`prune`.
    prune_options = {"slimming_scope": "internal"}

    def prepare(self, model: nn.Module, options: Mapping[str, Any]) -> dict[str, Any]:
        penalty = options.get("slimming_penalty")
        return {**options, "slimming_penalty": default_penalty(model) if penalty is None else penalty,
                "slimming_scope": options.get("slimming_scope") or "internal"}

    def train_hooks(self, options: Mapping[str, Any]) -> tuple[Any, ...]:
        return (SparsityHook(options["slimming_penalty"]),)

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        plan = prune(model, ctx.example_inputs, flops_budget=budget, s=ctx.options.get("slimming_penalty"),
                     scope=ctx.options.get("slimming_scope") or "internal")
        return Pruned(plan, model)
