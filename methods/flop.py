"""FLOP: factorized L0 pruning (Wang, Wohlwend & Lei, "Structured Pruning of Large Language Models", 2019).

Every weight matrix ``W`` (out x in) of the layers to prune is re-parametrised as a product of two factors
with a gate per rank-one component::

    W = P diag(z) Q,    P: (out, r),  Q: (r, in),  z in [0, 1]^r        (:class:`FactorizedLinear`)

so that removing component ``k`` (``z_k = 0``) removes column ``k`` of ``P`` and row ``k`` of ``Q``: the
layer becomes a smaller low-rank product, which :func:`sparsekern.compile` runs on the fused
``lowrank_linear`` kernel (:mod:`sparsekern.lowrank`). The default rank ``r = in * out // (in + out)`` gives
the factorized layer the parameter count of the dense one.

Gates (Louizos, Welling & Kingma, "Learning Sparse Neural Networks through L0 Regularization", ICLR 2018):
hard-concrete variables with a learned ``log_alpha`` per component. Training samples, per forward and
shared by the batch, ``u ~ U(0, 1)``, ``s = sigmoid((log u - log(1 - u) + log_alpha) / beta)``,
``z = clamp(s * (1.1 - (-0.1)) + (-0.1), 0, 1)`` with ``beta = 1``. The expected number of non-zero gates
(:meth:`FactorizedLinear.expected_l0`) is ``sum sigmoid(log_alpha - beta * log(0.1 / 1.1))``; a factorized
matrix's expected size is ``(in + out) * E[L0]``; the expected sparsity of the model is
``s_hat = 1 - sum(sizes) / (number of prunable parameters)``, the latter being the size of the *dense*
matrices, ``sum in * out`` over the factorized layers: the authors' code divides by the factors' size
``sum (in + out) * r``, which is the same up to rounding for the default rank; the dense size keeps the
meaning "fraction of the dense weights removed" for any rank (e.g. a full-rank SVD start, whose factors
hold more parameters than the matrix: its ``s_hat`` starts below 0). ``log_alpha`` starts at
``log((1 - p) / p)`` with ``p = 0.5`` for a model trained from scratch, ``p = 0.05`` when starting from
a trained model (plus N(0, 0.01) noise, as the authors' code).

Budget (:class:`LagrangianHook`): the augmented Lagrangian ``task + l1 (s_hat - t) + l2 (s_hat - t)^2``,
minimised over the model and maximised over ``l1, l2`` (a trainer param group with ``maximize=True``),
with the target ``t`` ramped linearly from 0 over a warm-up. Training runs in the one trainer
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
script, which factorizes before training).

Typical use::

    model = sparsekern.models.build("transformer_lm")
    factorize(model, init="random")
    train_flop(model, LMSequences(corpus.train, 128), TrainConfig(optimizer="adam", lr=1e-3, ...), target=0.7)
    plan = prune(model, example_inputs=x)                 # x: int64 (B, T)
    fast = sparsekern.compile(model, plan, example_inputs=x)
"""
from __future__ import annotations

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
    "LagrangianHook",
    "build_factorized",
    "default_rank",
    "expected_sparsity",
    "factorize",
    "factorized_layers",
    "flop_param_groups",
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


