"""Fused low-rank linear layer ``y = x Q^T P^T + bias`` (Triton), the rank-r intermediate kept on chip.

Math. With ``x`` (T, in) (leading dims flattened into T tokens), ``Q`` (r, in), ``P`` (out, r):

    h[t, j] = sum_{k < in} x[t, k] Q[j, k]                  (T x r, the intermediate)
    y[t, n] = bias[n] + sum_{j < r} h[t, j] P[n, j]          (T x out)

FLOPs ``2 T r (in + out)`` against ``2 T in out`` for the dense layer ``W = P Q``: the theoretical speedup is
``in out / (r (in + out))`` (the factorized layers of FLOP, Wang, Wohlwend and Lei, EMNLP 2020).

Why fuse. For ``r`` below the machine balance (about 300 FLOP/byte for fp16 on an H100) both GEMMs of the
unfused form are bound by memory traffic: reading ``x`` and writing ``y`` cost ``2 T (in + out)`` bytes at
fp16, and the unfused form adds a write and a read of ``h``, ``4 T r`` bytes, plus a second launch. Keeping
``h`` on chip saves exactly that share, ``2 r / (in + out)`` of the traffic.

Kernel. A program owns ``BLOCK_M`` tokens. Phase 1 runs the K loop over ``in`` in ``BLOCK_K`` chunks and
accumulates the full ``BLOCK_M x BLOCK_R`` tile of ``h`` in fp32 registers with ``tl.dot`` (``BLOCK_R`` = r
rounded up to a power of two >= 16, at most 256: larger ranks take the unfused path, see
:mod:`sparsekern.ops.lowrank_linear`). The tile is rounded once to the input dtype (as the second of two
cuBLAS GEMMs would read it) and phase 2 sweeps output columns in ``BLOCK_N`` chunks, one ``tl.dot`` each
(K = ``BLOCK_R``), adding the bias in fp32 before the single store of ``y``.

Parallelism. One program per token tile leaves most SMs idle below a few thousand tokens, so the output
columns are split into ``S`` contiguous ranges and the grid is ``cdiv(T, BLOCK_M) * S`` programs; the ``S``
programs of one token tile are adjacent in launch order, so they run together and read that ``x`` tile from L2
rather than HBM, and each recomputes phase 1 (``S`` times the ``2 T r in`` FLOPs of phase 1: cheap while the
op is memory-bound, and bounded by ``MAX_SPLIT``). ``S`` is the smallest split that fills every SM once
(:func:`output_split`).

Edges. Every load and store is masked: tokens beyond T, ``in`` beyond a multiple of ``BLOCK_K``, ranks
beyond r (any r >= 1: 1, 7, 33 all work; the padded rank columns read zeros of ``Q`` and ``P``) and output
columns beyond ``out``. Any strides are accepted for ``x`` (after flattening its leading dims), ``Q``, ``P``.

Precision. fp16/bf16 use tensor cores with fp32 accumulation; fp32 inputs use TF32 when
``torch.backends.cuda.matmul.allow_tf32`` is set (the choice cuBLAS makes for the dense layer) and exact fp32
FMA otherwise. Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors with a single small config
(Triton's interpreter has no bf16 ``tl.dot``, so bf16 is checked on GPU only).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["lowrank_linear", "MAX_RANK", "MAX_SPLIT", "output_split", "rank_block"]

#: Largest rank the fused kernel takes: the ``BLOCK_M x 256`` fp32 tile of ``h`` still fits in registers.
MAX_RANK = 256
#: Most programs that share one token tile (each recomputes phase 1).
MAX_SPLIT = 8


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def rank_block(r: int) -> int:
    """``BLOCK_R``: r rounded up to a power of two, at least 16 (the smallest ``tl.dot`` dimension)."""
    return max(16, triton.next_power_of_2(r))


def output_split(m_tiles: int, n_tiles: int, sms: int) -> int:
    """Programs per token tile: enough to give each of ``sms`` SMs one program, at most ``MAX_SPLIT`` and at most
    the number of ``BLOCK_N`` column tiles."""
    return max(1, min(MAX_SPLIT, n_tiles, triton.cdiv(sms, max(m_tiles, 1))))


# ----------------------------------------------------------------------------- autotune configs
def _configs() -> list[triton.Config]:
    """Tiles the autotuner tries; :func:`_prune` drops those whose ``h`` tile would not fit in registers."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1)]
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
        (16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (32, 128, 32, 8, 3),
        (64, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 128, 32, 8, 3), (64, 256, 64, 8, 3), (128, 64, 64, 4, 3),
        (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (128, 256, 32, 8, 3), (64, 64, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Keep tiles whose fp32 ``h`` (``BLOCK_M x BLOCK_R``) and P tile fit, and that are not much larger than the
    problem (tokens, output columns, reduction length)."""
    block_r = kwargs["BLOCK_R"]
    cap_m = max(16, triton.next_power_of_2(named_args["T_BUCKET"]))
    cap_n = max(64, triton.next_power_of_2(named_args["OUT"]))
    cap_k = max(32, triton.next_power_of_2(named_args["IN"]))
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        regs_per_thread = (bm * block_r + bm * bn) // (32 * c.num_warps)  # h + output accumulators, fp32
        if regs_per_thread > 160 or bn * block_r > 256 * 128 or bk * block_r > 64 * 256:
            continue
        if bm <= cap_m and bn <= cap_n and bk <= cap_k:
            kept.append(c)
    if kept:
        return kept
    smallest = min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * block_r, c.kwargs["BLOCK_N"]))
    return [smallest]


# ----------------------------------------------------------------------------- kernel
@triton.autotune(configs=_configs(), key=["T_BUCKET", "IN", "OUT", "R"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["T", "T_BUCKET"])
def _lowrank_linear_kernel(
    # pointers
    x_ptr, q_ptr, p_ptr, bias_ptr, y_ptr,
    # sizes
    T, IN, OUT, R, T_BUCKET,
    # strides (elements)
    s_xt, s_xk, s_qr, s_qk, s_pn, s_pr, s_yt, s_yn,
    # constexprs
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # program -> (token tile, output-column range); the ranges of one token tile are adjacent in launch order
    m_tiles = tl.cdiv(T, BLOCK_M)
    split = tl.num_programs(0) // m_tiles
    pid = tl.program_id(0)
    pid_m = pid // split
    pid_n = pid % split
    n_tiles = tl.cdiv(OUT, BLOCK_N)
    tiles_per = tl.cdiv(n_tiles, split)
    n_first = pid_n * tiles_per * BLOCK_N
    n_last = tl.minimum((pid_n + 1) * tiles_per * BLOCK_N, OUT)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T
    rows_x = offs_m.to(tl.int64) * s_xt
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R

    # phase 1: h = x_tile @ Q^T, the whole BLOCK_M x BLOCK_R tile in fp32 registers
    h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < IN
        xt = tl.load(x_ptr + rows_x[:, None] + offs_k[None, :] * s_xk, mask=m_ok[:, None] & k_ok[None, :],
                     other=0.0)
        qt = tl.load(q_ptr + offs_r[None, :] * s_qr + offs_k[:, None] * s_qk, mask=k_ok[:, None] & r_ok[None, :],
                     other=0.0)
        h = tl.dot(xt, qt, h, input_precision=INPUT_PRECISION)
    h_in = h.to(x_ptr.dtype.element_ty)

    # phase 2: y_tile = h @ P^T + bias over this program's output columns
    rows_y = offs_m.to(tl.int64) * s_yt
    for n0 in range(n_first, n_last, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_last
        pt = tl.load(p_ptr + offs_n[None, :] * s_pn + offs_r[:, None] * s_pr, mask=r_ok[:, None] & n_ok[None, :],
                     other=0.0)
        acc = tl.dot(h_in, pt, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_y[:, None] + offs_n[None, :] * s_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------- launcher
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def lowrank_linear(x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, bias: torch.Tensor | None,
                   y: torch.Tensor) -> None:
    """Launch the kernel, writing ``y``.

    The arguments are those :func:`sparsekern.ops.lowrank_linear` validated (this launcher checks nothing):
    x (..., in) float32/float16/bfloat16 on CUDA (CPU under ``TRITON_INTERPRET=1``), any strides; q (r, in) with
    1 <= r <= :data:`MAX_RANK`; p (out, r); bias (out,) or None; all one dtype. ``y`` is (T, out) contiguous in
    x's dtype, T = prod(x.shape[:-1]).
    """
    n_in, n_out, r = q.shape[1], p.shape[0], q.shape[0]
    x2 = x.reshape(-1, n_in)  # a view whenever the leading dims allow one; the kernel takes any 2D strides
    t = x2.shape[0]
    if t == 0 or n_out == 0:
        return
    if x.dtype == torch.float32:
        precision = "tf32" if (x.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    else:
        precision = None
    sms = _sm_count(x.device)

    def grid(meta: dict) -> tuple[int]:
        m_tiles = triton.cdiv(t, meta["BLOCK_M"])
        return (m_tiles * output_split(m_tiles, triton.cdiv(n_out, meta["BLOCK_N"]), sms),)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _lowrank_linear_kernel[grid](
            x2, q, p, y if bias is None else bias, y,
            t, n_in, n_out, r, triton.next_power_of_2(t),
            x2.stride(0), x2.stride(1), q.stride(0), q.stride(1), p.stride(0), p.stride(1), y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, INPUT_PRECISION=precision, BLOCK_R=rank_block(r),
        )
