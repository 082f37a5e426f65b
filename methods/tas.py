"""Network Pruning via Transformable Architecture Search (TAS; Dong & Yang, NeurIPS 2019).

TAS searches the *architecture* of the pruned network (channels per layer and blocks per stage) under a
FLOPs budget, then trains that architecture with knowledge distillation from the unpruned network.

Search space (docs/methods.md#tas), here for the zoo's CIFAR ResNets:

* **width**: candidate channel counts ``int(C * r)`` for ``r`` in 0.3, 0.4, ..., 1.0 (:func:`width_choices`).
  Channels tied by residual adds form one dependency group (:mod:`sparsekern.graph`) and therefore share
  one width choice: the stem and every block output of a stage (``layerS`` below, the stage's residual
  stream, projection shortcut included). Each block's inner conv (``layerS.B.conv1``) has its own.
* **depth**: candidate numbers of blocks per stage ``{1, 3, 5, ..., N}`` (``N`` added when even; all of
  ``1..N`` for ``N <= 3``; :func:`depth_choices`). A stage of depth ``d`` keeps its first ``d`` blocks.

Forward of the searchable network (:class:`TASResNet`): every width choice samples two candidates from
its Gumbel-perturbed distribution ``softmax((log_softmax(a) + g) / tau)`` and renormalises their weights
(a softmax over the two perturbed logits). A conv runs once at full width; the first ``C_i`` channels of
its output go through candidate ``i``'s own BatchNorm; the two results are aligned to the larger count by
channel-wise interpolation (adaptive average pooling over the channel axis, :func:`channel_interpolate`)
and summed with their weights. The next conv reads the first channels of its full weight, which is the
zero-padding of the paper's code without the zeros. Depth: the outputs after each candidate number of
blocks of a stage are mixed with Gumbel-softmax weights over the stage's depth choices.

Objective of the architecture parameters: cross-entropy plus ``2 * L_flop``, with
``L_flop = -log E[F]`` when the argmax architecture's FLOPs are below ``target - tolerance``,
``+log E[F]`` when above ``target``, and 0 in between (tolerance 5% of the unpruned FLOPs).
``E[F]`` is differentiable: every conv contributes ``unit * E[C_in] * E[C_out] * P(block kept)`` with
``E[C] = sum_i softmax(a)_i C_i`` and ``P(block b kept) = sum_{d >= b} softmax(depth logits)_d``
(:meth:`TASResNet.expected_flops`, per sample, in FLOPs with a multiply-add counted as 2 like
:func:`sparsekern.flops`). Bilevel optimisation: the weights by SGD on one half of the training data, the
architecture logits by Adam (lr 1e-3, betas (0.5, 0.999), weight decay 1e-3) on the other half, in
alternating steps (the trainer's :class:`~sparsekern.train.Stage`); the Gumbel temperature falls linearly
from 5 to 0.1 over the search (:class:`TemperatureHook`).

Output: the argmax architecture as a :class:`~sparsekern.plan.Plan` (:func:`derive_plan`): channel
keep-sets keeping the first ``C_i`` channels of each group, and ``removed_blocks`` for the blocks past each
stage's depth, which :func:`sparsekern.compile` replaces by their shortcut (:mod:`sparsekern.depth`).
Channel groups are named as in the model *after* those blocks are removed. Then the pruned network is
trained from scratch with distillation from the unpruned one, ``(1 - a) CE + a T^2 KL`` with
``a = 0.9, T = 4`` (:func:`train_pruned`, through the trainer's ``teacher=``).

Departures from the paper's code, for this library: the searchable network starts from the given
(usually trained) model's weights, BN statistics and affine parameters sliced per candidate; channels
tied by residual adds share one width choice (the paper's code lets each conv choose and adds tensors of
different widths by zero padding, which has no static dependency-group equivalent); the search returns
the last architecture whose FLOPs lay in the accepted band ``[target - tolerance, target]`` when the final
step left it (:func:`search`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from sparsekern.depth import channel_graph
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.models.init import init_weights
from sparsekern.models.resnet import CifarResNet
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.train import Hook, Stage, TrainConfig, TrainResult, TrainState, train

__all__ = [
    "TAS",
    "DISTILL_ALPHA",
    "DISTILL_TEMPERATURE",
    "FLOP_TOLERANCE",
    "FLOP_WEIGHT",
    "WIDTH_RATIOS",
    "FlopLossHook",
    "SearchConv",
    "SearchResult",
    "TASResNet",
    "TemperatureHook",
    "WidthChoice",
    "channel_interpolate",
    "depth_choices",
    "derive_plan",
    "flop_loss",
    "prune_to_budget",
    "reinitialise",
    "search",
    "split_halves",
    "train_pruned",
    "width_choices",
]

WIDTH_RATIOS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FLOP_WEIGHT = 2.0
FLOP_TOLERANCE = 0.05
DISTILL_ALPHA = 0.9
DISTILL_TEMPERATURE = 4.0
_MFLOPS = 1e6


# ----------------------------------------------------------------------------- search space
def width_choices(channels: int, ratios: Sequence[float] = WIDTH_RATIOS) -> tuple[int, ...]:
    """Candidate channel counts ``int(channels * r)`` (at least 1), sorted and without repeats."""
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    if not ratios or any(not 0.0 < r <= 1.0 for r in ratios):
        raise ValueError(f"width ratios must lie in (0, 1], got {list(ratios)}")
    return tuple(sorted({max(1, int(channels * r + 1e-9)) for r in ratios}))


def depth_choices(blocks: int) -> tuple[int, ...]:
    """Candidate numbers of blocks of a stage with ``blocks`` blocks: ``1, 3, 5, ..., blocks`` (all for <= 3)."""
    if blocks < 1:
        raise ValueError(f"a stage needs at least one block, got {blocks}")
    if blocks <= 3:
        return tuple(range(1, blocks + 1))
    odd = list(range(1, blocks + 1, 2))
    return tuple(odd if odd[-1] == blocks else odd + [blocks])


def channel_interpolate(x: Tensor, channels: int) -> Tensor:
    """Resize the channel axis of ``x`` (N, C, H, W) to ``channels`` by adaptive average pooling over it.

    Output channel ``j`` averages input channels ``floor(j C / channels) .. ceil((j + 1) C / channels) - 1``,
    which stretches a narrower tensor over a wider one (TAS's channel-wise interpolation).
    """
    if x.dim() != 4:
        raise ValueError(f"channel_interpolate expects (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == channels:
        return x
    return F.adaptive_avg_pool3d(x, (channels, x.shape[2], x.shape[3]))


def _gumbel(logits: Tensor) -> Tensor:
    return -torch.empty_like(logits).exponential_().clamp_min(1e-20).log()


def _sample_two(logits: Tensor, tau: float) -> tuple[list[int], Tensor | None]:
    """Two distinct candidates drawn from the Gumbel-perturbed distribution, and their renormalised weights."""
    if logits.numel() == 1:
        return [0], None
    z = (logits.log_softmax(-1) + _gumbel(logits)) / tau
    with torch.no_grad():
        index = torch.multinomial(z.softmax(-1) + 1e-7, 2, replacement=False)
    return index.tolist(), z[index].softmax(-1)


def _gumbel_softmax(logits: Tensor, tau: float) -> Tensor:
    return ((logits.log_softmax(-1) + _gumbel(logits)) / tau).softmax(-1)


@dataclass(frozen=True)
class WidthChoice:
    """One searched width: the channels of a dependency group.

    Attributes:
        name: ``"layerS"`` for the residual stream of stage S (the stem is in stage 1's), else the inner
            conv of a block, ``"layerS.B.conv1"``.
        layer: a conv of the unpruned model that produces the group's channels (kept whatever the depth).
        channels: the group's size.
        choices: candidate channel counts (:func:`width_choices`).
    """

    name: str
    layer: str
    channels: int
    choices: tuple[int, ...]


@dataclass(frozen=True)
class _Cost:
    """FLOPs of one conv/linear per sample: ``unit * C_in * C_out`` (times the keep probability of its block)."""

    layer: str
    unit: int
    in_var: int | None
    in_fixed: int
    out_var: int | None
    out_fixed: int
    block: tuple[int, int] | None


# ----------------------------------------------------------------------------- searchable layers
class SearchConv(nn.Module):
    """A conv whose output width is searched: one full-width conv, one BatchNorm per candidate width.

    ``forward(x, index, weights)``: ``x`` (N, C_in', H, W) with ``C_in' <= in_channels`` (the first input
    channels); ``index`` the candidate(s) to run; ``weights`` their mixing weights (None for one candidate).
    Returns (N, max_i choices[i], H', W').
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, choices: Sequence[int]) -> None:
        super().__init__()
        if conv.groups != 1:
            raise PlanError(f"TAS width search needs dense convolutions, got groups={conv.groups}")
        self.conv = copy.deepcopy(conv)
        self.choices = tuple(choices)
        self.bns = nn.ModuleList()
        for c in self.choices:
            b = nn.BatchNorm2d(c, eps=bn.eps, momentum=bn.momentum)
            with torch.no_grad():
                b.weight.copy_(bn.weight[:c])
                b.bias.copy_(bn.bias[:c])
                b.running_mean.copy_(bn.running_mean[:c])
                b.running_var.copy_(bn.running_var[:c])
            self.bns.append(b)

    def forward(self, x: Tensor, index: Sequence[int], weights: Tensor | None = None) -> Tensor:
        c = self.conv
        y = F.conv2d(x, c.weight[:, : x.shape[1]], c.bias, c.stride, c.padding, c.dilation)
        outs = [self.bns[i](y[:, : self.choices[i]]) for i in index]
        if len(outs) == 1:
            return outs[0]
        width = max(o.shape[1] for o in outs)
        return sum(w * channel_interpolate(o, width) for w, o in zip(weights, outs))


class _SearchBlock(nn.Module):
    """A searchable BasicBlock: ``relu(conv2(relu(conv1(x))) + shortcut(x))``."""

    def __init__(self, block: nn.Module, inner: WidthChoice, outer: WidthChoice) -> None:
        super().__init__()
        self.conv1 = SearchConv(block.conv1, block.bn1, inner.choices)
        self.conv2 = SearchConv(block.conv2, block.bn2, outer.choices)
        ds = block.downsample
        self.downsample = SearchConv(ds[0], ds[1], outer.choices) if ds is not None else None

    def forward(self, x: Tensor, inner: tuple, outer: tuple) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x, *inner)), *outer)
        shortcut = x if self.downsample is None else self.downsample(x, *outer)
        return F.relu(h + shortcut)


