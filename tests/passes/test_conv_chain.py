"""The conv_chain pass and its operator: consecutive direct convolutions in one call compute bitwise what the
separate calls compute, on any graph of inputs, residuals and outputs, with one thread or two."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.conv_chain import ConvChain
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
        op([x], packed, bias, forward, [2])
    wrong_residual = list(chain.spec)
    wrong_residual[1] = 0  # x added to layer 0's output: same shape, fine; then a 16-channel residual
    op([x], packed, bias, wrong_residual, [2])
    with pytest.raises(RuntimeError, match="residual"):
        op([x, torch.randn(1, 16, 9, 9).contiguous(memory_format=torch.channels_last)], packed, bias,
           [v if i != 1 else 1 for i, v in enumerate(chain.spec)], [3])
    with pytest.raises(RuntimeError, match="spec values per layer"):
        op([x], packed, bias, chain.spec[:-1], [2])
    with pytest.raises(RuntimeError, match="is not a layer's output"):
        op([x], packed, bias, chain.spec, [0])
    with pytest.raises(RuntimeError, match="channels-last"):
        op([torch.randn(2, 8, 9, 9)], packed, bias, chain.spec, [2])
    with pytest.raises(ValueError, match="earlier layers' outputs"):
        ConvChain([m for *_, m in layers], [(0, -1), (2, -1)], 1, [2])


def test_chain_operator_opcheck() -> None:
    _ext.load()
    layers = _layers()[:4]
    chain = ConvChain([m for *_, m in layers], [(s, r) for s, r, _ in layers], 1, [3, 4])
    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    args = ([x], [m.packed for *_, m in layers], [m.bias for *_, m in layers], chain.spec, [3, 4])
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
