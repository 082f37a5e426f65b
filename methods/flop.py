"""FLOP: factorized L0 pruning (Wang, Wohlwend & Lei, "Structured Pruning of Large Language Models", 2019).

Every weight matrix ``W`` (out x in) of the layers to prune is re-parametrised as a product of two factors
with a gate per rank-one component::

    W = P diag(z) Q,    P: (out, r),  Q: (r, in),  z in [0, 1]^r        (:class:`FactorizedLinear`)

so that removing component ``k`` (``z_k = 0``) removes column ``k`` of ``P`` and row ``k`` of ``Q``: the
layer becomes a smaller low-rank product, which :func:`sparsekern.compile` runs on the fused
``lowrank_linear`` kernel (:mod:`sparsekern.lowrank`). The default rank ``r = in * out // (in + out)`` gives
the factorized layer the parameter count of the dense one. Layers named in the model's
``sk_flop_input_masked`` (the SRU's first layer, as the official enwik8 script) instead keep their dense
weight and gate their *input features* (:class:`InputMaskedLinear`, ``y = (x * z) W^T + bias``): pruning
feature ``i`` removes column ``i`` of ``W``, and the compiled layer reads only the kept features.

Gates (Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018):
hard-concrete variables with a learned ``log_alpha`` per component. Training samples, per forward and
shared by the batch, ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s * (1.1 - (-0.1)) + (-0.1), 0, 1)`` with ``beta = 1``. The expected number of non-zero gates
(:meth:`FactorizedLinear.expected_l0`) is ``sum sigmoid(log_alpha - beta * log(0.1 / 1.1))``; a factorized
matrix's expected size is ``(in + out) * E[L0]``, an input-masked one's ``out * E[L0]``; the expected
sparsity of the model is
``s_hat = 1 - sum(sizes) / (number of prunable parameters)``, the latter being the size of the *dense*
matrices, ``sum in * out`` over the gated layers: the authors' code divides by the factors' size
``sum (in + out) * r``, which is the same up to rounding for the default rank; the dense size keeps the
meaning "fraction of the dense weights removed" for any rank (e.g. a full-rank SVD start, whose factors
hold more parameters than the matrix: its ``s_hat`` starts below 0). A layer made at a chosen rank as part of
the architecture (the SRU's projection size ``n_proj`` of the official enwik8 script: :func:`factorize` with
``counts_factors=True``) counts against its factors' size ``(in + out) r`` instead, as the official code does,
so that the target means the fraction of the projected model removed. ``log_alpha`` starts at
``log((1 - p) / p)`` with ``p = 0.5`` for a model trained from scratch, ``p = 0.05`` when starting from
a trained model (plus N(0, 0.01) noise, as the authors' code).

Budget (:class:`LagrangianHook`): the augmented Lagrangian ``task + l1 (s_hat - t) + l2 (s_hat - t)^2``,
minimised over the model and maximised over ``l1, l2`` (by default a trainer param group with
``maximize=True``; ``lambda_optimizer="adam"``: a separate Adam, as the official code), with the target
``t`` ramped linearly from 0 over a warm-up. Training runs in the one trainer
(:func:`sparsekern.train.train`; :func:`train_flop` wires it up).

Evaluation gates (:meth:`FactorizedLinear.eval_gates`): the number of zeros is ``round(r - E[L0])``; the
remaining components keep the soft value ``sigmoid(0.8 * log_alpha / beta)`` (the authors' empirical
estimate of E[z]), which is folded into ``Q`` when compiling. :func:`prune` writes these gates into a
:class:`~sparsekern.plan.Plan` (``plan.lowrank``: per layer the kept indices *and* their scale values, so
that the plan alone decides the pruned model and ``sk.compile(model, plan)`` equals
``sk.masked(model, plan)`` for any later change of ``log_alpha``).

Starting points (:func:`factorize`): ``init="svd"`` (default, since ``factorize`` converts an existing
model) sets ``P, Q`` to the best rank-``r`` approximation of each trained ``W`` (exact when
``r >= min(in, out)``) with ``p = 0.05``; ``init="random"`` draws fresh factors whose product has the
dense layer's weight scale, with ``p = 0.5``: training with FLOP from scratch (as the authors' enwik8 SRU
script, which factorizes before training). The official Transformer-XL route trains a factorized model
first (:func:`factorize` with ``gates=False``: :class:`sparsekern.lowrank.LowRankLinear` layers), then
adds the gates to its trained factors without re-factorizing (:func:`gate_factorized`, ``p = 0.05``).

Typical use::

    model = sparsekern.models.build("transformer_lm")
    factorize(model, init="random")
    train_flop(model, LMSequences(corpus.train, 128), TrainConfig(optimizer="adam", lr=1e-3, ...), target=0.7)
    plan = prune(model, example_inputs=x)                 # x: int64 (B, T)
    fast = sparsekern.compile(model, plan, example_inputs=x)
"""
from __future__ import annotations

import abc
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekern.checkpoint import Checkpoints
from sparsekern.methods.registry import Method, PruneContext, Pruned, register_method
from sparsekern.plan import LowRankKeep, Plan, PlanError
from sparsekern.train import Hook, TrainConfig, TrainResult, TrainState, train
from sparsekern.utils import input_spec

__all__ = [
    "FLOP",
    "EVAL_SHARPNESS",
    "LIMIT_L",
    "LIMIT_R",
    "FactorizedLinear",
    "HardConcreteLayer",
    "InputMaskedLinear",
    "LAMBDA_OPTIMIZERS",
    "LagrangianHook",
    "build_factorized",
    "default_rank",
    "expected_sparsity",
    "factorize",
    "factorized_layers",
    "flop_param_groups",
    "gate_factorized",
    "gated_layers",
    "hard_sparsity",
    "prune",
    "run_lm",
    "train_flop",
    "FlopRun",
]

#: Stretch interval of the hard-concrete distribution (Louizos et al. 2018): s is mapped to
#: [LIMIT_L, LIMIT_R] before clamping to [0, 1].
LIMIT_L, LIMIT_R = -0.1, 1.1
#: The authors' factor in the evaluation gate ``sigmoid(EVAL_SHARPNESS * log_alpha / beta)``.
EVAL_SHARPNESS = 0.8
_INITS = ("svd", "random")
_UNIFORM_EPS = 1e-6


