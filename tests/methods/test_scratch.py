"""Pruning from Scratch: gate placement, the gate search on a frozen random network (weights bit-identical,
BN statistics moving, gates driven sparse), the budget search within 0.1% of the FLOPs target (or the
documented granularity limit), plans that compile exactly, and Scratch-B training of the pruned network."""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sparsekern as sk
from sparsekern.data import digits
from sparsekern.graph import trace_channels
from sparsekern.methods import scratch
from sparsekern.methods.budget import plan_flops
from sparsekern.models import build
from sparsekern.plan import PlanError
from sparsekern.train import Hook
from tests.conftest import assert_close_to_scale, training_backend

TINY_VGG = [16, 32, "M", 64, 64]  # on 8x8 digits: 4 conv-BN-ReLU, 176 gated channels
SIZE = 8


@pytest.fixture(scope="module")
def data():
    return digits("train", image_size=SIZE)


SEEDS = (0, 1, 2)  # the claims (sparse gates, Scratch-B) are asserted on each of these seeds


def _search(data, seed: int):
    torch.manual_seed(seed)
    model = build("vgg16_bn", cfg=TINY_VGG)
    before = copy.deepcopy(model.state_dict())
    x = data.tensors[0][:2]
    with training_backend():
        gates, result = scratch.search_gates(model, data, x, epochs=4, batch_size=16, seed=seed)
    return model.eval(), before, gates, result, x


@pytest.fixture(scope="module")
def seeded(data):
    """Per seed: gates searched with the paper's settings (Adam 0.01, lambda 0.5, r 0.2) for 360 steps (4 epochs
    of 16) on a fresh random network."""
    return {seed: _search(data, seed) for seed in SEEDS}


@pytest.fixture(scope="module")
def searched(seeded):
    """Seed 0's search, for the mechanical checks."""
    return seeded[SEEDS[0]]


# ----------------------------------------------------------------------------- placement
def test_gates_sit_where_the_paper_puts_them() -> None:
    x32 = torch.randn(1, 3, 32, 32)
    vgg = scratch.gate_sites(build("vgg16_bn"), x32)
    assert [s.layer for s in vgg] == [f"features.{i}" for i in (1, 4, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38, 41)]
    assert all(s.group == s.producer for s in vgg) and sum(s.channels for s in vgg) == 4224  # after BN, before ReLU
    basic = scratch.gate_sites(build("resnet20"), x32)
    assert [s.layer for s in basic] == [f"layer{i}.{j}.bn1" for i in (1, 2, 3) for j in range(3)]  # middle channels
    bottleneck = scratch.gate_sites(build("resnet50"), x32)
    blocks = [f"layer{i}.{j}" for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3)) for j in range(n)]
    assert [s.layer for s in bottleneck] == [f"{b}.bn{k}" for b in blocks for k in (1, 2)]


