"""Plan validation: wrong names, wrong lengths, empty keep-sets, conflicts, pinned channels, versions."""
from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern.models import build
from sparsekern.plan import GroupKeep, Plan, PlanError
from tests.conftest import ConcatSplitNet


@pytest.fixture
def resnet() -> tuple[torch.nn.Module, torch.Tensor]:
    return build("resnet20").eval(), torch.randn(1, 3, 32, 32)


def test_wrong_layer_name_suggests_close_names(resnet) -> None:
    model, x = resnet
    with pytest.raises(PlanError, match=r"no layer 'layer1\.0\.cnv1'.*layer1\.0\.conv1"):
        Plan.from_channel_masks(model, {"layer1.0.cnv1": torch.ones(16, dtype=torch.bool)}, x)


def test_wrong_mask_length_names_layer_and_channels(resnet) -> None:
    model, x = resnet
    with pytest.raises(PlanError, match=r"'layer1\.0\.conv1' has 10 entries but the layer has 16 output channels"):
        Plan.from_channel_masks(model, {"layer1.0.conv1": torch.ones(10, dtype=torch.bool)}, x)


def test_empty_keep_set_is_refused(resnet) -> None:
    model, x = resnet
    with pytest.raises(PlanError, match="keep-set is empty"):
        Plan.from_channel_masks(model, {"layer1.0.conv1": torch.zeros(16, dtype=torch.bool)}, x)


def test_pruning_logits_is_refused(resnet) -> None:
    model, x = resnet
    keep = torch.ones(10, dtype=torch.bool)
    keep[3] = False
    with pytest.raises(PlanError, match="channel 3 cannot be pruned because it is a model output"):
        Plan.from_channel_masks(model, {"fc": keep}, x)


def test_conflicting_masks_in_one_group(resnet) -> None:
    model, x = resnet
    a = torch.ones(16, dtype=torch.bool)
    b = torch.ones(16, dtype=torch.bool)
    a[0], b[1] = False, False
    masks = {"conv1": a, "layer1.0.conv2": b}  # both produce the stage-1 residual stream
    with pytest.raises(PlanError, match="conflicting masks in dependency group 'conv1'"):
        Plan.from_channel_masks(model, masks, x)
    union = Plan.from_channel_masks(model, masks, x, conflict="union")
    assert union.channels == {} or union.channels["conv1"].n_keep == 16
    inter = Plan.from_channel_masks(model, masks, x, conflict="intersection")
    assert inter.channels["conv1"].keep == tuple(range(2, 16))


def test_plan_for_another_model_is_refused(resnet) -> None:
    model, x = resnet
    plan = Plan(channels={"layer1.0.conv1": GroupKeep(32, tuple(range(8)))})
    with pytest.raises(PlanError, match="plan has 32 channels but the model has 16"):
        sk.compile(model, plan, x)
    plan = Plan(channels={"layer1.0.bn1": GroupKeep(16, tuple(range(8)))})
    with pytest.raises(PlanError, match="member of group 'layer1.0.conv1'"):
        sk.compile(model, plan, x)


def test_keep_indices_are_checked() -> None:
    with pytest.raises(PlanError, match="sorted and unique"):
        Plan(channels={"g": GroupKeep(4, (2, 1))}).validate()
    with pytest.raises(PlanError, match=r"lie in \[0, 4\)"):
        Plan(channels={"g": GroupKeep(4, (1, 4))}).validate()


def test_version_and_json_round_trip() -> None:
    plan = Plan(channels={"g": GroupKeep(4, (0, 2), ("a", "b"), (1.0, 0.5, 2.0, 0.1))}, meta={"method": "x"})
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    data = plan.to_dict()
    data["version"] = 99
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_dict(data)


def test_masks_need_example_inputs_or_recorded_shapes() -> None:
    model = ConcatSplitNet().eval()
    plan = Plan(channels={"a1": GroupKeep(16, tuple(range(8)))})
    with pytest.raises(PlanError, match="example_inputs are needed"):
        sk.masked(model, plan)


