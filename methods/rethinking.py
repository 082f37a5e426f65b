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

The learned methods run through the same steps with their own search in step 2 and their own arm in step 3
(:data:`DEFAULT_ARMS`): Pruning from Scratch searches gates on a frozen random copy and trains the pruned
network from scratch (Scratch-B); TAS searches widths and depths and trains the result from scratch with
distillation from the full model (arm ``KD``); ANP-VS trains its masks adversarially from the full model,
and its report adds clean and PGD accuracy against plain adversarial training pruned to the same channels.
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
from sparsekern.checkpoint import Checkpoints, Stage
from sparsekern.data import DataBundle, loader
from sparsekern.models import build
from sparsekern.models.init import init_weights
from sparsekern.plan import Plan
from sparsekern.train import TrainConfig, evaluate, scratch_b_epochs, train

__all__ = ["METHODS", "prune_to_budget", "run", "ProtocolReport", "Arm"]

METHODS = ("l1_norm", "slimming", "thinet", "lasso", "scratch", "tas", "anp")
ARMS = ("fine-tune", "Scratch-E", "Scratch-B", "KD")
#: what ``sparsekern prune --method M`` trains without ``--protocol rethinking``
DEFAULT_ARMS = {"scratch": ("Scratch-B",), "tas": ("KD",), "anp": ()}


def default_arms(method: str, protocol: str | None = None) -> tuple[str, ...]:
    """The arms a run trains: the three of the protocol (plus ``KD`` for TAS) or the method's own."""
    if protocol == "rethinking":
        return ("fine-tune", "Scratch-E", "Scratch-B") + (("KD",) if method == "tas" else ())
    return DEFAULT_ARMS.get(method, ("fine-tune",))


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
    robustness: dict[str, dict[str, float]] = field(default_factory=dict)

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
        lines += [f"  {name}: clean {r['clean_accuracy']:.2%}, PGD {r['pgd_accuracy']:.2%}"
                  for name, r in self.robustness.items()]
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
    search_epochs: float = 5,
    progress: bool = False,
) -> tuple[Plan, nn.Module]:
    """Run ``method`` on a trained ``model`` so the compiled plan has <= ``budget`` x its FLOPs.

    ``search_epochs`` is the learned methods' search length (Pruning from Scratch's gate training, TAS's
    architecture search, ANP-VS's adversarial mask training).

    The ratio-based methods (L1-norm, ThiNet, LASSO) prune the block-internal layers by one uniform ratio
    found with :func:`sparsekern.methods.budget.ratio_for_budget`; Network Slimming thresholds its BN
    scales globally at the budget. Returns the plan and the model to compile it against (refitted for
    ThiNet and LASSO, ``model`` itself otherwise). ``slimming_penalty`` (the s the model was trained with)
    is recorded in Network Slimming's plan.
    """
    from sparsekern.methods import budget as budgets

    if method in ("scratch", "tas", "anp"):
        import importlib

        module = importlib.import_module(f"sparsekern.methods.{method}")
        return module.prune_to_budget(model, x, train_data, budget, seed=seed, epochs=search_epochs,
                                      progress=progress)
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


