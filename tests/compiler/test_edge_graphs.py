"""Graphs and plans at the edges of what compiles: grouped convs on untracked inputs, plans that would empty a
tensor, sizes given as a shape object, layers called twice, rounding under per-group constraints, half
precision, and passes run by compile. Each either compiles exactly or is refused naming the layer."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.plan import GroupKeep, Plan, PlanError
from tests.conftest import assert_close_to_scale, random_plan, randomize_bn


def _compiles_exactly(model: nn.Module, plan: Plan, x: torch.Tensor, **options) -> nn.Module:
    fast = sk.compile(model, plan, x, **options)
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, fast.sk_plan, x)(x))
    return fast


# ----------------------------------------------------------------------------- depthwise on untracked inputs
class DepthwiseOnInput(nn.Module):
    def __init__(self, multiplier: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(2, 2 * multiplier, 3, padding=1, groups=2)
        self.fc = nn.Linear(2 * multiplier, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dw(x).mean((2, 3)))


def test_depthwise_multiplier_2_on_untracked_input_keeps_equal_counts_per_group() -> None:
    model, x = DepthwiseOnInput(2).eval(), torch.randn(2, 2, 5, 5)
    with pytest.raises(PlanError, match=r"grouped conv 'dw' \(groups=2\).*got \[2, 0\]"):
        sk.Plan.from_channel_masks(model, {"dw": [1, 1, 0, 0]}, x)  # both outputs of input channel 0
    fast = _compiles_exactly(model, sk.Plan.from_channel_masks(model, {"dw": [1, 0, 0, 1]}, x), x)
    assert fast.dw.weight.shape == (2, 1, 3, 3) and fast.dw.groups == 2


def test_depthwise_multiplier_1_on_untracked_input_is_pinned() -> None:
    model, x = DepthwiseOnInput(1).eval(), torch.randn(2, 2, 5, 5)
    with pytest.raises(PlanError, match=r"channel 1 cannot be pruned because depthwise conv 'dw' reads input "
                                        r"channels that are not tracked"):
        sk.Plan.from_channel_masks(model, {"dw": [1, 0]}, x)


class ShuffleAndPad(nn.Module):
    """ShuffleNet-style: a channel shuffle and an F.pad in front of depthwise convs (untracked inputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.dw1 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.dw2 = nn.Conv2d(8, 16, 3, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        n, c, h, w = y.size(0), 8, y.size(2), y.size(3)
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        y = F.relu(self.dw1(y))
        y = self.bn(self.dw2(F.pad(y, (1, 1, 1, 1))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("seed", range(4))
def test_depthwise_after_shuffle_and_pad_compiles_exactly(seed: int) -> None:
    model, x = randomize_bn(ShuffleAndPad().eval(), seed), torch.randn(2, 3, 6, 6)
    plan = random_plan(model, x, seed, low=0.3, high=0.8)
    assert "dw2" in plan.channels and "dw1" not in plan.channels  # dw1 (multiplier 1) is pinned
    fast = _compiles_exactly(model, plan, x)
    assert fast.dw2.groups == 8 and fast.dw2.out_channels == plan.channels["dw2"].n_keep


# ----------------------------------------------------------------------------- plans that empty a tensor
class ChunkThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(2, 3, 1)
        self.d = nn.Conv2d(2, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.p(x).chunk(2, 1)
        return self.d(a) + self.c(b)


def test_plan_that_empties_a_chunk_piece_is_refused_naming_the_layer() -> None:
    model, x = ChunkThenConv().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(PlanError, match=r"every one of the 2 channels of piece 1 of 'chunk'.*'p' channels \[2, 3\].*"
                                        r"read by \['c'\].*Keep at least one channel"):
        sk.Plan.from_channel_masks(model, {"p": [True, True, False, False]}, x)
    plan = Plan(channels={"p": GroupKeep(4, (0, 1), ("p",))})
    with pytest.raises(PlanError, match="piece 1 of 'chunk'"):
        sk.compile(model, plan, x)
    _compiles_exactly(model, sk.Plan.from_channel_masks(model, {"p": [True, False, False, True]}, x), x)


class TwoProducersOneGroup(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 1)
        self.b = nn.Conv2d(3, 2, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + self.c(x))


def test_plan_that_prunes_one_producers_whole_share_is_refused() -> None:
    model, x = TwoProducersOneGroup().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(PlanError, match=r"every one of the 2 channels of layer 'a' \(Conv2d\)"):
        sk.Plan.from_channel_masks(model, {"c": [False, False, True, True]}, x)
    _compiles_exactly(model, sk.Plan.from_channel_masks(model, {"c": [False, True, False, True]}, x), x)


# ----------------------------------------------------------------------------- shape objects as view sizes
class ViewByShape(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.p = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.p(x))
        if self.how == "view":
            y = y.view(y.shape)
        elif self.how == "reshape":
            y = y.reshape(y.size())
        elif self.how == "function":
            y = torch.reshape(y, y.shape)
        else:
            y = y.view(y.size(0), y.size(1), y.size(2), y.size(3))
        return self.c(y)


@pytest.mark.parametrize("how", ["view", "reshape", "function", "sizes"])
def test_view_with_a_shape_object_is_rewritten(how: str) -> None:
    model, x = ViewByShape(how).eval(), torch.randn(2, 3, 4, 4)
    plan = sk.Plan.from_channel_masks(model, {"p": [1, 0, 1, 1, 0, 1]}, x)
    fast = _compiles_exactly(model, plan, x)
    assert fast.p.out_channels == fast.c.in_channels == 4
    with torch.no_grad():
        xb = torch.randn(5, 3, 4, 4)  # other batch sizes: only the channel size is fixed
        assert_close_to_scale(torch.jit.script(fast)(xb), fast(xb))


# ----------------------------------------------------------------------------- shared layers
class SharedLayers(nn.Module):
    """``conv`` and ``bn`` are each called twice: on the stem's output and on their own output."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.side = nn.Conv2d(3, 6, 1)
        self.shared_fc = nn.Linear(6, 6)
        self.head = nn.Linear(8 + 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(self.stem(x))))
        y = self.bn(self.conv(y))
        z = self.side(x).mean((2, 3))
        z = self.shared_fc(F.relu(self.shared_fc(z)))
        return self.head(torch.cat([y.mean((2, 3)), z], 1))


@pytest.mark.parametrize("seed", range(4))
def test_shared_layers_compile_exactly(seed: int) -> None:
    model, x = randomize_bn(SharedLayers().eval(), seed), torch.randn(2, 3, 5, 5)
    plan = random_plan(model, x, seed, low=0.3, high=0.8)
    fast = _compiles_exactly(model, plan, x)
    stem = plan.channels["stem"]
    assert fast.conv.weight.shape[:2] == (stem.n_keep, stem.n_keep) and fast.bn.num_features == stem.n_keep


def test_shared_layer_couples_its_call_sites() -> None:
    from sparsekern.graph import trace_channels

    cg = trace_channels(SharedLayers().eval(), torch.randn(1, 3, 5, 5))
    assert {"stem", "conv", "bn"} <= set(cg.groups["stem"].members)  # conv reads its own output
    assert {"side", "shared_fc"} <= set(cg.groups["side"].members)


def test_layer_shared_between_tracked_and_untracked_inputs_stays_whole() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(3, 3, 1)
            self.shared = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shared(x) + self.shared(self.p(x))

    model, x = Net().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(PlanError, match=r"group 'p'.*module 'shared' is called more than once"):
        sk.Plan.from_channel_masks(model, {"p": [1, 0, 1]}, x)


# ----------------------------------------------------------------------------- rounding
class GroupedAndGroupNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.q = nn.Conv2d(3, 12, 1)
        self.gn = nn.GroupNorm(3, 12)
        self.head = nn.Conv2d(20, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.grouped(F.relu(self.p(x))), self.gn(self.q(x))], 1))


def test_rounding_keeps_per_group_counts_equal() -> None:
    model, x = randomize_bn(GroupedAndGroupNorm().eval()), torch.randn(2, 3, 5, 5)
    keep_p = torch.zeros(8, dtype=torch.bool)
    keep_p[[0, 4]] = True  # one per slice of the grouped conv's two 4-channel groups
    keep_q = torch.zeros(12, dtype=torch.bool)
    keep_q[[1, 5, 9]] = True  # one per 4-channel GroupNorm group
    plan = sk.Plan.from_channel_masks(model, {"p": keep_p, "q": keep_q}, x)
    for multiple in (3, 4, 5):
        fast = _compiles_exactly(model, plan, x, round_to=multiple)
        rounded = fast.sk_plan.channels
        assert set(plan.channels["p"].keep) <= set(rounded["p"].keep)
        p_kept = [sum(1 for c in rounded["p"].keep if c // 4 == s) for s in range(2)]
        q_kept = [sum(1 for c in rounded["q"].keep if c // 4 == s) for s in range(3)]
        assert len(set(p_kept)) == 1 and len(set(q_kept)) == 1
        for g in rounded.values():
            assert g.n_keep % multiple == 0 or g.n_keep == g.size


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_and_compiled_keep_half_precision(dtype: torch.dtype) -> None:
    from tests.conftest import ConcatSplitNet

    model = randomize_bn(ConcatSplitNet().eval())
    x = torch.randn(2, 3, 8, 8)
    plan = random_plan(model, x, 0)
    half, xh = copy.deepcopy(model).to(dtype), x.to(dtype)
    with torch.no_grad():
        ref = sk.masked(half, plan, xh)(xh)
        out = sk.compile(half, plan, xh)(xh)
        full = sk.masked(model, plan, x)(x)
    assert ref.dtype == out.dtype == dtype
    assert_close_to_scale(ref.float(), full, tol=5e-2)
    assert_close_to_scale(out.float(), ref.float(), tol=5e-2)


# ----------------------------------------------------------------------------- passes run by compile
@pytest.mark.parametrize("passes", [("fold_bn", "onednn"), ("fold_bn", "freeze"), ("onednn",)])
def test_compile_hands_its_inputs_to_the_passes(passes: tuple[str, ...]) -> None:
    from sparsekern.models import build

    model = randomize_bn(build("resnet20").eval())
    x = torch.randn(2, 3, 32, 32)
    plan = random_plan(model, x, 0)
    fast = sk.compile(model, plan, x, passes=passes)
    assert fast.sk_compile["passes"] == list(passes) and fast.sk_plan is plan
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.compile(model, plan, x)(x))
