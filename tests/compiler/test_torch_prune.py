"""Masks users already have: models pruned with ``torch.nn.utils.prune`` (and plain weight-shaped masks)
become plans that compile to smaller models computing what the pruned model computes."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

import sparsekern as sk
from sparsekern.masks import apply_weight_masks, remove_torch_prune
from sparsekern.models import build
from sparsekern.plan import PlanError
from tests.conftest import assert_close_to_scale, randomize_bn


class SmallCNN(nn.Module):
    """conv-BN-ReLU stem, a residual block, a conv with a bias, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        y = F.relu(self.conv3(y))
        return self.fc(y.mean((2, 3)))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _prune_with_norm(model: nn.Module, pairs: dict[str, str | None], amount: float = 0.5) -> None:
    """``ln_structured(..., dim=0)`` on each conv, and the same channel mask on its BatchNorm's weight and bias
    (so a pruned channel is exactly zero; a bias of the conv itself is pruned alike)."""
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        prune.ln_structured(conv, "weight", amount=amount, n=1, dim=0)
        rows = conv.weight_mask.flatten(1).any(1).float()
        if conv.bias is not None:
            prune.custom_from_mask(conv, "bias", rows)
        if bn_name is not None:
            bn = model.get_submodule(bn_name)
            prune.custom_from_mask(bn, "weight", rows)
            prune.custom_from_mask(bn, "bias", rows)


def _resnet20_pairs(model: nn.Module) -> dict[str, str]:
    pairs = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1":
            pairs[name] = name.replace("conv", "bn") if "conv" in name.rsplit(".", 1)[-1] else name[:-1] + "1"
    return pairs


def _compiles_to_the_pruned_model(model: nn.Module, x: torch.Tensor) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pruned channels are exactly zero: no constant warning
        plan = sk.Plan.from_torch_prune(model, x)
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), model(x))
    assert _n_params(fast) < _n_params(model)
    return fast


def test_ln_structured_small_cnn_compiles_to_the_pruned_model() -> None:
    torch.manual_seed(0)
    model, x = randomize_bn(SmallCNN().eval()), torch.randn(2, 3, 8, 8)
    _prune_with_norm(model, {"conv1": "bn1", "conv2": "bn2", "conv3": None})
    fast = _compiles_to_the_pruned_model(model, x)
    # conv1 and conv2 meet in a residual add: the group keeps the union of what they keep
    union = (model.conv1.weight_mask.flatten(1).any(1) | model.conv2.weight_mask.flatten(1).any(1)).sum()
    assert fast.conv1.out_channels == fast.conv2.out_channels == int(union) < 16
    assert fast.conv3.out_channels == 12 and fast.fc.in_features == 12


def test_ln_structured_resnet20_compiles_to_the_pruned_model() -> None:
    torch.manual_seed(0)
    model, x = randomize_bn(build("resnet20").eval()), torch.randn(2, 3, 32, 32)
    _prune_with_norm(model, _resnet20_pairs(model))
    fast = _compiles_to_the_pruned_model(model, x)
    assert fast.get_submodule("layer1.0.conv1").out_channels == 8
    assert fast.get_submodule("layer3.2.conv1").out_channels == 32


def test_ln_structured_on_convs_only_with_fresh_batchnorm() -> None:
    """The usual case: only the convs are pruned; a fresh BatchNorm maps zero to zero, so no constants."""
    torch.manual_seed(0)
    model, x = build("resnet20").eval(), torch.randn(2, 3, 32, 32)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and name != "conv1":
            prune.ln_structured(m, "weight", amount=0.5, n=1, dim=0)
    fast = _compiles_to_the_pruned_model(model, x)
    assert _n_params(fast) < 0.6 * _n_params(model)


def test_unstructured_masks_remove_only_all_zero_rows() -> None:
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(24, 16, 3, 3) > 0.5).float()
    mask[[1, 5, 7]] = 0  # three output rows entirely pruned
    mask[2] = 0
    mask[2, 0, 0, 0] = 1  # one weight left: the channel stays
    prune.custom_from_mask(model.conv3, "weight", mask)
    prune.l1_unstructured(model.conv1, "weight", amount=0.3)  # no empty row: nothing removed
    prune.custom_from_mask(model.conv3, "bias", mask.flatten(1).any(1).float())
    plan = sk.Plan.from_torch_prune(model, x)
    assert list(plan.channels) == ["conv3"]
    assert plan.channels["conv3"].keep == tuple(i for i in range(24) if i not in (1, 5, 7))
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), model(x))
    assert fast.conv3.weight.shape == (21, 16, 3, 3)


def test_the_users_model_is_untouched() -> None:
    torch.manual_seed(0)
    model, x = randomize_bn(SmallCNN().eval()), torch.randn(2, 3, 8, 8)
    _prune_with_norm(model, {"conv1": "bn1", "conv3": None})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    plan = sk.Plan.from_torch_prune(model, x, constants="ignore")
    sk.compile(model, plan, x)
    sk.masked(model, plan, x)
    baked = remove_torch_prune(model)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert prune.is_pruned(model) and hasattr(model.conv1, "weight_orig") and hasattr(model.bn1, "bias_mask")
    assert "weight_orig" not in dict(model.conv2.named_parameters())
    with torch.no_grad():
        assert torch.equal(model(x), before)
        assert torch.equal(baked(x), before)
    assert not prune.is_pruned(baked) and isinstance(baked.conv1.weight, nn.Parameter)
    assert "conv1.weight_orig" not in baked.state_dict()


