"""FLOP (Wang, Wohlwend & Lei 2019): hard-concrete statistics, evaluation gates, parameter-preserving rank,
SVD initialisation, the Lagrangian reaching its sparsity target on a small byte LM, and plans that compile
exactly and survive a JSON round trip."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern as sk
from sparsekern.methods import flop
from sparsekern.methods.flop import FactorizedLinear
from sparsekern.models import build
from sparsekern.plan import Plan, PlanError
from sparsekern.text_data import LMSequences, pystdlib
from sparsekern.train import TrainConfig, train
from tests.conftest import assert_close_to_scale


def _spread_gates(layer: flop.HardConcreteLayer, lo: float = -4.0, hi: float = 4.0) -> None:
    n = layer.n_gates
    with torch.no_grad():
        layer.log_alpha.copy_(torch.linspace(lo, hi, n)[torch.randperm(n)])


def test_expected_l0_matches_monte_carlo() -> None:
    torch.manual_seed(0)
    layer = FactorizedLinear(12, 20, rank=48)
    _spread_gates(layer)
    draws = torch.stack([layer.sample_gates().detach() for _ in range(4000)])
    assert draws.min() >= 0 and draws.max() <= 1
    assert (draws == 0).any() and (draws == 1).any(), "hard concrete puts mass on exactly 0 and 1"
    p_nonzero = (draws != 0).double().mean(0)
    # P(z != 0) = sigmoid(log_alpha - beta log(0.1 / 1.1)) per gate; binomial std <= 0.008 with 4000 draws
    expected = torch.sigmoid(layer.log_alpha.detach().double() + math.log(11.0))
    assert (p_nonzero - expected).abs().max() < 0.035
    # the sum over 48 gates: std <= sqrt(48) * 0.008 = 0.055
    assert float(layer.expected_l0().detach()) == pytest.approx(float((draws != 0).double().sum(1).mean()), abs=0.25)


def test_gate_initialisation_and_temperature() -> None:
    torch.manual_seed(0)
    scratch = FactorizedLinear(30, 50)
    assert scratch.log_alpha.mean().item() == pytest.approx(0.0, abs=0.01)  # p = 0.5
    assert scratch.log_alpha.std().item() == pytest.approx(0.01, rel=0.4)
    trained = FactorizedLinear.from_linear(nn.Linear(30, 50))  # SVD init: starting from a trained model
    assert trained.log_alpha.mean().item() == pytest.approx(math.log(0.95 / 0.05), abs=0.01)
    assert float(trained.expected_l0().detach()) / trained.rank > 0.99
    cold = FactorizedLinear(30, 50, beta=0.5)
    with torch.no_grad():
        cold.log_alpha.fill_(1.0)
    assert float(cold.expected_l0().detach()) == pytest.approx(cold.rank * torch.sigmoid(torch.tensor(1 + 0.5 * math.log(11))).item(), rel=1e-6)


def test_eval_gates_zero_the_expected_number_of_smallest_and_keep_soft_values() -> None:
    torch.manual_seed(1)
    layer = FactorizedLinear(16, 16, rank=40).eval()
    _spread_gates(layer, -6.0, 3.0)
    gates = layer.eval_gates()
    n_zeros = round(layer.rank - float(layer.expected_l0().detach()))
    assert 0 < n_zeros < layer.rank
    assert int((gates == 0).sum()) == n_zeros
    soft = torch.sigmoid(0.8 * layer.log_alpha.detach())
    kept = gates != 0
    torch.testing.assert_close(gates[kept], soft[kept])
    assert soft[~kept].max() <= soft[kept].min()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), F.linear(x, layer.dense_weight(gates), layer.bias))


@pytest.mark.parametrize("shape", [(256, 256), (256, 768), (1024, 256), (37, 5)])
def test_default_rank_preserves_the_parameter_count(shape: tuple[int, int]) -> None:
    n_in, n_out = shape
    r = flop.default_rank(n_in, n_out)
    assert n_in * n_out - (n_in + n_out) < (n_in + n_out) * r <= n_in * n_out
    layer = FactorizedLinear(n_in, n_out)
    assert layer.P.numel() + layer.Q.numel() == (n_in + n_out) * r == layer.n_factor_params
    assert layer.n_dense_params == n_in * n_out


def test_factorized_lm_has_the_dense_parameter_count() -> None:
    dense = build("transformer_lm", d_model=64, layers=2, context=16)
    n_dense = sum(p.numel() for p in dense.parameters())
    linears = {n: m for n, m in dense.named_modules() if isinstance(m, nn.Linear) and n != "head"}
    flop.factorize(dense, init="random")
    layers = flop.factorized_layers(dense)
    assert set(layers) == set(linears) and isinstance(dense.head, nn.Linear)
    n_fact = sum(p.numel() for n, p in dense.named_parameters() if not n.endswith("log_alpha"))
    slack = sum(m.in_features + m.out_features for m in linears.values())
    assert n_dense - slack < n_fact <= n_dense


def test_svd_init_reproduces_the_dense_layer() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(24, 40)
    full = FactorizedLinear.from_linear(lin, rank=24, init="svd")
    x = torch.randn(7, 24)
    assert_close_to_scale(full.dense_weight(), lin.weight)
    assert_close_to_scale(F.linear(x, full.dense_weight(), full.bias), lin(x))
    # default rank (24 * 40 // 64 = 15): the best rank-15 approximation (Eckart-Young)
    trunc = FactorizedLinear.from_linear(lin, init="svd")
    s = torch.linalg.svdvals(lin.weight.detach().double())
    err = (trunc.dense_weight().double() - lin.weight.double()).pow(2).sum()
    assert err.item() == pytest.approx(s[trunc.rank:].pow(2).sum().item(), rel=1e-4)


def test_random_init_keeps_the_layer_weight_scale() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(128, 384)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    layer = FactorizedLinear.from_linear(lin, init="random")
    assert layer.dense_weight().std().item() == pytest.approx(0.02, rel=0.1)
    assert layer.log_alpha.mean().item() == pytest.approx(0.0, abs=0.01)
    assert FactorizedLinear(128, 384).dense_weight().std().item() == pytest.approx(
        nn.Linear(128, 384).weight.std().item(), rel=0.1)


def test_factorize_errors_name_the_layer() -> None:
    model = build("sru_lm", d_model=16, layers=1)
    with pytest.raises(ValueError, match="no layer 'layers.0.nope'"):
        flop.factorize(model, ["layers.0.nope"])
    with pytest.raises(ValueError, match="'embed' is a Embedding, not an nn.Linear"):
        flop.factorize(model, ["embed"])
    with pytest.raises(ValueError, match="call sparsekern.methods.flop.factorize"):
        flop.expected_sparsity(model)
    with pytest.raises(PlanError, match="no FactorizedLinear"):
        flop.prune(model)


@pytest.mark.parametrize("name,target", [("transformer_lm", 0.6), ("sru_lm", 0.8)])
def test_lagrangian_drives_expected_sparsity_to_the_target(name: str, target: float) -> None:
    """The method's claim: the augmented Lagrangian meets the sparsity constraint, on every one of 3 seeds
    within 0.02 after 300 Adam steps of a 1-layer, d=32 byte LM on the stdlib corpus, while the LM learns
    (seen: final training loss 2.7-3.0 nats, below log(256) - 2 = 3.55). Seen over seeds 0-3: the Transformer
    |s_hat - t| <= 0.0082, hard sparsity within 0.0094; the SRU, whose one layer is its first and so prunes
    its 32 input features (the official enwik8 script's mask), |s_hat - t| <= 0.011 and hard sparsity within
    0.019 (steps of 1/32: 0.8 itself is not reachable); 200 steps are not enough for the SRU on 2 of 4 seeds."""
    kwargs = {"context": 32} if name == "transformer_lm" else {}
    data = LMSequences(pystdlib().train[:200_000], 32)
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        model = flop.factorize(build(name, d_model=32, layers=1, **kwargs), init="random")
        cfg = TrainConfig(max_steps=300, batch_size=16, optimizer="adam", lr=3e-3, weight_decay=0.0,
                          schedule="constant", progress=False, device="cpu", seed=seed)
        result = flop.train_flop(model, data, cfg, target=target)
        with torch.no_grad():
            s_hat = float(flop.expected_sparsity(model))
        assert s_hat == pytest.approx(target, abs=0.02), seed
        assert flop.hard_sparsity(model) == pytest.approx(target, abs=0.02), seed
        assert result.history[-1]["train_loss"] < math.log(256) - 2.0, seed  # it learned something meanwhile
        plan = flop.prune(model)
        assert plan.meta["target"] == target and plan.meta["sparsity"] == pytest.approx(flop.hard_sparsity(model))


def test_target_ramp_and_multipliers_ascend() -> None:
    torch.manual_seed(0)
    model = flop.factorize(build("sru_lm", d_model=16, layers=1), init="random")
    hook = flop.LagrangianHook(model, 0.5, warmup_steps=10)
    assert [hook.target_at(s) for s in (0, 4, 9, 50)] == pytest.approx([0.05, 0.25, 0.5, 0.5])
    group = hook.param_group(0.1)
    assert group["maximize"] and group["weight_decay"] == 0.0
    x = torch.randint(0, 256, (64, 8))
    cfg = TrainConfig(max_steps=5, batch_size=16, optimizer="adam", lr=1e-3, progress=False, device="cpu")
    groups = flop.flop_param_groups(model, hook, alpha_lr=0.1, lambda_lr=0.1)
    train(model, (x, x), cfg, hooks=[hook], params=groups)
    # s_hat starts near 1/12, below the ramped target: ascent makes lambda1 negative (the penalty then
    # rewards sparsity) and lambda2 (the gradient (s_hat - t)^2 >= 0) positive
    assert hook.lambda1.item() < 0 < hook.lambda2.item()


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flop.factorized_layers(model).values():
            layer.log_alpha.copy_(torch.randn(layer.rank, generator=g) * 3 - 1)
    return model.eval()


def test_plan_json_round_trip_compiles_identically() -> None:
    torch.manual_seed(0)
    model = _trained_looking(flop.factorize(build("transformer_lm", d_model=32, layers=2, context=16)))
    x = torch.randint(0, 256, (2, 16))
    plan = flop.prune(model, x)
    again = Plan.from_json(plan.to_json())
    assert again.lowrank == plan.lowrank and again.meta == plan.meta
    assert plan.meta["inputs"] == [{"shape": [2, 16], "dtype": "int64"}]
    entry = plan.lowrank["blocks.0.mlp.fc1"]
    assert (entry["in"], entry["out"], entry["rank"]) == (32, 128, 25)
    a, b = sk.compile(model, plan, x), sk.compile(model, again, x)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        # the plan holds the model's own evaluation gates: the reference is the factorized model in eval mode
        assert_close_to_scale(sk.masked(model, plan, x)(x), model(x))
        assert_close_to_scale(a(x), model(x))
    kept = sum(len(e["keep"]) * (e["in"] + e["out"]) for e in plan.lowrank.values())
    assert plan.meta["params_kept"] == kept


def test_run_lm_end_to_end_reports_the_compiled_model() -> None:
    corpus = pystdlib()
    cfg = TrainConfig(max_steps=20, batch_size=8, optimizer="adam", lr=3e-3, schedule="constant", progress=False,
                      device="cpu")
    run = flop.run_lm("sru_lm", corpus, cfg, target=0.5, model_kwargs={"d_model": 16, "layers": 1}, seq_len=16,
                      eval_bytes=2000)
    r = run.report
    assert r["steps"] == 20 and r["start"] == "scratch" and r["compiled_vs_masked_max_rel_err"] <= 1e-4
    assert r["sparsity"] == pytest.approx(flop.hard_sparsity(run.model))
    assert r["params_compiled"] == sum(p.numel() for p in run.compiled.parameters())
    from sparsekern.text_data import bits_per_byte

    assert r["test_bpb"] == pytest.approx(bits_per_byte(run.model, corpus.test, 16, max_bytes=2000), rel=1e-5)
    # the SRU's only (first) layer is input-masked as in the official enwik8 script: 16 input features, not rank 12
    assert sorted(r["ranks"]) == ["layers.0.proj"] and r["ranks"]["layers.0.proj"][1] == 16
    assert isinstance(run.model.get_submodule("layers.0.proj"), flop.InputMaskedLinear)


def test_cli_prune_flop_writes_a_reloadable_compiled_lm(tmp_path) -> None:
    import json

    import sparsekern as sk
    from sparsekern.cli import main

    argv = ["prune", "--method", "flop", "--model", "sru_lm", "--target", "0.5", "--steps", "20",
            "--eval-bytes", "4096", "--d-model", "32", "--layers", "1", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["params_compiled"] < report["params_dense"]
    model = sk.load(tmp_path / "model.sk")
    x = torch.randint(0, 256, (2, 16))
    assert model(x).shape == (2, 16, 256)


# ----------------------------------------------------------------------------- the SRU's input-feature mask
def test_sru_first_layer_gets_an_input_mask_not_a_factorization() -> None:
    torch.manual_seed(0)
    dense = build("sru_lm", d_model=16, layers=2)
    model = flop.factorize(copy.deepcopy(dense))  # from a "trained" dense model: weights kept, p = 0.05
    first, second = model.get_submodule("layers.0.proj"), model.get_submodule("layers.1.proj")
    assert type(first) is flop.InputMaskedLinear and type(second) is FactorizedLinear
    assert first.weight.shape == (48, 16) and first.log_alpha.shape == (16,) and first.n_gates == 16
    assert torch.equal(first.weight, dense.layers[0].proj.weight)  # kept dense, not factorized
    assert first.log_alpha.mean().item() == pytest.approx(math.log(0.95 / 0.05), abs=0.01)
    assert list(flop.factorized_layers(model)) == ["layers.1.proj"]
    assert list(flop.gated_layers(model)) == ["layers.0.proj", "layers.1.proj"]
    # the mask gates the input features: z = 0 on feature i makes the layer ignore x[..., i]
    first.eval()
    with torch.no_grad():
        first.log_alpha[3] = -30.0
    h = torch.randn(5, 16)
    h2 = h.clone()
    h2[:, 3] += 7.0
    with torch.no_grad():
        assert torch.equal(first(h), first(h2))
    # the Transformer has no such layer; input_masked=() factorizes the SRU's first layer too
    assert not any(isinstance(m, flop.InputMaskedLinear) for m in flop.factorize(
        build("transformer_lm", d_model=16, layers=1, context=8)).modules())
    every = flop.factorize(copy.deepcopy(dense), input_masked=())
    assert list(flop.factorized_layers(every)) == ["layers.0.proj", "layers.1.proj"]
    with pytest.raises(ValueError, match="not among the linear layers converted"):
        flop.factorize(copy.deepcopy(dense), ["layers.1.proj"], input_masked=["layers.0.proj"])


def test_input_mask_expected_l0_enters_the_sparsity_term() -> None:
    torch.manual_seed(0)
    model = flop.factorize(build("sru_lm", d_model=16, layers=2), init="random")
    first = model.get_submodule("layers.0.proj")
    total = 2 * 16 * 48  # the dense size of both projections
    s_before = float(flop.expected_sparsity(model).detach())
    l0_before = float(first.expected_l0().detach())
    with torch.no_grad():
        first.log_alpha.sub_(3.0)
    dl0 = l0_before - float(first.expected_l0().detach())
    # only the input mask changed: s_hat moves by out * dE[L0] / total (the official HardConcreteLinear size)
    assert float(flop.expected_sparsity(model).detach()) - s_before == pytest.approx(48 * dl0 / total, rel=1e-4)
    # the Lagrangian's gradient reaches the input mask: d/dla_i of l1 (s_hat - t) = -l1 * out * sig'(.) / total
    hook = flop.LagrangianHook(model, 0.5, warmup_steps=0)
    with torch.no_grad():
        hook.lambda1.fill_(2.0)
    hook.loss(SimpleNamespace(stage="main", step=0, metrics={}), None, None).backward()
    p = torch.sigmoid(first.log_alpha.detach() + math.log(11.0))
    torch.testing.assert_close(first.log_alpha.grad, -2.0 * 48 * p * (1 - p) / total)
    groups = flop.flop_param_groups(model, hook, alpha_lr=0.1, lambda_lr=0.1)
    alphas = next(g for g in groups if g["name"] == "flop_log_alpha")["params"]
    assert any(a is first.log_alpha for a in alphas) and len(alphas) == 2


def test_select_features_equals_index_select_on_any_leading_shape() -> None:
    from sparsekern.lowrank import select_features

    g = torch.Generator().manual_seed(0)
    index = torch.tensor([4, 0, 2])
    for shape in ((5,), (3, 5), (2, 3, 5), (2, 3, 4, 5)):
        x = torch.randn(shape, generator=g)
        assert torch.equal(select_features(x, index), x.index_select(-1, index))
    x = torch.randn(3, 5, 2, generator=g).transpose(1, 2)  # not contiguous: the 2-D view is a copy
    assert torch.equal(select_features(x, index), x.index_select(-1, index))


def test_input_mask_compiles_to_a_layer_reading_only_the_kept_features(tmp_path) -> None:
    from sparsekern.lowrank import FeatureSelectLinear, MaskedInputLinear

    torch.manual_seed(0)
    model = flop.factorize(build("sru_lm", d_model=16, layers=1), init="random")
    layer = model.get_submodule("layers.0.proj")
    _spread_gates(layer)
    model.eval()
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    plan = flop.prune(model, x)
    entry = plan.lowrank["layers.0.proj"]
    keep = torch.nonzero(layer.eval_gates()).flatten().tolist()
    assert list(entry.keep) == keep and entry.rank == 16 and 0 < len(keep) < 16
    assert plan.meta["params_kept"] == 48 * len(keep) and plan.meta["params_prunable"] == 48 * 16
    fast, ref = sk.compile(model, plan, x), sk.masked(model, plan, x)
    compiled = fast.get_submodule("layers.0.proj")
    assert isinstance(compiled, FeatureSelectLinear)
    assert isinstance(ref.get_submodule("layers.0.proj"), MaskedInputLinear)
    assert compiled.in_features == len(keep) and compiled.weight.shape == (48, len(keep))
    assert compiled.index.tolist() == keep
    with torch.no_grad():
        out, expect, own = fast(x), ref(x), model(x)
    assert (out - expect).abs().max() <= 1e-5 * expect.abs().max()
    assert (expect - own).abs().max() <= 1e-5 * own.abs().max()  # the plan holds the model's own gates
    # the compiled layer costs 2 * rows * kept * out instead of 2 * rows * in * out
    assert sk.flops(model, x).total - sk.flops(fast, x).total == 2 * x.numel() * (16 - len(keep)) * 48
    sk.save(fast, tmp_path / "sru.sk")
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "sru.sk")(x), out)
    # a record written before input masks existed still rebuilds its factorized first layer
    old = flop.build_factorized({"name": "sru_lm", "kwargs": {"d_model": 16, "layers": 1}}, {"layers.0.proj": 12})
    assert isinstance(old.get_submodule("layers.0.proj"), FactorizedLinear)


# ----------------------------------------------------------------------------- the official multiplier optimiser
@pytest.mark.parametrize("target,sign", [(0.9, -1.0), (0.0, 1.0)])
def test_official_lambda_optimizer_ascends_the_lagrangian_with_its_own_adam(target: float, sign: float) -> None:
    """With ``lambda_optimizer="adam"`` the multipliers are not in the trainer's optimizer; the hook's Adam
    (betas 0.9, 0.999, maximising) steps them on the Lagrangian's gradients ``(gap, gap^2)``: a violation
    ``gap = s_hat - t`` moves ``lambda1`` to its sign (the penalty ``lambda1 * gap`` grows) and raises ``lambda2``."""
    torch.manual_seed(0)
    model = flop.factorize(build("sru_lm", d_model=16, layers=1), init="random")  # s_hat starts near 0.08
    hook = flop.LagrangianHook(model, target, warmup_steps=0, lambda_optimizer="adam", lambda_lr=0.05)
    groups = flop.flop_param_groups(model, hook, alpha_lr=0.1, lambda_lr=0.1)
    assert [g["name"] for g in groups] == ["weights", "flop_log_alpha"]
    with pytest.raises(ValueError, match="its own Adam"):
        hook.param_group(0.1)
    gaps: list[float] = []

    class Record:
        def after_step(self, state) -> None:
            gaps.append(float(state.metrics["expected_sparsity"]) - state.metrics["target_sparsity"])

    x = torch.randint(0, 256, (64, 8), generator=torch.Generator().manual_seed(1))
    cfg = TrainConfig(max_steps=4, batch_size=16, optimizer="adam", lr=1e-3, schedule="constant", progress=False,
                      device="cpu")
    train(model, (x, x), cfg, hooks=[hook, Record()], params=groups)
    assert len(gaps) == 4 and all(sign * g > 0 for g in gaps)
    assert sign * hook.lambda1.item() > 0 and hook.lambda2.item() > 0
    # step for step what torch's Adam with betas (0.9, 0.999) does when maximising with those gradients, and
    # not what the default's momentum-free Adam would have done (0.4% apart after these 4 steps)
    replays = {}
    for beta1 in (0.9, 0.0):
        ref = torch.zeros(2, requires_grad=True)
        adam = torch.optim.Adam([ref], lr=0.05, betas=(beta1, 0.999), maximize=True)
        for g in gaps:
            ref.grad = torch.tensor([g, g * g])
            adam.step()
        replays[beta1] = ref.tolist()
    assert [hook.lambda1.item(), hook.lambda2.item()] == pytest.approx(replays[0.9], rel=1e-4)
    assert [hook.lambda1.item(), hook.lambda2.item()] != pytest.approx(replays[0.0], rel=1e-3)
    # its state (multipliers and moments) survives a checkpoint
    again = flop.LagrangianHook(model, target, lambda_optimizer="adam", lambda_lr=0.05)
    again.load_state_dict(hook.state_dict())
    hook.step_multipliers(0.1)
    again.step_multipliers(0.1)
    assert (again.lambda1.item(), again.lambda2.item()) == (hook.lambda1.item(), hook.lambda2.item())


# ----------------------------------------------------------------------------- starting from a factorized model
def test_gate_factorized_takes_the_trained_factors_as_given() -> None:
    from sparsekern.lowrank import LowRankLinear

    torch.manual_seed(0)
    trained = flop.factorize(build("transformer_lm", d_model=32, layers=1, context=16), init="random", gates=False)
    factored = {n: m for n, m in trained.named_modules() if isinstance(m, LowRankLinear)}
    assert sorted(factored) == ["blocks.0.attn.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert not flop.gated_layers(trained)
    with torch.no_grad():  # as if trained: factors and biases no longer what factorize drew
        for m in factored.values():
            m.P.mul_(1.5)
            m.bias.normal_(0, 0.1)
    net = flop.gate_factorized(trained)
    for name, src in factored.items():
        layer = net.get_submodule(name)
        assert type(layer) is FactorizedLinear
        assert torch.equal(layer.P, src.P) and torch.equal(layer.Q, src.Q) and torch.equal(layer.bias, src.bias)
        assert layer.log_alpha.mean().item() == pytest.approx(math.log(0.95 / 0.05), abs=0.01)
        assert trained.get_submodule(name) is src  # the input model is not modified
    # with every mask on, the gated model computes what the factorized model computed
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    all_on = Plan(lowrank={n: {"keep": list(range(m.rank))} for n, m in flop.factorized_layers(net).items()})
    with torch.no_grad():
        expect = trained.eval()(x)
        assert (sk.masked(net.eval(), all_on, x)(x) - expect).abs().max() <= 1e-5 * expect.abs().max()
        for layer in flop.factorized_layers(net).values():
            layer.log_alpha.fill_(30.0)  # training-mode gates are then exactly 1
        assert (net.train()(x) - expect).abs().max() <= 1e-5 * expect.abs().max()
    # the architecture record follows: sk.load can rebuild the gated model
    rebuilt = flop.build_factorized(**net.sk_arch["kwargs"])
    assert {n: type(m) for n, m in flop.gated_layers(rebuilt).items()} == \
        {n: type(m) for n, m in flop.gated_layers(net).items()}
    with pytest.raises(ValueError, match="no factorized layer"):
        flop.gate_factorized(build("transformer_lm", d_model=16, layers=1, context=8))


def test_gate_factorized_sru_keeps_the_first_layer_dense_and_masks_its_inputs() -> None:
    from sparsekern.lowrank import LowRankLinear

    torch.manual_seed(0)
    trained = flop.factorize(build("sru_lm", d_model=16, layers=2), init="random", gates=False)
    assert type(trained.get_submodule("layers.0.proj")) is nn.Linear
    assert isinstance(trained.get_submodule("layers.1.proj"), LowRankLinear)
    net = flop.gate_factorized(trained)
    first = net.get_submodule("layers.0.proj")
    assert type(first) is flop.InputMaskedLinear
    assert torch.equal(first.weight, trained.get_submodule("layers.0.proj").weight)
    assert type(net.get_submodule("layers.1.proj")) is FactorizedLinear
    assert net.sk_arch["kwargs"]["input_masked"] == ["layers.0.proj"] and "gates" not in net.sk_arch["kwargs"]


# ----------------------------------------------------------------------------- projected layers (the SRU's n_proj)
def test_projected_layers_count_sparsity_against_their_factors(tmp_path) -> None:
    torch.manual_seed(0)
    d, r = 16, 4
    model = flop.factorize(build("sru_lm", d_model=d, layers=3), init="random", rank=r, counts_factors=True)
    plain = flop.factorize(build("sru_lm", d_model=d, layers=3), init="random", rank=r)
    factored = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    assert factored == ["layers.1.proj", "layers.2.proj"]
    for m in (model, plain):
        with torch.no_grad():
            for layer in flop.gated_layers(m).values():
                layer.log_alpha.fill_(20.0)  # every gate kept
    # the official code's denominator: (in + out) r per projected layer, in * out for the input-masked one
    total = 2 * (d + 3 * d) * r + d * 3 * d
    assert sum(x.n_prunable_params for x in flop.gated_layers(model).values()) == total
    assert flop.hard_sparsity(model) == pytest.approx(0.0)
    assert float(flop.expected_sparsity(model).detach()) == pytest.approx(0.0, abs=1e-6)
    # against the dense matrices the same model already looks sparse, as the default counts it
    assert flop.hard_sparsity(plain) == pytest.approx(1 - total / (3 * d * 3 * d))
    # the sparsity base is part of the saved architecture
    x = torch.randint(0, 256, (1, 8))
    plan = flop.prune(model.eval(), x)
    assert plan.meta["params_prunable"] == total
    sk.save(model, tmp_path / "m.sk")
    back = sk.load(tmp_path / "m.sk")
    assert all(m.counts_factors for m in flop.factorized_layers(back).values())
    assert flop.hard_sparsity(back) == pytest.approx(0.0)


def test_run_lm_n_proj_factorizes_at_the_projection_rank() -> None:
    corpus = pystdlib()
    cfg = TrainConfig(max_steps=4, batch_size=4, optimizer="adam", lr=3e-3, schedule="noam", warmup_steps=2,
                      progress=False, device="cpu")
    run = flop.run_lm("sru_lm", corpus, cfg, target=0.3, model_kwargs={"d_model": 16, "layers": 2}, seq_len=16,
                      eval_bytes=1000, n_proj=5)
    assert run.report["n_proj"] == 5 and run.report["ranks"]["layers.1.proj"][1] == 5
    assert run.report["ranks"]["layers.0.proj"][1] == 16  # the first layer keeps its input mask
    assert run.report["compiled_vs_masked_max_rel_err"] <= 1e-4
    trained = flop.factorize(build("sru_lm", d_model=16, layers=2), gates=False)
    with pytest.raises(ValueError, match="n_proj=5: start_from is a factorized model"):
        flop.run_lm("sru_lm", corpus, cfg, target=0.3, start_from=trained, seq_len=16, n_proj=5)