def test_gates_multiply_the_channels_and_leave_the_model_alone() -> None:
    model = build("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    gates = scratch.ChannelGates(scratch.gate_sites(model, x))
    with torch.no_grad():
        gates.gates[0][3:] = 0.0  # only channels 0..2 of layer1.0's middle
        ref = model(x)
        with gates.attach(model):
            out = model(x)
        assert torch.equal(model(x), ref)  # hooks gone after the block
    keep = torch.zeros(16, dtype=torch.bool)
    keep[:3] = True
    plan = sk.Plan.from_channel_masks(model, {"layer1.0.conv1": keep}, x)
    assert_close_to_scale(out, sk.masked(model, plan, x)(x))


# ----------------------------------------------------------------------------- the search
def test_search_learns_only_the_gates(searched) -> None:
    model, before, gates, result, _ = searched
    after = model.state_dict()
    weights = [k for k in before if "running" not in k and "num_batches" not in k]
    assert len(weights) == 14 and all(torch.equal(before[k], after[k]) for k in weights)  # bit-identical
    moved = [k for k in before if "running_mean" in k and not torch.equal(before[k], after[k])]
    assert len(moved) == 4  # BN statistics keep following the gated features
    assert all(p.requires_grad for p in model.parameters())  # the trainer restored the flags
    assert result.steps == 4 * math.ceil(1438 / 16)


def test_gates_become_sparse(seeded) -> None:
    """The sparsity term pulls the gates' mean to r = 0.2 from their start at 1, shutting many gates while others
    stay open: a ranking, not a uniform shrink. Asserted on every seed; seen over seeds 0-4: mean 0.217-0.228,
    gates < 0.05: 31-42%, exactly 0: 26-35%, > 0.5: 14-19%, > 0.95: 4-6%, median 0.09-0.14."""
    for seed, (_, _, gates, result, _) in seeded.items():
        g = gates.flat().detach()
        stats = {"seed": seed, "mean": float(g.mean()), "median": float(g.median()),
                 **{k: float(v.float().mean()) for k, v in
                    {"<0.05": g < 0.05, "==0": g == 0, ">0.5": g > 0.5, ">0.95": g > 0.95}.items()}}
        assert g.numel() == 176 and g.min() >= 0.0 and g.max() <= 1.0  # clamped to [0, 1] after every step
        assert abs(stats["mean"] - scratch.TARGET_RATIO) < 0.05, stats  # the sparsity term pulled the mean to r
        assert stats["<0.05"] > 0.2 and stats["==0"] > 0.15, stats  # many gates shut ...
        assert stats[">0.5"] > 0.08, stats  # ... while others stay open: a ranking, not a uniform shrink
        assert stats[">0.95"] < 0.1 and stats["median"] < 0.2, stats  # the mass left its start at 1
        assert result.history[0]["train_gate_mean"] > result.history[-1]["train_gate_mean"]


# ----------------------------------------------------------------------------- the budget search
def test_budget_search_on_a_small_network_reports_its_granularity(searched) -> None:
    model, _, gates, _, x = searched
    missed = 0
    for budget in (0.3, 0.5, 0.7):
        plan = scratch.prune(model, x, gates, budget=budget)
        s = plan.meta["search"]
        assert s["iterations"] <= math.ceil(math.log2(176 + 1))
        cg = trace_channels(model, x)
        dense = sk.flops(model, x).total
        assert plan_flops(cg, sk.flops(model, x), plan) == s["flops"]
        assert plan.meta["flops_ratio"] == pytest.approx(s["flops"] / dense)
        # on this network one channel at the boundary costs 1-3% of the target, so 0.1% is mostly out of reach
        # (a keep count can still land within it by chance: it did for one budget with gates searched on an
        # AVX2 machine): the search then returns the closer of the two keep counts around the target and says why
        if s["within_tolerance"]:
            assert s["error"] <= 1e-3 and s["step"] is None
        else:
            missed += 1
            assert s["step"] > 0.01 and 1e-3 < s["error"] <= s["step"] / 2 + 1e-12
        # the plan keeps the largest gates: every kept gate >= every pruned gate (up to the per-group floor)
        values = gates.values()
        kept = np.concatenate([values[g][list(k.keep)] for g, k in plan.channels.items()])
        pruned = np.concatenate([np.delete(values[g], list(k.keep)) for g, k in plan.channels.items()])
        floors = {g: int(np.argmax(values[g])) for g in plan.channels}
        assert np.sort(kept)[len(floors)] >= pruned.max() or kept.min() >= pruned.max()
    # each budget lands within 0.1% with probability ~0.1 / (half a 1-3% step): the limit shows on at least one
    assert missed >= 1


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_search_lands_within_a_tenth_of_a_percent(budget: float) -> None:
    """ResNet-56 at 32x32: one gated channel costs 0.23% (stage 1) down to 0.06% (stage 3) of the FLOPs; with the
    ranking spread over its 1008 gated channels the bisection finds a keep count within 0.1% of the target."""
    model, x = build("resnet56").eval(), torch.randn(1, 3, 32, 32)
    sites = scratch.gate_sites(model, x)
    rng = np.random.default_rng(0)
    scores = {s.group: rng.random(s.channels) for s in sites}
    plan = scratch.prune(model, x, scores, budget=budget)
    s = plan.meta["search"]
    n = sum(site.channels for site in sites)
    assert s["within_tolerance"] and s["error"] <= 1e-3 and s["iterations"] <= math.ceil(math.log2(n + 1))
    fast = sk.compile(model, plan, x)
    assert sk.flops(fast, x).total == pytest.approx(budget * sk.flops(model, x).total, rel=1e-3)


def test_unreachable_budget_is_a_clear_error(searched) -> None:
    model, _, gates, _, x = searched
    with pytest.raises(PlanError, match="out of reach"):
        scratch.prune(model, x, gates, budget=1e-4)
    with pytest.raises(PlanError, match="fraction in"):
        scratch.prune(model, x, gates, budget=1.5)


def test_plans_compile_to_their_masked_reference(searched) -> None:
    model, _, gates, _, x = searched
    plan = scratch.prune(model, x, gates, budget=0.4)
    xs = torch.randn(8, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    fast = sk.compile(model, plan, x).eval()
    assert_close_to_scale(fast(xs), sk.masked(model, plan, x).eval()(xs))
    restored = sk.Plan.from_json(plan.to_json())
    assert restored.channels == plan.channels and restored.meta["search"] == plan.meta["search"]


# ----------------------------------------------------------------------------- training from scratch
def test_pruned_network_trains_from_scratch_with_the_scratch_b_budget(seeded, data) -> None:
    """The searched architecture, trained from random weights with the same computation as the full network
    (Scratch-B: epochs x FLOPs_full / FLOPs_pruned steps), does as well as the full network does in its own
    epoch budget. On every seed: > 70% and at most 5 points below the full network; > 75% on the median seed
    (seen over seeds 0-4: 79-87%, 6 to 11 points above the full network's 71-77%)."""
    test = digits("test", image_size=SIZE)
    accs = []
    for seed, (model, _, gates, _, x) in seeded.items():
        plan = scratch.prune(model, x, gates, budget=0.5)
        with training_backend():
            pruned, result = scratch.train_from_scratch(
                model, plan, x, data, epochs=1,
                config=sk.train.TrainConfig(batch_size=64, lr=0.05, progress=False, seed=seed), eval_data=test)
        ratio = sk.flops(model, x).total / sk.flops(pruned, x).total
        assert ratio == pytest.approx(1 / plan.meta["flops_ratio"])
        assert result.steps == math.ceil(ratio * math.ceil(1438 / 64))  # Scratch-B: epochs * FLOPs_full / FLOPs_pruned
        full = scratch.reinitialise(copy.deepcopy(model), seed=seed)
        with training_backend():
            full_result = sk.train.train(
                full, data, sk.train.TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, seed=seed),
                eval_data=test)
        acc, acc_full = result.final["accuracy"], full_result.final["accuracy"]
        print(f"seed {seed}: Scratch-B pruned {acc:.4f} vs full {acc_full:.4f}")
        assert acc > 0.7 and acc >= acc_full - 0.05, (seed, acc, acc_full)
        accs.append(acc)
    assert np.median(accs) > 0.75, accs


def test_gates_are_learned_on_a_network_wider_by_the_expansion_ratio() -> None:
    """Every gated group is EXPANSION = 1.25 times wider in the gate-search network (16/32/64 -> 20/40/80 in a
    ResNet's blocks, every conv of a VGG); the residual streams keep their width; the copy is random (seeded)
    and the model passed in is untouched."""
    assert scratch.EXPANSION == 1.25
    x = torch.randn(2, 3, SIZE, SIZE)
    for base in (build("resnet20"), build("vgg16_bn", cfg=TINY_VGG)):
        before = copy.deepcopy(base.state_dict())
        wide = scratch.expand(base, x, seed=0)
        narrow, widened = scratch.gate_sites(base, x), scratch.gate_sites(wide, x)
        assert [s.group for s in narrow] == [s.group for s in widened]
        assert [s.channels for s in widened] == [round(s.channels * scratch.EXPANSION) for s in narrow]
        assert all(w.channels == 1.25 * n.channels for n, w in zip(narrow, widened))  # 16 -> 20, 32 -> 40, 64 -> 80
        assert wide.eval()(x).shape == base.eval()(x).shape == (2, 10)
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in before.items())
        again = scratch.expand(base, x, seed=0)
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in wide.state_dict().items())
    assert wide.classifier.in_features == 80  # the VGG classifier reads the widened last conv
    resnet = scratch.expand(build("resnet20"), x)
    assert resnet.conv1.out_channels == 16 and resnet.layer3[0].conv2.out_channels == 64  # streams unchanged
    assert scratch.expand(build("resnet20"), x, 1.0).layer1[0].conv1.out_channels == 16
    with pytest.raises(ValueError, match=">= 1"):
        scratch.expand(build("resnet20"), x, 0.5)


