"""TAS: differentiable expected FLOPs, the argmax architecture as a plan with removed blocks, a short search
that lands in the FLOPs band, and distillation through the trainer's teacher path."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sparsekern.methods import tas

import sparsekern as sk
from sparsekern.data import digits, loader
from sparsekern.models import build
from sparsekern.plan import Plan, PlanError
from sparsekern.train import Hook, TrainConfig, evaluate, train
from tests.conftest import assert_close_to_scale, randomize_bn, training_backend

SIZE = 12


def _random_logits(net: tas.TASResNet, seed: int, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def test_search_space_and_channel_interpolation() -> None:
    assert tas.width_choices(16) == (4, 6, 8, 9, 11, 12, 14, 16)
    assert tas.width_choices(64) == (19, 25, 32, 38, 44, 51, 57, 64)
    assert tas.depth_choices(9) == (1, 3, 5, 7, 9)
    assert tas.depth_choices(18) == (1, 3, 5, 7, 9, 11, 13, 15, 17, 18)
    assert tas.depth_choices(3) == (1, 2, 3) and tas.depth_choices(1) == (1,)
    x = torch.arange(4.0).reshape(1, 4, 1, 1)
    assert tas.channel_interpolate(x, 2).flatten().tolist() == [0.5, 2.5]  # averages of channel pairs
    assert tas.channel_interpolate(x[:, :2], 4).flatten().tolist() == [0.0, 0.0, 1.0, 1.0]  # stretched


def test_search_space_is_one_width_choice_per_conv_the_official_size_for_resnet56() -> None:
    """The paper's space: one width choice per conv, block outputs included. ResNet-56 has 3 stages of 9 basic
    blocks: the stem plus 2 convs per block is 1 + 2 * 27 = 55 = depth - 1 choices (the official code asserts
    ``len(Ranges) + 1 == depth``); a projection shortcut shares its block's conv2 choice."""
    model = build("resnet56")
    net = tas.TASResNet(model, torch.randn(1, 3, SIZE, SIZE))
    blocks = sum(len(stage) for stage in (model.layer1, model.layer2, model.layer3))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in n]
    assert len(convs) == 1 + 2 * blocks == model.depth - 1 == 55
    assert [w.name for w in net.widths] == convs == [w.layer for w in net.widths]
    assert len(net.width_logits) == 55 and [len(d) for d in net.depth_logits] == [5, 5, 5]
    for w in net.widths:
        assert w.choices == tas.width_choices(model.get_submodule(w.name).out_channels)
    # the stream convs of each stage: the stem (stage 1) and every block's conv2
    assert [[net.widths[i].name for i in ids] for ids in net.stream_vars] == [
        (["conv1"] if s == 1 else []) + [f"layer{s}.{b}.conv2" for b in range(9)] for s in (1, 2, 3)]
    assert net.layers[1][0].downsample.choices == net.widths[net.outer_var[1][0]].choices


def test_residual_adds_pad_the_narrower_tensor_with_zeros() -> None:
    a, b = torch.randn(2, 5, 3, 3), torch.randn(2, 3, 3, 3)
    out = tas.add_padded(a, b)
    assert torch.equal(out[:, :3], a[:, :3] + b) and torch.equal(out[:, 3:], a[:, 3:])
    assert torch.equal(tas.add_padded(b, a), out)