class FactorizedLinear(nn.Module):
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
    """

    sk_leaf = True

    def __init__(self, in_features: int, out_features: int, rank: int | None = None, bias: bool = True, *,
                 drop_init: float = 0.5, beta: float = 1.0, init_std: float = 0.01) -> None:
        super().__init__()
        rank = default_rank(in_features, out_features) if rank is None else int(rank)
        if min(in_features, out_features, rank) < 1:
            raise ValueError(f"FactorizedLinear needs positive sizes, got in={in_features}, out={out_features}, "
                             f"rank={rank}")
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.beta = float(beta)
        self.drop_init, self.init_std = float(drop_init), float(init_std)
        self.P = nn.Parameter(torch.empty(out_features, rank))
        self.Q = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.log_alpha = nn.Parameter(torch.empty(rank))
        self.reset_parameters()

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

    def reset_gates(self, drop_init: float | None = None) -> None:
        """``log_alpha = log((1 - p) / p) + N(0, init_std)`` with ``p = drop_init`` (default: the layer's)."""
        if drop_init is not None:
            self.drop_init = float(drop_init)
        with torch.no_grad():
            self.log_alpha.normal_(_log_alpha_init(self.drop_init), self.init_std)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int | None = None, *, init: str = "svd",
                    drop_init: float | None = None, beta: float = 1.0, init_std: float = 0.01) -> "FactorizedLinear":
        """A factorized copy of ``linear`` (on its device and dtype).

        Args:
            linear: the dense layer.
            rank: ``r`` (default :func:`default_rank`).
            init: ``"svd"``: ``P = U_r sqrt(S_r)``, ``Q = sqrt(S_r) V_r^T`` from the SVD ``W = U S V^T``, so
                ``P Q`` is the best rank-``r`` approximation of ``W`` (equal to it when ``r >= min(in, out)``;
                components beyond ``min(in, out)`` are zero); ``"random"``: fresh factors with the scale of
                ``W``'s entries (its std). The bias is copied in both cases.
            drop_init: gate initialisation ``p`` (default 0.05 for ``"svd"``, 0.5 for ``"random"``).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear takes an nn.Linear, got {type(linear).__name__}")
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {init!r}")
        if drop_init is None:
            drop_init = 0.05 if init == "svd" else 0.5
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, rank, linear.bias is not None,
                    drop_init=drop_init, beta=beta, init_std=init_std)
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

    # ------------------------------------------------------------------ gates
    def expected_l0(self) -> Tensor:
        """Expected number of non-zero gates, ``sum sigmoid(log_alpha - beta log(-l / r))`` (scalar tensor,
        differentiable in ``log_alpha``)."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-LIMIT_L / LIMIT_R)).sum()

    def expected_size(self) -> Tensor:
        """Expected parameter count of the pruned factors, ``(in + out) * E[L0]`` (scalar tensor)."""
        return (self.in_features + self.out_features) * self.expected_l0()

    @property
    def n_factor_params(self) -> int:
        """Parameters of the two factors, ``(in + out) * r``."""
        return (self.in_features + self.out_features) * self.rank

    @property
    def n_dense_params(self) -> int:
        """Parameters of the dense matrix the layer stands for, ``in * out`` (the sparsity denominator)."""
        return self.in_features * self.out_features

    def sample_gates(self) -> Tensor:
        """One hard-concrete draw ``z`` (r,), differentiable in ``log_alpha`` (reparametrised)."""
        u = torch.rand_like(self.log_alpha).clamp(_UNIFORM_EPS, 1.0 - _UNIFORM_EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)

    def eval_gates(self) -> Tensor:
        """Deterministic gates (r,): ``sigmoid(0.8 log_alpha / beta)``, with the ``round(r - E[L0])`` smallest
        set to zero (ties: lower index first). Not differentiable."""
        with torch.no_grad():
            n_zeros = round(self.rank - float(self.expected_l0()))
            soft = torch.sigmoid(EVAL_SHARPNESS * self.log_alpha.detach() / self.beta)
            if n_zeros > 0:
                order = torch.sort(soft, stable=True).indices
                soft[order[:n_zeros]] = 0.0
        return soft

    def gates(self) -> Tensor:
        """:meth:`sample_gates` in train mode, :meth:`eval_gates` in eval mode."""
        return self.sample_gates() if self.training else self.eval_gates()

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
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, beta={self.beta}")


