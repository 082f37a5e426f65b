"""attention: every backend against float64 ground truth on a shape matrix (causal or not, T_q != T_k, odd sizes,
strided views, T = 1), the output layout, the custom op (opcheck, fake under torch.export), the FLOP formula,
the dispatch and the input errors; the ``attention`` pass keeps a Transformer's outputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.models import build
from sparsekern.ops import _ext
from sparsekern.ops.attention import DISPATCH, attention, problem, select_backend
from sparsekern.tuning import AttentionCall, Tuner
from tests.conftest import assert_close_to_scale

needs_ext = pytest.mark.skipif(_ext.status() is not None, reason="the C++ extension is unavailable")
SHAPES = [  # B, H, T_q, T_k, E, E_v
    (1, 1, 1, 1, 3, 5), (2, 3, 5, 5, 8, 8), (1, 2, 7, 19, 8, 24), (1, 1, 40, 9, 64, 64), (2, 2, 37, 37, 16, 16),
    (1, 2, 100, 100, 64, 40), (1, 3, 33, 65, 17, 31), (1, 2, 129, 128, 32, 32),
    # the CPU kernel takes 512 keys per step: one whole step, then several with the running rescale between them
    (1, 1, 13, 512, 16, 16), (1, 2, 530, 530, 8, 8), (1, 1, 600, 1100, 16, 24),
]


def _qkv(b, h, t_q, t_k, e, e_v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t_q, e, generator=g) * 2, torch.randn(b, h, t_k, e, generator=g) * 2,
            torch.randn(b, h, t_k, e_v, generator=g))


def _truth(q, k, v, causal, scale=None):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal, scale=scale)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "torch"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backends_equal_float64_truth(shape, causal: bool, backend: str) -> None:
    q, k, v = _qkv(*shape)
    out = attention(q, k, v, causal, backend=backend)
    assert out.shape == (*shape[:3], shape[5])
    assert out.transpose(1, 2).is_contiguous()  # stored (B, T_q, H, E_v): the heads merge without a copy
    assert_close_to_scale(out, _truth(q, k, v, causal).float(), tol=1e-5)


@needs_ext
def test_strided_views_and_scale() -> None:
    # q, k, v sliced out of one packed projection, as a Transformer's qkv linear makes them
    qkv = torch.randn(2, 23, 3, 4, 16).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    for causal in (False, True):
        assert_close_to_scale(attention(q, k, v, causal, 0.3, backend="cpu"), _truth(q, k, v, causal, 0.3).float(),
                              tol=1e-5)
    assert select_backend(q, k, v) == "cpu"
    assert "unit stride" in " ".join(DISPATCH["cpu"].reasons(problem(q, k, v[..., ::2], False)))


def test_errors_name_the_argument() -> None:
    q, k, v = _qkv(1, 2, 4, 4, 8, 8)
    with pytest.raises(ValueError, match="k must be"):
        attention(q, k[:, :1], v)
    with pytest.raises(ValueError, match="v must be"):
        attention(q, k, v[:, :, :3])
    with pytest.raises(TypeError, match="share one of"):
        attention(q, k.double(), v)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_opcheck(backend) -> None:
    torch.library.opcheck(torch.ops.sparsekern.attention.default, (*_qkv(1, 2, 5, 7, 8, 8), True, None, backend))


@pytest.mark.parametrize("causal", [False, True])
def test_prepared_operator_equals_the_op(causal: bool) -> None:
    """sparsekern::_attention (the pass's call: the C++ kernel on CPU where built) against the public op, on
    strided views and with an explicit scale; opcheck."""
    qkv = torch.randn(2, 9, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    _ext.load()
    out = torch.ops.sparsekern._attention(q, k, v, causal, 0.4)
    assert out.transpose(1, 2).is_contiguous()
    assert_close_to_scale(out, _truth(q, k, v, causal, 0.4).float(), tol=1e-5)
    torch.library.opcheck(torch.ops.sparsekern._attention.default, (q, k, v, causal, 0.4))


def test_fake_under_torch_export_and_flop_formula() -> None:
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return attention(q, k, v, True)

    args = _qkv(1, 2, 6, 6, 8, 8)
    ep = torch.export.export(M(), args)
    assert_close_to_scale(ep.module()(*args), M()(*args))
    pairs = 6 * 7 // 2
    assert sk.flops(M(), args).total == 2 * 2 * pairs * (8 + 8)


@pytest.mark.parametrize("fallback", [pytest.param("sparsekern", marks=needs_ext), "torch"])
def test_pass_keeps_a_transformers_outputs(fallback: str) -> None:
    torch.manual_seed(0)
    model = build("transformer_lm", d_model=32, layers=2, heads=4, context=24).eval()
    x = torch.randint(0, 256, (2, 24))
    before = copy.deepcopy(model.state_dict())
    with sk.tuning.use_tuner(Tuner(measure=False, fallback=fallback)):
        gm = sk.passes.apply(model, ["attention"], x)
    assert gm.sk_backends == {"attention.0": fallback, "attention.1": fallback}
    ops = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert (torch.ops.sparsekern._attention.default in ops) == (fallback == "sparsekern")
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_pass_follows_the_table_and_skips_masked_calls() -> None:
    class Two(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True) + F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask)

    q, k, v = _qkv(1, 2, 6, 6, 8, 8)
    mask = torch.rand(6, 6) > 0.3
    mask[:, 0] = True
    call = AttentionCall(tuple(q.shape), tuple(k.shape), tuple(v.shape), True, torch.get_num_threads())
    with sk.tuning.use_tuner(Tuner({call: {"torch": 2.0, "sparsekern": 1.0}}, measure=False)):
        gm = sk.passes.apply(Two(), ["attention"], (q, k, v, mask))
    assert gm.sk_backends == {"attention.0": "sparsekern"}  # the masked call is left to torch
    with torch.no_grad():
        assert_close_to_scale(gm(q, k, v, mask), Two()(q, k, v, mask))


@needs_ext
def test_benchmark_bookkeeping() -> None:
    """The kernel benchmark's figures are consistent with each other and with the FLOP count of the visible pairs."""
    from sparsekern.bench import kernel_attention as bench

    doc = bench.run(shapes=((1, 2, 40, 16),), threads=1, warmup=1, repeats=2, progress=False)
    causal, full = doc["rows"]
    assert (causal["causal"], full["causal"]) == (True, False)
    assert full["flops"] == 2 * 2 * 40 * 40 * (16 + 16) and causal["flops"] == 2 * 2 * (40 * 41 // 2) * (16 + 16)
    for r in doc["rows"]:
        assert r["max_rel_error"] < 1e-5
        for name in ("sparsekern", "torch"):
            assert r["gflops"][name] == pytest.approx(r["flops"] / (r["ms"][name] * 1e6))
        assert r["vs_matmul"] == pytest.approx(r["gflops"]["sparsekern"] / r["gflops"]["matmul"])
    assert "1 x 2 x 40 x 16" in bench.table(doc)
    with pytest.raises(ValueError, match="CPU float32"):
        bench.run(device="cuda")