def test_temperature_follows_the_official_cosine_once_per_epoch() -> None:
    """tau(e) = 0.1 + 9.9 (1 + cos(pi e / E)) / 2 at the start of epoch e of E, constant within the epoch."""
    assert tas.TAU == (10.0, 0.1)
    epochs = 4
    expected = [0.1 + 9.9 * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert [tas.cosine_temperature(e, epochs) for e in range(epochs)] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == 10.0 and expected[2] == pytest.approx(5.05)
    net = tas.TASResNet(build("resnet20"), torch.randn(1, 3, SIZE, SIZE))
    seen: list[tuple[int, int, float]] = []

    class Record(Hook):
        def on_step_start(self, state) -> None:
            seen.append((state.epoch, state.step, net.tau))

    data = (torch.randn(12, 3, SIZE, SIZE), torch.randint(0, 10, (12,)))
    config = TrainConfig(epochs=epochs, batch_size=4, lr=0.01, progress=False, seed=0, device="cpu")
    train(net, data, config, hooks=[tas.TemperatureHook(net), Record()], params=net.weight_parameters())
    assert [e for e, _, _ in seen] == [e for e in range(epochs) for _ in range(3)]
    assert [t for _, _, t in seen] == pytest.approx([expected[e] for e, _, _ in seen], rel=1e-12)
    seen.clear()
    train(net, data, config, hooks=[tas.TemperatureHook(net, schedule="linear"), Record()],
          params=net.weight_parameters())
    assert [t for _, _, t in seen] == pytest.approx([10.0 - 9.9 * s / 11 for s in range(12)], rel=1e-12)


def test_search_starts_from_its_own_random_initialisation() -> None:
    """The searchable network's weights come from a seeded fresh initialisation, not from the model passed in:
    two models with different weights give the same searchable network, and the search run from them the same
    result; ``init="model"`` (the option) copies the model's weights."""
    x = torch.randn(2, 3, SIZE, SIZE)
    torch.manual_seed(1)
    trained = randomize_bn(build("resnet20"))
    torch.manual_seed(2)
    other = randomize_bn(build("resnet20"))
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    a, b = tas.TASResNet(trained, x, seed=3), tas.TASResNet(other, x, seed=3)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.conv1.conv.weight, trained.conv1.weight)
    assert torch.equal(a.conv1.bns[-1].weight, torch.ones(16))  # fresh BN, not the model's randomised one
    copied = tas.TASResNet(trained, x, seed=3, init="model")
    assert torch.equal(copied.conv1.conv.weight, trained.conv1.weight)
    assert torch.equal(copied.conv1.bns[-1].running_var, trained.bn1.running_var)
    data = (torch.randn(16, 3, SIZE, SIZE), torch.randint(0, 10, (16,)))
    found = [tas.search(m, x, data, 0.6, epochs=1, batch_size=4, seed=3).network for m in (trained, other)]
    assert all(torch.equal(v, found[1].state_dict()[k]) for k, v in found[0].state_dict().items())
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the model is untouched


def test_expected_flops_gradients_match_finite_differences_and_corners_are_exact() -> None:
    model = build("resnet20").eval()
    net = tas.TASResNet(model, torch.randn(2, 3, SIZE, SIZE)).double()
    _random_logits(net, 0)
    full = net.full_flops
    value = net.expected_flops() / full
    params = net.arch_parameters()
    grads = torch.autograd.grad(value, params)
    assert all(g.abs().min() > 0 for g in grads)  # every width and depth logit moves E[F]
    h = 1e-6
    with torch.no_grad():
        for p, g in zip(params, grads):
            for i in range(p.numel()):
                p.view(-1)[i] += h
                up = float(net.expected_flops()) / full
                p.view(-1)[i] -= 2 * h
                down = float(net.expected_flops()) / full
                p.view(-1)[i] += h
                assert abs((up - down) / (2 * h) - float(g.view(-1)[i])) < 1e-7
    # a (numerically) deterministic distribution: E[F] is that architecture's FLOPs
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.zero_()[torch.randint(p.numel(), (1,), generator=gen)] = 60.0
    with torch.no_grad():
        assert abs(float(net.expected_flops()) / net.argmax_flops() - 1) < 1e-12
    assert net.flops_of([w.channels for w in net.widths], net.blocks_per_stage) == sk.flops(model, torch.randn(1, 3, SIZE, SIZE)).total


def test_argmax_plan_compiles_to_the_network_the_search_evaluates() -> None:
    model = randomize_bn(build("resnet20"))
    x = torch.randn(3, 3, SIZE, SIZE)
    net = tas.TASResNet(model, x)
    _random_logits(net, 0)  # depths 1/3/1 with this seed: blocks removed in two stages
    net.mode = "argmax"
    net.eval()
    plan = tas.derive_plan(net, x)
    assert plan.removed_blocks == net.removed_blocks() and len(plan.removed_blocks) == 4
    # the stream convs chose different widths; the plan keeps each stream at the widest kept one
    widths, streams = net.argmax_widths(), net.argmax_streams()
    assert len({widths[i] for i in net.stream_vars[1]}) > 1 and streams[1] == max(widths[i] for i in net.stream_vars[1])
    assert len(plan.channels["layer2.0.conv2"].keep) == streams[1]
    source = net.export().eval()
    fast = sk.compile(source, plan, x)
    with torch.no_grad():
        assert_close_to_scale(fast(x), net(x))
        assert_close_to_scale(fast(x), sk.masked(source, plan, x)(x))
    assert sk.flops(fast, x).total == 3 * net.argmax_flops()  # the search's FLOP count is the compiled one
    names = {n for n, _ in fast.named_modules()}
    assert not any(n.startswith(b + ".conv") for b in plan.removed_blocks for n in names)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    with torch.no_grad():
        assert torch.equal(sk.compile(source, again, x)(x), fast(x))