def default_rank(in_features: int, out_features: int) -> int:
    """``in * out // (in + out)`` (at least 1): the rank whose factors hold as many parameters as the matrix."""
    return max(1, in_features * out_features // (in_features + out_features))


def _log_alpha_init(drop_init: float) -> float:
    if not 0.0 < drop_init < 1.0:
        raise ValueError(f"drop_init must be in (0, 1), got {drop_init}")
    return math.log((1.0 - drop_init) / drop_init)


class HardConcreteLayer(nn.Module, metaclass=abc.ABCMeta):
    """Base of FLOP's gated layers: ``n_gates`` hard-concrete gates with a learned ``log_alpha`` (n_gates,).

    Subclasses set ``log_alpha``, ``beta``, ``drop_init`` and ``init_std`` and define :attr:`n_gates`,
    :meth:`expected_size` (the expected parameter count of the pruned layer, differentiable in ``log_alpha``)
    and :meth:`kept_params` (the parameters the compiled layer holds when ``n`` gates are non-zero). Their
    plan entry (:func:`prune`) is a :class:`~sparsekern.plan.LowRankKeep` over the gates, with ``rank =
    n_gates``; :mod:`sparsekern.lowrank` compiles it.
    """

    log_alpha: nn.Parameter
    beta: float
    drop_init: float
    init_std: float
    in_features: int
    out_features: int

    @property
    @abc.abstractmethod
    def n_gates(self) -> int:
        """Number of gates."""

    @abc.abstractmethod
    def expected_size(self) -> Tensor:
        """Expected parameter count of the pruned layer (scalar tensor, differentiable in ``log_alpha``)."""

    @abc.abstractmethod
    def kept_params(self, n_kept: int) -> int:
        """Parameters of the compiled layer when ``n_kept`` gates are non-zero."""

    @property
    def n_dense_params(self) -> int:
        """Parameters of the dense matrix the layer stands for, ``in * out``."""
        return self.in_features * self.out_features

    @property
    def n_prunable_params(self) -> int:
        """The layer's share of the sparsity denominator: :attr:`n_dense_params` unless a subclass says
        otherwise (a projected :class:`FactorizedLinear` counts its factors)."""
        return self.n_dense_params

    def reset_gates(self, drop_init: float | None = None) -> None:
        """``log_alpha = log((1 - p) / p) + N(0, init_std)`` with ``p = drop_init`` (default: the layer's)."""
        if drop_init is not None:
            self.drop_init = float(drop_init)
        with torch.no_grad():
            self.log_alpha.normal_(_log_alpha_init(self.drop_init), self.init_std)

    def expected_l0(self) -> Tensor:
        """Expected number of non-zero gates, ``sum sigmoid(log_alpha - beta log(-l / r))`` (scalar tensor,
        differentiable in ``log_alpha``)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-LIMIT_L / LIMIT_R)).sum()

    def sample_gates(self) -> Tensor:
        """One hard-concrete draw ``z`` (n_gates,), differentiable in ``log_alpha`` (reparametrised)."""
        u = torch.rand_like(self.log_alpha).clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def eval_gates(self) -> Tensor:
        """Deterministic gates (n_gates,): ``sigmoid(0.8 log_alpha / beta)``, with the ``round(n_gates - E[L0])``
        smallest set to zero (ties: lower index first). Not differentiable."""
        with torch.no_grad():  # tensor ops only (no Python number from a parameter), so torch.export captures it
            n_zeros = torch.round(self.n_gates - self.expected_l0())
            soft = torch.sigmoid(EVAL_SHARPNESS * self.log_alpha.detach() / self.beta)
            place = torch.argsort(torch.argsort(soft, stable=True), stable=True)  # position in ascending order
            return torch.where(place < n_zeros, torch.zeros_like(soft), soft)

    def gates(self) -> Tensor:
        """:meth:`sample_gates` in train mode, :meth:`eval_gates` in eval mode."""
        return self.sample_gates() if self.training else self.eval_gates()


class FactorizedLinear(HardConcreteLayer):
    """``y = x Q^T diag(z) P^T + bias`` with hard-concrete gates ``z`` (FLOP's factorized weight matrix).

    Shapes: x (..., in_features) -> (..., out_features); ``P`` (out, r), ``Q`` (r, in), ``log_alpha`` (r,),
    ``bias`` (out,) or None. In train mode ``z`` is sampled at every forward (one draw for the whole batch);
    in eval mode ``z`` = :meth:`eval_gates`. Marked ``sk_leaf`` so that tracers keep it as one node with its
    qualified name (the unit that :func:`prune` plans and :mod:`sparsekern.lowrank` compiles).

    Args:
        in_features, out_features: sizes of the dense matrix.
        rank: number of rank-one components ``r`` (default :func:`default_rank`).
        bias: learn an additive bias.
        drop_init: ``p`` of the gate initialisation ``log_alpha = log((1 - p) / p)``.
        beta: hard-concrete temperature.
        init_std: std of the noise added to the initial ``log_alpha``.
        counts_factors: the rank is part of the architecture (a projection, as the SRU's ``n_proj``): the
            sparsity counts against the factors' size ``(in + out) r`` (:attr:`n_prunable_params`), as the
            official code, rather than the dense matrix's ``in * out``.
    """

    sk_leaf = True

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True, *,
                 drop_init: float = 0.5, beta: float = 1.0, init_std: float = 0.01,
                 counts_factors: bool = False) -> None:
        super().__init__()
        rank = default_rank(in_features, out_features) if rank is None else int(rank)
        if min(in_features, out_features, rank) < 1:
            raise ValueError(f"FactorizedLinear needs positive sizes, got in={in_features}, out={out_features}, "
                             f"rank={rank}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.counts_factors = bool(counts_factors)
        self.beta = float(beta)
        self.drop_init, self.init_std = float(drop_init), float(init_std)
        self.P = nn.Parameter(torch.empty(out_features, rank))
        self.Q = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.log_alpha = nn.Parameter(torch.empty(rank))
        self.reset_parameters()

    @property
    def n_gates(self) -> int:
        """The rank ``r``: one gate per rank-one component."""
        return self.rank

    # ------------------------------------------------------------------ initialisation
    def reset_parameters(self, weight_std: float | None = None) -> None:
        """Random factors whose product has entries of std ``weight_std`` (default: that of ``nn.Linear``'s
        initialisation, ``1 / sqrt(3 in)``), a zero-centred bias as ``nn.Linear``, fresh gates."""
        if weight_std is None:
            weight_std = 1.0 / math.sqrt(3.0 * self.in_features)
        # Var(Q) = 1 / in and Var(P) = in * std^2 / r give Var((P Q)_ij) = r Var(P) Var(Q) = std^2.
        q_bound = math.sqrt(3.0 / self.in_features)
        p_bound = math.sqrt(3.0 * self.in_features / self.rank) * weight_std
        with torch.no_grad():
            self.Q.uniform_(-q_bound, q_bound)
            self.P.uniform_(-p_bound, p_bound)
            if self.bias is not None:
                b = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-b, b)
        self.reset_gates()

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, *, init: str = "svd",
                    drop_init: float | None = None, beta: float = 1.0, init_std: float = 0.01,
                    counts_factors: bool = False) -> "FactorizedLinear":
        """A factorized copy of ``linear`` (on its device and dtype).

        Args:
            linear: the dense layer.
            rank: ``r`` (default :func:`default_rank`).
            init: ``"svd"``: ``P = U_r sqrt(S_r)``, ``Q = sqrt(S_r) V_r^T`` from the SVD ``W = U S V^T``, so
                ``P Q`` is the best rank-``r`` approximation of ``W`` (equal to it when ``r >= min(in, out)``;
                components beyond ``min(in, out)`` are zero); ``"random"``: fresh factors with the scale of
                ``W``'s entries (its std). The bias is copied in both cases.
            drop_init: gate initialisation ``p`` (default 0.05 for ``"svd"``, 0.5 for ``"random"``).
            counts_factors: see the class.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if drop_init is None:
            drop_init = 0.05 if init == "svd" else 0.5
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    drop_init=drop_init, beta=beta, init_std=init_std, counts_factors=counts_factors)
        layer.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if init == "svd":
                u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
                k = min(layer.rank, s.numel())
                root = s[:k].sqrt()
                layer.P.zero_()
                layer.Q.zero_()
                layer.P[:, :k] = (u[:, :k] * root).to(w.dtype)
                layer.Q[:k] = (root[:, None] * vh[:k]).to(w.dtype)
            else:
                layer.reset_parameters(weight_std=float(w.float().std()) if w.numel() > 1 else None)
                layer.reset_gates(drop_init)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @classmethod
    def from_factors(cls, layer: nn.Module, *, drop_init: float = 0.05, beta: float = 1.0,
                     init_std: float = 0.01) -> "FactorizedLinear":
        """A gated copy of an already factorized layer: any module with ``P`` (out, r), ``Q`` (r, in) and
        ``bias`` ((out,) or None), e.g. :class:`sparsekern.lowrank.LowRankLinear`. The factors and the bias
        are copied bit for bit (same device and dtype); only the gates are new, at ``p = drop_init``
        (default 0.05, the official Transformer-XL script's ``prune_init_mean``), so with every gate at 1
        the result computes what ``layer`` computes."""
        P, Q = getattr(layer, "P", None), getattr(layer, "Q", None)
        if not (isinstance(P, Tensor) and isinstance(Q, Tensor) and P.dim() == 2 and Q.dim() == 2
                and P.shape[1] == Q.shape[0]):
            raise TypeError(f"from_factors takes a layer with factors P (out, r) and Q (r, in), got a "
                            f"{type(layer).__name__}")
        bias = getattr(layer, "bias", None)
        bias = bias if isinstance(bias, Tensor) else None
        new = cls(Q.shape[1], P.shape[0], Q.shape[0], bias is not None, drop_init=drop_init, beta=beta,
                  init_std=init_std)
        new.to(device=Q.device, dtype=Q.dtype)
        with torch.no_grad():
            new.P.copy_(P.detach())
            new.Q.copy_(Q.detach())
            if bias is not None:
                new.bias.copy_(bias.detach())
        return new

    # ------------------------------------------------------------------ sizes
    def expected_size(self) -> Tensor:
        """Expected parameter count of the pruned factors, ``(in + out) * E[L0]`` (scalar tensor)."""
        return (self.in_features + self.out_features) * self.expected_l0()

    def kept_params(self, n_kept: int) -> int:
        """Parameters of the factors with ``n_kept`` components, ``(in + out) * n_kept``."""
        return (self.in_features + self.out_features) * int(n_kept)

    @property
    def n_factor_params(self) -> int:
        """Parameters of the two factors, ``(in + out) * r``."""
        return (self.in_features + self.out_features) * self.rank

    @property
    def n_prunable_params(self) -> int:
        """:attr:`n_factor_params` with ``counts_factors``, else :attr:`n_dense_params`."""
        return self.n_factor_params if self.counts_factors else self.n_dense_params

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FactorizedLinear(in={self.in_features}): input has {x.shape[-1]} features "
                             f"(shape {tuple(x.shape)})")
        return F.linear(F.linear(x, self.Q) * self.gates().to(x.dtype), self.P, self.bias)

    def dense_weight(self, gates: Tensor | None = None) -> Tensor:
        """``P diag(z) Q`` (out, in) for the given gates (default: all ones)."""
        if gates is None:
            return self.P @ self.Q
        return (self.P * gates) @ self.Q

    def extra_repr(self) -> str:
        counts = ", counts_factors=True" if self.counts_factors else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, beta={self.beta}{counts}")


class InputMaskedLinear(HardConcreteLayer):
    """``y = (x * z) W^T + bias``: a dense layer whose *input features* carry hard-concrete gates ``z``.

    The official enwik8 SRU script gives the first SRU layer this mask instead of a factorization (the
    authors' ``HardConcreteLinear``): pruning input feature ``i`` removes column ``i`` of ``W``, so the
    compiled layer reads fewer input features (:class:`sparsekern.lowrank.FeatureSelectLinear`). It is the
    factorization ``P = W``, ``Q = I`` with one gate per input feature, and is planned like one
    (``rank = in_features`` in its :class:`~sparsekern.plan.LowRankKeep`).

    Shapes: x (..., in_features) -> (..., out_features); ``weight`` (out, in) as ``nn.Linear``,
    ``log_alpha`` (in,), ``bias`` (out,) or None. Gates as :class:`FactorizedLinear` (sampled in train mode,
    :meth:`eval_gates` in eval mode). Expected size (as the official code): ``out * E[L0]``.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (weights initialised as ``nn.Linear``).
        drop_init, beta, init_std: the gates' initialisation and temperature (see :class:`FactorizedLinear`).
    """

    sk_leaf = True
    #: :mod:`sparsekern.lowrank` reads the gates of this layer as input-feature gates.
    sk_input_gates = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, drop_init: float = 0.5,
                 beta: float = 1.0, init_std: float = 0.01) -> None:
        super().__init__()
        if min(in_features, out_features) < 1:
            raise ValueError(f"InputMaskedLinear needs positive sizes, got in={in_features}, out={out_features}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.in_features, self.out_features = in_features, out_features
        self.beta = float(beta)
        self.drop_init, self.init_std = float(drop_init), float(init_std)
        dense = nn.Linear(in_features, out_features, bias)
        self.weight = nn.Parameter(dense.weight.detach().clone())
        self.bias = nn.Parameter(dense.bias.detach().clone()) if bias else None
        self.log_alpha = nn.Parameter(torch.empty(in_features))
        self.reset_gates()

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, drop_init: float = 0.5, beta: float = 1.0,
                    init_std: float = 0.01) -> "InputMaskedLinear":
        """A gated copy of ``linear``: its weight and bias copied bit for bit (device and dtype kept), fresh
        gates at ``p = drop_init``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, drop_init=drop_init,
                    beta=beta, init_std=init_std)
        layer.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def n_gates(self) -> int:
        """``in_features``: one gate per input feature."""
        return self.in_features

    def expected_size(self) -> Tensor:
        """Expected parameter count of the kept columns of ``W``, ``out * E[L0]`` (scalar tensor)."""
        return self.out_features * self.expected_l0()

    def kept_params(self, n_kept: int) -> int:
        """Parameters of ``W`` with ``n_kept`` input features, ``out * n_kept``."""
        return self.out_features * int(n_kept)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"InputMaskedLinear(in={self.in_features}): input has {x.shape[-1]} features "
                             f"(shape {tuple(x.shape)})")
        return F.linear(x * self.gates().to(x.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"beta={self.beta}")


# ----------------------------------------------------------------------------- model conversion
def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Qualified name -> every :class:`FactorizedLinear` of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def gated_layers(model: nn.Module) -> dict[str, HardConcreteLayer]:
    """Qualified name -> every gated layer of ``model`` (:class:`FactorizedLinear` and
    :class:`InputMaskedLinear`), in module order: the layers the sparsity budget counts and the plan prunes."""
    return {name: m for name, m in model.named_modules() if isinstance(m, HardConcreteLayer)}


def factorize(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    exclude: Sequence[str] = ("head",),
    input_masked: Iterable[str] | None = None,
    rank: int | Mapping[str, int] | Callable[[int, int], int] | None = None,
    init: str = "svd",
    drop_init: float | None = None,
    beta: float = 1.0,
    gates: bool = True,
    counts_factors: bool = False,
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` (in place) by :class:`FactorizedLinear` layers, and the
    layers named in ``input_masked`` by :class:`InputMaskedLinear` layers.

    Args:
        model: the model; returned for chaining.
        layers: qualified names of the linear layers to convert; default: every ``nn.Linear`` not in
            ``exclude``.
        exclude: names left dense when ``layers`` is None (the zoo LMs' output layer is ``"head"``; the
            paper keeps embeddings and softmax dense; embeddings are not linear layers anyway).
        input_masked: layers that keep their dense weight and get a hard-concrete mask on their input
            features instead of a factorization. ``None``: the model's ``sk_flop_input_masked`` among the
            converted layers (:class:`~sparsekern.models.lm.SRULM`: its first layer's ``layers.0.proj``, as
            the official enwik8 script; nothing for other models); ``()``: factorize every converted layer.
        rank: an int for every layer, a mapping name -> rank, or ``f(in, out) -> rank``; default
            :func:`default_rank` (the dense parameter count).
        init, drop_init, beta: see :meth:`FactorizedLinear.from_linear` (``"svd"`` by default: keep what a
            trained model learned; pass ``init="random"`` to train with FLOP from scratch). An input-masked
            layer keeps its weight in both cases; its gates start at ``drop_init`` (default 0.05 with
            ``"svd"``, 0.5 with ``"random"``).
        gates: ``False`` makes a factorized model *without* gates, to be trained first and gated later with
            :func:`gate_factorized` (the official Transformer-XL route): the layers become
            :class:`sparsekern.lowrank.LowRankLinear` (``P``, ``Q`` from ``init``) and input-masked layers
            stay ``nn.Linear``.
        counts_factors: the ranks are part of the architecture (``rank`` = the SRU's ``n_proj``, as the
            official enwik8 script): the sparsity counts against the factors' size (see
            :class:`FactorizedLinear`).

    Returns:
        ``model``. If it came from :func:`sparsekern.models.build` its ``sk_arch`` becomes a factory record
        (:func:`build_factorized`) so that ``sk.save`` / ``sk.load`` rebuild the factorized architecture.

    Raises:
        ValueError: an unknown or non-linear layer name, or nothing to factorize.
    """
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    modules = dict(model.named_modules())
    names = _linear_names(modules, layers, exclude)
    masked = _input_masked_names(model, modules, names, input_masked)
    p = drop_init if drop_init is not None else (0.05 if init == "svd" else 0.5)
    ranks: dict[str, int] = {}
    for n in names:
        lin = modules[n]
        if n in masked:
            if gates:
                model.set_submodule(n, InputMaskedLinear.from_linear(lin, drop_init=p, beta=beta))
            continue
        layer = FactorizedLinear.from_linear(lin, _rank_for(rank, n, lin), init=init, drop_init=p, beta=beta,
                                             counts_factors=counts_factors)
        if not gates:
            from sparsekern.lowrank import LowRankLinear

            layer = LowRankLinear.from_factors(layer.Q, layer.P, layer.bias)
        model.set_submodule(n, layer)
        ranks[n] = layer.rank
    _record_arch(model, ranks, sorted(masked), beta, gates, counts_factors)
    return model


