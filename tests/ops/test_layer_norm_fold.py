"""sparsekern::_layer_norm_fold: LayerNorm(x) A^T + c finished from x W^T, the C++ CPU kernel and the plain-torch
formulation against float64 ground truth over sizes, leading shapes and strides; rows far from zero mean take the
centred product (and would lose accuracy without it); opcheck; the errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from sparsekern.ops import _ext
from sparsekern.ops.layer_norm_fold import MAX_OFFSET, fold_weights, layer_norm_fold, reference
from tests.conftest import assert_close_to_scale

needs_ext = pytest.mark.skipif(_ext.status() is not None, reason="the C++ extension is unavailable")


def setup(lead: tuple[int, ...], d: int, r: int, seed: int = 0, offset: float = 0.0, bias: bool = False):
    """(x, LayerNorm with random affine, A (r, d), bias or None); x's rows have mean about ``offset``."""
    g = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(d, eps=1e-5)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(d, generator=g))
        ln.bias.copy_(torch.randn(d, generator=g))
    x = torch.randn(*lead, d, generator=g) + offset
    a = torch.randn(r, d, generator=g) / math.sqrt(d)
    return x, ln, a, torch.randn(r, generator=g) if bias else None


def truth(x, ln, a, bias) -> torch.Tensor:
    """LayerNorm(x) a^T (+ bias) in float64."""
    y = torch.nn.functional.layer_norm(x.double(), ln.normalized_shape, ln.weight.double(), ln.bias.double(), ln.eps)
    y = y @ a.double().t()
    return (y + bias.double() if bias is not None else y).float()


def folded(x, ln, a, bias, max_offset=MAX_OFFSET, fn=layer_norm_fold):
    w, row_sum, shift = fold_weights(ln, a, bias)
    return fn(x @ w.t(), x, w, row_sum, shift, ln.eps, max_offset)


@pytest.mark.parametrize("lead, d, r", [((1,), 1, 1), ((3,), 5, 3), ((2, 7), 16, 16), ((4,), 17, 33),
                                        ((2, 3, 5), 64, 7), ((1, 37), 768, 86)])
@pytest.mark.parametrize("impl", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_equals_float64_truth(lead, d, r, impl) -> None:
    x, ln, a, bias = setup(lead, d, r, bias=r % 2 == 1)
    out = folded(x, ln, a, bias, fn=layer_norm_fold if impl == "cpu" else reference)
    assert out.shape == (*lead, r) and out.is_contiguous()
    assert_close_to_scale(out, truth(x, ln, a, bias), tol=1e-5)


def relative_error(out: torch.Tensor, want: torch.Tensor) -> float:
    return ((out - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("offset, std", [(1000.0, 1e-4), (100.0, 1e-3), (30.0, 1.0)])
@pytest.mark.parametrize("impl", [pytest.param("cpu", marks=needs_ext), "reference"])
def test_rows_far_from_zero_mean_stay_as_accurate_as_unfused(offset, std, impl) -> None:
    # rows with |mean| / std of 30-1e7: x W^T - mean s would cancel; those rows take the centred product
    fn = layer_norm_fold if impl == "cpu" else reference
    x, ln, a, bias = setup((2, 24), 256, 40, bias=True)
    x[0, ::3] = x[0, ::3] * std + offset
    want = truth(x, ln, a, bias)
    with torch.no_grad():
        unfused = relative_error(nn.functional.linear(ln(x), a, bias), want)  # torch's float32 LayerNorm + linear
    assert relative_error(folded(x, ln, a, bias, fn=fn), want) <= 1.5 * unfused + 1e-6
    assert relative_error(folded(x, ln, a, bias, max_offset=math.inf, fn=fn), want) > 4 * unfused  # the need


@needs_ext
def test_kernel_takes_strided_inputs_and_matches_the_reference() -> None:
    x, ln, a, _ = setup((6, 40), 48, 20)
    w, row_sum, shift = fold_weights(ln, a)
    xt = x.transpose(0, 1)  # (40, 6, 48), not contiguous
    z = (xt @ w.t()).transpose(0, 1).transpose(0, 1)
    out = layer_norm_fold(z, xt, w, row_sum, shift, ln.eps)
    assert_close_to_scale(out, reference(z, xt, w, row_sum, shift, ln.eps, MAX_OFFSET), tol=1e-6)


def test_other_dtypes_take_the_reference() -> None:
    x, ln, a, _ = setup((3, 4), 16, 8)
    w, row_sum, shift = fold_weights(ln, a)
    xd = x.double()
    out = layer_norm_fold(xd @ w.double().t(), xd, w.double(), row_sum.double(), shift.double(), ln.eps)
    assert out.dtype == torch.float64
    assert_close_to_scale(out.float(), truth(x, ln, a, None), tol=1e-6)


def test_fold_weights_without_affine() -> None:
    ln = nn.LayerNorm(8, elementwise_affine=False)
    a, bias = torch.randn(3, 8), torch.randn(3)
    w, row_sum, shift = fold_weights(ln, a, bias)
    assert torch.equal(w, a) and torch.allclose(row_sum, a.sum(1)) and torch.equal(shift, bias)


def test_opcheck() -> None:  # the C++ kernel where the extension is built, else the reference
    x, ln, a, bias = setup((2, 5), 16, 6, bias=True)
    w, row_sum, shift = fold_weights(ln, a, bias)
    _ext.load()
    torch.library.opcheck(torch.ops.sparsekern._layer_norm_fold.default,
                          (x @ w.t(), x, w, row_sum, shift, ln.eps, MAX_OFFSET))


@needs_ext
def test_kernel_names_the_mismatched_shapes() -> None:
    x, ln, a, _ = setup((4,), 16, 6)
    w, row_sum, shift = fold_weights(ln, a)
    with pytest.raises(RuntimeError, match=r"weight \(r, d\)"):
        layer_norm_fold(torch.randn(4, 5), x, w, row_sum, shift, ln.eps)