def test_flop_loss_follows_the_tolerance_rule() -> None:
    e = torch.tensor(40e6, requires_grad=True)
    below, inside, above = tas.flop_loss(e, 30e6, 50e6, 5e6), tas.flop_loss(e, 47e6, 50e6, 5e6), tas.flop_loss(e, 51e6, 50e6, 5e6)
    assert inside is None
    assert float(below.detach()) == pytest.approx(-torch.log(torch.tensor(40.0)).item())
    assert float(above.detach()) == pytest.approx(torch.log(torch.tensor(40.0)).item())
    with pytest.raises(PlanError, match="out of reach"):
        tas.search(build("resnet20"), torch.randn(1, 3, SIZE, SIZE), (torch.randn(4, 3, SIZE, SIZE), torch.zeros(4)), 0.01)
    with pytest.raises(PlanError, match="CIFAR ResNets"):
        tas.TASResNet(build("vgg16_bn"), torch.randn(1, 3, 32, 32))


def test_search_keeps_the_last_architecture_inside_the_band() -> None:
    net = tas.TASResNet(build("resnet20"), torch.randn(1, 3, SIZE, SIZE))
    _random_logits(net, 0)
    found = net.argmax_flops()
    hook = tas.FlopLossHook(net, target=found + 1000, tolerance=0.05 * net.full_flops)
    hook.after_step(SimpleNamespace(stage="main", step=3))  # weight steps do not count
    assert hook.feasible is None
    hook.after_step(SimpleNamespace(stage="arch", step=4))
    _random_logits(net, 1)  # a later step leaves the band ...
    assert not hook.in_band(net.argmax_flops())
    hook.after_step(SimpleNamespace(stage="arch", step=5))
    assert hook.restore_feasible() and hook.feasible_step == 4  # ... and the in-band logits come back
    assert net.argmax_flops() == found and not hook.restore_feasible()


SEEDS = (0, 1, 2)  # the search's claim is asserted on each of these seeds (teacher, halves, logits, trainer)
SEARCH_SIZE = 8  # the searches run on 8 px digits: 1.6x cheaper than 12 px, the same outcomes (seeds 0-5)


@pytest.fixture(scope="module")
def seeded() -> dict[int, dict]:
    """Per seed: a resnet20 trained 2 epochs on 8 px digits (the teacher, 94-96%), and a 3-epoch TAS search at
    50% FLOPs from random initialisation (the teacher's architecture only)."""
    train_set, test_set = digits("train", image_size=SEARCH_SIZE), digits("test", image_size=SEARCH_SIZE)
    x = test_set.tensors[0][:2]
    out = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        teacher = build("resnet20")
        with training_backend():
            train(teacher, train_set, TrainConfig(epochs=2, lr=0.1, batch_size=64, progress=False, seed=seed))
            teacher.eval()
            plan, source = tas.prune_to_budget(teacher, x, train_set, 0.5, epochs=3, seed=seed)
        out[seed] = {"teacher": teacher, "plan": plan, "source": source, "x": x, "train": train_set, "test": test_set}
    return out


@pytest.fixture(scope="module")
def searched(seeded) -> dict:
    return seeded[SEEDS[0]]


def test_short_search_lands_in_the_flops_band(seeded: dict) -> None:
    """TAS's claim: the FLOP loss drives the searched architecture into its accepted band [budget - tolerance,
    budget]. These 3-epoch searches start from an argmax architecture mostly far below the band; every one ends
    closer to the band than it started, and most land in it (seen: seeds 0-7 all in band on one machine, 0.451
    to 0.500; on another, seeds 1-2 in band and seed 0 at 0.562, with the warning that it missed)."""
    starts, landed = [], 0
    lo, hi = 0.5 - tas.FLOP_TOLERANCE, 0.5

    def distance(r: float) -> float:  # to the band
        return max(lo - r, r - hi, 0.0)

    for seed, searched in seeded.items():
        plan, source, x, teacher = searched["plan"], searched["source"], searched["x"], searched["teacher"]
        fast = sk.compile(source, plan, x).eval()
        ratio = sk.flops(fast, x).total / sk.flops(teacher, x).total
        landed += lo <= ratio <= hi
        assert ratio == pytest.approx(plan.meta["flops_ratio"], abs=1e-12)
        assert plan.meta["method"] == "tas" and set(plan.meta["depths"]) == {"layer1", "layer2", "layer3"}
        with torch.no_grad():
            assert_close_to_scale(fast(x), sk.masked(source, plan, x)(x))
        start = tas.TASResNet(teacher, x, seed=seed)
        starts.append(start.argmax_flops() / start.full_flops)
        assert distance(ratio) < distance(starts[-1]) or distance(ratio) == 0.0, (seed, starts[-1], ratio)
    assert landed >= len(seeded) - 1, landed
    # the searches start from random logits whose argmax architecture mostly lies below the band (seen: 0.26,
    # 0.47, 0.40 on seeds 0-2; 0.16 to 0.47 over seeds 0-7, where all eight searches land in the band)
    assert sum(r < 0.5 - tas.FLOP_TOLERANCE for r in starts) >= 2, starts


