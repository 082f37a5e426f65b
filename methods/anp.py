"""Adversarial Neural Pruning with Vulnerability Suppression (ANP-VS; Madaan, Shin, Hwang: "Adversarial Neural
Pruning with Latent Vulnerability Suppression", ICML 2020).

A trained network gets a **beta-Bernoulli dropout mask** per channel (Lee, Kim, Yun, Hwang: "Adaptive Network
Sparsification with Dependent Variational Beta-Bernoulli Dropout", 2018; :class:`BetaBernoulliMask`):

* prior ``pi_c ~ Beta(alpha, 1)``, ``alpha = 1e-4``; mask ``z_c ~ Bernoulli(pi_c)``;
* variational posterior ``q(pi_c) = Kumaraswamy(a_c, b_c)``, ``a = softplus(a_raw)``, ``b = softplus(b_raw)``
  (``a_raw`` starts at 2.0 on conv outputs and -1.0 on FC inputs, ``b_raw`` at 0.5413 so ``b ~ 1``);
* training: ``pi = (1 - u^(1/b))^(1/a)`` with ``u ~ U(0, 1)`` (one draw per channel and forward, as in the
  authors' code) and a relaxed Bernoulli (concrete) mask per example,
  ``z = sigmoid((logit(pi) + logit(u')) / 0.1)``;
* test: ``z = E[pi] = b B(1 + 1/a, b)``, set to 0 where ``E[pi] <= 1e-3`` (those channels are pruned).

Masks sit on every conv output before its BatchNorm and on the input of every linear layer
(:func:`mask_sites`), applied by forward hooks of :class:`ANPNet`, which wraps the network without changing it.

Training (:func:`train_anp`, through the one trainer :func:`sparsekern.train.train`) uses an L-inf PGD
adversary with random start, clipped to the data range (:func:`data_range_pgd`; CIFAR: eps 0.03, step 0.007
in [0, 1] pixel units, 10 steps for training, 40 for evaluation). As in the authors' code, the attack of a
training step runs on the network in evaluation mode: the masks are their expectations ``E[pi]`` (no
sampling) and BatchNorm uses its running statistics; the training forwards that follow sample masks and
use batch statistics again (``eval_attack=True``; ``False`` attacks the training-mode network). Two
parameter groups:

* masks (Adam, lr 1e-2): ``CE(x_adv) + beta * KL / N``;
* weights (Adam, lr 1e-3, L2 1e-4): ``(CE(x) + w CE(x_adv)) / (1 + w) + beta * KL / N + lambda * VS``,

with ``w = 2``, ``beta = 2``, ``lambda = 1e-4``, ``N`` the training-set size, ``KL`` the sum over channels of
``KL(Kumaraswamy(a, b) || Beta(alpha, 1))`` (:func:`kumaraswamy_beta_kl`) and ``VS`` the **vulnerability
suppression** loss (:class:`VulnerabilityHook`): the mean over the network's post-ReLU features ``f_l`` of
``mean |f_l(x) - f_l(x_adv)|``. Both learning rates drop 10x at 50% and 80% of the run (the authors' code).

Pruning (:func:`prune`). A channel of a dependency group is pruned when it is zero in every tensor of the
group at test time: every producer's mask is 0 there (conv outputs), or every consumer ignores it (FC-input
masks). :func:`fold` turns the test-time network into a plain one: the kept channels' ``E[pi]`` scales the
conv filters (and biases) or the FC columns; a conv channel whose mask is 0 also gets ``gamma = beta = 0``
in the BatchNorm right after it. The paper's own evaluation keeps that BN shift ``beta`` of a masked channel
(a constant feature map); here a pruned channel is absent, as the FLOP counts of the paper assume and as
:func:`sparsekern.masked` defines it, and :class:`ANPNet` in eval mode computes exactly that network, so
``ANPNet.eval() == fold(net) == sk.masked(fold(net), plan) == sk.compile(fold(net), plan)``.

A FLOPs budget (:func:`prune` with ``flops_budget``). ANP has none of its own: its sparsity follows from
``beta`` and the training length. Given a budget, the channels that ANP keeps are ranked by ``E[pi]``
(globally) and the smallest are pruned as well, with the binary search of
:func:`sparsekern.methods.scratch.keep_count_for_budget`, until the FLOPs meet the budget; if ANP alone is
already under it, the budget does not bind (recorded in the plan's meta).

Network: the paper's VGG-16 has a two-FC classifier (512-512 FC + BN), so that both FC inputs carry a mask;
:func:`build_model` builds zoo models with the paper's options (:data:`PAPER_MODEL_KWARGS`:
``classifier="two_fc"`` for VGG-16).

Baseline (:func:`adversarial_training`, :func:`magnitude_plan`): plain adversarial training of the same
network with the same adversary (attacking in evaluation mode too) and ``w``, pruned afterwards to the
**same channel count in every group** as the ANP plan (hence the same FLOPs), keeping the filters of largest
L1 norm.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from sparsekern.compiler import group_importance
from sparsekern.cost import eval_flops
from sparsekern.graph import ChannelGraph, Layout, trace_channels
from sparsekern.methods.budget import plan_flops
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.models import build
from sparsekern.modes import eval_mode
from sparsekern.plan import GroupKeep, Plan, PlanError
from sparsekern.train import PGD, Hook, TrainConfig, TrainResult, TrainState, default_loss, evaluate, train
from sparsekern.utils import as_tuple as _as_tuple

__all__ = [
    "ANPVS",
    "ANPHook",
    "ANPNet",
    "BetaBernoulliMask",
    "MaskSite",
    "PAPER_MODEL_KWARGS",
    "VulnerabilityHook",
    "adversarial_training",
    "build_model",
    "data_range",
    "data_range_pgd",
    "feature_distortion",
    "fold",
    "kumaraswamy_beta_kl",
    "magnitude_plan",
    "mask_sites",
    "prune",
    "prune_to_budget",
    "robustness",
    "train_anp",
]

# The paper's / the authors' code's settings (CIFAR).
ALPHA = 1e-4           # Beta(alpha, 1) prior
THRESHOLD = 1e-3       # E[pi] <= threshold: pruned
TEMPERATURE = 0.1      # relaxed Bernoulli
A_INIT_CONV, A_INIT_FC, B_INIT = 2.0, -1.0, 0.5413
ADV_WEIGHT = 2.0       # w
BETA = 2.0             # KL weight
VS_WEIGHT = 1e-4       # lambda
EPS, STEP = 0.03, 0.007  # in units of the data range ([0, 1] pixels)
TRAIN_STEPS, EVAL_STEPS = 10, 40
MASK_LR, WEIGHT_LR, WEIGHT_DECAY = 1e-2, 1e-3, 1e-4
EULER_GAMMA = 0.5772156649015329
_EPS = 1e-6            # keeps uniform draws and probabilities away from 0 and 1 in float32
#: Zoo build options of the paper's networks: its VGG-16 ends in two FC layers (512-512 FC + BN), so both
#: FC inputs carry a mask (the authors' code).
PAPER_MODEL_KWARGS: dict[str, dict[str, Any]] = {"vgg16_bn": {"classifier": "two_fc"}}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Zoo model ``name`` (:func:`sparsekern.models.build`) with the paper's options of
    :data:`PAPER_MODEL_KWARGS` (VGG-16: ``classifier="two_fc"``) under ``kwargs``, which override them."""
    return build(name, **{**PAPER_MODEL_KWARGS.get(name, {}), **kwargs})


