"""The SRU recurrence (Triton), forward and backward: one lane per (batch row, channel), sequential over time.

Lei, Zhang, Wang, Dai and Artzi, "Simple Recurrent Units for Highly Parallelizable Recurrence", EMNLP 2018,
eqs. 3-7, as :mod:`sparsekern.ops.sru_recurrence` states them. The paper's CUDA kernel gives each (batch row,
channel) one thread that walks through time; here a program owns ``BLOCK`` channels of one batch row and walks
through time with them, so every load and store of a step is one contiguous vector of ``BLOCK`` channels.

Forward: per step ``f = sigmoid(W_f x_t + v_f c + b_f)``, ``r = sigmoid(W_r x_t + v_r c + b_r)`` (c = c_{t-1}),
``c = W x_t + f (c - W x_t)``, ``h_t = x_t + r (c - x_t)``. Backward: a forward sweep recomputes c into a float32
scratch buffer (B, T, d), then a backward sweep carries dL/dc_t (the formulas of
:func:`sparsekern.ops.sru_recurrence.sru_recurrence_backward_reference`) and writes grad_u, grad_x and each batch
row's gradients of v_f, v_r, b_f, b_r (4, B, d; the op sums them over B).

Inputs are contiguous (the launchers' callers make them so); float32/float16/bfloat16, computed in float32. Under
``TRITON_INTERPRET=1`` the kernels run on CPU tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["sru_recurrence", "sru_recurrence_backward", "BLOCK"]

#: Channels per program.
BLOCK = 128


@triton.jit
def _params(vf_ptr, vr_ptr, bf_ptr, br_ptr, cols, live):
    """v_f, v_r, b_f, b_r at ``cols`` in float32."""
    return (tl.load(vf_ptr + cols, mask=live, other=0.0).to(tl.float32),
            tl.load(vr_ptr + cols, mask=live, other=0.0).to(tl.float32),
            tl.load(bf_ptr + cols, mask=live, other=0.0).to(tl.float32),
            tl.load(br_ptr + cols, mask=live, other=0.0).to(tl.float32))


@triton.jit
def _forward(u_ptr, x_ptr, vf_ptr, vr_ptr, bf_ptr, br_ptr, h_ptr, T, d, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < d
    vf, vr, bf, br = _params(vf_ptr, vr_ptr, bf_ptr, br_ptr, cols, live)
    c = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, T):
        u = u_ptr + (row * T + t) * 3 * d + cols
        w = tl.load(u, mask=live, other=0.0).to(tl.float32)
        fp = tl.load(u + d, mask=live, other=0.0).to(tl.float32)
        rp = tl.load(u + 2 * d, mask=live, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + (row * T + t) * d + cols, mask=live, other=0.0).to(tl.float32)
        f = tl.sigmoid(fp + vf * c + bf)
        r = tl.sigmoid(rp + vr * c + br)
        c = w + f * (c - w)
        tl.store(h_ptr + (row * T + t) * d + cols, (x + r * (c - x)).to(h_ptr.dtype.element_ty), mask=live)


@triton.jit
def _backward(gh_ptr, u_ptr, x_ptr, vf_ptr, vr_ptr, bf_ptr, br_ptr, c_ptr, gu_ptr, gx_ptr, gp_ptr, B, T, d,
              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < d
    vf, vr, bf, br = _params(vf_ptr, vr_ptr, bf_ptr, br_ptr, cols, live)
    c = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(0, T):  # recompute c_1 .. c_T
        u = u_ptr + (row * T + t) * 3 * d + cols
        w = tl.load(u, mask=live, other=0.0).to(tl.float32)
        fp = tl.load(u + d, mask=live, other=0.0).to(tl.float32)
        f = tl.sigmoid(fp + vf * c + bf)
        c = w + f * (c - w)
        tl.store(c_ptr + (row * T + t) * d + cols, c, mask=live)
    carry = tl.zeros([BLOCK], dtype=tl.float32)
    g_vf = tl.zeros([BLOCK], dtype=tl.float32)
    g_vr = tl.zeros([BLOCK], dtype=tl.float32)
    g_bf = tl.zeros([BLOCK], dtype=tl.float32)
    g_br = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        at = (row * T + t) * d + cols
        u = u_ptr + (row * T + t) * 3 * d + cols
        w = tl.load(u, mask=live, other=0.0).to(tl.float32)
        fp = tl.load(u + d, mask=live, other=0.0).to(tl.float32)
        rp = tl.load(u + 2 * d, mask=live, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + at, mask=live, other=0.0).to(tl.float32)
        gh = tl.load(gh_ptr + at, mask=live, other=0.0).to(tl.float32)
        c_now = tl.load(c_ptr + at, mask=live, other=0.0)
        c_prev = tl.load(c_ptr + tl.where(t > 0, at - d, at), mask=live, other=0.0)  # c_0 = 0
        c_prev = tl.where(t > 0, c_prev, 0.0)
        f = tl.sigmoid(fp + vf * c_prev + bf)
        r = tl.sigmoid(rp + vr * c_prev + br)
        grr = gh * (c_now - x) * r * (1.0 - r)
        gc = carry + gh * r
        gff = gc * (c_prev - w) * f * (1.0 - f)
        carry = gc * f + gff * vf + grr * vr
        gu = gu_ptr + (row * T + t) * 3 * d + cols
        out_ty = gu_ptr.dtype.element_ty
        tl.store(gu, (gc * (1.0 - f)).to(out_ty), mask=live)
        tl.store(gu + d, gff.to(out_ty), mask=live)
        tl.store(gu + 2 * d, grr.to(out_ty), mask=live)
        tl.store(gx_ptr + at, (gh * (1.0 - r)).to(gx_ptr.dtype.element_ty), mask=live)
        g_vf += gff * c_prev
        g_vr += grr * c_prev
        g_bf += gff
        g_br += grr
    gp = gp_ptr + row * d + cols
    tl.store(gp, g_vf, mask=live)
    tl.store(gp + B * d, g_vr, mask=live)
    tl.store(gp + 2 * B * d, g_bf, mask=live)
    tl.store(gp + 3 * B * d, g_br, mask=live)


def _grid(x: torch.Tensor) -> tuple[int, int]:
    return x.shape[0], triton.cdiv(x.shape[2], BLOCK)


def sru_recurrence(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
                   b_r: torch.Tensor, h: torch.Tensor) -> None:
    """Write the recurrence's output into ``h`` (B, T, d); all arguments contiguous, shapes as in the op."""
    if h.numel():
        _forward[_grid(x)](u, x, v_f, v_r, b_f, b_r, h, x.shape[1], x.shape[2], BLOCK=BLOCK)


def sru_recurrence_backward(grad_h: torch.Tensor, u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor,
                            v_r: torch.Tensor, b_f: torch.Tensor, b_r: torch.Tensor, grad_u: torch.Tensor,
                            grad_x: torch.Tensor, grad_params: torch.Tensor) -> None:
    """Write grad_u (B, T, 3d), grad_x (B, T, d) and grad_params (4, B, d) float32 (per batch row); all arguments
    contiguous."""
    b, t, d = x.shape
    if b * d == 0:
        return
    scratch = torch.empty((b, t, d), dtype=torch.float32, device=x.device)
    _backward[_grid(x)](grad_h, u, x, v_f, v_r, b_f, b_r, scratch, grad_u, grad_x, grad_params, b, t, d,
                        BLOCK=BLOCK)
