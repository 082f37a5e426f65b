"""``lowrank_linear``: ``y = x Q^T P^T + bias`` with the rank-r intermediate kept on chip.

Shapes: x (..., in), Q (r, in), P (out, r), bias (out,) or None -> (..., out). This is the pruned factorized
layer of FLOP (Wang, Wohlwend and Lei, "Structured Pruning of Large Language Models", EMNLP 2020): the dense
``W = P Q`` costs ``2 T in out`` FLOPs for T tokens, the factors ``2 T r (in + out)``
(:func:`sparsekern.cost.flops` counts the op with that formula; the bias counts 0, torch's convention).

One torch op, ``torch.ops.sparsekern.lowrank_linear`` (with a fake implementation, so ``torch.compile`` and
``torch.export`` see it). Its body validates the arguments once (:func:`problem`), allocates the output and runs
one backend of :data:`DISPATCH` (each declares its devices, dtypes and limits; ``DISPATCH.reasons(...)`` lists
every reason each refuses an input):

==========  ==========================================================================================
cuda        ``csrc/cuda/lowrank_linear.cuh``: fused, ``h`` tile in shared memory, tensor cores for fp16/bf16
            (CUDA tensors, 1 <= r <= 256)
triton      :mod:`sparsekern.kernels.triton.lowrank_linear`: fused, ``h`` tile in registers (CUDA tensors, or
            any tensor under ``TRITON_INTERPRET=1``; 1 <= r <= 256)
cpu         ``csrc/cpu/lowrank_linear.cpp``: fused, x read in place, ``h`` in the thread's cache, AVX-512 /
            AVX2 micro-kernel (CPU float32 tensors, r >= 1)
two_gemm    the unfused form, ``addmm(bias, x Q^T, P^T)``: MKL on CPU, cuBLAS on GPU (always)
reference   :func:`sparsekern.ops.reference.lowrank_linear`, fp32 (always)
==========  ==========================================================================================

Dispatch (:func:`select_backend`; ``backend=`` forces one). Fusion pays where the unfused form wastes work on
``h``; the unfused form wins where there is too little work to amortise the fused kernel's set-up or where
plain GEMMs are already efficient:

* CPU tensors run ``cpu`` for float32 with T >= :data:`CPU_MIN_FUSED_TOKENS` and r <=
  :data:`CPU_MAX_FUSED_RANK`, else ``two_gemm``. MKL's first GEMM has a narrow output (r columns), so it
  packs every row of x and uses each packed element only r times; the fused kernel reads x in place and
  packs only the weights, ``r (in + out)`` elements per call, which is what few tokens cannot amortise, and
  at large ranks MKL's GEMMs are already near peak. The two thresholds are where the fused kernel stopped
  winning in :mod:`sparsekern.bench.kernel_lowrank_linear`, which times both on every shape (figures:
  ``bench/results/cpu.json`` and the README).
* CUDA tensors run ``two_gemm`` when r = 0, r > :data:`MAX_FUSED_RANK` (the ``BLOCK_M x r`` fp32 tile would
  spill) or T < :data:`GPU_MIN_FUSED_TOKENS` (a few token tiles cannot occupy the SMs, while cuBLAS splits the
  reduction); fp32 skips the native kernel (its fp32 path is plain FMA; Triton's is as exact and tiled
  better); otherwise the first of the fused backends that can run, in the device's preference order. The
  token threshold and the order come from :func:`sparsekern.ops.thresholds.for_device`: measured by
  ``sparsekern bench gpu`` for the device class when its results file is committed, else the first guesses
  from the roofline (:data:`GPU_MIN_FUSED_TOKENS`, ``cuda`` before ``triton``).

Gradients: :func:`lowrank_linear` is differentiable (an autograd function around the op, used only when a
gradient is needed); the torch op itself has no autograd formula, so a call of the op costs the dispatcher's few
microseconds rather than a Python autograd wrapper's. Differentiate through :func:`lowrank_linear`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.utils import flop_counter

from sparsekern.ops import _ext, reference, thresholds
from sparsekern.ops.backend import FLOATS, Backend, Dispatch, OnInput
from sparsekern.ops.shapes import tokens

__all__ = ["lowrank_linear", "two_gemm", "select_backend", "problem", "LowRankProblem", "flop_count", "DISPATCH",
           "MAX_FUSED_RANK", "GPU_MIN_FUSED_TOKENS", "CPU_MIN_FUSED_TOKENS", "CPU_MAX_FUSED_RANK"]

_OP = "lowrank_linear"
#: Largest rank the fused GPU kernels take (their fp32 ``h`` tile of BLOCK_M x r stays on chip up to here).
MAX_FUSED_RANK = 256
#: Fewer tokens than this run the unfused cuBLAS GEMMs on GPU: the estimate, used where no measured threshold
#: exists for the device (:mod:`sparsekern.ops.thresholds`).
GPU_MIN_FUSED_TOKENS = thresholds.ESTIMATES.lowrank_min_fused_tokens
#: Fewer tokens than this run MKL's two GEMMs on CPU (the fused kernel's weight packing is not amortised).
CPU_MIN_FUSED_TOKENS = 64
#: Larger ranks run MKL's two GEMMs on CPU (where the fused kernel stopped winning: at r = 1024 and 256 tokens).
CPU_MAX_FUSED_RANK = 512


@dataclass(frozen=True)
class LowRankProblem(OnInput):
    """Validated arguments of one call: x (..., in), q (r, in), p (out, r), bias (out,) or None."""

    x: torch.Tensor
    q: torch.Tensor
    p: torch.Tensor
    bias: torch.Tensor | None

    @property
    def rank(self) -> int:
        return self.q.shape[0]

    @property
    def tokens(self) -> int:
        return tokens(self.x.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return (*self.x.shape[:-1], self.p.shape[0])

    def new_output(self) -> torch.Tensor:
        """An uninitialised (T, out) contiguous output; ``.view(out_shape)`` gives the op's result."""
        return torch.empty((self.tokens, self.p.shape[0]), dtype=self.x.dtype, device=self.x.device)


