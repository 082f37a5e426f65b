"""Plan validation: wrong names, wrong lengths, empty keep-sets, conflicts, pinned channels, versions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsekern as sk
from sparsekern.models import build
from sparsekern.plan import DynamicLayer, GroupKeep, LowRankKeep, Plan, PlanError
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


# ----------------------------------------------------------------------------- typed dynamic and low-rank parts
GATED = {"granularity": 4, "in_from": None, "relu": True, "in_channels": 16, "out_channels": 16,
         "kernel_size": [3, 3], "stride": [1, 1], "gate": {"kind": "spm", "hidden": 16, "logits": 4}}
CONSUMER = {"granularity": None, "in_from": "a", "relu": False, "in_channels": 16, "out_channels": 16,
            "kernel_size": [3, 3], "stride": [1, 1], "gate": None}
LOWRANK = {"in": 32, "out": 128, "rank": 25, "keep": [0, 3, 7], "scale": [0.5, 1.0, 0.25]}


def _plan_dict(**parts: dict) -> dict:
    return {"format": "sparsekern.plan", "version": 1, "channels": {}, "removed_blocks": [], "dynamic": {},
            "lowrank": {}, "meta": {}, **parts}


def test_typed_parts_round_trip_in_the_json_format() -> None:
    data = _plan_dict(dynamic={"a": GATED, "b": CONSUMER}, lowrank={"fc": LOWRANK})
    plan = Plan.from_dict(data)
    a, fc = plan.dynamic["a"], plan.lowrank["fc"]
    assert isinstance(a, DynamicLayer) and a.granularity == 4 and a.kernel_size == (3, 3) and a.stride == (1, 1)
    assert a.gate == {"kind": "spm", "hidden": 16, "logits": 4} and not plan.dynamic["b"].gated
    assert isinstance(fc, LowRankKeep) and fc.keep == (0, 3, 7) and fc.rank == 25 and fc.in_features == 32
    assert plan.to_dict() == data and json.loads(plan.to_json()) == data
    # entries read like their JSON form, so code written for plain dicts keeps working
    assert a["kernel_size"] == [3, 3] and a == GATED and fc["keep"] == [0, 3, 7] and fc == LOWRANK
    assert Plan.from_json(plan.to_json()).dynamic == plan.dynamic


def test_entries_given_as_dicts_are_parsed_when_validated() -> None:
    plan = Plan(dynamic={"a": {"granularity": 2, "in_from": None}}, lowrank={"fc": {"keep": [1]}})
    assert plan.dynamic_layers() == {"a": DynamicLayer(2, None)}
    assert plan.lowrank_layers()["fc"] == LowRankKeep((1,))
    assert plan.to_dict()["lowrank"]["fc"] == {"in": None, "out": None, "rank": None, "keep": [1], "scale": None}
    assert Plan.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


@pytest.mark.parametrize("part,entry,match", [
    ("dynamic", {**GATED, "gates": 3}, r"dynamic layer 'a': unknown key 'gates'"),
    ("dynamic", {"granularity": 4}, r"dynamic layer 'a': the spec lacks \['in_from'\]"),
    ("dynamic", {**GATED, "granularity": "4"}, "dynamic layer 'a': granularity must be a positive int"),
    ("dynamic", {**GATED, "granularity": True}, "dynamic layer 'a': granularity must be a positive int"),
    ("dynamic", {**GATED, "in_from": 3}, "dynamic layer 'a': in_from must be a layer name"),
    ("dynamic", {**GATED, "relu": 1}, "dynamic layer 'a': relu must be true, false or null"),
    ("dynamic", {**GATED, "out_channels": 16.0}, "dynamic layer 'a': out_channels must be a positive int"),
    ("dynamic", {**GATED, "kernel_size": 3}, "dynamic layer 'a': kernel_size must be a list of positive ints"),
    ("dynamic", {**GATED, "stride": [1, "1"]}, "dynamic layer 'a': stride must be a list of positive ints"),
    ("dynamic", {**GATED, "gate": "spm"}, "dynamic layer 'a': gate must be a JSON object"),
    ("dynamic", [4, None], "dynamic layer 'a': the spec must be a mapping"),
    ("lowrank", {**LOWRANK, "ranks": 3}, r"plan.lowrank\['a'\]: unknown key 'ranks'"),
    ("lowrank", {"rank": 4}, r"plan.lowrank\['a'\] must be a dict with 'keep'"),
    ("lowrank", {**LOWRANK, "keep": [0, 3.0, 7]}, r"plan.lowrank\['a'\]: 'keep' must be a list of ints"),
    ("lowrank", {**LOWRANK, "keep": [3, 0, 7]}, r"plan.lowrank\['a'\]: 'keep' must be sorted and unique"),
    ("lowrank", {**LOWRANK, "keep": [0, 3, 25]}, r"plan.lowrank\['a'\]: 'keep' indices must lie in \[0, 25\)"),
    ("lowrank", {**LOWRANK, "scale": [1.0]}, r"plan.lowrank\['a'\]: 1 scales for 3 kept components"),
    ("lowrank", {**LOWRANK, "scale": ["1", 1, 1]}, r"plan.lowrank\['a'\]: 'scale' must be a list of numbers"),
    ("lowrank", {**LOWRANK, "rank": "25"}, r"plan.lowrank\['a'\]: 'rank' must be an int"),
])
def test_malformed_part_entries_are_refused_by_name_and_key(part: str, entry: object, match: str) -> None:
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(_plan_dict(**{part: {"a": entry}}))
    with pytest.raises(PlanError, match=match):  # a plan built in code is checked by validate
        Plan(**{part: {"a": entry}}).validate()


def test_in_mask_from_a_layer_that_is_not_gated_is_refused() -> None:
    with pytest.raises(PlanError, match="dynamic layer 'b' reads its in mask from 'c', which is not a gated layer"):
        Plan.from_dict(_plan_dict(dynamic={"a": GATED, "b": {**CONSUMER, "in_from": "c"}}))


def test_stored_plans_load_and_keep_their_format() -> None:
    """Plans saved before the parts were typed (bench/results) load, and serialize to the same JSON."""
    found = []

    def walk(x: object) -> None:
        if isinstance(x, dict):
            if x.get("format") == "sparsekern.plan":
                found.append(x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted((Path(__file__).resolve().parents[1] / "bench" / "results").glob("*.json")):
        walk(json.loads(path.read_text()))
    dynamic = [d for d in found if d["dynamic"]]
    if not dynamic:
        pytest.skip("no stored plan with a dynamic part in bench/results")
    for data in found:
        assert Plan.from_dict(data).to_dict() == data


def test_plan_from_torch_prune_round_trips_and_leaves_the_model_pruned(resnet) -> None:
    """A plan read from torch.nn.utils.prune masks is an ordinary plan: JSON round trip, validated members."""
    import copy

    from torch.nn.utils import prune

    original, x = resnet
    model = copy.deepcopy(original)
    prune.ln_structured(model.get_submodule("layer1.0.conv1"), "weight", amount=0.25, n=1, dim=0)
    prune.ln_structured(model.fc, "weight", amount=0.5, n=1, dim=0)  # logits: kept, recorded
    plan = Plan.from_torch_prune(model, x, meta={"note": "ln_structured"})
    assert list(plan.channels) == ["layer1.0.conv1"] and plan.channels["layer1.0.conv1"].n_keep == 12
    assert plan.meta["note"] == "ln_structured" and len(plan.meta["kept_pinned"]["fc"]) == 5
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert prune.is_pruned(model) and not prune.is_pruned(original)