def _linear_names(modules: Mapping[str, nn.Module], layers: Iterable[str] | None,
                  exclude: Sequence[str]) -> list[str]:
    """The linear layers :func:`factorize` converts, checked."""
    if layers is None:
        names = [n for n, m in modules.items() if type(m) is nn.Linear and n not in set(exclude)]
    else:
        names = list(layers)
        for n in names:
            if n not in modules:
                raise ValueError(f"factorize: the model has no layer {n!r}")
            if not isinstance(modules[n], nn.Linear):
                raise ValueError(f"factorize: {n!r} is a {type(modules[n]).__name__}, not an nn.Linear")
    if not names:
        raise ValueError("factorize: no nn.Linear layer to factorize (check `layers` / `exclude`)")
    return names


def _input_masked_names(model: nn.Module, modules: Mapping[str, nn.Module], names: Sequence[str],
                        input_masked: Iterable[str] | None) -> set[str]:
    """The converted layers that get an input mask: the model's default among ``names``, or those given
    (each must be one of ``names``)."""
    if input_masked is None:
        return {n for n in getattr(model, "sk_flop_input_masked", ()) if n in names}
    chosen = set(input_masked)
    for n in sorted(chosen):
        if n not in modules:
            raise ValueError(f"factorize: the model has no layer {n!r}")
        if n not in names:
            raise ValueError(f"factorize: input_masked names {n!r}, which is not among the linear layers converted "
                             f"({_preview(names)})")
    return chosen