class TASResNet(nn.Module):
    """The searchable network of TAS for a zoo CIFAR ResNet (see the module docstring).

    Args:
        model: a :class:`~sparsekern.models.resnet.CifarResNet` (``resnet20/56/110``); its weights, BN
            statistics and affine parameters initialise every candidate (not modified).
        example_inputs: (N, C, H, W) inputs fixing the spatial sizes that FLOPs are counted at.
        ratios: width ratios (default 0.3 .. 1.0).
        init_std: architecture logits start as N(0, init_std) (seeded by ``seed``).

    Attributes:
        mode: ``"search"`` (sampled widths and depth mixture) or ``"argmax"`` (the most likely
            architecture: one BN per conv, the first ``d`` blocks of each stage).
        tau: Gumbel-softmax temperature (annealed by :class:`TemperatureHook`).
        widths: the :class:`WidthChoice` s, in the order of ``width_logits``.
        depths: depth choices per stage, in the order of ``depth_logits``.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor,
        *,
        ratios: Sequence[float] = WIDTH_RATIOS,
        init_std: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, CifarResNet):
            raise PlanError(
                f"TAS's searchable network is built for the zoo's CIFAR ResNets (resnet20/56/110, "
                f"sparsekern.models.build), got {type(model).__name__}"
            )
        x = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
        self.mode = "search"
        self.tau = 5.0
        self._arch = {"depth": model.depth, "num_classes": model.fc.out_features,
                      "in_channels": model.conv1.in_channels, "sk_arch": getattr(model, "sk_arch", None)}
        stages = [model.layer1, model.layer2, model.layer3]
        widths: list[WidthChoice] = []
        for s, stage in enumerate(stages, 1):
            c = stage[0].conv2.out_channels
            widths.append(WidthChoice(f"layer{s}", "conv1" if s == 1 else f"layer{s}.0.conv2", c,
                                      width_choices(c, ratios)))
        self.stage_var = list(range(len(stages)))
        self.inner_var: list[list[int]] = []
        for s, stage in enumerate(stages, 1):
            ids = []
            for b, block in enumerate(stage):
                c = block.conv1.out_channels
                ids.append(len(widths))
                widths.append(WidthChoice(f"layer{s}.{b}.conv1", f"layer{s}.{b}.conv1", c, width_choices(c, ratios)))
            self.inner_var.append(ids)
        self.widths = widths
        self.depths = [depth_choices(len(stage)) for stage in stages]
        self.blocks_per_stage = [len(stage) for stage in stages]

        self.conv1 = SearchConv(model.conv1, model.bn1, widths[0].choices)
        self.layers = nn.ModuleList(
            nn.ModuleList(_SearchBlock(block, widths[self.inner_var[s][b]], widths[self.stage_var[s]])
                          for b, block in enumerate(stage))
            for s, stage in enumerate(stages)
        )
        self.fc = copy.deepcopy(model.fc)
        g = torch.Generator().manual_seed(seed)
        self.width_logits = nn.ParameterList(
            nn.Parameter(torch.randn(len(w.choices), generator=g) * init_std) for w in widths)
        self.depth_logits = nn.ParameterList(
            nn.Parameter(torch.randn(len(d), generator=g) * init_std) for d in self.depths)
        self._costs = self._cost_table(model, x)
        self.full_flops = self.flops_of([w.channels for w in widths], self.blocks_per_stage)

    # ------------------------------------------------------------------ parameters
    def arch_parameters(self) -> list[nn.Parameter]:
        """The architecture logits (width choices, then depth choices)."""
        return list(self.width_logits) + list(self.depth_logits)

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the architecture logits."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    # ------------------------------------------------------------------ FLOPs
    def _cost_table(self, model: nn.Module, x: Tensor) -> list[_Cost]:
        """Per-sample FLOP units of every conv and the classifier, from one probe forward of ``model``."""
        shapes: dict[str, tuple[int, ...]] = {}
        def record(name: str) -> Any:
            def hook(module: nn.Module, args: Any, out: Tensor) -> None:
                shapes.setdefault(name, tuple(out.shape))
            return hook

        hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        was = model.training
        try:
            model.eval()
            with torch.no_grad():
                model(x[:1])
        finally:
            model.train(was)
            for h in hooks:
                h.remove()

        def unit(name: str) -> int:
            conv = model.get_submodule(name)
            kh, kw = conv.kernel_size
            return 2 * kh * kw * shapes[name][2] * shapes[name][3]

        costs = [_Cost("conv1", unit("conv1"), None, model.conv1.in_channels, 0, 0, None)]
        for s in range(len(self.depths)):
            prev = self.stage_var[max(s - 1, 0)]
            for b in range(self.blocks_per_stage[s]):
                p = f"layer{s + 1}.{b}"
                stream_in = prev if b == 0 else self.stage_var[s]
                inner, outer = self.inner_var[s][b], self.stage_var[s]
                costs.append(_Cost(f"{p}.conv1", unit(f"{p}.conv1"), stream_in, 0, inner, 0, (s, b)))
                costs.append(_Cost(f"{p}.conv2", unit(f"{p}.conv2"), inner, 0, outer, 0, (s, b)))
                if f"{p}.downsample.0" in shapes:
                    costs.append(_Cost(f"{p}.downsample.0", unit(f"{p}.downsample.0"), stream_in, 0, outer, 0, (s, b)))
        costs.append(_Cost("fc", 2, self.stage_var[-1], 0, None, model.fc.out_features, None))
        return costs

    def _flops(self, width: Sequence[Any], keep: Sequence[Sequence[Any]]) -> Any:
        total = 0.0
        for c in self._costs:
            cin = width[c.in_var] if c.in_var is not None else c.in_fixed
            cout = width[c.out_var] if c.out_var is not None else c.out_fixed
            term = c.unit * cin * cout
            total = total + (term if c.block is None else term * keep[c.block[0]][c.block[1]])
        return total

    def expected_flops(self) -> Tensor:
        """E[FLOPs] per sample of the current architecture distribution (differentiable in the logits).

        ``E[C]`` per width choice from ``softmax(width_logits)``; block ``b`` of a stage is kept with
        probability ``P(depth > b)`` from ``softmax(depth_logits)``.
        """
        width = [(a.softmax(-1) * torch.tensor(w.choices, dtype=a.dtype, device=a.device)).sum()
                 for a, w in zip(self.width_logits, self.widths)]
        keep = []
        for a, choices in zip(self.depth_logits, self.depths):
            p = a.softmax(-1)
            d = torch.tensor(choices, device=a.device)
            keep.append([p[d > b].sum() for b in range(max(choices))])
        return self._flops(width, keep)

    def flops_of(self, widths: Sequence[int], depths: Sequence[int]) -> int:
        """FLOPs per sample of the architecture with these channel counts (per width choice) and depths."""
        keep = [[1 if b < d else 0 for b in range(n)] for d, n in zip(depths, self.blocks_per_stage)]
        return int(self._flops([int(w) for w in widths], keep))

    def argmax_widths(self) -> list[int]:
        return [w.choices[int(a.argmax())] for a, w in zip(self.width_logits, self.widths)]

    def argmax_depths(self) -> list[int]:
        return [d[int(a.argmax())] for a, d in zip(self.depth_logits, self.depths)]

    def argmax_flops(self) -> int:
        """FLOPs per sample of the argmax architecture (equal to ``sk.flops`` of its compiled plan / N)."""
        return self.flops_of(self.argmax_widths(), self.argmax_depths())

    def min_flops(self) -> int:
        """FLOPs per sample of the smallest architecture in the search space."""
        return self.flops_of([w.choices[0] for w in self.widths], [d[0] for d in self.depths])

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of the sampled (``mode="search"``) or argmax architecture."""
        search = self.mode == "search"
        if not search and self.mode != "argmax":
            raise ValueError(f"mode must be 'search' or 'argmax', got {self.mode!r}")
        if search:
            ws = [_sample_two(a, self.tau) for a in self.width_logits]
        else:
            ws = [([int(a.argmax())], None) for a in self.width_logits]
        x = F.relu(self.conv1(x, *ws[self.stage_var[0]]))
        for s, blocks in enumerate(self.layers):
            outer = ws[self.stage_var[s]]
            choices = self.depths[s]
            if not search:
                for b in range(choices[int(self.depth_logits[s].argmax())]):
                    x = blocks[b](x, ws[self.inner_var[s][b]], outer)
                continue
            ends = []
            for b, block in enumerate(blocks):
                x = block(x, ws[self.inner_var[s][b]], outer)
                if b + 1 in choices:
                    ends.append(x)
            if len(ends) > 1:
                p = _gumbel_softmax(self.depth_logits[s], self.tau)
                x = sum(pj * e for pj, e in zip(p, ends))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.fc.weight[:, : x.shape[1]], self.fc.bias)

    # ------------------------------------------------------------------ results
    def architecture(self) -> dict[str, Any]:
        """The argmax architecture: channels per width choice and blocks per stage (JSON-ready)."""
        return {
            "widths": {w.name: c for w, c in zip(self.widths, self.argmax_widths())},
            "depths": {f"layer{s + 1}": d for s, d in enumerate(self.argmax_depths())},
        }

    def removed_blocks(self) -> tuple[str, ...]:
        """Blocks past each stage's argmax depth."""
        return tuple(f"layer{s + 1}.{b}" for s, d in enumerate(self.argmax_depths())
                     for b in range(d, self.blocks_per_stage[s]))

    def export(self) -> CifarResNet:
        """An unpruned CifarResNet carrying the search's weights, with each BN's first channels taken from
        the argmax candidate's BN: compiling :func:`derive_plan`'s plan on it gives the argmax network."""
        arch = self._arch
        out = CifarResNet(arch["depth"], num_classes=arch["num_classes"], in_channels=arch["in_channels"])
        if arch["sk_arch"] is not None:
            out.sk_arch = copy.deepcopy(arch["sk_arch"])
        picks = [int(a.argmax()) for a in self.width_logits]

        def put(conv: nn.Conv2d, bn: nn.BatchNorm2d, sconv: SearchConv, var: int) -> None:
            with torch.no_grad():
                conv.weight.copy_(sconv.conv.weight)
                for k in (len(sconv.bns) - 1, picks[var]):  # widest first, then the argmax on top
                    src = sconv.bns[k]
                    c = src.num_features
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name)[:c].copy_(getattr(src, name))

        put(out.conv1, out.bn1, self.conv1, self.stage_var[0])
        for s, stage in enumerate([out.layer1, out.layer2, out.layer3]):
            for b, block in enumerate(stage):
                sb = self.layers[s][b]
                put(block.conv1, block.bn1, sb.conv1, self.inner_var[s][b])
                put(block.conv2, block.bn2, sb.conv2, self.stage_var[s])
                if block.downsample is not None:
                    put(block.downsample[0], block.downsample[1], sb.downsample, self.stage_var[s])
        out.fc.load_state_dict(self.fc.state_dict())
        return out.to(self.fc.weight.device).train(self.training)