# ----------------------------------------------------------------------------- model conversion
def factorized_layers(model: nn.Module) -> dict[str, FactorizedLinear]:
    """Qualified name -> every :class:`FactorizedLinear` of ``model``, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FactorizedLinear)}


def factorize(
    model: nn.Module,
    layers: Iterable[str] | None = None,
    *,
    exclude: Sequence[str] = ("head",),
    rank: int | Mapping[str, int] | Callable[[int, int], int] | None = None,
    init: str = "svd",
    drop_init: float | None = None,
    beta: float = 1.0,
) -> nn.Module:
    """Replace ``nn.Linear`` layers of ``model`` (in place) by :class:`FactorizedLinear` layers.

    Args:
        model: the model; returned for chaining.
        layers: qualified names of the linear layers to factorize; default: every ``nn.Linear`` not in
            ``exclude``.
        exclude: names left dense when ``layers`` is None (the zoo LMs' output layer is ``"head"``; the
            paper keeps embeddings and softmax dense; embeddings are not linear layers anyway).
        rank: an int for every layer, a mapping name -> rank, or ``f(in, out) -> rank``; default
            :func:`default_rank` (the dense parameter count).
        init, drop_init, beta: see :meth:`FactorizedLinear.from_linear` (``"svd"`` by default: keep what a
            trained model learned; pass ``init="random"`` to train with FLOP from scratch).

    Returns:
        ``model``. If it came from :func:`sparsekern.models.build` its ``sk_arch`` becomes a factory record
        (:func:`build_factorized`) so that ``sk.save`` / ``sk.load`` rebuild the factorized architecture.

    Raises:
        ValueError: an unknown or non-linear layer name, or nothing to factorize.
    """
    modules = dict(model.named_modules())
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
    ranks: dict[str, int] = {}
    for n in names:
        lin = modules[n]
        if rank is None:
            r = None
        elif isinstance(rank, int):
            r = rank
        elif isinstance(rank, Mapping):
            r = rank.get(n)
        else:
            r = int(rank(lin.in_features, lin.out_features))
        layer = FactorizedLinear.from_linear(lin, r, init=init, drop_init=drop_init, beta=beta)
        model.set_submodule(n, layer)
        ranks[n] = layer.rank
    arch = getattr(model, "sk_arch", None)
    if isinstance(arch, Mapping):
        if "factory" in arch and arch.get("factory") == _FACTORY:
            kwargs = dict(arch["kwargs"])
            kwargs["ranks"] = {**kwargs["ranks"], **ranks}
            model.sk_arch = {"factory": _FACTORY, "kwargs": kwargs}
        else:
            model.sk_arch = {"factory": _FACTORY, "kwargs": {"arch": dict(arch), "ranks": ranks, "beta": beta}}
    return model


_FACTORY = "sparsekern.methods.flop:build_factorized"


def build_factorized(arch: Mapping[str, Any], ranks: Mapping[str, int], beta: float = 1.0) -> nn.Module:
    """Rebuild a factorized architecture (the ``sk_arch`` factory that :func:`factorize` records).

    ``arch`` is the dense model's architecture reference (see :func:`sparsekern.serialize.build_arch`),
    ``ranks`` the factorized layers and their ranks. Weights are random (``sk.load`` overwrites them).
    """
    from sparsekern.serialize import build_arch

    model = build_arch(arch)
    model.sk_arch = dict(arch)
    return factorize(model, list(ranks), rank=dict(ranks), init="random", beta=beta)


# ----------------------------------------------------------------------------- sparsity
def _layers_of(model_or_layers: nn.Module | Iterable[FactorizedLinear]) -> list[FactorizedLinear]:
    if isinstance(model_or_layers, nn.Module):
        layers = list(factorized_layers(model_or_layers).values())
    else:
        layers = list(model_or_layers)
    if not layers:
        raise ValueError("the model has no FactorizedLinear layer: call sparsekern.methods.flop.factorize(model) "
                         "first")
    return layers


def expected_sparsity(model_or_layers: nn.Module | Iterable[FactorizedLinear]) -> Tensor:
    """``s_hat = 1 - sum (in + out) E[L0] / sum in * out`` over the factorized layers (differentiable)."""
    layers = _layers_of(model_or_layers)
    total = sum(layer.n_dense_params for layer in layers)
    return 1.0 - torch.stack([layer.expected_size() for layer in layers]).sum() / total


def hard_sparsity(model_or_layers: nn.Module | Iterable[FactorizedLinear]) -> float:
    """Sparsity of the evaluation gates, ``1 - sum (in + out) nnz(z) / sum in * out``: the fraction of the dense
    weights of the factorized layers that the compiled model does without."""
    layers = _layers_of(model_or_layers)
    total = sum(layer.n_dense_params for layer in layers)
    kept = sum((layer.in_features + layer.out_features) * int((layer.eval_gates() != 0).sum()) for layer in layers)
    return 1.0 - kept / total


class LagrangianHook(Hook):
    """FLOP's sparsity constraint as a trainer hook: adds ``l1 (s_hat - t) + l2 (s_hat - t)^2``.

    ``s_hat`` is :func:`expected_sparsity` of the factorized layers; ``t`` ramps linearly from 0 to ``target``
    over the warm-up (``t = target * min(1, (step + 1) / warmup_steps)``), then stays. The multipliers
    ``lambda1``, ``lambda2`` (scalar parameters, start at 0) belong to the hook; give
    :meth:`param_group` to the trainer so that they are *maximised* (gradient ascent), which raises the
    penalty until the constraint ``s_hat = t`` holds.

    Args:
        model_or_layers: the factorized model (or its :class:`FactorizedLinear` layers).
        target: the sparsity to reach, in [0, 1).
        warmup_steps: length of the ramp in optimizer steps; ``None``: ``warmup_fraction`` of the run.
        warmup_fraction: see ``warmup_steps``.
        stage: the trainer stage whose objective gets the term.

    Logged metrics: ``expected_sparsity``, ``target_sparsity``, ``lambda1``, ``lambda2``.
    """

    def __init__(self, model_or_layers: nn.Module | Iterable[FactorizedLinear], target: float, *,
                 warmup_steps: int | None = None, warmup_fraction: float = 0.3, stage: str = "main") -> None:
        if not 0.0 <= float(target) < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target}")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction}")
        self.layers = _layers_of(model_or_layers)
        self.target = float(target)
        self.warmup_steps = warmup_steps
        self.warmup_fraction = float(warmup_fraction)
        self.stage = stage
        self.lambda1 = nn.Parameter(torch.zeros(()))
        self.lambda2 = nn.Parameter(torch.zeros(()))
        self._ramp = warmup_steps

    def param_group(self, lr: float) -> dict[str, Any]:
        """The multipliers as a trainer param group: gradient *ascent* at ``lr``, no weight decay, no momentum
        (``betas=(0, 0.999)`` for Adam, ``momentum=0`` for SGD; the optimizer ignores the other key).

        Momentum on the multipliers makes the min-max oscillate around the target: on a 1-layer, d=32 byte LM
        (300 Adam steps, 6 model/target/seed cases from 0.4 to 0.9) the largest final ``|s_hat - t|`` was
        0.06-0.27 with Adam's default ``beta1 = 0.9`` and 0.008 with ``beta1 = 0``.
        """
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

    def loss(self, state: TrainState, batch: Any, outputs: Any) -> Tensor | None:
        if state.stage != self.stage:
            return None
        s_hat = expected_sparsity(self.layers)
        t = self.target_at(state.step)
        gap = s_hat - t
        state.metrics.update(expected_sparsity=s_hat.detach(), target_sparsity=t,
                             lambda1=self.lambda1.detach().clone(), lambda2=self.lambda2.detach().clone())
        return self.lambda1 * gap + self.lambda2 * gap * gap

    def state_dict(self) -> dict[str, Any]:
        return {"target": self.target, "ramp": self._ramp}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._ramp = state.get("ramp", self._ramp)


def flop_param_groups(model: nn.Module, hook: LagrangianHook, *, alpha_lr: float, lambda_lr: float,
                      lr: float | None = None) -> list[dict[str, Any]]:
    """Trainer param groups for FLOP: the model's weights (``lr``, default: the config's), the gates'
    ``log_alpha`` (``alpha_lr``, no weight decay) and the hook's multipliers (``lambda_lr``, maximised)."""
    alphas = [layer.log_alpha for layer in factorized_layers(model).values()]
    ids = {id(p) for p in alphas}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    wgroup: dict[str, Any] = {"params": weights, "name": "weights"}
    if lr is not None:
        wgroup["lr"] = float(lr)
    return [wgroup, {"params": alphas, "lr": float(alpha_lr), "weight_decay": 0.0, "name": "flop_log_alpha"},
            hook.param_group(lambda_lr)]


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
    hooks: Sequence[Any] = (),
    **train_kwargs: Any,
) -> TrainResult:
    """Train a factorized model with FLOP's Lagrangian sparsity constraint (:func:`sparsekern.train.train`).

    Args:
        model: a model with :class:`FactorizedLinear` layers (:func:`factorize`).
        train_data, config: as for :func:`sparsekern.train.train`; for LMs a
            :class:`~sparsekern.text_data.LMSequences` and e.g. ``TrainConfig(optimizer="adam", lr=1e-3)``.
        target: expected sparsity to reach (fraction of the factorized layers' dense weights removed).
        warmup_steps, warmup_fraction: the target's linear ramp (see :class:`LagrangianHook`).
        alpha_lr: learning rate of ``log_alpha``; lambda_lr: learning rate of the multipliers. The defaults
            (0.1 and 0.2, in log-odds and multiplier units per step) suit ``optimizer="adam"`` (the paper's), whose
            steps do not scale with the gradient: they reached the target within 0.01 in 300 steps in the
            sweep quoted in :meth:`LagrangianHook.param_group`. With SGD, pass values suited to it.
        hooks: further hooks, after the Lagrangian.
        train_kwargs: further :func:`sparsekern.train.train` arguments (``eval_data``, ``loss_fn``, ...).

    Returns:
        The trainer's result; its history has ``train_expected_sparsity`` per epoch. ``model.sk_flop_target``
        records ``target`` (copied into the plan by :func:`prune`).
    """
    config = config or TrainConfig()
    hook = LagrangianHook(model, target, warmup_steps=warmup_steps, warmup_fraction=warmup_fraction)
    groups = flop_param_groups(model, hook, alpha_lr=alpha_lr, lambda_lr=lambda_lr)
    result = train(model, train_data, config, hooks=[hook, *hooks], params=groups, **train_kwargs)
    model.sk_flop_target = float(target)
    return result


