"""A LayerNorm folded into the linear map after it, private: the end of ``LayerNorm(x) A^T + c`` from ``x W^T``.

For a LayerNorm over the last dimension d (Ba, Kiros and Hinton, 2016) with affine ``gamma``, ``beta`` and a linear
map ``A`` (r, d) that reads only its output (the first factor of a low-rank layer, or a dense layer), per row x

    LN(x) A^T = rstd (x - mu) W^T + A beta = rstd (x W^T - mu s) + A beta,

with ``W = A diag(gamma)``, ``s = W 1``, ``mu`` the row's mean and ``rstd = 1 / sqrt(var + eps)`` (biased variance).
The ``onednn_linear`` pass runs ``z = x W^T`` as a prepacked matmul on the raw rows, so the normalised copy of x is
never written and read back, and ``torch.ops.sparsekern._layer_norm_fold(z, x, weight, row_sum, shift, eps,
max_offset) -> t`` (..., r) finishes ``t = rstd (z - mu s) + shift`` with ``weight`` = W (r, d), ``row_sum`` = s and
``shift`` = ``A beta`` (plus a bias, for a dense layer).

Subtracting ``mu s`` after the product costs accuracy in proportion to ``|mu| rstd`` (the rounding of ``x W^T``
follows ``|mu| + sigma``, not ``sigma``). A row with ``|mu| rstd > max_offset`` is therefore computed from its
centred values, ``rstd (x - mu) W^T + shift``, so that every row stays within about ``1 + max_offset`` times the
rounding of the unfused LayerNorm and matmul, whatever the input.

The plain-torch formulation (:func:`reference`) is the operator's implementation for every device; the C++
extension registers the CPU kernel (csrc/cpu/layer_norm_fold.cpp), one call per folded LayerNorm in a traced graph.
"""
from __future__ import annotations

import torch

from sparsekern.ops import _ext

__all__ = ["layer_norm_fold", "reference", "fold_weights", "MAX_OFFSET"]

#: Rows whose ``|mean| / std`` exceeds this take the centred product: the fold's rounding stays within about
#: ``1 + MAX_OFFSET`` times the unfused computation's.
MAX_OFFSET = 8.0

_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define("_layer_norm_fold(Tensor z, Tensor x, Tensor weight, Tensor row_sum, Tensor shift, float eps, "
            "float max_offset) -> Tensor")


def reference(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, row_sum: torch.Tensor, shift: torch.Tensor,
              eps: float, max_offset: float) -> torch.Tensor:
    """``rstd (z - mu row_sum) + shift`` per row, the centred product ``rstd (x - mu) weight^T + shift`` on rows
    with ``|mu| rstd > max_offset`` (module docstring); x (..., d), z (..., r) -> (..., r)."""
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    rstd = torch.rsqrt(var + eps)
    folded = rstd * (z - mean * row_sum) + shift
    centred = rstd * torch.nn.functional.linear(x - mean, weight) + shift
    return torch.where(mean.abs() * rstd > max_offset, centred, folded)


_LIB.impl("_layer_norm_fold", reference, "CompositeExplicitAutograd")


@torch.library.register_fake("sparsekern::_layer_norm_fold", lib=_LIB)
def _fake(z, x, weight, row_sum, shift, eps, max_offset):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def fold_weights(layer_norm: torch.nn.LayerNorm, a: torch.Tensor,
                 bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W, s, shift)`` for ``layer_norm`` (over the last dimension) followed by ``x -> x a^T (+ bias)``, a (r, d):
    ``W = a diag(gamma)`` (r, d), ``s = W 1`` (r,), ``shift = a beta (+ bias)`` (r,); float32, detached."""
    a = a.detach().float()
    gamma, beta = layer_norm.weight, layer_norm.bias  # None without the affine (or without its bias)
    w = a * gamma.detach().float() if gamma is not None else a.clone()
    shift = a @ beta.detach().float() if beta is not None else a.new_zeros(a.shape[0])
    if bias is not None:
        shift = shift + bias.detach().float()
    return w.contiguous(), w.sum(dim=1), shift


def layer_norm_fold(z: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, row_sum: torch.Tensor,
                    shift: torch.Tensor, eps: float, max_offset: float = MAX_OFFSET) -> torch.Tensor:
    """The operator (module docstring); the C++ kernel on CPU float32 where the extension is built (loaded here
    first, so that its kernel is registered). Other CPU dtypes take :func:`reference`."""
    if x.device.type == "cpu":
        if x.dtype != torch.float32:
            return reference(z, x, weight, row_sum, shift, eps, max_offset)
        _ext.load()
    return torch.ops.sparsekern._layer_norm_fold(z, x, weight, row_sum, shift, eps, max_offset)
