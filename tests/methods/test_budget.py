"""FLOPs of a plan without compiling it, and the uniform ratio that meets a FLOPs budget."""
from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern.graph import trace_channels
from sparsekern.methods import l1_norm
from sparsekern.methods.budget import plan_flops, ratio_for_budget
from sparsekern.models import build
from sparsekern.plan import PlanError
from tests.conftest import ConcatSplitNet, random_plan


@pytest.mark.parametrize("make,size", [(lambda: build("resnet20"), 16), (lambda: build("mobilenet_v2"), 32),
                                       (ConcatSplitNet, 8), (lambda: build("vgg16_bn"), 32)])
def test_plan_flops_equals_flops_of_the_compiled_model(make, size: int) -> None:
    model = make().eval()
    x = torch.randn(2, 3, size, size)
    cg, dense = trace_channels(model, x), sk.flops(model, x)
    for seed in range(3):
        plan = random_plan(model, x, seed)
        assert plan_flops(cg, dense, plan) == sk.flops(sk.compile(model, plan, x), x).total


def test_ratio_meets_the_budget_tightly() -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    ratio, achieved = ratio_for_budget(model, x, 0.5, scope="all")
    dense = sk.flops(model, x).total

    def compiled(r: float) -> float:
        return sk.flops(sk.compile(model, l1_norm.prune(model, x, ratio=r, scope="all"), x), x).total / dense

    assert achieved <= 0.5 and compiled(ratio) == pytest.approx(achieved)
    assert compiled(ratio - 0.03) > 0.5  # the bisection found the boundary


def test_unreachable_budget_is_explained() -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 16, 16)
    _, floor = ratio_for_budget(model, x, 0.999 * 0.5, scope="internal")
    with pytest.raises(PlanError, match="out of reach with scope='internal'"):
        ratio_for_budget(model, x, 0.01, scope="internal")
    with pytest.raises(PlanError, match=r"in \(0, 1\]"):
        ratio_for_budget(model, x, 1.5)
    assert floor < 0.5
