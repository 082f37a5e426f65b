"""Pruning from Scratch (Wang, Zhang, Jiang, Zhang, Wang, Zhang: "Pruning from Scratch", AAAI 2020).

No pre-training: the architecture of the pruned network is read off a *randomly initialised* network.

0. **Expansion** (:func:`expand`). The gates are learned on a randomly initialised copy of the network
   whose gated channels are ``EXPANSION = 1.25`` times wider (the official code builds its CIFAR networks
   with ``--expanded_inchannel 80``, VGG-16's 64 channels x 1.25, all layers scaled alike), so that a
   pruned layer may end up wider than the original one. The budget still refers to the original network.
1. **Gate search** (:func:`search_gates`). A scalar gate ``g_c`` (init 1) multiplies every prunable
   channel; the network's weights stay frozen at their random values and only the gates learn, with Adam
   (lr 0.01) on ``CE + lambda * (mean_c |g_c| - r)^2`` (CIFAR: ``lambda = 0.5``, ``r = 0.2``, 10 epochs;
   :class:`GateHook`). Gates are clamped to [0, 1] after every step. The network runs in train mode, so
   the BatchNorm running statistics keep following the gated features (the affine BN parameters are
   frozen with the other weights). The gates kept are those of the best epoch among the epochs whose
   density ``(g != 0).mean()`` is at most ``r`` (the official rule; the last epoch's when none is;
   :class:`BestGates`).
2. **Budget search** (:func:`prune`). All gates are ranked globally; the global keep ratio (the fraction
   of gated channels kept, largest gates first) is binary-searched so that the compiled (expanded, pruned)
   network's FLOPs meet the budget on the original network:
   ``|FLOPs - budget * FLOPs_full| / (budget * FLOPs_full) <= 0.001``, ``FLOPs_full`` the original's.
3. **Training** of the pruned architecture from random weights (:func:`train_from_scratch`), with the
   Scratch-B epoch budget of Liu et al. 2019 (:func:`sparsekern.train.scratch_b_epochs`). No weights are
   inherited.

Where the gates sit (:func:`gate_sites`): on the output channels of every conv whose channels run along a
single path, from that conv alone (the only producer of its dependency group,
:func:`sparsekern.methods.l1_norm.prunable_layers` with ``scope="internal"``) to one conv or linear layer
(the only consumer), right after the BatchNorm that follows the conv (before the activation), or on the conv
output when no BN follows. That is the paper's placement: every conv of a VGG (after conv+BN, before ReLU);
the middle channels of a ResNet basic block (``bn1``); ``bn1`` and ``bn2`` of a bottleneck. Channels tied by
residual adds, grouped convolutions or GroupNorm are not gated, nor are block inputs read by both a
residual branch and a projection shortcut (the stem of an ImageNet ResNet).

Granularity of the budget. The search is over integers (the number ``k`` of kept gated channels; the
FLOPs are monotone in ``k``), so it finds the two neighbouring keep counts that bracket the target in at
most ``ceil(log2(n + 1))`` FLOP evaluations (13 for VGG-16's 4224 channels). When removing the single
channel at that boundary changes the FLOPs by more than 0.1% of the target (a small network, or a channel
of an early high-resolution layer at the boundary), no global ranking can meet the tolerance: :func:`prune`
then returns the closest of the two and records ``within_tolerance = False`` and the boundary ``step``
(FLOPs of that one channel, as a fraction of the target) in the plan's ``meta["search"]``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from sparsekern.compiler import compile as compile_plan
from sparsekern.compiler import example_inputs_for
from sparsekern.cost import eval_flops
from sparsekern.graph import ChannelGraph, trace_channels
from sparsekern.methods.budget import plan_flops
from sparsekern.methods.l1_norm import prunable_layers
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.models.init import init_weights
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.serialize import build_arch, register_factory
from sparsekern.train import Hook, TrainConfig, TrainResult, TrainState, scratch_b_epochs, train
from sparsekern.utils import as_tuple as _as_tuple
from sparsekern.utils import input_spec

__all__ = [
    "PruningFromScratch",
    "ChannelGates",
    "GateHook",
    "GateSite",
    "BudgetSearch",
    "BestGates",
    "EXPANSION",
    "build_expanded",
    "expand",
    "gate_sites",
    "keep_count_for_budget",
    "prune",
    "prune_to_budget",
    "reinitialise",
    "search_gates",
    "train_from_scratch",
]

#: The paper's CIFAR settings (sec. 4): sparsity weight lambda, target mean gate r, gate lr, epochs.
LAMBDA, TARGET_RATIO, GATE_LR, EPOCHS = 0.5, 0.2, 0.01, 10
#: Width expansion of the gated channels for the gate search: the official CIFAR script's default
#: ``--expanded_inchannel 80`` on VGG-16's 64 base channels (every layer scaled alike), 1.25x.
EXPANSION = 1.25
#: the :func:`sparsekern.serialize.build_arch` factory recorded on expanded networks (:func:`expand`)
EXPANDED_FACTORY = "sparsekern.methods.scratch:build_expanded"


# ----------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class GateSite:
    """One gated layer: ``layer``'s output (N, C, ...) is multiplied by the gate vector (C,).

    Attributes:
        group: the dependency group whose channels the gates stand for (named after ``producer``).
        producer: the conv that produces the channels.
        layer: the module whose output is gated: the BN right after ``producer``, else ``producer``.
        channels: C.
    """

    group: str
    producer: str
    layer: str
    channels: int


def gate_sites(model: nn.Module, example_inputs: Any, *, cg: ChannelGraph | None = None) -> list[GateSite]:
    """Where Pruning from Scratch puts its gates in ``model`` (see the module docstring), in graph order.

    Raises:
        PlanError: when the model has no conv that alone produces an unpinned group of channels.
    """
    cg = cg or trace_channels(model, _as_tuple(example_inputs))
    skipped = cg.constrained_groups()
    layers = prunable_layers(cg, "internal")
    sites = []
    for node in cg.gm.graph.nodes:
        if node.op != "call_module" or node.target not in layers:
            continue
        conv = cg.modules[node.target]
        group = layers[node.target]
        if not isinstance(conv, nn.modules.conv._ConvNd) or group in skipped or len(cg.consumers(group)) != 1:
            continue
        users = list(node.users)
        layer = str(node.target)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(
            cg.modules[users[0].target], nn.modules.batchnorm._BatchNorm
        ):
            layer = str(users[0].target)
        size = cg.groups[group].size
        if size != conv.out_channels:
            continue  # the conv's output channels are tied among themselves; not a plain channel group
        sites.append(GateSite(group, str(node.target), layer, size))
    if not sites:
        raise PlanError(
            f"Pruning from Scratch found no channels to gate in {type(model).__name__}: it gates the output "
            "channels of convs that alone produce their dependency group (not tied by residual adds, grouped "
            "convs or GroupNorm, not pinned as model outputs)"
        )
    return sites


class ChannelGates(nn.Module):
    """The gates of Pruning from Scratch: one vector per :class:`GateSite`, initialised to 1.

    The gates live outside the network; :meth:`attach` multiplies each site's output by its gates with
    forward hooks while the context is open, so the network itself is never modified.
    """

    def __init__(self, sites: Sequence[GateSite], init: float = 1.0) -> None:
        super().__init__()
        self.sites = list(sites)
        self.gates = nn.ParameterList([nn.Parameter(torch.full((s.channels,), float(init))) for s in self.sites])
        self.selection: dict[str, Any] | None = None  # which epoch's gates these are (search_gates)

    @contextlib.contextmanager
    def attach(self, model: nn.Module) -> Iterator["ChannelGates"]:
        """Gate ``model``'s sites for the duration of the ``with`` block."""
        handles = []
        try:
            for site, gate in zip(self.sites, self.gates):
                module = model.get_submodule(site.layer)
                handles.append(module.register_forward_hook(_gate_hook(site, gate)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def flat(self) -> torch.Tensor:
        """Every gate in site order, (sum of C,)."""
        return torch.cat(list(self.gates))

    def values(self) -> dict[str, np.ndarray]:
        """Group name -> gate values (float64, (C,))."""
        return {s.group: g.detach().double().cpu().numpy() for s, g in zip(self.sites, self.gates)}

    def clamp_(self, lo: float = 0.0, hi: float = 1.0) -> None:
        with torch.no_grad():
            for g in self.gates:
                g.clamp_(lo, hi)


def _gate_hook(site: GateSite, gate: nn.Parameter) -> Any:
    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if out.dim() < 2 or out.shape[1] != gate.shape[0]:
            raise RuntimeError(
                f"gate on {site.layer!r} has {gate.shape[0]} channels but the layer output has shape "
                f"{tuple(out.shape)}; gates are built for the channel axis 1 of the traced model"
            )
        return out * gate.view((1, -1) + (1,) * (out.dim() - 2))

    return hook


class GateHook(Hook):
    """The sparsity term ``lam * (mean |g| - r)^2`` over all gates, and the [0, 1] clamp after each step."""

    def __init__(self, gates: ChannelGates, lam: float = LAMBDA, r: float = TARGET_RATIO) -> None:
        if lam < 0 or not 0.0 <= r <= 1.0:
            raise ValueError(f"need lam >= 0 and r in [0, 1], got lam={lam}, r={r}")
        self.gates, self.lam, self.r = gates, float(lam), float(r)

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> torch.Tensor:
        mean = self.gates.flat().abs().mean()
        state.metrics["gate_mean"] = float(mean.detach())
        return self.lam * (mean - self.r) ** 2

    def after_step(self, state: TrainState) -> None:
        self.gates.clamp_(0.0, 1.0)


class BestGates(Hook):
    """Keeps the gates of the best epoch among those within the sparsity target (the official code's rule).

    At the end of every epoch: the gates' density ``(g != 0).mean()`` and the epoch's score, its
    ``eval_accuracy`` when the run evaluates (``eval_data``) else its mean ``train_accuracy``. An epoch is
    *within the target* when ``density <= r``; among those, the highest score wins (the earliest on ties) and
    its gates are copied. :meth:`restore` loads them into the gates; when no epoch was within the target the
    gates stay those of the last epoch, as the official code then saves the last epoch's.

    Attributes:
        epochs: per epoch ``{"epoch", "density", "score", "within"}``.
        best_epoch: the chosen epoch (1-based, as the trainer's history), or None.
    """

    def __init__(self, gates: ChannelGates, r: float = TARGET_RATIO) -> None:
        self.gates, self.r = gates, float(r)
        self.epochs: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best: list[torch.Tensor] | None = None
        self._score = -float("inf")

    def on_epoch_end(self, state: TrainState) -> None:
        entry = state.history[-1] if state.history else {}
        score = float(entry.get("eval_accuracy", entry.get("train_accuracy", 0.0)))
        density = float((self.gates.flat().detach() != 0).float().mean())
        epoch = int(entry.get("epoch", state.epoch + 1))
        within = density <= self.r
        self.epochs.append({"epoch": epoch, "density": density, "score": score, "within": within})
        if within and score > self._score:
            self._score, self.best_epoch = score, epoch
            self.best = [g.detach().clone() for g in self.gates.gates]

    def restore(self) -> bool:
        """Load the best within-target epoch's gates; False (gates unchanged) when there was none."""
        if self.best is None:
            return False
        with torch.no_grad():
            for g, v in zip(self.gates.gates, self.best):
                g.copy_(v)
        return True

    def record(self) -> dict[str, Any]:
        """The selection, JSON-ready: ``kept`` (``"best"`` or ``"last"``), ``epoch``, ``r`` and ``epochs``."""
        last = self.epochs[-1]["epoch"] if self.epochs else None
        return {"kept": "best" if self.best is not None else "last",
                "epoch": self.best_epoch if self.best is not None else last, "r": self.r, "epochs": list(self.epochs)}


def search_gates(
    model: nn.Module,
    train_data: Any,
    example_inputs: Any,
    *,
    epochs: float = EPOCHS,
    lam: float = LAMBDA,
    r: float = TARGET_RATIO,
    lr: float = GATE_LR,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = False,
    config: TrainConfig | None = None,
    keep: str = "best",
    **train_kwargs: Any,
) -> tuple[ChannelGates, TrainResult]:
    """Learn the channel gates of ``model`` with its weights frozen (step 1 of the module docstring).

    Args:
        model: the network, normally freshly (randomly) initialised; its parameters are not changed, its
            BN running statistics are (train mode).
        train_data: DataLoader, Dataset or (X, Y) pair of the task, e.g. (N, 3, 32, 32) images.
        example_inputs: a tensor or tuple to trace the model with (e.g. (1, 3, 32, 32)).
        epochs, lam, r, lr, batch_size, seed, progress: the search's settings (defaults: the paper's CIFAR
            values; Adam, constant lr, no weight decay on the gates).
        config: a full :class:`~sparsekern.train.TrainConfig` instead (overrides the settings above).
        keep: ``"best"`` (the official code): the gates of the best epoch among those whose density
            ``(g != 0).mean() <= r``, scored by ``eval_accuracy`` with ``eval_data``, else by the epoch's
            training accuracy; the last epoch's when none qualifies (:class:`BestGates`). ``"last"``: the
            last epoch's gates.
        train_kwargs: further arguments of :func:`sparsekern.train.train` (``eval_data``, ``hooks``, ...).

    Returns:
        (gates clamped to [0, 1], the trainer's result; ``history`` holds ``train_gate_mean``). The gates'
        ``selection`` attribute records the choice (:meth:`BestGates.record`).
    """
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
    sites = gate_sites(model, example_inputs)
    device = next(model.parameters()).device
    gates = ChannelGates(sites).to(device)
    config = config or TrainConfig(
        epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, weight_decay=0.0,
        schedule="constant", seed=seed, progress=progress,
    )
    best = BestGates(gates, r)
    hooks = [GateHook(gates, lam, r), best, *train_kwargs.pop("hooks", ())]
    with gates.attach(model):
        result = train(model, train_data, config, hooks=hooks, params=list(gates.parameters()), **train_kwargs)
    if keep == "best":
        best.restore()
    gates.selection = best.record()
    if keep == "last" and best.epochs:
        gates.selection.update(kept="last", epoch=best.epochs[-1]["epoch"])
    return gates, result


# ----------------------------------------------------------------------------- width expansion
def _widened(module: nn.Module, out: int | None, inp: tuple[int, int, int] | None) -> nn.Module:
    """A fresh ``module`` with ``out`` output channels and/or its input widened by ``inp = (C, C', positions)``."""
    w = next(module.parameters(), None)
    factory = {"device": w.device, "dtype": w.dtype} if w is not None else {}
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(out, module.eps, module.momentum, module.affine, module.track_running_stats, **factory)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        cin = module.in_channels if inp is None else inp[1]
        return nn.Conv2d(cin, out or module.out_channels, module.kernel_size, module.stride, module.padding,
                         module.dilation, 1, module.bias is not None, module.padding_mode, **factory)
    if isinstance(module, nn.Linear) and out is None and inp is not None:
        c, wide, positions = inp
        return nn.Linear(positions // c * wide, module.out_features, module.bias is not None, **factory)
    raise PlanError(f"Pruning from Scratch cannot widen a {type(module).__name__} (plain Conv2d, BatchNorm2d and, as "
                    "a consumer, Linear only); search with expansion=1.0")


def expand(model: nn.Module, example_inputs: Any, ratio: float = EXPANSION, *, seed: int | None = None) -> nn.Module:
    """A randomly initialised copy of ``model`` whose gated channels are ``ratio`` times wider (Wang et al.).

    Every :func:`gate_sites` group of C channels becomes ``max(C, round(C * ratio))`` channels: its producer
    conv, the BatchNorm after it and its one consumer (a conv, or a linear layer reading them, flattened or
    not) are rebuilt at the new width; other channels (residual streams, tied groups) keep theirs. The copy
    gets fresh weights (:func:`reinitialise`, seeded by ``seed``); ``model`` is not modified. ``ratio = 1``
    gives a re-initialised copy. When ``model`` records its architecture (``sk_arch``), the copy records
    :func:`build_expanded` with the ratio and the input shapes, so a compiled result saves and loads.

    Raises:
        ValueError: ``ratio < 1``. PlanError: a gated layer that cannot be widened.
    """
    if not ratio >= 1.0:
        raise ValueError(f"the expansion ratio must be >= 1, got {ratio}")
    inputs = _as_tuple(example_inputs)
    cg = trace_channels(model, inputs)
    outs: dict[str, int] = {}
    ins: dict[str, tuple[int, int, int]] = {}
    for site in gate_sites(model, inputs, cg=cg):
        wide = max(site.channels, int(round(site.channels * ratio)))
        outs[site.producer] = outs[site.layer] = wide
        (consumer, positions), = cg.consumers(site.group).items()
        if (positions < 0).any() or len(positions) % site.channels:
            raise PlanError(f"cannot widen group {site.group!r}: its consumer {consumer!r} also reads other channels")
        ins[consumer] = (site.channels, wide, len(positions))
    out = copy.deepcopy(model)
    for name in sorted(set(outs) | set(ins)):
        parent, _, child = name.rpartition(".")
        holder = out.get_submodule(parent) if parent else out
        setattr(holder, child, _widened(out.get_submodule(name), outs.get(name), ins.get(name)))
    reinitialise(out, seed)
    arch = getattr(model, "sk_arch", None)
    if arch is not None:
        out.sk_arch = {"factory": EXPANDED_FACTORY, "kwargs": {"arch": dict(arch), "ratio": float(ratio),
                                                              "inputs": input_spec(inputs)}}
    elif hasattr(out, "sk_arch"):
        del out.sk_arch
    return out


def build_expanded(arch: dict[str, Any], ratio: float, inputs: list[dict[str, Any]]) -> nn.Module:
    """Rebuild an expanded architecture from its record (the ``sk_arch`` factory of :func:`expand`): the
    architecture ``arch`` (:func:`sparsekern.serialize.build_arch`) widened by ``ratio`` for inputs of the
    recorded shapes. Weights are random (loading fills them)."""
    base = build_arch(arch)
    return expand(base, example_inputs_for(inputs), ratio, seed=0)


register_factory(EXPANDED_FACTORY, build_expanded)


# ----------------------------------------------------------------------------- budget search
@dataclass
class BudgetSearch:
    """Outcome of :func:`keep_count_for_budget`.

    Attributes:
        k: candidates kept (the first ``k`` of the ranking).
        flops: FLOPs of the plan that keeps them; ``target``: ``budget * dense FLOPs``.
        error: ``|flops - target| / target``; ``within_tolerance``: ``error <= tolerance``.
        iterations: FLOP evaluations made by the bisection.
        step: when the tolerance is missed, the FLOPs of the one channel at the boundary as a fraction of
            the target (the granularity that made the tolerance impossible); else ``None``.
    """

    k: int
    flops: float
    target: float
    error: float
    within_tolerance: bool
    iterations: int
    step: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def keep_count_for_budget(
    cost: Any, n: int, target: float, *, tolerance: float = 1e-3, max_iter: int = 20
) -> BudgetSearch:
    """Binary search of the number of kept candidates ``k`` in [0, n] whose FLOPs ``cost(k)`` (non-decreasing
    in ``k``) meet ``target`` within ``tolerance`` (relative); see the module docstring for the granularity.

    Raises:
        PlanError: when even ``k = 0`` (each group at its floor) exceeds the target.
    """
    f_lo, f_hi = float(cost(0)), float(cost(n))
    if f_lo > target * (1.0 + tolerance):
        raise PlanError(
            f"the FLOPs budget is out of reach: keeping one channel per gated group still costs {f_lo:.4g} FLOPs, "
            f"more than the target {target:.4g}; raise the budget"
        )
    lo, hi, it = 0, n, 0
    evaluated = {0: f_lo, n: f_hi}
    hit = None
    for k, f in ((0, f_lo), (n, f_hi)):
        if abs(f - target) <= tolerance * target:
            hit = k
    if hit is None and f_hi < target:
        hit = n  # everything kept is still under the target: the budget does not bind
    while hit is None and hi - lo > 1 and it < max_iter:
        mid = (lo + hi) // 2
        f = float(cost(mid))
        evaluated[mid] = f
        it += 1
        if abs(f - target) <= tolerance * target:
            hit = mid
        elif f < target:
            lo = mid
        else:
            hi = mid
    k = hit if hit is not None else min((lo, hi), key=lambda i: (abs(evaluated[i] - target), i))
    error = abs(evaluated[k] - target) / target
    within = error <= tolerance
    step = None if within or hit is not None else (evaluated[hi] - evaluated[lo]) / target
    return BudgetSearch(k, evaluated[k], float(target), error, within, it, step)


def _ranking(sites: Sequence[GateSite], scores: dict[str, np.ndarray]) -> tuple[list[tuple[str, int]], set]:
    """Candidates by decreasing score (ties: site order, then channel index) and each group's floor channel."""
    items = []
    floor = set()
    for si, site in enumerate(sites):
        sc = np.asarray(scores[site.group], dtype=np.float64)
        if sc.shape != (site.channels,):
            raise PlanError(f"scores of group {site.group!r} have shape {sc.shape}, expected ({site.channels},)")
        floor.add((site.group, int(np.argmax(sc))))  # first maximum: every group keeps >= 1 channel
        items += [(-float(sc[c]), si, c) for c in range(site.channels)]
    items.sort()
    return [(sites[si].group, c) for _, si, c in items], floor


def prune(
    model: nn.Module,
    example_inputs: Any,
    gates: ChannelGates | dict[str, Any],
    *,
    budget: float,
    tolerance: float = 1e-3,
    max_iter: int = 20,
    base: nn.Module | None = None,
) -> Plan:
    """Plan the pruned architecture: keep the globally largest gates, as many as the FLOPs ``budget`` allows.

    Args:
        model: the network the gates were searched on (only its architecture matters); the plan is for it.
        example_inputs: a tensor or tuple to trace with (FLOPs are counted for these shapes).
        gates: :class:`ChannelGates`, or group name -> scores (C,) for the groups of :func:`gate_sites`.
        budget: FLOPs of the compiled model as a fraction of ``base``'s, in (0, 1].
        base: the network the budget refers to (default ``model``); the unexpanded network when ``model``
            is its :func:`expand` ed copy, as the official code counts the budget on the original network.
        tolerance: relative tolerance on the FLOPs (the paper: 0.1%).
        max_iter: cap on FLOP evaluations of the bisection.

    Returns:
        A plan over the gated groups (``scores`` = gate values); ``meta["search"]`` holds the
        :class:`BudgetSearch` record, ``meta["flops_ratio"]`` the achieved fraction, ``meta["keep_ratio"]``
        the global fraction of gated channels kept.
    """
    if not 0.0 < budget <= 1.0:
        raise PlanError(f"FLOPs budget must be a fraction in (0, 1], got {budget}")
    inputs = _as_tuple(example_inputs)
    cg = trace_channels(model, inputs)
    sites = gate_sites(model, inputs, cg=cg)
    scores = gates.values() if isinstance(gates, ChannelGates) else {
        k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64) for k, v in gates.items()
    }
    missing = [s.group for s in sites if s.group not in scores]
    if missing:
        raise PlanError(f"no gate scores for the gated groups {missing[:4]}; the gates were searched on another model")
    order, floor = _ranking(sites, scores)
    dense = eval_flops(model, inputs)
    reference = dense.total if base is None else eval_flops(base, inputs).total

    def plan_for(k: int) -> Plan:
        kept: dict[str, set[int]] = {s.group: set() for s in sites}
        for g, c in list(floor) + order[:k]:
            kept[g].add(c)
        channels = {}
        for s in sites:
            if len(kept[s.group]) < s.channels:
                spec = cg.groups[s.group]
                channels[s.group] = GroupKeep(spec.size, tuple(sorted(kept[s.group])), spec.members,
                                              tuple(scores[s.group].tolist()))
        return Plan(channels=channels)

    def cost(k: int) -> float:
        return float(plan_flops(cg, dense, plan_for(k)))

    search = keep_count_for_budget(cost, len(order), budget * reference, tolerance=tolerance, max_iter=max_iter)
    plan = plan_for(search.k)
    plan.meta.update({
        "method": "scratch", "budget": float(budget), "inputs": cg.input_spec,
        "keep_ratio": search.k / len(order), "flops_ratio": search.flops / reference,
        "search": search.to_dict(),
    })
    cg.check_plan(plan)
    return plan


# ----------------------------------------------------------------------------- training from scratch
def reinitialise(model: nn.Module, seed: int | None = None) -> nn.Module:
    """``model`` with fresh weights, in place: every layer's own reset, then the zoo's conv/BN init
    (:func:`sparsekern.models.init.init_weights`); BN running statistics are reset too."""
    if seed is not None:
        torch.manual_seed(seed)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
    init_weights(model)
    return model


def train_from_scratch(
    model: nn.Module,
    plan: Plan,
    example_inputs: Any,
    train_data: Any,
    *,
    epochs: float,
    config: TrainConfig | None = None,
    max_factor: float | None = None,
    seed: int = 0,
    base: nn.Module | None = None,
    **train_kwargs: Any,
) -> tuple[nn.Module, TrainResult]:
    """Compile ``plan``, re-initialise the pruned network and train it with the Scratch-B budget.

    Args:
        model: the full network the plan was made for.
        plan: from :func:`prune`.
        example_inputs: tensor or tuple to trace and count FLOPs with.
        train_data: the task's training data.
        epochs: the full network's epoch budget (Scratch-E); the pruned network trains
            ``epochs * FLOPs_full / FLOPs_pruned`` epochs (:func:`sparsekern.train.scratch_b_epochs`,
            capped by ``max_factor``).
        config: training settings (its ``epochs`` is replaced); default SGD lr 0.1, cosine, no progress bar.
        seed: seeds the re-initialisation (and the run, when ``config`` is not given).
        base: the full network whose FLOPs define Scratch-B (default ``model``; the unexpanded network when
            ``model`` is an :func:`expand` ed copy).
        train_kwargs: further arguments of :func:`sparsekern.train.train` (``eval_data``, ...).

    Returns:
        (the trained pruned network, the trainer's result).
    """
    inputs = _as_tuple(example_inputs)
    pruned = compile_plan(model, plan, inputs)
    reinitialise(pruned, seed)
    full, small = eval_flops(model if base is None else base, inputs).total, eval_flops(pruned, inputs).total
    b_epochs = scratch_b_epochs(epochs, full, small, max_factor=max_factor)
    config = dataclasses.replace(config, epochs=b_epochs) if config is not None else TrainConfig(
        epochs=b_epochs, seed=seed, progress=False)
    result = train(pruned, train_data, config, **train_kwargs)
    return pruned, result


def prune_to_budget(
    model: nn.Module,
    x: torch.Tensor,
    train_data: Any,
    budget: float,
    *,
    seed: int = 0,
    epochs: float = EPOCHS,
    progress: bool = False,
    expansion: float = EXPANSION,
    **search_kwargs: Any,
) -> tuple[Plan, nn.Module]:
    """The :func:`sparsekern.methods.rethinking.prune_to_budget` convention for Pruning from Scratch.

    The gates are searched on a randomly initialised copy of ``model`` whose gated channels are widened by
    ``expansion`` (:func:`expand`, seeded by ``seed``; 1.25 as the official CIFAR code, 1.0 for an unexpanded
    copy); ``model`` itself is left untouched, its trained weights unused. The kept gates are those of the
    best epoch within the sparsity target (:func:`search_gates`, ``keep="best"``), and the plan meets
    ``budget`` x the FLOPs of ``model`` (:func:`prune` with ``base=model``). Returns the plan and the
    expanded random network, which is what the plan compiles against: the compiled model starts from random
    weights, so "fine-tuning" it is training from scratch. ``search_kwargs`` go to :func:`search_gates`.
    """
    inputs = _as_tuple(x)
    random_net = expand(model, inputs, expansion, seed=seed)
    gates, _ = search_gates(random_net, train_data, inputs, epochs=epochs, seed=seed, progress=progress,
                            **search_kwargs)
    plan = prune(random_net, inputs, gates, budget=budget, base=model)
    values = gates.flat().detach()
    plan.meta.update({"search_epochs": float(epochs), "seed": int(seed), "expansion": float(expansion),
                      "gates_kept": gates.selection, "gate_mean": float(values.mean()),
                      "gates_below_0.05": float((values < 0.05).float().mean())})
    if getattr(random_net, "sk_arch", None) is not None:
        plan.meta["source_arch"] = dict(random_net.sk_arch)
    return plan, random_net


@register_method("scratch")
class PruningFromScratch(Method):
    """Pruning from Scratch: :func:`prune_to_budget` (gates searched on a width-expanded random copy); its own
    arm is Scratch-B."""

    order = 50
    summary = "gates learned on a random network, pruned net trained from scratch (Wang et al., AAAI 2020)"
    arms = ("Scratch-B",)
    protocol_arms = ()
    searches = True
    robustness = False

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        return Pruned(*prune_to_budget(model, ctx.example_inputs, ctx.train_data, budget, seed=ctx.seed,
                                       epochs=ctx.search_epochs, progress=ctx.progress))
