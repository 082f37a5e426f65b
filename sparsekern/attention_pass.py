"""The ``attention`` inference pass: ``scaled_dot_product_attention`` calls run by :func:`sparsekern.ops.attention`
where the tuner measured it faster than torch's kernel (as the private operator ``sparsekern::_attention``, the
op's CPU kernel without its Python validation and dispatch, so that a traced graph calls it without Python).

A call qualifies when its q, k and v are float32 (B, H, T, E) tensors with one key/value head per query head and
it has no mask tensor, no dropout (``dropout_p`` 0, as in an eval-mode trace) and no grouped-query flag; ``scale``
and ``is_causal`` carry over. Each rewritten call's kernel is recorded in the result's ``sk_backends`` under
``attention.<n>`` (n counts the calls in graph order): ``"sparsekern"`` or ``"torch"``, chosen by
:func:`sparsekern.tuning.current_tuner` from :class:`~sparsekern.tuning.AttentionCall` timings, the same for dense
and pruned models.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from sparsekern.fusion import as_graph_module, finish_rewrite
from sparsekern.ops import extension
from sparsekern.tuning import AttentionCall, Tuner, current_tuner

__all__ = ["attention"]

_SDPA = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention(model: nn.Module, example_inputs: Any, *, inplace: bool = False,
              tuner: Tuner | None = None) -> torch.fx.GraphModule:
    """Run every qualifying attention call on the kernel the tuner picks (module docstring); for inference."""
    from torch.fx.passes.shape_prop import ShapeProp

    from sparsekern.ops.attention import attention as sk_attention

    gm = as_graph_module(model, inplace).eval()
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    tuner = tuner or current_tuner()
    backends: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        bound = {**dict(zip(_ARGS, node.args)), **node.kwargs}
        shapes = _qualifying_shapes(bound)
        if shapes is None:
            continue
        causal, scale = bool(bound.get("is_causal", False)), bound.get("scale")
        q, k, v = (torch.randn(s) for s in shapes)
        call = AttentionCall(*shapes, causal, torch.get_num_threads())
        backend = tuner.choose(call, {
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale),
            "sparsekern": lambda: sk_attention(q, k, v, causal, scale),
        })
        backends[f"attention.{len(backends)}"] = backend
        if backend == "sparsekern":
            extension.load()  # registers the C++ kernel of sparsekern::_attention
            resolved = 1.0 / math.sqrt(shapes[0][-1]) if scale is None else float(scale)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.sparsekern._attention.default,
                                             (bound["query"], bound["key"], bound["value"], causal, resolved))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
    return finish_rewrite(gm, backends)


def _qualifying_shapes(bound: dict[str, Any]) -> tuple[tuple[int, ...], ...] | None:
    """The (q, k, v) shapes of a call the op runs exactly, or None."""
    if bound.get("attn_mask") is not None or bound.get("dropout_p", 0.0) != 0.0 or bound.get("enable_gqa", False):
        return None
    if not all(isinstance(bound.get(a), (bool, float, int, type(None))) for a in ("is_causal", "scale")):
        return None
    metas = [bound[a].meta.get("tensor_meta") if isinstance(bound.get(a), torch.fx.Node) else None
             for a in ("query", "key", "value")]
    if any(m is None or m.dtype != torch.float32 or len(m.shape) != 4 for m in metas):
        return None
    q, k, v = (tuple(m.shape) for m in metas)
    if k[:2] != q[:2] or k[3] != q[3] or v[:3] != k[:3]:
        return None
    return q, k, v
