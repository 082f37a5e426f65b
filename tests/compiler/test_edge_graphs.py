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
    """ShuffleNet-style: a channel shuffle in front of a depthwise conv (tied to the stem through the
    shuffle's permutation) and an F.pad in front of another (untracked input)."""

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
    assert "dw2" in plan.channels and "dw1" not in plan.channels  # dw1 belongs to the stem's group
    assert "dw1" in sk.graph.trace_channels(model, x).groups["stem"].members
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


# ----------------------------------------------------------------------------- ShuffleNetV2-style blocks
def channel_shuffle(x: torch.Tensor, groups: int, how: str) -> torch.Tensor:
    """``view(b, g, c / g, h, w)``, swap the two channel axes, merge them back (as torchvision writes it, with
    constant sizes, with ``flatten`` or with ``permute``)."""
    b, c, h, w = x.size()
    y = x.view(b, groups, c // groups, h, w)
    if how == "permute":
        return y.permute(0, 2, 1, 3, 4).reshape(b, c, h, w)
    y = torch.transpose(y, 1, 2).contiguous()
    if how == "flatten":
        return y.flatten(1, 2)
    return y.view(b, -1, h, w) if how == "view" else y.reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: stride 1 splits the channels and transforms one half; stride 2 transforms the
    whole input in two branches (each with a depthwise conv); the halves are concatenated and shuffled."""

    def __init__(self, inp: int, out: int, stride: int, how: str) -> None:
        super().__init__()
        self.stride, self.how, half = stride, how, out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                                         nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2, self.how)


class ShuffleNetLike(nn.Module):
    def __init__(self, how: str = "view", head_groups: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.stage2 = nn.Sequential(ShuffleUnit(8, 16, 2, how), ShuffleUnit(16, 16, 1, how), ShuffleUnit(16, 16, 1, how))
        self.stage3 = nn.Sequential(ShuffleUnit(16, 32, 2, how), ShuffleUnit(32, 32, 1, how))
        self.grouped = nn.Conv2d(32, 16, 1, groups=head_groups)  # 2: reads the shuffled channels in two groups
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage3(self.stage2(self.stem(x)))
        return self.fc(F.relu(self.grouped(y)).mean([2, 3]))


@pytest.mark.parametrize("how", ["view", "reshape", "flatten", "permute"])
def test_channel_shuffle_is_a_permutation_not_a_pin(how: str) -> None:
    from sparsekern.graph import trace_channels

    cg = trace_channels(ShuffleNetLike(how).eval(), torch.randn(2, 3, 16, 16))
    assert len(cg.shuffles) == 5 and not any("splits the channel axis" in r for r in cg.opaque.values())
    pinned = [g for g, spec in cg.groups.items() if spec.pinned]
    assert pinned == ["fc"]  # before: every branch output was pinned by the shuffle's view
    assert "stage2.0.branch2.5" in cg.groups  # a branch's last conv: its own group, free


@pytest.mark.parametrize("how", ["view", "reshape", "flatten", "permute"])
@pytest.mark.parametrize("seed", range(3))
def test_shufflenet_blocks_compile_exactly(how: str, seed: int) -> None:
    model, x = randomize_bn(ShuffleNetLike(how).eval(), seed), torch.randn(2, 3, 16, 16)
    plan = random_plan(model, x, seed, low=0.3, high=0.8)
    fast = _compiles_exactly(model, plan, x)
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in model.parameters())
    assert any(n.target in ("index_select", torch.index_select) for n in fast.graph.nodes)
    with torch.no_grad():  # another batch size: the gather does not depend on it
        xb = torch.randn(3, 3, 16, 16)
        assert_close_to_scale(fast(xb), sk.masked(model, fast.sk_plan, x)(xb))


def test_grouped_conv_after_a_shuffle_keeps_equal_counts() -> None:
    model, x = randomize_bn(ShuffleNetLike(head_groups=2).eval()), torch.randn(2, 3, 16, 16)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 1, 2]] = False
    # stage3.1's branch channels j land on the odd positions 2j + 1: 0, 1, 2 all in the first input group
    with pytest.raises(PlanError, match=r"grouped conv input of 'grouped' \(groups=2\).*got \[13, 16\]"):
        sk.Plan.from_channel_masks(model, {"stage3.1.branch2.5": keep}, x)
    keep = torch.ones(16, dtype=torch.bool)
    keep[[0, 8]] = False  # one in each group
    fast = _compiles_exactly(model, sk.Plan.from_channel_masks(model, {"stage3.1.branch2.5": keep}, x), x)
    assert fast.grouped.in_channels == 30 and fast.grouped.groups == 2


class SplitNotShuffle(nn.Module):
    """A view that splits the channel axis, then a transpose, then a reshape that does not merge it back."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 8, 1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.p(x).view(x.size(0), 2, 4, 4, 4).transpose(1, 2).contiguous()
        return self.fc(y.reshape(x.size(0), -1))


def test_split_that_is_not_a_shuffle_is_pinned() -> None:
    model, x = SplitNotShuffle().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(PlanError, match=r"group 'p'.*cannot be pruned because it reaches 'view'"):
        sk.Plan.from_channel_masks(model, {"p": [1, 0, 1, 1, 1, 1, 1, 1]}, x)


# ----------------------------------------------------------------------------- ConvNeXt-style blocks
class Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7, channels-last LayerNorm, 4x Linear MLP with GELU, a layer scale, a residual add."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute(0, 2, 3, 1),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute(0, 3, 1, 2))
        self.layer_scale = nn.Parameter(torch.linspace(0.2, 1.0, dim).reshape(dim, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer_scale * self.block(x)
        y += x
        return y


class ConvNeXtLike(nn.Module):
    def __init__(self, shared_scale: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.stage1 = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        if shared_scale:  # one parameter read by two blocks: slicing it once would not fit both reads
            self.stage1[1].layer_scale = self.stage1[0].layer_scale
        self.down = nn.Conv2d(8, 16, 2, 2)
        self.stage2 = ConvNeXtBlock(16)
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(self.norm(y.mean([2, 3])))


@pytest.mark.parametrize("seed", range(4))
def test_convnext_blocks_compile_exactly(seed: int) -> None:
    model, x = randomize_bn(ConvNeXtLike().eval(), seed), torch.randn(2, 3, 16, 16)
    plan = random_plan(model, x, seed, low=0.3, high=0.8)
    assert {"stem", "down", "stage1.0.block.3"} <= set(plan.channels)  # the residual streams are free
    fast = _compiles_exactly(model, plan, x)
    k = plan.channels["stem"].n_keep
    assert fast.get_submodule("stage1.0").layer_scale.shape == (k, 1, 1)
    assert fast.get_submodule("stage1.0.block.0").groups == k
    assert fast.norm.normalized_shape == (plan.channels["down"].n_keep,)


def test_layer_scale_is_sliced_not_pinned() -> None:
    from sparsekern.graph import trace_channels

    cg = trace_channels(ConvNeXtLike().eval(), torch.randn(1, 3, 16, 16))
    assert not cg.groups["stem"].pinned and not cg.groups["down"].pinned  # before: pinned at the multiply
    assert sorted(a.target for a in cg.sliced_attrs.values()) == [
        "stage1.0.layer_scale", "stage1.1.layer_scale", "stage2.layer_scale"]


def test_shared_layer_scale_stays_whole() -> None:
    model, x = ConvNeXtLike(shared_scale=True).eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(PlanError, match=r"group 'stem'.*combined with an untracked tensor"):
        sk.Plan.from_channel_masks(model, {"stem": [1, 0, 1, 1, 1, 1, 1, 1]}, x)
    plan = random_plan(model, x, 0)
    assert "stem" not in plan.channels and "down" in plan.channels
    _compiles_exactly(model, plan, x)
