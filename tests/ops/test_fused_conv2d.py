"""fused_conv2d: the direct CPU convolution with its epilogue (bias, residual, ReLU) against a float64 ground
truth over a shape matrix, layouts and threads; the torch op (opcheck, fake under export); the errors."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from sparsekern.ops import NoBackendError, _ext, fused_conv2d
from sparsekern.ops.fused_conv2d import DISPATCH, select_backend
from tests.conftest import assert_close_to_scale, threads


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    why = _ext.status()
    if why is not None:
        pytest.skip(f"the C++ extension is unavailable: {why}")


def truth(x, w, b, residual, stride, padding, relu) -> torch.Tensor:
    y = F.conv2d(x.double(), w.double(), None if b is None else b.double(), stride, padding)
    if residual is not None:
        y = y + residual.double()
    return y.relu() if relu else y


# (batch, c_in, c_out, h, w, kernel, stride, padding)
SHAPES = [
    (1, 1, 1, 5, 5, 3, 1, 1), (1, 8, 8, 16, 16, 3, 1, 1), (2, 3, 17, 9, 7, 3, 2, 1), (4, 16, 11, 8, 8, 3, 1, 1),
    (3, 22, 45, 7, 10, 3, 2, 1), (2, 64, 64, 4, 4, 3, 1, 1), (2, 7, 33, 6, 6, 1, 1, 0), (2, 13, 5, 9, 9, 1, 2, 0),
    (1, 5, 9, 3, 3, 3, 1, 0), (2, 40, 24, 13, 11, 3, 1, 2),
    # channels-last kernel: channel groups of 4 and 2, tiles across samples in several chunks, four-vector tiles
    (7, 12, 4, 4, 4, 3, 1, 1), (1, 6, 3, 7, 7, 3, 1, 1), (5, 16, 32, 4, 4, 3, 1, 1), (2, 8, 70, 5, 6, 5, 2, 2),
    # channel groups filling every lane (several pixels per output vector), the last tile ending mid-vector
    (3, 8, 8, 5, 7, 3, 1, 1), (1, 4, 4, 5, 5, 3, 1, 1), (2, 6, 16, 5, 5, 3, 2, 1), (1, 10, 8, 5, 5, 3, 1, 1),
    # odd input channels completed to a channel group by zero channels (padded), or not grouped (unpadded)
    (2, 11, 8, 5, 7, 3, 1, 1), (1, 13, 7, 6, 6, 3, 2, 1), (2, 5, 3, 6, 5, 3, 1, 1), (2, 11, 8, 5, 5, 1, 1, 0),
    # channel groups over three vectors: four groups filling every lane (one pixel per output vector), two groups
    # with a second, partial output vector
    (2, 12, 12, 6, 5, 3, 1, 1), (3, 16, 17, 5, 6, 3, 1, 1), (1, 22, 22, 7, 7, 3, 2, 1), (2, 24, 10, 4, 4, 1, 1, 0),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_matches_float64_ground_truth(shape, layout) -> None:
    b, c_in, c_out, h, w, k, s, p = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(b, 2 * c_in if layout == "sliced" else c_in, h, w, generator=g)
    x = x[:, ::2] if layout == "sliced" else x
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    wt, bias = torch.randn(c_out, c_in, k, k, generator=g), torch.randn(c_out, generator=g)
    h_out, w_out = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    res = torch.randn(b, c_out, h_out, w_out, generator=g)
    for use_bias, use_res, relu in itertools.product((False, True), repeat=3):
        args = (x, wt, bias if use_bias else None, res if use_res else None, s, p, 1, relu)
        y = fused_conv2d(*args, backend="cpu")
        assert y.shape == (b, c_out, h_out, w_out)
        assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last"
                               else torch.contiguous_format)
        assert_close_to_scale(y, truth(x, wt, args[2], args[3], s, p, relu), tol=1e-5)
        assert_close_to_scale(fused_conv2d(*args, backend="aten"), truth(x, wt, args[2], args[3], s, p, relu),
                              tol=1e-5)


@pytest.mark.parametrize("c_out", [5, 24])
def test_dilation_channels_last(c_out) -> None:
    g = torch.Generator().manual_seed(c_out)
    x = torch.randn(3, 8, 11, 9, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c_out, 8, 3, 3, generator=g), torch.randn(c_out, generator=g)
    y = fused_conv2d(x, w, b, None, (1, 2), (2, 1), (2, 3), relu=True, backend="cpu")
    expected = F.conv2d(x.double(), w.double(), b.double(), (1, 2), (2, 1), (2, 3)).relu()
    assert_close_to_scale(y, expected, tol=1e-5)


def test_residual_in_another_layout_and_threads() -> None:
    for batch, c_out in ((3, 20), (1, 8)):  # batch 1: each thread copies the sample it reads
        x = torch.randn(batch, 12, 10, 10).contiguous(memory_format=torch.channels_last)
        w, res = torch.randn(c_out, 12, 3, 3), torch.randn(batch, c_out, 10, 10)  # NCHW residual, NHWC output
        outs = []
        for n in (1, 2, 3):
            with threads(n):
                outs.append(fused_conv2d(x, w, None, res, 1, 1, relu=True, backend="cpu"))
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
        assert_close_to_scale(outs[0], truth(x, w, None, res, 1, 1, True), tol=1e-5)


def test_dispatch_opcheck_and_export() -> None:
    x, w, b = torch.randn(2, 6, 9, 9), torch.randn(10, 6, 3, 3), torch.randn(10)
    res = torch.randn(2, 10, 9, 9)
    assert select_backend(x, w, b, res, padding=1) == "cpu"
    assert select_backend(x.half(), w.half()) == "aten"
    assert DISPATCH.reasons(x.half(), w.half())["cpu"] == ["takes float32, got float16"]
    op = torch.ops.sparsekern.fused_conv2d.default
    for args in [(x, w, b, res, [1, 1], [1, 1], [1, 1], True, "cpu"),
                 (x.contiguous(memory_format=torch.channels_last), w, None, None, [2, 2], [0, 0], [1, 1], False,
                  None)]:
        torch.library.opcheck(op, args)

    class Block(torch.nn.Module):
        def forward(self, x, r):
            return fused_conv2d(x, w, b, r, 1, 1, relu=True)

    ep = torch.export.export(Block(), (x, res))
    assert any(n.target is op for n in ep.graph.nodes)
    assert torch.equal(ep.module()(x, res), Block()(x, res))


def test_bad_inputs_get_clear_errors() -> None:
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match=r"residual must match the output, \(2, 5, 4, 4\)"):
        fused_conv2d(x, w, residual=torch.randn(2, 5, 6, 6))
    with pytest.raises(ValueError, match="groups=1 only"):
        fused_conv2d(x, torch.randn(5, 2, 3, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        fused_conv2d(x, torch.randn(5, 4, 9, 9))
    with pytest.raises(NoBackendError, match="'cpu' cannot run these inputs: takes float32, got float16"):
        fused_conv2d(x.half(), w.half(), backend="cpu")
    with pytest.raises(TypeError, match="share a float dtype"):
        fused_conv2d(x.double(), w.double())
