"""ANP-VS: the beta-Bernoulli mask's statistics (KL, E[pi], relaxed samples) against Monte Carlo, mask
placement, folding and pruning that compile exactly (residual groups, FC-input masks), the data-range PGD
adversary, and the method's claims on digits: the masks prune channels, PGD is far stronger than random
noise at the same eps, and the VS loss reduces the feature distortion |f(x) - f(x_adv)| at similar sparsity
(the mechanism behind the paper's robustness claim; the accuracy effect itself is too noisy at this size)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern.data import digits
from sparsekern.methods import anp
from sparsekern.models import build
from sparsekern.plan import PlanError
from sparsekern.train import Hook, TrainConfig, train
from tests.conftest import assert_close_to_scale, training_backend

TINY_VGG = [16, "M", 32, 64]  # on 8x8 digits; masks on 3 conv outputs (112 channels) and the FC input (64)
SIZE = 8
EPS, STEP = 0.1, 0.025  # fractions of the data range (pixel units): digits need a larger radius than CIFAR's 0.03
VS_TEST = 3.0  # lambda for the test's short run (the paper's 1e-4 barely moves a 92-step run)


@pytest.fixture(scope="module")
def data():
    return digits("train", image_size=SIZE), digits("test", image_size=SIZE)


SEEDS = (0, 1, 2)  # every claim below is asserted over these seeds (dense training and ANP run alike)
# Mask learning rate of the short run. Adam moves a mask parameter by at most ~lr per step, so over the run's
# 69 steps (lr / 10 at 50% and 80%) a_raw can travel ~0.6 * 69 * lr. With lr = 0.1 that is ~4, about what
# reaching the pruning threshold takes, and the number of dead channels then depends on the seed (3 to 11 over
# seeds 0-4 at 4 epochs); with 0.2 the masks have room, and 39 to 51 channels die over seeds 0-4.
MASK_LR = 0.2


def _dense(train_set, seed: int) -> nn.Module:
    """The trained starting point: a tiny VGG, 5 plain epochs (94-96% test accuracy over seeds 0-4)."""
    torch.manual_seed(seed)
    model = build("vgg16_bn", cfg=TINY_VGG)
    with training_backend():
        train(model, train_set, TrainConfig(epochs=5, lr=0.05, batch_size=64, progress=False, seed=seed))
    return model.eval()


@pytest.fixture(scope="module")
def seeded(data):
    """Per seed: the dense start, then ANP (lambda = 0) and ANP-VS from it with the same seed and schedule:
    3 epochs, 3-step PGD."""
    train_set, _ = data
    x = train_set.tensors[0][:1]
    out = {}
    for seed in SEEDS:
        dense = _dense(train_set, seed)
        runs = {"dense": dense}
        for key, lam in (("anp", 0.0), ("anp_vs", VS_TEST)):
            with training_backend():
                net, result = anp.train_anp(copy.deepcopy(dense), train_set, x, epochs=3, eps=EPS, step=STEP,
                                            steps=3, vs_weight=lam, mask_lr=MASK_LR, seed=seed)
            runs[key] = (net.eval(), result)
        out[seed] = runs
    return out


@pytest.fixture(scope="module")
def dense(seeded):
    return seeded[SEEDS[0]]["dense"]


@pytest.fixture(scope="module")
def runs(seeded):
    """Seed 0's runs, for the mechanical checks (folding, budgets, baselines) that hold for any run."""
    return {k: v for k, v in seeded[SEEDS[0]].items() if k != "dense"}


def _eval_attack(test):
    return anp.data_range_pgd(test, EPS, STEP, 10)


