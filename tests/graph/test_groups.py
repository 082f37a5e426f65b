"""Dependency groups found by sparsekern.graph on small models and the zoo."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sparsekern.graph import GraphError, trace_channels
from sparsekern.models import build
from tests.conftest import ChunkViewNet, ConcatSplitNet


def test_residual_chain_ties_block_outputs_to_the_stem() -> None:
    cg = trace_channels(ConcatSplitNet().eval(), torch.randn(2, 3, 8, 8))
    stem = cg.groups["stem"]
    assert {"stem", "bn", "a2", "a2_bn"} <= set(stem.members)
    assert cg.groups["a1"].members == ("a1", "a1_bn")
    assert cg.groups["side"].size == 16


def test_logits_are_pinned_and_input_is_untracked() -> None:
    cg = trace_channels(ConcatSplitNet().eval(), torch.randn(2, 3, 8, 8))
    assert set(cg.groups["fc"].pinned) == set(range(10))
    assert "model output" in cg.groups["fc"].pinned[0]
    assert not any(name.startswith("x") for name in cg.groups)


def test_resnet56_groups_match_the_architecture() -> None:
    cg = trace_channels(build("resnet56").eval(), torch.randn(1, 3, 32, 32))
    # one group per block-internal conv (27), one per stage residual stream (3), plus the logits
    internal = [g for g in cg.groups if g.endswith(".conv1") and g.startswith("layer")]
    assert len(internal) == 27
    assert cg.groups["conv1"].size == 16 and "layer1.8.conv2" in cg.groups["conv1"].members
    streams = [g for g, s in cg.groups.items() if any(m.endswith("downsample.0") for m in s.members)]
    assert sorted(cg.groups[g].size for g in streams) == [32, 64]
    assert len(cg.groups) == 27 + 3 + 1


def test_mobilenet_depthwise_is_tied_to_its_expansion() -> None:
    cg = trace_channels(build("mobilenet_v2").eval(), torch.randn(1, 3, 32, 32))
    group = cg.group_of("features.2.conv.1.0")  # the depthwise conv of the second block
    assert group == ["features.2.conv.0.0"]


def test_chunk_and_view_layouts() -> None:
    cg = trace_channels(ChunkViewNet().eval(), torch.randn(2, 3, 8, 8))
    assert cg.groups["conv"].size == 24
    assert "dw" in cg.groups["conv"].members  # multiplier-2 depthwise follows the second half of conv
    assert not cg.opaque


def test_channel_reduction_pins_its_input() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.head(y - y.mean(dim=1, keepdim=True))

    cg = trace_channels(Net().eval(), torch.randn(1, 3, 8, 8))
    assert set(cg.groups["conv"].pinned) == set(range(8))
    assert "reduces over the channel axis" in cg.groups["conv"].pinned[0]


def test_untraceable_model_names_the_module() -> None:
    class Gate(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.gate = Gate()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(self.conv(x))

    with pytest.raises(GraphError, match=r"inside module 'gate'.*leaf_modules"):
        trace_channels(Net(), torch.randn(1, 3, 4, 4))
    # marking it a leaf keeps it dense and opaque instead
    cg = trace_channels(Net(), torch.randn(1, 3, 4, 4), leaf_modules=(Gate,))
    assert cg.groups["conv"].pinned


def test_consumers_map_input_positions_to_group_channels() -> None:
    cg = trace_channels(ConcatSplitNet().eval(), torch.randn(2, 3, 8, 8))
    cons = cg.consumers("a1")
    assert list(cons) == ["a2"] and cons["a2"].tolist() == list(range(16))
    side = cg.consumers("side")
    # side's channels reach the depthwise conv at offset 16 of the concat, then the grouped conv after the
    # split/swap at offset 0
    assert side["dw"].tolist() == [-1] * 16 + list(range(16))
    assert side["grouped"].tolist() == list(range(16)) + [-1] * 16
    fc = cg.consumers("grouped")["fc"]
    assert fc.shape == (256,) and fc[:16].tolist() == [0] * 16 and fc[-1] == 15


class Shuffle(nn.Module):
    """conv -> channel shuffle (3 groups of 2) -> conv."""

    def __init__(self) -> None:
        super().__init__()
        self.p = nn.Conv2d(3, 6, 1)
        self.c = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.p(x)
        return self.c(y.view(y.size(0), 3, 2, 4, 4).transpose(1, 2).reshape(y.size(0), 6, 4, 4))


def test_channel_shuffle_permutes_the_channels() -> None:
    cg = trace_channels(Shuffle().eval(), torch.randn(2, 3, 4, 4))
    (shuffle,) = cg.shuffles.values()
    assert shuffle.source.tolist() == [0, 2, 4, 1, 3, 5] and shuffle.dim == 1
    assert not cg.groups["p"].pinned  # before: "reshape ... mixes the channel axis"
    assert cg.consumers("p")["c"].tolist() == [0, 2, 4, 1, 3, 5]


def test_torch_prune_is_removed_on_a_copy() -> None:
    from torch.nn.utils import prune

    from sparsekern.masks import has_torch_prune, remove_torch_prune, torch_prune_masks

    model = Shuffle().eval()
    prune.ln_structured(model.p, "weight", amount=0.5, n=1, dim=0)
    masks = torch_prune_masks(model)
    assert list(masks) == ["p"] and masks["p"].shape == (6, 3, 1, 1)
    baked = remove_torch_prune(model)
    assert has_torch_prune(model) and not has_torch_prune(baked)
    assert torch.equal(baked.p.weight, model.p.weight) and "p.weight_orig" in model.state_dict()
