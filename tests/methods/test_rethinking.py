"""The Rethinking protocol runs its three arms on the same pruned architecture, with the right budgets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sparsekern as sk
from sparsekern.cli import main
from sparsekern.data import load
from sparsekern.methods import rethinking


@pytest.fixture(scope="module")
def digits16():
    return load("digits", image_size=16)


def test_protocol_runs_three_arms_at_the_budget(digits16, tmp_path: Path) -> None:
    report = rethinking.run("l1_norm", digits16, model_name="resnet20", budget=0.5, epochs=2,
                            finetune_epochs=0.5, progress=False, out=tmp_path / "r.json", log=lambda s: None)
    assert [a.name for a in report.arms] == ["fine-tune", "Scratch-E", "Scratch-B"]
    assert report.flops_pruned <= 0.5 * report.flops_full
    scratch_b = report.arms[2].epochs
    assert scratch_b == pytest.approx(2 * report.flops_full / report.flops_pruned)
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
    data = load("digits", image_size=8)
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
