"""The protocol of "Rethinking the Value of Network Pruning" (Liu, Sun, Zhou, Huang, Darrell, ICLR 2019).

For one pruning method and a FLOPs budget:

1. train the full model (``epochs``; Network Slimming trains with its sparsity penalty);
2. prune it to the budget with the method, compile the plan;
3. three arms on the same pruned architecture:
   - **fine-tune**: inherit the pruned weights, train ``finetune_epochs`` at a small learning rate
     (the paper: 40 epochs at lr 0.001 on CIFAR);
   - **Scratch-E**: random initialisation, the full model's epoch budget;
   - **Scratch-B**: random initialisation, epochs scaled by FLOPs_full / FLOPs_pruned (same computation);
4. report the three accuracies, FLOPs, parameters and the measured CPU speedup of the pruned model.

The paper's finding: for these structured methods, Scratch-B >= fine-tune. :func:`run` returns a
:class:`ProtocolReport` with a table and JSON, so a run shows whether it reproduces.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern.data import DataBundle, loader
from sparsekern.models import build
from sparsekern.models.init import init_weights
from sparsekern.plan import Plan
from sparsekern.train import TrainConfig, evaluate, scratch_b_epochs, train

__all__ = ["METHODS", "prune_to_budget", "run", "ProtocolReport", "Arm"]

METHODS = ("l1_norm", "slimming", "thinet", "lasso")


@dataclass
class Arm:
    """One way of training the pruned architecture and where it ended."""

    name: str
    epochs: float
    accuracy: float


@dataclass
class ProtocolReport:
    method: str
    model: str
    data: str
    budget: float
    full_accuracy: float
    pruned_accuracy_before_training: float
    flops_full: int
    flops_pruned: int
    params_full: int
    params_pruned: int
    measured_speedup: float
    theoretical_speedup: float
    arms: list[Arm] = field(default_factory=list)
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def efficiency(self) -> float:
        return self.measured_speedup / self.theoretical_speedup

    def accuracy(self, arm: str) -> float:
        return next(a.accuracy for a in self.arms if a.name == arm)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "efficiency": self.efficiency}

    def table(self) -> str:
        lines = [
            f"{self.method} on {self.model} ({self.data}), FLOPs budget {self.budget:.0%}: FLOPs "
            f"{self.flops_full / 1e6:.1f}M -> {self.flops_pruned / 1e6:.1f}M, params {self.params_full / 1e3:.0f}k -> "
            f"{self.params_pruned / 1e3:.0f}k, measured CPU speedup {self.measured_speedup:.2f}x "
            f"(efficiency {self.efficiency:.2f})",
            f"  full model {self.full_accuracy:.2%}; pruned, before training {self.pruned_accuracy_before_training:.2%}",
        ]
        lines += [f"  {a.name:<10s} {a.epochs:>6.1f} epochs  {a.accuracy:.2%}" for a in self.arms]
        return "\n".join(lines)


def prune_to_budget(
    method: str,
    model: nn.Module,
    x: torch.Tensor,
    train_data: Any,
    budget: float,
    *,
    seed: int = 0,
    slimming_penalty: float | None = None,
) -> tuple[Plan, nn.Module]:
    """Run ``method`` on a trained ``model`` so the compiled plan has <= ``budget`` x its FLOPs.

    The ratio-based methods (L1-norm, ThiNet, LASSO) prune the block-internal layers by one uniform ratio
    found with :func:`sparsekern.methods.budget.ratio_for_budget`; Network Slimming thresholds its BN
    scales globally at the budget. Returns the plan and the model to compile it against (refitted for
    ThiNet and LASSO, ``model`` itself otherwise). ``slimming_penalty`` (the s the model was trained with)
    is recorded in Network Slimming's plan.
    """
    from sparsekern.methods import budget as budgets

    if method == "slimming":
        from sparsekern.methods import slimming

        return slimming.prune(model, x, flops_budget=budget, s=slimming_penalty), model
    ratio, _ = budgets.ratio_for_budget(model, x, budget, scope="internal")
    if method == "l1_norm":
        from sparsekern.methods import l1_norm

        return l1_norm.prune(model, x, ratio=ratio), model
    if method in ("thinet", "lasso"):
        import importlib

        module = importlib.import_module(f"sparsekern.methods.{method}")
        return module.prune(model, x, train_data, ratio=ratio, seed=seed)
    raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")


def _reinitialised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with fresh weights: every layer's own reset, then the zoo's conv/BN init."""
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    init_weights(fresh)
    return fresh


