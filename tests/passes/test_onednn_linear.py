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


@pytest.mark.parametrize("fallback", ["onednn", "torch", "sparsekern", "onednn+layer_norm"])
@pytest.mark.parametrize("arch", list(LMS))
def test_every_kernel_keeps_dense_and_compiled_outputs(arch: str, fallback: str) -> None:
    if fallback in ("sparsekern", "onednn+layer_norm") and _ext.status() is not None:
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
        if fallback == "onednn+layer_norm" and arch == "transformer_lm":  # every LayerNorm folds but ln2 of
            norms = {n.target for n in optimized.graph.nodes  # the dense model (fc1 has its GELU fused)
                     if n.op == "call_module" and isinstance(optimized.get_submodule(n.target), nn.LayerNorm)}
            assert norms == ({f"blocks.{i}.ln2" for i in range(2)} if model is dense else set())


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


class NormThenLinear(nn.Module):
    """LayerNorms before a low-rank layer, a dense one, a dense one with an epilogue, and one read twice."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln_a, self.ln_b, self.ln_c, self.ln_d = (nn.LayerNorm(d) for _ in range(4))
        for ln in (self.ln_a, self.ln_b, self.ln_c, self.ln_d):
            nn.init.normal_(ln.weight)
            nn.init.normal_(ln.bias)
        self.a = LowRankLinear.from_factors(torch.randn(5, d) / 4, torch.randn(d, 5) / 4, torch.randn(d))
        self.b, self.c, self.d = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_a(x)
        x = x + self.a(h).view(h.size(0), h.size(1), -1)  # a size() user of the LayerNorm's output
        x = self.b(self.ln_b(x))
        x = torch.relu(self.c(self.ln_c(x)))
        h = self.ln_d(x)
        return self.d(h) + h


def test_layer_norm_folds_where_the_table_says() -> None:
    if _ext.status() is not None:
        pytest.skip("the C++ extension is unavailable")
    torch.manual_seed(0)
    model = NormThenLinear().eval()
    x = torch.randn(3, 5, 16)
    fold = {"onednn": 2e-4, "onednn+layer_norm": 1e-4}
    table = {LinearCall((3, 5, 16), ((5, 16),), False, "none", torch.get_num_threads(), "layer_norm"): fold,
             LinearCall((3, 5, 16), ((16, 16),), True, "none", torch.get_num_threads(), "layer_norm"): fold}
    with sk.tuning.use_tuner(Tuner(table, measure=False)):
        gm = sk.passes.apply(model, ["onednn_linear"], x)
    assert gm.sk_backends == {"a": "onednn+layer_norm", "b": "onednn+layer_norm", "c": "onednn", "d": "onednn"}
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"ln_c", "ln_d"}
    assert sum(n.target == torch.ops.sparsekern._layer_norm_fold.default for n in gm.graph.nodes) == 2
    with torch.no_grad():
        assert_close_to_scale(gm(x), model(x), tol=1e-5)
    with sk.tuning.use_tuner(Tuner({call: {"onednn": 1e-4, "onednn+layer_norm": 2e-4} for call in table},
                                   measure=False)):
        gm = sk.passes.apply(model, ["onednn_linear"], x)
    assert set(gm.sk_backends.values()) == {"onednn"}
    assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"ln_a", "ln_b", "ln_c", "ln_d"}
