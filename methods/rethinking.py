"""The protocol of "Rethinking the Value of Network Pruning" (Liu, Sun, Zhou, Huang, Darrell, ICLR 2019).

For one pruning method and a FLOPs budget:

1. train the full model (``epochs``; Network Slimming trains with its sparsity penalty);
2. prune it to the budget with the method, compile the plan;
3. three arms on the same pruned architecture:
   - **fine-tune**: inherit the pruned weights, train ``finetune_epochs`` at ``finetune_lr`` with the fine-tune
     arm's own schedule ``finetune_schedule`` (the paper, ``main_finetune.py``: 40 epochs at a constant lr
     0.001 on CIFAR, not the full model's steps);
   - **Scratch-E**: random initialisation, the full model's epoch budget;
   - **Scratch-B**: random initialisation, epochs scaled by FLOPs_full / FLOPs_pruned (same computation),
     capped at ``scratch_b_cap`` x (the paper: 2x on ImageNet, no cap on CIFAR) and rounded down to whole
     epochs as the official ``main_B.py`` does (``int(160 * flops_std / flops_small)``);
4. report the three accuracies, FLOPs, parameters and the measured CPU speedup of the pruned model.

The paper's finding: for these structured methods, Scratch-B >= fine-tune. :func:`run` returns a
:class:`ProtocolReport` with a table and JSON, so a run shows whether it reproduces.

The methods come from :mod:`sparsekern.methods.registry` (every method of kind ``"static"``). The learned
ones run through the same steps with their own search in step 2 and their own arm in step 3 (each method's
``arms``): Pruning from Scratch searches gates on a frozen random copy and trains the pruned network from
scratch (Scratch-B); TAS searches widths and depths and trains the result from scratch with
distillation from the full model for the full model's epochs (arm ``KD``, the base schedule); ANP-VS trains
its masks adversarially from the full model, and its report adds clean and PGD accuracy against plain
adversarial training pruned to the same channels.

Per-method settings, read from the registered method class with ``getattr`` (the registry's :class:`Method`
need not define them):

* ``model_kwargs``: ``{model name: zoo build options}``; the full model is built with them
  (:func:`base_model`; ANP-VS's VGG-16 with the paper's two-FC classifier, so both FC inputs carry a mask).
* ``prune_options``: the names (a mapping to their defaults, or a sequence) of the options the method's
  :meth:`Method.prune` reads from :attr:`PruneContext.options`; ``run(method_options=...)`` (a recipe's
  ``method_options``) may set exactly these, and any other name is refused before training
  (:func:`check_method_options`).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern.checkpoint import Checkpoints, Stage
from sparsekern.data import DataBundle, loader
from sparsekern.models import build
from sparsekern.models.init import init_weights
from sparsekern.methods.registry import Method, PruneContext, get_method, list_methods
from sparsekern.plan import Plan
from sparsekern.serialize import build_arch
from sparsekern.train import TrainConfig, evaluate, scratch_b_epochs, train
from sparsekern.training.config import SCHEDULES

__all__ = ["protocol_methods", "default_arms", "arm_epochs", "base_model", "check_method_options", "prune_to_budget",
           "run", "ProtocolReport", "Arm", "ARMS", "PROTOCOL_ARMS", "FINETUNE_SCHEDULE", "SCRATCH_B_ROUNDING",
           "RUN_OPTION_DEFAULTS"]

#: every arm the runner knows; ``KD`` is TAS's training with distillation from the full model
ARMS = ("fine-tune", "Scratch-E", "Scratch-B", "KD")
#: the three arms of the paper's protocol, trained for every method
PROTOCOL_ARMS = ("fine-tune", "Scratch-E", "Scratch-B")
#: the fine-tune arm's lr schedule by default: constant, as the paper's ``main_finetune.py`` (no lr drops)
FINETUNE_SCHEDULE = "constant"
#: how Scratch-B's epoch budget is rounded: ``"floor"`` (whole epochs, the official ``int(...)``) or ``"exact"``
SCRATCH_B_ROUNDING = ("floor", "exact")
#: :func:`run`'s defaults for the settings ``sparsekern prune`` has no flag for (a recipe's run options,
#: :meth:`sparsekern.recipes.Recipe.run_options`): the paper's behaviour on CIFAR
RUN_OPTION_DEFAULTS: Mapping[str, Any] = MappingProxyType({
    "finetune_schedule": FINETUNE_SCHEDULE, "scratch_b_cap": None, "scratch_b_rounding": "floor",
    "method_options": None})


def protocol_methods() -> list[str]:
    """The methods the protocol runs: the registered methods of kind ``"static"``
    (:mod:`sparsekern.methods.registry`), in registry order."""
    return list_methods("static")


def _protocol_method(method: str) -> Method:
    """The registered static method ``method``; ``ValueError`` naming the ones the protocol runs otherwise."""
    if method not in protocol_methods():
        raise ValueError(f"unknown method {method!r}; known: {protocol_methods()}")
    return get_method(method)


def default_arms(method: str, protocol: str | None = None) -> tuple[str, ...]:
    """The arms a run trains: the protocol's three plus the method's ``protocol_arms`` (``KD`` for TAS) with
    ``protocol="rethinking"``, else the method's own ``arms`` (fine-tune unless the method says otherwise)."""
    spec = get_method(method)
    if protocol == "rethinking":
        return PROTOCOL_ARMS + tuple(spec.protocol_arms)
    return tuple(spec.arms)