# ----------------------------------------------------------------------------- search objective
def flop_loss(expected: Tensor, current: float, target: float, tolerance: float) -> Tensor | None:
    """TAS's FLOP loss: ``-log E[F]`` if ``current < target - tolerance``, ``+log E[F]`` if
    ``current > target``, else None (no term). ``expected`` is E[FLOPs]; the log is taken in MFLOPs."""
    if current < target - tolerance:
        return -torch.log(expected / _MFLOPS)
    if current > target:
        return torch.log(expected / _MFLOPS)
    return None


class TemperatureHook(Hook):
    """Anneals ``network.tau`` linearly from ``start`` at the first step to ``end`` at the last."""

    def __init__(self, network: TASResNet, start: float = 5.0, end: float = 0.1) -> None:
        if not start >= end > 0:
            raise ValueError(f"temperatures must satisfy start >= end > 0, got {start}, {end}")
        self.network, self.start, self.end = network, start, end

    def on_step_start(self, state: TrainState) -> None:
        frac = state.step / max(1, state.total_steps - 1)
        self.network.tau = self.start - (self.start - self.end) * min(1.0, frac)


class FlopLossHook(Hook):
    """Adds ``weight * flop_loss`` to the architecture stage's objective; remembers the last feasible logits.

    ``target`` and ``tolerance`` are FLOPs per sample. After every architecture step whose argmax
    architecture lies in the accepted band ``[target - tolerance, target]``, the logits are saved as
    ``feasible`` (with ``feasible_step``). Metrics: ``flops`` (argmax FLOPs / unpruned, before the step),
    ``arch/flop_loss`` when the term is active.
    """

    def __init__(self, network: TASResNet, target: float, tolerance: float, *, weight: float = FLOP_WEIGHT,
                 stage: str = "arch") -> None:
        self.network, self.target, self.tolerance = network, target, tolerance
        self.weight, self.stage = weight, stage
        self.feasible: list[Tensor] | None = None
        self.feasible_step = -1

    def in_band(self, flops: float) -> bool:
        return self.target - self.tolerance <= flops <= self.target

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> Tensor | None:
        if state.stage != self.stage:
            return None
        current = self.network.argmax_flops()
        state.metrics["flops"] = current / self.network.full_flops
        term = flop_loss(self.network.expected_flops(), current, self.target, self.tolerance)
        if term is None:
            return None
        state.metrics["arch/flop_loss"] = float(term.detach())
        return self.weight * term

    def after_step(self, state: TrainState) -> None:
        if state.stage == self.stage and self.in_band(self.network.argmax_flops()):
            self.feasible = [p.detach().clone() for p in self.network.arch_parameters()]
            self.feasible_step = state.step

    def restore_feasible(self) -> bool:
        """Load the last in-band logits into the network if its current argmax is out of the band.

        Returns True when it did (there was such a step and the current architecture misses the band).
        """
        if self.feasible is None or self.in_band(self.network.argmax_flops()):
            return False
        with torch.no_grad():
            for p, v in zip(self.network.arch_parameters(), self.feasible):
                p.copy_(v)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"feasible": self.feasible, "feasible_step": self.feasible_step}

    def load_state_dict(self, state: Any) -> None:
        self.feasible, self.feasible_step = state["feasible"], int(state["feasible_step"])


