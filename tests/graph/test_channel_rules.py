"""The public table of channel rules: custom layers taught to the graph from outside the package."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.channel_rules import channel_rule, node_has_tag
from sparsekern.graph import (
    ChannelRule,
    channel_rule_scope,
    elementwise,
    register_channel_rule,
    trace_channels,
    unregister_channel_rule,
)
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn


class ChannelScale(nn.Module):
    """``relu(x) * scale[c]``: a learnable per-channel scale on dim 1 that the graph does not know."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) * self.scale.view(1, -1, 1, 1)


def slice_channel_scale(m: ChannelScale, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    if out_keep is not None:
        m.scale = nn.Parameter(m.scale.data[out_keep].clone(), requires_grad=m.scale.requires_grad)


SCALE_RULE = ChannelRule(layout=elementwise, slice=slice_channel_scale)


class Mixer(nn.Module):
    """A 1x1 channel mixer written with einsum (``weight`` is (out, in)): a channel-producing layer."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,nchw->nohw", self.weight, x)


def mixer_layout(ctx, node, value):
    x = ctx.lay(node.args[0])
    if x is not None and x.cdim != 1:
        return ctx.opaque(node, "Mixer input whose channel axis is not dim 1")
    return ctx.produce(node, ctx.module_of(node).weight.shape[0], 1)


def slice_mixer(m: Mixer, in_keep: torch.Tensor | None, out_keep: torch.Tensor | None) -> None:
    w = m.weight.data
    if out_keep is not None:
        w = w[out_keep]
    if in_keep is not None:
        w = w[:, in_keep]
    m.weight = nn.Parameter(w.clone(), requires_grad=m.weight.requires_grad)


MIXER_RULE = ChannelRule(layout=mixer_layout, slice=slice_mixer)


class ScaleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.s1 = ChannelScale(8)
        self.mix = Mixer(8, 12)
        self.s2 = ChannelScale(12)
        self.conv2 = nn.Conv2d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.s1(self.bn1(self.conv1(x)))
        y = self.conv2(self.s2(self.mix(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 2), 1))


@pytest.fixture
def net() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return randomize_bn(ScaleNet()).eval(), torch.randn(2, 3, 8, 8)


def test_unknown_layers_pin_their_channels(net) -> None:
    model, x = net
    cg = trace_channels(model, x)
    conv1 = cg.groups["conv1"]
    assert set(conv1.pinned) == set(range(8))
    assert "untracked" in conv1.pinned[0]
    assert "mix" not in cg.groups  # einsum is not understood: the mixer's output is untracked


def test_registered_rules_make_a_plan_compile_exactly(net) -> None:
    model, x = net
    with channel_rule_scope(ChannelScale, SCALE_RULE), channel_rule_scope(Mixer, MIXER_RULE):
        cg = trace_channels(model, x)
        assert not cg.groups["conv1"].pinned and not cg.groups["mix"].pinned
        assert {"conv1", "bn1", "s1"} <= set(cg.groups["conv1"].members)
        assert "s2" in cg.groups["mix"].members
        for seed in range(3):
            plan = random_plan(model, x, seed)
            assert set(plan.channels) >= {"conv1", "mix"}
            fast = sk.compile(model, plan, x)
            assert_close_to_scale(fast(x), sk.masked(model, plan, x)(x))
            assert fast.s1.scale.shape[0] == plan.channels["conv1"].n_keep
            assert fast.mix.weight.shape == (plan.channels["mix"].n_keep, plan.channels["conv1"].n_keep)
    assert channel_rule(ChannelScale) is None and channel_rule(Mixer) is None  # the scope leaves no trace
    assert set(trace_channels(model, x).groups["conv1"].pinned) == set(range(8))


def test_register_and_unregister() -> None:
    assert register_channel_rule(ChannelScale, elementwise) is None  # a bare layout function is a rule
    try:
        assert channel_rule(ChannelScale) == ChannelRule(layout=elementwise)
        assert register_channel_rule(ChannelScale, SCALE_RULE) == ChannelRule(layout=elementwise)
    finally:
        assert unregister_channel_rule(ChannelScale) is SCALE_RULE
    assert channel_rule(ChannelScale) is None and unregister_channel_rule(ChannelScale) is None
    with pytest.raises(ValueError, match="unknown channel-rule tags"):
        ChannelRule(tags={"elementwise"})
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_channel_rule(int, elementwise)


def test_builtin_rules_live_in_the_same_table() -> None:
    assert channel_rule(nn.ReLU).layout is elementwise
    assert {"relu", "activation", "nonneg", "identity_on_nonneg"} <= channel_rule(F.relu).tags
    assert "weights" in channel_rule(nn.modules.conv._ConvNd).tags
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    x = torch.randn(1, 3, 4, 4)
    assert not trace_channels(model, x).groups["0"].pinned
    gm = torch.fx.symbolic_trace(model)
    relu = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    assert node_has_tag(relu, dict(gm.named_modules()), "relu")
    # replacing a built-in rule changes what the graph does: a rule without layout is "not understood"
    with channel_rule_scope(nn.ReLU, ChannelRule()):
        cg = trace_channels(model, x)
        assert set(cg.groups["0"].pinned) == set(range(4)) and "ReLU is not sliceable" in cg.opaque["_1"]
    assert not trace_channels(model, x).groups["0"].pinned