def _preview(names: Sequence[str], k: int = 6) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


def _rank_for(rank: int | Mapping[str, int] | Callable[[int, int], int] | None, name: str,
              lin: nn.Linear) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, int):
        return rank
    if isinstance(rank, Mapping):
        return rank.get(name)
    return int(rank(lin.in_features, lin.out_features))


def _record_arch(model: nn.Module, ranks: Mapping[str, int], input_masked: Sequence[str], beta: float,
                 gates: bool, counts_factors: bool = False) -> None:
    """Point a zoo model's ``sk_arch`` at :func:`build_factorized` (merging with an existing record)."""
    arch = getattr(model, "sk_arch", None)
    if not isinstance(arch, Mapping):
        return
    if arch.get("factory") == _FACTORY:
        kwargs = dict(arch["kwargs"])
        kwargs["ranks"] = {**kwargs["ranks"], **ranks}
        masked = sorted({*kwargs.get("input_masked", ()), *(input_masked if gates else ())})
    else:
        kwargs = {"arch": dict(arch), "ranks": dict(ranks), "beta": beta}
        masked = sorted(input_masked) if gates else []
    if masked:
        kwargs["input_masked"] = masked
    if not gates:
        kwargs["gates"] = False
    if counts_factors:
        kwargs["counts_factors"] = True
    model.sk_arch = {"factory": _FACTORY, "kwargs": kwargs}


def gate_factorized(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    input_masked: Iterable[str] | None = None,
    drop_init: float = 0.05,
    beta: float = 1.0,
) -> nn.Module:
    """FLOP from a factorized model trained first (the official Transformer-XL route): a copy of ``model``
    whose factorized layers get gates, with the trained factors taken as they are (no re-factorization).

    Every layer with factors ``P`` (out, r) and ``Q`` (r, in) (a :class:`sparsekern.lowrank.LowRankLinear`, as
    :func:`factorize` with ``gates=False`` makes, or any module with those attributes and ``bias``) becomes
    a :class:`FactorizedLinear` holding bit-identical copies of ``P``, ``Q`` and ``bias``
    (:meth:`FactorizedLinear.from_factors`); with every gate at 1 it computes what the input model computes.

    Args:
        model: the trained factorized model; not modified.
        layers: the factorized layers to gate (default: every one that is not already gated).
        input_masked: dense ``nn.Linear`` layers to give an input-feature mask; ``None``: the model's
            ``sk_flop_input_masked`` that are still ``nn.Linear`` (see :func:`factorize`).
        drop_init: ``p`` of the new gates (default 0.05, the official script's ``prune_init_mean``).
        beta: hard-concrete temperature.

    Returns:
        The gated copy, ready for :func:`train_flop`. A ``sk_arch`` factory record of :func:`factorize`
        is updated to the gated architecture (dropped when ``layers`` leaves some factorized layer ungated).

    Raises:
        ValueError: no factorized layer to gate, or a name that is not one.
    """
    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    factored = {n: m for n, m in modules.items() if _has_factors(m) and not isinstance(m, HardConcreteLayer)}
    names = list(factored) if layers is None else list(layers)
    if not names:
        raise ValueError("gate_factorized: the model has no factorized layer (P (out, r), Q (r, in)); make one with "
                         "sparsekern.methods.flop.factorize(model, gates=False) and train it first")
    for n in names:
        if n not in factored:
            raise ValueError(f"gate_factorized: {n!r} is not an ungated factorized layer of the model "
                             f"(those are: {_preview(list(factored))})")
        net.set_submodule(n, FactorizedLinear.from_factors(factored[n], drop_init=drop_init, beta=beta))
    if input_masked is None:
        input_masked = [n for n in getattr(net, "sk_flop_input_masked", ()) if type(modules.get(n)) is nn.Linear]
    masked = sorted(set(input_masked))
    for n in masked:
        if not isinstance(modules.get(n), nn.Linear):
            raise ValueError(f"gate_factorized: input_masked names {n!r}, which is not an nn.Linear of the model")
        net.set_submodule(n, InputMaskedLinear.from_linear(modules[n], drop_init=drop_init, beta=beta))
    _record_gated_arch(net, masked, complete=set(names) == set(factored))
    return net