def base_model(method: str, model_name: str, *, num_classes: int | None = None, in_channels: int = 3,
               model_kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """The full model the protocol trains for ``method``: zoo ``model_name`` (:func:`sparsekern.models.build`)
    built with the method's own ``model_kwargs`` for that model, then ``model_kwargs``, which override them.

    A method class may declare ``model_kwargs = {model name: build options}``, read here with ``getattr``:
    ANP-VS builds the paper's VGG-16 with the two-FC classifier (512-512 FC + BN, ``classifier="two_fc"``) so
    that both FC inputs carry a mask (Madaan et al., ICML 2020, and the authors' code); other models and
    methods get the zoo's defaults.
    """
    declared = getattr(get_method(method), "model_kwargs", None) or {}
    kwargs = {**declared.get(model_name, {}), **(model_kwargs or {})}
    return build(model_name, num_classes=num_classes, in_channels=in_channels, **kwargs)


def check_method_options(method: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``options`` for ``method``'s :meth:`Method.prune` (:attr:`PruneContext.options`), checked against the names
    the method class declares in ``prune_options`` (read with ``getattr``; none declared: no option accepted).

    Raises ``ValueError`` naming the method, the unknown option and the options it accepts.
    """
    options = dict(options or {})
    known = sorted(getattr(get_method(method), "prune_options", None) or ())
    unknown = sorted(set(options) - set(known))
    if unknown:
        accepted = ", ".join(known) if known else "none (its class declares no prune_options)"
        raise ValueError(f"method {method!r} has no prune option {unknown[0]!r}; the options it accepts: {accepted}")
    return options


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
    options: Mapping[str, Any] | None = None,
) -> tuple[Plan, nn.Module]:
    """Run the registered ``method`` on a trained ``model`` so the compiled plan has <= ``budget`` x its FLOPs.

    Calls :meth:`sparsekern.methods.registry.Method.prune` with a :class:`PruneContext` of ``x``,
    ``train_data``, ``seed``, ``search_epochs`` (the learned methods' search length: Pruning from Scratch's
    gate training, TAS's architecture search, ANP-VS's adversarial mask training) and ``progress``; its
    options are ``options`` (the method's options as :meth:`Method.prepare` returns them, and the ones a recipe
    sets, :func:`check_method_options`) with ``slimming_penalty`` (the s the model was trained with, recorded
    in Network Slimming's plan) where given.

    The ratio-based methods (L1-norm, ThiNet, LASSO) prune the block-internal layers by one uniform ratio
    found with :func:`sparsekern.methods.budget.ratio_for_budget`; Network Slimming thresholds its BN
    scales globally at the budget. Returns the plan and the model to compile it against (refitted for
    ThiNet and LASSO, the searched or random network for TAS and Pruning from Scratch, the folded network
    for ANP-VS, ``model`` itself otherwise).
    """
    ctx_options = dict(options or {})
    if slimming_penalty is not None or "slimming_penalty" not in ctx_options:
        ctx_options["slimming_penalty"] = slimming_penalty
    ctx = PruneContext(x, train_data, seed=seed, search_epochs=search_epochs, progress=progress, options=ctx_options)
    plan, source = get_method(method).prune(model, budget, ctx)
    return plan, source


def _robustness(full: nn.Module, pruned: nn.Module, plan: Plan, data: DataBundle, x: torch.Tensor, epochs: float,
                finetune_epochs: float, seed: int, progress: bool,
                log: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """ANP-VS's report: clean and PGD accuracy (40 steps) of

    * the pruned ANP-VS model, as pruned and after ``finetune_epochs`` of adversarial fine-tuning;
    * the baseline: plain adversarial training of the full model for as many epochs as ANP-VS trained its masks
      (``epochs``), dense, and pruned by filter norm to ANP-VS's channels (same FLOPs) with the same
      adversarial fine-tuning.
    """
    from sparsekern.methods import anp  # ANP-VS's PGD attack and adversarial training

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


def arm_epochs(epochs: float, finetune_epochs: float, flops_full: float, flops_pruned: float, *,
               scratch_b_cap: float | None = None, scratch_b_rounding: str = "floor") -> dict[str, float]:
    """Epochs of each arm for a full model trained ``epochs`` epochs (Liu et al., ICLR 2019).

    * fine-tune: ``finetune_epochs``; Scratch-E: ``epochs``;
    * Scratch-B: ``epochs * min(flops_full / flops_pruned, scratch_b_cap)``
      (:func:`sparsekern.train.scratch_b_epochs`; the paper caps the factor at 2 on ImageNet and not on
      CIFAR, ``scratch_b_cap=None``). ``scratch_b_rounding="floor"`` rounds it down to whole epochs as the
      official ``main_B.py`` (``int(160 * flops_std / flops_small)``); a budget under one epoch (a shrunk run)
      is kept as it is, since rounding it down would train nothing. ``"exact"`` keeps the fraction;
    * ``KD`` (TAS): ``epochs``, the base schedule, as the official TAS code trains its searched network with the
      unpruned network's schedule.
    """
    if scratch_b_rounding not in SCRATCH_B_ROUNDING:
        raise ValueError(f"scratch_b_rounding must be one of {list(SCRATCH_B_ROUNDING)}, got {scratch_b_rounding!r}")
    scratch_b = scratch_b_epochs(epochs, flops_full, flops_pruned, max_factor=scratch_b_cap)
    if scratch_b_rounding == "floor" and scratch_b >= 1:
        scratch_b = float(math.floor(scratch_b))
    return {"fine-tune": finetune_epochs, "Scratch-E": epochs, "Scratch-B": scratch_b, "KD": epochs}


def _reinitialised(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with fresh weights: every layer's own reset, then the zoo's conv/BN init."""
    fresh = copy.deepcopy(model)
    for m in fresh.modules():
        if hasattr(m, "reset_parameters") and m is not fresh:
            m.reset_parameters()
    init_weights(fresh)
    return fresh


def _check_settings(budget: float, epochs: float, finetune_epochs: float | None,
                    search_epochs: float | None) -> None:
    """``budget`` in (0, 1] and every given epoch count > 0, checked before any training."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget is the fraction of the full model's FLOPs to keep, in (0, 1]; got {budget}")
    for name, value in (("epochs", epochs), ("finetune_epochs", finetune_epochs), ("search_epochs", search_epochs)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def _check_arm_settings(finetune_schedule: str | None, scratch_b_cap: float | None, scratch_b_rounding: str) -> None:
    """The fine-tune schedule, Scratch-B's cap (>= 1: Scratch-B never trains less than Scratch-E) and rounding,
    checked before any training."""
    if finetune_schedule is not None and finetune_schedule not in SCHEDULES:
        raise ValueError(f"finetune_schedule must be one of {list(SCHEDULES)} or None (the run's own schedule), "
                         f"got {finetune_schedule!r}")
    if scratch_b_cap is not None and not scratch_b_cap >= 1:
        raise ValueError(f"scratch_b_cap caps Scratch-B's FLOPs factor and must be >= 1 (the paper: 2 on ImageNet), "
                         f"got {scratch_b_cap}")
    if scratch_b_rounding not in SCRATCH_B_ROUNDING:
        raise ValueError(f"scratch_b_rounding must be one of {list(SCRATCH_B_ROUNDING)}, got {scratch_b_rounding!r}")


@dataclass
class _Runner:
    """The stages of one protocol run for the registered method ``spec``.

    Rules: every stage first looks for its checkpoint in ``store`` (and logs a resume), then seeds
    ``torch.manual_seed(seed)`` whether it resumed or not, so a resumed run computes what an uninterrupted
    one does; a stage that runs saves its checkpoint when it completes. The fine-tune arm trains with
    ``finetune_schedule`` (None: the run's own schedule, :func:`sparsekern.training.config.train_defaults`).
    """

    spec: Method
    data: DataBundle
    test: Any
    x: torch.Tensor
    store: Checkpoints
    batch_size: int
    seed: int
    progress: bool
    log: Callable[[str], None]
    finetune_schedule: str | None = FINETUNE_SCHEDULE

    def resumed(self, stage: str) -> Stage | None:
        done = self.store.load(stage)
        if done is not None:
            self.log(f"[{self.spec.name}] {stage}: resumed from {self.store.path(stage)}")
        torch.manual_seed(self.seed)  # every stage starts from the same random state, resumed or not
        return done

    def fit(self, model: nn.Module, n_epochs: float, lr: float, hooks: tuple = (),
            schedule: str | None = None) -> float:
        """Train ``model`` with the one trainer (lr ``schedule``, else the run's own); its test accuracy."""
        model.train()
        own = {} if schedule is None else {"schedule": schedule}
        config = TrainConfig(epochs=n_epochs, lr=lr, batch_size=self.batch_size, seed=self.seed,
                             progress=self.progress, **own)
        train(model, self.data.train, config, hooks=hooks)
        model.eval()
        return evaluate(model, self.test)["accuracy"]

    def train_full(self, full: nn.Module, model_name: str, epochs: float, lr: float,
                   options: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        """Stage ``full``: train the full model with the method's hooks; its accuracy and the method's options
        (:meth:`Method.prepare`, recorded with the checkpoint)."""
        done = self.resumed("full")
        if done is not None:
            done.load_into(full, "full").eval()
            return done.info["accuracy"], self.spec.prepare(full, {**options,
                                                                   "slimming_penalty": done.info["slimming_penalty"]})
        options = self.spec.prepare(full, options)
        self.log(f"[{self.spec.name}] training the full {model_name} for {epochs} epochs")
        accuracy = self.fit(full, epochs, lr, tuple(self.spec.train_hooks(options)))
        self.store.save("full", {"accuracy": accuracy, "slimming_penalty": options.get("slimming_penalty")},
                        {"full": full})
        return accuracy, options

    def prune(self, full: nn.Module, budget: float, options: dict[str, Any],
              search_epochs: float) -> tuple[Plan, nn.Module, float]:
        """Stage ``prune``: the plan, the compiled pruned model and its accuracy before any training."""
        done = self.resumed("prune")
        if done is not None:
            plan = Plan.from_dict(done.info["plan"])
            # the model the plan was made for: ``full``, or the architecture the method recorded (Pruning from
            # Scratch's expanded network); its weights come from the checkpoint
            source = build_arch(plan.meta["source_arch"]) if "source_arch" in plan.meta else full
            return plan, done.load_into(sk.compile(source, plan, self.x), "pruned").eval(), done.info["accuracy"]
        self.log(f"[{self.spec.name}] pruning to {budget:.0%} of the FLOPs")
        plan, source = prune_to_budget(self.spec.name, full, self.x, self.data.train, budget, seed=self.seed,
                                       slimming_penalty=options.get("slimming_penalty"),
                                       search_epochs=search_epochs, progress=self.progress, options=options)
        pruned = sk.compile(source, plan, self.x).eval()
        before = evaluate(pruned, self.test)["accuracy"]
        self.store.save("prune", {"plan": plan.to_dict(), "accuracy": before}, {"pruned": pruned})
        return plan, pruned, before

    def train_arm(self, arm: str, pruned: nn.Module, full: nn.Module, n_epochs: float,
                  lr: float) -> tuple[Arm, nn.Module]:
        """Stage ``arm-<arm>``: fine-tune the pruned weights, train from fresh weights (Scratch-E/B), or TAS's
        distillation from the full model (KD)."""
        done = self.resumed(f"arm-{arm}")
        if done is not None:
            model = done.load_into(copy.deepcopy(pruned), "model").eval()
            return Arm(arm, done.info["epochs"], done.info["accuracy"]), model
        name = self.spec.name
        if arm == "fine-tune":
            schedule = self.finetune_schedule or "the run's"
            self.log(f"[{name}] fine-tune: {n_epochs} epochs at lr {lr}, {schedule} schedule")
            model = copy.deepcopy(pruned)
            accuracy = self.fit(model, n_epochs, lr, schedule=self.finetune_schedule)
        elif arm in ("Scratch-E", "Scratch-B"):
            self.log(f"[{name}] {arm}: {n_epochs:.1f} epochs from random initialisation")
            model = _reinitialised(pruned)
            accuracy = self.fit(model, n_epochs, lr)
        else:  # KD: TAS's training of the searched network, from scratch with distillation from the full model
            from sparsekern.methods import tas

            self.log(f"[{name}] KD: {n_epochs:.1f} epochs from random initialisation, teacher = the full model")
            model = copy.deepcopy(pruned).train()
            tas.train_pruned(model, full.eval(), self.data.train, epochs=n_epochs, lr=lr, batch_size=self.batch_size,
                             seed=self.seed, progress=self.progress)
            model.eval()
            accuracy = evaluate(model, self.test)["accuracy"]
        self.store.save(f"arm-{arm}", {"epochs": n_epochs, "accuracy": accuracy}, {"model": model})
        return Arm(arm, n_epochs, accuracy), model

    def robustness(self, full: nn.Module, pruned: nn.Module, plan: Plan, search_epochs: float,
                   finetune_epochs: float) -> dict[str, dict[str, float]]:
        """Stage ``robustness`` (methods with ``robustness = True``, ANP-VS): :func:`_robustness`."""
        done = self.resumed("robustness")
        if done is not None:
            return done.info["robustness"]
        result = _robustness(full, pruned, plan, self.data, self.x, search_epochs, finetune_epochs, self.seed,
                             self.progress, self.log)
        self.store.save("robustness", {"robustness": result})
        return result


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
    finetune_schedule: str | None = FINETUNE_SCHEDULE,
    scratch_b_cap: float | None = None,
    scratch_b_rounding: str = "floor",
    batch_size: int = 64,
    slimming_penalty: float | None = None,
    search_epochs: float | None = None,
    method_options: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    arms: tuple[str, ...] | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    model_out: str | Path | None = None,
    log: Callable[[str], None] = print,
    checkpoints: Checkpoints | None = None,
    bench_repeats: int = 30,
) -> ProtocolReport:
    """Run the protocol (module docstring) for one method; write ``out`` (JSON) if given. (Over 80 lines only by
    its signature and this docstring: one keyword per protocol setting; the steps are helpers.)

    ``arms``: the arms to run (default :func:`default_arms` of the protocol); ``model_out`` saves the first arm's
    model (the pruned one when no arm runs) with :func:`sparsekern.save`. The full model is :func:`base_model`
    (the method's ``model_kwargs``, then ``model_kwargs``); ``search_epochs`` (default ``epochs / 2``) and
    ``method_options`` (:func:`check_method_options`) go to the method's :meth:`Method.prune`.

    Fine-tune (Liu et al., ICLR 2019, ``main_finetune.py``): ``finetune_epochs`` (default ``epochs / 4``, as 40
    after 160) at ``finetune_lr`` with its own ``finetune_schedule`` (default constant, the paper's; ``None``: the
    run's schedule, e.g. Network Slimming's refinement). ``finetune_lr`` defaults to 0.01, not the paper's 0.001,
    which barely moves a model trained a few epochs on the embedded data. Scratch-B: :func:`arm_epochs` with
    ``scratch_b_cap`` (the paper: 2 on ImageNet, none on CIFAR) and ``scratch_b_rounding`` (``"floor"``: whole
    epochs, as the official code).

    ``checkpoints`` (:class:`sparsekern.checkpoint.Checkpoints`) records each completed stage (``full``,
    ``prune``, ``arm-<name>``, ``robustness`` for ANP) and, when resuming, skips the stages it holds; every stage
    starts from ``torch.manual_seed(seed)``, so a resumed run reports what an uninterrupted one does (up to the
    timed speedup). Every argument is checked before any training; the folders of ``out`` and ``model_out`` are
    created up front. ``bench_repeats``: timed runs per model for the measured speedup.
    """
    spec = _protocol_method(method)
    _check_settings(budget, epochs, finetune_epochs, search_epochs)
    _check_arm_settings(finetune_schedule, scratch_b_cap, scratch_b_rounding)
    options = {**check_method_options(method, method_options), "slimming_penalty": slimming_penalty}
    finetune_epochs = epochs / 4 if finetune_epochs is None else finetune_epochs
    search_epochs = epochs / 2 if search_epochs is None else search_epochs
    arms = _resolve_arms(method, arms)
    _make_parent_dirs(out, model_out)
    store = checkpoints if checkpoints is not None else Checkpoints(None)
    store.check()
    test, x = _test_batches(data, batch_size)
    runner = _Runner(spec, data, test, x, store, batch_size=batch_size, seed=seed, progress=progress, log=log,
                     finetune_schedule=finetune_schedule)

    torch.manual_seed(seed)
    full = base_model(method, model_name, num_classes=data.num_classes, in_channels=data.in_channels,
                      model_kwargs=model_kwargs)
    full_acc, options = runner.train_full(full, model_name, epochs, lr, options)
    plan, pruned, before = runner.prune(full, budget, options, search_epochs)
    flops_full, flops_pruned = sk.flops(full, x), sk.flops(pruned, x)

    epochs_of = arm_epochs(epochs, finetune_epochs, flops_full.total, flops_pruned.total,
                           scratch_b_cap=scratch_b_cap, scratch_b_rounding=scratch_b_rounding)
    results, trained = _train_arms(runner, arms, pruned, full, epochs_of, {"fine-tune": finetune_lr}, lr)
    if model_out is not None:
        _save_model(trained[0] if trained else pruned, model_out, method, arms, bool(trained), log)
    robustness: dict[str, dict[str, float]] = {}
    if spec.robustness:
        robustness = runner.robustness(full, pruned, plan, search_epochs, finetune_epochs)

    report = ProtocolReport(
        method=method, model=model_name, data=data.name, budget=budget, full_accuracy=full_acc,
        pruned_accuracy_before_training=before, flops_full=flops_full.total, flops_pruned=flops_pruned.total,
        params_full=flops_full.params, params_pruned=flops_pruned.params, arms=results, plan=plan.to_dict(),
        robustness=robustness, **_measured_speedup(full, pruned, x, bench_repeats))
    log(report.table())
    if out is not None:
        _write_json(report, out)
    return report


def _test_batches(data: DataBundle, batch_size: int) -> tuple[Any, torch.Tensor]:
    """The test loader (batch 512) and an example batch of ``batch_size`` test inputs (traced, FLOPs counted,
    timed)."""
    test = loader(data.test, 512, shuffle=False)
    x = data.test.tensors[0][:batch_size] if hasattr(data.test, "tensors") else next(iter(test))[0][:batch_size]
    return test, x


def _measured_speedup(full: nn.Module, pruned: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """``measured_speedup`` and ``theoretical_speedup`` of ``pruned`` over ``full`` on ``x``
    (:func:`sparsekern.bench.compare`, BN folded and oneDNN, 2 threads, ``repeats`` timed runs)."""
    bench = sk.bench.compare(full.eval(), pruned, x, passes=("fold_bn", "onednn"), threads=2, repeats=repeats,
                             per_layer=False)
    return {"measured_speedup": bench.measured_speedup, "theoretical_speedup": bench.theoretical_speedup}


def _resolve_arms(method: str, arms: tuple[str, ...] | None) -> tuple[str, ...]:
    """The arms to run: ``arms``, or the protocol's default ones; ValueError for an arm not in ``ARMS``."""
    arms = default_arms(method, "rethinking") if arms is None else tuple(arms)
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ValueError(f"unknown arms {sorted(unknown)}; known: {list(ARMS)}")
    return arms


def _make_parent_dirs(*paths: str | Path | None) -> None:
    """Create the parent folder of every given path (None is skipped)."""
    for path in paths:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)


def _train_arms(runner: _Runner, arms: tuple[str, ...], pruned: nn.Module, full: nn.Module,
                epochs_of: Mapping[str, float], lr_of: Mapping[str, float],
                lr: float) -> tuple[list[Arm], list[nn.Module]]:
    """Train each arm in order (learning rate ``lr_of[arm]``, else ``lr``); its results and trained models."""
    results, trained = [], []
    for arm in arms:
        result, model = runner.train_arm(arm, pruned, full, epochs_of[arm], lr_of.get(arm, lr))
        results.append(result)
        trained.append(model)
    return results, trained


def _save_model(model: nn.Module, model_out: str | Path, method: str, arms: tuple[str, ...], from_arm: bool,
                log: Callable[[str], None]) -> None:
    """``sk.save`` the model to ``model_out`` and log which one it is (first arm's, or the pruned model)."""
    sk.save(model, model_out)
    log(f"[{method}] saved the {'model of arm ' + arms[0] if from_arm else 'pruned model'} to {model_out}")


def _write_json(report: ProtocolReport, out: str | Path) -> None:
    """Write ``report.to_dict()`` as indented JSON to ``out``, creating its folder."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report.to_dict(), indent=1))
