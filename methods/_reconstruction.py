"""Shared mechanics of reconstruction-based channel pruning: ThiNet and LASSO regression.

ThiNet (Luo, Wu, Lin: "ThiNet: A Filter Level Pruning Method for Deep Neural Network Compression", ICCV 2017)
and LASSO channel pruning (He, Zhang, Sun: "Channel Pruning for Accelerating Very Deep Neural Networks",
ICCV 2017) prune the output channels of a layer by how well the *next* layer (the **consumer**) can still
produce its output without them, then refit the consumer's weights by least squares. Only the selection
rule differs (:mod:`sparsekern.methods.thinet`, :mod:`sparsekern.methods.lasso`); everything else is here.

Notation, for one consumer of the group being pruned (a group with several consumers stacks their rows):

* ``S`` sampled output locations: (image, row, column) of a conv consumer's output, or a row of a linear
  consumer's (flattened) input; ``O`` consumer output channels;
* ``P`` consumer input positions (input channels of a conv, input features of a linear) and ``t`` taps per
  position (``kh * kw`` for a conv, 1 for a linear); ``C`` channels of the group;
* ``pos[p]`` in ``{-1, 0..C-1}``: the group channel at input position ``p``
  (:meth:`ChannelGraph.consumers`; a flattened input repeats a channel over its ``H * W`` positions;
  ``-1`` = a channel of another group, held fixed);
* ``X`` (S, P, t): the consumer's input patch at each sampled location, from the model **pruned so far**;
* ``W`` (O, P, t): the consumer's current weights;
* ``Y`` (S, O): the **unpruned** model's consumer output at the same locations, minus the bias (the target);
* ``Z[s, o, c] = sum_{p: pos[p] = c} sum_t W[o, p, t] X[s, p, t]``: the contribution of channel ``c`` to
  output element ``(s, o)``, i.e. the ``(S * O, C)`` regressor matrix of both papers (ThiNet samples one
  output channel per location; using all ``O`` of them is a superset of its samples, He et al.'s form);
* ``T = Y - (contribution of the fixed positions, pos = -1)`` (S, O): what the group's channels must
  reproduce. Without pruned predecessors, ``T = sum_c Z[:, :, c]`` exactly.

The selection rules see ``Z`` only through ``G = Z^T Z`` (C, C), ``b = Z^T T`` (C,) and ``||T||^2``
(:class:`LayerStats`), accumulated in float64 over chunks of samples, so ``Z`` is never held whole
(:func:`contributions` builds it explicitly, for inspection and tests).

**Sequential pruning** (both papers prune layer by layer): layers are processed in graph order. Layer
``k``'s statistics are collected on ``sparsekern.masked(refitted copy, plan of layers < k)``, i.e. with the
earlier layers already pruned *and* their consumers already refitted, while the targets ``Y`` always come
from the unpruned model (He et al. sec. 3.3: "input volumes from the current input feature maps, output
volumes from the un-pruned model"), so each refit also compensates the error accumulated upstream.
There is no fine-tuning between layers (ThiNet fine-tunes one or two epochs after each layer; use
:func:`sparsekern.train.train` on the result for that). A channel whose value depends on its group's other
channels (a LayerNorm/GroupNorm between producer and consumer) is treated as if pruning did not change it.

**Refit** (``refit="weights"``, both papers' last step): for each consumer, the weights at the input positions
of the kept channels are re-solved by least squares on the sampled locations, the other positions held fixed:
``min_W' ||T - X_K W'^T||^2 + lam ||W' - W_K||^2`` with ``X_K`` (S, |K| * t) the kept positions' patches, by
``torch.linalg.lstsq`` in float64. The small ridge ``lam = ridge * mean(diag(X_K^T X_K))`` (default
``ridge = 1e-4``) pulls the solution toward the current weights rather than toward zero, so directions the
samples do not excite (a channel that is always 0 after ReLU on the samples) keep their weights instead of
becoming arbitrary. ``refit="scale"`` is ThiNet's own variant: one scale ``w_c`` per kept channel, shared by
all consumer weights of that channel, ``min_w ||T - Z_K w||^2 + lam ||w - 1||^2``. ``refit="none"`` keeps
the weights. The refitted weights are written into a **copy** of the model at the kept positions; pruned
positions keep their old values (the masked reference zeroes their inputs and the compiler slices them out),
so ``sparsekern.compile(copy, plan) == sparsekern.masked(copy, plan)``.

Only groups whose consumers are plain ``nn.Conv2d`` (``groups=1``, zero padding) or ``nn.Linear`` layers can be
pruned this way; anything else (a depthwise or grouped conv reading the group, ...) is a :class:`PlanError`
naming the layer. Layers are single-producer groups (``prunable_layers(cg, "internal")`` of
:mod:`sparsekern.methods.l1_norm`): block-internal convs in ResNets, every conv in VGG.
"""
from __future__ import annotations