def test_dynamic_parts_are_not_compiled_silently(resnet) -> None:
    """A dynamic plan must name the gated layers of the model it compiles: a plain conv, a missing layer or a
    malformed spec is an error naming the layer, never a silently dense model."""
    from sparsekern.methods.sanp import to_plan, to_sanp

    model, x = resnet
    spec = {"granularity": 4, "in_from": None}
    with pytest.raises(PlanError, match="dynamic layer 'layer1.0.conv1' is a Conv2d, not a gated layer"):
        sk.compile(model, Plan(dynamic={"layer1.0.conv1": spec}), x)
    with pytest.raises(PlanError, match="dynamic layer 'layer1.0.conv1': the spec lacks"):
        sk.compile(model, Plan(dynamic={"layer1.0.conv1": {"granularity": 4}}), x)
    gated = to_sanp(model, granularity=4).eval()
    plan = to_plan(gated, x)
    with pytest.raises(PlanError, match="dynamic layer 'layer9.0.conv1' is not in the model"):
        sk.compile(gated, Plan(dynamic={**plan.dynamic, "layer9.0.conv1": spec}), x)
    del plan.dynamic["layer3.2.conv2"]
    with pytest.raises(PlanError, match=r"gated layers \['layer3.2.conv2'\] are missing from the plan"):
        sk.masked(gated, plan, x)


def test_from_keep_sets_fills_sizes_and_members(resnet) -> None:
    from sparsekern.graph import trace_channels

    model, x = resnet
    groups = trace_channels(model, x).groups
    plan = Plan.from_keep_sets(groups, {"layer2.0.conv1": [3, 1, 2]})
    g = plan.channels["layer2.0.conv1"]
    assert g.keep == (1, 2, 3) and g.size == 32 and "layer2.0.bn1" in g.members
    with pytest.raises(PlanError, match="no dependency group 'layer9.conv1'"):
        Plan.from_keep_sets(groups, {"layer9.conv1": [0]})


def test_summary_lists_every_part() -> None:
    plan = Plan(channels={"conv1": GroupKeep(8, (0, 2, 5))}, removed_blocks=("layer1.1",),
                dynamic={"features.3": {"granularity": 4, "in_from": "features.0"}},
                lowrank={"blocks.0.fc": {"rank": 64, "keep": [1, 2, 3]}})
    text = plan.summary()
    assert "conv1" in text and "3/8" in text and "layer1.1" in text
    assert "features.3" in text and "G=4" in text and "from features.0" in text
    assert "blocks.0.fc" in text and "3/64" in text


@pytest.mark.parametrize("mask,what", [
    (torch.rand(16) + 0.01, "float32 with value"),           # importance scores: would all mean "keep"
    (-torch.ones(16, dtype=torch.int64), "int64 with value -1"),
    ([float("nan")] + [1.0] * 15, "value nan"),
    (["yes"] * 8 + [""] * 8, "<U3"),
])
def test_masks_that_are_not_booleans_are_refused(resnet, mask, what: str) -> None:
    model, x = resnet
    with pytest.raises(PlanError, match=rf"mask for 'layer1\.0\.conv1' must hold booleans.*{what}.*threshold"):
        Plan.from_channel_masks(model, {"layer1.0.conv1": mask}, x)


def test_zero_one_masks_of_any_number_type_mean_keep_and_prune(resnet) -> None:
    model, x = resnet
    bools = torch.arange(16) % 3 != 0
    expected = Plan.from_channel_masks(model, {"layer1.0.conv1": bools}, x).channels
    for mask in (bools.long(), bools.float(), bools.double().numpy(), bools.int().tolist()):
        assert Plan.from_channel_masks(model, {"layer1.0.conv1": mask}, x).channels == expected


class _Rewirable(torch.nn.Module):
    """Same layer names and sizes either way; ``residual`` ties ``b`` to ``a``'s channels."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        z = self.b(y)
        return self.c(z + y if self.residual else z)


def test_plan_for_a_rewired_model_is_refused() -> None:
    x = torch.randn(1, 3, 6, 6)
    keep = torch.ones(8, dtype=torch.bool)
    keep[[2, 5]] = False
    plan = Plan.from_channel_masks(_Rewirable(True), {"a": keep}, x)
    assert set(plan.channels["a"].members) == {"a", "b"}
    with pytest.raises(PlanError, match=r"group 'a': the plan was made for a model in which the group's layers "
                                        r"are \['a', 'b'\], but in this model they are \['a'\].*build the plan on this"):
        sk.compile(_Rewirable(False), plan, x)
    sk.compile(_Rewirable(True), Plan.from_json(plan.to_json()), x)  # the same wiring still compiles


def test_resnet20_plan_on_resnet56_is_refused(resnet) -> None:
    from tests.conftest import random_plan

    model, x = resnet
    plan = random_plan(model, x, 0)
    with pytest.raises(PlanError, match=r"group 'conv1': the plan was made for a model in which.*in this model "
                                        r"only: \['layer1\.3\.bn2'"):
        sk.compile(build("resnet56").eval(), plan, x)
