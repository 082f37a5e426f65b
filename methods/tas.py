"""Network Pruning via Transformable Architecture Search (TAS; Dong & Yang, NeurIPS 2019).

TAS searches the *architecture* of the pruned network (channels per layer and blocks per stage) under a
FLOPs budget, then trains that architecture with knowledge distillation from the unpruned network.

Search space (docs/methods.md#tas), here for the zoo's CIFAR ResNets, as the official code
(D-X-Y/AutoDL-Projects, ``SearchShapeCifarResNet``) has it:

* **width**: one choice per conv, block outputs included: the stem ``conv1`` and every block's ``conv1``
  and ``conv2`` (a projection shortcut runs with its block's ``conv2`` choice), i.e. ``depth - 1`` choices
  (55 for ResNet-56). Candidates ``int(C * r)`` for ``r`` in 0.3, 0.4, ..., 1.0 (:func:`width_choices`).
* **depth**: candidate numbers of blocks per stage ``{1, 3, 5, ..., N}`` (``N`` added when even; all of
  ``1..N`` for ``N <= 3``; :func:`depth_choices`). A stage of depth ``d`` keeps its first ``d`` blocks.

Forward of the searchable network (:class:`TASResNet`, ``mode="search"``): every width choice samples two
candidates from its Gumbel-perturbed distribution ``softmax((log_softmax(a) + g) / tau)`` and renormalises
their weights (a softmax over the two perturbed logits). A conv runs once at full width; the first ``C_i``
channels of its output go through candidate ``i``'s own BatchNorm; the two results are aligned to the larger
count by channel-wise interpolation (adaptive average pooling over the channel axis,
:func:`channel_interpolate`) and summed with their weights. The next conv reads the first channels of its
full weight (the official zero-padding without the zeros). A residual add of tensors of different widths
pads the narrower with zero channels (:func:`add_padded`, the official ``additive_func``), so the stream
after a block carries the larger of the two widths. Depth: the outputs after each candidate number of
blocks of a stage are aligned by channel-wise interpolation and mixed with Gumbel-softmax weights.

**The residual stream.** The convs writing a stage's stream (the stem in stage 1, each block's ``conv2``
and projection shortcut) choose their widths independently, but their channels are tied by the residual
adds into one dependency group (:mod:`sparsekern.graph`), which a plan can only keep at one width. The
official code's derived network instead inserts a 1x1 projection wherever a block's input and output widths
differ (``InferCifarResNet``), a layer a plan on the unpruned model cannot add. Here the choices are
combined the way the search network's zero-padded adds combine them: the stream of stage ``s`` is kept at
``W_s = max`` of the argmax widths of the stream convs in the kept blocks (:meth:`TASResNet.stream_widths`),
the width its last tensor carries in the search; every stream conv of the derived network (``mode="argmax"``,
:meth:`TASResNet.export`, :func:`derive_plan`) runs at ``W_s`` with its candidate BatchNorm of that width.
The FLOP objective counts that derived network: a stream's expected width is ``E[max_i C_i]`` over its kept
convs' independent choices, averaged over the stage's depth distribution.

Objective of the architecture parameters: cross-entropy plus ``2 * L_flop``, with
``L_flop = -log E[F]`` when the argmax architecture's FLOPs are below ``target - tolerance``,
``+log E[F]`` when above ``target``, and 0 in between (tolerance 5% of the unpruned FLOPs).
``E[F]`` is differentiable: every conv contributes ``unit * E[C_in] * E[C_out] * P(block kept)`` with
``E[C] = sum_i softmax(a)_i C_i`` (streams: above) and ``P(block b kept) = sum_{d > b} softmax(depth
logits)_d`` (:meth:`TASResNet.expected_flops`, per sample, in FLOPs with a multiply-add counted as 2 like
:func:`sparsekern.flops`). Bilevel optimisation from random initialisation (the official code builds the
search network from scratch; ``init="model"`` starts from the given model's weights instead): the weights by
SGD on one half of the training data, the architecture logits by Adam (lr 1e-3, betas (0.5, 0.999), weight
decay 1e-3) on the other half, in alternating steps (the trainer's :class:`~sparsekern.train.Stage`). The
Gumbel temperature follows the official cosine, updated once per epoch, from 10 to 0.1
(:func:`cosine_temperature`, :class:`TemperatureHook`; ``tau_schedule="linear"`` anneals per step).

Output: the argmax architecture as a :class:`~sparsekern.plan.Plan` (:func:`derive_plan`): channel
keep-sets keeping the first channels of each group, and ``removed_blocks`` for the blocks past each stage's
depth, which :func:`sparsekern.compile` replaces by their shortcut (:mod:`sparsekern.depth`). Channel
groups are named as in the model *after* those blocks are removed. Then the pruned network is trained from
scratch with distillation from the unpruned one, ``(1 - a) CE + a T^2 KL`` with ``a = 0.9, T = 4``
(:func:`train_pruned`, through the trainer's ``teacher=``), for the base schedule's epochs (the official
code trains the derived network with the same schedule as the unpruned one; the Rethinking runner's ``KD``
arm uses the full model's epochs).

Departures from the official code: the residual streams as above; the search returns the last architecture
whose FLOPs lay in the accepted band ``[target - tolerance, target]`` when the final step left it
(:func:`search`), where the official code keeps the last epoch's (or the best-validated in-band) genotype.
"""
from __future__ import annotations