def test_prune_to_budget_searches_an_expanded_random_copy_and_fits_the_base_budget(data, tmp_path) -> None:
    torch.manual_seed(0)
    trained = build("vgg16_bn", cfg=TINY_VGG)
    before = copy.deepcopy(trained.state_dict())
    x = data.tensors[0][:2]
    with training_backend():
        plan, random_net = scratch.prune_to_budget(trained, x, data, 0.5, seed=3, epochs=1)
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in before.items())  # the given model is untouched
    assert random_net.features[0].out_channels == 20  # searched on the 1.25x network, new weights
    assert plan.meta["expansion"] == 1.25 and plan.channels["features.0"].size == 20
    fast = sk.compile(random_net, plan, x)
    full = sk.flops(trained, x).total
    # the budget refers to the unexpanded network: the plan's network costs half of it (within one channel)
    assert sk.flops(fast, x).total / full == pytest.approx(plan.meta["flops_ratio"])
    assert sk.flops(fast, x).total <= 0.5 * full * 1.01 and sk.flops(random_net, x).total > full
    assert plan.meta["method"] == "scratch" and plan.meta["search_epochs"] == 1.0
    assert plan.meta["gates_kept"]["kept"] in ("best", "last")
    # the recorded architecture rebuilds the expanded network (a resumed protocol run), and saved models load
    rebuilt = sk.serialize.build_arch(plan.meta["source_arch"])
    assert [s.channels for s in scratch.gate_sites(rebuilt, x)] == [20, 40, 80, 80]
    sk.save(fast.eval(), tmp_path / "m.sk")
    with torch.no_grad():
        assert torch.equal(sk.load(tmp_path / "m.sk")(x), fast(x))


