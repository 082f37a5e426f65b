"""The Rethinking protocol runs its three arms on the same pruned architecture, with the right budgets."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

import sparsekern as sk
from sparsekern.cli import main
from sparsekern.data import load
from sparsekern.methods import anp, rethinking
from sparsekern.methods.registry import Method, Pruned, register_method, unregister_method
from sparsekern.training.config import train_defaults


@pytest.fixture(scope="module")
def digits16():
    return load("digits", image_size=16)


def test_protocol_runs_three_arms_at_the_budget(digits16, tmp_path: Path) -> None:
    report = rethinking.run("l1_norm", digits16, model_name="resnet20", budget=0.5, epochs=2,
                            finetune_epochs=0.5, progress=False, out=tmp_path / "r.json", log=lambda s: None)
    assert [a.name for a in report.arms] == ["fine-tune", "Scratch-E", "Scratch-B"]
    assert report.flops_pruned <= 0.5 * report.flops_full
    scratch_b = report.arms[2].epochs
    assert scratch_b == math.floor(2 * report.flops_full / report.flops_pruned)  # whole epochs, as main_B.py
    assert all(0.0 <= a.accuracy <= 1.0 for a in report.arms)
    assert report.full_accuracy > 0.8  # two epochs on digits already learn them well
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["method"] == "l1_norm" and len(saved["arms"]) == 3 and saved["efficiency"] > 0


def test_arm_epochs_follow_each_arms_schedule() -> None:
    """Scratch-B scales the full model's epochs by the FLOPs ratio; TAS's KD arm trains the base schedule (the
    official TAS code trains the searched network with the unpruned network's schedule), like Scratch-E."""
    epochs = rethinking.arm_epochs(160, 40, flops_full=4e8, flops_pruned=1e8)
    assert epochs == {"fine-tune": 40, "Scratch-E": 160, "Scratch-B": 640, "KD": 160}
    assert rethinking.arm_epochs(10, 2.5, 3e6, 2e6)["KD"] == 10


def test_scratch_b_is_capped_and_rounded_to_whole_epochs_as_the_official_code() -> None:
    """main_B.py trains int(160 x FLOPs ratio) epochs; the paper caps the factor at 2 on ImageNet only."""
    ratio = 3e8 / 2.2e8  # 160 x ratio = 218.18...
    assert rethinking.arm_epochs(160, 40, 3e8, 2.2e8)["Scratch-B"] == 218
    exact = rethinking.arm_epochs(160, 40, 3e8, 2.2e8, scratch_b_rounding="exact")["Scratch-B"]
    assert exact == pytest.approx(160 * ratio) and exact != 218
    assert rethinking.arm_epochs(90, 20, 4e8, 1e8, scratch_b_cap=2)["Scratch-B"] == 180  # ImageNet: 2x, not 4x
    assert rethinking.arm_epochs(90, 20, 3e8, 2e8, scratch_b_cap=2)["Scratch-B"] == 135  # under the cap
    assert rethinking.arm_epochs(0.1, 0.02, 4e8, 1e8)["Scratch-B"] == pytest.approx(0.4)  # shrunk: kept fractional
    with pytest.raises(ValueError, match="scratch_b_rounding"):
        rethinking.arm_epochs(160, 40, 3e8, 2e8, scratch_b_rounding="round")


def test_scratch_arms_start_from_fresh_weights(digits16) -> None:
    model = sk.models.build("resnet20").eval()
    fresh = rethinking._reinitialised(model)
    assert not torch.equal(fresh.conv1.weight, model.conv1.weight)
    assert fresh.conv1.weight.shape == model.conv1.weight.shape


def test_cli_prune_saves_a_reloadable_model(tmp_path: Path) -> None:
    argv = ["prune", "--method", "l1_norm", "--model", "resnet20", "--budget", "0.6", "--image-size", "16",
            "--epochs", "0.3", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["fine-tune"]
    model = sk.load(tmp_path / "model.sk")
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    assert sk.flops(model, x).total <= 0.6 * report["flops_full"] / 64 * 2 + 1  # report counted at batch 64


def test_unknown_method_and_arms_are_refused(digits16) -> None:
    with pytest.raises(ValueError, match="unknown method"):
        rethinking.run("magic", digits16)
    with pytest.raises(ValueError, match="unknown arms \\['magic'\\]"):
        rethinking.run("l1_norm", digits16, arms=("magic",))


@pytest.mark.parametrize("method, arm", [("scratch", "Scratch-B"), ("tas", "KD")])
def test_cli_prune_runs_the_learned_methods_with_their_own_arm(method: str, arm: str, tmp_path: Path) -> None:
    argv = ["prune", "--method", method, "--model", "resnet20", "--budget", "0.5", "--image-size", "8",
            "--epochs", "0.3", "--search-epochs", "0.3", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == [arm]
    assert report["flops_pruned"] <= 0.5 * report["flops_full"] * 1.01  # scratch: the closest count to the budget
    model = sk.load(tmp_path / "model.sk")
    x = torch.randn(2, 3, 8, 8)
    assert model(x).shape == (2, 10)
    if method == "tas":
        assert sk.Plan.from_dict(report["plan"]).removed_blocks or report["plan"]["channels"]
        assert report["arms"][0]["epochs"] == pytest.approx(0.3)  # KD trains the base schedule, not Scratch-B's
    else:
        assert report["plan"]["meta"]["expansion"] == 1.25  # gates learned on the 1.25x-wide random network


def test_anp_report_compares_robustness_with_adversarial_training(digits16) -> None:
    full = load("digits", image_size=8)  # a slice of it: the report's arms and bounds, not accuracies, are tested
    data = dataclasses.replace(full, train=TensorDataset(*(t[:512] for t in full.train.tensors)),
                               test=TensorDataset(*(t[:128] for t in full.test.tensors)))
    report = rethinking.run("anp", data, model_name="resnet20", budget=0.6, epochs=0.5, search_epochs=0.3,
                            finetune_epochs=0.2, arms=(),
                            progress=False, log=lambda s: None)
    # the budget search keeps the closest count, within one channel's cost of the budget (Pruning from Scratch's)
    assert report.arms == [] and report.flops_pruned <= 0.6 * report.flops_full * 1.01
    assert set(report.robustness) == {"ANP-VS", "ANP-VS + adversarial fine-tune", "adversarial training",
                                      "adversarial training, pruned",
                                      "adversarial training, pruned + adversarial fine-tune"}
    for r in report.robustness.values():
        assert 0.0 <= r["pgd_accuracy"] <= r["clean_accuracy"] <= 1.0


def test_run_refuses_bad_budgets_and_epochs_before_training(digits16, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(rethinking, "train", no_training)
    for kwargs in ({"budget": 0}, {"budget": 1.5}, {"budget": -1}, {"epochs": 0}, {"finetune_epochs": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            rethinking.run("l1_norm", digits16, model_name="resnet20", **kwargs)


def test_a_resumed_run_skips_completed_stages_and_reports_what_an_uninterrupted_run_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekern.checkpoint import Checkpoints

    data = load("digits", image_size=8)
    settings = dict(model_name="resnet20", budget=0.5, epochs=0.02, finetune_epochs=0.02, progress=False,
                    log=lambda s: None, bench_repeats=2)  # the three arms of the protocol
    whole = rethinking.run("l1_norm", data, **settings).to_dict()

    trained = []
    real_train = rethinking.train

    def train(model, *args, **kwargs):
        trained.append(model)
        if interrupt_at == len(trained):
            raise KeyboardInterrupt
        return real_train(model, *args, **kwargs)

    monkeypatch.setattr(rethinking, "train", train)
    interrupt_at = 3  # full model, fine-tune, then Scratch-E is interrupted
    with pytest.raises(KeyboardInterrupt):
        rethinking.run("l1_norm", data, checkpoints=Checkpoints(tmp_path, {"run": 1}), **settings)
    assert Checkpoints(tmp_path).completed() == ["full", "prune", "arm-fine-tune"]

    trained.clear()
    interrupt_at = None
    resumed = rethinking.run("l1_norm", data, checkpoints=Checkpoints(tmp_path, {"run": 1}, resume=True),
                             **settings).to_dict()
    assert len(trained) == 2  # Scratch-E and Scratch-B only
    timed = ("measured_speedup", "efficiency")
    assert {k: v for k, v in resumed.items() if k not in timed} == {k: v for k, v in whole.items() if k not in timed}


class _TrainerRecorder:
    """Replaces ``rethinking.train``: keeps each (model, config), then trains (or raises ``stop`` if given)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, stop: BaseException | None = None) -> None:
        self.models: list[torch.nn.Module] = []
        self.configs: list[Any] = []
        real = rethinking.train

        def train(model, data, config, *args, **kwargs):
            self.models.append(model)
            self.configs.append(config)
            if stop is not None:
                raise stop
            return real(model, data, config, *args, **kwargs)

        monkeypatch.setattr(rethinking, "train", train)


def test_the_finetune_arm_has_its_own_constant_schedule_and_scratch_b_its_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paper fine-tunes at a constant lr 0.001 while the full model steps at 50%/75%; ``finetune_schedule=None``
    gives the fine-tune arm the run's schedule instead; ``scratch_b_cap`` bounds Scratch-B's FLOPs factor."""
    data = load("digits", image_size=8)
    settings = dict(model_name="resnet20", budget=0.5, epochs=0.04, finetune_epochs=0.02, finetune_lr=0.001,
                    arms=("fine-tune", "Scratch-B"), progress=False, log=lambda s: None, bench_repeats=1)
    trainer = _TrainerRecorder(monkeypatch)
    with train_defaults(schedule="step", milestones=(0.5, 0.75)):  # the recipe's schedule, as the CLI sets it
        report = rethinking.run("l1_norm", data, scratch_b_cap=1.0, **settings)
    full, finetune, scratch_b = trainer.configs
    assert (full.schedule, scratch_b.schedule) == ("step", "step")
    assert (finetune.schedule, finetune.lr, finetune.epochs) == ("constant", 0.001, 0.02)
    assert report.flops_full > 1.5 * report.flops_pruned and report.arms[1].epochs == pytest.approx(0.04)  # capped
    assert scratch_b.epochs == pytest.approx(0.04)

    trainer = _TrainerRecorder(monkeypatch)
    with train_defaults(schedule="step"):
        rethinking.run("l1_norm", data, finetune_schedule=None, **settings)
    assert trainer.configs[1].schedule == "step" and trainer.configs[2].epochs > 0.04  # uncapped Scratch-B


class _Stop(Exception):
    """Raised by a recorded trainer to end a run once the model it trains is known."""


def test_the_runner_builds_anp_vs_vgg16_with_both_fc_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """ANP-VS's class declares ``model_kwargs`` (VGG-16: the paper's 512-512 FC + BN classifier); the runner builds
    the full model with them, so both FC inputs carry a mask; other methods get the zoo's one-FC VGG-16."""
    x = torch.randn(2, 3, 32, 32)
    assert [s.layer for s in anp.mask_sites(rethinking.base_model("anp", "vgg16_bn", num_classes=10), x)
            if s.kind == "fc_in"] == ["classifier.0", "classifier.3"]
    assert [s.layer for s in anp.mask_sites(rethinking.base_model("l1_norm", "vgg16_bn", num_classes=10), x)
            if s.kind == "fc_in"] == ["classifier"]
    trainer = _TrainerRecorder(monkeypatch, stop=_Stop())
    with pytest.raises(_Stop):
        rethinking.run("anp", load("digits", image_size=32), model_name="vgg16_bn", budget=0.9, epochs=0.1,
                       arms=(), progress=False, log=lambda s: None)
    trained = trainer.models[0]  # the full model, as the runner built it
    assert [s.layer for s in anp.mask_sites(trained, x) if s.kind == "fc_in"] == ["classifier.0", "classifier.3"]
    one_fc = rethinking.base_model("anp", "vgg16_bn", num_classes=10, model_kwargs={"classifier": "one_fc"})
    assert isinstance(one_fc.classifier, torch.nn.Linear)  # the run's model_kwargs override the method's


def test_method_options_reach_prune_and_unknown_ones_are_refused_naming_them(
        digits16, monkeypatch: pytest.MonkeyPatch) -> None:
    """A method class declares ``prune_options``; ``method_options`` (a recipe's) reach its ``prune`` through
    ``PruneContext.options``, and an option it does not declare is refused, naming method and option."""
    seen: list[dict[str, Any]] = []

    @register_method("test_recording_options")
    class Recording(Method):
        prune_options = {"search_batch_size": 64}

        def prune(self, model, budget, ctx):
            from sparsekern.methods import l1_norm

            seen.append(dict(ctx.options))
            return Pruned(l1_norm.prune(model, ctx.example_inputs, ratio=0.5), model)

    try:
        data = load("digits", image_size=8)
        rethinking.run("test_recording_options", data, model_name="resnet20", epochs=0.02, arms=(), progress=False,
                       log=lambda s: None, bench_repeats=1, method_options={"search_batch_size": 256})
        assert seen[0]["search_batch_size"] == 256
        _TrainerRecorder(monkeypatch, stop=AssertionError("training started"))
        with pytest.raises(ValueError, match="method 'test_recording_options' has no prune option 'batch'.*"
                                             "search_batch_size"):
            rethinking.run("test_recording_options", data, method_options={"batch": 256})
    finally:
        unregister_method("test_recording_options")
    with pytest.raises(ValueError, match="method 'tas' has no prune option 'search_batch_size'"):
        rethinking.run("tas", digits16, method_options={"search_batch_size": 256})


def test_bad_arm_settings_are_refused_before_training(digits16, monkeypatch: pytest.MonkeyPatch) -> None:
    _TrainerRecorder(monkeypatch, stop=AssertionError("training started"))
    for kwargs in ({"finetune_schedule": "linear"}, {"scratch_b_cap": 0.5}, {"scratch_b_rounding": "round"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            rethinking.run("l1_norm", digits16, model_name="resnet20", **kwargs)