import copy
import math
import warnings
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
    "TAU",
    "add_padded",
    "channel_interpolate",
    "cosine_temperature",
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
#: Gumbel temperature at the start and the end of the search (the official code's 10 -> 0.1)
TAU: tuple[float, float] = (10.0, 0.1)
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
    """One searched width: the output channels of one conv (the paper's search space: one choice per conv).

    Attributes:
        name: the conv, ``"conv1"`` (the stem), ``"layerS.B.conv1"`` or ``"layerS.B.conv2"``; a block's
            projection shortcut (``downsample``) shares its ``conv2``'s choice, as in the official code.
        layer: the conv of the unpruned model whose output channels the choice sets (= ``name``).
        channels: the conv's output channels C.
        choices: candidate channel counts (:func:`width_choices`).
        stream: index of the stage whose residual stream the conv writes (the stem and every ``conv2``), else
            None (a block's inner ``conv1``).
    """

    name: str
    layer: str
    channels: int
    choices: tuple[int, ...]
    stream: int | None = None


@dataclass(frozen=True)
class _Cost:
    """FLOPs of one conv/linear per sample: ``unit * C_in * C_out`` (times the keep probability of its block).

    ``in_var`` / ``out_var`` index the width values of :meth:`TASResNet._flops`: a width choice (``< n``) or a
    stage's combined stream width (``n + s``); None for a fixed count (``in_fixed`` / ``out_fixed``).
    """

    layer: str
    unit: int
    in_var: int | None
    in_fixed: int
    out_var: int | None
    out_fixed: int
    block: tuple[int, int] | None