def _set(gates: scratch.ChannelGates, values) -> None:
    with torch.no_grad():
        gates.gates[0].copy_(torch.tensor(values, dtype=torch.float32))


def test_kept_gates_are_those_of_the_best_epoch_within_the_target() -> None:
    """The official rule: among the epochs whose gate density (g != 0).mean() <= r, the best score wins (ties:
    the earliest); epochs over the target never win, however well they score; none within: the last gates."""
    gates = scratch.ChannelGates([scratch.GateSite("g", "p", "p", 4)])
    best = scratch.BestGates(gates, r=0.5)
    epochs = [([1.0, 1.0, 1.0, 0.0], 0.90),  # density 0.75: over the target
              ([0.3, 0.0, 0.0, 0.0], 0.60),  # 0.25: within
              ([0.5, 0.2, 0.0, 0.0], 0.70),  # 0.5: within, the best within
              ([0.0, 0.0, 0.0, 0.8], 0.70),  # within, ties the best: the earlier stays
              ([1.0, 1.0, 1.0, 1.0], 0.99)]  # over the target, the highest score
    for epoch, (values, score) in enumerate(epochs, 1):
        _set(gates, values)
        best.on_epoch_end(SimpleNamespace(history=[{"epoch": epoch, "train_accuracy": score}], epoch=epoch - 1))
    assert [e["within"] for e in best.epochs] == [False, True, True, True, False]
    assert best.restore() and best.best_epoch == 3
    assert gates.gates[0].tolist() == pytest.approx([0.5, 0.2, 0.0, 0.0])
    assert best.record()["kept"] == "best" and best.record()["epoch"] == 3
    # an evaluation score, when the run has one, decides over the training accuracy
    scored = scratch.BestGates(gates, r=0.5)
    for epoch, (values, train_acc, eval_acc) in enumerate([([1.0, 0, 0, 0], 0.9, 0.5), ([0, 1.0, 0, 0], 0.5, 0.8)], 1):
        _set(gates, values)
        scored.on_epoch_end(SimpleNamespace(history=[{"epoch": epoch, "train_accuracy": train_acc,
                                                       "eval_accuracy": eval_acc}], epoch=epoch - 1))
    assert scored.restore() and scored.best_epoch == 2 and gates.gates[0].tolist() == [0, 1.0, 0, 0]
    none = scratch.BestGates(gates, r=0.1)
    for epoch, (values, score) in enumerate(epochs, 1):
        _set(gates, values)
        none.on_epoch_end(SimpleNamespace(history=[{"epoch": epoch, "train_accuracy": score}], epoch=epoch - 1))
    assert not none.restore() and gates.gates[0].tolist() == [1.0] * 4 and none.record()["kept"] == "last"