def test_constants_of_removed_channels_are_reported() -> None:
    """Pruning a conv but not the BatchNorm after it leaves the channel at the BN shift: the plan drops it."""
    torch.manual_seed(0)
    model, x = randomize_bn(SmallCNN().eval()), torch.randn(2, 3, 8, 8)
    prune.ln_structured(model.conv1, "weight", amount=0.5, n=1, dim=0)
    prune.ln_structured(model.conv2, "weight", amount=0.5, n=1, dim=0)
    with pytest.warns(UserWarning, match=r"'bn1' \(BatchNorm2d\) gives removed channels \[.*nonzero constant"):
        plan = sk.Plan.from_torch_prune(model, x)
    with pytest.raises(PlanError, match=r"'bn1' \(BatchNorm2d\).*Prune those biases / BatchNorm"):
        sk.Plan.from_torch_prune(model, x, constants="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sk.Plan.from_torch_prune(model, x, constants="ignore").channels == plan.channels
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(model, plan, x)(x))


def test_pinned_channels_are_kept_and_recorded() -> None:
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    prune.ln_structured(model.fc, "weight", amount=0.4, n=1, dim=0)  # logits: pinned
    prune.ln_structured(model.conv3, "weight", amount=0.5, n=1, dim=0)
    prune.custom_from_mask(model.conv3, "bias", model.conv3.weight_mask.flatten(1).any(1).float())
    plan = sk.Plan.from_torch_prune(model, x)
    assert "fc" not in plan.channels and len(plan.meta["kept_pinned"]["fc"]) == 2
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), model(x))


def test_grouped_conv_with_unequal_counts_is_refused_naming_it() -> None:
    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = nn.Conv2d(3, 8, 1, bias=False)
            self.g = nn.Conv2d(8, 4, 1, groups=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.g(self.p(x))

    model, x = Grouped().eval(), torch.randn(1, 3, 4, 4)
    mask = torch.ones(8, 3, 1, 1)
    mask[[0, 1]] = 0  # both from the first of the grouped conv's two input groups
    with pytest.raises(PlanError, match=r"grouped conv input of 'g' \(groups=2\).*got \[2, 4\]"):
        sk.Plan.from_weight_masks(model, {"p": mask}, x)


def test_weight_masks_dict() -> None:
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    mask = (torch.rand(24, 16, 3, 3) > 0.3).float()
    mask[[0, 3]] = 0
    masks = {"conv3": mask.bool()}
    plan = sk.Plan.from_weight_masks(model, masks, x, constants="ignore")
    assert plan.channels["conv3"].keep == tuple(i for i in range(24) if i not in (0, 3))
    described = apply_weight_masks(model, masks)
    assert torch.equal(described.conv3.weight, model.conv3.weight * mask)
    fast = sk.compile(described, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), sk.masked(described, plan, x)(x))
    assert not torch.equal(model.conv3.weight, described.conv3.weight)  # the model is not modified


def test_bad_masks_name_the_layer_the_shape_and_the_fix() -> None:
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(PlanError, match=r"weight mask for 'conv3' has shape \(24, 16\) but the layer's weight has "
                                        r"shape \(24, 16, 3, 3\); give a mask of the weight's shape"):
        sk.Plan.from_weight_masks(model, {"conv3": torch.ones(24, 16)}, x)
    with pytest.raises(PlanError, match=r"no layer 'conv4' \(closest names: \['conv1', .*key the masks by"):
        sk.Plan.from_weight_masks(model, {"conv4": torch.ones(24, 16, 3, 3)}, x)
    with pytest.raises(PlanError, match=r"mask for 'conv1' must hold 0/1.*0.5"):
        sk.Plan.from_weight_masks(model, {"conv1": torch.full((16, 3, 3, 3), 0.5)}, x)
    with pytest.raises(PlanError, match=r"layer '' \(SmallCNN\) has no weight tensor"):
        sk.Plan.from_weight_masks(model, {"": torch.ones(1)}, x)
    with pytest.raises(ValueError, match="constants must be one of"):
        sk.Plan.from_weight_masks(model, {}, x, constants="fold")


def test_layer_pruned_twice() -> None:
    """Two pruning calls on one tensor leave one combined mask (a PruningContainer): both count."""
    torch.manual_seed(0)
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    prune.l1_unstructured(model.conv3, "weight", amount=0.3)
    prune.ln_structured(model.conv3, "weight", amount=0.25, n=2, dim=0)
    prune.custom_from_mask(model.conv3, "bias", model.conv3.weight_mask.flatten(1).any(1).float())
    plan = sk.Plan.from_torch_prune(model, x)
    assert plan.channels["conv3"].n_keep == 18 and plan.meta["method"] == "torch.nn.utils.prune"
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), model(x))
    assert torch.count_nonzero(fast.conv3.weight) == torch.count_nonzero(model.conv3.weight)


def test_a_bias_left_on_a_removed_channel_is_reported() -> None:
    model, x = SmallCNN().eval(), torch.randn(2, 3, 8, 8)
    prune.ln_structured(model.conv3, "weight", amount=0.5, n=1, dim=0)  # the bias stays: conv3 = bias there
    with pytest.warns(UserWarning, match=r"'conv3' \(Conv2d\) gives removed channels"):
        sk.Plan.from_torch_prune(model, x)
    prune.custom_from_mask(model.conv3, "bias", model.conv3.weight_mask.flatten(1).any(1).float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.Plan.from_torch_prune(model, x)