def test_a_search_that_misses_the_band_says_so(searched: dict) -> None:
    """One architecture step cannot take seed 0's start (0.26 of the FLOPs) into the band: the search warns."""
    with pytest.warns(UserWarning, match=r"no architecture step reached the FLOPs band \[45%, 50%\]"):
        result = tas.search(searched["teacher"], searched["x"], searched["train"], 0.5, epochs=1, max_steps=1, seed=0)
    assert not 0.45 <= result.flops_found / result.flops_full <= 0.5


class _Capture(Hook):
    def __init__(self) -> None:
        self.seen: dict = {}

    def after_backward(self, state) -> None:
        if not self.seen:
            x, y = state.batch[:2]
            self.seen = {"x": x, "y": y, "out": state.extra["outputs"].detach(),
                         "teacher": state.extra["teacher_outputs"], "loss": state.metrics["loss"]}


def test_distillation_objective_is_the_papers_and_training_learns(seeded: dict) -> None:
    """The loss is the paper's (checked on seed 0's first step); on every seed 2 epochs of distillation take the
    pruned network from chance to > 80% (seen: 92-96% over seeds 0-5; 88-93% on 12 px digits)."""
    for seed, searched in seeded.items():
        teacher, test = searched["teacher"], searched["test"]
        pruned = sk.compile(searched["source"], searched["plan"], searched["x"])
        capture = _Capture()
        with training_backend():
            result = tas.train_pruned(pruned, teacher, searched["train"], epochs=2, eval_data=test, hooks=[capture])
        if seed == SEEDS[0]:
            s = capture.seen
            with torch.no_grad():
                # teacher in eval mode (train-mode BN would differ by O(1)); the fp32 rule, since the trainer ran
                # with oneDNN's convolution and this check runs with the native one
                assert_close_to_scale(s["teacher"], teacher.eval()(s["x"]))
            t, a = tas.DISTILL_TEMPERATURE, tas.DISTILL_ALPHA
            p_t = F.softmax(s["teacher"] / t, 1)
            kl = (p_t * (p_t.log() - F.log_softmax(s["out"] / t, 1))).sum(1).mean()
            expected = (1 - a) * F.cross_entropy(s["out"], s["y"]) + a * t * t * kl
            assert s["loss"] == pytest.approx(float(expected), rel=1e-5)
        fresh = tas.reinitialise(sk.compile(searched["source"], searched["plan"], searched["x"]))
        before = evaluate(fresh, loader(test, 512, shuffle=False))["accuracy"]
        assert result.final["accuracy"] > 0.8 > before + 0.5, (seed, before, result.final)
        assert isinstance(pruned, nn.Module)
        assert sk.flops(pruned, searched["x"]).total < sk.flops(teacher, searched["x"]).total


def test_declared_prune_options_reach_the_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's method options (a recipe's search batch size, lrs and temperature) reach tas.search."""
    from sparsekern.methods.registry import PruneContext, get_method

    seen = {}

    def fake_prune_to_budget(model, x, data, budget, **kwargs):
        seen.update(kwargs)
        return "plan", model

    monkeypatch.setattr(tas, "prune_to_budget", fake_prune_to_budget)
    method = get_method("tas")
    assert set(method.prune_options) == {"batch_size", "lr", "arch_lr", "tau"}
    ctx = PruneContext(example_inputs=torch.randn(2, 3, 8, 8), train_data=None, seed=3, search_epochs=2.0,
                       options={"batch_size": 256, "tau": [5.0, 0.1], "unrelated": 1})
    method.prune(torch.nn.Linear(2, 2), 0.5, ctx)
    assert seen["batch_size"] == 256 and seen["tau"] == (5.0, 0.1) and "unrelated" not in seen
    assert seen["seed"] == 3 and seen["epochs"] == 2.0
