"""``sru_recurrence``: the elementwise recurrence of a Simple Recurrent Unit, fused over time.

Lei, Zhang, Wang, Dai and Artzi, "Simple Recurrent Units for Highly Parallelizable Recurrence", EMNLP 2018,
eqs. 3-7. Given the layer's projected inputs ``u = [W x_t | W_f x_t | W_r x_t]`` (B, T, 3d) and the layer input
x (B, T, d), with per-channel vectors v_f, v_r, b_f, b_r (d,)::

    f_t = sigmoid(W_f x_t + v_f * c_{t-1} + b_f)
    r_t = sigmoid(W_r x_t + v_r * c_{t-1} + b_r)
    c_t = f_t * c_{t-1} + (1 - f_t) * (W x_t)
    h_t = r_t * c_t + (1 - r_t) * x_t

with c_0 = 0; the op returns h (B, T, d). Every (batch row, channel) is independent and sequential in t, so a
kernel runs one lane per (batch row, channel) through time, as the paper's CUDA kernel does; the plain-torch form
(:func:`sru_recurrence_reference`, the loop :class:`sparsekern.models.lm.SRURecurrence` ran before this op) costs
about five small ops per time step. The cost model counts the op as 0 FLOPs, as it counted those elementwise ops
(:func:`flop_count`).

One torch op, ``torch.ops.sparsekern.sru_recurrence`` (with a fake implementation, so ``torch.compile`` and
``torch.export`` see it). Its body validates the arguments once (:func:`problem`), allocates the output and runs
one backend of :data:`DISPATCH`, the first that can run the inputs in the order below (on CPU: ``cpu``, then
``reference``; ``DISPATCH.reasons(...)`` lists every reason each refuses them):

==========  ==========================================================================================
cuda        ``csrc/cuda/sru_recurrence.cuh``: one thread per (batch row, channel) through time, as the
            paper's kernel (CUDA float32/float16/bfloat16 tensors, computed in float32)
cpu         ``csrc/cpu/sru_recurrence.cpp``: tasks of one batch row x 64 channels (AVX-512; 32 with AVX2, 16
            without) over torch's intra-op threads, stepped through t in groups of 16 tasks so that their loads
            overlap; the backward recomputes c (CPU float32 tensors)
triton      :mod:`sparsekern.kernels.triton.sru_recurrence`: a program per (batch row, 128 channels) through
            time (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1`` when forced)
reference   :func:`sru_recurrence_reference`, the plain-torch loop (any device; float16/bfloat16 computed in
            float32, float64 in float64)
==========  ==========================================================================================

Gradients: :func:`sru_recurrence` is differentiable in all six inputs (an autograd function around the op, used
only when a gradient is needed; once: the backward is not differentiable). Its backward is a second torch op,
``torch.ops.sparsekern.sru_recurrence_backward(grad_h, u, x, v_f, v_r, b_f, b_r) -> (grad_u, grad_x,
grad_params)`` (grad_params (4, d): v_f, v_r, b_f, b_r), with the backends of :data:`BACKWARD`: ``cuda``,
``cpu`` and ``triton``, the kernels above (each recomputes c in a forward sweep rather than storing it), else
``reference``
(:func:`sru_recurrence_backward_reference`: the same formulas in plain torch, checked against autograd through
:func:`sru_recurrence_reference`; written out because autograd does not record inside an op under dispatch modes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.autograd.function import once_differentiable
from torch.utils import flop_counter

from sparsekern.ops import _ext
from sparsekern.ops.backend import FLOATS, Backend, Dispatch, OnInput

__all__ = ["sru_recurrence", "sru_recurrence_reference", "sru_recurrence_backward_reference", "select_backend",
           "problem", "backward_problem", "SRUProblem", "SRUBackwardProblem", "flop_count", "DISPATCH", "BACKWARD",
           "DTYPES"]

_OP = "sru_recurrence"
_PARAMS = ("v_f", "v_r", "b_f", "b_r")
#: The dtypes the op takes (float64 for gradient checks; the reference backend runs it).
DTYPES: tuple[torch.dtype, ...] = (*FLOATS, torch.float64)


@dataclass(frozen=True)
class SRUProblem(OnInput):
    """Validated arguments of one call: u (B, T, 3d), x (B, T, d), v_f, v_r, b_f, b_r (d,)."""

    u: torch.Tensor
    x: torch.Tensor
    v_f: torch.Tensor
    v_r: torch.Tensor
    b_f: torch.Tensor
    b_r: torch.Tensor

    @property
    def params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.v_f, self.v_r, self.b_f, self.b_r

    def new_output(self) -> torch.Tensor:
        """An uninitialised contiguous (B, T, d) output."""
        return torch.empty(self.x.shape, dtype=self.x.dtype, device=self.x.device)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def problem(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
            b_r: torch.Tensor) -> SRUProblem:
    """Validate the arguments of :func:`sru_recurrence` (errors name the argument, its shape and the expected
    one)."""
    if x.dim() != 3:
        raise ValueError(f"{_OP}: x must be (B, T, d), got shape {_shape(x)}; add a batch axis with x[None]")
    b, t, d = x.shape
    if _shape(u) != (b, t, 3 * d):
        raise ValueError(f"{_OP}: u must be (B, T, 3d) = ({b}, {t}, {3 * d}) for x of shape {_shape(x)} "
                         f"(u = [W x | W_f x | W_r x] along its last axis), got shape {_shape(u)}")
    for name, p in zip(_PARAMS, (v_f, v_r, b_f, b_r)):
        if _shape(p) != (d,):
            raise ValueError(f"{_OP}: {name} must be (d,) = ({d},) (the last axis of x {_shape(x)}), got shape "
                             f"{_shape(p)}")
    tensors = {"u": u, "x": x, "v_f": v_f, "v_r": v_r, "b_f": b_f, "b_r": b_r}
    if x.dtype not in DTYPES or any(t.dtype != x.dtype for t in tensors.values()):
        got = ", ".join(f"{k} {str(v.dtype).replace('torch.', '')}" for k, v in tensors.items())
        raise TypeError(f"{_OP}: u, x, v_f, v_r, b_f and b_r must share one of float32/float16/bfloat16/float64, "
                        f"got {got}")
    for name, t in tensors.items():
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but x is on {x.device}; move them to one device")
    return SRUProblem(u, x, v_f, v_r, b_f, b_r)


def sru_recurrence_reference(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor,
                             b_f: torch.Tensor, b_r: torch.Tensor) -> torch.Tensor:
    """The plain-torch SRU recurrence (module docstring), differentiable by autograd; any device.

    The loop over time runs only the two-op forget-gate recurrence; the reset gate and the highway mix are computed
    for all steps at once. float16/bfloat16 are computed in float32, other dtypes in their own; returns (B, T, d)
    in x's dtype. Shapes as in :func:`sru_recurrence` (not validated here).
    """
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    u, x, v_f, v_r, b_f, b_r = (t.to(work) for t in (u, x, v_f, v_r, b_f, b_r))
    d = x.shape[-1]
    xt, fp, rp = u.chunk(3, dim=-1)
    fp = fp + b_f
    c = u.new_zeros(u.shape[0], d)
    cs = []
    for t in range(u.shape[1]):
        f = torch.sigmoid(fp[:, t] + v_f * c)
        c = xt[:, t] + f * (c - xt[:, t])  # f * c + (1 - f) * W x_t
        cs.append(c)
    c_all = torch.stack(cs, dim=1) if cs else xt  # T = 0: empty, still connected to every input
    c_prev = torch.cat([c_all.new_zeros(c_all.shape[0], 1, d), c_all], dim=1)[:, :-1]
    r = torch.sigmoid(rp + v_r * c_prev + b_r)
    return (x + r * (c_all - x)).to(dtype)  # r * c + (1 - r) * x


# ----------------------------------------------------------------------------- backends
def _contiguous(pr: SRUProblem) -> list[torch.Tensor]:
    return [t.contiguous() for t in (pr.u, pr.x, *pr.params)]


def _native_runner(name: str):
    def run(pr: SRUProblem) -> torch.Tensor:
        h = pr.new_output()
        _ext.kernel(name)(*_contiguous(pr), h)
        return h

    return run


def _run_triton(pr: SRUProblem) -> torch.Tensor:
    from sparsekern.kernels.triton.sru_recurrence import sru_recurrence as launch

    h = pr.new_output()
    launch(*_contiguous(pr), h)
    return h


DISPATCH = Dispatch(_OP, problem)
DISPATCH.register(Backend("cuda", _native_runner("sru_recurrence_cuda"), devices=("cuda",), dtypes=FLOATS,
                          available=_ext.requirement("sru_recurrence_cuda")))
DISPATCH.register(Backend("cpu", _native_runner("sru_recurrence_cpu"), devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("sru_recurrence_cpu")))
DISPATCH.register(Backend("triton", _run_triton, devices=("cuda",), dtypes=FLOATS, interpreted=True,
                          available=_ext.triton_requirement))
DISPATCH.register(Backend("reference", lambda pr: sru_recurrence_reference(pr.u, pr.x, *pr.params).contiguous(),
                          dtypes=DTYPES))


@dataclass(frozen=True)
class SRUBackwardProblem:
    """Validated arguments of the backward op: the forward's (:class:`SRUProblem`) and grad_h (B, T, d)."""

    grad_h: torch.Tensor
    forward: SRUProblem

    @property
    def device(self) -> torch.device:
        return self.forward.device

    @property
    def dtype(self) -> torch.dtype:
        return self.forward.dtype