# ----------------------------------------------------------------------------- search
@dataclass
class SearchResult:
    """Outcome of :func:`search`: the searchable network (left in ``"argmax"`` mode) and its record.

    FLOPs are per sample. ``flops_found`` is the chosen architecture's, ``flops_last`` the argmax
    architecture's after the last step (they differ when the last step left the accepted band and an
    earlier in-band architecture was chosen, ``chosen_step``). ``history`` is the trainer's per-epoch record
    (``train_flops``: mean argmax FLOPs / unpruned over the epoch's architecture steps).
    """

    network: TASResNet
    budget: float
    tolerance: float
    flops_full: int
    flops_target: float
    flops_found: int
    flops_last: int
    chosen_step: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Chosen FLOPs / unpruned FLOPs."""
        return self.flops_found / self.flops_full


def split_halves(data: Any, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Two disjoint halves of a map-style dataset (or ``(X, Y)`` pair), by a seeded permutation."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        data = torch.utils.data.TensorDataset(*data)
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"TAS splits the training data in two halves: give a Dataset, got {type(data).__name__}")
    n = len(data)
    if n < 2:
        raise ValueError(f"TAS needs at least 2 training samples to split, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(data, order[: n // 2]), Subset(data, order[n // 2:])


def search(
    model: nn.Module,
    example_inputs: Tensor,
    train_data: Any,
    budget: float,
    *,
    epochs: float = 10,
    batch_size: int = 64,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    arch_lr: float = 1e-3,
    arch_weight_decay: float = 1e-3,
    flop_weight: float = FLOP_WEIGHT,
    tolerance: float = FLOP_TOLERANCE,
    tau: tuple[float, float] = (5.0, 0.1),
    ratios: Sequence[float] = WIDTH_RATIOS,
    seed: int = 0,
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search the width and depth of ``model`` for ``budget`` x its FLOPs (Dong & Yang 2019).

    Args:
        model: a zoo CIFAR ResNet (not modified); its weights initialise the searchable network.
        example_inputs: (N, C, H, W) inputs at the resolution the FLOPs are counted at.
        train_data: Dataset or ``(X, Y)`` pair, split into two seeded halves: weights train on the first
            (SGD, ``lr``, cosine schedule, Nesterov momentum, ``weight_decay``), the architecture logits on
            the second (Adam, ``arch_lr``, betas (0.5, 0.999), ``arch_weight_decay``), alternating per step.
        budget: target FLOPs as a fraction of the unpruned model's, in (0, 1].
        epochs: passes over the weights' half.
        flop_weight, tolerance: the FLOP loss weight (2) and tolerance (fraction of the unpruned FLOPs, 5%).
        tau: Gumbel temperature at the first and the last step (5 -> 0.1, linear).
        seed: seeds the halves, the logits' initialisation and the trainer.

    Returns:
        :class:`SearchResult` with the network in ``"argmax"`` and eval mode. Its argmax architecture is
        the final one when that lies in the accepted band ``[budget - tolerance, budget]``; otherwise the
        logits of the last architecture step that ended in the band are restored (the FLOP loss only pulls
        the architecture back after it has left the band, so the very last step may sit just outside it).
        When no step reached the band, the final architecture is kept.
    """
    if not 0.0 < budget <= 1.0:
        raise PlanError(f"FLOPs budget must be a fraction in (0, 1], got {budget}")
    net = TASResNet(model, example_inputs, ratios=ratios, seed=seed)
    full = net.full_flops
    target, tol = budget * full, tolerance * full
    if net.min_flops() > target:
        raise PlanError(
            f"a FLOPs budget of {budget:.1%} is out of reach: the smallest architecture in the search space "
            f"(width ratio {min(ratios)}, one block per stage) has {net.min_flops() / full:.1%}"
        )
    weights_half, arch_half = split_halves(train_data, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, nesterov=True,
                         weight_decay=weight_decay, schedule="cosine", seed=seed, progress=progress,
                         max_steps=max_steps, device=device)
    arch = Stage("arch", net.arch_parameters(), data=arch_half, optimizer="adam", lr=arch_lr, betas=(0.5, 0.999),
                 weight_decay=arch_weight_decay)
    band = FlopLossHook(net, target, tol, weight=flop_weight)
    net.mode = "search"
    result = train(net, weights_half, config, hooks=[TemperatureHook(net, *tau), band],
                   params=net.weight_parameters(), stages=[arch])
    net.mode = "argmax"
    net.eval()
    last = net.argmax_flops()
    chosen = band.feasible_step if band.restore_feasible() else result.steps - 1
    return SearchResult(network=net, budget=budget, tolerance=tolerance, flops_full=full, flops_target=target,
                        flops_found=net.argmax_flops(), flops_last=last, chosen_step=chosen, history=result.history)


