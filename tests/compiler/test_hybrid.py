"""Calibration and the hybrid compile: channel classes recorded in the plan, the static fast part (never-on
channels gone, compact outputs only where consumers alone read them), the guard that hands any batch outside the
classes to the per-sample model, equality with the masked reference on any input, and the inference passes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import sparsekern as sk
import sparsekern.dynamic as dyn
from sparsekern.dynamic import MaskedConv2d
from sparsekern.hybrid import GateGuard, GuardedModel, is_calibrated
from sparsekern.methods import sanp
from sparsekern.models import build
from sparsekern.plan import Plan, PlanError
from sparsekern.tuning import GuardedModelCall, Tuner, use_tuner
from tests.compiler.test_dynamic import chain, cpu_or_reference, unit
from tests.conftest import assert_close_to_scale, randomize_bn


class ForcedGate(nn.Module):
    """``logit_c = w_c * t + b_c`` with ``t`` the mean of input channel 0: the classes are chosen by hand."""

    def __init__(self, w: list[float], b: list[float]) -> None:
        super().__init__()
        self.register_buffer("w", torch.tensor(w))
        self.register_buffer("b", torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0].mean((1, 2))[:, None] * self.w + self.b


class Forced(nn.Module):
    """``a``: channels 0-2 on for t > 0 (always on for t in the calibration range), 3-4 on for t < 0 (never),
    5-7 on for t > 1 (switching); ``b``: a constant gate (always 0, 1, 3, 5; never 2, 4) reading a's mask;
    ``c``: a consumer reading b's mask."""

    def __init__(self) -> None:
        super().__init__()
        gate_a = ForcedGate([10.0] * 3 + [-10.0] * 2 + [10.0] * 3, [0.0] * 5 + [-10.0] * 3)
        gate_b = ForcedGate([0.0] * 6, [1.0, 1.0, -1.0, 1.0, -1.0, 1.0])
        self.a = MaskedConv2d(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), relu=True, gate=gate_a,
                              granularity=1)
        self.b = MaskedConv2d(nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), relu=True, gate=gate_b,
                              granularity=1)
        self.c = unit(6, 4, g=None, k=1, relu=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        b = self.b(a[0], a[1])
        return self.head(self.c(b[0], b[1]).mean((2, 3)))


FORCED_PLAN = {"a": {"granularity": 1, "in_from": None}, "b": {"granularity": 1, "in_from": "a"},
               "c": {"granularity": None, "in_from": "b"}}
CALIBRATION_TS = [0.5, 1.5, 0.8, 1.2, 0.3]


def images_with_t(ts: list[float], seed: int = 0) -> torch.Tensor:
    """Random images whose channel 0 is the constant t (so ForcedGate sees exactly t)."""
    x = torch.randn(len(ts), 3, 7, 7, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.tensor(ts)[:, None, None]
    return x


def forced() -> tuple[nn.Module, Plan]:
    torch.manual_seed(0)
    return randomize_bn(Forced()).eval(), Plan(dynamic=copy.deepcopy(FORCED_PLAN))


def test_calibration_classifies_channels_and_compiles_physically_smaller_layers() -> None:
    model, plan = forced()
    calib = images_with_t(CALIBRATION_TS)
    cal = dyn.calibrate(plan, model, calib)
    a, b, c = (cal.dynamic_layers()[n] for n in "abc")
    assert (a.never_on, a.always_on) == ((3, 4), (0, 1, 2))  # 5, 6, 7 switch
    assert (b.never_on, b.always_on) == ((2, 4), (0, 1, 3, 5))
    assert c.never_on is None and c.always_on is None and cal.meta["calibration"] == {"samples": 5}
    assert plan.dynamic == FORCED_PLAN and not is_calibrated(plan) and is_calibrated(cal)
    # the classes are part of the plan's JSON, and a DataLoader of (x, y) calibrates alike
    assert Plan.from_json(cal.to_json()).dynamic == cal.dynamic
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(calib, torch.zeros(5)), batch_size=2)
    assert dyn.calibrate(plan, model, loader).dynamic == cal.dynamic
    compiled = sk.compile(model, cal, calib).eval()
    assert isinstance(compiled, GuardedModel) and type(sk.compile(model, plan, calib)) is not GuardedModel
    fast = compiled.fast
    # a's output reaches only b, so a computes its 6 live channels (of 8) and b reads them; b's output reaches the
    # consumer c only, so b computes its 4 live channels (of 6) and c reads those
    assert fast.a.weight.shape == (6, 3, 3, 3) and fast.b.weight.shape == (4, 6, 3, 3)
    assert fast.a.weight.flatten(1).any(1).all()
    assert fast.c.weight.shape == (4, 4, 1, 1)
    assert fast.a_guard.scaled and not fast.b_guard.scaled  # a has switching channels, b computes always-on only
    assert all(isinstance(m, dyn.GatedConv2d) for m in (compiled.exact.a, compiled.exact.b, compiled.exact.c))


@pytest.mark.parametrize("ts, outside", [
    (CALIBRATION_TS, False),  # the calibration batch: the fast part
    ([1.4], False),  # batch 1
    ([0.7, -1.0, 1.3], True),  # t < 0 turns on a's never-on channels
    ([0.0], True),  # t = 0: every channel of a is off (its always-on ones too)
    ([0.0, 0.0, 2.0], True),
])
def test_hybrid_equals_masked_on_any_input_guard_included(ts: list[float], outside: bool) -> None:
    model, plan = forced()
    cal = dyn.calibrate(plan, model, images_with_t(CALIBRATION_TS))
    fast, ref = cpu_or_reference(sk.compile(model, cal, images_with_t(ts)).eval()), sk.masked(model, cal).eval()
    x = images_with_t(ts, seed=1)
    with torch.no_grad():
        out, want = fast(x), ref(x)
        flagged = bool(fast.fast(x)[1])
    assert_close_to_scale(out, want)
    assert flagged == outside and fast.fallbacks == int(outside)


@pytest.mark.parametrize("g", [1, 4])
def test_hybrid_chain_with_random_gates_equals_masked(g: int) -> None:
    model, x, plan = chain(g)
    cal = dyn.calibrate(plan, model, x[:2])  # few samples: many fixed channels, most new inputs break them
    fast, ref = cpu_or_reference(sk.compile(model, cal, x).eval()), sk.masked(model, cal, x).eval()
    new = torch.randn(16, 3, 9, 9, generator=torch.Generator().manual_seed(g))
    with torch.no_grad():
        for batch in (x[:2], x[:1], new):
            before = fast.fallbacks
            assert_close_to_scale(fast(batch), ref(batch))
            assert fast.fallbacks == before or len(batch) == 16, "calibration inputs run the fast part"
        with FlopCounterMode(display=False) as counter:  # counting sees the per-sample op
            fast(x)
    assert counter.get_total_flops() == sk.flops(cpu_or_reference(sk.compile(model, plan, x).eval()), x).total


def _forced_sanp_resnet(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A SANP ResNet-20 whose gates give each layer a chosen structure: layer1.1.conv1 never on (a block that
    adds only its bias), layer2.0.conv1 always on, the others random (switching), biased towards on or off."""
    torch.manual_seed(seed)
    model = sanp.to_sanp(randomize_bn(build("resnet20")), granularity=1).eval()
    g = torch.Generator().manual_seed(seed)
    for name, u in sanp.gated_layers(model).items():
        if u.gate is None:
            continue
        fc2 = u.gate.fc2
        with torch.no_grad():
            fc2.weight.copy_(torch.randn(fc2.weight.shape, generator=g) * 0.5)
            fc2.bias.copy_(torch.randn(fc2.bias.shape, generator=g) * 2.0)
            if name == "layer1.1.conv1":
                fc2.weight.zero_(), fc2.bias.fill_(-1.0)
            if name == "layer2.0.conv1":
                fc2.weight.zero_(), fc2.bias.fill_(1.0)
    return model, torch.randn(8, 3, 8, 8, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sanp_resnet_with_empty_and_full_layers_equals_masked(seed: int) -> None:
    """Blocks whose gated conv keeps no channel (one channel of exact zeros, by a 1x1 conv of the same stride,
    which its consumer reads), full layers, and switching ones; the SPM gates read compact inputs (their first
    linear sliced); batch 1 included."""
    model, x = _forced_sanp_resnet(seed)
    cal = dyn.calibrate(sanp.to_plan(model, x), model, x)
    fast, ref = cpu_or_reference(sk.compile(model, cal, x).eval()), sk.masked(model, cal, x).eval()
    parts = dict(fast.fast.named_modules())
    empty, consumer = parts["layer1.1.conv1"], parts["layer1.1.conv2"]
    assert empty.weight.shape == (1, 16, 1, 1) and not empty.weight.any() and not empty.bias.any()
    assert consumer.in_channels == 1 and consumer.weight.shape[2:] == (3, 3)
    assert isinstance(parts["layer2.0.conv1"], nn.Conv2d) and not parts["layer2.0.conv1_guard"].scaled
    guard = parts["layer1.0.conv1_guard"]
    assert isinstance(guard, GateGuard) and guard.gate is None  # the SPM runs as one operator call
    assert guard.w1.shape == (16, 16)  # its input is the dense stream: nothing sliced
    with torch.no_grad():
        for batch in (x, x[:1], x[3:5]):
            assert_close_to_scale(fast(batch), ref(batch))
        assert fast.fallbacks == 0  # sub-batches of the calibration data stay inside the classes
        other = torch.randn(16, 3, 8, 8)
        assert_close_to_scale(fast(other), ref(other))


@pytest.mark.parametrize("seed", [0, 1])
def test_sanp_vgg_chains_compact_layers_and_slices_the_gates(seed: int) -> None:
    """VGG's gated convs read each other's masks through max-pools: each output is compact except the last
    one's (the classifier reads it, so it keeps every channel and its mask zeroes the never-on ones), and each
    SPM reads only its producer's live channels."""
    torch.manual_seed(seed)
    model = sanp.to_sanp(randomize_bn(build("vgg16_bn", cfg=[16, "M", 32, "M", 64, 64])), granularity=1).eval()
    g = torch.Generator().manual_seed(seed)
    for u in sanp.gated_layers(model).values():
        with torch.no_grad():
            u.gate.fc2.weight.copy_(torch.randn(u.gate.fc2.weight.shape, generator=g) * 0.3)
            u.gate.fc2.bias.copy_(torch.randn(u.gate.fc2.bias.shape, generator=g) * 2.0)
    x = torch.randn(12, 3, 12, 12, generator=g)
    cal = dyn.calibrate(sanp.to_plan(model, x), model, x)
    layers = cal.dynamic_layers()
    fast, ref = cpu_or_reference(sk.compile(model, cal, x).eval()), sk.masked(model, cal, x).eval()
    parts = dict(fast.fast.named_modules())
    names = list(layers)
    for before, name in zip(names, names[1:]):
        live = layers[before].out_channels - len(layers[before].never_on)
        assert parts[f"{name}_guard"].w1.shape[1] == live and parts[name].in_channels == live
    assert parts[names[-1]].out_channels == layers[names[-1]].out_channels  # read by the classifier: full width
    with torch.no_grad():
        for batch in (x, x[:1], torch.randn(20, 3, 12, 12, generator=g)):
            assert_close_to_scale(fast(batch), ref(batch))


class SharedMask(nn.Module):
    """``a``'s mask goes to two consumers; only ``c1`` reads ``a``'s output, ``c2`` reads the image (8 channels
    too): ``a`` must keep every channel, or ``c2`` would read the wrong ones."""

    def __init__(self) -> None:
        super().__init__()
        self.a = unit(8, 8, g=1, seed=3)
        self.c1 = unit(8, 4, g=None, k=1, relu=False)
        self.c2 = unit(8, 4, g=None, k=1, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.a(x)
        return self.c1(a[0], a[1]) + self.c2(x, a[1])


def test_an_output_stays_full_width_unless_it_reaches_every_layer_that_reads_its_mask() -> None:
    torch.manual_seed(0)
    model = randomize_bn(SharedMask()).eval()
    x = torch.randn(6, 8, 7, 7)
    plan = Plan(dynamic={"a": {"granularity": 1, "in_from": None}, "c1": {"granularity": None, "in_from": "a"},
                         "c2": {"granularity": None, "in_from": "a"}})
    with torch.no_grad():
        model.a.gate.fc.bias[:3] = -50.0  # three channels never on
    cal = dyn.calibrate(plan, model, x)
    assert len(cal.dynamic_layers()["a"].never_on) >= 3
    fast = cpu_or_reference(sk.compile(model, cal, x).eval())
    assert fast.fast.a.out_channels == 8 and fast.fast.c2.in_channels == 8
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, cal, x).eval()(x))


def test_inference_passes_apply_to_both_parts_and_keep_the_guard() -> None:
    """sk.optimize(script=True) traces the fast part and leaves the per-sample part in Python: the result still
    equals the reference and still falls back on batches outside the classes; the given model is unchanged."""
    model, plan = forced()
    cal = dyn.calibrate(plan, model, images_with_t(CALIBRATION_TS))
    compiled = cpu_or_reference(sk.compile(model, cal, images_with_t(CALIBRATION_TS)).eval())
    before = copy.deepcopy(compiled.state_dict())
    with use_tuner(Tuner(measure=False)):  # no clock: oneDNN kernels and the static path
        opt = sk.optimize(compiled, images_with_t(CALIBRATION_TS), script=True)
    assert isinstance(opt.fast, torch.jit.ScriptModule) and not isinstance(opt.exact, torch.jit.ScriptModule)
    ref = sk.masked(model, cal).eval()
    with torch.no_grad():
        for ts, fell in ((CALIBRATION_TS, 0), ([0.7, -1.0, 1.3, 0.2, 0.9], 1)):
            x = images_with_t(ts, seed=3)
            assert_close_to_scale(opt(x), ref(x))
            assert opt.fallbacks == fell
    assert all(torch.equal(v, compiled.state_dict()[k]) for k, v in before.items())


class Refuses(nn.Module):
    def forward(self, *args: object) -> None:
        raise AssertionError("this part must not run")


@pytest.mark.parametrize("static_s, per_sample_s, path", [(1e-3, 2e-3, "static"), (2e-3, 1e-3, "per-sample"),
                                                           (None, None, "static")])
def test_the_faster_path_is_chosen_from_the_tuner_table(static_s, per_sample_s, path) -> None:
    """The passes choose between the guarded static part and the per-sample model from the tuner's timings
    (no clock here: an injected table, or no table and no measuring, which keeps the static part)."""
    model, plan = forced()
    x = images_with_t(CALIBRATION_TS)
    cal = dyn.calibrate(plan, model, x)
    compiled = cpu_or_reference(sk.compile(model, cal, x).eval())
    call = GuardedModelCall(compiled.plan_digest, (tuple(x.shape),), torch.get_num_threads())
    table = {} if static_s is None else {call: {"static": static_s, "per-sample": per_sample_s}}
    with use_tuner(Tuner(table, measure=False)):
        opt = sk.optimize(compiled, x)
    assert opt.path == path and compiled.path == "static"  # the given model is not changed
    if path == "per-sample":
        opt.fast = Refuses()
    else:
        opt.exact = Refuses()
    with torch.no_grad():
        assert_close_to_scale(opt(x), sk.masked(model, cal).eval()(x))
    other = sk.compile(model, dyn.calibrate(plan, model, x[:2]), x)  # another plan: another entry of the table
    assert other.plan_digest != compiled.plan_digest


def test_hybrid_errors_name_the_layer() -> None:
    model, plan = forced()
    with pytest.raises(ValueError, match="holds no sample"):
        dyn.calibrate(plan, model, torch.zeros(0, 3, 7, 7))
    wrong = Plan(dynamic={**copy.deepcopy(FORCED_PLAN), "head": {"granularity": 1, "in_from": None}})
    with pytest.raises(PlanError, match="'head' is not a gated layer"):
        dyn.calibrate(wrong, model, images_with_t([1.0]))
    bad = Plan(dynamic={**copy.deepcopy(FORCED_PLAN), "a": {"granularity": 1, "in_from": None, "never_on": [9],
                                                            "always_on": [0]},
                        "b": {"granularity": 1, "in_from": "a", "never_on": [], "always_on": []}})
    with pytest.raises(PlanError, match="'a': the plan's never_on names channel 9, the model's layer has 8"):
        sk.compile(model, bad, images_with_t([1.0]))
    with pytest.raises(PlanError, match="both never_on and always_on"):
        Plan(dynamic={"a": {"granularity": 1, "in_from": None, "never_on": [1], "always_on": [1]}}).dynamic_layers()
    with pytest.raises(PlanError, match="a consumer"):
        Plan(dynamic={"a": {"granularity": None, "in_from": "b", "never_on": [], "always_on": []}}).to_dict()
