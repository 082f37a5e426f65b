"""Which factor of a split channel axis becomes the head axis of attention: a look ahead through an fx graph.

A view such as ``qkv.reshape(b, t, 3, H, hd)`` or ``k.view(b, t, H_kv, hd)`` splits a channel axis into
factors; the channel graph (:mod:`sparsekern.graph`) can prune by heads when one factor arrives as the head
axis (``-3``) of ``F.scaled_dot_product_attention``. :func:`attention_head_axis` follows each axis of the
view's output forward, through the ops attention code puts between the view and the attention: permutes and
transposes, indexing (``qkv[0]``, ``x[:, :, None]``), ``expand``, ``repeat_interleave``, the elementwise
products, sums and concatenations along other axes of rotary position embeddings, splits into pieces, views that merge a
factor with unit or repeated axes (Llama's ``repeat_kv``: ``x[:, :, None].expand(...).reshape(...)``) and
copies. Shapes come from ``node.meta["tensor_meta"]`` (``torch.fx.passes.shape_prop.ShapeProp``), which the
channel graph fills for graphs that call attention. Anything else ends the search along that path.
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx

__all__ = ["attention_head_axis"]

#: ops that keep every axis of their first argument where it is
SAME_AXES = ("contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "detach", "repeat_interleave",
             torch.repeat_interleave, "neg", torch.neg, operator.neg)
#: ops that cut a tensor into pieces along one axis (their pieces are read through ``getitem``)
SPLITS = (torch.split, torch.chunk, "split", "chunk")
#: elementwise ops of two operands: the look ahead follows either one (rotary embeddings: ``q * cos + ...``)
ELEMENTWISE_BINARY = (operator.add, operator.sub, operator.mul, torch.add, torch.sub, torch.mul, "add", "sub", "mul")

Axes = list  # per axis of a tensor: the index of the view's factor it carries, or None


def attention_head_axis(split: torch.fx.Node, c: int, k: int, ndim: int, max_nodes: int = 64) -> int | None:
    """Which of the ``k`` factors that view ``split`` makes of axis ``c`` (``ndim`` axes after the view) is the
    head axis (``-3``) of every ``F.scaled_dot_product_attention`` it reaches as query, key or value; None when
    it reaches none, or several that disagree."""
    start = [None] * c + list(range(k)) + [None] * (ndim - c - k)
    frontier: list[tuple[torch.fx.Node, Axes]] = [(split, start)]
    found: set[int | None] = set()
    seen = 0
    while frontier and seen < max_nodes:
        node, axes = frontier.pop()
        for user in node.users:
            seen += 1
            if user.target is torch.nn.functional.scaled_dot_product_attention:
                if node in user.args[:3] or node in (user.kwargs.get(a) for a in ("query", "key", "value")):
                    found.add(axes[-3] if len(axes) >= 3 else None)
                continue
            if user.target in ELEMENTWISE_BINARY and node in user.args[:2]:
                out = _shape(user)
                if out is not None and len(out) >= len(axes):  # broadcasting aligns axes from the right
                    frontier.append((user, [None] * (len(out) - len(axes)) + list(axes)))
                continue
            if user.target in SPLITS and user.args and user.args[0] is node:
                # pieces along one axis (GPT-NeoX splits (heads, 3 * hd) into q, k, v): each keeps the factors
                frontier.extend((item, axes) for item in user.users if item.target is operator.getitem)
                continue
            if user.target is torch.cat and node in user.args[0]:
                # pieces joined back along one axis (rotary embeddings: rotated and passed-through parts of the
                # head dimension): the axes keep their factors; the channel graph checks what is joined
                frontier.append((user, axes))
                continue
            if user.args and user.args[0] is node:
                after = _through(user, axes)
                if after is not None:
                    frontier.append((user, after))
    return found.pop() if len(found) == 1 else None


def _through(user: torch.fx.Node, axes: Axes) -> Axes | None:
    """The factors on the axes of ``user``'s output, given those of its first argument; None when ``user`` is
    not an op this look ahead follows."""
    target, nd = user.target, len(axes)
    if target in (torch.permute, "permute"):
        perm = user.args[1] if len(user.args) == 2 and isinstance(user.args[1], (tuple, list)) else user.args[1:]
        return [axes[a % nd] for a in perm] if all(isinstance(a, int) for a in perm) else None
    if target in (torch.transpose, "transpose"):
        if not all(isinstance(a, int) for a in user.args[1:3]):
            return None
        d0, d1 = (a % nd for a in user.args[1:3])
        swapped = list(axes)
        swapped[d0], swapped[d1] = axes[d1], axes[d0]
        return swapped
    if target is operator.getitem:
        return _through_index(axes, user.args[1])
    if target in SAME_AXES:
        return axes
    out_shape, in_shape = _shape(user), _shape(user.args[0])
    if out_shape is None or in_shape is None:
        return None
    if target == "expand":
        return [None] * (len(out_shape) - nd) + list(axes)
    if target in ("view", "reshape", torch.reshape):
        return _through_reshape(axes, in_shape, out_shape)
    return None


def _through_index(axes: Axes, index: Any) -> Axes | None:
    """Basic indexing: an int drops its axis (an index into the head axis itself is refused later, by the
    channel graph's ``getitem``), ``None`` inserts one, a slice or ``...`` keeps them."""
    idx = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
        return None
    explicit = sum(1 for i in idx if i is not None and i is not Ellipsis)
    out, src = [], 0
    for i in idx:
        if i is Ellipsis:
            out.extend(axes[src:src + len(axes) - explicit])
            src += len(axes) - explicit
        elif i is None:
            out.append(None)
        elif isinstance(i, int):
            src += 1
        else:
            out.append(axes[src])
            src += 1
    return out + list(axes[src:])


def _through_reshape(axes: Axes, in_shape: Sequence[int], out_shape: Sequence[int]) -> Axes | None:
    """A view: axes are matched in runs of equal element counts; an output axis that merges one factor with
    unit or factor-free axes after it carries that factor; a run that splits a factor or merges two ends the
    search (None)."""
    out: Axes = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        ins, outs = [i], [j]
        a = in_shape[i] if i < len(in_shape) else 1
        b = out_shape[j] if j < len(out_shape) else 1
        while a != b:
            if a < b and i + 1 < len(in_shape):
                i += 1
                ins.append(i)
                a *= in_shape[i]
            elif a > b and j + 1 < len(out_shape):
                j += 1
                outs.append(j)
                b *= out_shape[j]
            else:
                return None
        factors = [axes[p] for p in ins if p < len(axes) and axes[p] is not None]
        if factors and (len(factors) > 1 or len(outs) > 1 or axes[ins[0]] is None):
            return None
        out.extend(factors if factors else [None] * len([q for q in outs if q < len(out_shape)]))
        i, j = i + 1, j + 1
    return out[:len(out_shape)]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None