def derive_plan(network: TASResNet, example_inputs: Tensor, *, meta: dict[str, Any] | None = None) -> Plan:
    """The argmax architecture of ``network`` as a plan for the unpruned model (or ``network.export()``).

    Each width choice keeps the first ``C_i`` channels of its dependency group; blocks past each stage's
    depth are ``removed_blocks``. Groups are named as in the model after removal
    (:func:`sparsekern.depth.channel_graph`). ``meta`` records the method, the architecture and its FLOPs.
    """
    removed = network.removed_blocks()
    cg = channel_graph(network.export(), removed, example_inputs)
    channels: dict[str, GroupKeep] = {}
    for w, c in zip(network.widths, network.argmax_widths()):
        if w.name.count(".") and w.name.rsplit(".", 1)[0] in removed:
            continue  # inner conv of a removed block
        groups = cg.group_of(w.layer)
        if len(groups) != 1 or cg.groups[groups[0]].size != w.channels:
            raise PlanError(f"TAS width choice {w.name!r}: layer {w.layer!r} is not the producer of one "
                            f"{w.channels}-channel group in the model (groups {groups})")
        name = groups[0]
        if name in channels:
            raise PlanError(f"TAS width choices {w.name!r} and another one map to the same group {name!r}")
        if c < w.channels:
            spec = cg.groups[name]
            channels[name] = GroupKeep(spec.size, tuple(range(c)), spec.members)
    info = {"method": "tas", "inputs": cg.input_spec, **network.architecture(),
            "flops_ratio": network.argmax_flops() / network.full_flops}
    plan = Plan(channels=channels, removed_blocks=removed, meta={**info, **(meta or {})})
    cg.check_plan(plan)
    return plan


