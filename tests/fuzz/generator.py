"""Seeded random models and random plans over the constructs the dependency graph knows.

A model is a short program over a pool of 4-D feature maps ``(N, C, S, S)``: every step reads earlier values
and appends one. Steps: conv (plain, grouped, depthwise with multiplier 1 or 2, 1x1 or 3x3), BatchNorm,
GroupNorm, LayerNorm and Linear over the channel axis (through permutes), activations, residual add, gating
multiply, cat, split/chunk, view/reshape (sizes written out, ``-1`` or a ``torch.Size``), channel shuffle,
``F.pad``, pooling, and layers called a second time (shared weights). A head pools or flattens into one or two
linear layers (with a LayerNorm between).

A plan is either masks on random layers (random, empty, single-channel, half and non-bool masks, through
``Plan.from_channel_masks``) or keep-sets on random dependency groups (some respecting the grouped-conv and
GroupNorm slices, some not).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsekern.graph import trace_channels
from sparsekern.plan import GroupKeep, Plan
from tests.conftest import constraint_widths

_ACTS = (F.relu, F.gelu, torch.sigmoid, torch.tanh, F.silu)


class FuzzNet(nn.Module):
    """Runs ``program``, a list of steps ``(kind, *operands)`` over the values computed so far (value 0 is the
    input); returns the last value. The loop runs at trace time, so the traced graph is flat."""

    def __init__(self, layers: dict[str, nn.Module], program: list[tuple]) -> None:
        super().__init__()
        self.m = nn.ModuleDict(layers)
        self.program = program

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = [x]
        for step in self.program:
            kind, a = step[0], step[1]
            y = v[a]
            if kind == "mod":
                v.append(self.m[step[2]](y))
            elif kind == "last":  # a layer over the channel axis, moved last and back (LayerNorm, Linear)
                v.append(self.m[step[2]](y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
            elif kind == "act":
                v.append(_ACTS[step[2]](y))
            elif kind == "add":
                v.append(y + v[step[2]])
            elif kind == "gate":
                v.append(y * torch.sigmoid(v[step[2]]))
            elif kind == "cat":
                v.append(torch.cat([v[i] for i in step[2]], 1))
            elif kind == "chunk":
                v.append(y.chunk(step[2], 1)[step[3]])
            elif kind == "split":
                v.append(torch.split(y, step[2], 1)[step[3]])
            elif kind == "view":
                y = y.contiguous()  # a permute or a conv on permuted input leaves strides view() rejects
                if step[2] == "shape":
                    v.append(y.view(y.shape))
                elif step[2] == "sizes":
                    v.append(y.view(y.size(0), step[3], y.size(2), y.size(3)))
                else:
                    v.append(y.reshape(y.size(0), -1, y.size(2), y.size(3)))
            elif kind == "shuffle":
                n, c, h, w, g = y.size(0), step[3], y.size(2), y.size(3), step[2]
                v.append(y.contiguous().view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w))
            elif kind == "pad":
                v.append(F.pad(y, (1, 1, 1, 1)))
            elif kind == "pool":
                v.append(F.max_pool2d(y, 2) if step[2] else F.avg_pool2d(y, 2))
            elif kind == "head":
                pooling, hidden = step[2], step[3]
                if pooling == "avg":
                    z = F.adaptive_avg_pool2d(y, 1).flatten(1)
                elif pooling == "mean":
                    z = y.mean((2, 3))
                elif pooling == "flatten":
                    z = torch.flatten(y, 1)
                else:
                    z = y.contiguous().view(y.size(0), -1)
                if hidden:
                    z = F.relu(self.m["head_ln"](self.m["head_hidden"](z)))
                v.append(self.m["head_fc"](z))
        return v[-1]


@dataclass
class _Value:
    channels: int
    size: int


@dataclass
class _Builder:
    rng: np.random.Generator
    values: list[_Value] = field(default_factory=list)
    layers: dict[str, nn.Module] = field(default_factory=dict)
    program: list[tuple] = field(default_factory=list)

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.layers)}"

    def pick(self, *, recent: bool = True) -> int:
        n = len(self.values)
        if recent and self.rng.random() < 0.7:
            return int(n - 1 - self.rng.integers(0, min(n, 3)))
        return int(self.rng.integers(0, n))

    def emit(self, step: tuple, out: _Value) -> None:
        self.program.append(step)
        self.values.append(out)

    def same_shape_as(self, a: int) -> list[int]:
        va = self.values[a]
        return [i for i, v in enumerate(self.values) if i != a and v == va]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def random_model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random :class:`FuzzNet` (eval mode, random weights and norm statistics) and an input for it."""
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    b = _Builder(rng)
    b.values.append(_Value(int(rng.integers(2, 5)), int(rng.choice([4, 6, 8]))))
    for _ in range(int(rng.integers(3, 11))):
        _random_step(b)
    a = len(b.values) - 1
    c, s = b.values[a].channels, b.values[a].size
    pooling = str(rng.choice(["avg", "mean", "flatten", "view"]))
    features = c if pooling in ("avg", "mean") else c * s * s
    hidden = bool(rng.random() < 0.4)
    if hidden:
        width = int(rng.integers(3, 9))
        b.layers["head_hidden"] = nn.Linear(features, width)
        b.layers["head_ln"] = nn.LayerNorm(width)
        features = width
    b.layers["head_fc"] = nn.Linear(features, int(rng.integers(2, 6)))
    b.program.append(("head", a, pooling, hidden))
    model = FuzzNet(b.layers, b.program).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    x = torch.randn(2, b.values[0].channels, b.values[0].size, b.values[0].size, generator=gen)
    return model, x