import copy
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sparsekern.compiler import masked
from sparsekern.data import loader
from sparsekern.graph import ChannelGraph, trace_channels
from sparsekern.methods.l1_norm import prunable_layers
from sparsekern.plan import GroupKeep, Plan, PlanError

__all__ = [
    "ConsumerSamples",
    "LayerStats",
    "Selection",
    "REFIT_MODES",
    "check_consumers",
    "collect",
    "contributions",
    "layer_stats",
    "prune_by_reconstruction",
    "reconstruction_error",
    "refit_consumers",
    "resolve_ratios",
    "take_batches",
]

REFIT_MODES = ("weights", "scale", "none")
_CHUNK_ELEMENTS = 1 << 22  # elements of one (s, O, C) chunk of Z while accumulating the Gram matrix


# ----------------------------------------------------------------------------- data structures
@dataclass
class ConsumerSamples:
    """What one consumer contributes to the regression of one group (see the module docstring).

    Attributes:
        name: the consumer layer's name.
        patches: ``X`` (S, P, t) float32, its input at the sampled locations (model pruned so far).
        target: ``Y`` (S, O) float32, the unpruned model's output there, minus the bias.
        weight: ``W`` (O, P, t) float32, the consumer's weights when the samples were taken.
        positions: ``pos`` (P,) int64, the group channel at each input position, -1 for fixed positions.
    """

    name: str
    patches: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    positions: np.ndarray

    @property
    def n_samples(self) -> int:
        return int(self.patches.shape[0])

    def split(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position contributions and target for the sample rows ``rows``, float64:
        (s, O, P_g) over the group's input positions (``pos >= 0``; :func:`contributions` sums each channel's
        positions) and ``T`` (s, O), the target minus the fixed positions' contributions.
        """
        x = self.patches[rows].double()
        w = self.weight.double()
        zpos = torch.einsum("spt,opt->sop", x, w)  # (s, O, P): contribution of each input position
        fixed = torch.from_numpy(self.positions < 0)
        t = self.target[rows].double()
        if bool(fixed.any()):
            t = t - zpos[:, :, fixed].sum(-1)
        return zpos[:, :, ~fixed], t


@dataclass
class LayerStats:
    """Sufficient statistics of one group's regression, summed over its consumers.

    Attributes:
        layer: the producer layer; group: its dependency group; size: ``C``.
        gram: ``G = Z^T Z`` (C, C) float64; ``zty``: ``b = Z^T T`` (C,) float64.
        tt: ``||T||^2``; yy: ``||Y||^2`` (the scale of the relative errors); n_rows: ``sum S * O``.
        consumers: the samples each consumer contributed.
    """

    layer: str
    group: str
    size: int
    gram: torch.Tensor
    zty: torch.Tensor
    tt: float
    yy: float
    n_rows: int
    consumers: list[ConsumerSamples] = field(default_factory=list)

    def error_of(self, keep: Sequence[int], coef: torch.Tensor | None = None) -> float:
        """Relative error ``||T - Z_K coef||^2 / ||Y||^2`` on the samples (coef = 1: the consumer as is)."""
        k = torch.as_tensor(list(keep), dtype=torch.long)
        w = torch.ones(len(k), dtype=torch.float64) if coef is None else coef.double()
        e = self.tt - 2.0 * float(w @ self.zty[k]) + float(w @ self.gram[k][:, k] @ w)
        return max(e, 0.0) / max(self.yy, 1e-300)


@dataclass
class Selection:
    """A selection rule's answer: kept channel indices (sorted), per-channel scores (higher = more
    important, length ``C``, used by channel rounding) and JSON-serializable facts for the plan's meta."""

    keep: np.ndarray
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