def _robustness(full: nn.Module, pruned: nn.Module, plan: Plan, data: DataBundle, x: torch.Tensor, epochs: float,
                finetune_epochs: float, seed: int, progress: bool,
                log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """ANP-VS's report: clean and PGD accuracy (40 steps) of

    * the pruned ANP-VS model, as pruned and after ``finetune_epochs`` of adversarial fine-tuning;
    * the baseline: plain adversarial training of the full model for as many epochs as ANP-VS trained its masks
      (``epochs``), dense, and pruned by filter norm to ANP-VS's channels (same FLOPs) with the same
      adversarial fine-tuning.
    """
    from sparsekern.methods import anp

    def adversarial(model: nn.Module, n_epochs: float) -> nn.Module:
        model.train()
        anp.adversarial_training(model, data.train, epochs=n_epochs, seed=seed, progress=progress)
        return model.eval()

    test = loader(data.test, 256, shuffle=False)
    bounds = anp.data_range(data.train)
    result = {"ANP-VS": anp.robustness(pruned.eval(), test, bounds=bounds, seed=seed)}
    log(f"[anp] adversarial fine-tuning of the pruned model: {finetune_epochs} epochs")
    tuned = adversarial(copy.deepcopy(pruned), finetune_epochs)
    result["ANP-VS + adversarial fine-tune"] = anp.robustness(tuned, test, bounds=bounds, seed=seed)
    log(f"[anp] baseline: adversarial training for {epochs} epochs, pruned to ANP's channel counts")
    baseline = adversarial(copy.deepcopy(full), epochs)
    result["adversarial training"] = anp.robustness(baseline, test, bounds=bounds, seed=seed)
    baseline_pruned = sk.compile(baseline, anp.magnitude_plan(baseline, x, plan), x).eval()
    result["adversarial training, pruned"] = anp.robustness(baseline_pruned, test, bounds=bounds, seed=seed)
    baseline_tuned = adversarial(baseline_pruned, finetune_epochs)
    result["adversarial training, pruned + adversarial fine-tune"] = anp.robustness(baseline_tuned, test,
                                                                                     bounds=bounds, seed=seed)
    return result


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
    search_epochs: float | None = None,
    seed: int = 0,
    arms: tuple[str, ...] | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    model_out: str | Path | None = None,
    log: Callable[[str], None] = print,
    checkpoints: Checkpoints | None = None,
    bench_repeats: int = 30,
) -> ProtocolReport:
    """Run the protocol (module docstring) for one method; write ``out`` (JSON) if given.

    ``arms`` selects which arms run (default: :func:`default_arms` of the protocol, plus ``KD`` for TAS);
    ``model_out`` saves the first arm's trained model (the pruned model itself when no arm runs) with
    :func:`sparsekern.save`. ``search_epochs`` (default ``epochs / 2``) goes to the learned methods' search.

    ``finetune_epochs`` defaults to ``epochs / 4`` (the paper fine-tunes 40 epochs after 160 on CIFAR).
    ``finetune_lr`` defaults to 0.01 rather than the paper's 0.001, which barely moves a model trained for
    only a few epochs on the small embedded data; pass 0.001 for the paper's setting.

    ``checkpoints`` (:class:`sparsekern.checkpoint.Checkpoints`) records each completed stage (``full``,
    ``prune``, ``arm-<name>``, ``robustness`` for ANP) and, when resuming, skips the stages it holds. Every
    stage starts from ``torch.manual_seed(seed)``, so a resumed run reports what an uninterrupted one does
    (up to the timed speedup). Arguments are checked before any training: ``budget`` in (0, 1], epoch counts
    > 0; the folders of ``out`` and ``model_out`` are created up front. ``bench_repeats``: timed runs per
    model for the measured speedup.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget is the fraction of the full model's FLOPs to keep, in (0, 1]; got {budget}")
    for name, value in (("epochs", epochs), ("finetune_epochs", finetune_epochs), ("search_epochs", search_epochs)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    finetune_epochs = epochs / 4 if finetune_epochs is None else finetune_epochs
    search_epochs = epochs / 2 if search_epochs is None else search_epochs
    arms = default_arms(method, "rethinking") if arms is None else tuple(arms)
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; known: {list(ARMS)}")
    for path in (out, model_out):
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    store = checkpoints if checkpoints is not None else Checkpoints(None)
    store.check()
    test = loader(data.test, 512, shuffle=False)
    x = data.test.tensors[0][:batch_size] if hasattr(data.test, "tensors") else next(iter(test))[0][:batch_size]

    def fit(model: nn.Module, n_epochs: float, lr_: float, hooks: tuple = ()) -> float:
        model.train()
        train(model, data.train, TrainConfig(epochs=n_epochs, lr=lr_, batch_size=batch_size, seed=seed,
                                             progress=progress), hooks=hooks)
        model.eval()
        return evaluate(model, test)["accuracy"]

    def resumed(stage: str) -> Stage | None:
        done = store.load(stage)
        if done is not None:
            log(f"[{method}] {stage}: resumed from {store.path(stage)}")
        torch.manual_seed(seed)  # every stage starts from the same random state, resumed or not
        return done

    torch.manual_seed(seed)
    full = build(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
    done = resumed("full")
    if done is not None:
        done.load_into(full, "full").eval()
        full_acc, slimming_penalty = done.info["accuracy"], done.info["slimming_penalty"]
    else:
        hooks: tuple = ()
        if method == "slimming":
            from sparsekern.methods import slimming

            slimming_penalty = slimming.default_penalty(full) if slimming_penalty is None else slimming_penalty
            hooks = (slimming.SparsityHook(slimming_penalty),)
        log(f"[{method}] training the full {model_name} for {epochs} epochs")
        full_acc = fit(full, epochs, lr, hooks)
        store.save("full", {"accuracy": full_acc, "slimming_penalty": slimming_penalty}, {"full": full})

    done = resumed("prune")
    if done is not None:
        plan = Plan.from_dict(done.info["plan"])
        pruned = done.load_into(sk.compile(full, plan, x), "pruned").eval()
        before = done.info["accuracy"]
    else:
        log(f"[{method}] pruning to {budget:.0%} of the FLOPs")
        plan, source = prune_to_budget(method, full, x, data.train, budget, seed=seed,
                                       slimming_penalty=slimming_penalty, search_epochs=search_epochs,
                                       progress=progress)
        pruned = sk.compile(source, plan, x).eval()
        before = evaluate(pruned, test)["accuracy"]
        store.save("prune", {"plan": plan.to_dict(), "accuracy": before}, {"pruned": pruned})
    flops_full, flops_pruned = sk.flops(full, x), sk.flops(pruned, x)

    results, trained = [], []
    b_epochs = scratch_b_epochs(epochs, flops_full.total, flops_pruned.total)
    for arm in arms:
        done = resumed(f"arm-{arm}")
        if done is not None:
            model = done.load_into(copy.deepcopy(pruned), "model").eval()
            results.append(Arm(arm, done.info["epochs"], done.info["accuracy"]))
            trained.append(model)
            continue
        if arm == "fine-tune":
            log(f"[{method}] fine-tune: {finetune_epochs} epochs at lr {finetune_lr}")
            model, n_epochs = copy.deepcopy(pruned), finetune_epochs
            accuracy = fit(model, n_epochs, finetune_lr)
        elif arm in ("Scratch-E", "Scratch-B"):
            n_epochs = epochs if arm == "Scratch-E" else b_epochs
            log(f"[{method}] {arm}: {n_epochs:.1f} epochs from random initialisation")
            model = _reinitialised(pruned)
            accuracy = fit(model, n_epochs, lr)
        else:  # KD: TAS's training of the searched network, from scratch with distillation from the full model
            from sparsekern.methods import tas

            n_epochs = b_epochs
            log(f"[{method}] KD: {n_epochs:.1f} epochs from random initialisation, teacher = the full model")
            model = copy.deepcopy(pruned).train()
            tas.train_pruned(model, full.eval(), data.train, epochs=n_epochs, lr=lr, batch_size=batch_size,
                             seed=seed, progress=progress)
            model.eval()
            accuracy = evaluate(model, test)["accuracy"]
        store.save(f"arm-{arm}", {"epochs": n_epochs, "accuracy": accuracy}, {"model": model})
        results.append(Arm(arm, n_epochs, accuracy))
        trained.append(model)
    if model_out is not None:
        sk.save(trained[0] if trained else pruned, model_out)
        log(f"[{method}] saved the {'model of arm ' + arms[0] if trained else 'pruned model'} to {model_out}")
    robustness: dict[str, dict[str, float]] = {}
    if method == "anp":
        done = resumed("robustness")
        if done is not None:
            robustness = done.info["robustness"]
        else:
            robustness = _robustness(full, pruned, plan, data, x, search_epochs, finetune_epochs, seed, progress,
                                     log)
            store.save("robustness", {"robustness": robustness})

    bench = sk.bench.compare(full.eval(), pruned, x, passes=("fold_bn", "onednn"), threads=2, repeats=bench_repeats,
                             per_layer=False)
    report = ProtocolReport(
        method=method, model=model_name, data=data.name, budget=budget, full_accuracy=full_acc,
        pruned_accuracy_before_training=before, flops_full=flops_full.total, flops_pruned=flops_pruned.total,
        params_full=flops_full.params, params_pruned=flops_pruned.params,
        measured_speedup=bench.measured_speedup, theoretical_speedup=bench.theoretical_speedup, arms=results,
        plan=plan.to_dict(), robustness=robustness,
    )
    log(report.table())
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report.to_dict(), indent=1))
    return report
