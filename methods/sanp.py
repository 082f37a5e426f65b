"""Self-Adaptive Network Pruning (SANP; Chen et al., "Self-Adaptive Network Pruning", ICONIP 2019):
per-sample dynamic channel gating, trained jointly with the network against a cost budget.

**Saliency-and-Pruning Module** (:class:`SaliencyPruningModule`, SPM). One per gated conv. From the conv's
input x (B, C_in, H, W): global average pool -> FC (C_in -> h, ``h = max(min_hidden, C_in // reduction)``,
reduction 16, min 16) -> ReLU -> FC (h -> ceil(C_out / G)): one saliency logit per group of ``G``
consecutive output channels (``granularity`` G in {1, 4, 8, 16}: coarser groups are cheaper to skip
efficiently, finer ones more selective; default 1). The last FC starts with zero weights and bias
``init_logit`` (1.0), so every gate starts open and the network starts as the dense one. At inference a
channel group is kept iff its logit is > 0.

**Binarisation while training** (``binarize=``; default ``"ste"``):

* ``"ste"`` (default): straight-through estimator. The forward uses the hard decision
  ``m = 1[logit > 0]``, exactly the inference decision, so the training forward, the cost loss and the
  deployed model see the same masks; the backward uses the gradient of ``sigmoid(logit / T)`` (T = 1). A
  closed gate still receives the task gradient (``dL/dm = sum dL/dy * y_dense``), so it can reopen.
* ``"gumbel"``: Gumbel-sigmoid straight-through (Jang et al. 2017; Maddison et al. 2017): logistic noise
  ``n = log u - log(1 - u)`` is added, the forward uses ``1[logit + n > 0]`` and the backward the gradient
  of ``sigmoid((logit + n) / T)``, with the temperature T annealed from ``temperature[0]`` to
  ``temperature[1]`` (exponentially over the run, default 1 -> 0.1) by :class:`SANPHook`.

``"ste"`` is the default: the noise of ``"gumbel"`` makes the training masks differ from the deterministic
inference masks, so a budget met during training can be missed at inference (docs/methods.md records the
runs that decided it).

**Cost** (:func:`sparsekern.dynamic.conv_sample_flops`). A gated layer l costs sample n
``2 k^2 H_l W_l |active inputs of n| |active outputs of n|`` FLOPs (multiply-add = 2), plus its SPM's
``2 (C_in h + h ceil(C_out/G))``; inputs are active when the gated layer that produced them kept them, so
consecutive gated layers save quadratically. Layers outside the gated ones (stem, shortcuts, classifier)
cost their dense FLOPs. ``ratio_n = cost_n / full`` with ``full`` the dense network's FLOPs per sample.
:func:`sparsekern.cost.flops` reports the same per-sample cost (``per_sample``) for the SANP form, its
masked reference and its compiled form.

**Loss** (:class:`SANPHook`): ``CE + lambda * (mean_n ratio_n - target)^2`` over each batch, the squared form
(a hinge would let the cost fall below the budget for free; the squared form holds it at the budget from both
sides, and the classification loss keeps it just above: a larger ``lambda`` narrows that gap); ``lambda = 8``.
The target falls linearly from 1 to the budget over the first ``warmup`` (60%) of the run, so gates close
once the features mean something. The SPMs train with the backbone's learning rate and a weight decay of
1e-2: a logit far below 0 gets almost no gradient back through the surrogate, and without the decay (and the
warm-up) whole layers were seen to close for good early in short runs.

**Architectures** (:func:`to_sanp`). ResNets (:class:`~sparsekern.models.BasicBlock`,
:class:`~sparsekern.models.Bottleneck`): only the block-internal channels are gated (a basic block's conv1
outputs; a bottleneck's conv1 and conv2 outputs), so the residual stream and its adds stay dense; the next
conv of the block reads only the active channels (a basic block whose conv1 closes entirely for a sample is
skipped for it). VGG: every conv of ``features`` is gated and the next conv reads only its active channels
(max-pools pass the mask on). The gated convs become :class:`SANPConv2d` (a
:class:`sparsekern.dynamic.MaskedConv2d` holding conv, BN, ReLU and SPM), at the conv's qualified name; the
blocks pass the masks explicitly, ``y, m = conv1(x); z = conv2(y, m)``.

**Plan** (:func:`to_plan`, alias :func:`prune`). SANP decides at run time, so the plan records which layers
are gated, their granularity, their SPM architecture and which gated layer feeds which
(:mod:`sparsekern.dynamic`); the SPM weights live in the SANP-form model. ``sk.compile(sanp_model, plan)``
turns it into channel-skipping layers; ``sk.save`` / ``sk.load`` work for zoo models (the SANP form is
rebuilt by :func:`build_sanp` from the recorded architecture; other models need ``arch=`` for ``sk.save``).

**End to end** (:func:`run`; ``sparsekern prune --method sanp`` calls it through :meth:`SANP.run_images`): the
dense zoo model trained, its SANP form trained at the budget, the plan calibrated on the training images
(:func:`sparsekern.dynamic.calibrate`: channels never on, always on, switching) and compiled to a static
model over the channels that are not never on, guarded by the per-sample one (:mod:`sparsekern.hybrid`),
checked against ``sk.masked`` on the test set and timed against the dense model; the
compiled model saves with ``sk.save`` and ``sk.load`` rebuilds it through :func:`build_sanp`.

Measured on the embedded digits (12x12, tiny VGG 16-32-64-64, 10 epochs, seed 0; tests/methods/test_sanp.py):
dense 98.3%, SANP 97.8% at an average cost of 50.2% of the dense FLOPs (48% to 59% per image).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn

from sparsekern.compiler import compile as sk_compile
from sparsekern.cost import eval_flops
from sparsekern.dynamic import MaskedConv2d, conv_sample_flops, expand_groups, gate_flops, mask_source
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.models import BasicBlock, Bottleneck, VGG
from sparsekern.plan import DynamicLayer, Plan
from sparsekern.train import Hook, TrainConfig, TrainResult, TrainState, train
from sparsekern.utils import as_tuple, input_spec

__all__ = [
    "SANP",
    "BINARIZERS",
    "CostReference",
    "GRANULARITIES",
    "SANPBasicBlock",
    "SANPBottleneck",
    "SANPConv2d",
    "SANPFeatures",
    "SANPHook",
    "SANPRun",
    "SaliencyPruningModule",
    "binarize",
    "build_sanp",
    "cost_ratio",
    "cost_reference",
    "gated_layers",
    "prune",
    "run",
    "to_plan",
    "to_sanp",
    "train_sanp",
]

BINARIZERS = ("ste", "gumbel")
#: Granularities the method is meant for (any positive int works).
GRANULARITIES = (1, 4, 8, 16)


# ----------------------------------------------------------------------------- SPM
class SaliencyPruningModule(nn.Module):
    """SPM: ``x (B, C_in, H, W) -> mean over H, W -> fc1 -> ReLU -> fc2 -> logits (B, ceil(C_out / G))``.

    Args:
        in_channels, out_channels: the gated conv's channel counts.
        granularity: output channels per logit G.
        reduction, min_hidden: hidden width ``max(min_hidden, in_channels // reduction)``.
        init_logit: initial logit of every group (fc2 has zero weights and this bias): > 0 starts open.
    """

    def __init__(self, in_channels: int, out_channels: int, granularity: int = 1, *, reduction: int = 16,
                 min_hidden: int = 16, init_logit: float = 1.0) -> None:
        super().__init__()
        if granularity < 1 or reduction < 1 or min_hidden < 1:
            raise ValueError(f"SPM: granularity, reduction and min_hidden must be >= 1, got {granularity}, "
                             f"{reduction}, {min_hidden}")
        self.in_channels, self.out_channels, self.granularity = in_channels, out_channels, granularity
        self.hidden = max(min_hidden, in_channels // reduction)
        self.fc1 = nn.Linear(in_channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, math.ceil(out_channels / granularity))
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, float(init_logit))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))

    def sk_slice_inputs(self, index: torch.Tensor) -> "SaliencyPruningModule":
        """A copy reading only the input channels ``index`` (1-D int64): the logits this module gives when the
        other channels are zero (the pooling is per channel, so their fc1 columns contribute nothing)."""
        sliced = copy.deepcopy(self)
        fc1 = nn.Linear(len(index), self.hidden, device=self.fc1.weight.device, dtype=self.fc1.weight.dtype)
        with torch.no_grad():
            fc1.weight.copy_(self.fc1.weight.index_select(1, index.to(self.fc1.weight.device)))
            fc1.bias.copy_(self.fc1.bias)
        sliced.fc1, sliced.in_channels = fc1, len(index)
        return sliced

    def sk_pooled_mlp(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(w1, b1, w2, b2)``: this module computes ``w2 relu(w1 mean_hw(x) + b1) + b2`` (what
        :class:`sparsekern.hybrid.GateGuard` runs as one operator call)."""
        return self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias

    def spec(self) -> dict[str, Any]:
        """The architecture as JSON (recorded in plans)."""
        return {"kind": "spm", "pool": "avg", "in_channels": self.in_channels, "hidden": self.hidden,
                "logits": self.fc2.out_features, "activation": "relu", "granularity": self.granularity}


def binarize(logits: torch.Tensor, mode: str = "ste", temperature: float = 1.0) -> torch.Tensor:
    """Straight-through binary gates from logits (see the module docstring).

    Args:
        logits: (B, n) gate logits.
        mode: ``"ste"`` (forward ``1[logit > 0]``) or ``"gumbel"`` (forward ``1[logit + n > 0]``, n logistic).
        temperature: T of the surrogate ``sigmoid((logit [+ n]) / T)`` whose gradient the backward uses.

    Returns:
        (B, n) float tensor of exact 0/1 values whose gradient is the surrogate's.
    """
    if mode not in BINARIZERS:
        raise ValueError(f"binarize mode must be one of {BINARIZERS}, got {mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mode == "gumbel":
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        logits = logits + (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(logits / temperature)
    hard = (logits > 0).to(logits.dtype)
    return hard + (soft - soft.detach())  # exactly 0/1 forward, the surrogate's gradient


class _Stash:
    """Holds the last training forward's differentiable cost; not copied by ``copy.deepcopy`` (a tensor
    inside an autograd graph cannot be), not in the state dict."""

    def __init__(self) -> None:
        self.flops: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> "_Stash":
        return _Stash()


class SANPConv2d(MaskedConv2d):
    """A gated (or consumer) conv in SANP's trainable form: conv -> BN -> ReLU -> times the gates.

    In eval mode it is exactly its :class:`~sparsekern.dynamic.MaskedConv2d` reference (hard decision
    ``logit > 0``). In train mode the gates come from :func:`binarize` (with this layer's ``binarize`` mode
    and ``temperature``), and the per-sample cost of the call, ``2 k^2 H W |in| |out| + SPM`` as a
    differentiable (B,) tensor, is kept for :class:`SANPHook` (:attr:`sample_flops`).
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None, *, relu: bool = False,
                 gate: nn.Module | None = None, granularity: int | None = None, binarize: str = "ste",
                 temperature: float = 1.0) -> None:
        super().__init__(conv, bn, relu=relu, gate=gate, granularity=granularity)
        if binarize not in BINARIZERS:
            raise ValueError(f"binarize must be one of {BINARIZERS}, got {binarize!r}")
        self.binarize = binarize
        self.temperature = float(temperature)
        self._stash = _Stash()

    @property
    def sample_flops(self) -> torch.Tensor | None:
        """(B,) FLOPs of each sample of the last forward (differentiable through the gates in train mode)."""
        return self._stash.flops

    def clear(self) -> None:
        """Drop the kept cost (and the autograd graph it holds)."""
        self._stash.flops = None

    def out_mask(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().out_mask(x)
        g = binarize(self.logits(x), self.binarize, self.temperature)
        return expand_groups(g, self.granularity, self.out_channels)

    def forward(self, x: torch.Tensor, in_mask: torch.Tensor | None = None) -> Any:
        out = super().forward(x, in_mask)
        y, m = out if self.gate is not None else (out, None)
        b = x.shape[0]

        def count(mask: torch.Tensor | None, c: int) -> torch.Tensor:
            if mask is None:
                return torch.full((b,), float(c), device=x.device)
            return mask.to(x.dtype).sum(1)

        k = self.conv.kernel_size[0] * self.conv.kernel_size[1]
        self._stash.flops = (conv_sample_flops(k, y.shape[-2] * y.shape[-1], count(in_mask, self.in_channels),
                                               count(m, self.out_channels)) + gate_flops(self.gate))
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, binarize={self.binarize!r}, temperature={self.temperature:g}"


# ----------------------------------------------------------------------------- SANP form
@dataclass(frozen=True)
class _Options:
    granularity: int
    reduction: int
    min_hidden: int
    init_logit: float
    binarize: str
    temperature: float

    def unit(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None, relu: bool, gated: bool) -> SANPConv2d:
        gate = None
        if gated:
            gate = SaliencyPruningModule(conv.in_channels, conv.out_channels, self.granularity,
                                         reduction=self.reduction, min_hidden=self.min_hidden,
                                         init_logit=self.init_logit)
        return SANPConv2d(conv, bn, relu=relu, gate=gate, granularity=self.granularity if gated else None,
                          binarize=self.binarize, temperature=self.temperature)


class SANPBasicBlock(nn.Module):
    """A :class:`~sparsekern.models.BasicBlock` with its internal channels gated: ``conv1`` (+ bn1, ReLU) is
    gated, ``conv2`` (+ bn2) reads only conv1's active channels; the shortcut and the add stay dense.
    Same module names (``conv1``, ``conv2``, ``downsample``, ``relu``)."""

    def __init__(self, block: BasicBlock, opts: _Options) -> None:
        super().__init__()
        self.conv1 = opts.unit(block.conv1, block.bn1, relu=True, gated=True)
        self.conv2 = opts.unit(block.conv2, block.bn2, relu=False, gated=False)
        self.relu = block.relu
        self.downsample = block.downsample
        self.stride = block.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        out = self.conv2(a[0], a[1])
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SANPBottleneck(nn.Module):
    """A :class:`~sparsekern.models.Bottleneck` with ``conv1`` and ``conv2`` gated (conv2 reads conv1's active
    channels: the quadratic saving) and ``conv3`` reading conv2's; the expansion, shortcut and add stay
    dense."""

    def __init__(self, block: Bottleneck, opts: _Options) -> None:
        super().__init__()
        self.conv1 = opts.unit(block.conv1, block.bn1, relu=True, gated=True)
        self.conv2 = opts.unit(block.conv2, block.bn2, relu=True, gated=True)
        self.conv3 = opts.unit(block.conv3, block.bn3, relu=False, gated=False)
        self.relu = block.relu
        self.downsample = block.downsample
        self.stride = block.stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.conv1(x)
        b = self.conv2(a[0], a[1])
        out = self.conv3(b[0], b[1])
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SANPFeatures(nn.Module):
    """VGG ``features`` with every conv (+ BN + ReLU) gated; each conv reads the previous one's active channels
    (max- and average-pools pass the mask on). Children keep their indices in the original ``Sequential``:
    ``features.0`` is the first gated conv, ``features.3`` a max-pool, ... (the BN and ReLU indices are
    absorbed into the gated conv)."""

    def __init__(self, features: nn.Sequential, opts: _Options) -> None:
        super().__init__()
        items = list(features.named_children())
        self.order: list[str] = []
        i = 0
        while i < len(items):
            name, m = items[i]
            if isinstance(m, nn.Conv2d):
                nxt = [mod for _, mod in items[i + 1 : i + 3]]
                bn = nxt[0] if nxt and isinstance(nxt[0], nn.BatchNorm2d) else None
                rest = nxt[1:] if bn is not None else nxt
                relu = bool(rest) and isinstance(rest[0], nn.ReLU)
                self.add_module(name, opts.unit(m, bn, relu=relu, gated=True))
                i += 1 + (bn is not None) + relu
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                self.add_module(name, m)
                i += 1
            else:
                raise ValueError(f"to_sanp: VGG features.{name} is a {type(m).__name__}; SANP gates conv-BN-ReLU "
                                 "stacks separated by pools")
            self.order.append(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        for name in self.order:
            m = getattr(self, name)
            if isinstance(m, MaskedConv2d):
                out = m(x, mask)
                x, mask = out[0], out[1]
            else:
                x = m(x)
        return x


def to_sanp(model: nn.Module, *, granularity: int = 1, reduction: int = 16, min_hidden: int = 16,
            init_logit: float | None = None, binarize: str = "ste", temperature: float = 1.0) -> nn.Module:
    """The SANP form of a zoo model: a copy whose gated convs are :class:`SANPConv2d` with an SPM each.

    Args:
        model: a ResNet (CIFAR or ImageNet: basic or bottleneck blocks) or a VGG from
            :mod:`sparsekern.models` (not modified).
        granularity: output channels per gate G (1, 4, 8 or 16 usually).
        reduction, min_hidden: SPM hidden width ``max(min_hidden, C_in // reduction)``.
        init_logit: initial gate logit (> 0: gates start open); default 1.0 for ``"ste"`` (open, and where the
            surrogate still has a useful slope) and 3.0 for ``"gumbel"`` (open with probability 0.95).
        binarize, temperature: training-time binarisation (see the module docstring).

    Returns:
        The SANP-form model, trainable with :func:`train_sanp`; if ``model`` came from
        :func:`sparsekern.models.build`, its ``sk_arch`` points to :func:`build_sanp` so that ``sk.save`` /
        ``sk.load`` rebuild it.

    Raises:
        ValueError: the model has no block SANP knows, or is already in SANP form.
    """
    if granularity < 1:
        raise ValueError(f"granularity must be >= 1, got {granularity}")
    if binarize not in BINARIZERS:
        raise ValueError(f"binarize must be one of {BINARIZERS}, got {binarize!r}")
    if any(isinstance(m, MaskedConv2d) for m in model.modules()):
        raise ValueError("to_sanp: the model already has gated layers")
    if init_logit is None:
        init_logit = 3.0 if binarize == "gumbel" else 1.0
    opts = _Options(int(granularity), int(reduction), int(min_hidden), float(init_logit), binarize, float(temperature))
    out = copy.deepcopy(model)
    replaced = 0
    for name, m in list(out.named_modules()):
        if isinstance(m, BasicBlock):
            out.set_submodule(name, SANPBasicBlock(m, opts))
        elif isinstance(m, Bottleneck):
            out.set_submodule(name, SANPBottleneck(m, opts))
        elif isinstance(m, VGG):
            m.features = SANPFeatures(m.features, opts)
        else:
            continue
        replaced += 1
    if not replaced:
        raise ValueError(f"to_sanp: {type(model).__name__} has no ResNet BasicBlock/Bottleneck and is not a VGG; SANP "
                         "knows those (sparsekern.models)")
    arch = getattr(model, "sk_arch", None)
    if isinstance(arch, Mapping) and "name" in arch:
        out.sk_arch = {"factory": "sparsekern.methods.sanp:build_sanp",
                       "kwargs": {"base": dict(arch), **{k: getattr(opts, k) for k in opts.__dataclass_fields__}}}
    elif hasattr(out, "sk_arch"):
        del out.sk_arch
    return out


def build_sanp(base: Mapping[str, Any], **options: Any) -> nn.Module:
    """``to_sanp(sparsekern.models.build(**base), **options)``: the architecture factory recorded in a SANP
    model's ``sk_arch`` (used by ``sk.load``)."""
    from sparsekern.models import build

    return to_sanp(build(**base), **options)


def gated_layers(model: nn.Module) -> dict[str, MaskedConv2d]:
    """Qualified name -> gated or consumer layer of a SANP-form model, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedConv2d)}


# ----------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class CostReference:
    """FLOPs per sample (multiply-add = 2) against which the cost ratio is taken.

    Attributes:
        full: the dense network (all channels, no SPMs).
        fixed: everything outside the gated layers (stem, shortcuts, classifier), which no gate changes.
        min_ratio: the lowest reachable ratio, ``(fixed + all SPMs) / full`` (every gate closed).
    """

    full: float
    fixed: float
    min_ratio: float



def cost_reference(model: nn.Module, example_inputs: Any) -> CostReference:
    """:class:`CostReference` of a SANP-form model, from one eval-mode :func:`sparsekern.cost.flops` pass."""
    inputs = as_tuple(example_inputs)
    units = gated_layers(model)
    if not units:
        raise ValueError("cost_reference: the model has no gated layers; convert it with to_sanp first")
    rep = eval_flops(model, inputs)
    b = rep.batch or 1

    def under(prefix: str) -> int:
        return sum(lc.flops for n, lc in rep.layers.items() if n == prefix or n.startswith(prefix + "."))

    gates = sum(under(f"{n}.gate") for n in units)
    in_units = sum(under(n) for n in units)
    full, fixed = (rep.total - gates) / b, (rep.total - in_units) / b
    return CostReference(full=full, fixed=fixed, min_ratio=(fixed + gates / b) / full)


def cost_ratio(model: nn.Module, example_inputs: Any, *, full: float | None = None) -> torch.Tensor:
    """Cost of each sample relative to the dense network, from :func:`sparsekern.cost.flops`'s
    ``per_sample`` (eval mode, hard gates): (B,) float64.

    Args:
        model: a SANP-form model, its masked reference, or its compiled form.
        example_inputs: a batch (B, C, H, W) or a tuple of inputs.
        full: dense FLOPs per sample; default :func:`cost_reference` of ``model`` (a SANP-form or masked
            model; pass it for a compiled one).
    """
    inputs = as_tuple(example_inputs)
    rep = eval_flops(model, inputs)
    if rep.per_sample is None:
        raise ValueError("cost_ratio: the model has no per-sample (gated) layers")
    if full is None:
        full = cost_reference(model, inputs).full
    return rep.per_sample.tensor().double() / full


class SANPHook(Hook):
    """Cost objective and temperature schedule of SANP for :func:`sparsekern.train.train`.

    Adds ``weight * (mean_n ratio_n - target)^2`` to the main stage's loss, where ``ratio_n`` is sample n's
    cost (the gated layers' differentiable :attr:`SANPConv2d.sample_flops` plus the fixed layers) over the
    dense network's (:class:`CostReference`, computed from the first batch), and the target is ``budget``
    (after the warm-up, see :meth:`target`). Logs ``cost`` (the batch's mean ratio) and ``temperature``.
    Before every step, sets each gated layer's temperature to ``t0 * (t1 / t0) ** progress`` for
    ``temperature=(t0, t1)``.

    Args:
        budget: target mean cost ratio in (0, 1], e.g. 0.5.
        weight: lambda.
        temperature: (start, end) of the surrogate temperature.
        warmup: fraction of the run over which the target falls linearly from 1 to ``budget``.
    """

    def __init__(self, budget: float, weight: float = 8.0, *, temperature: tuple[float, float] = (1.0, 1.0),
                 warmup: float = 0.0) -> None:
        if not 0.0 <= warmup <= 1.0:
            raise ValueError(f"warmup must be a fraction of the run in [0, 1], got {warmup}")
        self.warmup = float(warmup)
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget must be a cost fraction in (0, 1], got {budget}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        t0, t1 = (float(t) for t in temperature)
        if not (t0 > 0 and t1 > 0):
            raise ValueError(f"temperatures must be > 0, got {temperature}")
        self.budget, self.weight, self.temperature = float(budget), float(weight), (t0, t1)
        self.reference: CostReference | None = None
        self._units: dict[str, MaskedConv2d] = {}

    def on_train_start(self, state: TrainState) -> None:
        self._units = gated_layers(state.model)
        if not any(isinstance(u, SANPConv2d) for u in self._units.values()):
            raise ValueError("SANPHook: the model has no SANPConv2d layers; convert it with to_sanp first")

    def current_temperature(self, progress: float) -> float:
        t0, t1 = self.temperature
        return t0 * (t1 / t0) ** min(max(progress, 0.0), 1.0)

    def target(self, progress: float) -> float:
        """The cost target at ``progress``: 1 -> ``budget`` linearly over the warm-up, then ``budget``."""
        if self.warmup <= 0.0 or progress >= self.warmup:
            return self.budget
        return 1.0 - (1.0 - self.budget) * progress / self.warmup

    def on_step_start(self, state: TrainState) -> None:
        t = self.current_temperature(state.progress)
        for u in self._units.values():
            if isinstance(u, SANPConv2d):
                u.temperature = t

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> torch.Tensor | None:
        if state.stage != "main":
            return None
        costs = []
        for name, u in self._units.items():
            if u.sample_flops is None:
                raise RuntimeError(f"SANPHook: gated layer {name!r} did not run in this forward")
            costs.append(u.sample_flops)
            u.clear()
        if self.reference is None:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            self.reference = cost_reference(state.model, x[:2])
            if self.reference.min_ratio > self.budget:
                raise ValueError(f"SANPHook: budget {self.budget} is below the lowest reachable cost ratio "
                                 f"{self.reference.min_ratio:.3f} (every gate closed: ungated layers and SPMs)")
        ratio = (torch.stack(costs).sum(0) + self.reference.fixed) / self.reference.full
        mean = ratio.mean()
        state.metrics["cost"] = float(mean.detach())
        state.metrics["temperature"] = self.current_temperature(state.progress)
        return self.weight * (mean - self.target(state.progress)) ** 2

    def on_train_end(self, state: TrainState) -> None:
        for u in self._units.values():
            if isinstance(u, SANPConv2d):
                u.clear()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.reference is None else {"reference": [self.reference.full, self.reference.fixed,
                                                                self.reference.min_ratio]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "reference" in state:
            self.reference = CostReference(*(float(v) for v in state["reference"]))


def train_sanp(model: nn.Module, train_data: Any, config: TrainConfig | None = None, *, budget: float = 0.5,
               weight: float = 8.0, temperature: tuple[float, float] | None = None, warmup: float = 0.6,
               gate_lr: float | None = None, gate_weight_decay: float = 1e-2, hooks: Sequence[Any] = (),
               **train_kwargs: Any) -> TrainResult:
    """Joint training of backbone and SPMs: :func:`sparsekern.train.train` with a :class:`SANPHook`.

    Args:
        model: a SANP-form model (:func:`to_sanp`), trained in place.
        train_data, config, train_kwargs: as for :func:`sparsekern.train.train` (``eval_data``, ...).
        budget, weight, warmup: the cost objective (:class:`SANPHook`): the target falls from 1 to ``budget``
            over the first ``warmup`` of the run, so the gates close once the features mean something.
        temperature: (start, end); default (1, 1) for ``"ste"`` and (1, 0.1) when any layer uses ``"gumbel"``.
        gate_lr, gate_weight_decay: optimizer settings of the SPM parameters (default lr: ``config.lr``;
            decay 1e-2). A gate's logit that runs far below 0 gets almost no gradient back through the
            straight-through surrogate, so a slower, decayed gate keeps the logits where decisions can still
            change (without it, whole layers were seen to close for good early in short runs).
        hooks: further hooks, called after SANP's.

    Returns:
        The trainer's result (``history`` has ``train_cost``). ``model.sk_sanp`` records budget, weight and
        binarisation, which :func:`to_plan` copies into the plan's meta.
    """
    config = config or TrainConfig()
    units = [u for u in gated_layers(model).values() if isinstance(u, SANPConv2d)]
    if not units:
        raise ValueError("train_sanp: the model has no SANPConv2d layers; convert it with to_sanp first")
    modes = sorted({u.binarize for u in units})
    if temperature is None:
        temperature = (1.0, 0.1) if "gumbel" in modes else (1.0, 1.0)
    hook = SANPHook(budget, weight, temperature=temperature, warmup=warmup)
    if "params" not in train_kwargs:
        gate_params = {id(p) for u in units if u.gate is not None for p in u.gate.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        train_kwargs["params"] = [
            {"params": [p for p in params if id(p) not in gate_params]},
            {"params": [p for p in params if id(p) in gate_params],
             "lr": config.lr if gate_lr is None else float(gate_lr), "weight_decay": float(gate_weight_decay)},
        ]
    result = train(model, train_data, config, hooks=[hook, *hooks], **train_kwargs)
    model.sk_sanp = {"budget": float(budget), "weight": float(weight), "warmup": float(warmup), "binarize": modes,
                     "temperature": list(temperature)}
    return result


# ----------------------------------------------------------------------------- plan
def to_plan(model: nn.Module, example_inputs: Any, *, budget: float | None = None) -> Plan:
    """The plan of a SANP-form model: its gated layers (:mod:`sparsekern.dynamic` format) and meta.

    Args:
        model: a SANP-form model (:func:`to_sanp`, trained or not).
        example_inputs: a batch to trace with (recorded as the plan's input shapes) on which the cost
            ratio is measured (``meta["cost_ratio"]``: mean, min and max over the batch, eval mode).
        budget: recorded in the meta (default: the budget :func:`train_sanp` used, if any).

    Returns:
        A :class:`~sparsekern.plan.Plan` with only a ``dynamic`` part: layer -> a
        :class:`~sparsekern.plan.DynamicLayer` with every field set (``gate``: the SPM's :meth:`spec`).
    """
    from sparsekern.graph import symbolic_trace

    inputs = as_tuple(example_inputs)
    units = gated_layers(model)
    if not units:
        raise ValueError("to_plan: the model has no gated layers; convert it with to_sanp first")
    gm = symbolic_trace(model)
    sources = {str(n.target): mask_source(n) for n in gm.graph.nodes
               if n.op == "call_module" and str(n.target) in units}
    dynamic: dict[str, DynamicLayer] = {}
    for name, u in units.items():
        if name not in sources:
            raise ValueError(f"to_plan: gated layer {name!r} is not called in the forward")
        dynamic[name] = DynamicLayer(
            granularity=u.granularity,
            in_from=sources[name],
            relu=u.relu,
            in_channels=u.in_channels,
            out_channels=u.out_channels,
            kernel_size=tuple(u.conv.kernel_size),
            stride=tuple(u.conv.stride),
            gate=u.gate.spec() if isinstance(u.gate, SaliencyPruningModule) else None,
        )
    ratio = cost_ratio(model, inputs)
    trained = dict(getattr(model, "sk_sanp", {}) or {})
    meta: dict[str, Any] = {"method": "sanp", "inputs": input_spec(inputs),
                            "cost_ratio": {"mean": float(ratio.mean()), "min": float(ratio.min()),
                                           "max": float(ratio.max())}, **trained}
    if budget is not None:
        meta["budget"] = float(budget)
    return Plan(dynamic=dynamic, meta=meta)


#: SANP prunes at run time; its "pruning" step is writing down the gated layers.
prune = to_plan


@register_method("sanp")
class SANP(Method):
    """SANP at a cost budget: :func:`to_sanp` (a copy of the model), :func:`train_sanp` for ``search_epochs``
    with ``budget`` as the average cost target (cosine schedule, the backbone's lr 0.1), then :func:`to_plan`.
    Returns the trained SANP-form model, which the plan compiles against."""

    kind = "dynamic"
    order = 90
    arms = ()
    searches = True
    summary = "per-sample channel gates trained jointly against a cost budget (Chen et al., ICONIP 2019)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        net = to_sanp(model)
        config = TrainConfig(epochs=ctx.search_epochs, schedule="cosine", seed=ctx.seed, progress=ctx.progress)
        train_sanp(net, ctx.train_data, config, budget=budget)
        net.eval()
        return Pruned(to_plan(net, ctx.example_inputs), net)

    def run_images(self, model_name: str, data: Any, **kwargs: Any) -> "SANPRun":
        """SANP on a zoo image model, end to end (the module's :func:`run`; what ``sparsekern prune`` runs for
        a ``"dynamic"`` method)."""
        return run(model_name, data, **kwargs)


# ----------------------------------------------------------------------------- the end-to-end run
@dataclass
class SANPRun:
    """Outcome of :func:`run`: the trained SANP-form model, its calibrated plan, the compiled model (what
    ``sparsekern prune`` saves as model.sk) and the report (JSON values; report.json)."""

    model: nn.Module
    plan: Plan
    compiled: nn.Module
    report: dict[str, Any]


def run(model_name: str, data: Any, *, budget: float = 0.5, epochs: float = 10, search_epochs: float | None = None,
        lr: float = 0.1, batch_size: int = 64, granularity: int = 1, calibrate: bool = True, seed: int = 0,
        progress: bool = False, checkpoints: Any = None, bench_repeats: int = 30, threads: int = 2,
        log: Callable[[str], None] = print) -> SANPRun:
    """SANP (Chen et al., "Self-Adaptive Network Pruning", ICONIP 2019) end to end on a zoo image model.

    Stages (each checkpointed in ``checkpoints``, a :class:`sparsekern.checkpoint.Checkpoints`, and skipped
    when resuming; every stage starts from ``torch.manual_seed(seed)``):

    1. ``full``: train the dense model ``epochs`` epochs (lr ``lr``, batch ``batch_size``);
    2. ``sanp``: its SANP form (:func:`to_sanp`, ``granularity``) trained jointly with the SPMs for
       ``search_epochs`` (default ``epochs / 2``) against the cost ``budget`` (:func:`train_sanp`).

    Then: :func:`to_plan`, the plan calibrated on the training images
    (:func:`sparsekern.dynamic.calibrate`, unless ``calibrate=False``: the hybrid compile), compiled
    (``sk.compile``) and checked against ``sk.masked`` on the whole test set; accuracies, the per-sample cost
    over the test set, and the CPU speedup of the compiled model against the dense one (``sk.bench.compare``,
    both through ``sk.optimize``'s CPU passes, plus ``script`` for a calibrated (hybrid) model, ``threads``
    threads, ``bench_repeats`` interleaved runs).
    """
    from sparsekern.checkpoint import Checkpoints
    from sparsekern.data import loader
    from sparsekern.models import build

    if not 0 < budget <= 1:
        raise ValueError(f"budget is the fraction of the dense model's FLOPs to keep, in (0, 1]; got {budget}")
    search_epochs = epochs / 2 if search_epochs is None else search_epochs
    store = checkpoints if checkpoints is not None else Checkpoints(None)
    store.check()
    test = loader(data.test, 512, shuffle=False)
    x = data.test.tensors[0][:batch_size] if hasattr(data.test, "tensors") else next(iter(test))[0][:batch_size]

    def config(n_epochs: float) -> TrainConfig:
        return TrainConfig(epochs=n_epochs, lr=lr, batch_size=batch_size, seed=seed, progress=progress)

    torch.manual_seed(seed)
    full = build(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
    full_acc = _stage(store, "full", full, seed, log, lambda: train(full, data.train, config(epochs)), test)
    net = to_sanp(full, granularity=granularity)
    log(f"[sanp] gates trained jointly for {search_epochs} epochs at a {budget:.0%} cost budget")
    sanp_acc = _stage(store, "sanp", net, seed, log,
                      lambda: train_sanp(net, data.train, config(search_epochs), budget=budget), test)
    plan = to_plan(net, x, budget=budget)
    if calibrate:
        from sparsekern.dynamic import calibrate as calibrate_plan

        plan = calibrate_plan(plan, net, data.train)
    compiled = sk_compile(net, plan, x).eval()
    report = _run_report(model_name, data, full, net, plan, compiled, test, x, threads, bench_repeats)
    report.update(budget=float(budget), epochs=float(epochs), search_epochs=float(search_epochs),
                  granularity=int(granularity), full_accuracy=full_acc, sanp_accuracy=sanp_acc)
    log(f"[sanp] {model_name}: accuracy {full_acc:.2%} dense, {report['compiled_accuracy']:.2%} compiled; cost "
        f"{report['cost_ratio']['mean']:.1%} of the dense FLOPs; measured speedup {report['measured_speedup']:.2f}x "
        f"for {report['theoretical_speedup']:.2f}x (efficiency {report['efficiency']:.2f})")
    return SANPRun(net, plan, compiled, report)


def _stage(store: Any, name: str, model: nn.Module, seed: int, log: Callable[[str], None], fit: Callable[[], Any],
           test: Any) -> float:
    """Checkpointed training stage ``name`` of :func:`run`: load ``model`` from the checkpoint when resuming,
    else ``fit()`` it and save; returns its test accuracy (``model`` is left in eval mode)."""
    from sparsekern.train import evaluate

    done = store.load(name)
    torch.manual_seed(seed)
    if done is not None:
        log(f"[sanp] {name}: resumed from {store.path(name)}")
        done.load_into(model, name).eval()
        if done.info.get("sk_sanp") is not None:
            model.sk_sanp = done.info["sk_sanp"]  # what train_sanp records (to_plan copies it into the meta)
        return float(done.info["accuracy"])
    model.train()
    fit()
    model.eval()
    accuracy = float(evaluate(model, test)["accuracy"])
    store.save(name, {"accuracy": accuracy, "sk_sanp": getattr(model, "sk_sanp", None)}, {name: model})
    return accuracy


def _run_report(model_name: str, data: Any, full: nn.Module, net: nn.Module, plan: Plan, compiled: nn.Module,
                test: Any, x: torch.Tensor, threads: int, repeats: int) -> dict[str, Any]:
    """The measured part of :func:`run`'s report (module docstring of :func:`run`)."""
    import sparsekern as sk
    from sparsekern.compiler import masked
    from sparsekern.train import evaluate

    reference = masked(net, plan, x).eval()
    error = 0.0
    with torch.no_grad():
        for xb, _ in test:
            want = reference(xb)
            error = max(error, float((compiled(xb) - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    x_test = torch.cat([xb for xb, _ in test])
    full_flops = cost_reference(net, x_test[:2]).full
    ratio = cost_ratio(net, x_test, full=full_flops)
    from sparsekern.hybrid import GuardedModel
    from sparsekern.passes import DEVICE_PASSES

    # the hybrid model's static part (and the dense baseline) traced by the script pass; the per-sample
    # model's control flow stays in Python
    passes = DEVICE_PASSES["cpu"] + (("script",) if isinstance(compiled, GuardedModel) else ())
    bench = sk.bench.compare(full.eval(), compiled, x, passes=passes, threads=threads, repeats=repeats,
                             per_layer=False)
    layers = plan.dynamic_layers()
    classes = {n: {"never_on": len(s.never_on), "always_on": len(s.always_on),
                   "switching": (s.out_channels or 0) - len(s.never_on) - len(s.always_on)}
               for n, s in layers.items() if s.never_on is not None}
    return {"method": "sanp", "model": model_name, "data": data.name,
            "compiled_accuracy": float(evaluate(compiled, test)["accuracy"]),
            "cost_ratio": {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max())},
            "flops_full": float(full_flops), "flops_mean": float(ratio.mean() * full_flops),
            "compiled_vs_masked_max_error": error, "calibration": plan.meta.get("calibration"), "classes": classes,
            "bench_batch": int(x.shape[0]), "theoretical_speedup": bench.theoretical_speedup,
            "measured_speedup": bench.measured_speedup, "efficiency": bench.efficiency, "bench_passes": list(passes),
            "plan": plan.to_dict()}