# ----------------------------------------------------------------------------- the mask
def _kumaraswamy_samples(a: float, b: float, n: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(n, generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    return (1 - u ** (1 / b)) ** (1 / a)


@pytest.mark.parametrize("a, b", [(2.0, 1.0), (0.5, 1.5), (1.2, 0.7)])
def test_kl_and_mean_match_monte_carlo(a: float, b: float) -> None:
    g = torch.Generator().manual_seed(0)
    pi = _kumaraswamy_samples(a, b, 400_000, g)
    alpha = 0.5  # a prior the estimator can resolve; the formula is the same for alpha = 1e-4
    log_q = math.log(a * b) + (a - 1) * pi.log() + (b - 1) * torch.log1p(-pi ** a)
    log_p = math.log(alpha) + (alpha - 1) * pi.log()  # Beta(alpha, 1) density: alpha pi^(alpha - 1)
    mc = float((log_q - log_p).mean())
    kl = float(anp.kumaraswamy_beta_kl(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), alpha))
    assert kl == pytest.approx(mc, abs=0.01)
    mask = anp.BetaBernoulliMask(1, a_init=0.0)
    with torch.no_grad():
        mask.a_raw.fill_(math.log(math.expm1(a)))
        mask.b_raw.fill_(math.log(math.expm1(b)))
    assert float(mask.expected_pi().detach()) == pytest.approx(float(pi.mean()), abs=2e-3)


def test_relaxed_training_masks_average_to_the_expected_keep_probability() -> None:
    torch.manual_seed(0)
    mask = anp.BetaBernoulliMask(3, a_init=2.0)
    with torch.no_grad():
        mask.a_raw.copy_(torch.tensor([2.0, -1.0, -8.0]))
    z = torch.stack([mask.sample(64) for _ in range(400)])  # (400, 64, 3): a fresh pi per call, z per example
    assert z.min() >= 0 and z.max() <= 1
    assert torch.allclose(z.mean(dim=(0, 1)), mask.expected_pi().detach(), atol=0.02)
    assert float(((z > 0.05) & (z < 0.95)).float().mean()) < 0.1  # temperature 0.1: nearly binary
    e = mask.expected_pi().detach()
    assert e[2] <= anp.THRESHOLD < e[1]
    assert torch.equal(mask.test_mask().detach() == 0, torch.tensor([False, False, True]))


def test_masks_sit_on_conv_outputs_before_bn_and_on_fc_inputs() -> None:
    net = anp.ANPNet(build("resnet20"), torch.randn(1, 3, 16, 16))
    sites = {s.layer: s for s in net.sites}
    assert len(sites) == 22  # 21 convs (stem, 18 in blocks, 2 projections) and the classifier
    assert sites["layer2.0.conv1"] == anp.MaskSite("layer2.0.conv1", "conv_out", 32, "layer2.0.bn1")
    assert sites["layer2.0.downsample.0"].norm == "layer2.0.downsample.1"
    assert sites["fc"] == anp.MaskSite("fc", "fc_in", 64)
    conv = [m for s, m in zip(net.sites, net.masks) if s.kind == "conv_out"]
    assert all(torch.allclose(m.a, nn.functional.softplus(torch.tensor(2.0))) for m in conv)
    assert torch.allclose(net.masks[-1].a, nn.functional.softplus(torch.tensor(-1.0)))
    assert torch.allclose(net.masks[0].b, torch.tensor(1.0), atol=1e-4)


# ----------------------------------------------------------------------------- folding and plans
def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model


def test_fold_and_plan_equal_the_test_time_network_across_residual_groups() -> None:
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    net = anp.ANPNet(_randomize(build("resnet20"), 1), x[:1])
    at = {s.layer: i for i, s in enumerate(net.sites)}
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in net.masks:
            m.a_raw.copy_(torch.randn(m.channels, generator=g))
        for layer in ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"):  # every producer of stage 1
            net.masks[at[layer]].a_raw[3] = -10.0
        net.masks[at["layer1.1.conv2"]].a_raw[7] = -10.0  # one producer only: the channel stays
        net.masks[at["layer2.1.conv1"]].a_raw[:5] = -10.0
        net.masks[at["fc"]].a_raw[10:20] = -10.0  # stage 3 also feeds convs: FC-input zeros prune nothing
    net.eval()
    plan, folded = anp.prune(net)
    assert {g: k.n_keep for g, k in plan.channels.items()} == {"conv1": 15, "layer2.1.conv1": 27}
    assert 3 not in plan.channels["conv1"].keep
    folded.eval()
    with torch.no_grad():
        ref = net(x)
        assert_close_to_scale(folded(x), ref)
        assert_close_to_scale(sk.masked(folded, plan, x[:1]).eval()(x), ref)
        assert_close_to_scale(sk.compile(folded, plan, x[:1]).eval()(x), ref)
    assert net.model is not folded and torch.count_nonzero(net.model.conv1.weight[3]) > 0  # the net is untouched


def test_fc_input_masks_prune_the_channels_no_one_reads() -> None:
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    net = anp.ANPNet(_randomize(build("vgg16_bn", cfg=TINY_VGG), 3), x[:1])
    with torch.no_grad():
        net.masks[-1].a_raw[:12] = -10.0  # the classifier ignores channels 0..11 of the last conv
    plan, folded = anp.prune(net.eval())
    assert plan.channels["features.7"].keep == tuple(range(12, 64))
    with torch.no_grad():
        assert_close_to_scale(sk.compile(folded, plan, x[:1]).eval()(x), net(x))


# ----------------------------------------------------------------------------- the adversary
def test_data_range_pgd_scales_eps_to_the_data(data) -> None:
    _, test = data
    lo, hi = anp.data_range(test)
    assert lo.shape == (1, 3, 1, 1) and float(hi.min() - lo.max()) > 2.5  # digits: pixel 0..1 -> about -0.8..1.8
    attack = anp.data_range_pgd(test, EPS, STEP, 0)
    x = test.tensors[0][:64]
    x_adv = attack(nn.Identity(), x, test.tensors[1][:64])
    assert float((x_adv - x).abs().max()) <= float((EPS * (hi - lo)).max()) + 1e-6
    assert (x_adv >= lo).all() and (x_adv <= hi).all()
    assert float((x_adv - x).abs().max()) > 0.9 * float((EPS * (hi - lo)).max())


def test_pgd_is_far_stronger_than_noise_at_the_same_eps(data, seeded) -> None:
    """On every seed's dense and ANP-VS model: uniform noise in the eps-ball costs at most 5 points (seen: at
    most 3.4), 10-step PGD at least 40% of the accuracy noise leaves (seen: 53% to 99%; in absolute terms 28 to
    94 points, the ANP-VS models of this short fixture being 46-95% accurate depending on seed and machine)."""
    _, test = data
    for seed, runs in seeded.items():
        for key, model in (("dense", runs["dense"]), ("anp_vs", runs["anp_vs"][0])):
            r = anp.robustness(model, test, EPS, step=STEP, steps=10, noise=True)
            assert r["noise_accuracy"] > r["clean_accuracy"] - 0.05, (seed, key, r)  # random directions barely matter
            assert r["pgd_accuracy"] < 0.6 * r["noise_accuracy"], (seed, key, r)  # ... the gradient's direction does


# ----------------------------------------------------------------------------- the method's claims
def test_anp_masks_prune_channels_and_the_plan_compiles_exactly(data, seeded) -> None:
    """The beta-Bernoulli masks kill channels: on every seed at least 25 of the 176 masked channels reach
    E[pi] <= 1e-3 (seen: 39 to 51 over seeds 0-4) and the plan removes at least 15% of the FLOPs (seen:
    28 to 40%). Untrained masks kill none (E[pi] starts at 0.68 on conv outputs, 0.24 on the FC input)."""
    _, test = data
    x = test.tensors[0][:32]
    for seed, runs in seeded.items():
        net, result = runs["anp_vs"]
        dead = {s.layer: int((m.expected_pi() <= anp.THRESHOLD).sum()) for s, m in zip(net.sites, net.masks)}
        print(f"seed {seed}: E[pi] <= 1e-3 per site:", dead)
        assert sum(dead.values()) >= 25, (seed, dead)
        assert result.history[-1]["train_active"] < 1.0
        plan, folded = anp.prune(net)
        assert plan.channels and plan.meta["flops_ratio"] < 0.85, (seed, plan.meta["flops_ratio"])
        with torch.no_grad():
            ref = net(x)
            assert_close_to_scale(folded.eval()(x), ref)
            assert_close_to_scale(sk.masked(folded, plan, x[:1]).eval()(x), ref)
            assert_close_to_scale(sk.compile(folded, plan, x[:1]).eval()(x), ref)
    fresh = anp.ANPNet(build("vgg16_bn", cfg=TINY_VGG), x[:1])
    assert all(int((m.expected_pi() <= anp.THRESHOLD).sum()) == 0 for m in fresh.masks)


def test_vulnerability_suppression_reduces_feature_distortion_at_similar_sparsity(data, seeded) -> None:
    """The paper's mechanism: the VS loss shrinks the latent distortion |f(x) - f(x_adv)|, which the paper credits
    for ANP-VS's higher PGD accuracy. At this size the accuracy effect is not reliable (over seeds 0-4 it ranges
    from -0.3 to +6.7 points after these 3 epochs; it was -5 points after 12 epochs in an earlier setting), while
    the distortion drop holds in every run. So the test checks the mechanism, over 3 seeds, and only that both
    runs keep a real robustness at a similar sparsity.

    Seen over seeds 0-4 (ANP-VS / ANP): train VS term 0.84-0.90, held-out distortion 0.86-0.91, |active
    fraction difference| <= 0.011, PGD accuracy minus the dense model's >= 0.10."""
    _, test = data
    attack = _eval_attack(test)
    ratios = {}
    for seed, runs in seeded.items():
        rows = {}
        for key in ("anp", "anp_vs"):
            net, result = runs[key]
            rows[key] = (net.active_fraction(), anp.feature_distortion(net, test, attack),
                         anp.robustness(net, test, EPS, step=STEP, steps=10)["pgd_accuracy"],
                         result.history[-1]["train_vulnerability"])
        dense_pgd = anp.robustness(runs["dense"], test, EPS, step=STEP, steps=10)["pgd_accuracy"]
        (act0, dist0, pgd0, tv0), (act1, dist1, pgd1, tv1) = rows["anp"], rows["anp_vs"]
        ratios[seed] = {"tv": tv1 / tv0, "dist": dist1 / dist0, "active": abs(act0 - act1),
                        "robust": min(pgd0, pgd1) - dense_pgd}
        print(f"seed {seed}: active, distortion, PGD acc, train VS: {rows}; dense PGD {dense_pgd:.3f}")
    print("VS / plain ANP per seed:", ratios)
    median = {k: float(np.median([r[k] for r in ratios.values()])) for k in ("tv", "dist", "active", "robust")}
    # every seed: VS lowers the term it trains (< 0.95x) and never raises the held-out distortion, at a
    # similar sparsity (within 5 points of active channels), and both runs are more robust than the dense model
    for seed, r in ratios.items():
        assert r["tv"] < 0.95 and r["dist"] < 1.0 and r["active"] < 0.05 and r["robust"] > 0.05, (seed, r)
    # the median seed: a clear drop of the held-out distortion (>= 5%) at nearly the same sparsity
    assert median["dist"] < 0.95 and median["tv"] < 0.92 and median["active"] < 0.03 and median["robust"] > 0.1, median


def test_budget_prunes_the_smallest_expected_keep_probabilities(data, runs) -> None:
    train_set, test = data
    net = copy.deepcopy(runs["anp_vs"][0])
    natural, _ = anp.prune(net)
    plan, folded = anp.prune(net, flops_budget=0.5)
    s = plan.meta["search"]
    assert natural.meta["flops_ratio"] > 0.5  # ANP alone stays above the budget, so the budget binds
    # the closest keep count: within 0.1%, or within half of the one boundary channel's FLOPs (granularity)
    assert s["within_tolerance"] or s["error"] <= s["step"] / 2
    assert abs(plan.meta["flops_ratio"] - 0.5) == pytest.approx(0.5 * s["error"])
    for g, k in natural.channels.items():
        assert set(plan.channels[g].keep) <= set(k.keep)  # ANP's own prunings stay pruned
    x = test.tensors[0][:32]
    with torch.no_grad():
        assert_close_to_scale(sk.compile(folded, plan, x[:1]).eval()(x), net.eval()(x))
    with pytest.raises(PlanError, match="fraction"):
        anp.prune(net, flops_budget=0.0)


def test_adversarial_training_baseline_at_the_same_channel_counts(data, dense, runs) -> None:
    train_set, test = data
    net, _ = runs["anp_vs"]
    plan, _ = anp.prune(net)
    model = copy.deepcopy(dense)
    with training_backend():
        anp.adversarial_training(model, train_set, epochs=3, eps=EPS, step=STEP, steps=3, seed=0)
    x = test.tensors[0][:1]
    base = anp.magnitude_plan(model, x, plan)
    assert {g: k.n_keep for g, k in base.channels.items()} == {g: k.n_keep for g, k in plan.channels.items()}
    pruned = sk.compile(model.eval(), base, x).eval()
    assert sk.flops(pruned, x).total == sk.flops(sk.compile(anp.fold(net), plan, x), x).total  # same FLOPs
    r_at = anp.robustness(model, test, EPS, step=STEP, steps=10)
    r_base = anp.robustness(pruned, test, EPS, step=STEP, steps=10)
    r_anp = anp.robustness(net, test, EPS, step=STEP, steps=10)
    print("AT dense:", r_at, "AT + magnitude pruning:", r_base, "ANP-VS:", r_anp)
    assert r_at["pgd_accuracy"] > 0.2  # the baseline is a real adversarially trained network (seen: 0.41)


# ----------------------------------------------------------------------------- the official code's attack and VGG
class _Phase(Hook):
    """Keeps the trainer's state, so that instrumentation can read the phase (attack, clean, adversarial)."""

    state = None

    def on_train_start(self, state) -> None:
        self.state = state


def _instrumented_run(monkeypatch, eval_attack: bool) -> list[tuple[str, str, object]]:
    """Two training steps of ANP-VS on a tiny two-FC VGG; per mask call and BN call in the attack and the two
    training forwards: (phase, "mask", "sample" | "expected") or (phase, "bn", bn.training)."""
    phase, log = _Phase(), []
    sample, test_mask = anp.BetaBernoulliMask.sample, anp.BetaBernoulliMask.test_mask

    def record(entry) -> None:
        if phase.state is not None and phase.state.phase in ("attack", "clean", "adversarial"):
            log.append((phase.state.phase,) + entry)

    def logged_sample(self, n):
        record(("mask", "sample"))
        return sample(self, n)

    def logged_test_mask(self):
        record(("mask", "expected"))
        return test_mask(self)

    monkeypatch.setattr(anp.BetaBernoulliMask, "sample", logged_sample)
    monkeypatch.setattr(anp.BetaBernoulliMask, "test_mask", logged_test_mask)
    torch.manual_seed(0)
    model = anp.build_model("vgg16_bn", cfg=TINY_VGG)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.register_forward_pre_hook(lambda mod, args: record(("bn", mod.training)))
    x, y = torch.randn(16, 3, SIZE, SIZE), torch.randint(0, 10, (16,))
    net, _ = anp.train_anp(model, (x, y), x[:1], epochs=1, batch_size=8, steps=2, eps=EPS, step=STEP,
                           eval_attack=eval_attack, hooks=[phase])
    assert phase.state.step == 2
    return log


def test_training_attack_sees_expected_masks_and_running_statistics(monkeypatch) -> None:
    """The authors' attack runs in test mode: E[pi] masks (no sampling) and BN running statistics; the
    training forwards after it sample masks and use batch statistics again (the flags are restored)."""
    log = _instrumented_run(monkeypatch, eval_attack=True)
    seen = {p: {(kind, v) for q, kind, v in log if q == p} for p in ("attack", "clean", "adversarial")}
    assert seen["attack"] == {("mask", "expected"), ("bn", False)}
    assert seen["clean"] == seen["adversarial"] == {("mask", "sample"), ("bn", True)}
    # per test-mode forward: 5 masks (3 conv outputs, 2 FC inputs) and 3 BN-output zeroings read E[pi];
    # 2 steps x 2 PGD iterations in the attack
    assert sum(1 for p, kind, _ in log if p == "attack" and kind == "mask") == 2 * 2 * (5 + 3)
    # the contrast: without eval_attack the attack sees the training network
    monkeypatch.undo()
    log = _instrumented_run(monkeypatch, eval_attack=False)
    assert {(kind, v) for p, kind, v in log if p == "attack"} == {("mask", "sample"), ("bn", True)}


def test_eval_attack_leaves_every_flag_and_buffer_as_it_was() -> None:
    net = anp.ANPNet(build("vgg16_bn", cfg=TINY_VGG), torch.randn(1, 3, SIZE, SIZE))
    net.train()
    net.model.features[1].eval()  # a submodule with its own flag must keep it
    flags = [m.training for m in net.modules()]
    buffers = [b.clone() for b in net.buffers()]
    x, y = torch.randn(8, 3, SIZE, SIZE), torch.randint(0, 10, (8,))
    attack = anp.data_range_pgd((x, y), EPS, STEP, 2, eval_mode=True)
    assert attack.eval_mode
    x_adv = attack(net, x, y)
    assert x_adv.shape == x.shape and not torch.equal(x_adv, x)
    assert [m.training for m in net.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(buffers, net.buffers()))


def test_paper_vgg_has_both_fc_masks_and_prunes_the_hidden_fc() -> None:
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    model = anp.build_model("vgg16_bn", cfg=TINY_VGG)
    assert model.sk_arch["kwargs"]["classifier"] == "two_fc" and anp.ANPVS.model_kwargs == anp.PAPER_MODEL_KWARGS
    net = anp.ANPNet(_randomize(model, 3), x[:1])
    fc = [s for s in net.sites if s.kind == "fc_in"]
    assert fc == [anp.MaskSite("classifier.0", "fc_in", 64), anp.MaskSite("classifier.3", "fc_in", 512)]
    at = {s.layer: i for i, s in enumerate(net.sites)}
    with torch.no_grad():
        net.masks[at["classifier.0"]].a_raw[:12] = -10.0  # the first FC ignores channels 0..11 of the last conv
        net.masks[at["classifier.3"]].a_raw[:100] = -10.0  # the last FC ignores hidden units 0..99
    plan, folded = anp.prune(net.eval())
    assert plan.channels["features.7"].keep == tuple(range(12, 64))
    assert plan.channels["classifier.0"].keep == tuple(range(100, 512))  # the hidden FC group
    with torch.no_grad():
        ref = net(x)
        assert_close_to_scale(folded.eval()(x), ref)
        assert_close_to_scale(sk.compile(folded, plan, x[:1]).eval()(x), ref)
    assert build("vgg16_bn").sk_arch["kwargs"].get("classifier") is None  # the zoo default stays one FC