Selector = Callable[[LayerStats, int], Selection]


# ----------------------------------------------------------------------------- consumers and sampling
def check_consumers(cg: ChannelGraph, layer: str, group: str) -> dict[str, np.ndarray]:
    """The group's consumers (name -> ``pos``), or :class:`PlanError` naming a layer this module cannot refit."""
    consumers = cg.consumers(group)
    if not consumers:
        raise PlanError(
            f"layer {layer!r}: no conv/linear layer reads its channels, so there is no next layer whose output "
            "could be reconstructed; prune it with another method (e.g. l1_norm)"
        )
    for name in consumers:
        m = cg.modules[name]
        if isinstance(m, nn.Linear):
            continue
        if not isinstance(m, nn.Conv2d) or type(m).forward is not nn.Conv2d.forward:
            why = f"it is a {type(m).__name__}, and only nn.Conv2d and nn.Linear consumers are supported"
        elif m.groups != 1:
            why = f"it is a grouped/depthwise conv (groups={m.groups}); only regular convs (groups=1) can be refit"
        elif m.padding_mode != "zeros":
            why = f"its padding_mode is {m.padding_mode!r}; only zero padding is supported"
        else:
            continue
        raise PlanError(
            f"layer {layer!r} cannot be pruned by reconstruction: its channels are read by {name!r}, and {why}"
        )
    return consumers


def _consumer_weight(m: nn.Module) -> torch.Tensor:
    """``W`` (O, P, t) of a conv or linear (a view of the live parameter)."""
    w = m.weight.detach()
    return w.reshape(w.shape[0], w.shape[1], -1)


def _n_locations(m: nn.Module, out: torch.Tensor) -> int:
    if isinstance(m, nn.Linear):
        return int(out.numel() // out.shape[-1])
    return int(out.shape[0] * out.shape[2] * out.shape[3])


def _output_rows(m: nn.Module, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Output at the flat locations ``idx``, minus the bias: (S, O)."""
    if isinstance(m, nn.Linear):
        y = out.reshape(-1, out.shape[-1])[idx]
    else:
        y = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])[idx]
    if m.bias is not None:
        y = y - m.bias.detach()
    return y.float()


def _input_patches(m: nn.Module, x: torch.Tensor, out_shape: torch.Size, idx: torch.Tensor) -> torch.Tensor:
    """The input patch read by each output location ``idx`` (flat over N*Ho*Wo, or rows of a linear): (S, P, t)."""
    if isinstance(m, nn.Linear):
        return x.reshape(-1, x.shape[-1])[idx].unsqueeze(-1).float()
    ho, wo = int(out_shape[2]), int(out_shape[3])
    n, rem = idx // (ho * wo), idx % (ho * wo)
    i, j = rem // wo, rem % wo
    pad = m._reversed_padding_repeated_twice  # (left, right, top, bottom): explicit even for padding="same"
    xp = F.pad(x, pad) if any(pad) else x
    kh, kw = m.kernel_size
    rows = i[:, None] * m.stride[0] + torch.arange(kh, device=x.device) * m.dilation[0]  # (S, kh)
    cols = j[:, None] * m.stride[1] + torch.arange(kw, device=x.device) * m.dilation[1]  # (S, kw)
    patches = xp[n[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (S, kh, kw, P)
    return patches.permute(0, 3, 1, 2).reshape(idx.shape[0], x.shape[1], kh * kw).float()


def _sample(n_total: int, n_want: int, seed: int, name: str, batch: int) -> torch.Tensor:
    """Seeded choice of ``min(n_want, n_total)`` distinct flat locations (sorted)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), batch])
    k = min(n_want, n_total)
    return torch.from_numpy(np.sort(rng.choice(n_total, size=k, replace=False)).astype(np.int64))


