"""The ``onednn_linear`` pass: every kernel it may choose keeps the outputs of dense and compiled language
models; epilogues fuse; the choice follows the tuner's table (no clock: tables are injected)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.lowrank import LowRankLinear
from sparsekern.methods import flop
from sparsekern.models import build
from sparsekern.ops import _ext
from sparsekern.tuning import LinearCall, Tuner
from tests.conftest import assert_close_to_scale

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
LMS = {"transformer_lm": dict(d_model=32, layers=2, heads=4, context=16), "sru_lm": dict(d_model=24, layers=2)}
POINTWISE = torch.ops.mkldnn._linear_pointwise


def _pruned_lm(arch: str, seed: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(dense LM, its FLOP-compiled form with half of every layer's gates off, a batch of bytes)."""
    torch.manual_seed(seed)
    dense = build(arch, **LMS[arch]).eval()
    model = flop.factorize(copy.deepcopy(dense), init="random").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flop.gated_layers(model).values():
            layer.log_alpha.fill_(10.0)
            layer.log_alpha[torch.randperm(layer.n_gates, generator=g)[: layer.n_gates // 2]] = -10.0
    x = torch.randint(0, 256, (2, 16), generator=g)
    return dense, sk.compile(model, flop.prune(model, x), x).eval(), x


@pytest.mark.parametrize("fallback", ["onednn", "torch", "sparsekern"])
@pytest.mark.parametrize("arch", list(LMS))
def test_every_kernel_keeps_dense_and_compiled_outputs(arch: str, fallback: str) -> None:
    if fallback == "sparsekern" and _ext.status() is not None:
        pytest.skip("the C++ extension is unavailable")
    dense, fast, x = _pruned_lm(arch)
    for model in (dense, fast):
        before = copy.deepcopy(model.state_dict())
        optimized = sk.optimize(model, x, tuner=Tuner(measure=False, fallback=fallback))
        with torch.no_grad():
            assert_close_to_scale(optimized(x), model(x))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is untouched
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LowRankLinear))]
        assert set(linears) <= set(optimized.sk_backends)
        offered = {"onednn", "torch"} if fallback == "torch" else {"onednn", fallback}
        assert {optimized.sk_backends[n] for n in linears} <= offered


class Epilogues(nn.Module):
    """A linear followed by each epilogue the pass fuses, and one whose output has two users (not fused)."""

    def __init__(self, d: int = 12) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e, self.f = (nn.Linear(d, d) for _ in range(6))
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.a(x))
        x = F.gelu(self.b(x), approximate="tanh")
        x = torch.relu(self.c(x))
        x = x + self.drop(self.d(x))
        y = self.e(x)
        return self.f(y * y + y)


def test_epilogues_fuse_into_the_onednn_call() -> None:
    torch.manual_seed(0)
    model = Epilogues().eval()
    x = torch.randn(3, 5, 12)
    gm = sk.passes.apply(model, ["onednn_linear"], x)
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))
    calls = [(n.target, n.args[3:] if n.target == POINTWISE.default else n.args[4:]) for n in gm.graph.nodes
             if n.op == "call_function" and n.target in (POINTWISE.default, POINTWISE.binary)]
    assert [c[1] for c in calls] == [("gelu", [], "none"), ("gelu", [], "tanh"), ("relu", [], ""), ("add",),
                                     ("none", [], ""), ("none", [], "")]
    assert not any(n.op == "call_module" for n in gm.graph.nodes)  # GELU and dropout gone with the linears
    assert gm.sk_backends == dict.fromkeys("abcdef", "onednn")


def test_choice_follows_the_table() -> None:
    torch.manual_seed(0)
    model = Epilogues().eval()
    x = torch.randn(3, 5, 12)
    call = LinearCall((3, 5, 12), ((12, 12),), True, "gelu", torch.get_num_threads())
    tuner = Tuner({call: {"onednn": 2e-4, "torch": 1e-4}}, measure=False)
    with sk.tuning.use_tuner(tuner):
        gm = sk.passes.apply(model, ["onednn_linear"], x)
    assert gm.sk_backends["a"] == "torch" and gm.sk_backends["b"] == "onednn"
    assert any(n.op == "call_module" and n.target == "a" for n in gm.graph.nodes)  # torch's call stays
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x))


def test_optimized_models_deep_copy_and_take_more_passes() -> None:
    """Prepacked oneDNN weights are opaque tensors torch cannot copy; an optimized model's copies share them."""
    torch.manual_seed(0)
    cnn, image = build("resnet20").eval(), torch.randn(2, 3, 16, 16)
    lm, tokens = build("transformer_lm", **LMS["transformer_lm"]).eval(), torch.randint(0, 256, (2, 16))
    with sk.tuning.use_tuner(Tuner(measure=False)):
        for model, x in ((cnn, image), (lm, tokens)):
            optimized = sk.optimize(model, x)
            assert any(b.is_mkldnn for b in optimized.buffers())
            twice = copy.deepcopy(copy.deepcopy(optimized))
            again = sk.passes.apply(optimized, ["onednn_linear"], x)  # passes copy their input first
            with torch.no_grad():
                for m in (twice, again):
                    assert_close_to_scale(m(x), model(x))
