"""Channel-skipping convolution as a per-sample implicit GEMM (Triton).

Math. For sample ``b`` let ``I_b = [i_0 < i_1 < ...]`` be its active input channels (``in_mask[b, i]``) and
``O_b`` its active output channels (``out_mask[b, o]``). With output pixel ``p = (oh, ow)``, ``M = H_out W_out``:

    y[b, o, p] = act(bias[o] + sum_{i in I_b} sum_{r < kh, s < kw} w[o, i, r, s] x[b, i, oh sh - ph + r dh,
                                                                                    ow sw - pw + s dw])
    for o in O_b, and y[b, o, p] = 0 for o not in O_b (bias included),

with ``act`` = ReLU or identity and out-of-image pixels read as 0 (padding). Per sample this is a GEMM
``(M x K_b) @ (K_b x N_b)`` with ``K_b = |I_b| kh kw`` and ``N_b = |O_b|``: the cost falls with the product
of the two keep ratios (the quadratic saving of consecutive gated layers, SANP, Chen et al., ICONIP 2019).

Mask format. ``in_mask`` (B, C_in) and ``out_mask`` (B, C_out) are bool; ``None`` means all channels active.
A masked-off input channel is never read (it may hold NaN), a masked-off output is written as exact zeros.

Index lists. :func:`active_channel_lists` turns the masks into one int32 tensor ``lists`` (B, C_in + C_out + 2),
row ``b`` = ``[in_perm (C_in) | out_perm (C_out) | n_in | n_out]``, where each ``*_perm`` lists the active
channels in increasing order followed by the inactive ones and ``n_*`` counts the active ones. One Triton
program per (sample, mask) builds its row with a block prefix sum, so the lists are made on the device, in one
launch, without a host synchronisation and without a Python loop over samples.

Kernel. Grid ``(cdiv(M, BLOCK_M) * cdiv(C_out, BLOCK_N), B)``: axis 1 is the sample, axis 0 a (pixel tile,
output-channel tile) pair in grouped order (``GROUP_M`` pixel tiles in a row share weight tiles in L2). Output
column ``n`` of a tile is channel ``out_perm[n]``, so the columns ``n < n_out`` are the sample's active channels
packed densely and the grid is sized for the worst case (all active). The K loop runs over
``cdiv(n_in, BLOCK_K) * kh * kw`` steps only: step = (block of ``BLOCK_K`` active input channels
``in_perm[...]``, tap ``(r, s)``), so the gather index and the tap are per step and each tile element costs one
add and one mask. ``tl.dot`` feeds tensor cores (wgmma on Hopper, mma on Ampere) and accumulates in fp32.
The loads are gathers of single elements, which Triton cannot turn into cp.async copies, so the kernel
prefetches step ``t + 1`` into registers before the dot of step ``t``. Input tiles are loaded with the
fastest-varying axis matching the input's layout (pixels for NCHW, channels for channels-last) so a warp's
addresses stay close; weight tiles likewise by the weight's strides (input channels fastest for OIHW; a
channels-last weight, strides (kh kw C_in, 1, kw C_in, C_in), makes them contiguous runs).

Zeros. Tiles entirely beyond ``n_out`` run a K loop of length 0 (the early exit) and store zeros to the
inactive channels they map to, so the output is allocated with ``torch.empty`` and every element is written
exactly once; in a tile that straddles ``n_out`` the inactive columns load zero weights and are forced to
exact zeros before the store. Zero-initialising instead would write every active output twice (memset, then
the result) and cost one more launch; writing zeros from the kernel costs only the stores, and each launch
stays self-contained, so the autotuner can rerun it freely.

Precision. fp32 inputs use TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is set (the same
choice as the dense cuDNN convolution) and exact fp32 FMA otherwise; fp16/bf16 use tensor cores.

Layout. Any input strides are accepted (NCHW, channels-last, slices); nothing is copied. The output is the
NCHW- or NHWC-contiguous tensor the op allocated (its memory format follows the input's, as ``F.conv2d``). Under ``TRITON_INTERPRET=1`` the kernel runs on CPU
tensors with a single small config (Triton's interpreter does not support ``tl.dot`` on bfloat16,
triton-lang/triton#11584, so bf16 is checked on GPU only).
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["active_channel_lists", "channel_skip_conv2d"]



def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ----------------------------------------------------------------------------- autotune configs
def _configs() -> list[triton.Config]:
    """Tile shapes tried by the autotuner: big tiles for large layers, narrow ones for 7x7 maps / few channels."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=1,
                              num_stages=1)]
    shapes = [  # BLOCK_M, BLOCK_N, BLOCK_K, num_warps
        (128, 128, 32, 8), (128, 64, 32, 4), (128, 64, 32, 8), (64, 128, 32, 4), (64, 128, 32, 8),
        (64, 64, 32, 4), (128, 32, 32, 4), (64, 64, 16, 4), (64, 32, 16, 4), (32, 64, 32, 4), (32, 128, 32, 4),
    ]
    # num_stages=2: the register prefetch is the pipeline (gathers cannot be cp.async-staged).
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=2)
            for bm, bn, bk, w in shapes]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles much larger than the problem (pixels, output channels, reduction length), and big tiles for
    exact fp32, whose FMA dot would spill."""
    cap_m = max(32, triton.next_power_of_2(named_args["M"]))
    cap_n = max(32, triton.next_power_of_2(named_args["C_OUT"]))
    cap_k = max(16, triton.next_power_of_2(named_args["C_IN"]))
    cap_mn = 64 * 32 if kwargs.get("INPUT_PRECISION") == "ieee" else 128 * 128
    kept = [c for c in configs
            if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n and c.kwargs["BLOCK_K"] <= cap_k
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= cap_mn]
    return kept or configs[-1:]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _compact_row(mask_ptr, s_mc, C, perm_ptr, count_ptr, HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr):
    """perm = active channels ascending, then inactive ones ascending; count = number of active channels."""
    n_act = 0
    if HAS_MASK:
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            on = tl.load(mask_ptr + offs * s_mc, mask=offs < C, other=0) != 0
            n_act += tl.sum(on.to(tl.int32), axis=0)
    else:
        n_act += C
    before = 0  # active channels before the current block
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        inside = offs < C
        if HAS_MASK:
            on = (tl.load(mask_ptr + offs * s_mc, mask=inside, other=0) != 0).to(tl.int32)
        else:
            on = inside.to(tl.int32)
        active_before = before + tl.cumsum(on, axis=0) - on
        dst = tl.where(on != 0, active_before, n_act + offs - active_before)
        tl.store(perm_ptr + dst, offs, mask=inside)
        before += tl.sum(on, axis=0)
    tl.store(count_ptr, n_act)


@triton.jit
def _active_lists_kernel(
    # pointers
    in_mask_ptr, out_mask_ptr, lists_ptr,
    # sizes
    C_IN, C_OUT,
    # strides
    s_imb, s_imc, s_omb, s_omc, s_lb,
    # constexprs
    HAS_IN_MASK: tl.constexpr, HAS_OUT_MASK: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    row = lists_ptr + b * s_lb
    if tl.program_id(1) == 0:
        _compact_row(in_mask_ptr + b * s_imb, s_imc, C_IN, row, row + C_IN + C_OUT, HAS_IN_MASK, BLOCK_C)
    else:
        _compact_row(out_mask_ptr + b * s_omb, s_omc, C_OUT, row + C_IN, row + C_IN + C_OUT + 1, HAS_OUT_MASK,
                     BLOCK_C)


@triton.jit
def _load_tiles(it, x_base, w_ptr, row, n_in, ih0, iw0, m_ok, w_rows, n_act, H, W, dil_h, dil_w,
                s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, KH: tl.constexpr, KW: tl.constexpr, X_CHANNELS_LAST: tl.constexpr,
                W_N_FASTEST: tl.constexpr, BLOCK_K: tl.constexpr):
    """K step ``it`` = (channel block ``it // (KH KW)``, tap ``it % (KH KW)``): the input tile (BLOCK_M, BLOCK_K)
    and the weight tile (BLOCK_K, BLOCK_N), zero outside the image, the active inputs and the active outputs."""
    cb = it // (KH * KW)
    tap = it - cb * (KH * KW)
    r = tap // KW
    s = tap - r * KW
    offs_k = cb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_in
    c = tl.load(row + offs_k, mask=k_ok, other=0)
    ih = ih0 + r * dil_h
    iw = iw0 + s * dil_w
    sp_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    sp_off = ih * s_xh + iw * s_xw
    if X_CHANNELS_LAST:  # (BLOCK_M, BLOCK_K), channels fastest
        a = tl.load(x_base + (sp_off[:, None] + (c * s_xc)[None, :]), mask=sp_ok[:, None] & k_ok[None, :], other=0.0)
    else:  # (BLOCK_K, BLOCK_M), pixels fastest, transposed for the dot
        a = tl.trans(tl.load(x_base + ((c * s_xc)[:, None] + sp_off[None, :]), mask=k_ok[:, None] & sp_ok[None, :],
                             other=0.0))
    w_k = c * s_wc + (r * s_wh + s * s_ww)
    if W_N_FASTEST:
        wt = tl.load(w_ptr + (w_k[:, None] + w_rows[None, :]), mask=k_ok[:, None] & n_act[None, :], other=0.0)
    else:
        wt = tl.trans(tl.load(w_ptr + (w_rows[:, None] + w_k[None, :]), mask=n_act[:, None] & k_ok[None, :],
                              other=0.0))
    return a, wt


@triton.autotune(configs=_configs(), key=["M", "C_OUT", "C_IN", "KH", "KW", "X_CHANNELS_LAST"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _channel_skip_conv2d_kernel(
    # pointers
    x_ptr, w_ptr, bias_ptr, lists_ptr, y_ptr,
    # sizes
    C_IN, C_OUT, H, W, W_OUT, M,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    # strides (elements)
    s_xb, s_xc, s_xh, s_xw,
    s_wo, s_wc, s_wh, s_ww,
    s_lb,
    s_yb, s_yc, s_ym,
    # constexprs
    KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    X_CHANNELS_LAST: tl.constexpr, W_N_FASTEST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(C_OUT, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_m
    pid_n = (pid % group) // group_m

    row = lists_ptr + b * s_lb
    n_in = tl.load(row + C_IN + C_OUT)
    n_out = tl.load(row + C_IN + C_OUT + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_act = offs_n < n_out
    o = tl.load(row + C_IN + offs_n, mask=offs_n < C_OUT, other=0)  # active channels first, then inactive
    w_rows = o * s_wo
    ih0 = (offs_m // W_OUT) * stride_h - pad_h
    iw0 = (offs_m % W_OUT) * stride_w - pad_w
    x_base = x_ptr + b * s_xb

    # Zero tiles (beyond the sample's active outputs) get an empty K range: no loads, no MMA.
    k_iters = tl.where(pid_n * BLOCK_N < n_out, tl.cdiv(n_in, BLOCK_K) * (KH * KW), 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The gathered 2-byte loads cannot use cp.async, so Triton's pipeliner leaves them alone; prefetching the
    # next K step into registers before the current dot hides their latency behind the tensor-core work.
    a, wt = _load_tiles(0, x_base, w_ptr, row, tl.where(k_iters > 0, n_in, 0), ih0, iw0, m_ok, w_rows, n_act, H, W,
                        dil_h, dil_w, s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, KH, KW, X_CHANNELS_LAST, W_N_FASTEST,
                        BLOCK_K)
    for it in range(0, k_iters):
        a_cur = a
        wt_cur = wt
        a, wt = _load_tiles(it + 1, x_base, w_ptr, row, n_in, ih0, iw0, m_ok, w_rows, n_act, H, W, dil_h, dil_w,
                            s_xc, s_xh, s_xw, s_wc, s_wh, s_ww, KH, KW, X_CHANNELS_LAST, W_N_FASTEST, BLOCK_K)
        acc = tl.dot(a_cur, wt_cur, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=n_act, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = tl.where(n_act[None, :], acc, 0.0)  # exact zeros for inactive channels, even if inputs hold inf
    y_off = b * s_yb + o[None, :] * s_yc + offs_m[:, None] * s_ym
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (offs_n < C_OUT)[None, :])


# ----------------------------------------------------------------------------- launcher
def active_channel_lists(in_mask: torch.Tensor | None, out_mask: torch.Tensor | None, batch: int, c_in: int,
                         c_out: int, device: torch.device) -> torch.Tensor:
    """Per-sample packed channel lists, built on ``device`` in one launch with no host synchronisation.

    Args:
        in_mask: (B, C_in) bool or None (all active). out_mask: (B, C_out) bool or None.

    Returns:
        int32 (B, C_in + C_out + 2); row b = [active inputs ascending, inactive inputs | same for outputs |
        number of active inputs, number of active outputs].
    """
    lists = torch.empty((batch, c_in + c_out + 2), dtype=torch.int32, device=device)
    if batch == 0:
        return lists
    im = lists if in_mask is None else in_mask.view(torch.uint8)
    om = lists if out_mask is None else out_mask.view(torch.uint8)
    block = min(1024, max(16, triton.next_power_of_2(max(c_in, c_out, 1))))
    _active_lists_kernel[(batch, 2)](
        im, om, lists, c_in, c_out, im.stride(0), im.stride(1), om.stride(0), om.stride(1), lists.stride(0),
        HAS_IN_MASK=in_mask is not None, HAS_OUT_MASK=out_mask is not None, BLOCK_C=block,
    )
    return lists


def channel_skip_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        in_mask: torch.Tensor | None, out_mask: torch.Tensor | None, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int], relu: bool, y: torch.Tensor) -> None:
    """Launch the kernel, writing every element of ``y``.

    The arguments are those :func:`sparsekern.ops.channel_skip_conv2d` validated (this launcher checks
    nothing): x (B, C_in, H, W) float32/float16/bfloat16 on CUDA (CPU under ``TRITON_INTERPRET=1``), any
    strides; weight (C_out, C_in, kh, kw), any strides (OIHW and channels-last both load well); bias (C_out,) or
    None; masks (B, C_in) / (B, C_out) bool or None (module docstring); stride, padding, dilation pairs; ``relu``
    fuses a ReLU after the bias. ``y`` is (B, C_out, H_out, W_out) in x's dtype, NCHW- or NHWC-contiguous; the
    kernel's indices are int32 and its grid takes at most 65535 samples.
    """
    batch, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out, w_out = y.shape[2], y.shape[3]
    m = h_out * w_out
    if y.numel() == 0:
        return
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        lists = active_channel_lists(in_mask, out_mask, batch, c_in, c_out, x.device)
        if x.dtype == torch.float32:
            precision = "tf32" if (x.is_cuda and torch.backends.cudnn.allow_tf32) else "ieee"
        else:
            precision = None
        channels_last = x.stride(1) < x.stride(3)  # channels fastest in memory: load channel-fastest tiles

        def grid(meta: dict) -> tuple[int, int]:
            return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(c_out, meta["BLOCK_N"]), batch

        _channel_skip_conv2d_kernel[grid](
            x, weight, y if bias is None else bias, lists, y,
            c_in, c_out, h, w, w_out, m,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            *x.stride(), *weight.stride(), lists.stride(0), y.stride(0), y.stride(1), y.stride(3),
            KH=kh, KW=kw, HAS_BIAS=bias is not None, RELU=relu, X_CHANNELS_LAST=channels_last,
            W_N_FASTEST=weight.stride(0) < weight.stride(1), INPUT_PRECISION=precision,
        )