def backward_problem(grad_h: torch.Tensor, u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor,
                     b_f: torch.Tensor, b_r: torch.Tensor) -> SRUBackwardProblem:
    """Validate the arguments of ``sru_recurrence_backward``: those of :func:`problem`, and grad_h like x."""
    pr = problem(u, x, v_f, v_r, b_f, b_r)
    if _shape(grad_h) != _shape(x) or grad_h.dtype != x.dtype or grad_h.device != x.device:
        raise ValueError(f"{_OP}_backward: grad_h must be like x ({_shape(x)}, {x.dtype}, {x.device}), got "
                         f"{_shape(grad_h)}, {grad_h.dtype}, {grad_h.device}")
    return SRUBackwardProblem(grad_h, pr)


def _backward_runner(launch_of: Any):
    """A backward backend around ``launch(grad_h, u, x, v_f, v_r, b_f, b_r, grad_u, grad_x, partial)``, which
    writes each batch row's parameter gradients into ``partial`` (4, B, d); summed here, deterministic."""
    def run(pr: SRUBackwardProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u, x, *params = _contiguous(pr.forward)
        gu, gx = torch.empty_like(u), torch.empty_like(x)
        partial = x.new_empty(4, x.shape[0], x.shape[2], dtype=torch.float32)
        launch_of()(pr.grad_h.contiguous(), u, x, *params, gu, gx, partial)
        return gu, gx, partial.sum(1).to(x.dtype)

    return run


def _triton_backward():
    from sparsekern.kernels.triton.sru_recurrence import sru_recurrence_backward

    return sru_recurrence_backward


def sru_recurrence_backward_reference(grad_h: torch.Tensor, u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor,
                                      v_r: torch.Tensor, b_f: torch.Tensor,
                                      b_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`sru_recurrence_reference` in plain torch: (grad_u, grad_x, grad_params (4, d) for
    v_f, v_r, b_f, b_r), computed like it (float16/bfloat16 in float32) and returned in x's dtype.

    c is recomputed, then the loop runs back through time carrying dL/dc_t (all but the carry is batched over t)::

        gc_t = carry + gh_t r_t,    gf~_t = gc_t (c_{t-1} - W x_t) f_t (1 - f_t),    gW x_t = gc_t (1 - f_t)
        carry = gc_t f_t + gf~_t v_f + gr~_t v_r,    with gr~ = gh (c - x) r (1 - r) and gx = gh (1 - r)
    """
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)
    gh, u, x, v_f, v_r, b_f, b_r = (t.to(work) for t in (grad_h, u, x, v_f, v_r, b_f, b_r))
    w, fp, rp = u.chunk(3, dim=-1)
    fp = fp + b_f
    c = x.new_zeros(x.shape[0], x.shape[2])
    cs, fs = [c], []
    for t in range(x.shape[1]):
        fs.append(torch.sigmoid(fp[:, t] + v_f * c))
        c = w[:, t] + fs[-1] * (c - w[:, t])
        cs.append(c)
    c_all = torch.stack(cs, dim=1)  # c_0 .. c_T
    c_prev, c_now = c_all[:, :-1], c_all[:, 1:]
    r = torch.sigmoid(rp + v_r * c_prev + b_r)
    grr = gh * (c_now - x) * r * (1 - r)
    ghr = gh * r
    carry = torch.zeros_like(c)
    gws, gfs = [], []
    for t in reversed(range(x.shape[1])):
        gc, f = carry + ghr[:, t], fs[t]
        gfs.append(gc * (c_prev[:, t] - w[:, t]) * f * (1 - f))
        gws.append(gc * (1 - f))
        carry = gc * f + gfs[-1] * v_f + grr[:, t] * v_r
    gff = torch.stack(gfs[::-1], dim=1) if gfs else torch.zeros_like(x)
    gw = torch.stack(gws[::-1], dim=1) if gws else torch.zeros_like(x)
    gp = torch.stack([(gff * c_prev).sum((0, 1)), (grr * c_prev).sum((0, 1)), gff.sum((0, 1)), grr.sum((0, 1))])
    return torch.cat([gw, gff, grr], dim=-1).to(dtype), (gh * (1 - r)).to(dtype), gp.to(dtype)


def _run_reference_backward(pr: SRUBackwardProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return sru_recurrence_backward_reference(pr.grad_h, pr.forward.u, pr.forward.x, *pr.forward.params)


#: Backends of the backward op, which returns grad_u, grad_x and grad_params (4, d) for v_f, v_r, b_f, b_r.
BACKWARD = Dispatch(f"{_OP}_backward", backward_problem)
BACKWARD.register(Backend("cuda", _backward_runner(lambda: _ext.kernel("sru_recurrence_backward_cuda")),  # type: ignore
                          devices=("cuda",), dtypes=FLOATS, available=_ext.requirement("sru_recurrence_backward_cuda")))
BACKWARD.register(Backend("cpu", _backward_runner(lambda: _ext.kernel("sru_recurrence_backward_cpu")),  # type: ignore
                          devices=("cpu",), dtypes=(torch.float32,),
                          available=_ext.requirement("sru_recurrence_backward_cpu")))
BACKWARD.register(Backend("triton", _backward_runner(_triton_backward),  # type: ignore
                          devices=("cuda",), dtypes=FLOATS, interpreted=True, available=_ext.triton_requirement))
BACKWARD.register(Backend("reference", _run_reference_backward, dtypes=DTYPES))  # type: ignore


def select_backend(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
                   b_r: torch.Tensor, *, backend: str | None = None) -> str:
    """Name of the backend :func:`sru_recurrence` runs for these inputs (``backend`` forces one; an error says why
    it cannot run them)."""
    pr = problem(u, x, v_f, v_r, b_f, b_r)
    return DISPATCH.select(pr, backend, _order(pr)).name


def _order(pr: SRUProblem | SRUBackwardProblem) -> tuple[str, ...]:
    """The preferred backends: registration order on GPU; on CPU the C++ kernel, then the reference (Triton's
    interpreter runs a CPU tensor only when forced)."""
    return () if pr.device.type == "cuda" else ("cpu", "reference")


# ----------------------------------------------------------------------------- the ops
_LIB = torch.library.Library("sparsekern", "FRAGMENT")
_LIB.define(f"{_OP}(Tensor u, Tensor x, Tensor v_f, Tensor v_r, Tensor b_f, Tensor b_r, str? backend=None) -> Tensor")
_LIB.define(f"{_OP}_backward(Tensor grad_h, Tensor u, Tensor x, Tensor v_f, Tensor v_r, Tensor b_f, Tensor b_r) "
            "-> (Tensor, Tensor, Tensor)")


def _impl(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
          b_r: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    pr = problem(u, x, v_f, v_r, b_f, b_r)
    return DISPATCH.run(pr, backend, _order(pr))


def _fake(u, x, v_f, v_r, b_f, b_r, backend=None) -> torch.Tensor:
    return problem(u, x, v_f, v_r, b_f, b_r).new_output()


def _backward_impl(grad_h: torch.Tensor, u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor,
                   b_f: torch.Tensor, b_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pr = backward_problem(grad_h, u, x, v_f, v_r, b_f, b_r)
    return BACKWARD.run(pr, None, _order(pr))  # type: ignore[return-value]


def _backward_fake(grad_h, u, x, v_f, v_r, b_f, b_r) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pr = backward_problem(grad_h, u, x, v_f, v_r, b_f, b_r)
    fw = pr.forward
    return torch.empty_like(fw.u), torch.empty_like(fw.x), fw.x.new_empty(4, fw.x.shape[2])


_LIB.impl(_OP, _impl, "CompositeExplicitAutograd")
_LIB.impl(f"{_OP}_backward", _backward_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"sparsekern::{_OP}", _fake, lib=_LIB)
torch.library.register_fake(f"sparsekern::{_OP}_backward", _backward_fake, lib=_LIB)


class _SRURecurrence(torch.autograd.Function):
    """The op with its gradients, computed by the backward op (module docstring)."""

    @staticmethod
    def forward(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
                b_r: torch.Tensor, backend: str | None) -> torch.Tensor:
        return torch.ops.sparsekern.sru_recurrence(u, x, v_f, v_r, b_f, b_r, backend)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs[:6])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gh: torch.Tensor):
        gu, gx, gp = torch.ops.sparsekern.sru_recurrence_backward(gh, *ctx.saved_tensors)
        grads = [gu, gx, *gp.unbind(0)]
        return (*[g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)], None)


def flop_count(*args: Any, **kwargs: Any) -> int:
    """FLOPs the cost model charges a call: 0. The recurrence is elementwise (sigmoids, products and sums), which
    :func:`sparsekern.cost.flops` counts as 0, as torch's flop counter does for the ops the loop ran before."""
    return 0


for _packet in (torch.ops.sparsekern.sru_recurrence, torch.ops.sparsekern.sru_recurrence_backward):
    if _packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(_packet)(flop_count)


def sru_recurrence(u: torch.Tensor, x: torch.Tensor, v_f: torch.Tensor, v_r: torch.Tensor, b_f: torch.Tensor,
                   b_r: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The SRU recurrence (module docstring) in one call: h (B, T, d) from u (B, T, 3d) and x (B, T, d).

    Args:
        u: (B, T, 3d), ``[W x_t | W_f x_t | W_r x_t]`` along the last axis; float32/float16/bfloat16/float64, any
            strides; T may be 0 or 1, B may be 1.
        x: (B, T, d), the layer input (the highway connection), same dtype and device.
        v_f, v_r: (d,), the state weights of the forget and reset gates.
        b_f, b_r: (d,), their biases.
        backend: force one backend (``"cpu"``, ``"reference"``); default: the first that can run the inputs
            (:func:`select_backend` names it).

    Returns:
        h (B, T, d) contiguous, in x's dtype; differentiable in all six inputs. The ``cpu`` backend agrees with the
        reference to float32 rounding (its sigmoid is its own, within a few ulp of torch's), not bit for bit.
    """
    args = (u, x, v_f, v_r, b_f, b_r)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return _SRURecurrence.apply(*args, backend)
    return torch.ops.sparsekern.sru_recurrence(*args, backend)