def _record_gated_arch(net: nn.Module, masked: Sequence[str], complete: bool) -> None:
    """Update a :func:`factorize` record of ``net`` to its gated architecture; when only some factorized
    layers were gated (which :func:`build_factorized` cannot rebuild) drop the record, so that ``sk.save``
    asks for ``arch=`` instead of writing a wrong one."""
    arch = getattr(net, "sk_arch", None)
    if not (isinstance(arch, Mapping) and arch.get("factory") == _FACTORY):
        return
    if not complete:
        del net.sk_arch
        return
    kwargs = {k: v for k, v in arch["kwargs"].items() if k != "gates"}
    kwargs["input_masked"] = sorted({*kwargs.get("input_masked", ()), *masked})
    net.sk_arch = {"factory": _FACTORY, "kwargs": kwargs}


def _has_factors(m: nn.Module) -> bool:
    P, Q = getattr(m, "P", None), getattr(m, "Q", None)
    return (isinstance(P, Tensor) and isinstance(Q, Tensor) and P.dim() == 2 and Q.dim() == 2
            and P.shape[1] == Q.shape[0])


_FACTORY = "sparsekern.methods.flop:build_factorized"


def build_factorized(arch: Mapping[str, Any], ranks: Mapping[str, int], beta: float = 1.0,
                     input_masked: Sequence[str] = (), gates: bool = True, counts_factors: bool = False) -> nn.Module:
    """Rebuild a factorized architecture (the ``sk_arch`` factory that :func:`factorize` records).

    ``arch`` is the dense model's architecture reference (see :func:`sparsekern.serialize.build_arch`),
    ``ranks`` the factorized layers and their ranks, ``input_masked`` the layers with an input-feature mask,
    ``gates=False`` an ungated factorized model, ``counts_factors`` projected layers (:func:`factorize`).
    Weights are random (``sk.load`` overwrites them).
    """
    from sparsekern.serialize import build_arch

    model = build_arch(arch)
    model.sk_arch = dict(arch)
    names = [*ranks, *input_masked]
    return factorize(model, names, rank=dict(ranks), init="random", beta=beta, input_masked=list(input_masked),
                     gates=gates, counts_factors=counts_factors)


# ----------------------------------------------------------------------------- sparsity
def _layers_of(model_or_layers: nn.Module | Iterable[HardConcreteLayer]) -> list[HardConcreteLayer]:
    if isinstance(model_or_layers, nn.Module):
        layers = list(gated_layers(model_or_layers).values())
    else:
        layers = list(model_or_layers)
    if not layers:
        raise ValueError("the model has no FactorizedLinear layer: call sparsekern.methods.flop.factorize(model) "
                         "first")
    return layers


def expected_sparsity(model_or_layers: nn.Module | Iterable[HardConcreteLayer]) -> Tensor:
    """``s_hat = 1 - sum expected sizes / sum prunable sizes`` over the gated layers (differentiable): a
    factorized layer's expected size is ``(in + out) E[L0]``, an input-masked layer's ``out E[L0]``; the
    prunable size is ``in * out`` (``(in + out) r`` for a projected layer, ``counts_factors``)."""
    layers = _layers_of(model_or_layers)
    total = sum(layer.n_prunable_params for layer in layers)
    return 1.0 - torch.stack([layer.expected_size() for layer in layers]).sum() / total


def hard_sparsity(model_or_layers: nn.Module | Iterable[HardConcreteLayer]) -> float:
    """Sparsity of the evaluation gates, ``1 - sum kept params / sum prunable sizes`` (kept params: ``(in +
    out) nnz(z)`` for a factorized layer, ``out nnz(z)`` for an input-masked one; prunable sizes as in
    :func:`expected_sparsity`): the fraction of the gated layers' weights that the compiled model does
    without."""
    layers = _layers_of(model_or_layers)
    total = sum(layer.n_prunable_params for layer in layers)
    kept = sum(layer.kept_params(int((layer.eval_gates() != 0).sum())) for layer in layers)
    return 1.0 - kept / total


#: How :class:`LagrangianHook` updates the multipliers: ``"trainer"`` (a param group of the trainer's
#: optimizer) or ``"adam"`` (the hook's own Adam, as the official scripts).
LAMBDA_OPTIMIZERS = ("trainer", "adam")


