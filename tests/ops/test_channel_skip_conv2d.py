"""channel_skip_conv2d on CPU: the C++ kernel and the reference against an independent per-sample ground truth
(awkward geometries, empty and full masks, layouts, threads), the skipping claims (masked-off outputs exactly
zero, masked-off inputs never read), the custom op (opcheck, fake under torch.export) and the input errors.
The Triton backend has its own tests (tests/kernels/)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekern.ops import _ext, channel_skip_conv2d, reference
from sparsekern.ops.channel_skip_conv2d import DISPATCH, problem
from sparsekern.ops.shapes import conv2d_output_size as output_size
from tests.conftest import assert_close_to_scale, threads

CPU_BACKENDS = ["cpu", "reference"]


@pytest.fixture(scope="module")
def native() -> None:
    """Skip (with the build error) where the C++ extension cannot be built."""
    why = _ext.status()
    if why is not None:
        pytest.skip(f"the C++ extension is unavailable: {why}")


def _needs_native(backend: str, request: pytest.FixtureRequest) -> None:
    if backend == "cpu":
        request.getfixturevalue("native")


def sliced_conv(x, w, b, in_mask, out_mask, stride, padding, dilation, relu) -> torch.Tensor:
    """Ground truth computed the way the semantics read: per sample, a float64 conv of only the active input
    channels with only the active weight rows and columns, scattered into zeros."""
    bsz, c_in = x.shape[:2]
    c_out = w.shape[0]
    h, wd = output_size(x.shape[2], x.shape[3], w.shape[2:], stride, padding, dilation)
    y = torch.zeros(bsz, c_out, h, wd, dtype=torch.float64)
    for i in range(bsz):
        ci = torch.arange(c_in) if in_mask is None else in_mask[i].nonzero().flatten()
        co = torch.arange(c_out) if out_mask is None else out_mask[i].nonzero().flatten()
        if len(co) == 0:
            continue
        bias = None if b is None else b[co].double()
        if len(ci) == 0:
            yi = torch.zeros(len(co), h, wd, dtype=torch.float64) + (0 if bias is None else bias[:, None, None])
        else:
            yi = F.conv2d(x[i : i + 1, ci].double(), w[co][:, ci].double(), bias, stride, padding, dilation)[0]
        y[i, co] = yi.relu() if relu else yi
    return y.float()


def _masks(bsz: int, c_in: int, c_out: int, mode: str, seed: int):
    """Random masks; from 3 samples on, with the edge cases: sample 0 computes nothing, sample 1 reads no input
    (its outputs are the bias), sample 2 keeps every channel."""
    g = torch.Generator().manual_seed(seed)
    im = torch.rand(bsz, c_in, generator=g) < 0.5 if mode in ("in", "both") else None
    om = torch.rand(bsz, c_out, generator=g) < 0.5 if mode in ("out", "both") else None
    if bsz >= 3:
        for m, sample, value in ((om, 0, False), (im, 1, False), (im, 2, True), (om, 2, True)):
            if m is not None:
                m[sample] = value
    return im, om


def _pairs(*values):
    return [[v, v] if isinstance(v, int) else list(v) for v in values]


# (B, C_in, C_out, H, W, kernel, stride, padding, dilation)
GEOMETRIES = [
    (4, 5, 7, 9, 11, 3, 1, 1, 1),              # odd sizes: grid rows of 13 columns, 11 kept
    (3, 8, 33, 16, 15, 3, 2, 1, 1),            # stride 2: four polyphase planes, 33 rows = 6 row blocks
    (2, 3, 20, 23, 17, 7, 2, 3, 1),            # a 7x7 stem
    (4, 16, 16, 8, 8, 1, 1, 0, 1),             # 1x1 stride 1, 64 positions: input planes read in place
    (3, 16, 13, 7, 5, 1, 1, 0, 1),             # 1x1 stride 1, 35 positions: copied planes
    (3, 16, 40, 15, 13, 1, 2, 0, 1),           # 1x1 stride 2 (downsample)
    (3, 6, 9, 13, 12, 3, 2, 2, 2),             # dilation with stride
    (3, 4, 5, 5, 6, (2, 3), (1, 2), (0, 1), (2, 1)),  # non-square everything
    (3, 40, 70, 4, 4, 3, 1, 1, 1),             # a 4x4 map: one tile spans several rows
    (3, 3, 4, 1, 1, 3, 1, 1, 1),               # 1x1 map: all taps but one are padding; a vector spans 6 runs
    (1, 12, 24, 30, 30, 3, 1, 1, 1),           # batch 1, 15 tiles
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "x".join(map(str, g[:5])) + f"-k{g[5]}s{g[6]}")
def test_matches_per_sample_ground_truth(backend, geom, request) -> None:
    _needs_native(backend, request)
    bsz, c_in, c_out, h, w, k, s, p, d = geom
    kh, kw = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(c_in * 100 + c_out)
    x = torch.randn(bsz, c_in, h, w, generator=g)
    wt = torch.randn(c_out, c_in, kh, kw, generator=g)
    b = torch.randn(c_out, generator=g)
    for i, (mode, bias, relu) in enumerate([("both", True, True), ("out", False, False), ("in", True, False),
                                            ("none", False, True)]):
        im, om = _masks(bsz, c_in, c_out, mode, seed=i)
        bi = b if bias else None
        y = channel_skip_conv2d(x, wt, bi, im, om, s, p, d, relu, backend=backend)
        assert y.shape == (bsz, c_out, *output_size(h, w, (kh, kw), *_pairs(s, p, d)))
        assert y.dtype == torch.float32 and y.is_contiguous()
        assert_close_to_scale(y, sliced_conv(x, wt, bi, im, om, *_pairs(s, p, d), relu))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_off_outputs_are_exact_zeros(backend, request) -> None:
    _needs_native(backend, request)
    x = torch.randn(5, 6, 10, 10)
    w = torch.randn(12, 6, 3, 3)
    b = torch.full((12,), 100.0)  # shows through where an output is computed (the conv terms are ~N(0, 54))
    _, om = _masks(5, 6, 12, "out", seed=3)
    for relu in (False, True):
        y = channel_skip_conv2d(x, w, b, None, om, 1, 1, relu=relu, backend=backend)
        assert torch.count_nonzero(y[~om]) == 0
        assert torch.count_nonzero(y[om]) == y[om].numel()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_masked_off_inputs_are_never_read(layout, native) -> None:
    """NaN and inf in masked-off input channels do not reach any output (the kernel never loads them)."""
    x = torch.randn(4, 10, 12, 12)
    w = torch.randn(8, 10, 3, 3)
    im, om = _masks(4, 10, 8, "both", seed=4)
    poisoned = x.clone()
    poisoned[~im] = float("nan")
    b, c = (~im).nonzero()[0].tolist()
    poisoned[b, c, 0, :] = float("inf")
    if layout == "channels_last":
        poisoned = poisoned.contiguous(memory_format=torch.channels_last)
    for s, p in ((1, 1), (2, 0)):
        y = channel_skip_conv2d(poisoned, w, None, im, om, s, p, backend="cpu")
        assert torch.isfinite(y).all()
        zeroed = x * im[:, :, None, None]
        assert_close_to_scale(y, reference.channel_skip_conv2d(zeroed, w, None, None, om, [s, s], [p, p], [1, 1], False))


def test_layouts_and_output_memory_format(native) -> None:
    """Channels-last in -> channels-last out, anything else -> NCHW; strided views give the same numbers."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(3, 7, 18, 22, generator=g)
    w = torch.randn(9, 7, 3, 3, generator=g)
    b = torch.randn(9, generator=g)
    im, om = _masks(3, 7, 9, "both", seed=5)
    want = sliced_conv(base, w, b, im, om, [2, 1], [1, 1], [1, 1], True)
    views = {
        "channels_last": (base.contiguous(memory_format=torch.channels_last), torch.channels_last),
        "strided": (torch.randn(3, 7, 18, 44, generator=g)[..., ::2].copy_(base), torch.contiguous_format),
        "permuted": (base.permute(0, 1, 3, 2).contiguous().transpose(2, 3), torch.contiguous_format),
    }
    for name, (x, fmt) in views.items():
        assert torch.equal(x, base)
        y = channel_skip_conv2d(x, w, b, im, om, (2, 1), 1, relu=True, backend="cpu")
        assert y.is_contiguous(memory_format=fmt), name
        assert_close_to_scale(y, want)


