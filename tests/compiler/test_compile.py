"""compile(model, plan) equals masked(model, plan) in eval mode, and really is smaller."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern import compiler
from sparsekern.compiler import kernel_rounding
from sparsekern.models import build
from tests.conftest import ChunkViewNet, ConcatSplitNet, assert_close_to_scale, random_plan, randomize_bn

ZOO = [
    ("resnet20", 32), ("resnet56", 32), ("resnet110", 32), ("resnet18", 64), ("resnet50", 64),
    ("vgg16_bn", 32), ("vgg19_bn", 32), ("mobilenet_v2", 32),
]


def _param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,size", ZOO)
def test_zoo_compiled_equals_masked_on_random_plans(name: str, size: int) -> None:
    model = randomize_bn(build(name, num_classes=10).eval())
    x = torch.randn(2, 3, size, size)
    for seed in range(2):
        plan = random_plan(model, x, seed)
        ref, fast = sk.masked(model, plan, x), sk.compile(model, plan, x)
        with torch.no_grad():
            assert_close_to_scale(fast(x), ref(x))
        assert _param_count(fast) < _param_count(model)


@pytest.mark.parametrize("net", [ConcatSplitNet, ChunkViewNet])
@pytest.mark.parametrize("seed", range(6))
def test_small_models_compiled_equals_masked(net: type, seed: int) -> None:
    model = randomize_bn(net().eval(), seed)
    x = torch.randn(3, 3, 8, 8)
    plan = random_plan(model, x, seed, low=0.1, high=1.0)
    with torch.no_grad():
        assert_close_to_scale(sk.compile(model, plan, x)(x), sk.masked(model, plan, x)(x))


def test_masked_zeroes_the_whole_group_and_compile_removes_it() -> None:
    model = randomize_bn(ConcatSplitNet().eval())
    x = torch.randn(2, 3, 8, 8)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[1, 9]] = False  # one per 8-wide slice of the grouped conv downstream, on both concat inputs
    plan = sk.Plan.from_channel_masks(model, {"a2_bn": keep, "side": keep}, x)  # a2_bn names the stem group
    assert list(plan.channels) == ["stem", "side"]
    ref = sk.masked(model, plan)
    seen = {}
    hooks = [getattr(ref, n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o)) for n in ("stem", "a2")]
    ref(x)
    for h in hooks:
        h.remove()
    fast = sk.compile(model, plan)
    assert fast.stem.out_channels == 14 and fast.a1.in_channels == 14 and fast.a2.out_channels == 14
    assert fast.dw.in_channels == fast.dw.groups == 28  # 14 + 14 channels through the depthwise conv
    assert fast.grouped.in_channels == 28 and fast.grouped.weight.shape[1] == 7
    # the masked reference zeroes after the op: the conv outputs themselves are dense, masked downstream
    assert seen["stem"].shape[1] == 16


def test_layernorm_statistics_ignore_pruned_channels() -> None:
    model = ChunkViewNet().eval()
    x = torch.randn(4, 3, 8, 8)
    keep = torch.zeros(32, dtype=torch.bool)
    keep[::3] = True
    plan = sk.Plan.from_channel_masks(model, {"fc1": keep}, x)
    fast = sk.compile(model, plan, x)
    assert fast.ln.normalized_shape == (int(keep.sum()),)
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, plan, x)(x))


def test_rounding_adds_the_most_important_channels() -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:5] = True
    plan = sk.Plan.from_channel_masks(model, {"layer1.0.conv1": keep}, x)
    fast = sk.compile(model, plan, x, round_to=8)
    rounded = fast.sk_plan.channels["layer1.0.conv1"]
    assert rounded.n_keep == 8 and set(range(5)) <= set(rounded.keep)
    l1 = model.layer1[0].conv1.weight.abs().sum((1, 2, 3))
    added = sorted(set(rounded.keep) - set(range(5)))
    assert added == sorted(int(i) for i in torch.argsort(l1[5:], descending=True)[:3] + 5)
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, fast.sk_plan, x)(x))


@pytest.mark.parametrize("lanes, expected", [
    (16, {1: 4, 4: 4, 5: 8, 8: 8, 9: 12, 11: 12, 13: 16, 16: 16, 17: 24, 22: 24, 25: 32, 40: 48}),
    (8, {1: 2, 2: 2, 3: 4, 4: 4, 5: 6, 7: 8, 9: 12, 13: 16}), (4, {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 7: 8})])
def test_kernel_rounding_is_whole_vectors_or_channel_groups(lanes, expected) -> None:
    assert {k: kernel_rounding(k, lanes) for k in expected} == expected


def test_auto_rounding_records_what_it_added(monkeypatch) -> None:
    monkeypatch.setattr(compiler, "vector_lanes", lambda: 16)
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    masks = {"layer1.0.conv1": torch.arange(16) < 5, "layer3.0.conv1": torch.arange(64) < 40}
    fast = sk.compile(model, sk.Plan.from_channel_masks(model, masks, x), x, round_to="auto")
    kept = {name: fast.sk_plan.channels[name].n_keep for name in masks}
    assert kept == {"layer1.0.conv1": 8, "layer3.0.conv1": 48}
    assert fast.sk_plan.meta["round_to"] == "auto" and fast.sk_plan.meta["round_added"] == {
        "layer1.0.conv1": 3, "layer3.0.conv1": 8}
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, fast.sk_plan, x)(x))
    with pytest.raises(ValueError, match="round_to must be"):
        sk.compile(model, sk.Plan.from_channel_masks(model, masks, x), x, round_to="fast")


def test_compile_leaves_the_model_untouched_and_independent() -> None:
    model = build("resnet20").eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    fast = sk.compile(model, random_plan(model, x, 0), x)
    with torch.no_grad():
        for p in fast.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inference_passes_keep_outputs() -> None:
    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 32, 32)
    plan = random_plan(model, x, 1)
    plain = sk.compile(model, plan, x)
    folded = sk.compile(model, plan, x, passes=("fold_bn", "channels_last"))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert_close_to_scale(folded(x), plain(x))
        frozen = sk.passes.apply(copy.deepcopy(folded), ["freeze"])
        assert_close_to_scale(frozen(x), plain(x))
    with pytest.raises(ValueError, match="last"):
        sk.passes.apply(copy.deepcopy(plain), ["freeze", "fold_bn"])


def test_compiled_model_exports_and_scripts() -> None:
    model = build("resnet20").eval()
    x = torch.randn(2, 3, 32, 32)
    fast = sk.compile(model, random_plan(model, x, 2), x)
    with torch.no_grad():
        expected = fast(x)
        exported = torch.export.export(fast, (x,))
        assert torch.allclose(exported.module()(x), expected, atol=1e-5)
        scripted = torch.jit.script(fast)
        assert torch.allclose(scripted(x), expected, atol=1e-5)


def test_compiled_model_trains() -> None:
    model = build("resnet20")
    x = torch.randn(4, 3, 32, 32)
    fast = sk.compile(model, random_plan(model, x, 3), x)
    assert fast.training
    loss = fast(x).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in fast.parameters())


@pytest.mark.parametrize("name,size", [("resnet56", 32), ("mobilenet_v2", 32), ("vgg16_bn", 32)])
def test_flops_agree_with_flop_counter_on_compiled_models(name: str, size: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = build(name).eval()
    x = torch.randn(2, 3, size, size)
    fast = sk.compile(model, random_plan(model, x, 4), x)
    for m in (model, fast):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m(x)
        assert sk.flops(m, x).total == counter.get_total_flops()