class LagrangianHook(Hook):
    """FLOP's sparsity constraint as a trainer hook: adds ``l1 (s_hat - t) + l2 (s_hat - t)^2``.

    ``s_hat`` is :func:`expected_sparsity` of the gated layers; ``t`` ramps linearly from 0 to ``target``
    over the warm-up (``t = target * min(1, (step + 1) / warmup_steps)``), then stays. The multipliers
    ``lambda1``, ``lambda2`` (scalar parameters, start at 0) belong to the hook and are *maximised* (gradient
    ascent on ``dL/dl1 = s_hat - t``, ``dL/dl2 = (s_hat - t)^2``), which raises the penalty until the
    constraint ``s_hat = t`` holds. Two optimisers (``lambda_optimizer``):

    * ``"trainer"`` (default, this project's): give :meth:`param_group` to the trainer; the multipliers are
      a group of its optimizer with ``maximize=True`` and no momentum (Adam's ``beta1 = 0``; see
      :meth:`param_group` for why), at the lr given there, following the trainer's schedule and gradient clip.
    * ``"adam"`` (the official code's, asappresearch/flop, enwik8 SRU and Transformer-XL scripts): a separate
      ``torch.optim.Adam`` over the two multipliers with the default betas (0.9, 0.999), no weight decay,
      maximising (the authors give Adam a negative learning rate, which makes the same updates), at
      ``lambda_lr`` times the factor of the trainer's lr schedule at that step (the scripts put the
      multipliers on the model's noam / inverse-square-root schedule); no gradient clipping. It steps after
      every optimizer step of ``stage``, on the gradient of that step's Lagrangian. The scripts' lr is
      ``prune_lr`` times the schedule (the SRU script: 1.5 times the model's lr).

    The default is ``"trainer"``: momentum on the multipliers makes the min-max oscillate around the target on
    short runs (:meth:`param_group`); ``"adam"`` reproduces the official runs.

    Args:
        model_or_layers: the gated model (or its :class:`HardConcreteLayer` layers).
        target: the sparsity to reach, in [0, 1).
        warmup_steps: length of the ramp in optimizer steps; ``None``: ``warmup_fraction`` of the run.
        warmup_fraction: see ``warmup_steps``.
        stage: the trainer stage whose objective gets the term.
        lambda_optimizer: ``"trainer"`` or ``"adam"`` (above).
        lambda_lr: the base learning rate of the ``"adam"`` optimiser (``"trainer"``: see :meth:`param_group`).

    Logged metrics: ``expected_sparsity``, ``target_sparsity``, ``lambda1``, ``lambda2``.
    """

    def __init__(self, model_or_layers: nn.Module | Iterable[HardConcreteLayer], target: float, *,
                 warmup_steps: int | None = None, warmup_fraction: float = 0.3, stage: str = "main",
                 lambda_optimizer: str = "trainer", lambda_lr: float = 0.2) -> None:
        if not 0.0 <= float(target) < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        if lambda_optimizer not in LAMBDA_OPTIMIZERS:
            raise ValueError(f"lambda_optimizer must be one of {LAMBDA_OPTIMIZERS}, got {lambda_optimizer!r}")
        if lambda_lr <= 0:
            raise ValueError(f"lambda_lr must be > 0, got {lambda_lr}")
        self.layers = _layers_of(model_or_layers)
        self.target = float(target)
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self.stage = stage
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self.lambda_optimizer, self.lambda_lr = lambda_optimizer, float(lambda_lr)
        #: the ``"adam"`` optimiser of the multipliers (None with ``"trainer"``).
        self.optimizer: torch.optim.Adam | None = None
        if lambda_optimizer == "adam":
            self.optimizer = torch.optim.Adam([self.lambda1, self.lambda2], lr=self.lambda_lr, betas=(0.9, 0.999),
                                              weight_decay=0.0, maximize=True)
        self._ramp = warmup_steps
        self._pending: tuple[Tensor, float] | None = None

    def param_group(self, lr: float) -> dict[str, Any]:
        """The multipliers as a trainer param group: gradient *ascent* at ``lr``, no weight decay, no momentum
        (``betas=(0, 0.999)`` for Adam, ``momentum=0`` for SGD; the optimizer ignores the other key).

        Momentum on the multipliers makes the min-max oscillate around the target (Adam's default
        ``beta1 = 0.9`` overshoots it on short runs), so the group has none; tests/methods/test_flop.py checks
        that the expected sparsity settles at the target.

        Raises:
            ValueError: the hook updates the multipliers with its own optimiser (``lambda_optimizer="adam"``).
        """
        if self.optimizer is not None:
            raise ValueError("this LagrangianHook updates its multipliers with its own Adam "
                             "(lambda_optimizer='adam'); do not give them to the trainer")
        return {"params": [self.lambda1, self.lambda2], "lr": float(lr), "maximize": True, "weight_decay": 0.0,
                "betas": (0.0, 0.999), "momentum": 0.0, "name": "flop_lambdas"}

    def target_at(self, step: int) -> float:
        """The target ``t`` during the optimizer step with 0-based index ``step``."""
        ramp = self._ramp or 0
        if ramp <= 0:
            return self.target
        return self.target * min(1.0, (step + 1) / ramp)

    def on_train_start(self, state: TrainState) -> None:
        if self.warmup_steps is None:
            self._ramp = round(self.warmup_fraction * state.total_steps)
        if self.optimizer is not None and self.lambda1.device != state.device:
            saved = self.optimizer.state_dict()
            for p in (self.lambda1, self.lambda2):
                p.data = p.data.to(state.device)
            self.optimizer.load_state_dict(saved)  # moves the moment estimates along

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> Tensor | None:
        if state.stage != self.stage:
            return None
        s_hat = expected_sparsity(self.layers)
        t = self.target_at(state.step)
        gap = s_hat - t
        state.metrics.update(expected_sparsity=s_hat.detach(), target_sparsity=t,
                             lambda1=self.lambda1.detach().clone(), lambda2=self.lambda2.detach().clone())
        if self.optimizer is None:
            return self.lambda1 * gap + self.lambda2 * gap * gap
        self._pending = (gap.detach(), _schedule_factor(state, self.stage))
        return self.lambda1.detach() * gap + self.lambda2.detach() * gap * gap

    def after_step(self, state: TrainState) -> None:
        if self.optimizer is None or state.stage != self.stage or self._pending is None:
            return
        gap, factor = self._pending
        self._pending = None
        self.step_multipliers(gap, factor)

    def step_multipliers(self, gap: Tensor | float, lr_factor: float = 1.0) -> None:
        """One step of the ``"adam"`` optimiser, ascending the Lagrangian: gradients ``(gap, gap^2)`` with
        ``gap = s_hat - t``, learning rate ``lambda_lr * lr_factor``."""
        if self.optimizer is None:
            raise ValueError("step_multipliers needs lambda_optimizer='adam' (with 'trainer' the trainer's "
                             "optimizer steps the multipliers)")
        g = torch.as_tensor(gap, dtype=self.lambda1.dtype, device=self.lambda1.device).detach()
        self.lambda1.grad, self.lambda2.grad = g.clone(), g * g
        for group in self.optimizer.param_groups:
            group["lr"] = self.lambda_lr * float(lr_factor)
        self.optimizer.step()
        self.lambda1.grad = self.lambda2.grad = None

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": self.target, "ramp": self._ramp}
        if self.optimizer is not None:
            out["lambdas"] = torch.stack([self.lambda1.detach(), self.lambda2.detach()]).cpu()
            out["lambda_optimizer"] = copy.deepcopy(self.optimizer.state_dict())  # a snapshot, not live tensors
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._ramp = state.get("ramp", self._ramp)
        if self.optimizer is not None and "lambdas" in state:
            with torch.no_grad():
                self.lambda1.copy_(state["lambdas"][0])
                self.lambda2.copy_(state["lambdas"][1])
            self.optimizer.load_state_dict(state["lambda_optimizer"])


def _schedule_factor(state: TrainState, stage: str) -> float:
    """The trainer's lr-schedule factor of ``stage`` now (its first group's ``lr / initial_lr``; 1 without
    a schedule)."""
    idx = state.stage_names.index(stage) if stage in state.stage_names else 0
    group = state.optimizers[idx].param_groups[0]
    initial = group.get("initial_lr")
    return float(group["lr"]) / float(initial) if initial else 1.0