def run(
    method: str,
    data: DataBundle,
    *,
    model_name: str = "resnet56",
    budget: float = 0.5,
    epochs: float = 10,
    finetune_epochs: float | None = None,
    lr: float = 0.1,
    finetune_lr: float = 0.01,
    batch_size: int = 64,
    slimming_penalty: float | None = None,
    seed: int = 0,
    arms: tuple[str, ...] = ("fine-tune", "Scratch-E", "Scratch-B"),
    progress: bool = True,
    out: str | Path | None = None,
    model_out: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> ProtocolReport:
    """Run the protocol (module docstring) for one method; write ``out`` (JSON) if given.

    ``arms`` selects which of the three arms run (``sparsekern prune`` without ``--protocol`` runs only
    the fine-tune arm); ``model_out`` saves the fine-tuned compiled model with :func:`sparsekern.save`.

    ``finetune_epochs`` defaults to ``epochs / 4`` (the paper fine-tunes 40 epochs after 160 on CIFAR).
    ``finetune_lr`` defaults to 0.01 rather than the paper's 0.001, which barely moves a model trained for
    only a few epochs on the small embedded data; pass 0.001 for the paper's setting.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    finetune_epochs = epochs / 4 if finetune_epochs is None else finetune_epochs
    torch.manual_seed(seed)
    test = loader(data.test, 512, shuffle=False)
    x = data.test.tensors[0][:batch_size] if hasattr(data.test, "tensors") else next(iter(test))[0][:batch_size]

    def fit(model: nn.Module, n_epochs: float, lr_: float, hooks: tuple = ()) -> float:
        model.train()
        train(model, data.train, TrainConfig(epochs=n_epochs, lr=lr_, batch_size=batch_size, seed=seed,
                                             progress=progress), hooks=hooks)
        model.eval()
        return evaluate(model, test)["accuracy"]

    full = build(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
    hooks: tuple = ()
    if method == "slimming":
        from sparsekern.methods import slimming

        slimming_penalty = slimming.default_penalty(full) if slimming_penalty is None else slimming_penalty
        hooks = (slimming.SparsityHook(slimming_penalty),)
    log(f"[{method}] training the full {model_name} for {epochs} epochs")
    full_acc = fit(full, epochs, lr, hooks)

    log(f"[{method}] pruning to {budget:.0%} of the FLOPs")
    plan, source = prune_to_budget(method, full, x, data.train, budget, seed=seed, slimming_penalty=slimming_penalty)
    pruned = sk.compile(source, plan, x).eval()
    before = evaluate(pruned, test)["accuracy"]
    flops_full, flops_pruned = sk.flops(full, x), sk.flops(pruned, x)

    unknown = set(arms) - {"fine-tune", "Scratch-E", "Scratch-B"}
    if unknown or (model_out is not None and "fine-tune" not in arms):
        raise ValueError(f"arms must be among fine-tune, Scratch-E, Scratch-B (fine-tune to save a model), got {arms}")
    results = []
    if "fine-tune" in arms:
        log(f"[{method}] fine-tune: {finetune_epochs} epochs at lr {finetune_lr}")
        tuned = copy.deepcopy(pruned)
        results.append(Arm("fine-tune", finetune_epochs, fit(tuned, finetune_epochs, finetune_lr)))
        if model_out is not None:
            sk.save(tuned, model_out)
            log(f"[{method}] saved the fine-tuned model to {model_out}")
    if "Scratch-E" in arms:
        log(f"[{method}] Scratch-E: {epochs} epochs from random initialisation")
        results.append(Arm("Scratch-E", epochs, fit(_reinitialised(pruned), epochs, lr)))
    if "Scratch-B" in arms:
        b_epochs = scratch_b_epochs(epochs, flops_full.total, flops_pruned.total)
        log(f"[{method}] Scratch-B: {b_epochs:.1f} epochs from random initialisation")
        results.append(Arm("Scratch-B", b_epochs, fit(_reinitialised(pruned), b_epochs, lr)))

    bench = sk.bench.compare(full.eval(), pruned, x, passes=("fold_bn", "onednn"), threads=2, repeats=30,
                             per_layer=False)
    report = ProtocolReport(
        method=method, model=model_name, data=data.name, budget=budget, full_accuracy=full_acc,
        pruned_accuracy_before_training=before, flops_full=flops_full.total, flops_pruned=flops_pruned.total,
        params_full=flops_full.params, params_pruned=flops_pruned.params,
        measured_speedup=bench.measured_speedup, theoretical_speedup=bench.theoretical_speedup, arms=results,
        plan=plan.to_dict(),
    )
    log(report.table())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report.to_dict(), indent=1))
    return report
