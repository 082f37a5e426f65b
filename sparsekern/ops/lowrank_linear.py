"""``lowrank_linear``: ``y = x Q^T P^T + bias`` with the rank-r intermediate kept on chip.

Shapes: x (..., in), Q (r, in), P (out, r), bias (out,) or None -> (..., out). This is the pruned factorized
layer of FLOP (Wang, Wohlwend and Lei, "Structured Pruning of Large Language Models", EMNLP 2020): the dense
``W = P Q`` costs ``2 T in out`` FLOPs for T tokens, the factors ``2 T r (in + out)``
(:func:`sparsekern.cost.flops` counts the op with that formula; the bias counts 0, torch's convention).

One public op, ``torch.ops.sparsekern.lowrank_linear`` (a torch custom op with a fake implementation and an
autograd formula, so ``torch.compile``, ``torch.export`` and fine-tuning see it), whose body runs one backend:

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
  packs only the weights, ``r (in + out)`` elements per call, which is what few tokens cannot amortise. On
  the project's 2-core AMD EPYC (Zen 4; one thread, timed interleaved on a loaded machine) the fused kernel
  ran 1.2-1.5x faster than MKL's two GEMMs at r = 32-64 on 1024/4096-wide layers from 64 tokens up (3.5x at
  1024 tokens, 1024 x 1024, r = 32; 0.9x on 512 x 512 at 64 tokens), 1.1-1.3x at r = 128 from 1024 tokens
  (a tie at 256), tied at r = 256 (0.9-1.1x), lost at r >= 512 (0.7-0.8x) and below 48 tokens (0.4-0.9x).
  The benchmark (:mod:`sparsekern.bench.kernel_lowrank_linear`) times both on every shape.
* CUDA tensors run ``two_gemm`` when r = 0, r > :data:`MAX_FUSED_RANK` (the ``BLOCK_M x r`` fp32 tile would
  spill) or T < :data:`GPU_MIN_FUSED_TOKENS` (a few token tiles cannot occupy the SMs, while cuBLAS splits the
  reduction); fp32 skips the native kernel (its fp32 path is plain FMA; Triton's is as exact and tiled
  better); otherwise the first of the fused backends that can run, in the device's preference order. The
  token threshold and the order come from :func:`sparsekern.ops.thresholds.for_device`: measured by
  ``sparsekern bench gpu`` for the device class when its results file is committed, else the first guesses
  from the roofline (:data:`GPU_MIN_FUSED_TOKENS`, ``cuda`` before ``triton``).

In plain eager inference (no autograd graph, no tracing, no dispatch or function mode) the public function
runs the dispatch directly rather than through the custom op's Python wrapper (20-30 us per call, a tenth of a
256-token call); compiled, exported, counted (``sk.flops``, ``FlopCounterMode``) and autograd calls see the op.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils import flop_counter

from sparsekern.ops import _ext, reference, thresholds
from sparsekern.ops._dispatch import Dispatch

__all__ = ["lowrank_linear", "two_gemm", "select_backend", "flop_count", "DISPATCH", "MAX_FUSED_RANK",
           "GPU_MIN_FUSED_TOKENS", "CPU_MIN_FUSED_TOKENS", "CPU_MAX_FUSED_RANK"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
#: Largest rank the fused GPU kernels take (their fp32 ``h`` tile of BLOCK_M x r stays on chip up to here).
MAX_FUSED_RANK = 256
#: Fewer tokens than this run the unfused cuBLAS GEMMs on GPU: the estimate, used where no measured threshold
#: exists for the device (:mod:`sparsekern.ops.thresholds`).
GPU_MIN_FUSED_TOKENS = thresholds.ESTIMATES.lowrank_min_fused_tokens
#: Fewer tokens than this run MKL's two GEMMs on CPU (the fused kernel's weight packing is not amortised).
CPU_MIN_FUSED_TOKENS = 64
#: Larger ranks run MKL's two GEMMs on CPU (wide enough for MKL to run near peak).
CPU_MAX_FUSED_RANK = 128


def _check_inputs(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> None:
    if q.dim() != 2:
        raise ValueError(f"lowrank_linear: Q must be (r, in), got shape {tuple(q.shape)}")
    r, n_in = q.shape
    if p.dim() != 2 or p.shape[1] != r:
        raise ValueError(f"lowrank_linear: P must be (out, r) with r = {r} (the rows of Q {tuple(q.shape)}), got "
                         f"shape {tuple(p.shape)}")
    if x.dim() < 1 or x.shape[-1] != n_in:
        raise ValueError(f"lowrank_linear: x must be (..., in) with in = {n_in} (the columns of Q "
                         f"{tuple(q.shape)}), got shape {tuple(x.shape)}")
    n_out = p.shape[0]
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"lowrank_linear: bias must be (out,) = ({n_out},) (the rows of P {tuple(p.shape)}), got "
                         f"shape {tuple(bias.shape)}")
    dtypes = [x.dtype, q.dtype, p.dtype] + ([] if bias is None else [bias.dtype])
    if x.dtype not in _FLOATS or any(d != x.dtype for d in dtypes):
        raise TypeError(f"lowrank_linear: x, Q, P and bias must share one of float32/float16/bfloat16, got "
                        f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}")
    for name, t in (("Q", q), ("P", p), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"lowrank_linear: {name} is on {t.device} but x is on {x.device}; move them to one "
                             "device")


def _tokens(x: torch.Tensor) -> int:
    t = 1
    for s in x.shape[:-1]:
        t *= int(s)
    return t


# ----------------------------------------------------------------------------- backends
def _fused_rank_reason(q: torch.Tensor) -> str | None:
    r = q.shape[0]
    if not 1 <= r <= MAX_FUSED_RANK:
        return f"rank {r} outside 1..{MAX_FUSED_RANK} (the fused kernels keep a BLOCK_M x r tile on chip)"
    return None


def _native_reason(device: str) -> str | None:
    why = _ext.status()
    if why is not None:
        return f"extension unavailable ({why})"
    if not _ext.has_kernel("lowrank_linear_native", device):
        return f"the extension has no {device.upper()} kernel"
    return None


def _cuda_check(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if x.device.type != "cuda":
        return f"needs a CUDA tensor, got {x.device}"
    return _fused_rank_reason(q) or _native_reason("cuda")


def _cpu_check(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if x.device.type != "cpu":
        return f"needs a CPU tensor, got {x.device}"
    if x.dtype != torch.float32:
        return f"the CPU kernel takes float32, got {x.dtype}"
    if q.shape[0] < 1:
        return "rank 0 (nothing to fuse)"
    return _native_reason("cpu")


def _native_run(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.sparsekern.lowrank_linear_native(x, q, p, bias)


def _triton_check(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if not (x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")):
        return f"needs a CUDA tensor (or TRITON_INTERPRET=1), got {x.device}"
    why = _fused_rank_reason(q)
    if why is not None:
        return why
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _triton_run(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from sparsekern.kernels.triton.lowrank_linear import lowrank_linear as launch

    return launch(x, q, p, bias)


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


DISPATCH = Dispatch("lowrank_linear")
DISPATCH.register("cuda", _cuda_check, _native_run)
DISPATCH.register("triton", _triton_check, _triton_run)
DISPATCH.register("cpu", _cpu_check, _native_run)
DISPATCH.register("two_gemm", lambda *args: None, two_gemm)
DISPATCH.register("reference", lambda *args: None, reference.lowrank_linear)


def _heuristic(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """The backend the dispatch forces for these inputs, or None for the first that can run (module docstring)."""
    r = q.shape[0]
    if x.device.type != "cuda":
        fused = x.dtype == torch.float32 and _tokens(x) >= CPU_MIN_FUSED_TOKENS and 1 <= r <= CPU_MAX_FUSED_RANK
        return "cpu" if fused and _cpu_check(x, q, p, bias) is None else "two_gemm"
    limits = thresholds.for_device(x.device)
    if r == 0 or r > MAX_FUSED_RANK or _tokens(x) < limits.lowrank_min_fused_tokens:
        return "two_gemm"
    if x.dtype == torch.float32 and _triton_check(x, q, p, bias) is None:
        return "triton"
    checks = {"cuda": _cuda_check, "triton": _triton_check}
    return next((name for name in limits.lowrank_fused_order if checks[name](x, q, p, bias) is None), None)


def select_backend(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None = None, *,
                   backend: str | None = None) -> str:
    """Name of the backend :func:`lowrank_linear` runs for these inputs (``backend`` forces one; an error says
    why it cannot run them)."""
    _check_inputs(x, q, p, bias)
    return DISPATCH.select(x, q, p, bias, backend=backend or _heuristic(x, q, p, bias)).name


# ----------------------------------------------------------------------------- the op
@torch.library.custom_op("sparsekern::lowrank_linear", mutates_args=())
def _op(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: Optional[torch.Tensor],
        backend: Optional[str]) -> torch.Tensor:
    y = DISPATCH(x, q, p, bias, backend=backend or _heuristic(x, q, p, bias))
    return y if y.is_contiguous() else y.contiguous()


@_op.register_fake
def _fake(x, q, p, bias, backend):
    return x.new_empty((*x.shape[:-1], p.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, q, p, bias, _ = inputs
    ctx.save_for_backward(x, q, p)
    ctx.has_bias = bias is not None


def _backward(ctx, gy: torch.Tensor):
    x, q, p = ctx.saved_tensors
    n_in, n_out = q.shape[1], p.shape[0]
    x2, gy2 = x.reshape(-1, n_in), gy.reshape(-1, n_out)
    gh = gy2 @ p  # (T, r)
    gx = (gh @ q).view(x.shape) if ctx.needs_input_grad[0] else None
    gq = gh.t() @ x2 if ctx.needs_input_grad[1] else None
    gp = gy2.t() @ (x2 @ q.t()) if ctx.needs_input_grad[2] else None
    gb = gy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return gx, gq, gp, gb, None


_op.register_autograd(_backward, setup_context=_setup_context)


def flop_count(x_shape, q_shape, p_shape, *args, **kwargs) -> int:
    """FLOPs of one call, multiply-add = 2: ``2 T r (in + out)`` for T = prod(x_shape[:-1]) tokens (bias: 0)."""
    t = 1
    for s in x_shape[:-1]:
        t *= int(s)
    return 2 * t * int(q_shape[0]) * (int(q_shape[1]) + int(p_shape[0]))


if torch.ops.sparsekern.lowrank_linear not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(torch.ops.sparsekern.lowrank_linear)(flop_count)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may run the dispatch directly instead of through the custom op: plain tensors, no autograd
    graph to record, and nothing tracing or intercepting (dynamo, export, fx proxies, dispatch or function modes
    such as FlopCounterMode, fake tensors). The result is the same; the op's Python wrapper costs 20-30 us."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) not in _PLAIN or (grad and t.requires_grad)):
            return False
    return True


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
        (..., out) contiguous, in x's dtype.
    """
    _check_inputs(x, q, p, bias)
    if _plain_eager(x, q, p, bias):
        return DISPATCH(x, q, p, bias, backend=backend or _heuristic(x, q, p, bias))
    return _op(x, q, p, bias, backend)
