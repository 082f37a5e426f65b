"""Byte-level LMs: shapes, causality, the SRU recurrence against the paper's equations (fused op and plain loop,
forward, backward and training), the attention against explicit softmax attention, fx-traceability (sk.compile
with an empty plan) and the zoo record."""
from __future__ import annotations

import json

import pytest
import torch

import sparsekern as sk
from sparsekern.methods import flop
from sparsekern.models import build, list_models
from sparsekern.models.lm import CausalSelfAttention, SRURecurrence
from sparsekern.plan import Plan
from tests.conftest import assert_close_to_scale

SMALL = {"transformer_lm": {"d_model": 32, "layers": 2, "heads": 4, "context": 24},
         "sru_lm": {"d_model": 32, "layers": 2}}


def _bytes(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(SMALL))
def test_zoo_builds_lms_with_byte_logits(name: str) -> None:
    assert name in list_models()
    torch.manual_seed(0)
    model = build(name, **SMALL[name]).eval()
    x = _bytes(3, 20)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (3, 20, 256) and y.dtype == torch.float32 and torch.isfinite(y).all()
    assert (y[0] - y[1]).abs().max() > 1e-3
    assert json.loads(json.dumps(model.sk_arch)) == {"name": name, "kwargs": SMALL[name]}
    assert type(build(**model.sk_arch)) is type(model)


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("factorized", [False, True])
def test_lms_are_causal(name: str, factorized: bool) -> None:
    torch.manual_seed(0)
    model = build(name, **SMALL[name])
    if factorized:
        flop.factorize(model, init="random")
    model.eval()
    x = _bytes(2, 20)
    t0 = 11
    x2 = x.clone()
    x2[:, t0] = (x2[:, t0] + 7) % 256
    with torch.no_grad():
        y, y2 = model(x), model(x2)
    assert torch.equal(y[:, :t0], y2[:, :t0]), "a future byte changed past logits"
    assert (y[:, t0] - y2[:, t0]).abs().max() > 1e-4, "the changed byte must change its own position's logits"
    assert (y[:, -1] - y2[:, -1]).abs().max() > 1e-6


def _sru_reference(u: torch.Tensor, x: torch.Tensor, cell: SRURecurrence) -> torch.Tensor:
    """Lei et al. 2018, eqs. 3-7, one time step at a time."""
    d = cell.d
    c = torch.zeros(u.shape[0], d, dtype=torch.float64)
    hs = []
    for t in range(u.shape[1]):
        wx, wf, wr = u[:, t, :d], u[:, t, d:2 * d], u[:, t, 2 * d:]
        f = torch.sigmoid(wf + cell.v_f * c + cell.b_f)
        r = torch.sigmoid(wr + cell.v_r * c + cell.b_r)
        c = f * c + (1 - f) * wx
        hs.append(r * c + (1 - r) * x[:, t])
    return torch.stack(hs, 1)


def test_sru_recurrence_follows_the_paper() -> None:
    torch.manual_seed(0)
    cell = SRURecurrence(8, highway_bias=-1.0).double()
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()
    u, x = torch.randn(3, 9, 24, dtype=torch.float64), torch.randn(3, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(cell(u, x), _sru_reference(u, x, cell), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="expected u"):
        cell(u[..., :-1], x)


@pytest.mark.parametrize("name", list(SMALL))
def test_lms_trace_and_compile_with_an_empty_plan(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, **SMALL[name]).eval()
    x = _bytes(2, 16)
    fast = sk.compile(model, Plan(), example_inputs=x)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
        assert torch.equal(fast(_bytes(2, 9, seed=1)), model(_bytes(2, 9, seed=1)))  # other lengths too


def test_transformer_rejects_inputs_longer_than_its_context() -> None:
    model = build("transformer_lm", **SMALL["transformer_lm"])
    with pytest.raises(Exception, match="longer than the model's context"):
        model(_bytes(1, 25))


def test_sru_names_its_first_projection_for_flops_input_mask() -> None:
    """The official enwik8 FLOP script gates the first SRU layer's input features instead of factorizing it:
    the SRU declares that layer, the Transformer declares none."""
    model = build("sru_lm", **SMALL["sru_lm"])
    assert model.sk_flop_input_masked == ("layers.0.proj",)
    assert isinstance(model.get_submodule("layers.0.proj"), torch.nn.Linear)
    assert not getattr(build("transformer_lm", **SMALL["transformer_lm"]), "sk_flop_input_masked", ())


def test_sru_fused_recurrence_equals_the_plain_loop() -> None:
    """``fused=True`` runs the fused op (CPU float32) and ``fused=False`` the plain loop; outputs and gradients agree
    to float32 rounding."""
    torch.manual_seed(0)
    cell = SRURecurrence(37, highway_bias=-1.0)
    u, x = torch.randn(3, 11, 111, requires_grad=True), torch.randn(3, 11, 37, requires_grad=True)
    gh = torch.randn(3, 11, 37)
    out = {}
    for fused in (True, False):
        cell.fused = fused
        h = cell(u, x)
        assert (type(h.grad_fn).__name__ == "_SRURecurrenceBackward") == fused  # which path ran
        grads = torch.autograd.grad(h, [u, x, *cell.parameters()], gh)
        out[fused] = [h.detach(), *grads]
    for got, want in zip(out[True], out[False]):
        assert_close_to_scale(got, want, tol=1e-5)
    assert "fused=False" in repr(cell)


def _train_losses(fused: bool, steps: int = 4) -> list[float]:
    torch.manual_seed(0)
    model = build("sru_lm", **SMALL["sru_lm"], fused=fused)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        x = _bytes(4, 17, seed=step)
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_sru_trains_to_the_same_loss_with_and_without_the_fused_recurrence() -> None:
    fused, plain = _train_losses(True), _train_losses(False)
    assert plain[-1] < plain[0] - 0.05, "the model must learn something in a few steps for the check to mean much"
    assert fused == pytest.approx(plain, rel=1e-4, abs=1e-5)


def test_transformer_attention_is_causal_softmax_attention() -> None:
    """The attention (scaled_dot_product_attention, causal) equals the explicit masked softmax of Vaswani et al."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, heads=4).eval()
    x = torch.randn(2, 9, 32)
    b, t, d = x.shape
    q, k, v = attn.qkv(x).reshape(b, t, 3, 4, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    want = attn.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))
    with torch.no_grad():
        assert_close_to_scale(attn(x), want.detach(), tol=1e-5)


def test_fused_sru_compiles_without_graph_breaks() -> None:
    """The fused recurrence is one opaque op: torch.compile traces the whole SRU in one graph (no loop)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build("sru_lm", **SMALL["sru_lm"]).eval()
    x = _bytes(2, 12)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close_to_scale(compiled(x), model(x), tol=1e-6)