# ----------------------------------------------------------------------------- the mask
def kumaraswamy_beta_kl(a: torch.Tensor, b: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """Elementwise ``KL(Kumaraswamy(a, b) || Beta(alpha, 1))``.

    The series form of Nalisnick & Smyth ("Stick-Breaking Variational Autoencoders", ICLR 2017; the KL
    between Kumaraswamy and Beta distributions), ``(1 - alpha/a)(-gamma - psi(b) - 1/b) + log(a b) + log B(alpha, beta) - (b - 1)/b
    + (beta - 1) b sum_m B(m/a, b) / (m + a b)``, at prior ``beta = 1``: the series vanishes and
    ``log B(alpha, 1) = -log(alpha)``, which leaves ``(1 - alpha/a)(-gamma - psi(b) - 1/b) + log(a b / alpha)
    - (b - 1)/b`` (gamma: Euler's constant, psi: digamma). Shapes: ``a``, ``b`` broadcast; result likewise.
    """
    return ((1.0 - alpha / a) * (-EULER_GAMMA - torch.digamma(b) - 1.0 / b)
            + torch.log(a * b / alpha) - (b - 1.0) / b)


class BetaBernoulliMask(nn.Module):
    """Per-channel beta-Bernoulli dropout with a Kumaraswamy posterior (see the module docstring).

    Args:
        channels: C.
        a_init: initial ``a_raw`` (the paper: 2.0 on conv outputs, -1.0 on FC inputs).
        b_init: initial ``b_raw`` (0.5413: ``b = softplus(0.5413) ~ 1``).
        alpha, temperature, threshold: prior, relaxation temperature and test-time pruning threshold.

    ``keep`` (bool buffer, (C,)) removes channels by hand (FLOPs budgets); it multiplies the mask in both
    modes. ``a_raw`` is clamped to >= -10 and ``b_raw`` to [-10, 50] inside the softplus, as in the authors'
    code.
    """

    def __init__(
        self, channels: int, *, a_init: float, b_init: float = B_INIT, alpha: float = ALPHA,
        temperature: float = TEMPERATURE, threshold: float = THRESHOLD,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"a mask needs at least one channel, got {channels}")
        if not (alpha > 0 and temperature > 0 and threshold >= 0):
            raise ValueError(f"need alpha > 0, temperature > 0, threshold >= 0; got {alpha}, {temperature}, {threshold}")
        self.alpha, self.temperature, self.threshold = float(alpha), float(temperature), float(threshold)
        self.a_raw = nn.Parameter(torch.full((channels,), float(a_init)))
        self.b_raw = nn.Parameter(torch.full((channels,), float(b_init)))
        self.register_buffer("keep", torch.ones(channels, dtype=torch.bool))

    @property
    def channels(self) -> int:
        return int(self.a_raw.shape[0])

    @property
    def a(self) -> torch.Tensor:
        return F.softplus(self.a_raw.clamp_min(-10.0))

    @property
    def b(self) -> torch.Tensor:
        return F.softplus(self.b_raw.clamp(-10.0, 50.0))

    def expected_pi(self) -> torch.Tensor:
        """``E[pi] = b B(1 + 1/a, b)`` under Kumaraswamy(a, b), (C,)."""
        a, b = self.a, self.b
        return b * torch.exp(torch.lgamma(1.0 + 1.0 / a) + torch.lgamma(b) - torch.lgamma(1.0 + 1.0 / a + b))

    def test_mask(self) -> torch.Tensor:
        """``E[pi]``, zero where ``E[pi] <= threshold`` or ``keep`` is False, (C,)."""
        e = self.expected_pi()
        return torch.where((e > self.threshold) & self.keep, e, torch.zeros_like(e))

    def sample(self, n: int) -> torch.Tensor:
        """Training mask (n, C): ``pi`` drawn once per channel, a relaxed Bernoulli per example."""
        a, b = self.a, self.b
        u = torch.rand_like(a).clamp(_EPS, 1.0 - _EPS)
        inner = (-torch.expm1(torch.log(u) / b)).clamp_min(1e-12)  # 1 - u^(1/b)
        pi = torch.exp(torch.log(inner) / a).clamp(_EPS, 1.0 - _EPS)
        u2 = torch.rand(n, a.shape[0], dtype=a.dtype, device=a.device).clamp(_EPS, 1.0 - _EPS)
        logits = torch.log(pi) - torch.log1p(-pi) + torch.log(u2) - torch.log1p(-u2)
        return torch.sigmoid(logits / self.temperature) * self.keep

    def kl(self) -> torch.Tensor:
        """Sum over channels of ``KL(q(pi) || Beta(alpha, 1))`` (scalar)."""
        return kumaraswamy_beta_kl(self.a, self.b, self.alpha).sum()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, alpha={self.alpha}, temperature={self.temperature}, threshold={self.threshold}"


# ----------------------------------------------------------------------------- where the masks go
@dataclass(frozen=True)
class MaskSite:
    """One mask: on the output channels of conv ``layer`` (``kind="conv_out"``, ``norm`` the BatchNorm right
    after it, if any) or on the input features of linear ``layer`` (``kind="fc_in"``)."""

    layer: str
    kind: str
    channels: int
    norm: str | None = None


def mask_sites(model: nn.Module, example_inputs: Any, *, cg: ChannelGraph | None = None) -> list[MaskSite]:
    """A mask on every conv output (before its BN) and on every linear layer's input, in graph order."""
    cg = cg or trace_channels(model, _as_tuple(example_inputs))
    sites: list[MaskSite] = []
    seen: set[str] = set()
    for node in cg.gm.graph.nodes:
        if node.op != "call_module" or node.target in seen:
            continue
        m = cg.modules[node.target]
        if isinstance(m, nn.modules.conv._ConvNd):
            users = list(node.users)
            norm = None
            if len(users) == 1 and users[0].op == "call_module":
                nxt = cg.modules[users[0].target]
                if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.affine:
                    norm = str(users[0].target)
            sites.append(MaskSite(str(node.target), "conv_out", m.out_channels, norm))
            seen.add(node.target)
        elif isinstance(m, nn.Linear):
            sites.append(MaskSite(str(node.target), "fc_in", m.in_features))
            seen.add(node.target)
    if not sites:
        raise PlanError(f"ANP found no conv or linear layer to mask in {type(model).__name__}")
    return sites


def _shape(z: torch.Tensor, like: torch.Tensor, layer: str) -> torch.Tensor:
    """Mask (N, C) or (C,) -> broadcastable to ``like`` (N, C, *spatial) along axis 1."""
    if like.dim() < 2 or like.shape[1] != z.shape[-1]:
        raise RuntimeError(
            f"ANP mask of {layer!r} has {z.shape[-1]} channels but the tensor there has shape {tuple(like.shape)}; "
            "masks act on axis 1 of conv outputs and on the features of 2-D linear inputs"
        )
    if z.dim() == 1:
        z = z.unsqueeze(0)
    return z.reshape(z.shape + (1,) * (like.dim() - 2))


class ANPNet(nn.Module):
    """A network with ANP's beta-Bernoulli masks (see the module docstring); ``net(x) == model(x)`` with masks.

    Args:
        model: the (trained) network; it is used as is (not copied) and is never modified by the masks, which
            act through forward hooks that exist only during :meth:`forward`.
        example_inputs: a tensor or tuple to trace the model with (e.g. (1, 3, 32, 32)).
        a_init_conv, a_init_fc, b_init, alpha, temperature, threshold: see :class:`BetaBernoulliMask`.

    Train mode samples masks (per example); eval mode applies :meth:`BetaBernoulliMask.test_mask` and
    zeroes the BN output of the conv channels whose mask is 0, which makes the eval network exactly
    :func:`fold` of it.
    """

    def __init__(
        self, model: nn.Module, example_inputs: Any, *, a_init_conv: float = A_INIT_CONV,
        a_init_fc: float = A_INIT_FC, b_init: float = B_INIT, alpha: float = ALPHA,
        temperature: float = TEMPERATURE, threshold: float = THRESHOLD,
    ) -> None:
        super().__init__()
        self.model = model
        self.example_inputs = _as_tuple(example_inputs)
        self.sites = mask_sites(model, self.example_inputs)
        self.masks = nn.ModuleList([
            BetaBernoulliMask(s.channels, a_init=a_init_conv if s.kind == "conv_out" else a_init_fc,
                              b_init=b_init, alpha=alpha, temperature=temperature, threshold=threshold)
            for s in self.sites
        ])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._masked():
            return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def _masked(self) -> Iterator[None]:
        handles = []
        try:
            for site, mask in zip(self.sites, self.masks):
                module = self.model.get_submodule(site.layer)
                if site.kind == "conv_out":
                    handles.append(module.register_forward_hook(self._conv_hook(site, mask)))
                    if site.norm is not None and not self.training:
                        handles.append(self.model.get_submodule(site.norm).register_forward_hook(self._norm_hook(site, mask)))
                else:
                    handles.append(module.register_forward_pre_hook(self._fc_hook(site, mask)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _mask_for(self, mask: BetaBernoulliMask, n: int) -> torch.Tensor:
        return mask.sample(n) if self.training else mask.test_mask()

    def _conv_hook(self, site: MaskSite, mask: BetaBernoulliMask) -> Any:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out * _shape(self._mask_for(mask, out.shape[0]), out, site.layer)

        return hook

    def _norm_hook(self, site: MaskSite, mask: BetaBernoulliMask) -> Any:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            alive = (mask.test_mask() > 0).to(out.dtype)
            return out * _shape(alive, out, site.norm or site.layer)

        return hook

    def _fc_hook(self, site: MaskSite, mask: BetaBernoulliMask) -> Any:
        def hook(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            if x.dim() != 2:
                raise RuntimeError(f"ANP masks the input of linear {site.layer!r} as (N, C); got shape {tuple(x.shape)}")
            return (x * _shape(self._mask_for(mask, x.shape[0]), x, site.layer),) + tuple(args[1:])

        return hook

    # ------------------------------------------------------------------ queries
    def kl(self) -> torch.Tensor:
        """Sum of every mask's KL (scalar)."""
        return torch.stack([m.kl() for m in self.masks]).sum()

    def mask_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.masks for p in m.parameters()]

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def expected(self) -> dict[str, torch.Tensor]:
        """Site layer -> ``E[pi]`` (C,), detached."""
        return {s.layer: m.expected_pi().detach() for s, m in zip(self.sites, self.masks)}

    def active_fraction(self) -> float:
        """Fraction of mask entries above the threshold (and kept)."""
        with torch.no_grad():
            alive = sum(int((m.test_mask() > 0).sum()) for m in self.masks)
        return alive / sum(m.channels for m in self.masks)


# ----------------------------------------------------------------------------- training
def data_range(data: Any, *, max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel minimum and maximum of the inputs of ``data`` (Dataset, DataLoader or (X, Y) pair), each
    shaped (1, C, 1, ...) for broadcasting over (N, C, ...) inputs.

    For data normalised from [0, 1] pixels (:func:`sparsekern.data.digits`, CIFAR), these are the images of
    pixel values 0 and 1 whenever some pixel reaches each, so ``hi - lo`` is the scale of one pixel unit.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        xs: Any = [data[0]]
    elif hasattr(data, "tensors"):
        xs = [data.tensors[0]]
    else:
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=512)
        xs = (batch[0] for i, batch in enumerate(loader) if max_batches is None or i < max_batches)
    lo = hi = None
    for x in xs:
        dims = [d for d in range(x.dim()) if d != 1]
        bl, bh = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        lo = bl if lo is None else torch.minimum(lo, bl)
        hi = bh if hi is None else torch.maximum(hi, bh)
    if lo is None:
        raise ValueError("data_range: no data")
    return lo, hi


def data_range_pgd(
    data: Any, eps: float = EPS, step: float = STEP, steps: int = TRAIN_STEPS, *,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None, eval_mode: bool = False,
) -> PGD:
    """L-inf PGD with random start whose ``eps`` and ``step`` are fractions of the data range.

    ``PGD(eps * (hi - lo), step * (hi - lo), steps, clamp=(lo, hi), eval_mode=eval_mode)`` with
    ``(lo, hi) = bounds`` or :func:`data_range` of ``data``: for [0, 1] images normalised per channel this is
    the usual attack in pixel units (CIFAR in the paper: eps 0.03, step 0.007; 10 steps to train, 40 to
    evaluate). ``eval_mode``: attack the model in evaluation mode, its flags restored afterwards
    (:func:`sparsekern.train.pgd_attack`).
    """
    lo, hi = bounds if bounds is not None else data_range(data)
    scale = hi - lo
    return PGD(eps * scale, step * scale, int(steps), random_start=True, clamp=(lo, hi), eval_mode=eval_mode)


class VulnerabilityHook(Hook):
    """The vulnerability suppression loss ``lam * mean_l mean |f_l(x) - f_l(x_adv)|`` (Madaan et al. 2020) over
    the outputs ``f_l`` of every ``nn.ReLU``/``nn.ReLU6`` module call in the clean and the
    adversarial training forward (the trainer's phases ``"clean"`` and ``"adversarial"``).

    Args:
        lam: weight (the paper: 1e-4); 0 still records and logs ``vulnerability``.
        group: param-group name the term reaches (``"weights"`` for ANP-VS); ``None``: every group.
    """

    def __init__(self, lam: float = VS_WEIGHT, group: str | None = None) -> None:
        if lam < 0:
            raise ValueError(f"vulnerability weight must be >= 0, got {lam}")
        self.lam, self.group = float(lam), group
        self._handles: list[Any] = []
        self._features: dict[str, list[torch.Tensor]] = {}
        self._state: TrainState | None = None

    def on_train_start(self, state: TrainState) -> None:
        self._state = state
        for m in state.model.modules():
            if isinstance(m, (nn.ReLU, nn.ReLU6)):
                self._handles.append(m.register_forward_hook(self._record))
        if not self._handles:
            raise ValueError("VulnerabilityHook: the model has no nn.ReLU / nn.ReLU6 modules whose outputs it could compare")

    def _record(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        phase = self._state.phase if self._state is not None else None
        if phase in ("clean", "adversarial"):
            self._features.setdefault(phase, []).append(out)

    def on_step_start(self, state: TrainState) -> None:
        self._features.clear()

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> Any:
        clean, adv = self._features.get("clean", []), self._features.get("adversarial", [])
        self._features.clear()
        if not clean or len(clean) != len(adv):
            raise RuntimeError(
                "VulnerabilityHook needs the clean and the adversarial forward of the step; train with an "
                "adversary (train(..., adversary=PGD(...)))"
            )
        vs = torch.stack([(c - a).abs().mean() for c, a in zip(clean, adv)]).mean()
        state.metrics["vulnerability"] = float(vs.detach())
        term = self.lam * vs
        return {self.group: term} if self.group is not None else term

    def on_train_end(self, state: TrainState) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._state = None


class ANPHook(Hook):
    """ANP's mask objective: ``CE(x_adv) + beta KL / N`` to the ``"masks"`` group and ``beta KL / N`` to the
    ``"weights"`` group (whose default objective is the trainer's ``(CE + w CE_adv) / (1 + w)``)."""

    def __init__(self, net: ANPNet, n_train: int, beta: float = BETA) -> None:
        if n_train < 1 or beta < 0:
            raise ValueError(f"need n_train >= 1 and beta >= 0, got {n_train}, {beta}")
        self.net, self.n_train, self.beta = net, int(n_train), float(beta)

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> dict[str, torch.Tensor]:
        if "outputs_adv" not in state.extra:
            raise RuntimeError("ANPHook needs the adversarial forward; train with an adversary")
        y = batch[1]
        kl = self.beta * self.net.kl() / self.n_train
        state.metrics["kl"] = float(kl.detach())
        state.metrics["active"] = self.net.active_fraction()
        return {"masks": default_loss(state.extra["outputs_adv"], y) + kl, "weights": kl}


def _n_samples(data: Any) -> int:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        return int(data[0].shape[0])
    if isinstance(data, DataLoader):
        return len(data.dataset)  # type: ignore[arg-type]
    return len(data)


def _config(epochs: float, lr: float, batch_size: int, seed: int, progress: bool, weight_decay: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch_size, optimizer="adam", lr=lr, weight_decay=weight_decay,
                       schedule="step", milestones=(0.5, 0.8), gamma=0.1, seed=seed, progress=progress)


def train_anp(
    model_or_net: nn.Module,
    train_data: Any,
    example_inputs: Any = None,
    *,
    epochs: float = 10,
    adversary: Any = None,
    eps: float = EPS,
    step: float = STEP,
    steps: int = TRAIN_STEPS,
    eval_attack: bool = True,
    beta: float = BETA,
    vs_weight: float = VS_WEIGHT,
    adversarial_weight: float = ADV_WEIGHT,
    mask_lr: float = MASK_LR,
    weight_lr: float = WEIGHT_LR,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    config: TrainConfig | None = None,
    **train_kwargs: Any,
) -> tuple[ANPNet, TrainResult]:
    """Train ANP-VS masks and weights together (module docstring); ``vs_weight=0`` gives plain ANP.

    Args:
        model_or_net: a trained network (wrapped in a new :class:`ANPNet`, in place: its weights are trained)
            or an :class:`ANPNet` to continue.
        train_data: DataLoader, Dataset or (X, Y) pair; ``N`` in ``KL / N`` is its size.
        example_inputs: tensor or tuple to trace the network (needed for a plain network).
        epochs, batch_size, seed, progress: the run (Adam, lr drops 10x at 50% and 80%).
        adversary: ``adversary(model, x, y) -> x_adv``; default :func:`data_range_pgd` of ``train_data``
            with ``eps``, ``step``, ``steps`` (fractions of the data range) and ``eval_mode=eval_attack``.
        eval_attack: the default adversary attacks the network in evaluation mode, as the authors' code:
            ``E[pi]`` masks and BN running statistics; the training forwards then sample masks and use batch
            statistics (the flags are restored after the attack). ``False``: attack the training-mode network.
        beta, vs_weight, adversarial_weight: KL weight, lambda and w.
        mask_lr, weight_lr, weight_decay: the two groups' Adam settings (L2 on the weights only).
        config: a full :class:`TrainConfig` instead (its lr is the weights' lr).
        train_kwargs: further arguments of :func:`sparsekern.train.train` (``eval_data``, ``eval_adversary``,
            ``hooks``).

    Returns:
        (the :class:`ANPNet`, the trainer's result; history has ``train_kl``, ``train_active``,
        ``train_vulnerability``).
    """
    if isinstance(model_or_net, ANPNet):
        net = model_or_net
    else:
        if example_inputs is None:
            raise ValueError("train_anp: example_inputs are needed to place the masks on a plain network")
        net = ANPNet(model_or_net, example_inputs)
    device = next(net.model.parameters()).device
    net.to(device)
    adversary = adversary or data_range_pgd(train_data, eps, step, steps, eval_mode=eval_attack)
    config = config or _config(epochs, weight_lr, batch_size, seed, progress, weight_decay)
    params = [
        {"params": net.weight_parameters(), "name": "weights"},
        {"params": net.mask_parameters(), "name": "masks", "base_loss": False, "lr": mask_lr, "weight_decay": 0.0},
    ]
    hooks = [ANPHook(net, _n_samples(train_data), beta), VulnerabilityHook(vs_weight, group="weights"),
             *train_kwargs.pop("hooks", ())]
    result = train(net, train_data, config, hooks=hooks, adversary=adversary,
                   adversarial_weight=adversarial_weight, params=params, **train_kwargs)
    return net, result


def adversarial_training(
    model: nn.Module,
    train_data: Any,
    *,
    epochs: float = 10,
    adversary: Any = None,
    eps: float = EPS,
    step: float = STEP,
    steps: int = TRAIN_STEPS,
    eval_attack: bool = True,
    adversarial_weight: float = ADV_WEIGHT,
    vs_weight: float = 0.0,
    lr: float = WEIGHT_LR,
    weight_decay: float = WEIGHT_DECAY,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    config: TrainConfig | None = None,
    **train_kwargs: Any,
) -> TrainResult:
    """The baseline: plain adversarial training of ``model`` in place, ``(CE(x) + w CE(x_adv)) / (1 + w)``
    with the same adversary (attacking in evaluation mode unless ``eval_attack=False``) and optimizer as the
    weights of :func:`train_anp` (``vs_weight > 0`` adds the VS loss: "AT-VS" of the paper). Prune the
    result with :func:`magnitude_plan`."""
    adversary = adversary or data_range_pgd(train_data, eps, step, steps, eval_mode=eval_attack)
    config = config or _config(epochs, lr, batch_size, seed, progress, weight_decay)
    hooks = [VulnerabilityHook(vs_weight)] if vs_weight > 0 else []
    return train(model, train_data, config, hooks=hooks + list(train_kwargs.pop("hooks", ())), adversary=adversary,
                 adversarial_weight=adversarial_weight, **train_kwargs)


# ----------------------------------------------------------------------------- evaluation
def robustness(
    model: nn.Module,
    test_data: Any,
    eps: float = EPS,
    *,
    step: float | None = None,
    steps: int = EVAL_STEPS,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    noise: bool = False,
    batch_size: int = 256,
    max_batches: int | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """Clean and PGD accuracy of ``model`` (eval mode) under an L-inf attack of radius ``eps``.

    ``eps`` and ``step`` (default ``eps * 0.007 / 0.03``, the paper's ratio) are fractions of the data
    range (``bounds`` or :func:`data_range` of ``test_data``). ``noise=True`` adds ``noise_accuracy``: uniform
    noise in the same ball, clipped to the data range (the attack's random start without gradient steps).

    Returns:
        ``{"clean_accuracy", "pgd_accuracy"[, "noise_accuracy"], "n"}``.
    """
    bounds = bounds if bounds is not None else data_range(test_data)
    step = eps * STEP / EPS if step is None else step
    with torch.random.fork_rng(devices=[]):  # the random starts are seeded; the caller's RNG is left alone
        torch.manual_seed(seed)
        res = evaluate(model, test_data, adversary=data_range_pgd(None, eps, step, steps, bounds=bounds),
                       batch_size=batch_size, max_batches=max_batches)
        out = {"clean_accuracy": res["accuracy"], "pgd_accuracy": res["robust_accuracy"], "n": res["n"]}
        if noise:
            res = evaluate(model, test_data, adversary=data_range_pgd(None, eps, step, 0, bounds=bounds),
                           batch_size=batch_size, max_batches=max_batches)
            out["noise_accuracy"] = res["robust_accuracy"]
    return out


def feature_distortion(model: nn.Module, data: Any, adversary: Any, *, batch_size: int = 256,
                       max_batches: int | None = None) -> float:
    """The paper's vulnerability of ``model`` (eval mode): mean over ReLU outputs ``f_l`` of
    ``mean |f_l(x) - f_l(x_adv)|``, averaged over the batches of ``data``, adversarial examples from
    ``adversary(model, x, y)``."""
    feats: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, a, o: feats.append(o.detach()))
               for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    if not handles:
        raise ValueError("feature_distortion: the model has no nn.ReLU / nn.ReLU6 modules")
    loader = DataLoader(data, batch_size=batch_size) if not isinstance(data, DataLoader) else data
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        with eval_mode(model):
            for i, (x, y, *_) in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = x.to(device), y.to(device)
                x_adv = adversary(model, x, y)
                feats.clear()
                with torch.no_grad():
                    model(x)
                    clean = list(feats)
                    feats.clear()
                    model(x_adv)
                total += float(torch.stack([(c - a).abs().mean() for c, a in zip(clean, feats)]).mean()) * len(x)
                count += len(x)
    finally:
        for h in handles:
            h.remove()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- pruning
def fold(net: ANPNet) -> nn.Module:
    """A plain copy of ``net.model`` equal to ``net`` in eval mode: test-time masks folded into the weights.

    Conv sites: filter ``c`` (and its bias) scaled by the mask ``m_c``; where ``m_c = 0`` the BN right after
    the conv gets ``gamma_c = beta_c = 0``. FC-input sites: column ``j`` of the weight scaled by ``m_j``.
    """
    folded = copy.deepcopy(net.model)
    with torch.no_grad():
        for site, mask in zip(net.sites, net.masks):
            m = mask.test_mask().detach()
            layer = folded.get_submodule(site.layer)
            if site.kind == "conv_out":
                layer.weight.mul_(m.view((-1,) + (1,) * (layer.weight.dim() - 1)).to(layer.weight.dtype))
                if layer.bias is not None:
                    layer.bias.mul_(m.to(layer.bias.dtype))
                if site.norm is not None:
                    bn = folded.get_submodule(site.norm)
                    alive = (m > 0).to(bn.weight.dtype)
                    bn.weight.mul_(alive)
                    bn.bias.mul_(alive)
            else:
                layer.weight.mul_(m.view(1, -1).to(layer.weight.dtype))
    return folded


@dataclass
class _GroupSides:
    """For one dependency group: where a channel can be zeroed, as (site index, positions per group channel).

    ``producers``: conv-output sites of every producer (None when some producer has no site, or a norm in
    the group is not a site's own BN: zeros there would not stay zero). ``consumers``: FC-input sites of every
    consumer (None when some conv/linear consumer reads the group without an FC-input mask).
    """

    producers: list[tuple[int, np.ndarray]] | None
    consumers: list[tuple[int, np.ndarray]] | None


def _group_sides(cg: ChannelGraph, sites: Sequence[MaskSite]) -> dict[str, _GroupSides]:
    site_of = {(s.layer, s.kind): i for i, s in enumerate(sites)}
    site_norms = {s.norm for s in sites if s.norm is not None}
    out: dict[str, _GroupSides] = {}
    for g, cls in cg.group_classes.items():
        index = {int(r): i for i, r in enumerate(cls.tolist())}
        producers: list[tuple[int, np.ndarray]] | None = []
        for node in cg.gm.graph.nodes:
            if node.op != "call_module":
                continue
            lay = cg.layouts.get(node.name)
            if not isinstance(lay, Layout):
                continue
            pos = np.array([index.get(int(r), -1) for r in cg.roots[lay.atoms].tolist()], dtype=np.int64)
            if not (pos >= 0).any():
                continue
            m = cg.modules[node.target]
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                i = site_of.get((str(node.target), "conv_out"))
                if i is None or producers is None:
                    producers = None
                else:
                    producers.append((i, pos))
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and node.target not in site_norms:
                producers = None
        consumers: list[tuple[int, np.ndarray]] | None = []
        for layer, pos in cg.consumers(g).items():
            i = site_of.get((layer, "fc_in"))
            if i is None:
                consumers = None
                break
            consumers.append((i, pos))
        out[g] = _GroupSides(producers or None, consumers or None)
    return out


def _side_max(side: list[tuple[int, np.ndarray]] | None, values: Sequence[np.ndarray], size: int) -> np.ndarray:
    """Largest mask value over the side's positions of each group channel; +inf where the side is unusable."""
    best = np.full(size, -np.inf) if side else np.full(size, np.inf)
    for i, pos in side or ():
        ok = pos >= 0
        np.maximum.at(best, pos[ok], values[i][ok])
    return best


def prune(
    net: ANPNet,
    example_inputs: Any = None,
    *,
    flops_budget: float | None = None,
    tolerance: float = 1e-3,
) -> tuple[Plan, nn.Module]:
    """The pruned channels of a trained :class:`ANPNet` as a plan, and the folded network to compile it on.

    Args:
        net: trained masks and weights.
        example_inputs: tensor or tuple to trace with (default: the ones ``net`` was built with).
        flops_budget: optional FLOPs fraction in (0, 1]: ANP's kept channels of smallest ``E[pi]`` are pruned
            as well until the compiled model meets it (module docstring). Those extra prunings are written into
            the masks' ``keep`` buffers (reset first), so that ``net`` in eval mode stays equal to the folded
            network; without a budget the current ``keep`` buffers are respected.
        tolerance: relative FLOPs tolerance of that search.

    Returns:
        (plan, folded network). ``sk.compile(folded, plan)`` equals ``sk.masked(folded, plan)`` and ``net``
        in eval mode. ``plan.meta`` records the threshold, the active mask fraction and the FLOPs ratio.
    """
    inputs = _as_tuple(example_inputs) if example_inputs is not None else net.example_inputs
    model = net.model
    cg = trace_channels(model, inputs)
    sides = _group_sides(cg, net.sites)
    dense = eval_flops(model, inputs)
    if flops_budget is not None:
        for m in net.masks:  # the budget is applied afresh on ANP's own masks
            m.keep.fill_(True)
    scores = _scores_of(cg, sides, _site_values(net))
    natural = {g: sc <= 0.0 for g, sc in scores.items()}
    plan = _plan_of(cg, natural, scores)
    search = None
    if flops_budget is not None:
        plan, search = _budget_plan(cg, dense, scores, natural, flops_budget, tolerance)
        _write_keep(net, cg, sides, plan)
    plan.meta.update({
        "method": "anp", "threshold": net.masks[0].threshold, "active_fraction": net.active_fraction(),
        "flops_ratio": plan_flops(cg, dense, plan) / dense.total, "inputs": cg.input_spec,
        "flops_budget": flops_budget, "search": search.to_dict() if search is not None else None,
    })
    cg.check_plan(plan)
    return plan, fold(net)


def _site_values(net: ANPNet) -> list[np.ndarray]:
    """Each mask site's test-time mask values, as float64 numpy arrays in site order."""
    return [m.test_mask().detach().double().cpu().numpy() for m in net.masks]


def _scores_of(cg: ChannelGraph, sides: Mapping[str, _GroupSides], values: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Group channel -> the larger mask value of its producers or consumers (min over usable sides); groups
    with no usable side are left out."""
    out = {}
    for g, side in sides.items():
        if side.producers is None and side.consumers is None:
            continue
        size = cg.groups[g].size
        out[g] = np.minimum(_side_max(side.producers, values, size), _side_max(side.consumers, values, size))
    return out


def _plan_of(cg: ChannelGraph, pruned: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]) -> Plan:
    """The plan pruning the ``True`` channels of ``pruned``, except pinned ones; a group keeps at least its
    strongest channel, and groups with nothing pruned are left out."""
    channels = {}
    for g, dead in pruned.items():
        spec = cg.groups[g]
        dead = dead.copy()
        for c in spec.pinned:
            dead[c] = False
        if dead.all():
            dead[int(np.argmax(scores[g]))] = False  # a group keeps at least its strongest channel
        if dead.any():
            keep = tuple(np.nonzero(~dead)[0].tolist())
            channels[g] = GroupKeep(spec.size, keep, spec.members, tuple(np.nan_to_num(scores[g], posinf=1.0, neginf=0.0).tolist()))
    return Plan(channels=channels)


def _budget_plan(cg: ChannelGraph, dense: Any, scores: Mapping[str, np.ndarray], natural: Mapping[str, np.ndarray],
                 flops_budget: float, tolerance: float) -> tuple[Plan, Any]:
    """The plan that also prunes ANP's kept channels of smallest score until ``flops_budget`` is met, and the
    search result. Raises PlanError unless ``flops_budget`` is in (0, 1]."""
    if not 0.0 < flops_budget <= 1.0:
        raise PlanError(f"flops_budget must be a fraction in (0, 1], got {flops_budget}")
    from sparsekern.methods.scratch import keep_count_for_budget

    # candidates: channels ANP keeps, by decreasing score; pruning the first k kept is monotone in k
    cands = sorted(((-float(sc[c]), gi, c) for gi, (g, sc) in enumerate(scores.items())
                    for c in np.nonzero(~natural[g])[0].tolist() if c not in cg.groups[g].pinned))
    names = list(scores)
    order = [(names[gi], c) for _, gi, c in cands]

    def pruned_for(k: int) -> dict[str, np.ndarray]:
        dead = {g: np.ones_like(natural[g]) for g in scores}
        for g in scores:
            for c in cg.groups[g].pinned:
                dead[g][c] = False
        for g, c in order[:k]:
            dead[g][c] = False
        return dead

    def cost(k: int) -> float:
        return float(plan_flops(cg, dense, _plan_of(cg, pruned_for(k), scores)))

    search = keep_count_for_budget(cost, len(order), flops_budget * dense.total, tolerance=tolerance)
    return _plan_of(cg, pruned_for(search.k), scores), search


def _write_keep(net: ANPNet, cg: ChannelGraph, sides: Mapping[str, _GroupSides], plan: Plan) -> None:
    """Zero the masks of the channels ``plan`` prunes at every site that touches them."""
    with torch.no_grad():
        for g, keep in plan.channels.items():
            dead = np.ones(keep.size, dtype=bool)
            dead[list(keep.keep)] = False
            side = sides[g]
            for i, pos in (side.producers or []) + (side.consumers or []):
                hit = (pos >= 0) & dead[np.clip(pos, 0, None)]
                if hit.any():
                    net.masks[i].keep[torch.from_numpy(np.nonzero(hit)[0])] = False


def magnitude_plan(model: nn.Module, example_inputs: Any, like: Plan) -> Plan:
    """A plan with ``like``'s kept count in every group, keeping the channels whose producer filters have the
    largest L1 norm (:func:`sparsekern.compiler.group_importance`): the adversarial-training baseline pruned to
    ANP's architecture (same FLOPs)."""
    cg = trace_channels(model, _as_tuple(example_inputs))
    channels = {}
    for g, keep in like.channels.items():
        if g not in cg.groups:
            raise PlanError(f"group {g!r} of the reference plan does not exist in this model")
        spec = cg.groups[g]
        score = group_importance(cg, g)
        pinned = sorted(spec.pinned)
        rest = [c for c in np.argsort(-score, kind="stable").tolist() if c not in spec.pinned]
        chosen = sorted(pinned + rest[: max(0, keep.n_keep - len(pinned))])
        channels[g] = GroupKeep(spec.size, tuple(chosen), spec.members, tuple(score.tolist()))
    plan = Plan(channels=channels, meta={"method": "magnitude", "inputs": cg.input_spec, "like": like.meta.get("method")})
    cg.check_plan(plan)
    return plan


def prune_to_budget(
    model: nn.Module,
    x: torch.Tensor,
    train_data: Any,
    budget: float,
    *,
    seed: int = 0,
    epochs: float = 10,
    progress: bool = False,
    **anp_kwargs: Any,
) -> tuple[Plan, nn.Module]:
    """The :func:`sparsekern.methods.rethinking.prune_to_budget` convention for ANP-VS: train ANP-VS masks on a
    copy of the trained ``model`` (``anp_kwargs`` go to :func:`train_anp`), then :func:`prune` to the FLOPs
    ``budget``. Returns the plan and the folded network to compile it on."""
    net, _ = train_anp(copy.deepcopy(model), train_data, _as_tuple(x), epochs=epochs, seed=seed,
                       progress=progress, **anp_kwargs)
    plan, folded = prune(net, _as_tuple(x), flops_budget=budget)
    plan.meta.update({"epochs": float(epochs), "seed": int(seed)})
    return plan, folded


@register_method("anp")
class ANPVS(Method):
    """ANP-VS: :func:`prune_to_budget` (adversarially trained masks); no arm of its own, and the protocol
    reports clean and PGD accuracy against adversarial training. ``model_kwargs``: the zoo options of the
    paper's networks (:data:`PAPER_MODEL_KWARGS`), for a runner that builds the model for this method."""

    order = 70
    summary = "adversarial neural pruning with vulnerability suppression (Madaan et al., ICML 2020)"
    arms = ()
    protocol_arms = ()
    searches = True
    robustness = True
    model_kwargs = PAPER_MODEL_KWARGS

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        return Pruned(*prune_to_budget(model, ctx.example_inputs, ctx.train_data, budget, seed=ctx.seed,
                                       epochs=ctx.search_epochs, progress=ctx.progress))