def _per_batch(n_samples: int, n_batches: int) -> list[int]:
    return [n_samples // n_batches + (1 if b < n_samples % n_batches else 0) for b in range(n_batches)]


class _Stop(Exception):
    """Raised by a hook once every consumer of interest has run, to skip the rest of the forward."""


def take_batches(data: Any, batches: int, *, batch_size: int = 128, seed: int = 0,
                 device: torch.device | None = None) -> list[torch.Tensor]:
    """The inputs ``x`` of the first ``batches`` batches of ``data`` (a DataLoader, or a Dataset read through a
    loader shuffled by ``seed``; batches are ``(x, y, ...)`` or ``x``), moved to ``device``."""
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    if isinstance(data, DataLoader):
        it: Iterable[Any] = data
    elif isinstance(data, Dataset):
        it = loader(data, batch_size, shuffle=True, seed=seed)
    else:
        raise TypeError(f"data must be a torch DataLoader or Dataset of (x, y), got {type(data).__name__}")
    xs = []
    for batch in it:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        xs.append(x.to(device) if device is not None else x)
        if len(xs) == batches:
            break
    if not xs:
        raise ValueError("data yielded no batches")
    return xs


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _run_hooked(model: nn.Module, names: Sequence[str], x: torch.Tensor,
                on_call: Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]) -> None:
    """Run ``model(x)`` in eval mode without grad, calling ``on_call(name, module, input, output)`` for each
    consumer in ``names`` once; the forward stops as soon as all of them have run."""
    seen: set[str] = set()
    handles = []

    def make(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if name in seen:
                raise PlanError(f"layer {name!r} is called more than once per forward; shared layers cannot be refit")
            seen.add(name)
            on_call(name, module, args[0], out)
            if len(seen) == len(names):
                raise _Stop

        return hook

    for name in names:
        handles.append(model.get_submodule(name).register_forward_hook(make(name)))
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        for m, t in flags:
            m.training = t
    missing = [n for n in names if n not in seen]
    if missing:
        raise PlanError(f"layers {missing} were not called in the forward pass; cannot sample their inputs")


def _targets(original: nn.Module, names: Sequence[str], xs: Sequence[torch.Tensor], n_samples: int,
             seed: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """For each consumer and batch: (sampled flat locations, unpruned output there minus bias (S_b, O))."""
    want = _per_batch(n_samples, len(xs))
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    for b, x in enumerate(xs):
        def on_call(name: str, m: nn.Module, inp: torch.Tensor, y: torch.Tensor, b: int = b) -> None:
            idx = _sample(_n_locations(m, y), want[b], seed, name, b).to(y.device)
            out[name].append((idx, _output_rows(m, y, idx)))

        _run_hooked(original, names, x, on_call)
    return out


def collect(current: nn.Module, consumers: Mapping[str, np.ndarray], xs: Sequence[torch.Tensor],
            targets: Mapping[str, list[tuple[torch.Tensor, torch.Tensor]]]) -> list[ConsumerSamples]:
    """Sample each consumer's input patches in ``current`` (the model pruned so far) at the locations of
    ``targets`` (from :func:`_targets` on the unpruned model), one :class:`ConsumerSamples` per consumer."""
    names = list(consumers)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    weights: dict[str, torch.Tensor] = {}
    for b, x in enumerate(xs):
        def on_call(name: str, m: nn.Module, inp: torch.Tensor, y: torch.Tensor, b: int = b) -> None:
            idx = targets[name][b][0]
            parts[name].append(_input_patches(m, inp, y.shape, idx))
            weights[name] = _consumer_weight(m).float().clone()

        _run_hooked(current, names, x, on_call)
    return [
        ConsumerSamples(
            name=n,
            patches=torch.cat(parts[n]),
            target=torch.cat([t for _, t in targets[n]]),
            weight=weights[n],
            positions=np.asarray(consumers[n], dtype=np.int64),
        )
        for n in names
    ]


# ----------------------------------------------------------------------------- regression statistics
def contributions(s: ConsumerSamples, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Z, T)`` of one consumer: Z (S * O, C) float64, row ``s * O + o`` = output element (s, o), column c =
    channel c's contribution (positions of a channel summed); T (S * O,) the target left for the group."""
    zg, t = s.split(slice(None))
    z = _by_channel(zg, s.positions, size)
    return z.reshape(-1, size), t.reshape(-1)


def _by_channel(zg: torch.Tensor, positions: np.ndarray, size: int) -> torch.Tensor:
    """Sum the group positions' contributions (s, O, P_g) into channels: (s, O, C)."""
    pos = positions[positions >= 0]
    if len(pos) == size and np.array_equal(pos, np.arange(size)):
        return zg
    index = torch.from_numpy(pos).to(zg.device)
    return zg.new_zeros(zg.shape[0], zg.shape[1], size).index_add_(2, index, zg)


def layer_stats(layer: str, group: str, size: int, samples: Sequence[ConsumerSamples]) -> LayerStats:
    """Accumulate ``G = Z^T Z``, ``b = Z^T T``, ``||T||^2`` and ``||Y||^2`` over every consumer's samples."""
    gram = torch.zeros(size, size, dtype=torch.float64)
    zty = torch.zeros(size, dtype=torch.float64)
    tt = yy = 0.0
    rows = 0
    for s in samples:
        n, o, p = s.n_samples, s.weight.shape[0], s.weight.shape[1]
        step = max(1, _CHUNK_ELEMENTS // max(1, o * max(p, size)))
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            zg, t = s.split(sl)
            z = _by_channel(zg, s.positions, size).reshape(-1, size).cpu()
            t = t.reshape(-1).cpu()
            gram += z.T @ z
            zty += z.T @ t
            tt += float(t @ t)
        yy += float(s.target.double().pow(2).sum())
        rows += n * o
    return LayerStats(layer, group, size, gram, zty, tt, yy, rows, list(samples))


# ----------------------------------------------------------------------------- refit
def _ridge_lstsq(a: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin_D ||rhs - a D||^2 + lam ||D||^2`` with ``lam = ridge * mean(diag(a^T a))``, by float64
    ``torch.linalg.lstsq`` on the augmented system ``[a; sqrt(lam) I] D = [rhs; 0]``, which has full column rank
    when ``lam > 0`` (QR, driver ``gels``); without a ridge, the rank-revealing ``gelsy`` driver."""
    a, rhs = a.double().cpu(), rhs.double().cpu()
    lam = ridge * float(a.pow(2).sum(0).mean()) if ridge > 0 else 0.0
    if lam > 0:
        aug = torch.cat([a, torch.eye(a.shape[1], dtype=a.dtype) * lam ** 0.5])
        rhs = torch.cat([rhs, rhs.new_zeros(a.shape[1], rhs.shape[1])])
        return torch.linalg.lstsq(aug, rhs, driver="gels").solution
    return torch.linalg.lstsq(a, rhs, driver="gelsy").solution


def refit_consumers(stats: LayerStats, keep: Sequence[int], *, mode: str = "weights",
                    ridge: float = 1e-4) -> tuple[dict[str, torch.Tensor], float]:
    """New weights for every consumer after keeping ``keep`` of the group's channels.

    Args:
        stats: the group's statistics and samples (:func:`layer_stats`).
        keep: kept channel indices.
        mode: ``"weights"`` (least squares on the kept positions' weights, per consumer), ``"scale"`` (ThiNet's
            one scale per kept channel, shared by every consumer) or ``"none"``.
        ridge: relative ridge pulling the solution toward the current weights (module docstring).

    Returns:
        (consumer name -> new weight of the consumer's full shape (O, P, ...) float32, with only the kept
        positions changed; relative error ``||T - fit||^2 / ||Y||^2`` on the samples after the refit).
    """
    if mode not in REFIT_MODES:
        raise ValueError(f"refit must be one of {REFIT_MODES}, got {mode!r}")
    keep_l = sorted(int(c) for c in keep)
    if mode == "none":
        return {}, stats.error_of(keep_l)
    if mode == "scale":
        k = torch.tensor(keep_l, dtype=torch.long)
        g = stats.gram[k][:, k]
        lam = ridge * float(torch.diagonal(g).mean()) if ridge > 0 else 0.0
        ones = torch.ones(len(k), dtype=torch.float64)
        w = torch.linalg.lstsq(g + lam * torch.eye(len(k), dtype=torch.float64),
                               (stats.zty[k] + lam * ones).unsqueeze(1), driver="gelsy").solution[:, 0]
        scale = torch.zeros(stats.size, dtype=torch.float64)
        scale[k] = w
        out = {}
        for s in stats.consumers:
            new = s.weight.double().clone()
            p = np.nonzero(np.isin(s.positions, keep_l))[0]
            new[:, p] *= scale[torch.from_numpy(s.positions[p])].view(1, -1, 1)
            out[s.name] = new.float()
        return out, stats.error_of(keep_l, w)
    out, err = {}, 0.0
    for s in stats.consumers:
        kept_pos = np.nonzero(np.isin(s.positions, keep_l))[0]
        fixed_pos = np.nonzero(s.positions < 0)[0]
        x = s.patches.double()
        w = s.weight.double()
        o, t = w.shape[0], w.shape[2]
        xk = x[:, kept_pos].reshape(x.shape[0], -1)  # (S, |K| t)
        wk = w[:, kept_pos].reshape(o, -1)  # (O, |K| t)
        resid = s.target.double() - xk @ wk.T  # (S, O): what the refit must add
        if len(fixed_pos):
            resid = resid - x[:, fixed_pos].reshape(x.shape[0], -1) @ w[:, fixed_pos].reshape(o, -1).T
        delta = _ridge_lstsq(xk, resid, ridge).to(w.device)  # (|K| t, O)
        err += float((resid - xk @ delta).pow(2).sum())
        new = w.clone()
        new[:, kept_pos] = (wk + delta.T).reshape(o, len(kept_pos), t)
        out[s.name] = new.float()
    return out, err / max(stats.yy, 1e-300)


def _write_weight(model: nn.Module, name: str, weight: torch.Tensor) -> None:
    p = model.get_submodule(name).weight
    with torch.no_grad():
        p.copy_(weight.reshape(p.shape).to(p.device, p.dtype))


# ----------------------------------------------------------------------------- driver
def resolve_ratios(cg: ChannelGraph, ratio: float | Mapping[str, float], layers: Iterable[str] | None,
                   method: str) -> dict[str, float]:
    """Layer -> ratio, in graph order, for the single-producer groups (see l1_norm's ``prunable_layers``)."""
    prunable = prunable_layers(cg, "internal")
    if isinstance(ratio, Mapping):
        if layers is not None:
            raise ValueError("give layers= only with a float ratio; a mapping ratio names its layers itself")
        wanted = {str(k): float(v) for k, v in ratio.items()}
    else:
        names = list(prunable) if layers is None else list(layers)
        wanted = {n: float(ratio) for n in names}
    for name, p in wanted.items():
        if not 0.0 <= p < 1.0:
            raise PlanError(f"pruning ratio for {name!r} must be in [0, 1), got {p}")
        if name not in prunable:
            owner = cg.group_of(name)
            why = (f"its channels belong to group {owner[0]!r} with producers {list(cg.producers[owner[0]])}"
                   if owner else "it is not a conv/linear layer that produces channels")
            if owner and cg.groups[owner[0]].pinned:
                why = f"its channels are pinned ({next(iter(cg.groups[owner[0]].pinned.values()))})"
            raise PlanError(f"layer {name!r} cannot be {method}-pruned on its own: {why}")
    order = [str(n.target) for n in cg.gm.graph.nodes if n.op == "call_module"]
    return {n: wanted[n] for n in sorted(wanted, key=order.index)}


def prune_by_reconstruction(
    model: nn.Module,
    example_inputs: Any,
    data: DataLoader | Dataset,
    *,
    ratio: float | Mapping[str, float],
    select: Selector,
    method: str,
    n_samples: int,
    batches: int,
    layers: Iterable[str] | None = None,
    batch_size: int = 128,
    seed: int = 0,
    refit: str = "weights",
    ridge: float = 1e-4,
) -> tuple[Plan, nn.Module]:
    """Prune layer by layer with ``select``, refitting the consumers (see the module docstring).

    Args:
        model: the trained model (not modified).
        example_inputs: a tensor or tuple of tensors to trace with.
        data: DataLoader or Dataset of ``(x, y)``; the first ``batches`` batches give the samples.
        ratio: fraction of channels removed per layer: one float for every prunable layer (or for ``layers``),
            or layer name -> ratio. A layer keeps ``max(1, int(C * (1 - ratio)))`` channels.
        select: ``select(stats, n_keep) -> Selection``, the method's selection rule.
        method: the method's name (plan meta, error messages).
        n_samples: output locations sampled per consumer over all batches (each with all ``O`` outputs).
        batches, batch_size, seed: how many batches; batch size for a Dataset; seed of the sampling.
        refit: ``"weights"``, ``"scale"`` or ``"none"`` (:func:`refit_consumers`); ridge: its ridge.

    Returns:
        ``(plan, refitted)``: the plan (each pruned group carries the selection's scores; ``meta["layers"]``
        has per-layer facts: consumers, samples, relative errors on the samples before and after the
        refit) and a deep copy of ``model`` whose consumers hold the refitted weights.
    """
    if refit not in REFIT_MODES:
        raise ValueError(f"refit must be one of {REFIT_MODES}, got {refit!r}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    cg = trace_channels(model, example_inputs)
    ratios = resolve_ratios(cg, ratio, layers, method)
    work = {name: p for name, p in ratios.items() if max(1, int(cg.groups[name].size * (1.0 - p))) < cg.groups[name].size}
    consumers = {name: check_consumers(cg, name, name) for name in work}
    refitted = copy.deepcopy(model)
    xs = take_batches(data, batches, batch_size=batch_size, seed=seed, device=_device(model))
    all_consumers = list(dict.fromkeys(c for cs in consumers.values() for c in cs))
    targets = _targets(model, all_consumers, xs, n_samples, seed) if work else {}
    channels: dict[str, GroupKeep] = {}
    facts: dict[str, Any] = {}
    for name, p in work.items():
        size = cg.groups[name].size
        n_keep = max(1, int(size * (1.0 - p)))
        current = _current_model(refitted, cg, channels, example_inputs)
        samples = collect(current, consumers[name], xs, targets)
        stats = layer_stats(name, name, size, samples)
        sel, keep = _select_keep(select, stats, n_keep, method, name)
        channels[name] = GroupKeep(size, tuple(keep.tolist()), cg.groups[name].members,
                                   tuple(float(v) for v in sel.scores))
        cg.check_plan(Plan(channels=dict(channels)))  # e.g. a grouped conv's equal-count constraint
        _warn_underdetermined(samples, keep, refit, method)
        new_weights, err_after = refit_consumers(stats, keep, mode=refit, ridge=ridge)
        for cname, w in new_weights.items():
            _write_weight(refitted, cname, w)
        facts[name] = _layer_facts(consumers[name], n_keep, size, samples, stats, keep, err_after, sel)
    meta = _plan_meta(method, ratio, n_samples, batches, seed, refit, ridge, facts, cg.input_spec)
    plan = Plan(channels=channels, meta=meta)
    cg.check_plan(plan)
    return plan, refitted


def _current_model(refitted: nn.Module, cg: ChannelGraph, channels: Mapping[str, GroupKeep],
                   example_inputs: Any) -> nn.Module:
    """``refitted`` with the layers selected so far masked out; ``refitted`` itself before the first selection."""
    so_far = Plan(channels=dict(channels), meta={"inputs": cg.input_spec})
    return masked(refitted, so_far, example_inputs) if channels else refitted


def _select_keep(select: Selector, stats: LayerStats, n_keep: int, method: str,
                 name: str) -> tuple[Selection, np.ndarray]:
    """Run the method's selection rule; return the selection and its kept channels, sorted, as int64.

    Raises RuntimeError when the rule keeps other than ``n_keep`` channels."""
    sel = select(stats, n_keep)
    keep = np.sort(np.asarray(sel.keep, dtype=np.int64))
    if len(keep) != n_keep:
        raise RuntimeError(f"{method} selected {len(keep)} channels of {name!r}, expected {n_keep}")
    return sel, keep


def _warn_underdetermined(samples: Sequence[ConsumerSamples], keep: np.ndarray, refit: str, method: str) -> None:
    """Warn, per consumer, when a ``"weights"`` refit has fewer samples than weights per output channel.

    Must be called directly from :func:`prune_by_reconstruction`: ``stacklevel=4`` points the warning at
    that function's caller's caller."""
    for s in samples:
        cols = int(np.isin(s.positions, keep).sum()) * int(s.weight.shape[2])
        if refit == "weights" and s.n_samples < cols:
            warnings.warn(
                f"{method}: refitting {s.name!r} from {s.n_samples} samples for {cols} weights per output "
                "channel; the least squares is under-determined (only the ridge holds it); raise n_samples",
                stacklevel=4,
            )


def _layer_facts(consumers: Iterable[str], n_keep: int, size: int, samples: Sequence[ConsumerSamples],
                 stats: LayerStats, keep: np.ndarray, err_after: float, sel: Selection) -> dict[str, Any]:
    """The per-layer entry of ``plan.meta["layers"]``; the selection's ``info`` keys come last."""
    return {
        "consumers": list(consumers),
        "kept": int(n_keep),
        "size": int(size),
        "samples": int(sum(s.n_samples for s in samples)),
        "error_before_refit": stats.error_of(keep),
        "error_after_refit": err_after,
        **sel.info,
    }


def _plan_meta(method: str, ratio: float | Mapping[str, float], n_samples: int, batches: int, seed: int,
               refit: str, ridge: float, facts: dict[str, Any], input_spec: Any) -> dict[str, Any]:
    """``plan.meta`` of :func:`prune_by_reconstruction`, keys in this order."""
    return {
        "method": method,
        "ratio": dict(ratio) if isinstance(ratio, Mapping) else float(ratio),
        "n_samples": int(n_samples),
        "batches": int(batches),
        "seed": int(seed),
        "refit": refit,
        "ridge": float(ridge),
        "layers": facts,
        "inputs": input_spec,
    }


# ----------------------------------------------------------------------------- evaluation
def reconstruction_error(
    reference: nn.Module,
    model: nn.Module,
    plan: Plan,
    layer: str,
    data: DataLoader | Dataset,
    example_inputs: Any,
    *,
    batches: int | None = None,
    batch_size: int = 256,
) -> float:
    """Relative error of ``layer``'s consumers in ``masked(model, plan)`` against the unpruned ``reference``:
    ``sum ||y - y_ref||^2 / sum ||y_ref - bias||^2`` over every consumer output element and every batch of
    ``data`` (all batches by default; a Dataset is read in order)."""
    cg = trace_channels(reference, example_inputs)
    owner = cg.group_of(layer)
    if not owner:
        raise PlanError(f"{layer!r} produces no channel group")
    names = list(cg.consumers(owner[0]))
    pruned = masked(model, plan, example_inputs)
    it = data if isinstance(data, DataLoader) else loader(data, batch_size, shuffle=False)
    num = den = 0.0
    for b, batch in enumerate(it):
        if batches is not None and b >= batches:
            break
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        got: dict[str, torch.Tensor] = {}
        ref: dict[str, torch.Tensor] = {}
        bias: dict[str, torch.Tensor] = {}

        def store_in(store: dict[str, torch.Tensor]) -> Callable:
            def on_call(name: str, m: nn.Module, inp: torch.Tensor, y: torch.Tensor) -> None:
                store[name] = y.double()
                if m.bias is not None:
                    shape = [1] * y.dim()
                    shape[-1 if isinstance(m, nn.Linear) else 1] = -1
                    bias[name] = m.bias.detach().double().view(shape)

            return on_call

        _run_hooked(reference, names, x, store_in(ref))
        _run_hooked(pruned, names, x, store_in(got))
        for n in names:
            num += float((got[n] - ref[n]).pow(2).sum())
            den += float((ref[n] - bias.get(n, 0.0)).pow(2).sum())
    return num / max(den, 1e-300)
