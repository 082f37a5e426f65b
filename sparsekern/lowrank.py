"""Low-rank part of a plan: factorized layers with a rank keep-set (FLOP; docs/design.md#low-rank-plans).

A *factorized layer* computes ``y = x Q^T diag(z) P^T + bias`` with ``P`` (out, r), ``Q`` (r, in) and gates
``z`` (r,) (:class:`sparsekern.methods.flop.FactorizedLinear`; any module with attributes ``P``, ``Q`` and
``bias`` of those shapes qualifies). ``plan.lowrank`` maps a layer's qualified name to its pruned gates, a
:class:`~sparsekern.plan.LowRankKeep`; in JSON::

    {"in": in, "out": out, "rank": r, "keep": [k_1 < k_2 < ...], "scale": [z_k1, z_k2, ...]}

(``in``/``out``/``rank`` optional, checked when given; ``scale`` optional, default all ones), i.e. the gates
``m`` with ``m[keep] = scale`` and zeros elsewhere. Then:

* :func:`masked_lowrank` (the reference) replaces each such layer by the factorized layer with the fixed
  gates ``m``, computed densely at full rank ``r``: ``((x Q^T) * m) P^T + bias``;
* :func:`compile_lowrank` replaces it by a :class:`LowRankLinear` of rank ``r' = len(keep)`` with
  ``Q' = diag(scale) Q[keep]`` (the gates folded into ``Q``) and ``P' = P[:, keep]``, running
  :func:`sparsekern.ops.lowrank_linear`: ``y = x Q'^T P'^T + bias``, which equals the reference.

An *input-gated layer* computes ``y = (x * z) W^T + bias`` with ``W`` (out, in) and gates ``z`` (in,) on its
input features (:class:`sparsekern.methods.flop.InputMaskedLinear`; any module with the class attribute
``sk_input_gates = True`` and attributes ``weight`` (out, in) and ``bias`` qualifies): the factorization
``P = W``, ``Q = I`` with ``rank = in``. Its plan entry keeps input features:

* the reference is :class:`MaskedInputLinear`, ``(x * m) W^T + bias``;
* the compiled layer is a :class:`FeatureSelectLinear` that reads only the ``r' = len(keep)`` kept features,
  ``y = x[..., keep] W'^T + bias`` with ``W' = W[:, keep] diag(scale)`` (``in_features = r'``).

Both are called by :func:`sparsekern.compiler.masked` / :func:`sparsekern.compiler.compile` on the traced
``torch.fx.GraphModule``, where factorized layers (``sk_leaf``) are single ``call_module`` nodes under their
qualified names; the submodule is swapped in place, so the graph is unchanged.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from sparsekern import ops
from sparsekern.plan import LowRankKeep, Plan, PlanError

__all__ = ["FeatureSelectLinear", "LowRankLinear", "MaskedFactorizedLinear", "MaskedInputLinear", "compile_lowrank",
           "lowrank_gates", "masked_lowrank", "select_features"]


class LowRankLinear(nn.Module):
    """``y = x Q^T P^T + bias`` on the fused :func:`sparsekern.ops.lowrank_linear` kernel.

    Shapes: x (..., in_features) -> (..., out_features); ``Q`` (rank, in), ``P`` (out, rank), ``bias`` (out,)
    or None. ``rank`` may be 0 (every component pruned): the output is then the bias (or zeros).
    """

    sk_leaf = True

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1 or rank < 0:
            raise ValueError(f"LowRankLinear needs in, out >= 1 and rank >= 0, got in={in_features}, "
                             f"out={out_features}, rank={rank}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.Q = nn.Parameter(torch.zeros(rank, in_features))
        self.P = nn.Parameter(torch.zeros(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_factors(cls, Q: Tensor, P: Tensor, bias: Tensor | None = None) -> "LowRankLinear":
        """A layer holding copies of ``Q`` (r, in), ``P`` (out, r) and ``bias`` (out,)."""
        if Q.dim() != 2 or P.dim() != 2 or P.shape[1] != Q.shape[0]:
            raise ValueError(f"LowRankLinear.from_factors: need Q (r, in) and P (out, r), got Q {tuple(Q.shape)}, "
                             f"P {tuple(P.shape)}")
        if bias is not None and bias.shape != (P.shape[0],):
            raise ValueError(f"LowRankLinear.from_factors: bias must have shape ({P.shape[0]},), got {tuple(bias.shape)}")
        layer = cls(Q.shape[1], P.shape[0], Q.shape[0], bias is not None)
        layer.Q = nn.Parameter(Q.detach().clone())
        layer.P = nn.Parameter(P.detach().clone())
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone())
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if self.rank == 0:
            y = x.new_zeros((*x.shape[:-1], self.out_features))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return ops.lowrank_linear(x, self.Q, self.P, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


class MaskedFactorizedLinear(nn.Module):
    """The reference of a pruned factorized layer: ``((x Q^T) * gates) P^T + bias`` at full rank, with fixed
    gates (r,) (zeros at pruned components). Shares ``P``, ``Q``, ``bias`` with the layer it wraps."""

    sk_leaf = True

    def __init__(self, layer: nn.Module, gates: Tensor) -> None:
        super().__init__()
        self.P, self.Q, self.bias = layer.P, layer.Q, layer.bias
        self.register_buffer("gates", gates.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.Q) * self.gates.to(x.dtype), self.P, self.bias)

    def extra_repr(self) -> str:
        return f"rank={self.Q.shape[0]}, kept={int((self.gates != 0).sum())}"


class MaskedInputLinear(nn.Module):
    """The reference of a pruned input-gated layer: ``(x * gates) W^T + bias`` at full width, with fixed gates
    (in,) (zeros at pruned features). Shares ``weight`` and ``bias`` with the layer it wraps."""

    sk_leaf = True

    def __init__(self, layer: nn.Module, gates: Tensor) -> None:
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.register_buffer("gates", gates.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.gates.to(x.dtype), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, kept={int((self.gates != 0).sum())}"


def select_features(x: Tensor, index: Tensor) -> Tensor:
    """``x.index_select(-1, index)`` (any leading shape), taken along dimension 1 of a 2-D view: torch's CPU
    ``index_select`` along the last dimension of a 3-D tensor runs several times slower (a (1, 512, 1024)
    input, 512 features kept: 0.49 ms against 0.12 ms)."""
    if x.dim() <= 2:
        return x.index_select(-1, index)
    return x.flatten(0, -2).index_select(1, index).unflatten(0, x.shape[:-1])


class FeatureSelectLinear(nn.Module):
    """``y = x[..., index] W^T + bias``: a linear layer that reads only some input features (the compiled
    form of an input-gated layer).

    Shapes: x (..., source_features) -> (..., out_features); ``index`` (in_features,) int64 buffer of the
    features read, in ``[0, source_features)``; ``weight`` (out_features, in_features); ``bias``
    (out_features,) or None. ``in_features`` may be 0 (every feature pruned): the output is then the bias
    (or zeros).
    """

    sk_leaf = True

    def __init__(self, index: Tensor, source_features: int, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        index = torch.as_tensor(index, dtype=torch.int64).flatten()
        if weight.dim() != 2 or weight.shape[1] != index.numel():
            raise ValueError(f"FeatureSelectLinear: need weight (out, {index.numel()}) for {index.numel()} "
                             f"selected features, got {tuple(weight.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= source_features):
            raise ValueError(f"FeatureSelectLinear: feature indices must lie in [0, {source_features})")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"FeatureSelectLinear: bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        self.source_features, self.in_features, self.out_features = source_features, index.numel(), weight.shape[0]
        self.register_buffer("index", index.to(weight.device).clone())
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.source_features:
            raise ValueError(f"FeatureSelectLinear(source_features={self.source_features}): input has "
                             f"{x.shape[-1]} features (shape {tuple(x.shape)})")
        if self.in_features == 0:
            y = x.new_zeros((*x.shape[:-1], self.out_features))
            return y if self.bias is None else y + self.bias.to(x.dtype)
        return F.linear(select_features(x, self.index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"source_features={self.source_features}, in_features={self.in_features}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def _is_input_gated(layer: nn.Module) -> bool:
    w = getattr(layer, "weight", None)
    return bool(getattr(layer, "sk_input_gates", False)) and isinstance(w, Tensor) and w.dim() == 2


def _factorized(gm: nn.Module, name: str, entry: LowRankKeep) -> nn.Module:
    """The factorized or input-gated layer ``name`` of ``gm``, checked against its plan entry."""
    try:
        layer = gm.get_submodule(name)
    except AttributeError:
        raise PlanError(f"plan.lowrank names {name!r}, but the model has no such layer; plan it on the factorized "
                        "model (sparsekern.methods.flop.factorize) it was made for") from None
    if _is_input_gated(layer):
        out_f, in_f = layer.weight.shape
        rank = in_f
    else:
        P, Q = getattr(layer, "P", None), getattr(layer, "Q", None)
        if not (isinstance(P, Tensor) and isinstance(Q, Tensor) and P.dim() == 2 and Q.dim() == 2
                and P.shape[1] == Q.shape[0]):
            raise PlanError(
                f"plan.lowrank names {name!r}, a {type(layer).__name__}, which is not a factorized layer (P (out, "
                "r), Q (r, in)) nor an input-gated one (sk_input_gates, weight (out, in)); factorize the model "
                "first with sparsekern.methods.flop.factorize(model)"
            )
        rank, in_f, out_f = Q.shape[0], Q.shape[1], P.shape[0]
    for key, want, actual in (("rank", entry.rank, rank), ("in", entry.in_features, in_f),
                              ("out", entry.out_features, out_f)):
        if want is not None and want != actual:
            raise PlanError(f"plan.lowrank[{name!r}]: the plan has {key}={want} but the layer has {actual}; "
                            "the plan was made for a different model")
    return layer


def _n_components(layer: nn.Module) -> int:
    return layer.weight.shape[1] if _is_input_gated(layer) else layer.Q.shape[0]


def lowrank_gates(name: str, entry: LowRankKeep | Mapping[str, Any], rank: int) -> tuple[Tensor, Tensor]:
    """(kept indices int64 (r',), their scales float32 (r',)) of a plan entry (a
    :class:`~sparsekern.plan.LowRankKeep` or its JSON form) for a layer of rank ``rank``.

    Raises :class:`PlanError` for a malformed entry: unsorted, repeated or out-of-range indices, or a scale
    list of the wrong length.
    """
    entry = LowRankKeep.from_dict(name, entry)
    keep = list(entry.keep)
    if keep and keep[-1] >= rank:
        raise PlanError(f"plan.lowrank[{name!r}]: 'keep' indices must lie in [0, {rank}), got min {keep[0]}, "
                        f"max {keep[-1]}")
    scale = [1.0] * len(keep) if entry.scale is None else list(entry.scale)
    return torch.tensor(keep, dtype=torch.int64), torch.tensor(scale, dtype=torch.float32)


def masked_lowrank(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any = None) -> torch.fx.GraphModule:
    """Replace every layer named in ``plan.lowrank`` by its reference with the plan's gates (in place; returns
    ``gm``): a factorized layer by :class:`MaskedFactorizedLinear`, an input-gated one by
    :class:`MaskedInputLinear`. ``example_inputs`` is unused (the part needs no tracing)."""
    for name, entry in plan.lowrank_layers().items():
        layer = _factorized(gm, name, entry)
        rank = _n_components(layer)
        keep, scale = lowrank_gates(name, entry, rank)
        ref = layer.weight if _is_input_gated(layer) else layer.Q
        gates = torch.zeros(rank, dtype=ref.dtype, device=ref.device)
        gates[keep.to(gates.device)] = scale.to(gates)
        wrapped = MaskedInputLinear(layer, gates) if _is_input_gated(layer) else MaskedFactorizedLinear(layer, gates)
        gm.set_submodule(name, wrapped)
    gm.recompile()
    return gm


def compile_lowrank(gm: torch.fx.GraphModule, plan: Plan, example_inputs: Any = None) -> torch.fx.GraphModule:
    """Replace every layer named in ``plan.lowrank`` by its compiled form (in place; returns ``gm``): a
    factorized layer by a :class:`LowRankLinear` of the kept rank with the gates folded into ``Q``, an
    input-gated one by a :class:`FeatureSelectLinear` reading the kept features, the gates folded into its
    weight. ``example_inputs`` is unused."""
    for name, entry in plan.lowrank_layers().items():
        layer = _factorized(gm, name, entry)
        keep, scale = lowrank_gates(name, entry, _n_components(layer))
        bias = getattr(layer, "bias", None)
        bias = bias.detach() if isinstance(bias, Tensor) else None
        with torch.no_grad():
            if _is_input_gated(layer):
                w = layer.weight.detach()
                idx = keep.to(w.device)
                new = FeatureSelectLinear(idx, w.shape[1], w.index_select(1, idx) * scale.to(w), bias)
            else:
                idx = keep.to(layer.Q.device)
                q = layer.Q.detach().index_select(0, idx) * scale.to(layer.Q)[:, None]
                p = layer.P.detach().index_select(1, idx)
                new = LowRankLinear.from_factors(q, p, bias)
        new.train(layer.training)
        gm.set_submodule(name, new)
    gm.recompile()
    return gm
