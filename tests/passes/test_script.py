"""The ``script`` pass: the optimized graph traced and frozen computes what the Python graph computes, for dense
and compiled CNNs and language models, on both conv kernels and at other batch sizes; dynamic models are refused;
it is the last pass. The prepacked channels-last convolution it calls is a torch operator (opcheck)."""
from __future__ import annotations

import copy

import pytest
import torch

import sparsekern as sk
from sparsekern.methods import flop
from sparsekern.methods.sanp import to_plan, to_sanp
from sparsekern.models import build
from sparsekern.ops import _ext
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d
from sparsekern.tuning import Tuner, use_tuner
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
needs_ext = pytest.mark.skipif(_ext.status() is not None, reason="the C++ extension is unavailable")


@needs_ext
@pytest.mark.parametrize("kernel", ["onednn", "direct"])
def test_scripted_cnn_computes_what_the_graph_computes(kernel) -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 16, 16)
    fast = sk.compile(model, random_plan(model, x, 0), x)
    with use_tuner(Tuner(measure=False, fallback=kernel)), torch.no_grad():
        for net in (model, fast):
            graph = sk.optimize(net, x)
            scripted = sk.optimize(net, x, script=True)
            assert isinstance(scripted, torch.jit.ScriptModule)
            assert scripted.sk_backends == graph.sk_backends and kernel in set(graph.sk_backends.values())
            for batch in (2, 1, 3):  # traced for batch 2; other batches run the same kernels
                xb = torch.randn(batch, 3, 16, 16)
                assert_close_to_scale(scripted(xb), graph(xb), tol=1e-6)
                assert_close_to_scale(scripted(xb), net(xb))


@needs_ext
@pytest.mark.parametrize("kernel", ["onednn", "direct"])
def test_scripted_single_channel_layers_compute_what_the_graph_computes(kernel) -> None:
    """A 1-channel activation is NCHW and NHWC at once, so its consumer takes the op's general path: the trace
    must record it (an extension function writing into a tensor made by the module would be invisible)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 1)).eval()
    x = torch.randn(1, 3, 9, 9)
    with use_tuner(Tuner(measure=False, fallback=kernel)), torch.no_grad():
        scripted = sk.optimize(model, x, script=True)
        assert_close_to_scale(scripted(x), model(x))


@pytest.mark.parametrize("fallback", ["onednn", "sparsekern"])
def test_scripted_language_model_computes_what_the_graph_computes(fallback) -> None:
    torch.manual_seed(0)
    dense = build("transformer_lm", d_model=32, layers=2, heads=4, context=16).eval()
    model = flop.factorize(copy.deepcopy(dense), init="random").eval()
    x = torch.randint(0, 256, (2, 16))
    fast = sk.compile(model, flop.prune(model, x), x).eval()
    with use_tuner(Tuner(measure=False, fallback=fallback)), torch.no_grad():
        for net in (dense, fast):
            assert_close_to_scale(sk.optimize(net, x, script=True)(x), sk.optimize(net, x)(x), tol=1e-6)


def test_dynamic_models_and_misplaced_script_are_refused() -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    gated = to_sanp(model, granularity=4).eval()
    compiled = sk.compile(gated, to_plan(gated, x), x)
    with pytest.raises(ValueError, match="per-sample channel masks"):
        sk.optimize(compiled, x, script=True)
    with pytest.raises(ValueError, match="'script' must be the last inference pass"):
        sk.passes.apply(model, ["fold_bn", "script", "onednn"], x)
    with pytest.raises(ValueError, match="'script' needs example_inputs"):
        sk.passes.apply(model, ["fold_bn", "script"])
    with pytest.raises(ValueError, match="script=True is the CPU path"):
        sk.optimize(model, x, device="cuda", script=True)


@needs_ext
def test_prepacked_convolution_operator() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(6, 8, 3, 3, generator=g), torch.randn(6, generator=g)
    res = torch.randn(3, 6, 5, 4, generator=g)  # NCHW residual for a channels-last output: converted
    conv = PreparedFusedConv2d(w, b, (2, 2), (1, 1), (1, 1), True, x.shape)
    args = (x, conv.packed, b, res, [3, 3], [2, 2], [1, 1], [1, 1], 6, True)
    y = torch.ops.sparsekern._conv2d_nhwc_prepacked(*args)
    expected = (torch.nn.functional.conv2d(x.double(), w.double(), b.double(), 2, 1) + res.double()).relu()
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == (3, 6, 5, 4)
    assert_close_to_scale(y, expected, tol=1e-5)
    torch.library.opcheck(torch.ops.sparsekern._conv2d_nhwc_prepacked.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.sparsekern._conv2d_nhwc_prepacked(x[:, :, :1, :1], conv.packed, b, None, [3, 3], [2, 2], [0, 0],
                                                    [1, 1], 6, True)
    with pytest.raises(RuntimeError, match="not the packing"):
        torch.ops.sparsekern._conv2d_nhwc_prepacked(x[:, :4], conv.packed, b, None, [3, 3], [2, 2], [1, 1], [1, 1],
                                                    6, True)
