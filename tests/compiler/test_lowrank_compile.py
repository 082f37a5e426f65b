"""Low-rank plans: compile(model, plan) equals masked(model, plan) for factorized LMs with random kept
ranks (1 and 0 included), the compiled layers really are smaller, FLOPs are counted, and bad plans fail
with the layer's name."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sparsekern as sk
from sparsekern.lowrank import LowRankLinear, MaskedFactorizedLinear
from sparsekern.methods import flop
from sparsekern.models import build
from sparsekern.plan import LowRankKeep, Plan, PlanError
from tests.conftest import assert_close_to_scale

MODELS = {"transformer_lm": {"d_model": 32, "layers": 2, "heads": 4, "context": 16},
          "sru_lm": {"d_model": 32, "layers": 2}}


def _factorized(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # input_masked=(): every projection factorized (the SRU's first one is input-masked by default)
    model = flop.factorize(build(name, **MODELS[name]), init="random", input_masked=())
    with torch.no_grad():
        for layer in flop.factorized_layers(model).values():
            if layer.bias is not None:
                layer.bias.normal_(0, 0.1)
    return model.eval()


def _random_plan(model: torch.nn.Module, seed: int, *, forced: dict[str, int] | None = None) -> Plan:
    """Random keep-sets and scales; ``forced`` fixes the kept rank of some layers (e.g. 1 or 0)."""
    rng = np.random.default_rng(seed)
    lowrank = {}
    for name, layer in flop.factorized_layers(model).items():
        k = (forced or {}).get(name, int(rng.integers(1, layer.rank + 1)))
        keep = sorted(rng.choice(layer.rank, size=k, replace=False).tolist())
        scale = rng.uniform(0.2, 1.0, size=k).tolist()
        lowrank[name] = {"in": layer.in_features, "out": layer.out_features, "rank": layer.rank, "keep": keep,
                         "scale": scale}
    return Plan(lowrank=lowrank)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("seed", range(3))
def test_compiled_equals_masked_with_random_kept_ranks(name: str, seed: int) -> None:
    model = _factorized(name, seed)
    names = list(flop.factorized_layers(model))
    forced = {names[0]: 1, names[-1]: 1} if seed == 0 else ({names[1]: 0} if seed == 1 else {})
    plan = _random_plan(model, seed, forced=forced)
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(seed))
    ref, fast = sk.masked(model, plan, x), sk.compile(model, plan, x)
    with torch.no_grad():
        out, expect = fast(x), ref(x)
    assert_close_to_scale(out, expect)
    for layer_name, entry in plan.lowrank.items():
        compiled = fast.get_submodule(layer_name)
        assert isinstance(compiled, LowRankLinear) and compiled.rank == len(entry["keep"])
        assert isinstance(ref.get_submodule(layer_name), MaskedFactorizedLinear)
    assert _params(fast) < _params(model)
    # the model itself is untouched
    assert all(type(m).__name__ == "FactorizedLinear" for m in flop.factorized_layers(model).values())


def test_masked_reference_is_the_factorized_layer_with_fixed_gates() -> None:
    model = _factorized("sru_lm")
    plan = _random_plan(model, 5)
    ref = sk.masked(model, plan, torch.randint(0, 256, (1, 8)))
    layer = flop.factorized_layers(model)["layers.1.proj"]
    entry = plan.lowrank["layers.1.proj"]
    gates = torch.zeros(layer.rank)
    gates[entry["keep"]] = torch.tensor(entry["scale"])
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert_close_to_scale(ref.get_submodule("layers.1.proj")(x), F.linear(x, layer.dense_weight(gates), layer.bias))


def test_low_rank_linear_matches_its_formula_and_handles_rank_zero() -> None:
    g = torch.Generator().manual_seed(0)
    q, p, b = torch.randn(3, 10, generator=g), torch.randn(7, 3, generator=g), torch.randn(7, generator=g)
    layer = LowRankLinear.from_factors(q, p, b)
    x = torch.randn(2, 5, 10, generator=g)
    assert_close_to_scale(layer(x), x @ q.T @ p.T + b)  # the fp32 rule: the layer may run the C++ kernel
    empty = LowRankLinear.from_factors(q[:0], p[:, :0], b)
    torch.testing.assert_close(empty(x), b.expand(2, 5, 7))
    assert torch.equal(LowRankLinear.from_factors(q[:0], p[:, :0])(x), torch.zeros(2, 5, 7))
    with pytest.raises(ValueError, match="need Q"):
        LowRankLinear.from_factors(q, p.T)


def test_compiled_flops_count_the_kept_rank() -> None:
    model = _factorized("transformer_lm")
    plan = _random_plan(model, 3)
    x = torch.randint(0, 256, (2, 16))
    fast = sk.compile(model, plan, x)
    dense_cost, fast_cost = sk.flops(model, x), sk.flops(fast, x)
    assert not fast_cost.uncounted_ops
    rows = x.numel()
    saved = 0
    for name, entry in plan.lowrank.items():
        layer = model.get_submodule(name)
        # the factorized layer runs two matmuls at full rank, the compiled one at the kept rank
        saved += 2 * rows * (layer.rank - len(entry["keep"])) * (layer.in_features + layer.out_features)
    assert dense_cost.total - fast_cost.total == saved


def test_bad_low_rank_plans_name_the_layer() -> None:
    model = _factorized("transformer_lm")
    x = torch.randint(0, 256, (1, 8))
    with pytest.raises(PlanError, match="'head', a Linear, which is not a factorized layer"):
        sk.compile(model, Plan(lowrank={"head": {"keep": [0]}}), x)
    with pytest.raises(PlanError, match="no such layer"):
        sk.compile(model, Plan(lowrank={"blocks.9.attn.qkv": {"keep": [0]}}), x)
    with pytest.raises(PlanError, match="must lie in"):
        sk.masked(model, Plan(lowrank={"blocks.0.attn.qkv": {"keep": [0, 999]}}), x)
    with pytest.raises(PlanError, match="the plan has rank=5 but the layer has 24"):
        sk.compile(model, Plan(lowrank={"blocks.0.attn.qkv": {"rank": 5, "keep": [0]}}), x)
    with pytest.raises(PlanError, match="sorted and unique"):
        sk.compile(model, Plan(lowrank={"blocks.0.attn.qkv": {"keep": [3, 1]}}), x)
    with pytest.raises(PlanError, match="2 scales for 1 kept"):
        sk.compile(model, Plan(lowrank={"blocks.0.attn.qkv": {"keep": [3], "scale": [1.0, 2.0]}}), x)
    with pytest.raises(PlanError, match=r"plan.lowrank\['blocks.0.attn.qkv'\]: unknown key 'scales'"):
        sk.compile(model, Plan(lowrank={"blocks.0.attn.qkv": {"keep": [3], "scales": [1.0]}}), x)


def test_typed_and_dict_entries_compile_alike() -> None:
    model = _factorized("transformer_lm")
    x = torch.randint(0, 256, (1, 8))
    typed = Plan(lowrank={"blocks.0.attn.qkv": LowRankKeep((1, 4), (0.5, 2.0), rank=24)})
    as_dict = Plan(lowrank={"blocks.0.attn.qkv": {"rank": 24, "keep": [1, 4], "scale": [0.5, 2.0]}})
    with torch.no_grad():
        assert torch.equal(sk.compile(model, typed, x)(x), sk.compile(model, as_dict, x)(x))
    assert typed.to_dict() == as_dict.to_dict()


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_lm_saves_and_reloads_bit_exactly(name: str, tmp_path) -> None:
    model = _factorized(name, 3)
    plan = _random_plan(model, 3)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    fast = sk.compile(model, plan, x)
    sk.save(fast, tmp_path / "lm.sk")
    loaded = sk.load(tmp_path / "lm.sk")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
