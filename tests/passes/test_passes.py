"""Inference passes change speed, not results: every pass on every kind of model equals the plain model."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.models import build
from tests.conftest import ChunkViewNet, ConcatSplitNet, assert_close_to_scale, random_plan, randomize_bn

MODELS = [
    (lambda: build("resnet20"), 32), (lambda: build("resnet50"), 64), (lambda: build("mobilenet_v2"), 32),
    (lambda: build("vgg16_bn"), 32), (ConcatSplitNet, 8), (ChunkViewNet, 8),
]


@pytest.mark.parametrize("passes", [("fold_bn",), ("fold_bn", "channels_last"), ("fold_bn", "onednn"), ("onednn",)])
@pytest.mark.parametrize("make,size", MODELS)
def test_passes_keep_outputs(make, size: int, passes: tuple[str, ...]) -> None:
    model = randomize_bn(make().eval())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        out = sk.passes.apply(copy.deepcopy(model), passes, x)(x)
    assert_close_to_scale(out, expected)


def test_onednn_fuses_relu_and_residual_add() -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    gm = sk.passes.apply(copy.deepcopy(model), ["fold_bn", "onednn"], x)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    fused = torch.ops.mkldnn._convolution_pointwise
    assert targets.count(fused.default) == 1 + 9 + 2  # stem + first conv of 9 blocks + 2 downsample convs
    assert targets.count(fused.binary) == 9  # conv2 + shortcut add + relu of every block
    assert not any(n.op == "call_module" and isinstance(gm.get_submodule(n.target), (nn.Conv2d, nn.ReLU))
                   for n in gm.graph.nodes)


def test_onednn_on_compiled_model_and_other_batch_sizes() -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(4, 3, 32, 32)
    fast = sk.compile(model, random_plan(model, x, 0), x)
    gm = sk.passes.apply(copy.deepcopy(fast), ["fold_bn", "onednn"], x)
    with torch.no_grad():
        for batch in (4, 1, 7):  # specialised to batch 4, still correct at others
            xb = torch.randn(batch, 3, 32, 32)
            assert_close_to_scale(gm(xb), fast(xb))


def test_onednn_leaves_shared_and_unusual_convs_correct() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding="same")  # string padding: left to PyTorch
            self.c = nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            z = self.c(y)
            return F.relu(z + self.b(y)) + z.sigmoid()  # z used twice: no fusion into the add

    model = Net().eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close_to_scale(sk.passes.apply(copy.deepcopy(model), ["onednn"], x)(x), model(x))


def test_passes_need_inputs_when_they_specialise() -> None:
    with pytest.raises(ValueError, match="needs example_inputs"):
        sk.passes.apply(build("resnet20").eval(), ["onednn"])
    with pytest.raises(ValueError, match="unknown inference pass"):
        sk.passes.apply(build("resnet20").eval(), ["fast"])


def _snapshot(model: nn.Module) -> tuple[dict, list[bool]]:
    state = {k: (v.clone(), v.stride(), v.dtype) for k, v in model.state_dict().items()}
    return state, [m.training for m in model.modules()]


def _assert_unchanged(model: nn.Module, snapshot: tuple[dict, list[bool]], x: torch.Tensor, expected: torch.Tensor) -> None:
    state, flags = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for k, (v, stride, dtype) in state.items():
        assert torch.equal(now[k], v) and now[k].stride() == stride and now[k].dtype == dtype, k
    assert [m.training for m in model.modules()] == flags
    with torch.no_grad():
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize("passes", [("fold_bn",), ("channels_last",), ("onednn",), ("freeze",),
                                    ("fold_bn", "onednn", "conv_chain"), ("fold_bn", "channels_last", "freeze")])
@pytest.mark.parametrize("compiled", [False, True])
def test_passes_leave_the_given_model_untouched(passes: tuple[str, ...], compiled: bool) -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 32, 32)
    if compiled:
        model = sk.compile(model, random_plan(model, x, 0), x)
    with torch.no_grad():
        expected = model(x)
    snapshot = _snapshot(model)
    with torch.no_grad():
        out = sk.passes.apply(model, passes, x)(x)
        for name in passes:  # each pass function on its own, too
            args = (x,) if name == "onednn" else ()
            sk.passes.PASSES[name](model, *args)
    assert_close_to_scale(out, expected)
    _assert_unchanged(model, snapshot, x, expected)


def test_passes_modify_the_model_only_when_asked() -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 32, 32)
    gm = sk.compile(model, random_plan(model, x, 0), x)
    with torch.no_grad():
        expected = gm(x)
    folded = sk.passes.apply(gm, ["fold_bn"], inplace=True)
    assert folded is gm and not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    with torch.no_grad():
        assert_close_to_scale(gm(x), expected)


def test_compile_and_masked_leave_the_model_untouched() -> None:
    model = randomize_bn(ConcatSplitNet())
    model.bn.eval()  # mixed train/eval flags must come back as they were
    x = torch.randn(2, 3, 8, 8)
    snapshot = _snapshot(model)
    plan = random_plan(model, x, 0)
    sk.compile(model, plan, x, round_to=4, passes=("fold_bn",))
    sk.masked(model, plan, x)
    state, flags = snapshot
    assert [m.training for m in model.modules()] == flags
    for k, (v, stride, dtype) in state.items():
        assert torch.equal(model.state_dict()[k], v) and model.state_dict()[k].stride() == stride, k


def test_fold_bn_leaves_shared_layers_unfolded() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(F.relu(self.bn(self.conv(x)))))

    model = randomize_bn(Net().eval())
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_close_to_scale(sk.passes.apply(model, ["fold_bn"])(x), model(x))


def test_a_registered_pass_runs_through_apply() -> None:
    import torch.nn as nn

    from sparsekern.passes import PASSES, apply, register_pass

    def mark(model: nn.Module, *, inplace: bool) -> nn.Module:
        out = model if inplace else copy.deepcopy(model)
        out.sk_marked = True
        return out

    register_pass("mark_test", mark)
    try:
        model = nn.Linear(3, 2)
        out = apply(model, ["mark_test"])
        assert out.sk_marked and not hasattr(model, "sk_marked")
        with pytest.raises(ValueError, match="already registered"):
            register_pass("mark_test", mark)
    finally:
        del PASSES["mark_test"]
