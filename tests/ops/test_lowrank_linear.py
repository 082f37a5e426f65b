"""lowrank_linear: every backend against the reference, the dispatch, the custom op (opcheck, fake under
torch.compile, autograd), the FLOP formula and the input errors."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sparsekern as sk
from sparsekern.ops import NoBackendError, lowrank_linear, reference
from sparsekern.ops.lowrank_linear import (CPU_MAX_FUSED_RANK, CPU_MIN_FUSED_TOKENS, DISPATCH, MAX_FUSED_RANK,
                                           select_backend)
from tests.conftest import assert_close_to_scale, threads

CPU_BACKENDS = ["cpu", "two_gemm", "triton"]  # triton runs in Triton's interpreter here (tests/conftest.py)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _factors(n_in: int, n_out: int, r: int, *, bias: bool, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(r, n_in, generator=g) / n_in**0.5).to(dtype=dtype, device=device)
    p = (torch.randn(n_out, r, generator=g) / max(r, 1) ** 0.5).to(dtype=dtype, device=device)
    b = torch.randn(n_out, generator=g).to(dtype=dtype, device=device) if bias else None
    return q, p, b


# (leading dims of x, in, out, r): ranks 1, 7 and 33 (no multiple of 16), a 3D x, awkward sizes everywhere;
# out = 130 splits into 5 column tiles over 4 programs (one of them empty) in the interpreter's config; the C++
# kernel sees partial micro-rows (T not a multiple of 12), partial panels (r, out not multiples of 32), several
# token blocks (T = 200 > 96) and several slices of `in` (1030 > 256).
CASES = [((5,), 37, 23, 1), ((3, 7), 64, 50, 7), ((33,), 100, 130, 33), ((2, 9), 48, 40, 16), ((17,), 20, 66, 64)]
CPU_CASES = [((200,), 1030, 70, 40), ((4, 25), 96, 33, 300)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead,n_in,n_out,r", CASES)
def test_backend_matches_reference(backend, bias, lead, n_in, n_out, r) -> None:
    q, p, b = _factors(n_in, n_out, r, bias=bias, seed=r)
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(1))
    y = lowrank_linear(x, q, p, b, backend=backend)
    assert y.shape == (*lead, n_out) and y.is_contiguous() and y.dtype == x.dtype
    assert_close_to_scale(y, reference.lowrank_linear(x, q, p, b))


@pytest.mark.parametrize("lead,n_in,n_out,r", CPU_CASES)
def test_cpu_kernel_blocks_and_threads(lead, n_in, n_out, r) -> None:
    q, p, b = _factors(n_in, n_out, r, bias=True, seed=r)
    x = torch.randn(*lead, n_in, generator=torch.Generator().manual_seed(2))
    want = reference.lowrank_linear(x, q, p, b)
    for n in (1, 2):  # 2: the token ranges split over torch's intra-op threads (opted in; the session runs 1)
        with threads(n):
            assert_close_to_scale(lowrank_linear(x, q, p, b, backend="cpu"), want)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend) -> None:
    q, p, b = _factors(40, 70, 9, bias=True)
    base = torch.randn(40, 30)
    x = base.t()[::2]  # (15, 40), strides (2, 30): transposed and sliced
    q_t = q.t().contiguous().t()  # (9, 40) stored transposed
    p_t = p.t().contiguous().t()
    x3 = torch.randn(4, 6, 40).transpose(0, 1)  # 3D with permuted leading dims: flattening copies
    assert not x.is_contiguous() and not q_t.is_contiguous() and not x3.is_contiguous()
    assert_close_to_scale(lowrank_linear(x, q_t, p_t, b, backend=backend), reference.lowrank_linear(x, q, p, b))
    assert_close_to_scale(lowrank_linear(x3, q, p_t, b, backend=backend), reference.lowrank_linear(x3, q, p, b))


def test_triton_float16_in_interpreter() -> None:
    q, p, b = _factors(48, 40, 7, bias=True, dtype=torch.float16)
    x = torch.randn(20, 48).half()
    y = lowrank_linear(x, q, p, b, backend="triton")
    assert y.dtype == torch.float16
    assert_close_to_scale(y.float(), reference.lowrank_linear(x, q, p, b).float(), tol=2e-3)


def test_reference_is_the_float64_product() -> None:
    q, p, b = _factors(30, 20, 5, bias=True)
    x = torch.randn(7, 30)
    want = (x.double() @ q.double().t() @ p.double().t() + b.double()).float()
    assert_close_to_scale(reference.lowrank_linear(x, q, p, b), want, tol=1e-6)


def test_rank_zero_and_empty_batch() -> None:
    q, p, b = _factors(12, 5, 0, bias=True)
    x = torch.randn(3, 12)
    assert torch.equal(lowrank_linear(x, q, p, b), b.expand(3, 5))
    assert lowrank_linear(torch.randn(0, 4, 12), *_factors(12, 5, 3, bias=True), backend="triton").shape == (0, 4, 5)


def test_dispatch_on_cpu() -> None:
    assert DISPATCH.names == ["cuda", "triton", "cpu", "two_gemm", "reference"]
    q, p, b = _factors(64, 64, 8, bias=True)
    many, few = torch.randn(CPU_MIN_FUSED_TOKENS, 64), torch.randn(CPU_MIN_FUSED_TOKENS - 1, 64)
    assert select_backend(many, q, p, b) == "cpu"  # even with TRITON_INTERPRET=1: never the interpreter
    assert select_backend(few, q, p, b) == "two_gemm"
    assert select_backend(many.half(), q.half(), p.half(), b.half()) == "two_gemm"
    q2, p2, _ = _factors(64, 64, CPU_MAX_FUSED_RANK + 1, bias=False)
    assert select_backend(many, q2, p2) == "two_gemm"
    assert select_backend(many, q, p, b, backend="triton") == "triton"
    why = DISPATCH.reasons(many.half(), q.half(), p.half(), b.half())
    assert why["cuda"][0] == "runs on CUDA, got a CPU tensor" and why["two_gemm"] == []
    assert why["cpu"] == ["takes float32, got float16"]


def test_forced_fused_backend_explains_large_rank() -> None:
    r = MAX_FUSED_RANK + 1
    q, p, _ = _factors(8, 8, r, bias=False)
    x = torch.randn(2, 8)
    with pytest.raises(NoBackendError, match=f"rank {r} outside 1..{MAX_FUSED_RANK}"):
        lowrank_linear(x, q, p, backend="triton")
    assert_close_to_scale(lowrank_linear(x, q, p), reference.lowrank_linear(x, q, p, None))


@pytest.mark.parametrize("backend", [None, "triton", "cpu"])
def test_opcheck(backend) -> None:
    q, p, b = _factors(24, 18, 5, bias=True)
    x = torch.randn(2, 3, 24)
    op = torch.ops.sparsekern.lowrank_linear.default
    torch.library.opcheck(op, (x, q, p, b, backend))
    torch.library.opcheck(op, (x, q, p, None, backend))


def test_autograd_matches_reference() -> None:
    q, p, b = _factors(16, 12, 4, bias=True)
    x = torch.randn(2, 5, 16)
    leaves = [t.clone().requires_grad_() for t in (x, q, p, b)]
    ref_leaves = [t.clone().double().requires_grad_() for t in (x, q, p, b)]
    gy = torch.randn(2, 5, 12)
    lowrank_linear(*leaves).backward(gy)
    rx, rq, rp, rb = ref_leaves
    ((rx @ rq.t()) @ rp.t() + rb).backward(gy.double())
    for got, want in zip(leaves, ref_leaves):
        assert_close_to_scale(got.grad, want.grad.float())


def test_fake_under_torch_compile() -> None:
    torch._dynamo.reset()
    q, p, b = _factors(32, 24, 6, bias=True)

    def f(x):
        return torch.relu(lowrank_linear(x, q, p, b)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (4, 9):  # a second length reuses the dynamic-shape graph (the fake propagates symbolic sizes)
        x = torch.randn(n, 3, 32)
        assert_close_to_scale(compiled(x), f(x))


def test_flops_formula() -> None:
    n_in, n_out, r = 40, 24, 6
    q, p, b = _factors(n_in, n_out, r, bias=True)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return lowrank_linear(x, q, p, b)

    x = torch.randn(3, 5, n_in)
    want = 2 * 15 * r * (n_in + n_out)
    assert sk.flops(Layer(), x).total == want
    with FlopCounterMode(display=False) as counter:
        lowrank_linear(x, q, p, b)
    assert counter.get_total_flops() == want


@pytest.mark.parametrize("args,match", [
    (((4, 10), (3, 12), (5, 3), None), r"x must be \(\.\.\., in\) with in = 12"),
    (((4, 12), (3, 12), (5, 4), None), r"P must be \(out, r\) with r = 3"),
    (((4, 12), (3, 12), (5, 3), (4,)), r"bias must be \(out,\) = \(5,\)"),
    (((4, 12), (3, 12, 1), (5, 3), None), r"Q must be \(r, in\)"),
])
def test_shape_errors_name_the_fix(args, match) -> None:
    x, q, p, b = (None if s is None else torch.randn(*s) for s in args)
    with pytest.raises(ValueError, match=match):
        lowrank_linear(x, q, p, b)


def test_dtype_error() -> None:
    q, p, _ = _factors(8, 4, 2, bias=False)
    with pytest.raises(TypeError, match="must share one of float32/float16/bfloat16, got float64, float32"):
        lowrank_linear(torch.randn(3, 8, dtype=torch.float64), q, p)


# ----------------------------------------------------------------------------- GPU
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "two_gemm"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("lead,n_in,n_out,r", [((5,), 37, 23, 1), ((3, 11), 100, 130, 33), ((300,), 512, 384, 256),
                                               ((1000,), 256, 512, 100)])
def test_gpu_backend_matches_reference(backend, dtype, tol, lead, n_in, n_out, r) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    q, p, b = _factors(n_in, n_out, r, bias=True, dtype=dtype, device="cuda", seed=r)
    x = torch.randn(*lead, n_in, device="cuda").to(dtype)
    y = lowrank_linear(x, q, p, b, backend=backend)
    assert y.dtype == dtype and y.shape == (*lead, n_out)
    assert_close_to_scale(y.float(), reference.lowrank_linear(x, q, p, b).float(), tol=tol)
    x_nc = torch.randn(n_in, *lead, device="cuda").to(dtype).movedim(0, -1)  # unit stride along tokens
    assert_close_to_scale(lowrank_linear(x_nc, q, p, None, backend=backend).float(),
                          reference.lowrank_linear(x_nc, q, p, None).float(), tol=tol)


@cuda
@pytest.mark.gpu
def test_gpu_dispatch_heuristic() -> None:
    q, p, b = _factors(512, 512, 64, bias=True, dtype=torch.float16, device="cuda")
    assert select_backend(torch.randn(16, 512, device="cuda").half(), q, p, b) == "two_gemm"  # few tokens
    assert select_backend(torch.randn(4096, 512, device="cuda").half(), q, p, b) in ("cuda", "triton")
    q5, p5, _ = _factors(512, 512, 300, bias=False, dtype=torch.float16, device="cuda")
    assert select_backend(torch.randn(4096, 512, device="cuda").half(), q5, p5) == "two_gemm"  # large rank
