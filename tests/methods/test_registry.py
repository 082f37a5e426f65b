"""The method registry: every built-in method is registered from its own file with its metadata, the CLI and
the protocol runner read it, and a method registered from outside (a toy random pruning, here) runs through
the protocol and the command line like the built-in ones."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern.cli import build_parser, main
from sparsekern.cli_checks import UsageError, prune_methods
from sparsekern.data import load
from sparsekern.graph import trace_channels
from sparsekern.methods import l1_norm, rethinking
from sparsekern.methods.budget import ratio_for_budget
from sparsekern.methods.registry import (
    KINDS,
    Method,
    PruneContext,
    Pruned,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)

BUILT_IN = {"l1_norm": "static", "slimming": "static", "thinet": "static", "lasso": "static", "scratch": "static",
            "tas": "static", "anp": "static", "flop": "lowrank", "sanp": "dynamic"}
TOY = "random_channels_test"


class RandomChannels(Method):
    """Random channel pruning (the baseline of Mittal et al., "Recovering from Random Pruning", WACV 2018):
    every block-internal layer keeps a random subset of its filters, as many as L1-norm keeps at the budget."""

    summary = "random filters, as many as L1-norm keeps (test method)"

    def prune(self, model: nn.Module, budget: float, ctx: PruneContext) -> Pruned:
        x = ctx.example_inputs
        ratio, _ = ratio_for_budget(model, x, budget, scope="internal")
        generator = torch.Generator().manual_seed(ctx.seed)
        masks = {}
        for layer in l1_norm.prunable_layers(trace_channels(model, x), "internal"):
            size = model.get_submodule(layer).out_channels
            keep = torch.zeros(size, dtype=torch.bool)
            keep[torch.randperm(size, generator=generator)[: max(1, int(size * (1 - ratio)))]] = True
            masks[layer] = keep
        return Pruned(sk.Plan.from_channel_masks(model, masks, x, meta={"method": self.name}), model)


@pytest.fixture
def toy() -> Iterator[str]:
    register_method(TOY)(RandomChannels)
    try:
        yield TOY
    finally:
        unregister_method(TOY)


def test_every_built_in_method_is_registered_from_its_own_file() -> None:
    names = list_methods()
    assert set(BUILT_IN) <= set(names)
    assert names[:len(BUILT_IN)] == list(BUILT_IN)  # registry order = the CLI's and the reports' order
    for name, kind in BUILT_IN.items():
        method = get_method(name)
        assert method.name == name and method.kind == kind and method.kind in KINDS
        assert type(method).__module__ == f"sparsekern.methods.{name}"
        assert method.summary
    assert [m for m in ("scratch", "tas", "anp", "sanp", "flop") if get_method(m).searches] == \
        ["scratch", "tas", "anp", "sanp", "flop"]
    assert not any(get_method(m).searches for m in ("l1_norm", "slimming", "thinet", "lasso"))


def test_the_protocol_and_the_cli_read_the_registry() -> None:
    static = list_methods("static")
    assert rethinking.protocol_methods() == static == ["l1_norm", "slimming", "thinet", "lasso", "scratch", "tas",
                                                       "anp"]
    assert {m: rethinking.default_arms(m) for m in static if rethinking.default_arms(m) != ("fine-tune",)} == \
        {"scratch": ("Scratch-B",), "tas": ("KD",), "anp": ()}
    assert rethinking.default_arms("tas", "rethinking") == ("fine-tune", "Scratch-E", "Scratch-B", "KD")
    assert rethinking.default_arms("l1_norm", "rethinking") == ("fine-tune", "Scratch-E", "Scratch-B")
    assert [m for m in static if get_method(m).robustness] == ["anp"]
    assert sorted(prune_methods()) == sorted(static + ["sanp", "flop"])  # every kind has a command-line runner
    for name in prune_methods():
        assert build_parser().parse_args(["prune", "--method", name]).method == name
    with pytest.raises(UsageError, match="invalid choice: 'nope'"):
        build_parser().parse_args(["prune", "--method", "nope"])
    with pytest.raises(ValueError, match="unknown method 'flop'"):
        rethinking.run("flop", None)  # the protocol runs static methods only


def test_registering_checks_names_kinds_and_classes() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_method("l1_norm")(RandomChannels)
    assert type(get_method("l1_norm")).__name__ == "L1Norm"

    class Odd(RandomChannels):
        kind = "sparse"

    with pytest.raises(ValueError, match="kind 'sparse'"):
        register_method("odd_test")(Odd)
    with pytest.raises(ValueError, match="not a subclass of Method"):
        register_method("odd_test")(object)
    with pytest.raises(ValueError, match="unknown method 'odd_test'"):
        get_method("odd_test")


def test_prune_to_budget_calls_the_registered_method(monkeypatch: pytest.MonkeyPatch) -> None:
    model = sk.models.build("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    ratio, _ = ratio_for_budget(model, x, 0.5, scope="internal")
    plan, source = rethinking.prune_to_budget("l1_norm", model, x, None, 0.5)
    assert source is model and plan.to_dict() == l1_norm.prune(model, x, ratio=ratio).to_dict()

    seen = []
    monkeypatch.setattr(l1_norm, "prune", lambda *args, **kwargs: seen.append(kwargs["ratio"]) or plan)
    rethinking.prune_to_budget("l1_norm", model, x, None, 0.5)
    assert seen == [ratio]  # the method looks its module's functions up when it runs


def test_a_method_registered_in_a_test_runs_through_the_protocol(toy: str) -> None:
    assert toy in list_methods("static") and toy in rethinking.protocol_methods()
    assert rethinking.default_arms(toy) == ("fine-tune",)
    data = load("digits", image_size=8)
    report = rethinking.run(toy, data, model_name="resnet20", budget=0.5, epochs=0.05, finetune_epochs=0.05,
                            progress=False, log=lambda s: None, bench_repeats=2)
    assert [a.name for a in report.arms] == ["fine-tune", "Scratch-E", "Scratch-B"]
    assert report.method == toy and report.plan["meta"]["method"] == toy
    assert report.flops_pruned <= 0.5 * report.flops_full


def test_a_method_registered_in_a_test_runs_from_the_command_line(toy: str, tmp_path: Path) -> None:
    assert build_parser().parse_args(["prune", "--method", toy]).method == toy
    argv = ["prune", "--method", toy, "--model", "resnet20", "--image-size", "8", "--epochs", "0.05",
            "--repeats", "2", "--budget", "0.6", "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["method"] == toy and [a["name"] for a in report["arms"]] == ["fine-tune"]
    assert report["flops_pruned"] <= 0.6 * report["flops_full"]
    assert sk.load(tmp_path / "model.sk")(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert main(["prune", "--method", toy, "--search-epochs", "1"]) == 2  # it does not search