def add_padded(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` over the channel axis of (N, C, H, W) tensors of different widths, the narrower one padded with
    zero channels at the end (the official code's residual add in the search network)."""
    if a.shape[1] < b.shape[1]:
        a, b = b, a
    if a.shape[1] == b.shape[1]:
        return a + b
    return torch.cat([a[:, : b.shape[1]] + b, a[:, b.shape[1]:]], 1)


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
    """A searchable BasicBlock: ``relu(conv2(relu(conv1(x))) (+) shortcut(x))``, ``(+)`` :func:`add_padded`.

    The projection shortcut runs with ``conv2``'s width choice (the official code's rule).
    """

    def __init__(self, block: nn.Module, inner: WidthChoice, outer: WidthChoice) -> None:
        super().__init__()
        self.conv1 = SearchConv(block.conv1, block.bn1, inner.choices)
        self.conv2 = SearchConv(block.conv2, block.bn2, outer.choices)
        ds = block.downsample
        self.downsample = SearchConv(ds[0], ds[1], outer.choices) if ds is not None else None

    def forward(self, x: Tensor, inner: tuple, outer: tuple) -> Tensor:
        h = self.conv2(F.relu(self.conv1(x, *inner)), *outer)
        shortcut = x if self.downsample is None else self.downsample(x, *outer)
        return F.relu(add_padded(h, shortcut))


def _expected_max(logits: Sequence[Tensor], values: Tensor) -> Tensor:
    """E[max_i C_i] for independent C_i ~ softmax(logits[i]) over the same sorted ``values``."""
    cdf = torch.stack([a.softmax(-1).cumsum(-1) for a in logits]).prod(0)
    pmf = torch.cat([cdf[:1], cdf[1:] - cdf[:-1]])
    return (pmf * values).sum()


class TASResNet(nn.Module):
    """The searchable network of TAS for a zoo CIFAR ResNet (see the module docstring).

    Args:
        model: a :class:`~sparsekern.models.resnet.CifarResNet` (``resnet20/56/110``); its architecture (and,
            with ``init="model"``, its weights and BN statistics) define the network. Not modified.
        example_inputs: (N, C, H, W) inputs fixing the spatial sizes that FLOPs are counted at.
        ratios: width ratios (default 0.3 .. 1.0).
        init: ``"random"`` (the official code: fresh weights from the zoo's initialisation, seeded by
            ``seed``) or ``"model"`` (every candidate starts from ``model``'s weights and BN parameters).
        init_std: architecture logits start as N(0, init_std) (seeded by ``seed``).

    Attributes:
        mode: ``"search"`` (sampled widths and depth mixture) or ``"argmax"`` (the derived architecture:
            each conv's most likely width, each stage's residual stream at its combined width, the first
            ``d`` blocks of each stage).
        tau: Gumbel-softmax temperature (annealed by :class:`TemperatureHook`).
        widths: the :class:`WidthChoice` s, one per conv, in the order of ``width_logits``.
        depths: depth choices per stage, in the order of ``depth_logits``.
        stream_vars: per stage, the width choices writing its residual stream, in block order (the stem first
            in stage 1); ``inner_var`` / ``outer_var``: per stage and block, its conv1 / conv2 choice.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Tensor,
        *,
        ratios: Sequence[float] = WIDTH_RATIOS,
        init: str = "random",
        init_std: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(model, CifarResNet):
            raise PlanError(
                f"TAS's searchable network is built for the zoo's CIFAR ResNets (resnet20/56/110, "
                f"sparsekern.models.build), got {type(model).__name__}"
            )
        if init not in ("random", "model"):
            raise ValueError(f"init must be 'random' or 'model', got {init!r}")
        x = example_inputs[0] if isinstance(example_inputs, tuple) else example_inputs
        self.mode = "search"
        self.tau = 10.0
        self._arch = {"depth": model.depth, "num_classes": model.fc.out_features,
                      "in_channels": model.conv1.in_channels, "sk_arch": getattr(model, "sk_arch", None)}
        stages = [model.layer1, model.layer2, model.layer3]
        self._build_choices(model, stages, ratios)
        self.depths = [depth_choices(len(stage)) for stage in stages]
        self.blocks_per_stage = [len(stage) for stage in stages]

        self.conv1 = SearchConv(model.conv1, model.bn1, self.widths[0].choices)
        self.layers = nn.ModuleList(
            nn.ModuleList(_SearchBlock(block, self.widths[self.inner_var[s][b]], self.widths[self.outer_var[s][b]])
                          for b, block in enumerate(stage))
            for s, stage in enumerate(stages)
        )
        self.fc = copy.deepcopy(model.fc)
        if init == "random":
            _fresh_weights(self, seed)
        g = torch.Generator().manual_seed(seed)
        self.width_logits = nn.ParameterList(
            nn.Parameter(torch.randn(len(w.choices), generator=g) * init_std) for w in self.widths)
        self.depth_logits = nn.ParameterList(
            nn.Parameter(torch.randn(len(d), generator=g) * init_std) for d in self.depths)
        self._costs = self._cost_table(model, x)
        self.full_flops = self.flops_of([w.channels for w in self.widths], self.blocks_per_stage)

    def _build_choices(self, model: CifarResNet, stages: Sequence[nn.Sequential], ratios: Sequence[float]) -> None:
        """One :class:`WidthChoice` per conv: the stem, then each block's conv1 and conv2."""
        c = model.conv1.out_channels
        widths = [WidthChoice("conv1", "conv1", c, width_choices(c, ratios), stream=0)]
        self.inner_var: list[list[int]] = []
        self.outer_var: list[list[int]] = []
        self.stream_vars: list[list[int]] = [[0]] + [[] for _ in stages[1:]]
        for s, stage in enumerate(stages):
            inner, outer = [], []
            for b, block in enumerate(stage):
                for conv, ids, stream in (("conv1", inner, None), ("conv2", outer, s)):
                    c = getattr(block, conv).out_channels
                    ids.append(len(widths))
                    widths.append(WidthChoice(f"layer{s + 1}.{b}.{conv}", f"layer{s + 1}.{b}.{conv}", c,
                                              width_choices(c, ratios), stream=stream))
                self.stream_vars[s].append(outer[-1])
            self.inner_var.append(inner)
            self.outer_var.append(outer)
        self.widths = widths

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

        probe = copy.deepcopy(model).eval()
        hooks = [m.register_forward_hook(record(n)) for n, m in probe.named_modules() if isinstance(m, nn.Conv2d)]
        with torch.no_grad():
            probe(x[:1])
        for h in hooks:
            h.remove()

        def unit(name: str) -> int:
            conv = model.get_submodule(name)
            kh, kw = conv.kernel_size
            return 2 * kh * kw * shapes[name][2] * shapes[name][3]

        n = len(self.widths)
        costs = [_Cost("conv1", unit("conv1"), None, model.conv1.in_channels, n, 0, None)]
        for s in range(len(self.depths)):
            for b in range(self.blocks_per_stage[s]):
                p = f"layer{s + 1}.{b}"
                stream_in = n + (s - 1 if b == 0 and s > 0 else s)
                inner = self.inner_var[s][b]
                costs.append(_Cost(f"{p}.conv1", unit(f"{p}.conv1"), stream_in, 0, inner, 0, (s, b)))
                costs.append(_Cost(f"{p}.conv2", unit(f"{p}.conv2"), inner, 0, n + s, 0, (s, b)))
                if f"{p}.downsample.0" in shapes:
                    costs.append(_Cost(f"{p}.downsample.0", unit(f"{p}.downsample.0"), stream_in, 0, n + s, 0, (s, b)))
        costs.append(_Cost("fc", 2, n + len(self.depths) - 1, 0, None, model.fc.out_features, None))
        return costs

    def _flops(self, values: Sequence[Any], keep: Sequence[Sequence[Any]]) -> Any:
        total = 0.0
        for c in self._costs:
            cin = values[c.in_var] if c.in_var is not None else c.in_fixed
            cout = values[c.out_var] if c.out_var is not None else c.out_fixed
            term = c.unit * cin * cout
            total = total + (term if c.block is None else term * keep[c.block[0]][c.block[1]])
        return total

    def _stream_members(self, s: int, depth: int) -> list[int]:
        """The width choices on stage ``s``'s stream that a depth of ``depth`` blocks keeps."""
        kept = self.outer_var[s][:depth]
        return [0] + kept if s == 0 else kept

    def stream_widths(self, widths: Sequence[int], depths: Sequence[int]) -> list[int]:
        """Each stage's residual-stream width for these per-conv widths and depths: the largest width chosen by
        a conv that writes the stream in a kept block (the zero-padded adds carry that many channels)."""
        return [max(int(widths[i]) for i in self._stream_members(s, d)) for s, d in enumerate(depths)]

    def expected_flops(self) -> Tensor:
        """E[FLOPs] per sample of the current architecture distribution (differentiable in the logits).

        ``E[C]`` per inner conv from ``softmax(width_logits)``; a stage's stream width is
        ``E[max_i C_i]`` over the stream convs of the kept blocks (independent choices), averaged over the
        stage's depth distribution; block ``b`` of a stage is kept with probability ``P(depth > b)``.
        """
        values = [(a.softmax(-1) * torch.tensor(w.choices, dtype=a.dtype, device=a.device)).sum()
                  for a, w in zip(self.width_logits, self.widths)]
        keep = []
        for s, (a, choices) in enumerate(zip(self.depth_logits, self.depths)):
            p = a.softmax(-1)
            d = torch.tensor(choices, device=a.device)
            keep.append([p[d > b].sum() for b in range(max(choices))])
            cands = torch.tensor(self.widths[self.stream_vars[s][0]].choices, dtype=a.dtype, device=a.device)
            values.append(sum(p[j] * _expected_max([self.width_logits[i] for i in self._stream_members(s, dj)], cands)
                              for j, dj in enumerate(choices)))
        return self._flops(values, keep)

    def flops_of(self, widths: Sequence[int], depths: Sequence[int]) -> int:
        """FLOPs per sample of the derived architecture with these channel counts (per width choice) and depths
        (the streams at :meth:`stream_widths`)."""
        keep = [[1 if b < d else 0 for b in range(n)] for d, n in zip(depths, self.blocks_per_stage)]
        values = [int(w) for w in widths] + self.stream_widths(widths, depths)
        return int(self._flops(values, keep))

    def argmax_widths(self) -> list[int]:
        """Each conv's most likely width."""
        return [w.choices[int(a.argmax())] for a, w in zip(self.width_logits, self.widths)]

    def argmax_depths(self) -> list[int]:
        return [d[int(a.argmax())] for a, d in zip(self.depth_logits, self.depths)]

    def argmax_streams(self) -> list[int]:
        """Each stage's combined stream width in the argmax architecture (:meth:`stream_widths`)."""
        return self.stream_widths(self.argmax_widths(), self.argmax_depths())

    def argmax_flops(self) -> int:
        """FLOPs per sample of the argmax architecture (equal to ``sk.flops`` of its compiled plan / N)."""
        return self.flops_of(self.argmax_widths(), self.argmax_depths())

    def min_flops(self) -> int:
        """FLOPs per sample of the smallest architecture in the search space."""
        return self.flops_of([w.choices[0] for w in self.widths], [d[0] for d in self.depths])

    def _argmax_indices(self) -> list[int]:
        """Candidate index per width choice in the derived architecture (stream convs at their stage's width)."""
        index = [int(a.argmax()) for a in self.width_logits]
        for s, width in enumerate(self.argmax_streams()):
            for i in self.stream_vars[s]:
                index[i] = self.widths[i].choices.index(width)
        return index

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes) of the sampled (``mode="search"``) or argmax architecture."""
        search = self.mode == "search"
        if not search and self.mode != "argmax":
            raise ValueError(f"mode must be 'search' or 'argmax', got {self.mode!r}")
        if search:
            ws = [_sample_two(a, self.tau) for a in self.width_logits]
        else:
            ws = [([i], None) for i in self._argmax_indices()]
        x = F.relu(self.conv1(x, *ws[0]))
        for s, blocks in enumerate(self.layers):
            choices = self.depths[s]
            if not search:
                for b in range(choices[int(self.depth_logits[s].argmax())]):
                    x = blocks[b](x, ws[self.inner_var[s][b]], ws[self.outer_var[s][b]])
                continue
            ends = []
            for b, block in enumerate(blocks):
                x = block(x, ws[self.inner_var[s][b]], ws[self.outer_var[s][b]])
                if b + 1 in choices:
                    ends.append(x)
            if len(ends) > 1:
                p = _gumbel_softmax(self.depth_logits[s], self.tau)
                width = max(e.shape[1] for e in ends)
                x = sum(pj * channel_interpolate(e, width) for pj, e in zip(p, ends))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return F.linear(x, self.fc.weight[:, : x.shape[1]], self.fc.bias)

    # ------------------------------------------------------------------ results
    def architecture(self) -> dict[str, Any]:
        """The argmax architecture: channels per conv, per stage's stream, and blocks per stage (JSON-ready)."""
        return {
            "widths": {w.name: c for w, c in zip(self.widths, self.argmax_widths())},
            "streams": {f"layer{s + 1}": c for s, c in enumerate(self.argmax_streams())},
            "depths": {f"layer{s + 1}": d for s, d in enumerate(self.argmax_depths())},
        }

    def removed_blocks(self) -> tuple[str, ...]:
        """Blocks past each stage's argmax depth."""
        return tuple(f"layer{s + 1}.{b}" for s, d in enumerate(self.argmax_depths())
                     for b in range(d, self.blocks_per_stage[s]))

    def export(self) -> CifarResNet:
        """An unpruned CifarResNet carrying the search's weights, with each BN's first channels taken from
        the derived architecture's candidate BN: compiling :func:`derive_plan`'s plan on it gives the argmax
        network."""
        arch = self._arch
        out = CifarResNet(arch["depth"], num_classes=arch["num_classes"], in_channels=arch["in_channels"])
        if arch["sk_arch"] is not None:
            out.sk_arch = copy.deepcopy(arch["sk_arch"])
        picks = self._argmax_indices()

        def put(conv: nn.Conv2d, bn: nn.BatchNorm2d, sconv: SearchConv, var: int) -> None:
            with torch.no_grad():
                conv.weight.copy_(sconv.conv.weight)
                for k in (len(sconv.bns) - 1, picks[var]):  # widest first, then the derived candidate on top
                    src = sconv.bns[k]
                    c = src.num_features
                    for name in ("weight", "bias", "running_mean", "running_var"):
                        getattr(bn, name)[:c].copy_(getattr(src, name))

        put(out.conv1, out.bn1, self.conv1, 0)
        for s, stage in enumerate([out.layer1, out.layer2, out.layer3]):
            for b, block in enumerate(stage):
                sb = self.layers[s][b]
                put(block.conv1, block.bn1, sb.conv1, self.inner_var[s][b])
                put(block.conv2, block.bn2, sb.conv2, self.outer_var[s][b])
                if block.downsample is not None:
                    put(block.downsample[0], block.downsample[1], sb.downsample, self.outer_var[s][b])
        out.fc.load_state_dict(self.fc.state_dict())
        return out.to(self.fc.weight.device).train(self.training)


def _fresh_weights(network: nn.Module, seed: int) -> None:
    """Random weights for every layer of ``network`` (the zoo's initialisation, seeded), BN statistics reset."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in network.modules():
            if m is not network and callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
        init_weights(network)


# ----------------------------------------------------------------------------- search objective
def flop_loss(expected: Tensor, current: float, target: float, tolerance: float) -> Tensor | None:
    """TAS's FLOP loss: ``-log E[F]`` if ``current < target - tolerance``, ``+log E[F]`` if
    ``current > target``, else None (no term). ``expected`` is E[FLOPs]; the log is taken in MFLOPs."""
    if current < target - tolerance:
        return -torch.log(expected / _MFLOPS)
    if current > target:
        return torch.log(expected / _MFLOPS)
    return None


def cosine_temperature(epoch: int, epochs: int, start: float = TAU[0], end: float = TAU[1]) -> float:
    """The official code's Gumbel temperature in epoch ``epoch`` of ``epochs`` (0-based):
    ``end + (start - end) * (1 + cos(pi * epoch / epochs)) / 2``, so ``start`` in the first epoch, falling on
    a half cosine towards ``end`` (reached only after the last epoch)."""
    if epochs < 1 or not 0 <= epoch <= epochs:
        raise ValueError(f"need 0 <= epoch <= epochs and epochs >= 1, got epoch={epoch}, epochs={epochs}")
    return end + (start - end) * (1.0 + math.cos(math.pi * epoch / epochs)) / 2.0


class TemperatureHook(Hook):
    """Anneals ``network.tau`` from ``start`` to ``end``.

    ``schedule="cosine"`` (default, the official code): once per epoch, :func:`cosine_temperature` of the
    epoch among the run's ``ceil(total_steps / steps_per_epoch)`` epochs (a run of one epoch or less keeps
    ``start``, as the official code's first epoch does). ``schedule="linear"``: per step,
    linearly from ``start`` at the first step to ``end`` at the last.
    """

    def __init__(self, network: TASResNet, start: float = TAU[0], end: float = TAU[1], *,
                 schedule: str = "cosine") -> None:
        if not start >= end > 0:
            raise ValueError(f"temperatures must satisfy start >= end > 0, got {start}, {end}")
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        self.network, self.start, self.end, self.schedule = network, start, end, schedule

    def on_epoch_start(self, state: TrainState) -> None:
        if self.schedule == "cosine":
            per_epoch = state.steps_per_epoch or state.total_steps
            epochs = max(1, math.ceil(state.total_steps / max(1, per_epoch)))
            self.network.tau = cosine_temperature(min(state.epoch, epochs), epochs, self.start, self.end)

    def on_step_start(self, state: TrainState) -> None:
        if self.schedule == "linear":
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
    tau: tuple[float, float] = TAU,
    tau_schedule: str = "cosine",
    init: str = "random",
    ratios: Sequence[float] = WIDTH_RATIOS,
    seed: int = 0,
    max_steps: int | None = None,
    device: str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Search the width and depth of ``model`` for ``budget`` x its FLOPs (Dong & Yang 2019).

    Args:
        model: a zoo CIFAR ResNet (not modified): its architecture is searched. With ``init="random"`` (the
            official code) the searchable network starts from fresh random weights seeded by ``seed``,
            whatever ``model``'s weights; ``init="model"`` starts every candidate from ``model``'s weights.
        example_inputs: (N, C, H, W) inputs at the resolution the FLOPs are counted at.
        train_data: Dataset or ``(X, Y)`` pair, split into two seeded halves: weights train on the first
            (SGD, ``lr``, cosine schedule, Nesterov momentum, ``weight_decay``), the architecture logits on
            the second (Adam, ``arch_lr``, betas (0.5, 0.999), ``arch_weight_decay``), alternating per step.
        budget: target FLOPs as a fraction of the unpruned model's, in (0, 1].
        epochs: passes over the weights' half.
        flop_weight, tolerance: the FLOP loss weight (2) and tolerance (fraction of the unpruned FLOPs, 5%).
        tau, tau_schedule: Gumbel temperature from ``tau[0]`` to ``tau[1]`` (10 -> 0.1), on a cosine updated
            once per epoch (``"cosine"``, the official code) or linearly per step (``"linear"``);
            :class:`TemperatureHook`.
        seed: seeds the halves, the weights' and the logits' initialisation and the trainer.

    Returns:
        :class:`SearchResult` with the network in ``"argmax"`` and eval mode. Its argmax architecture is
        the final one when that lies in the accepted band ``[budget - tolerance, budget]``; otherwise the
        logits of the last architecture step that ended in the band are restored (the FLOP loss only pulls
        the architecture back after it has left the band, so the very last step may sit just outside it).
        When no step reached the band, the final architecture is kept and a warning says by how much it
        misses the budget (a longer search moves it further).
    """
    if not 0.0 < budget <= 1.0:
        raise PlanError(f"FLOPs budget must be a fraction in (0, 1], got {budget}")
    net = TASResNet(model, example_inputs, ratios=ratios, init=init, seed=seed)
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
    result = train(net, weights_half, config, hooks=[TemperatureHook(net, *tau, schedule=tau_schedule), band],
                   params=net.weight_parameters(), stages=[arch])
    net.mode = "argmax"
    net.eval()
    last = net.argmax_flops()
    chosen = band.feasible_step if band.restore_feasible() else result.steps - 1
    if not band.in_band(net.argmax_flops()):
        warnings.warn(f"TAS: no architecture step reached the FLOPs band [{budget - tolerance:.0%}, {budget:.0%}] "
                      f"in {epochs} search epochs; the result has {net.argmax_flops() / full:.1%} of the FLOPs. "
                      "Search longer (epochs) or raise the FLOP loss weight (flop_weight).", stacklevel=2)
    return SearchResult(network=net, budget=budget, tolerance=tolerance, flops_full=full, flops_target=target,
                        flops_found=net.argmax_flops(), flops_last=last, chosen_step=chosen, history=result.history)


def derive_plan(network: TASResNet, example_inputs: Tensor, *, meta: dict[str, Any] | None = None) -> Plan:
    """The argmax architecture of ``network`` as a plan for the unpruned model (or ``network.export()``).

    The inner conv of each kept block keeps the first ``C_i`` channels of its group (its argmax width); the
    residual stream of stage ``s``, one dependency group, keeps its first ``W_s`` channels, ``W_s`` the
    largest argmax width among the convs writing it in kept blocks (:meth:`TASResNet.stream_widths`); blocks
    past each stage's depth are ``removed_blocks``. Groups are named as in the model after removal
    (:func:`sparsekern.depth.channel_graph`). ``meta`` records the method, the architecture and its FLOPs.
    """
    removed = network.removed_blocks()
    cg = channel_graph(network.export(), removed, example_inputs)
    channels: dict[str, GroupKeep] = {}
    widths = network.argmax_widths()
    kept = [(w, widths[i]) for i, w in enumerate(network.widths)
            if w.stream is None and w.name.rsplit(".", 1)[0] not in removed]
    for s, width in enumerate(network.argmax_streams()):
        kept.append((network.widths[network.stream_vars[s][0]], width))
    for w, c in kept:
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
    #: options a run may set (``rethinking.run(method_options=...)``, a recipe's ``method_options``): the
    #: search's batch size, weight lr, architecture lr and temperature range, passed to :func:`search`.
    prune_options = {"batch_size": 64, "lr": 0.1, "arch_lr": 1e-3, "tau": TAU}

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        options = {k: ctx.options[k] for k in self.prune_options if k in ctx.options}
        if "tau" in options:
            options["tau"] = tuple(options["tau"])
        return Pruned(*prune_to_budget(model, ctx.example_inputs, ctx.train_data, budget, seed=ctx.seed,
                                       epochs=ctx.search_epochs, progress=ctx.progress, **options))