def test_results_do_not_depend_on_the_thread_split(native) -> None:
    """Batch 1 is split across threads by output tiles, batch 3 by samples and tiles; every output is
    computed by the same instructions either way, so the results are bitwise equal."""
    w = torch.randn(20, 8, 3, 3)
    b = torch.randn(20)
    for bsz in (1, 3):
        x = torch.randn(bsz, 8, 40, 40)
        im, om = _masks(bsz, 8, 20, "both", seed=bsz)
        outs = []
        for n in (1, 2):  # a threading test: opts in to 2 threads (the session runs with 1)
            with threads(n):
                outs.append(channel_skip_conv2d(x, w, b, im, om, 1, 1, relu=True, backend="cpu"))
        assert torch.equal(outs[0], outs[1])  # the kernel's promise: bitwise, not just within tolerance
        assert_close_to_scale(outs[0], sliced_conv(x, w, b, im, om, [1, 1], [1, 1], [1, 1], True))


def test_dispatch_prefers_the_cpu_kernel_for_float32(native) -> None:
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    assert DISPATCH.select(problem(x, w, padding=1)).name == "cpu"
    assert DISPATCH.reasons(x.half(), w.half())["cpu"] == ["takes float32, got float16"]


def test_opcheck_and_fake_under_export(native) -> None:
    x, w, b = torch.randn(2, 6, 9, 9), torch.randn(10, 6, 3, 3), torch.randn(10)
    im, om = _masks(2, 6, 10, "both", seed=6)
    op = torch.ops.sparsekern.channel_skip_conv2d.default
    for args in [(x, w, b, im, om, [2, 2], [1, 1], [1, 1], True, "cpu"),
                 (x, w, None, None, om, [1, 1], [0, 0], [2, 2], False, None),
                 (x, w, b, im, None, [1, 2], [2, 1], [1, 1], False, "reference")]:
        torch.library.opcheck(op, args)

    class Gated(torch.nn.Module):
        def forward(self, x, im, om):
            return channel_skip_conv2d(x, w, b, im, om, 2, 1, relu=True)

    ep = torch.export.export(Gated(), (x, im, om))
    assert any(n.target is op for n in ep.graph.nodes)
    [out] = [n for n in ep.graph.nodes if n.target is op]
    assert tuple(out.meta["val"].shape) == (2, 10, 5, 5)  # the fake implementation's shape
    assert torch.equal(ep.module()(x, im, om), Gated()(x, im, om))