def flop_param_groups(model: nn.Module, hook: LagrangianHook, *, alpha_lr: float, lambda_lr: float,
                      lr: float | None = None) -> list[dict[str, Any]]:
    """Trainer param groups for FLOP: the model's weights (``lr``, default: the config's), the gates'
    ``log_alpha`` of every gated layer (``alpha_lr``, no weight decay) and, unless the hook has its own
    optimiser (``lambda_optimizer="adam"``), the hook's multipliers (``lambda_lr``, maximised)."""
    alphas = [layer.log_alpha for layer in gated_layers(model).values()]
    ids = {id(p) for p in alphas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    wgroup: dict[str, Any] = {"params": weights, "name": "weights"}
    if lr is not None:
        wgroup["lr"] = float(lr)
    groups = [wgroup, {"params": alphas, "lr": float(alpha_lr), "weight_decay": 0.0, "name": "flop_log_alpha"}]
    if hook.optimizer is None:
        groups.append(hook.param_group(lambda_lr))
    return groups


def train_flop(
    model: nn.Module,
    train_data: Any,
    config: TrainConfig | None = None,
    *,
    target: float,
    warmup_steps: int | None = None,
    warmup_fraction: float = 0.3,
    alpha_lr: float = 0.1,
    lambda_lr: float = 0.2,
    lambda_optimizer: str = "trainer",
    hooks: Sequence[Any] = (),
    **train_kwargs: Any,
) -> TrainResult:
    """Train a factorized model with FLOP's Lagrangian sparsity constraint (:func:`sparsekern.train.train`).

    Args:
        model: a model with gated layers (:func:`factorize` or :func:`gate_factorized`).
        train_data, config: as for :func:`sparsekern.train.train`; for LMs a
            :class:`~sparsekern.text_data.LMSequences` and e.g. ``TrainConfig(optimizer="adam", lr=1e-3)``.
        target: expected sparsity to reach (fraction of the gated layers' dense weights removed).
        warmup_steps, warmup_fraction: the target's linear ramp (see :class:`LagrangianHook`).
        alpha_lr: learning rate of ``log_alpha``; lambda_lr: learning rate of the multipliers. The defaults
            (0.1 and 0.2, in log-odds and multiplier units per step) suit ``optimizer="adam"`` (the paper's), whose
            steps do not scale with the gradient: they reached the target within 0.01 in 300 steps in the
            sweep quoted in :meth:`LagrangianHook.param_group`. With SGD, pass values suited to it.
        lambda_optimizer: ``"trainer"`` (default: the multipliers are a maximised group of the trainer's
            optimizer, without momentum) or ``"adam"`` (the official code's separate Adam, betas (0.9, 0.999),
            at ``lambda_lr`` times the trainer's schedule); see :class:`LagrangianHook`.
        hooks: further hooks, after the Lagrangian.
        train_kwargs: further :func:`sparsekern.train.train` arguments (``eval_data``, ``loss_fn``, ...).

    Returns:
        The trainer's result; its history has ``train_expected_sparsity`` per epoch. ``model.sk_flop_target``
        records ``target`` (copied into the plan by :func:`prune`).
    """
    config = config or TrainConfig()
    hook = LagrangianHook(model, target, warmup_steps=warmup_steps, warmup_fraction=warmup_fraction,
                          lambda_optimizer=lambda_optimizer, lambda_lr=lambda_lr)
    groups = flop_param_groups(model, hook, alpha_lr=alpha_lr, lambda_lr=lambda_lr)
    result = train(model, train_data, config, hooks=[hook, *hooks], params=groups, **train_kwargs)
    model.sk_flop_target = float(target)
    return result


# ----------------------------------------------------------------------------- plan
def prune(model: nn.Module, example_inputs: Any = None, *, meta: Mapping[str, Any] | None = None) -> Plan:
    """The plan of a FLOP-trained model: every gated layer's evaluation gates as a keep-set.

    ``plan.lowrank[name]``: a :class:`~sparsekern.plan.LowRankKeep` (JSON ``{"in", "out", "rank", "keep",
    "scale"}``): the layer's sizes, its number of gates as ``rank`` (the rank of a :class:`FactorizedLinear`,
    the input width of an :class:`InputMaskedLinear`), the sorted indices of the non-zero gates and their
    values (the soft gates ``sigmoid(0.8 log_alpha / beta)``, which the compiler folds into ``Q``, or into
    the kept columns of an input-masked layer's weight). Stored in the plan, not read from the model at
    compile time, so the plan alone decides the pruned model.

    Args:
        model: the factorized model (its gates are read in eval semantics; the model is not modified).
        example_inputs: tensors whose shapes and dtypes are recorded in ``plan.meta["inputs"]``.
        meta: extra JSON-serialisable entries for ``plan.meta``.

    Returns:
        A plan with ``lowrank`` set and ``meta``: ``method="flop"``, ``expected_sparsity``, ``sparsity``
        (:func:`hard_sparsity`), ``params_prunable`` (the gated layers' sparsity denominator), ``params_kept``
        (their compiled weights), the target
        of the last :func:`train_flop` run (if any) and ``inputs``.
    """
    layers = gated_layers(model)
    if not layers:
        raise PlanError("FLOP: the model has no FactorizedLinear layer (nor any other gated layer); call "
                        "sparsekern.methods.flop.factorize(model) and train it with train_flop before pruning")
    lowrank: dict[str, LowRankKeep] = {}
    kept_params = 0
    for name, layer in layers.items():
        gates = layer.eval_gates().float().cpu()
        keep = torch.nonzero(gates).flatten()
        lowrank[name] = LowRankKeep(keep=tuple(keep.tolist()), scale=tuple(gates[keep].tolist()),
                                    rank=layer.n_gates, in_features=layer.in_features,
                                    out_features=layer.out_features)
        kept_params += layer.kept_params(len(keep))
    total = sum(layer.n_prunable_params for layer in layers.values())
    with torch.no_grad():
        s_hat = float(expected_sparsity(list(layers.values())))
    info: dict[str, Any] = {
        "method": "flop",
        "expected_sparsity": s_hat,
        "sparsity": 1.0 - kept_params / total,
        "params_prunable": total,
        "params_kept": kept_params,
    }
    if getattr(model, "sk_flop_target", None) is not None:
        info["target"] = float(model.sk_flop_target)
    if example_inputs is not None:
        info["inputs"] = input_spec(example_inputs)
    info.update(meta or {})
    return Plan(lowrank=lowrank, meta=info)


# ----------------------------------------------------------------------------- end to end
@dataclass
class FlopRun:
    """Outcome of :func:`run_lm`.

    Attributes:
        model: the trained factorized model (eval mode).
        plan: its plan (:func:`prune`).
        compiled: ``sk.compile(model, plan)`` (eval mode).
        report: JSON-serialisable summary: ``model``, ``kwargs``, ``target``, ``expected_sparsity``,
            ``sparsity``, ``params_dense`` (the unfactorized architecture), ``params_compiled``,
            ``test_bpb`` (compiled model, test split), ``compiled_vs_masked_max_rel_err``, ``ranks``
            (layer -> [kept gates, gates]: the kept rank of a factorized layer, the kept input features of an
            input-masked one), ``start`` (``"scratch"``, ``"dense"`` or ``"factorized"``), ``steps``,
            ``train_s``.
        history: the trainer's per-epoch history.
    """

    model: nn.Module
    plan: Plan
    compiled: nn.Module
    report: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)


