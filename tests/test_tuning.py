"""The per-layer kernel choice: deterministic from a timing table, the ``onednn`` pass and ``sk.optimize``
following it, every zoo model's outputs unchanged on either kernel (no clock: tables are injected)."""
from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern.ops import _ext
from sparsekern.ops.fused_conv2d import PreparedFusedConv2d, fused_conv2d
from sparsekern.tuning import ConvCall, Tuner, use_tuner, current_tuner
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn

CALL = ConvCall((8, 16, 8, 8), (16, 16, 3, 3), (1, 1), (1, 1), (1, 1), True, False, True, True, 1)


def test_choice_follows_the_table_and_never_runs_a_candidate() -> None:
    ran = []
    candidates = {"onednn": lambda: ran.append("onednn"), "direct": lambda: ran.append("direct")}
    tuner = Tuner({CALL: {"onednn": 2e-4, "direct": 1e-4}})
    assert tuner.choose(CALL, candidates) == "direct"
    tuner.table[CALL]["onednn"] = 5e-5
    assert tuner.choose(CALL, candidates) == "onednn"
    assert ran == []
    assert tuner.to_dict() == {CALL.key(): {"onednn": 5e-5, "direct": 1e-4}}


def test_unknown_calls_get_the_fallback_without_measuring() -> None:
    candidates = {"onednn": lambda: pytest.fail("timed"), "direct": lambda: pytest.fail("timed")}
    assert Tuner(measure=False).choose(CALL, candidates) == "onednn"
    assert Tuner(measure=False, fallback="direct").choose(CALL, candidates) == "direct"
    assert Tuner(measure=False, fallback="direct").choose(CALL, {"onednn": candidates["onednn"]}) == "onednn"
    assert Tuner(measure=False, fallback="cudnn").choose(CALL, candidates) == "onednn"  # not offered: the first
    with pytest.raises(ValueError, match="fallback must name a backend"):
        Tuner(fallback="")


def test_use_tuner_scopes_the_current_tuner() -> None:
    outer = current_tuner()
    with use_tuner(Tuner(measure=False, fallback="direct")) as inner:
        assert current_tuner() is inner
    assert current_tuner() is outer


needs_ext = pytest.mark.skipif(_ext.status() is not None, reason="the C++ extension is unavailable")


@needs_ext
def test_the_pass_builds_what_the_table_says() -> None:
    model = sk.models.build("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    first = sk.optimize(model, x, tuner=Tuner(measure=False))
    assert set(first.sk_backends.values()) == {"onednn"}
    table = {}
    tuner = Tuner(measure=False)
    for name in ("conv1", "layer1.0.conv2"):  # the stem (conv+relu) and a block's conv+add+relu
        call = _call_of(model, name, x)
        table[call] = {"onednn": 2.0, "direct": 1.0}
    tuner.table.update(table)
    fast = sk.optimize(model, x, tuner=tuner)
    same_call = {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}  # the choice is per call
    assert {k for k, v in fast.sk_backends.items() if v == "direct"} == same_call
    modules = dict(fast.named_modules())
    prepared = [n for n in fast.graph.nodes if n.op == "call_module"
                and isinstance(modules[n.target], PreparedFusedConv2d)]
    assert len(prepared) == len(same_call)
    with torch.no_grad():
        assert_close_to_scale(fast(x), model(x))


def _call_of(model, name, x) -> ConvCall:
    """The ConvCall the pass makes for layer ``name`` (input shape captured by a hook; BN folded into a bias)."""
    shapes = {}
    conv = model.get_submodule(name)
    handle = conv.register_forward_hook(lambda m, a, out: shapes.update(x=tuple(a[0].shape)))
    with torch.no_grad():
        model(x)
    handle.remove()
    residual = name.endswith("conv2")
    return ConvCall(shapes["x"], tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, True, residual,
                    True, True, torch.get_num_threads())


@needs_ext
@pytest.mark.parametrize("name", sk.models.list_models())
def test_every_zoo_model_keeps_its_outputs_on_either_kernel(name: str) -> None:
    """Dense and randomly pruned, on oneDNN or the direct convolution (the latter also traced by ``script``)."""
    if name in ("transformer_lm", "sru_lm"):
        pytest.skip("no convolution")
    dense = randomize_bn(sk.models.build(name, num_classes=10).eval())
    size = 32 if "resnet" in name and name in ("resnet20", "resnet56", "resnet110") else 64
    x = torch.randn(2, 3, size, size)
    pruned = sk.compile(dense, random_plan(dense, x[:1], 0), x[:1]).eval()  # odd channel counts: every tile shape
    with torch.no_grad():
        for model in (dense, pruned):
            want = model(x)
            for fallback in ("onednn", "direct"):
                with use_tuner(Tuner(measure=False, fallback=fallback)):
                    fast = sk.optimize(model, x, script=fallback == "direct")
                assert fallback in set(fast.sk_backends.values())
                assert_close_to_scale(fast(x), want)


@needs_ext
def test_a_prepared_conv_equals_the_op_and_falls_back_on_other_inputs() -> None:
    w, b = torch.randn(12, 8, 3, 3), torch.randn(12)
    shape = (2, 8, 7, 7)
    prepared = PreparedFusedConv2d(w, b, (2, 2), (1, 1), (1, 1), True, shape)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    res = torch.randn(2, 12, 4, 4)  # NCHW residual for an NHWC output: copied to the output's strides
    torch.testing.assert_close(prepared(x, res), fused_conv2d(x, w, b, res, 2, 1, relu=True))
    for other in (torch.randn(3, 8, 7, 7), torch.randn(shape), torch.randn(shape).double()):
        if other.dtype == torch.float64:
            with pytest.raises(TypeError, match="share a float dtype"):  # the op's own checks
                prepared(other)
        else:
            torch.testing.assert_close(prepared(other), fused_conv2d(other, w, b, None, 2, 1, relu=True))