# ----------------------------------------------------------------------------- plan
def prune(model: nn.Module, example_inputs: Any = None, *, meta: Mapping[str, Any] | None = None) -> Plan:
    """The plan of a FLOP-trained model: every factorized layer's evaluation gates as a rank keep-set.

    ``plan.lowrank[name]``: a :class:`~sparsekern.plan.LowRankKeep` (JSON ``{"in", "out", "rank", "keep",
    "scale"}``): the layer's sizes, the sorted indices
    of the non-zero gates and their values (the soft gates ``sigmoid(0.8 log_alpha / beta)``, which the
    compiler folds into ``Q``). Stored in the plan, not read from the model at compile time, so the plan
    alone decides the pruned model.

    Args:
        model: the factorized model (its gates are read in eval semantics; the model is not modified).
        example_inputs: tensors whose shapes and dtypes are recorded in ``plan.meta["inputs"]``.
        meta: extra JSON-serialisable entries for ``plan.meta``.

    Returns:
        A plan with ``lowrank`` set and ``meta``: ``method="flop"``, ``expected_sparsity``, ``sparsity``
        (:func:`hard_sparsity`), ``params_prunable`` (dense size of the factorized layers), ``params_kept``
        (their compiled factors), the target
        of the last :func:`train_flop` run (if any) and ``inputs``.
    """
    layers = factorized_layers(model)
    if not layers:
        raise PlanError("FLOP: the model has no FactorizedLinear layer; call sparsekern.methods.flop.factorize("
                        "model) and train it with train_flop before pruning")
    lowrank: dict[str, LowRankKeep] = {}
    kept_params = 0
    for name, layer in layers.items():
        gates = layer.eval_gates().float().cpu()
        keep = torch.nonzero(gates).flatten()
        lowrank[name] = LowRankKeep(keep=tuple(keep.tolist()), scale=tuple(gates[keep].tolist()), rank=layer.rank,
                                    in_features=layer.in_features, out_features=layer.out_features)
        kept_params += (layer.in_features + layer.out_features) * len(keep)
    total = sum(layer.n_dense_params for layer in layers.values())
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
            (layer -> [kept, rank]), ``steps``, ``train_s``.
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
        start_from: a trained dense model of that architecture to start from (copied; factorized with
            ``init="svd"``, gates at ``p = 0.05``); default: a fresh model, factorized with ``init="random"``
            (``p = 0.5``), trained with FLOP from scratch.
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
    model = build(model_name, **kwargs) if start_from is None else copy.deepcopy(start_from)
    params_dense = sum(p.numel() for p in model.parameters())
    seq_len = int(seq_len or getattr(model, "context", 128))
    factorize(model, init="random" if start_from is None else "svd")
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
        "start": "scratch" if start_from is None else "dense",
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