def problem(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None) -> LowRankProblem:
    """Validate the arguments of :func:`lowrank_linear` (errors name the argument, its shape and the expected
    one)."""
    if q.dim() != 2:
        raise ValueError(f"{_OP}: Q must be (r, in), got shape {tuple(q.shape)}")
    r, n_in = q.shape
    if p.dim() != 2 or p.shape[1] != r:
        raise ValueError(f"{_OP}: P must be (out, r) with r = {r} (the rows of Q {tuple(q.shape)}), got shape "
                         f"{tuple(p.shape)}")
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"{_OP}: x must be (..., in) with in = {n_in} (the columns of Q {tuple(q.shape)}), got "
                         f"shape {tuple(x.shape)}")
    n_out = p.shape[0]
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"{_OP}: bias must be (out,) = ({n_out},) (the rows of P {tuple(p.shape)}), got shape "
                         f"{tuple(bias.shape)}")
    dtypes = [x.dtype, q.dtype, p.dtype] + ([] if bias is None else [bias.dtype])
    if x.dtype not in FLOATS or any(d != x.dtype for d in dtypes):
        raise TypeError(f"{_OP}: x, Q, P and bias must share one of float32/float16/bfloat16, got "
                        f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    for name, t in (("Q", q), ("P", p), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    return LowRankProblem(x, q, p, bias)


# ----------------------------------------------------------------------------- backends
def _fused_gpu_limits(pr: LowRankProblem) -> list[str]:
    if not 1 <= pr.rank <= MAX_FUSED_RANK:
        return [f"rank {pr.rank} outside 1..{MAX_FUSED_RANK} (the fused kernels keep a BLOCK_M x r tile on chip)"]
    return []


def _fused_cpu_limits(pr: LowRankProblem) -> list[str]:
    return ["rank 0 (nothing to fuse)"] if pr.rank < 1 else []


def _native_runner(name: str):
    def run(pr: LowRankProblem) -> torch.Tensor:
        y = pr.new_output()
        _ext.kernel(name)(pr.x, pr.q, pr.p, pr.bias, y)
        return y.view(pr.out_shape)

    return run


def _run_triton(pr: LowRankProblem) -> torch.Tensor:
    from sparsekern.kernels.triton.lowrank_linear import lowrank_linear as launch

    y = pr.new_output()
    launch(pr.x, pr.q, pr.p, pr.bias, y)
    return y.view(pr.out_shape)


def two_gemm(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The unfused form: ``h = x Q^T`` (T, r), then ``addmm(bias, h, P^T)``; returns (..., out) contiguous.

    On CPU with a row-major ``Q``, ``h`` is computed as ``(Q x^T)^T`` (MKL's faster form for a narrow output;
    no copy of Q). Shapes as in :func:`lowrank_linear`.
    """
    n_in, n_out = q.shape[1], p.shape[0]
    x2 = x.reshape(-1, n_in)
    if x.device.type == "cpu" and q.stride(1) == 1 and x2.stride(1) == 1:
        h = torch.mm(q, x2.t()).t()
    else:
        h = torch.mm(x2, q.t())
    y = torch.mm(h, p.t()) if bias is None else torch.addmm(bias, h, p.t())
    return y.view(*x.shape[:-1], n_out)


DISPATCH = Dispatch(_OP, problem)
DISPATCH.register(Backend("cuda", _native_runner("lowrank_linear_cuda"), devices=("cuda",),
                          available=_ext.requirement("lowrank_linear_cuda"), limits=_fused_gpu_limits))
DISPATCH.register(Backend("triton", _run_triton, devices=("cuda",), interpreted=True,
                          available=_ext.triton_requirement, limits=_fused_gpu_limits))
DISPATCH.register(Backend("cpu", _native_runner("lowrank_linear_cpu"), devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("lowrank_linear_cpu"), limits=_fused_cpu_limits))
DISPATCH.register(Backend("two_gemm", lambda pr: two_gemm(pr.x, pr.q, pr.p, pr.bias)))
DISPATCH.register(Backend("reference", lambda pr: reference.lowrank_linear(pr.x, pr.q, pr.p, pr.bias)))


def _choice(pr: LowRankProblem) -> tuple[str | None, Sequence[str]]:
    """(the backend the heuristic forces, or None; the preferred order otherwise): the module docstring."""
    r = pr.rank
    if pr.x.device.type != "cuda":
        fused = pr.dtype == torch.float32 and pr.tokens >= CPU_MIN_FUSED_TOKENS and 1 <= r <= CPU_MAX_FUSED_RANK
        return ("cpu" if fused and not DISPATCH["cpu"].reasons(pr) else "two_gemm"), ()
    limits = thresholds.for_device(pr.x.device)
    if r == 0 or r > MAX_FUSED_RANK or pr.tokens < limits.lowrank_min_fused_tokens:
        return "two_gemm", ()
    if pr.dtype == torch.float32 and not DISPATCH["triton"].reasons(pr):
        return "triton", ()
    return None, limits.lowrank_fused_order


def _select(pr: LowRankProblem, backend: str | None) -> Backend:
    """The backend that runs ``pr``: ``backend`` if named, else the heuristic's choice (:func:`_choice`)."""
    forced, order = _choice(pr) if backend is None else (backend, ())
    return DISPATCH.select(pr, forced, order)


def _run(pr: LowRankProblem, backend: str | None) -> torch.Tensor:
    y = _select(pr, backend).run(pr)
    return y if y.is_contiguous() else y.contiguous()


def select_backend(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str | None = None) -> str:
    """Name of the backend :func:`lowrank_linear` runs for these inputs (``backend`` forces one; an error says
    why it cannot run them)."""
    return _select(problem(x, q, p, bias), backend).name


# ----------------------------------------------------------------------------- the op
_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define(f"{_OP}(Tensor x, Tensor q, Tensor p, Tensor? bias, str? backend=None) -> Tensor")


def _impl(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: Optional[torch.Tensor],
          backend: Optional[str] = None) -> torch.Tensor:
    return _run(problem(x, q, p, bias), backend)


def _fake(x, q, p, bias, backend=None) -> torch.Tensor:
    pr = problem(x, q, p, bias)
    return pr.new_output().view(pr.out_shape)


_LIB.impl(_OP, _impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"sparsekern::{_OP}", _fake, lib=_LIB)


class _LowRankLinear(torch.autograd.Function):
    """The op with its gradients: ``gx = (gy P) Q``, ``gQ = (gy P)^T x``, ``gP = gy^T (x Q^T)``, ``gb = sum gy``."""

    @staticmethod
    def forward(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None,
                backend: str | None) -> torch.Tensor:
        return torch.ops.sparsekern.lowrank_linear(x, q, p, bias, backend)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        x, q, p, bias, _ = inputs
        ctx.save_for_backward(x, q, p)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):
        x, q, p = ctx.saved_tensors
        n_in, n_out = q.shape[1], p.shape[0]
        x2, gy2 = x.reshape(-1, n_in), gy.reshape(-1, n_out)
        gh = gy2 @ p  # (T, r)
        gx = (gh @ q).view(x.shape) if ctx.needs_input_grad[0] else None
        gq = gh.t() @ x2 if ctx.needs_input_grad[1] else None
        gp = gy2.t() @ (x2 @ q.t()) if ctx.needs_input_grad[2] else None
        gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, gq, gp, gb, None


def flop_count(x_shape, q_shape, p_shape, *args, **kwargs) -> int:
    """FLOPs of one call, multiply-add = 2: ``2 T r (in + out)`` for T = prod(x_shape[:-1]) tokens (bias: 0)."""
    return 2 * tokens(x_shape) * int(q_shape[0]) * (int(q_shape[1]) + int(p_shape[0]))


if torch.ops.sparsekern.lowrank_linear not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.sparsekern.lowrank_linear)(flop_count)


def lowrank_linear(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str | None = None) -> torch.Tensor:
    """``x Q^T P^T + bias`` without materialising ``h = x Q^T`` off chip (on the fused backends).

    Args:
        x: (..., in), float32/float16/bfloat16, any strides (leading dims are flattened into tokens).
        q: (r, in), same dtype and device; r = 0 gives the bias (or zeros).
        p: (out, r).
        bias: (out,) or None.
        backend: force one backend (``"cuda"``, ``"triton"``, ``"cpu"``, ``"two_gemm"``, ``"reference"``); default: the
            dispatch heuristic of the module docstring (:func:`select_backend` names its choice).

    Returns:
        (..., out) contiguous, in x's dtype; differentiable in x, Q, P and bias.
    """
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, q, p, bias)):
        return _LowRankLinear.apply(x, q, p, bias, backend)
    return torch.ops.sparsekern.lowrank_linear(x, q, p, bias, backend)