def prune_to_budget(
    model: nn.Module,
    x: Tensor,
    train_data: Any,
    budget: float,
    *,
    seed: int = 0,
    epochs: float = 10,
    progress: bool = False,
    **search_options: Any,
) -> tuple[Plan, nn.Module]:
    """TAS search for ``budget`` x the FLOPs of ``model``; returns (plan, model to compile it against).

    The model returned is :meth:`TASResNet.export` (the unpruned architecture with the search's weights
    and the argmax candidates' BNs), so ``sk.compile(model_out, plan, x)`` is the network the search
    chose; TAS then trains it from scratch with distillation (:func:`train_pruned`). ``search_options``
    go to :func:`search`.
    """
    result = search(model, x, train_data, budget, epochs=epochs, seed=seed, progress=progress, **search_options)
    meta = {"budget": budget, "tolerance": result.tolerance, "search_epochs": epochs}
    return derive_plan(result.network, x, meta=meta), result.network.export()


# ----------------------------------------------------------------------------- training the pruned network
def reinitialise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh weights in place: every layer's own reset, then the zoo's conv/BN initialisation (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in model.modules():
            if m is not model and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        init_weights(model)
    return model


def train_pruned(
    pruned: nn.Module,
    teacher: nn.Module,
    train_data: Any,
    *,
    epochs: float = 10,
    lr: float = 0.1,
    batch_size: int = 64,
    weight_decay: float = 5e-4,
    alpha: float = DISTILL_ALPHA,
    temperature: float = DISTILL_TEMPERATURE,
    from_scratch: bool = True,
    seed: int = 0,
    eval_data: Any = None,
    hooks: Sequence[Any] = (),
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> TrainResult:
    """Train the pruned network (in place) with distillation from the unpruned ``teacher`` (TAS).

    Objective ``(1 - alpha) CE + alpha T^2 KL(softmax(teacher / T) || softmax(pruned / T))`` with TAS's
    ``alpha = 0.9, T = 4``, through :func:`sparsekern.train.train` (``teacher=``; the teacher stays in eval
    mode). ``from_scratch`` reinitialises ``pruned`` first, as the paper does; SGD with Nesterov momentum and
    a cosine schedule. ``hooks`` go to the trainer.
    """
    if from_scratch:
        reinitialise(pruned, seed)
    config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, nesterov=True,
                         weight_decay=weight_decay, schedule="cosine", seed=seed, progress=progress,
                         max_steps=max_steps, device=device)
    return train(pruned, train_data, config, hooks=hooks, teacher=teacher, distill_alpha=alpha,
                 distill_temperature=temperature, eval_data=eval_data)


@register_method("tas")
class TAS(Method):
    """TAS: :func:`prune_to_budget` (architecture search); its own arm is ``KD`` (:func:`train_pruned`), which
    the protocol adds to its three."""

    order = 60
    summary = "searched widths and depths, trained with distillation (Dong & Yang, NeurIPS 2019)"
    arms = ("KD",)
    protocol_arms = ("KD",)
    searches = True
    robustness = False

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        return Pruned(*prune_to_budget(model, ctx.example_inputs, ctx.train_data, budget, seed=ctx.seed,
                                       epochs=ctx.search_epochs, progress=ctx.progress))