def run_lm(
    model_name: str,
    corpus: Any,
    config: TrainConfig,
    *,
    target: float,
    model_kwargs: Mapping[str, Any] | None = None,
    start_from: nn.Module | None = None,
    n_proj: int | None = None,
    seq_len: int | None = None,
    eval_bytes: int | None = None,
    seed: int = 0,
    checkpoints: Checkpoints | None = None,
    **flop_kwargs: Any,
) -> FlopRun:
    """FLOP on a byte-level zoo LM, end to end: build (or copy ``start_from``), :func:`factorize`,
    :func:`train_flop`, :func:`prune`, ``sk.compile`` (checked against ``sk.masked``), bits per byte.

    Args:
        model_name: ``"transformer_lm"`` or ``"sru_lm"`` (any zoo model taking int64 (B, T) bytes).
        corpus: a :class:`~sparsekern.text_data.ByteCorpus` (``sparsekern.text_data.load("pystdlib")``).
        config: the trainer settings (e.g. ``TrainConfig(optimizer="adam", lr=3e-3, max_steps=600,
            schedule="constant", ...)``; a decaying schedule also decays the gates' and multipliers' lr).
        target: target sparsity of the factorized layers.
        model_kwargs: zoo constructor arguments (``d_model``, ``layers``, ``context``, ...).
        start_from: a trained model of that architecture to start from (not modified): a dense one is
            copied and factorized with ``init="svd"``, gates at ``p = 0.05``; a factorized one without gates
            (:func:`factorize` with ``gates=False``, then trained: the official Transformer-XL route) gets
            gates on its own factors (:func:`gate_factorized`, ``p = 0.05``). Default: a fresh model,
            factorized with ``init="random"`` (``p = 0.5``), trained with FLOP from scratch.
        n_proj: factorize every layer at this rank, the projection size of the official enwik8 SRU
            (``n_proj``), with the sparsity counted against the factors (``counts_factors``); default: the
            parameter-preserving rank, sparsity against the dense matrices. Not with a factorized
            ``start_from``, whose ranks are its own.
        seq_len: training / evaluation window (default: the model's ``context``, else 128).
        eval_bytes: evaluate on the first this many test bytes only (default: the whole test split).
        seed: seeds the model initialisation.
        checkpoints: a :class:`sparsekern.checkpoint.Checkpoints`; the trained factorized model is checkpointed
            as stage ``train``, and a resumed run loads it instead of training (the rest is recomputed).
        flop_kwargs: further :func:`train_flop` arguments (``warmup_fraction``, ``alpha_lr``, ...).
    """
    from sparsekern.compiler import compile as sk_compile
    from sparsekern.compiler import masked as sk_masked
    from sparsekern.models import build
    from sparsekern.text_data import bits_per_byte

    kwargs = dict(model_kwargs or {})
    torch.manual_seed(seed)
    base = build(model_name, **kwargs) if start_from is None else start_from
    params_dense = sum(p.numel() for p in base.parameters())
    seq_len = int(seq_len or getattr(base, "context", 128))
    model, start = _flop_start(base, start_from is None, n_proj)
    store = checkpoints if checkpoints is not None else Checkpoints(None)
    steps, train_s, history = _train_or_resume(model, corpus, config, target, seq_len, store, flop_kwargs)
    model.eval()
    x = corpus.test[: 2 * seq_len].long().reshape(2, seq_len)
    plan = prune(model, x[:1])
    compiled = sk_compile(model, plan, x[:1]).eval()
    reference = sk_masked(model, plan, x[:1]).eval()
    exact, s_hat = _check_compiled(model, compiled, reference, x)
    report = {
        "model": model_name,
        "kwargs": kwargs,
        "target": float(target),
        "start": start,
        **({} if n_proj is None else {"n_proj": int(n_proj)}),
        "expected_sparsity": s_hat,
        "sparsity": plan.meta["sparsity"],
        "params_dense": params_dense,
        "params_compiled": sum(p.numel() for p in compiled.parameters()),
        "test_bpb": bits_per_byte(compiled, corpus.test, seq_len, max_bytes=eval_bytes),
        "compiled_vs_masked_max_rel_err": exact,
        "ranks": {name: [e.n_keep, e.rank] for name, e in plan.lowrank.items()},
        "steps": steps,
        "train_s": train_s,
    }
    return FlopRun(model, plan, compiled, report, history)


def _flop_start(base: nn.Module, scratch: bool, n_proj: int | None = None) -> tuple[nn.Module, str]:
    """The gated model :func:`run_lm` trains, and its start (``"scratch"``, ``"dense"`` or ``"factorized"``):
    ``base`` factorized at random (a fresh model, converted in place), a copy factorized from its SVD (a
    trained dense model) or a gated copy of its own factors (a trained factorized model); ``n_proj``: the
    rank of the first two, counted as projections (``counts_factors``)."""
    if n_proj is not None and n_proj < 1:
        raise ValueError(f"n_proj must be a positive rank, got {n_proj}")
    projected = {} if n_proj is None else {"rank": int(n_proj), "counts_factors": True}
    if scratch:
        return factorize(base, init="random", **projected), "scratch"
    if any(_has_factors(m) and not isinstance(m, HardConcreteLayer) for m in base.modules()):
        if n_proj is not None:
            raise ValueError(f"n_proj={n_proj}: start_from is a factorized model, whose ranks are its own; drop "
                             "n_proj")
        return gate_factorized(base), "factorized"
    return factorize(copy.deepcopy(base), init="svd", **projected), "dense"


def _train_or_resume(model: nn.Module, corpus: Any, config: TrainConfig, target: float, seq_len: int,
                     store: Checkpoints, flop_kwargs: Mapping[str, Any]) -> tuple[int, float, list[dict[str, float]]]:
    """Train the factorized ``model`` with :func:`train_flop` and checkpoint it as stage ``train``, or load
    that stage when ``store`` has it; returns ``(steps, train_s, history)`` of the training run."""
    from sparsekern.text_data import LMSequences

    store.check()
    done = store.load("train")
    if done is not None:
        done.load_into(model, "model")
        model.sk_flop_target = float(target)
        return done.info["steps"], done.info["train_s"], done.info["history"]
    start = time.perf_counter()
    result = train_flop(model, LMSequences(corpus.train, seq_len), config, target=target, **flop_kwargs)
    train_s = time.perf_counter() - start
    steps, history = result.steps, list(result.history)
    store.save("train", {"steps": steps, "train_s": train_s, "history": history}, {"model": model})
    return steps, train_s, history


def _check_compiled(model: nn.Module, compiled: nn.Module, reference: nn.Module,
                    x: torch.Tensor) -> tuple[float, float]:
    """``(max relative error of compiled against reference on x, expected sparsity of model)``, no grad."""
    with torch.no_grad():
        a, b = compiled(x), reference(x)
        exact = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        s_hat = float(expected_sparsity(model))
    return exact, s_hat


@register_method("flop")
class FLOP(Method):
    """FLOP at a parameter budget: ``budget`` is the fraction of the factorized layers' dense parameters to
    keep (target sparsity ``1 - budget``). A copy of the trained model is factorized from its SVD
    (:func:`factorize`), trained for ``search_epochs`` with the Lagrangian constraint (:func:`train_flop`,
    Adam at lr 3e-3, constant schedule, gradients clipped at 1, as ``sparsekern prune --method flop``) and
    planned (:func:`prune`); ``train_data`` yields ``(x, y)`` batches of the model's inputs and targets
    (:class:`~sparsekern.text_data.LMSequences` for the zoo LMs). The command line runs the LM pipeline
    :meth:`run_lm` instead."""

    kind = "lowrank"
    order = 80
    arms = ()
    searches = True
    summary = "factorized weights with L0 gates on their rank-one components (Wang et al., 2019)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        net = factorize(copy.deepcopy(model), init="svd")
        config = TrainConfig(epochs=ctx.search_epochs, optimizer="adam", lr=3e-3, weight_decay=0.0,
                             schedule="constant", grad_clip=1.0, seed=ctx.seed, progress=ctx.progress)
        train_flop(net, ctx.train_data, config, target=1.0 - budget)
        net.eval()
        return Pruned(prune(net, ctx.example_inputs), net)

    def run_lm(self, model_name: str, corpus: Any, config: TrainConfig, **kwargs: Any) -> FlopRun:
        """FLOP on a byte-level zoo LM, end to end (the module's :func:`run_lm`; what the CLI runs)."""
        return run_lm(model_name, corpus, config, **kwargs)