class _Snapshots(Hook):
    """The gates (the parameters the search trains) at the end of every epoch."""

    def __init__(self) -> None:
        self.gates: list[torch.Tensor] = []

    def on_epoch_end(self, state) -> None:
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
        self.gates.append(torch.cat([p.detach().flatten() for p in params]).clone())


def test_gate_search_returns_the_best_epochs_gates(data) -> None:
    """End to end: with r = 1 every epoch is within the target, so the gates returned are the epoch's with the best
    evaluation accuracy (as recorded in the history); keep="last" returns the last epoch's."""
    small = torch.utils.data.TensorDataset(data.tensors[0][:256], data.tensors[1][:256])
    held_out = torch.utils.data.TensorDataset(data.tensors[0][256:512], data.tensors[1][256:512])
    x = data.tensors[0][:2]
    kept = {}
    for keep in ("best", "last"):
        torch.manual_seed(0)
        model = build("vgg16_bn", cfg=TINY_VGG)
        snap = _Snapshots()
        sites = scratch.gate_sites(model, x)
        with training_backend():
            gates, result = scratch.search_gates(model, small, x, epochs=4, batch_size=64, r=1.0, seed=0, keep=keep,
                                                 eval_data=held_out, hooks=[snap], lr=0.05)
        snap_gates = snap.gates
        scores = [h["eval_accuracy"] for h in result.history]
        kept[keep] = (gates.flat().detach(), snap_gates, scores, gates.selection)
        assert len(snap_gates) == 4 and sum(s.channels for s in sites) == snap_gates[0].numel()
    flat, snaps, scores, selection = kept["best"]
    best = max(range(4), key=lambda e: (scores[e], -e))
    assert selection["kept"] == "best" and selection["epoch"] == best + 1
    assert [e["score"] for e in selection["epochs"]] == scores
    assert torch.equal(flat, snaps[best])
    if best != 3:  # (seed 0 on digits: epoch 3 of 4 scores best) the kept gates are not simply the last ones
        assert not torch.equal(flat, snaps[-1])
    flat_last, snaps_last, _, selection_last = kept["last"]
    assert torch.equal(flat_last, snaps_last[-1]) and selection_last["kept"] == "last"
