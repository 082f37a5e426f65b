"""Depth pruning: removed residual blocks compile to their shortcut and equal the zero-branch reference,
together with channel keep-sets named after the model without those blocks."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from sparsekern.methods.budget import plan_flops

import sparsekern as sk
from sparsekern import depth
from sparsekern.models import BasicBlock, build
from sparsekern.plan import GroupKeep, Plan, PlanError
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules())


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    return randomize_bn(build("resnet20").eval())


@pytest.mark.parametrize(
    "blocks",
    [("layer1.1", "layer3.2"), ("layer1.0", "layer1.1", "layer1.2", "layer2.2"), ("layer2.0", "layer3.1")],
)
def test_removed_blocks_with_channel_keep_sets_compile_to_their_reference(resnet20: nn.Module, blocks: tuple) -> None:
    x = torch.randn(2, 3, 16, 16)
    removed = depth.remove_blocks(resnet20, blocks)
    for seed in range(2):
        plan = dataclasses.replace(random_plan(removed, x, seed), removed_blocks=blocks)
        fast, ref = sk.compile(resnet20, plan, x), sk.masked(resnet20, plan, x)
        with torch.no_grad():
            assert_close_to_scale(fast(x), ref(x))
        assert _convs(fast) == _convs(resnet20) - 2 * len(blocks)
        assert not any(n.startswith(f"{b}.conv") for b in blocks for n, _ in fast.named_modules())
        dense, pruned = sk.flops(resnet20, x), sk.flops(fast, x)
        # the FLOPs of a plan with removed blocks are those of its channel part on the model without them
        assert pruned.total == plan_flops(depth.channel_graph(resnet20, blocks, x), sk.flops(removed, x), plan)
        assert pruned.total < sk.flops(removed, x).total < dense.total
    if "layer2.0" in blocks:  # the stage's residual group is named after the first producer left
        assert "layer2.0.downsample.0" in plan.channels and "layer2.0.conv2" not in plan.channels


def test_removal_equals_a_zeroed_residual_branch(resnet20: nn.Module) -> None:
    """Independent reference: a block whose last BN has zero scale and shift has a zero residual branch."""
    blocks = ("layer1.1", "layer2.0", "layer3.2")
    zeroed = copy.deepcopy(resnet20)
    for b in blocks:
        bn = zeroed.get_submodule(f"{b}.bn2")
        nn.init.zeros_(bn.weight)
        nn.init.zeros_(bn.bias)
    x = torch.randn(3, 3, 16, 16)
    removed, zero = depth.remove_blocks(resnet20, blocks), depth.zero_branches(resnet20, blocks)
    with torch.no_grad():
        want = zeroed(x)
        assert torch.allclose(removed(x), want, atol=1e-6) and torch.allclose(zero(x), want, atol=1e-6)
        assert not torch.allclose(resnet20(x), want, atol=1e-3)
    # identity shortcut fed by a ReLU output: nothing left; projection shortcut: conv, BN and the post-add ReLU
    assert isinstance(removed.get_submodule("layer1.1"), nn.Identity)
    assert isinstance(removed.get_submodule("layer3.2"), nn.Identity)
    kept = {k for k in removed.state_dict() if k.startswith("layer2.0.")}
    assert kept == {k for k in resnet20.state_dict() if k.startswith("layer2.0.downsample.")}
    assert isinstance(removed.get_submodule("layer2.0.relu"), nn.ReLU)
    assert set(zero.state_dict()) == set(resnet20.state_dict())  # the reference keeps every layer
    assert depth.analyse_block(resnet20, "layer2.0") == depth.ResidualBlock("layer2.0", "downsample", ("relu",), True)


class _NegativeInputNet(nn.Module):
    """A basic block whose input comes straight out of a BN (can be negative): its ReLU is not a no-op."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = BasicBlock(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(self.bn(self.stem(x)))
        return self.head(y.mean((2, 3)))


def test_post_add_activation_is_kept_unless_it_is_a_no_op() -> None:
    model = randomize_bn(_NegativeInputNet().eval())
    x = torch.randn(4, 3, 6, 6)
    removed = depth.remove_blocks(model, ["block"])
    assert not isinstance(removed.block, nn.Identity)
    keep = torch.tensor([True, False] * 4)
    plan = dataclasses.replace(Plan.from_channel_masks(removed, {"stem": keep}, x), removed_blocks=("block",))
    with torch.no_grad():
        assert torch.allclose(removed(x), depth.zero_branches(model, ["block"])(x), atol=1e-6)
        assert_close_to_scale(sk.compile(model, plan, x)(x), sk.masked(model, plan, x)(x))
        assert (model.bn(model.stem(x)) < 0).any()  # dropping the ReLU here would change the output
    # MobileNetV2: inverted residuals have no post-add activation and vanish entirely
    mnet = randomize_bn(build("mobilenet_v2", num_classes=10).eval())
    assert depth.residual_blocks(mnet)[:3] == ["features.3", "features.5", "features.6"]
    xm = torch.randn(1, 3, 32, 32)
    plan = Plan(removed_blocks=("features.3", "features.13"), meta={"inputs": [{"shape": [1, 3, 32, 32], "dtype": "float32"}]})
    fast = sk.compile(mnet, plan)
    assert isinstance(fast.get_submodule("features.3"), nn.Identity) and _convs(fast) == _convs(mnet) - 6
    with torch.no_grad():
        assert_close_to_scale(fast(xm), sk.masked(mnet, plan)(xm))


def test_bad_block_names_are_named(resnet20: nn.Module) -> None:
    x = torch.randn(1, 3, 16, 16)
    cases = [
        (("layer1.7",), r"no module 'layer1.7' to remove; closest residual blocks: \['layer1.0', 'layer1.1', 'layer1.2'\]"),
        (("layer1.0.conv1",), r"'layer1.0.conv1' \(Conv2d\) cannot be removed as a residual block"),
        (("layer2",), r"'layer2' \(Sequential\).*container.*residual blocks inside: \['layer2.0'"),
        (("layer1.1", "layer1.1"), "listed twice"),
        (("layer1.1", "layer1.1.conv1"), "inside removed block 'layer1.1'"),
    ]
    for blocks, message in cases:
        with pytest.raises(PlanError, match=message):
            sk.compile(resnet20, Plan(removed_blocks=blocks), x)
        with pytest.raises(PlanError, match=message):
            sk.masked(resnet20, Plan(removed_blocks=blocks), x)
    with pytest.raises(PlanError, match="features.2.*cannot be removed"):  # stride-2 block: no shortcut
        depth.remove_blocks(build("mobilenet_v2"), ["features.2"])
    # a channel group inside a removed block does not exist in the model the keep-sets refer to
    inner = Plan(channels={"layer1.1.conv1": GroupKeep(16, tuple(range(8)))}, removed_blocks=("layer1.1",))
    with pytest.raises(PlanError, match="no dependency group 'layer1.1.conv1'"):
        sk.compile(resnet20, inner, x)


def test_plan_and_compiled_model_with_removed_blocks_round_trip(resnet20: nn.Module, tmp_path) -> None:
    x = torch.randn(2, 3, 16, 16)
    blocks = ("layer1.2", "layer3.1")
    plan = dataclasses.replace(random_plan(depth.remove_blocks(resnet20, blocks), x, 0), removed_blocks=blocks)
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.removed_blocks == blocks
    fast = sk.compile(resnet20, again, x)
    sk.save(fast, tmp_path / "m.sk")
    loaded = sk.load(tmp_path / "m.sk")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
    assert loaded.sk_plan.removed_blocks == blocks
