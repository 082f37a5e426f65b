"""The conv_chain pass and its operator: consecutive direct convolutions in one call compute bitwise what the
separate calls compute, on any graph of inputs, residuals and outputs, with one thread or two; so do the gates
of a hybrid SANP model and their mask multiplies inside the chain, the guard's flag included."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.conv_chain import ConvChain
from sparsekern.hybrid import GateGuard
from sparsekern.models import build
from sparsekern.ops import _ext
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d
from sparsekern.tuning import Tuner, use_tuner
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn

# (source, residual or -1, c_out, kernel, stride, padding, dilation, relu) over values: x (8 channels), then
# each layer's output. Padded and unpadded layers, stride 2, dilation 2, a 5x5 kernel, widths that group input
# channels and widths that do not, a residual from the input and from an earlier layer, a branch.
LAYERS = [
    (0, -1, 8, 3, 1, 1, 1, True),
    (1, 0, 8, 3, 1, 1, 1, True),
    (2, -1, 16, 3, 2, 1, 1, True),
    (2, -1, 16, 1, 2, 0, 1, False),
    (3, 4, 16, 3, 1, 2, 2, True),
    (5, -1, 11, 5, 1, 2, 1, False),
    (6, -1, 5, 1, 1, 0, 1, True),
    (5, -1, 3, 3, 1, 1, 1, False),
]
OUTPUTS = [7, 2, 8]


def _layers(seed: int = 0) -> list[tuple[int, int, PreparedFusedConv2d]]:
    g = torch.Generator().manual_seed(seed)
    channels, layers = [8], []
    for src, res, c_out, k, s, p, d, relu in LAYERS:
        w = torch.randn(c_out, channels[src], k, k, generator=g) / (channels[src] * k * k) ** 0.5
        bias = None if c_out == 5 else torch.randn(c_out, generator=g)
        layers.append((src, res, PreparedFusedConv2d(w, bias, (s, s), (p, p), (d, d), relu, (1, channels[src], 9, 9))))
        channels.append(c_out)
    return layers


def _separately(x: torch.Tensor, layers: list[tuple[int, int, PreparedFusedConv2d]]) -> list[torch.Tensor]:
    values = [x]
    for src, res, m in layers:
        values.append(torch.ops.sparsekern._conv2d_nhwc_prepacked(
            values[src], m.packed, m.bias, None if res < 0 else values[res], m._kernel_size, m.stride, m.padding,
            m.dilation, m.out_shape[1], m.relu))
    return values


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,size", [(1, 9), (1, 16), (3, 11), (9, 8)])
def test_chain_equals_separate_calls(batch: int, size: int, threads: int) -> None:
    _ext.load()
    layers = _layers()
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, OUTPUTS)
    x = torch.randn(batch, 8, size, size).contiguous(memory_format=torch.channels_last)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            outs = chain(x)
            values = _separately(x, layers)
    finally:
        torch.set_num_threads(previous)
    assert len(outs) == len(OUTPUTS)
    for out, v in zip(outs, OUTPUTS):
        assert torch.equal(out, values[v]), v
        assert out.is_contiguous(memory_format=torch.channels_last)
    # and each layer is its convolution (float64 ground truth on the layer's input); with two threads at batch 1
    # each thread copies only the input rows of its tiles
    for i, (src, res, m) in enumerate(layers):
        bias = None if m.bias is None else m.bias.double()
        ref = F.conv2d(values[src].double(), m.weight.double(), bias, m.stride, m.padding, m.dilation)
        ref = ref if res < 0 else ref + values[res].double()
        assert_close_to_scale(values[i + 1], (F.relu(ref) if m.relu else ref).float())


def test_chain_takes_other_layouts_and_dtypes() -> None:
    _ext.load()
    layers = _layers(1)
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, OUTPUTS)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = _separately(x.contiguous(memory_format=torch.channels_last), layers)
        for out, v in zip(chain(x), OUTPUTS):  # NCHW input: a channels-last copy, then one call
            assert torch.equal(out, expected[v])
        for out, v in zip(copy.deepcopy(chain).bfloat16()(x.bfloat16()), OUTPUTS):  # the layers one by one
            assert out.dtype == torch.bfloat16
            assert_close_to_scale(out.float(), expected[v], tol=0.05)


def test_chain_operator_rejects_bad_specs() -> None:
    _ext.load()
    layers = _layers()[:2]
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, [2])
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    packed, bias = [m.packed for *_, m in layers], [m.bias for *_, m in layers]
    op = torch.ops.sparsekern._conv2d_nhwc_chain
    forward = list(chain.spec)
    forward[0] = 2  # layer 0 reads layer 1's output
    with pytest.raises(RuntimeError, match="may read only the inputs and earlier layers' outputs"):
        op([x], packed, bias, forward, [2], [], [])
    wrong_residual = list(chain.spec)
    wrong_residual[1] = 0  # x added to layer 0's output: same shape, fine; then a 16-channel residual
    op([x], packed, bias, wrong_residual, [2], [], [])
    with pytest.raises(RuntimeError, match="residual"):
        op([x, torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)], packed, bias,
           [v if i != 1 else 1 for i, v in enumerate(chain.spec)], [3], [], [])
    with pytest.raises(RuntimeError, match="spec values per layer"):
        op([x], packed, bias, chain.spec[:-1], [2], [], [])
    with pytest.raises(RuntimeError, match="is not a layer's output"):
        op([x], packed, bias, chain.spec, [0], [], [])
    with pytest.raises(RuntimeError, match="channels-last"):
        op([torch.randn(2, 8, 9, 9)], packed, bias, chain.spec, [2], [], [])
    with pytest.raises(ValueError, match="earlier layers' outputs"):
        ConvChain([m for *_, m in layers], [(0, -1), (2, -1)], 1, [2])


def test_chain_operator_opcheck() -> None:
    _ext.load()
    layers = _layers()[:4]
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, [3, 4])
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    args = ([x], [m.packed for *_, m in layers], [m.bias for *_, m in layers], chain.spec, [3, 4], [], [])
    torch.library.opcheck(torch.ops.sparsekern._conv2d_nhwc_chain.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name,size,batch", [("resnet20", 32, 1), ("resnet50", 64, 2), ("vgg16_bn", 32, 1)])
def test_pass_chains_zoo_models_without_changing_them(name: str, size: int, batch: int) -> None:
    model = randomize_bn(build(name).eval())
    x = torch.randn(batch, 3, size, size)
    with use_tuner(Tuner(measure=False, fallback="direct")), torch.no_grad():
        plain = sk.passes.apply(model, ["fold_bn", "onednn"], x)
        chained = sk.passes.apply(model, ["fold_bn", "onednn", "conv_chain"], x)
        chains = [m for m in chained.modules() if isinstance(m, ConvChain)]
        assert chains and sum(len(c.layers) for c in chains) >= 10
        assert torch.equal(chained(x), plain(x))
        assert torch.equal(sk.passes.apply(chained, ["conv_chain"])(x), plain(x))  # nothing left to chain
        scripted = sk.passes.apply(model, ["fold_bn", "onednn", "conv_chain", "script"], x)
        assert torch.equal(scripted(x), plain(x))
        other = torch.randn(batch + 2, 3, size, size)  # another batch size through the same chains
        assert_close_to_scale(scripted(other), model(other))


def test_pass_on_a_compiled_model_through_optimize() -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(1, 3, 32, 32)
    fast = sk.compile(model, random_plan(model, x, 0), x)
    with use_tuner(Tuner(measure=False, fallback="direct")), torch.no_grad():
        optimized = sk.optimize(fast, x)
        assert any(isinstance(m, ConvChain) for m in optimized.modules())
        assert_close_to_scale(optimized(x), fast(x))
        assert torch.equal(sk.optimize(copy.deepcopy(fast), x, script=True)(x), optimized(x))


# ----------------------------------------------------------------------------- gates in a chain
class _PooledMlp(torch.nn.Module):
    """A gate that says it is a pooled MLP (SANP's saliency module): GateGuard runs it as one operator call."""

    def __init__(self, c_in: int, groups: int, g: torch.Generator) -> None:
        super().__init__()
        self.w1, self.b1 = torch.randn(6, c_in, generator=g), torch.randn(6, generator=g)
        self.w2, self.b2 = torch.randn(groups, 6, generator=g), torch.randn(groups, generator=g)

    def sk_pooled_mlp(self) -> tuple[torch.Tensor, ...]:
        return self.w1, self.b1, self.w2, self.b2


# (value read, layer it runs with, layer it scales or -1, granularity) over LAYERS' values: a gate on the input,
# gates of 1, 4 and 3 channels per group (11 channels: a last group of 2), one that only flags and reads a value
# no later layer reads (its block must not be reused while the gate runs), and one after the last layer
GATES = [(0, 0, 0, 1), (2, 2, 2, 4), (5, 5, 5, 3), (1, 6, -1, 1), (6, 8, -1, 2)]
CHANNELS = [8] + [c_out for _, _, c_out, *_ in LAYERS]


def _gates(seed: int, fixed: bool) -> list[GateGuard]:
    """GateGuards of random pooled MLPs; with ``fixed``, random calibration classes (so some samples leave
    them), else none (every group switching)."""
    g = torch.Generator().manual_seed(seed)
    gates = []
    for src, _, scaled, granularity in GATES:
        c_out = CHANNELS[scaled + 1] if scaled >= 0 else 7
        groups = -(-c_out // granularity)
        mlp = _PooledMlp(CHANNELS[src], groups, g)
        cls = torch.randint(0, 3, (groups,), generator=g) if fixed else torch.zeros(groups, dtype=torch.long)
        never = (cls == 1).repeat_interleave(granularity)[:c_out]
        always = (cls == 2).repeat_interleave(granularity)[:c_out]
        gates.append(GateGuard(mlp, granularity, c_out, never, always, torch.arange(c_out), scaled >= 0))
    return gates


def _gated_chain(seed: int, fixed: bool) -> tuple[ConvChain, list[tuple[int, int, PreparedFusedConv2d]]]:
    layers = _layers(seed)
    scales = [next((k for k, (*_, s, _) in enumerate(GATES) if s == i), -1) for i in range(len(layers))]
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, OUTPUTS, _gates(seed, fixed),
                      [(src, at) for src, at, *_ in GATES], scales)
    return chain, layers


def _gated_separately(x: torch.Tensor, chain: ConvChain) -> tuple[list[torch.Tensor], bool]:
    """The chain's values by separate operator calls: _gate_guard before its layer, the scale as an in-place
    multiply after the convolution; and whether any gate flagged the batch."""
    values, scale, outside = [x], {}, False
    for i in range(len(chain.layers) + 1):
        for k, (src, at) in enumerate(chain.gate_sources):
            if at == i:
                _, scale[k], flag = torch.ops.sparsekern._gate_guard(values[src], *chain.gates[k].sk_chain_gate())
                outside |= bool(flag)
        if i < len(chain.layers):
            m, (src, res) = chain.layers[i], chain.sources[i]
            y = torch.ops.sparsekern._conv2d_nhwc_prepacked(
                values[src], m.packed, m.bias, None if res < 0 else values[res], m._kernel_size, m.stride,
                m.padding, m.dilation, m.out_shape[1], m.relu)
            values.append(y.mul_(scale[chain.scales[i]]) if chain.scales[i] >= 0 else y)
    return values, outside


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch,size", [(1, 9), (1, 16), (5, 11)])
@pytest.mark.parametrize("fixed", [True, False])
def test_gated_chain_equals_separate_gate_and_conv_calls(batch: int, size: int, threads: int, fixed: bool) -> None:
    _ext.load()
    off = 0
    for seed in range(3):
        chain, _ = _gated_chain(seed, fixed)
        x = torch.randn(batch, 8, size, size, generator=torch.Generator().manual_seed(seed))
        x = x.contiguous(memory_format=torch.channels_last)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                *outs, outside = chain(x)
                values, want_outside = _gated_separately(x, chain)
                modules = chain.forward_modules(x)
        finally:
            torch.set_num_threads(previous)
        assert outside.dtype == torch.bool and outside.shape == () and bool(outside) == want_outside
        assert bool(modules[-1]) == want_outside
        if not fixed:
            assert not want_outside  # no class to leave
        for out, by_module, v in zip(outs, modules, OUTPUTS):
            assert torch.equal(out, values[v]) and torch.equal(by_module, values[v]), v
        mask = torch.ops.sparsekern._gate_guard(values[2], *chain.gates[1].sk_chain_gate())[0]
        off += int((~mask).sum())  # channels layer 2's gate turned off in this batch (its outputs zeroed)
    assert off > 0


def test_gated_chain_rejects_bad_gates() -> None:
    _ext.load()
    chain, layers = _gated_chain(0, True)
    modules, sources = [m for *_, m in layers], [(s, r) for s, r, _ in layers]
    gates = list(chain.gates)
    with pytest.raises(ValueError, match="gate 0 runs with layer 1 and reads value 3"):
        ConvChain(modules, sources, 1, OUTPUTS, gates[:1], [(3, 1)], [-1] * len(layers))
    with pytest.raises(ValueError, match="layer 0 is scaled by gate 0, which is not one of the 1 gates or runs after"):
        ConvChain(modules, sources, 1, OUTPUTS, gates[:1], [(0, 1)], [0] + [-1] * (len(layers) - 1))
    with pytest.raises(ValueError, match="layer 1 writes 8 channels, but gate 1 scales 16"):
        ConvChain(modules, sources, 1, OUTPUTS, gates[:2], [(0, 0), (0, 0)], [-1, 1] + [-1] * (len(layers) - 2))
    with pytest.raises(ValueError, match="no sk_chain_gate"):
        ConvChain(modules, sources, 1, OUTPUTS, [torch.nn.Identity()], [(0, 0)])
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    op = torch.ops.sparsekern._conv2d_nhwc_chain
    packed, bias = [m.packed for m in modules], [chain._no_bias if m.bias is None else m.bias for m in modules]
    tensors = [t for g in gates for t in g.sk_chain_gate()[:7]]
    late = list(chain.gate_spec)
    late[0] = 4  # gate 0 (with layer 0) reads layer 3's output
    with pytest.raises(RuntimeError, match="gate 0 runs with layer 0 and reads value 4"):
        op([x], packed, bias, chain.spec, OUTPUTS, tensors, late)
    with pytest.raises(RuntimeError, match="gate_spec values and 7 tensors per gate"):
        op([x], packed, bias, chain.spec, OUTPUTS, tensors[:-1], chain.gate_spec)
    wide = list(chain.spec)
    wide[5 * 13 + 12] = 1  # layer 5 (11 channels) scaled by gate 1 (16)
    with pytest.raises(RuntimeError, match=r"layer 5 writes 11 channels \(batch 1\), but gate 1 scales 16 channels"):
        op([x], packed, bias, wide, OUTPUTS, tensors, chain.gate_spec)
    torch.library.opcheck(op.default, ([x], packed, bias, chain.spec, OUTPUTS, tensors, chain.gate_spec),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("batch", [1, 4])
def test_pass_chains_a_hybrid_sanp_model_with_its_gates(batch: int) -> None:
    """A calibrated SANP ResNet-20: every gate and its scale join the chains, and the static part returns what
    it returns unchained (output and guard flag, bitwise); the model still equals ``sk.masked``."""
    from sparsekern.dynamic import calibrate
    from sparsekern.methods import sanp

    torch.manual_seed(0)
    model = sanp.to_sanp(randomize_bn(build("resnet20")), granularity=1).eval()
    g = torch.Generator().manual_seed(0)
    for u in sanp.gated_layers(model).values():
        if u.gate is not None:
            with torch.no_grad():
                u.gate.fc2.weight.copy_(torch.randn(u.gate.fc2.weight.shape, generator=g) * 0.3)
                u.gate.fc2.bias.copy_(torch.randn(u.gate.fc2.bias.shape, generator=g) * 2.0)
    calib = torch.randn(32, 3, 16, 16, generator=g)
    x = calib[:batch]
    plan = calibrate(sanp.to_plan(model, x), model, calib)
    hybrid = sk.compile(model, plan, x).eval()
    with use_tuner(Tuner(measure=False, fallback="direct")), torch.no_grad():
        plain = sk.passes.apply(hybrid, ["fold_bn", "onednn"], x)
        chained = sk.passes.apply(hybrid, ["fold_bn", "onednn", "conv_chain"], x)
        chains = [m for m in chained.fast.modules() if isinstance(m, ConvChain)]
        assert sum(len(c.gates) for c in chains) == sum(isinstance(m, GateGuard) for m in plain.fast.modules())
        assert sum(len(c.gates) for c in chains) >= 6 and any(k >= 0 for c in chains for k in c.scales)
        assert not any(n.op == "call_method" and n.target == "mul_" for n in chained.fast.graph.nodes)
        # the guard's flags: one per chain, each listed once
        stacked = [a for n in chained.fast.graph.nodes if n.target is torch.stack for a in n.args[0]]
        assert len(stacked) == len(set(stacked)) <= len(chains)
        scripted = sk.passes.apply(hybrid, ["fold_bn", "onednn", "conv_chain", "script"], x)
        for batch_x in (x, torch.randn(batch, 3, 16, 16, generator=g) * 3):  # the second leaves the classes
            (out, outside), (want, want_outside) = chained.fast(batch_x), plain.fast(batch_x)
            assert torch.equal(out, want) and bool(outside) == bool(want_outside)
            assert torch.equal(scripted.fast(batch_x)[0], want)
            assert_close_to_scale(chained(batch_x), sk.masked(model, plan, x).eval()(batch_x))
