"""The learned-structure gates of the ImageNet-size SANP benchmark: the cost it asks for, the three channel
classes in the proportions it states, and a calibrated compile of such a model that equals the reference."""
from __future__ import annotations

import pytest
import torch

import sparsekern as sk
from sparsekern.bench.sanp_models import learned_structure
from sparsekern.dynamic import calibrate
from sparsekern.methods import sanp
from sparsekern.models import build
from tests.conftest import assert_close_to_scale, randomize_bn


@pytest.mark.parametrize("cost, seed", [(0.5, 0), (0.7, 1), (0.4, 2)])
def test_gates_reach_the_cost_with_static_and_switching_channels(cost: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = sanp.to_sanp(randomize_bn(build("resnet20")), granularity=1).eval()
    g = torch.Generator().manual_seed(seed)
    reference, other = torch.randn(32, 3, 16, 16, generator=g), torch.randn(16, 3, 16, 16, generator=g)
    reached = learned_structure(model, reference, cost=cost, switching=0.15, seed=seed)
    assert abs(reached - cost) < 0.03
    assert abs(float(sanp.cost_ratio(model, reference).mean()) - reached) < 1e-9
    plan = calibrate(sanp.to_plan(model, reference), model, reference)
    gated = [s for s in plan.dynamic_layers().values() if s.gated]
    channels = sum(s.out_channels for s in gated)
    switching = channels - sum(len(s.never_on) + len(s.always_on) for s in gated)
    assert 0.05 < switching / channels < 0.2  # the minority the docstring states (15% asked, 16-channel layers)
    assert all(s.never_on or s.always_on for s in gated)  # every layer has a static preference
    # switching channels are on for some images and off for others, never-on and always-on ones fixed
    masks = {}
    hooks = [u.register_forward_hook(lambda m, a, o, n=n: masks.__setitem__(n, o[1]))
             for n, u in sanp.gated_layers(model).items() if u.gated]
    with torch.no_grad():
        model(other)
    for h in hooks:
        h.remove()
    for name, spec in plan.dynamic_layers().items():
        if spec.gated:
            m = masks[name]
            assert not m[:, list(spec.never_on)].any() and m[:, list(spec.always_on)].all()
    fast = sk.compile(model, plan, reference).eval()
    with torch.no_grad():
        assert_close_to_scale(fast(other), sk.masked(model, plan, reference).eval()(other))
    assert fast.fallbacks == 0