def test_bad_inputs_get_clear_errors(native) -> None:
    x, w = torch.randn(2, 4, 6, 6), torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match=r"in_mask must be a bool tensor of shape \(2, 4\)"):
        channel_skip_conv2d(x, w, in_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"out_mask must be a bool tensor of shape \(2, 5\), got torch.uint8"):
        channel_skip_conv2d(x, w, out_mask=torch.ones(2, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match="groups=1 only"):
        channel_skip_conv2d(x, torch.randn(8, 2, 3, 3))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        channel_skip_conv2d(x, torch.randn(5, 4, 9, 9))
    with pytest.raises(TypeError, match="share a float dtype"):
        channel_skip_conv2d(x.double(), w.double())
    with pytest.raises(ValueError, match=r"stride must be an int or a pair, got \[1, 1, 1\]"):
        channel_skip_conv2d(x, w, stride=[1, 1, 1])
    op = torch.ops.sparsekern.channel_skip_conv2d  # the torch op validates the same way
    with pytest.raises(ValueError, match=r"out_mask must be a bool tensor of shape \(2, 5\)"):
        op(x, w, None, None, torch.ones(2, 4, dtype=torch.bool), [1, 1], [0, 0], [1, 1], False)
    kernel = _ext.kernel("channel_skip_conv2d_cpu")  # the kernel itself refuses what could corrupt memory
    with pytest.raises(RuntimeError, match="internal: 4-D float32"):
        kernel(x.double(), w.double(), None, None, None, None, [1, 1], [0, 0], [1, 1], False, torch.empty(2, 5, 4, 4))


def test_benchmark_shapes_and_bookkeeping(native) -> None:
    """The microbenchmark traces the real layer geometries and its figures are consistent with each other."""
    from sparsekern.bench import kernel_channel_skip_conv2d as bench

    r18 = bench.model_shapes("resnet18")
    assert sum(s.count for s in r18) == 20  # stem + 16 block convs + 3 downsamples
    assert {(s.c_in, s.c_out, s.kernel, s.stride, s.h) for s in r18} >= {
        (3, 64, (7, 7), (2, 2), 224), (64, 64, (3, 3), (1, 1), 56), (512, 512, (3, 3), (1, 1), 7),
        (256, 512, (1, 1), (2, 2), 14)}
    assert [s.stem for s in r18].count(True) == 1

    im = torch.tensor([[True, False, True, True], [False, False, True, False]])
    om = torch.tensor([[True] * 6, [True, False, False, False, False, False]])
    assert bench.theoretical_speedup(im, om, 4) == pytest.approx(2 * 4 * 6 / (3 * 6 + 1 * 1))
    assert bench.theoretical_speedup(None, om, 4) == pytest.approx(2 * 6 / 7)

    shape = bench.LayerShape("toy", "conv", 12, 20, (3, 3), (1, 1), (1, 1), (1, 1), 10, 10)
    doc = bench.run(shapes=[shape], batches=(3,), keeps=(0.5,), threads=1, warmup=1, repeats=2, min_repeats=2,
                    budget_s=0.01, progress=False)
    assert [r["masks"] for r in doc["rows"]] == ["out", "in+out"]
    for r in doc["rows"]:
        assert r["backend"] == "cpu" and r["kernels"]["cpu"]["max_rel_error"] < 1e-4
        assert r["efficiency"] == pytest.approx(r["dense_ms"] / r["kernel_ms"] / r["theoretical_speedup"])
        assert r["efficiency_vs_dense_then_mask"] == pytest.approx(
            r["dense_then_mask_ms"] / r["kernel_ms"] / r["theoretical_speedup"])
    assert "toy.conv" in bench.table(doc)