def _random_step(b: _Builder) -> None:
    rng = b.rng
    kinds = ["conv", "conv", "conv", "bn", "gn", "ln", "linear", "act", "add", "gate", "cat", "chunk", "split",
             "view", "shuffle", "pad", "pool", "share"]
    for _ in range(20):  # retry until a step fits the current values
        kind = str(rng.choice(kinds))
        a = b.pick()
        va = b.values[a]
        c, s = va.channels, va.size
        if kind == "conv":
            style = str(rng.choice(["plain", "plain", "grouped", "depthwise"]))
            k = int(rng.choice([1, 3]))
            bias = bool(rng.random() < 0.5)
            if style == "depthwise":
                out, groups = c * int(rng.choice([1, 2])), c
            else:
                out = int(rng.integers(2, 13))
                common = [d for d in _divisors(c) if out % d == 0 and d > 1]
                groups = int(rng.choice(common)) if style == "grouped" and common else 1
                if style == "grouped" and groups == 1:
                    out = c * int(rng.integers(1, 3))
                    groups = int(rng.choice([d for d in _divisors(c) if d > 1] or [1]))
            name = b.name("conv")
            b.layers[name] = nn.Conv2d(c, out, k, padding=k // 2, groups=groups, bias=bias)
            b.emit(("mod", a, name), _Value(out, s))
        elif kind == "bn":
            name = b.name("bn")
            b.layers[name] = nn.BatchNorm2d(c)
            b.emit(("mod", a, name), va)
        elif kind == "gn":
            name = b.name("gn")
            b.layers[name] = nn.GroupNorm(int(rng.choice(_divisors(c))), c)
            b.emit(("mod", a, name), va)
        elif kind == "ln":
            name = b.name("ln")
            b.layers[name] = nn.LayerNorm(c)
            b.emit(("last", a, name), va)
        elif kind == "linear":
            out = int(rng.integers(2, 11))
            name = b.name("lin")
            b.layers[name] = nn.Linear(c, out)
            b.emit(("last", a, name), _Value(out, s))
        elif kind == "act":
            b.emit(("act", a, int(rng.integers(0, len(_ACTS)))), va)
        elif kind in ("add", "gate"):
            others = b.same_shape_as(a)
            if not others:
                continue
            b.emit((kind, a, int(rng.choice(others))), va)
        elif kind == "cat":
            same = [i for i, v in enumerate(b.values) if v.size == s and i != a]
            if not same:
                continue
            parts = [a, *rng.choice(same, size=min(len(same), int(rng.integers(1, 3))), replace=False).tolist()]
            rng.shuffle(parts)
            b.emit(("cat", a, [int(i) for i in parts]), _Value(sum(b.values[i].channels for i in parts), s))
        elif kind == "chunk":
            if c < 2:
                continue
            n = int(rng.integers(2, min(c, 3) + 1))
            sizes = [t.shape[1] for t in torch.empty(1, c).chunk(n, 1)]
            piece = int(rng.integers(0, len(sizes)))
            b.emit(("chunk", a, n, piece), _Value(sizes[piece], s))
        elif kind == "split":
            if c < 2:
                continue
            first = int(rng.integers(1, c))
            piece = int(rng.integers(0, 2))
            b.emit(("split", a, [first, c - first], piece), _Value((first, c - first)[piece], s))
        elif kind == "view":
            style = str(rng.choice(["shape", "sizes", "infer"]))
            b.emit(("view", a, style, c), va)
        elif kind == "shuffle":
            if c < 4 or c % 2:
                continue
            b.emit(("shuffle", a, 2, c), va)
        elif kind == "pad":
            if s > 8:
                continue
            b.emit(("pad", a), _Value(c, s + 2))
        elif kind == "pool":
            if s < 4 or s % 2:
                continue
            b.emit(("pool", a, bool(rng.random() < 0.5)), _Value(c, s // 2))
        elif kind == "share":
            # call an existing conv or BatchNorm a second time on a value with as many channels
            fits = [n for n, m in b.layers.items()
                    if (isinstance(m, nn.Conv2d) and m.in_channels == c) or (isinstance(m, nn.BatchNorm2d) and m.num_features == c)]
            if not fits:
                continue
            name = str(rng.choice(fits))
            m = b.layers[name]
            b.emit(("mod", a, name), _Value(m.out_channels if isinstance(m, nn.Conv2d) else c, s))
        return


# ----------------------------------------------------------------------------- plans
_MASK_STYLES = ("random", "random", "random", "empty", "single", "full", "first_half", "last_half",
                "scores", "ints", "floats01", "negative", "nan", "strings")
NOT_MASKS = ("scores", "negative", "nan", "strings")  # styles that are no keep mask: the plan must be refused


def _mask(rng: np.random.Generator, n: int, style: str) -> Any:
    if style == "random":
        return torch.from_numpy(rng.random(n) < rng.uniform(0.2, 0.9))
    if style == "empty":
        return torch.zeros(n, dtype=torch.bool)
    if style == "single":
        m = torch.zeros(n, dtype=torch.bool)
        m[int(rng.integers(0, n))] = True
        return m
    if style == "full":
        return [True] * n
    if style in ("first_half", "last_half"):
        m = np.arange(n) >= n // 2
        return (m if style == "first_half" else ~m).tolist()
    if style == "scores":
        return torch.rand(n) + 0.01
    if style == "ints":
        return (rng.random(n) < 0.6).astype(np.int64)
    if style == "floats01":
        return torch.from_numpy((rng.random(n) < 0.6).astype(np.float32))
    if style == "negative":
        m = -rng.integers(0, 3, n)
        m[int(rng.integers(0, n))] = -1
        return m
    if style == "nan":
        m = np.ones(n)
        m[int(rng.integers(0, n))] = np.nan
        return m
    return ["keep" if k else "" for k in rng.random(n) < 0.5]


def _width(m: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features", "num_features", "num_channels"):
        if hasattr(m, attr):
            return int(getattr(m, attr))
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[0])
    return None


def random_plan(model: nn.Module, x: torch.Tensor, seed: int, styles: list[str] | None = None) -> Plan:
    """A random plan for ``model``: masks on random layers, or keep-sets on random groups (see the module
    docstring). It may well be invalid; building it may raise :class:`~sparsekern.plan.PlanError`. The mask
    styles used are appended to ``styles``."""
    rng = np.random.default_rng(seed + 1_000_003)
    if rng.random() < 0.5:
        named = [(n, _width(m)) for n, m in model.named_modules() if n and _width(m)]
        chosen = rng.choice(len(named), size=min(len(named), int(rng.integers(1, 4))), replace=False)
        masks = {}
        for i in chosen.tolist():
            name, width = named[i]
            style = str(rng.choice(_MASK_STYLES, p=_mask_probabilities()))
            masks[name] = _mask(rng, width, style)
            if styles is not None:
                styles.append(style)
        conflict = str(rng.choice(["error", "union", "intersection"]))
        return Plan.from_channel_masks(model, masks, x, conflict=conflict)
    cg = trace_channels(model, x)
    width = constraint_widths(cg)
    respect = rng.random() < 0.7
    channels = {}
    for name, spec in cg.groups.items():
        if spec.pinned and rng.random() < 0.9 or rng.random() < 0.3:
            continue
        per = width.get(name, spec.size) if respect else spec.size
        parts = spec.size // per
        k = 1 if rng.random() < 0.2 else max(1, int(round(per * rng.uniform(0.2, 1.0))))
        keep = sorted(int(i) for p in range(parts) for i in p * per + rng.choice(per, size=k, replace=False))
        channels[name] = GroupKeep(spec.size, tuple(keep), spec.members)
    return Plan(channels=channels, meta={"inputs": cg.input_spec})


def _mask_probabilities() -> list[float]:
    weights = np.array([4, 4, 4, 1, 2, 1, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5])
    return (weights / weights.sum()).tolist()
