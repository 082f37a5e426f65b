"""sru_recurrence: every backend against the reference (forward and backward), the reference against the paper's
equations, float64 gradcheck, the custom ops (opcheck, fake under torch.compile and torch.export), the FLOP
formula, the dispatch and the input errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparsekern as sk
from sparsekern.ops import NoBackendError, dispatch_of, sru_recurrence
from sparsekern.ops.sru_recurrence import (BACKWARD, DISPATCH, select_backend, sru_recurrence_backward_reference,
                                           sru_recurrence_reference)
from tests.conftest import assert_close_to_scale, threads

# (B, T, d): d not a multiple of any vector width and across several 64-channel tasks (130), T = 1, batch 1.
CASES = [(2, 7, 37), (1, 1, 8), (1, 33, 130), (3, 1, 5), (4, 12, 64), (1, 5, 1)]


def _inputs(b: int, t: int, d: int, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """u, x, v_f, v_r, b_f, b_r with gates well away from saturation in both directions."""
    g = torch.Generator().manual_seed(seed)
    u, x = torch.randn(b, t, 3 * d, generator=g), torch.randn(b, t, d, generator=g)
    params = [torch.randn(d, generator=g) * 0.5 for _ in range(4)]
    return [a.to(dtype) for a in (u, x, *params)]


def _paper(u, x, v_f, v_r, b_f, b_r) -> torch.Tensor:
    """Lei et al. 2018, eqs. 3-7, one time step at a time, in float64."""
    d = x.shape[-1]
    u, x, v_f, v_r, b_f, b_r = (a.double() for a in (u, x, v_f, v_r, b_f, b_r))
    c = torch.zeros(x.shape[0], d, dtype=torch.float64)
    hs = []
    for t in range(x.shape[1]):
        w, wf, wr = u[:, t, :d], u[:, t, d:2 * d], u[:, t, 2 * d:]
        f = torch.sigmoid(wf + v_f * c + b_f)
        r = torch.sigmoid(wr + v_r * c + b_r)
        c = f * c + (1 - f) * w
        hs.append(r * c + (1 - r) * x[:, t])
    return torch.stack(hs, 1)


def _grads(fn, args: list[torch.Tensor], gh: torch.Tensor) -> list[torch.Tensor]:
    leaves = [a.detach().clone().requires_grad_() for a in args]
    fn(*leaves).backward(gh)
    return [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]  # None: unused (T = 0)


def test_reference_follows_the_paper() -> None:
    args = _inputs(3, 9, 8, torch.float64)
    torch.testing.assert_close(sru_recurrence_reference(*args), _paper(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])  # triton: Triton's interpreter here
@pytest.mark.parametrize("b,t,d", CASES)
def test_backend_matches_the_paper(backend, b, t, d) -> None:
    args = _inputs(b, t, d, seed=d)
    h = sru_recurrence(*args, backend=backend)
    assert h.shape == (b, t, d) and h.dtype == torch.float32 and h.is_contiguous()
    assert_close_to_scale(h, _paper(*args).float(), tol=2e-6)


@pytest.mark.parametrize("b,t,d", CASES)
def test_cpu_backward_matches_reference_autograd(b, t, d) -> None:
    args = _inputs(b, t, d, seed=d + 1)
    gh = torch.randn(b, t, d, generator=torch.Generator().manual_seed(5))
    got = _grads(lambda *a: sru_recurrence(*a, backend="cpu"), args, gh)
    want = _grads(sru_recurrence_reference, [a.double() for a in args], gh.double())
    for name, g, w in zip(("u", "x", "v_f", "v_r", "b_f", "b_r"), got, want):
        assert g.dtype == torch.float32, name
        assert_close_to_scale(g, w.float(), tol=1e-5)


def test_cpu_task_groups_threads_and_saturated_gates() -> None:
    """5 x 200 channels are more tasks than a thread steps together (16 groups of 64 channels with AVX-512, of 32
    with AVX2): 1 thread runs several groups, 2 threads split them, bit for bit alike; gates far in saturation
    (|z| ~ 100) stay finite and exact to the scale, forward and backward."""
    args = _inputs(5, 20, 200, seed=3)
    args[0] = args[0] * 60.0
    gh = torch.randn(5, 20, 200, generator=torch.Generator().manual_seed(4))
    with threads(1):
        one = [sru_recurrence(*args, backend="cpu"), *_grads(lambda *a: sru_recurrence(*a, backend="cpu"), args, gh)]
    with threads(2):
        two = [sru_recurrence(*args, backend="cpu"), *_grads(lambda *a: sru_recurrence(*a, backend="cpu"), args, gh)]
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    assert torch.isfinite(one[0]).all()
    assert_close_to_scale(one[0], _paper(*args).float(), tol=1e-5)  # torch's own float32 loop: 8e-6 here
    want = _grads(sru_recurrence_reference, [a.double() for a in args], gh.double())
    for g, w in zip(one[1:], want):  # float32 gradients, the parameters' summed over 5 x 20 steps
        assert_close_to_scale(g, w.float(), tol=5e-5)


def test_nan_propagates_like_the_reference() -> None:
    args = _inputs(2, 6, 70, seed=9)
    args[0][1, 2, 3] = float("nan")  # W x at t = 2 of channel 3: c and h of that channel from t = 2 on
    args[0][0, 4, 70 + 65] = float("nan")  # W_f x at t = 4 of channel 65 (second task with AVX-512)
    got, want = sru_recurrence(*args, backend="cpu"), sru_recurrence_reference(*args)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 4 + 2
    assert_close_to_scale(got.nan_to_num(), want.nan_to_num(), tol=2e-6)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_inputs(backend) -> None:
    b, t, d = 3, 6, 19
    u, x, *params = _inputs(b, t, d, seed=7)
    u_nc = u.transpose(0, 1).contiguous().transpose(0, 1)  # batch-major strides swapped
    x_nc = torch.cat([x, x], dim=-1)[..., ::2]  # every other column
    x_nc.copy_(x)
    params_nc = [torch.stack([p, p], 1)[:, 0] for p in params]  # stride 2
    assert not u_nc.is_contiguous() and not x_nc.is_contiguous() and not params_nc[0].is_contiguous()
    want = _paper(u, x, *params).float()
    assert_close_to_scale(sru_recurrence(u_nc, x_nc, *params_nc, backend=backend), want, tol=2e-6)
    gh = torch.randn(b, t, d, generator=torch.Generator().manual_seed(8)).transpose(0, 1).contiguous().transpose(0, 1)
    got = _grads(lambda *a: sru_recurrence(*a, backend=backend), [u_nc, x_nc, *params_nc], gh)
    ref = _grads(sru_recurrence_reference, [u.double(), x.double(), *(p.double() for p in params)], gh.double())
    for g, w in zip(got, ref):
        assert_close_to_scale(g, w.float(), tol=1e-5)


def test_float64_gradcheck_through_the_reference() -> None:
    args = [a.requires_grad_() for a in _inputs(2, 4, 3, torch.float64, seed=11)]
    assert select_backend(*args) == "reference"
    assert torch.autograd.gradcheck(sru_recurrence, args)
    assert torch.autograd.gradcheck(lambda *a: sru_recurrence(*a, backend="reference"), args)


@pytest.mark.parametrize("b,t,d", [(2, 5, 4), (1, 1, 3), (3, 0, 2)])
def test_backward_op_backends_match_reference_autograd(b, t, d) -> None:
    """Every backward backend against autograd through the float64 reference (float32 inputs, and float64 for the
    plain-torch backward); grad_params stacks v_f, v_r, b_f, b_r."""
    args = _inputs(b, t, d, seed=12)
    gh = torch.randn(b, t, d, generator=torch.Generator().manual_seed(13))
    want = _grads(sru_recurrence_reference, [a.double() for a in args], gh.double())
    want = [want[0], want[1], torch.stack(want[2:])]
    for got in (BACKWARD.run(BACKWARD.problem(gh, *args), "cpu"),
                BACKWARD.run(BACKWARD.problem(gh, *args), "triton"),
                BACKWARD.run(BACKWARD.problem(gh, *args), "reference"),
                sru_recurrence_backward_reference(gh.double(), *(a.double() for a in args))):
        for g, w in zip(got, want):
            assert g.shape == w.shape
            if w.numel():
                assert_close_to_scale(g.double(), w, tol=1e-5 if g.dtype == torch.float32 else 1e-12)


def test_half_precision_runs_the_reference_in_float32() -> None:
    args = _inputs(2, 5, 9, torch.bfloat16, seed=4)
    assert select_backend(*args) == "reference"
    h = sru_recurrence(*args)
    assert h.dtype == torch.bfloat16
    assert_close_to_scale(h.float(), _paper(*args).float(), tol=1e-2)
    got = _grads(sru_recurrence, args, torch.ones(2, 5, 9, dtype=torch.bfloat16))  # reference autograd
    assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in got)


def test_empty_length_and_batch() -> None:
    for b, t in ((2, 0), (0, 3)):
        args = _inputs(b, t, 6)
        for backend in ("cpu", "triton", "reference"):
            assert sru_recurrence(*args, backend=backend).shape == (b, t, 6)


def test_dispatch() -> None:
    assert dispatch_of("sru_recurrence") is DISPATCH
    assert DISPATCH.names == ["cuda", "cpu", "triton", "reference"] == BACKWARD.names
    args = _inputs(1, 2, 4)
    assert select_backend(*args) == "cpu"
    half = [a.half() for a in args]
    assert select_backend(*half) == "reference"  # triton only when forced on CPU tensors
    assert DISPATCH.reasons(*half)["cpu"] == ["takes float32, got float16"]
    assert_close_to_scale(sru_recurrence(*half, backend="triton").float(), sru_recurrence_reference(*args), tol=2e-3)
    with pytest.raises(NoBackendError, match="takes float32, got float16"):
        sru_recurrence(*half, backend="cpu")


@pytest.mark.parametrize("backend", [None, "cpu", "reference"])
def test_opcheck(backend) -> None:
    args = _inputs(2, 3, 5)
    torch.library.opcheck(torch.ops.sparsekern.sru_recurrence.default, (*args, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the cpu and reference backward backends
def test_opcheck_backward(dtype) -> None:
    args = _inputs(2, 3, 5, dtype)
    gh = torch.randn(2, 3, 5, dtype=dtype)
    torch.library.opcheck(torch.ops.sparsekern.sru_recurrence_backward.default, (gh, *args))


def test_fake_under_torch_compile_and_export() -> None:
    torch._dynamo.reset()
    params = _inputs(1, 1, 8)[2:]

    def f(u, x):
        return sru_recurrence(u, x, *params) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for t in (4, 9):
        u, x, *_ = _inputs(2, t, 8, seed=t)
        assert_close_to_scale(compiled(u, x), f(u, x))

    class M(torch.nn.Module):
        def forward(self, u, x):
            return sru_recurrence(u, x, *params)

    u, x, *_ = _inputs(2, 5, 8)
    ep = torch.export.export(M(), (u, x))
    assert_close_to_scale(ep.module()(u, x), M()(u, x))


def test_training_under_torch_compile_runs_the_backward_op() -> None:
    torch._dynamo.reset()
    args = [a.requires_grad_() for a in _inputs(2, 4, 8)]
    compiled = torch.compile(lambda *a: sru_recurrence(*a).sum(), fullgraph=True, backend="aot_eager")
    compiled(*args).backward()
    want = _grads(sru_recurrence_reference, [a.detach().double() for a in args], torch.ones(2, 4, 8).double())
    for a, w in zip(args, want):
        assert_close_to_scale(a.grad, w.float(), tol=1e-5)


def test_flops_count_the_recurrence_as_elementwise() -> None:
    """0 FLOPs, as the cost model counts the elementwise ops of the plain loop; the op is not 'uncounted'."""
    args = _inputs(2, 6, 8)

    class Fused(torch.nn.Module):
        def forward(self, u, x):
            return sru_recurrence(u, x, *args[2:])

    class Loop(torch.nn.Module):
        def forward(self, u, x):
            return sru_recurrence_reference(u, x, *args[2:])

    fused, loop = sk.flops(Fused(), tuple(args[:2])), sk.flops(Loop(), tuple(args[:2]))
    assert fused.total == loop.total == 0
    assert not fused.uncounted_ops
    with FlopCounterMode(display=False) as counter:
        sru_recurrence(*args)
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("shapes,match", [
    (((2, 3, 12), (2, 3), 4), r"x must be \(B, T, d\), got shape \(2, 3\)"),
    (((2, 3, 11), (2, 3, 4), 4), r"u must be \(B, T, 3d\) = \(2, 3, 12\) for x of shape \(2, 3, 4\)"),
    (((2, 4, 12), (2, 3, 4), 4), r"u must be \(B, T, 3d\) = \(2, 3, 12\)"),
    (((2, 3, 12), (2, 3, 4), 5), r"v_f must be \(d,\) = \(4,\) \(the last axis of x \(2, 3, 4\)\), got shape \(5,\)"),
])
def test_shape_errors_name_the_fix(shapes, match) -> None:
    u_shape, x_shape, d = shapes
    params = [torch.randn(d) for _ in range(4)]
    with pytest.raises(ValueError, match=match):
        sru_recurrence(torch.randn(*u_shape), torch.randn(*x_shape), *params)


def test_dtype_and_device_errors() -> None:
    u, x, v_f, v_r, b_f, b_r = _inputs(1, 2, 3)
    with pytest.raises(TypeError, match="must share one of float32/float16/bfloat16/float64, got .*b_r float64"):
        sru_recurrence(u, x, v_f, v_r, b_f, b_r.double())
    with pytest.raises(TypeError, match="x int64"):
        sru_recurrence(u, x.long(), v_f, v_r, b_f, b_r)
    with pytest.raises(ValueError, match="b_f is on meta but x is on cpu"):
        sru_recurrence(u, x, v_f, v_r, b_f.to("meta"), b_r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backends_forward_and_backward(backend: str, dtype: torch.dtype) -> None:
    if backend == "cuda" and DISPATCH["cuda"].reasons(DISPATCH.problem(*(a.cuda() for a in _inputs(1, 1, 4)))):
        pytest.skip("the CUDA extension is unavailable")
    args = [a.to("cuda", dtype) for a in _inputs(3, 17, 200)]
    gh = torch.randn(3, 17, 200, device="cuda", dtype=dtype)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert_close_to_scale(sru_recurrence(*args, backend=backend).float(),
                          sru_recurrence_reference(*(a.double() for a in args)).float(), tol=tol)
    want = sru_recurrence_backward_reference(gh.double(), *(a.double() for a in args))
    for g, w in zip(BACKWARD.run(BACKWARD.problem(gh, *args), backend), want):
        assert g.dtype == dtype
        assert_close_to_scale(g.double(), w, tol=1e-5 if dtype == torch.float32 else 3e-2)
