"""Dynamic (per-sample gated) layers: GatedConv2d equals its dense masked reference, compile_dynamic wires the
masks between consecutive gated layers, per-sample FLOPs, and plans that do not fit the model fail by name."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sparsekern as sk
import sparsekern.dynamic as dyn
from sparsekern.dynamic import GatedConv2d, MaskedConv2d, expand_groups
from sparsekern.graph import symbolic_trace
from sparsekern.ops import dispatch_of
from sparsekern.plan import Plan, PlanError
from tests.conftest import assert_close_to_scale, randomize_bn


class Gate(nn.Module):
    """Pool -> linear: one logit per group of channels."""

    def __init__(self, c_in: int, n: int, seed: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c_in, n)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(n, c_in, generator=g))
            self.fc.bias.copy_(torch.randn(n, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def unit(c_in: int, c_out: int, *, g: int | None, stride: int = 1, k: int = 3, relu: bool = True,
         seed: int = 0) -> MaskedConv2d:
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
    gate = None if g is None else Gate(c_in, -(-c_out // g), seed)
    return MaskedConv2d(conv, nn.BatchNorm2d(c_out), relu=relu, gate=gate, granularity=g)


class Chain(nn.Module):
    """Two gated convs in a row (the second reads the first's mask), then a consumer and a dense head."""

    def __init__(self, g: int = 1) -> None:
        super().__init__()
        self.a = unit(3, 12, g=g, seed=1)
        self.b = unit(12, 10, g=g, stride=2, seed=2)
        self.c = unit(10, 8, g=None, k=1, relu=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a[0], a[1])
        y = self.c(b[0], b[1])
        return self.head(y.mean((2, 3)))


CHAIN_PLAN = {
    "a": {"granularity": 1, "in_from": None},
    "b": {"granularity": 1, "in_from": "a"},
    "c": {"granularity": None, "in_from": "b"},
}


def chain(g: int = 1) -> tuple[nn.Module, torch.Tensor, Plan]:
    torch.manual_seed(0)
    model = randomize_bn(Chain(g)).eval()
    x = torch.randn(6, 3, 9, 9)
    dynamic = copy.deepcopy(CHAIN_PLAN)
    for name in ("a", "b"):
        dynamic[name]["granularity"] = g
    return model, x, Plan(dynamic=dynamic, meta={"inputs": [{"shape": [6, 3, 9, 9], "dtype": "float32"}]})


def cpu_or_reference(model: nn.Module) -> nn.Module:
    """The compiled model on the C++ CPU kernel when it is built here, else on the reference."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    why = dispatch_of("channel_skip_conv2d").reasons(x, w, None, None, None, [1, 1], [0, 0], [1, 1], False)
    return dyn.set_backend(model, "reference" if why["cpu"] else "cpu")


def require_backend(backend: str) -> None:
    """Skip unless ``backend`` of channel_skip_conv2d can run on CPU tensors here (reference always can)."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1)
    why = dispatch_of("channel_skip_conv2d").reasons(x, w, None, None, None, [1, 1], [0, 0], [1, 1], False)
    if why.get(backend, ["unknown"]):
        pytest.skip(f"channel_skip_conv2d backend {backend!r} unavailable: {why[backend]}")


# ----------------------------------------------------------------------------- one layer
def test_expand_groups_shares_one_decision_per_group() -> None:
    g = torch.tensor([[True, False, True]])
    assert expand_groups(g, 4, 10).tolist() == [[True] * 4 + [False] * 4 + [True] * 2]
    assert expand_groups(g, 1, 3) is g


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("g,stride,k,relu", [(1, 1, 3, True), (4, 2, 3, False), (3, 1, 1, True)])
def test_gated_layer_equals_masked_reference(backend: str, g: int, stride: int, k: int, relu: bool) -> None:
    require_backend(backend)
    torch.manual_seed(g)
    ref = randomize_bn(unit(7, 10, g=g, stride=stride, k=k, relu=relu, seed=g)).eval()
    fast = GatedConv2d.from_masked(ref, backend=backend)
    x = torch.randn(5, 7, 8, 8)
    in_mask = torch.rand(5, 7) > 0.4
    in_mask[0] = False  # a sample whose input is all skipped
    x = x * in_mask[:, :, None, None]  # the producer zeroed those channels
    with torch.no_grad():
        y_ref, m_ref = ref(x, in_mask)
        y, m = fast(x, in_mask)
    assert torch.equal(m, m_ref) and m.dtype == torch.bool
    assert not m.all() and m.any(), "the test needs mixed decisions"
    assert_close_to_scale(y, y_ref)
    assert (y[~m] == 0).all()  # skipped channels are exactly zero, bias included
    # the masked reference is the dense layer times the out mask
    dense = ref.dense(x)
    assert torch.allclose(y_ref, dense * m[:, :, None, None])


def test_dense_cpu_path_runs_full_batches_and_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """When a batch keeps more of the layer than the measured crossover, the layer runs the prepacked dense
    convolution and then the mask; sparse batches still go to the kernel. Both equal the reference."""
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    ref = randomize_bn(unit(16, 32, g=1, stride=1, k=3, relu=True, seed=3)).eval()
    fast = GatedConv2d.from_masked(ref)
    calls = []
    real = dyn.channel_skip_conv2d
    monkeypatch.setattr(dyn, "channel_skip_conv2d", lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    x = torch.randn(4, 16, 8, 8)
    full, sparse = torch.ones(4, 16, dtype=torch.bool), torch.rand(4, 16, generator=torch.Generator().manual_seed(0)) > 0.8
    with torch.no_grad():
        fractions = [float((i.sum(1) * ref(x * i[:, :, None, None], i)[1].sum(1)).sum()) / (4 * 16 * 32)
                     for i in (full, sparse)]
    assert fractions[1] < fractions[0]
    crossover = sum(fractions) / 2  # as if measured: dense wins above it
    dyn._DENSE_CACHE.setdefault(fast, {})["crossover"] = {(4, 16, 8, 8): crossover}
    with torch.no_grad():
        for in_mask, kernel_expected in ((full, False), (sparse, True)):
            calls.clear()
            xm = x * in_mask[:, :, None, None]
            y, m = fast(xm, in_mask)
            y_ref, m_ref = ref(xm, in_mask)
            assert torch.equal(m, m_ref) and (y[~m] == 0).all()
            assert_close_to_scale(y, y_ref)
            assert bool(calls) == kernel_expected
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # FLOP counting sees the op on either path
        calls.clear()
        fast(x, full)
    assert calls == [True] and counter.get_total_flops() > 0
    fast.dense_fallback = False
    with torch.no_grad():
        calls.clear()
        fast(x, full)
    assert calls == [True]


def test_masked_layer_out_mask_is_logit_threshold_per_group() -> None:
    layer = unit(4, 10, g=4, seed=3).eval()
    x = torch.randn(3, 4, 5, 5)
    logits = layer.gate(x)
    assert logits.shape == (3, 3)  # ceil(10 / 4) groups
    _, m = layer(x)
    for c in range(10):
        assert torch.equal(m[:, c], logits[:, c // 4] > 0)


# ----------------------------------------------------------------------------- compile
@pytest.mark.parametrize("g", [1, 4])
def test_compiled_chain_equals_masked_and_passes_masks(g: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, plan = chain(g)
    ref, fast = sk.masked(model, plan, x).eval(), cpu_or_reference(sk.compile(model, plan, x).eval())
    assert isinstance(fast.a, GatedConv2d) and isinstance(ref.a, MaskedConv2d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # BN folded into the gated convs
    calls: list[tuple] = []
    real = dyn.channel_skip_conv2d

    def spy(x, weight, bias, in_mask, out_mask, *args, **kwargs):
        calls.append((in_mask, out_mask, args[-1]))
        return real(x, weight, bias, in_mask, out_mask, *args, **kwargs)

    monkeypatch.setattr(dyn, "channel_skip_conv2d", spy)
    with torch.no_grad():
        out, want, orig = fast(x), ref(x), model(x)
    assert_close_to_scale(out, want)
    assert torch.allclose(want, orig)  # the masked reference is the gated model's own eval forward
    (in_a, out_a, relu_a), (in_b, out_b, relu_b), (in_c, out_c, relu_c) = calls
    assert in_a is None and in_b is out_a and in_c is out_b and out_c is None  # masks flow a -> b -> c
    assert relu_a and relu_b and not relu_c  # ReLU fused where the layer had one
    assert out_a.shape == (6, 12) and out_b.shape == (6, 10)
    assert len({tuple(r) for r in out_b.tolist()}) > 1, "decisions differ between samples"
    if g > 1:
        assert torch.equal(out_a, expand_groups(out_a[:, ::g], g, 12))


def test_compiled_chain_flops_count_only_active_channels() -> None:
    model, x, plan = chain(1)
    fast = cpu_or_reference(sk.compile(model, plan, x).eval())
    rep = sk.flops(fast, x)
    with torch.no_grad():
        a = fast.a(x)
        b = fast.b(a[0], a[1])
    # per sample: 2 k^2 H W |in| |out| for each conv, plus the gates' and the head's dense linears
    ka, kb = 2 * 9 * 81 * 3 * a[1].sum(1), 2 * 9 * 25 * a[1].sum(1) * b[1].sum(1)
    kc = 2 * 1 * 25 * b[1].sum(1) * 8
    gates = 2 * (3 * 12 + 12 * 10)
    head = 2 * 8 * 5
    want = ka + kb + kc + gates + head
    assert rep.per_sample.tensor().tolist() == want.tolist()
    assert rep.total == int(want.sum()) == rep.skipped_total
    assert rep.per_sample.min < rep.per_sample.max
    assert rep.layers["b"].per_sample.tensor().tolist() == kb.tolist()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fast(x)
    assert fc.get_total_flops() == rep.total  # the op's formula is registered with torch's counter
    ref_rep = sk.flops(sk.masked(model, plan, x).eval(), x)
    assert ref_rep.per_sample == rep.per_sample  # the dense reference reports the same per-sample cost
    assert ref_rep.total > rep.total  # ... while it computes everything


def test_compiled_model_is_an_fx_module_that_deepcopies() -> None:
    model, x, plan = chain(1)
    fast = sk.compile(model, plan, x).eval()
    assert isinstance(fast, torch.fx.GraphModule) and fast.sk_plan is plan
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        assert torch.equal(twin(x), fast(x))
    # tracing the compiled model again keeps the gated layers as single nodes
    assert [n.target for n in symbolic_trace(fast).graph.nodes if n.op == "call_module"][:3] == ["a", "b", "c"]


def test_compiled_chain_exports() -> None:
    model, x, plan = chain(4)
    fast = sk.compile(model, plan, x).eval()
    exported = torch.export.export(fast, (x,))  # the op has a fake implementation: export sees one node per call
    assert sum("channel_skip_conv2d" in str(n.target) for n in exported.graph.nodes) == 3
    with torch.no_grad():
        assert torch.equal(exported.module()(x), fast(x))


# ----------------------------------------------------------------------------- errors
def _with(plan: Plan, **changes: dict) -> Plan:
    dynamic = copy.deepcopy(plan.dynamic)
    for name, spec in changes.items():
        if spec is None:
            dynamic.pop(name)
        else:
            dynamic[name] = spec
    return Plan(dynamic=dynamic, meta=plan.meta)


@pytest.mark.parametrize("change,match", [
    ({"d": {"granularity": 1, "in_from": None}}, "dynamic layer 'd' is not in the model"),
    ({"head": {"granularity": 1, "in_from": None}}, "'head' is a Linear, not a gated layer"),
    ({"c": None}, r"gated layers \['c'\] are missing from the plan"),
    ({"b": {"granularity": 1, "in_from": None}}, "'b': the plan says its in mask comes from None, but in the model it "
                                                 "comes from 'a'"),
    ({"a": {"granularity": 4, "in_from": None}}, "'a': the plan says granularity 4, the model's layer has 1"),
    ({"c": {"granularity": None, "in_from": "head"}}, "reads its in mask from 'head', which is not a gated layer"),
    ({"a": {"granularity": 1}}, "'a': the spec lacks \\['in_from'\\]"),
    ({"a": {"granularity": 0, "in_from": None}}, "granularity must be a positive int"),
    ({"b": {"granularity": 1, "in_from": "a", "out_channels": 11}}, "out_channels=11, the model's layer has 10"),
    ({"b": {"granularity": 1, "in_from": "a", "stride": [1, 1]}}, r"'b': the plan says stride=\(1, 1\), the model's "
                                                                   r"layer has \(2, 2\)"),
    ({"a": {"granularity": 1, "in_from": None, "bias": True}}, "dynamic layer 'a': unknown key 'bias'"),
])
def test_plans_that_do_not_fit_fail_by_layer_name(change: dict, match: str) -> None:
    model, x, plan = chain(1)
    bad = _with(plan, **change)
    with pytest.raises(PlanError, match=match):
        sk.compile(model, bad, x)
    with pytest.raises(PlanError, match=match):
        sk.masked(model, bad, x)


def test_the_gate_architecture_is_checked_when_the_gate_describes_itself() -> None:
    model, x, plan = chain(1)
    described = Plan(dynamic={**plan.dynamic, "a": {"granularity": 1, "in_from": None, "gate": {"kind": "fc", "n": 12}}})
    sk.compile(model, described, x)  # Gate has no spec(): the recorded architecture is informational
    model.a.gate.spec = lambda: {"kind": "fc", "n": 12}
    sk.compile(model, described, x)
    model.a.gate.spec = lambda: {"kind": "fc", "n": 6}
    with pytest.raises(PlanError, match=r"dynamic layer 'a': the plan says its gate is \{'kind': 'fc', 'n': 12\}"):
        sk.compile(model, described, x)


def test_mask_must_come_from_a_gated_layer() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = unit(3, 4, g=1)
            self.b = unit(4, 4, g=None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.b(a[0], a[1] & a[1])

    x = torch.randn(2, 3, 5, 5)
    plan = Plan(dynamic={"a": {"granularity": 1, "in_from": None}, "b": {"granularity": None, "in_from": "a"}})
    with pytest.raises(PlanError, match="'b': its in mask is computed by 'and_'"):
        sk.compile(Odd().eval(), plan, x)


def test_layers_check_their_arguments() -> None:
    with pytest.raises(ValueError, match="groups=1"):
        MaskedConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="both a gate and a granularity"):
        MaskedConv2d(nn.Conv2d(4, 4, 3), gate=Gate(4, 4, 0))
    with pytest.raises(ValueError, match="BatchNorm of 5 channels"):
        MaskedConv2d(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5))
