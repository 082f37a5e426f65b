"""The ``sparsekern`` command line: ``demo``, ``prune`` and ``bench``.

Rules:

* Every argument is checked before any work (:mod:`sparsekern.cli_checks`): a bad one exits with code 2
  and one line ``sparsekern: error: ...`` naming the flag, its value and the fix.
* A failure during the work exits with code 1 and one line with its cause; ``sparsekern --debug ...``
  prints the full traceback instead.
* ``demo`` and ``prune`` never replace files already in ``--out`` unless given ``--overwrite``.
* ``prune`` checkpoints every completed stage into ``--out``/checkpoints; after an interruption (Ctrl-C
  exits with code 130 and says what was saved) the same command with ``--resume`` skips the completed
  stages. Resuming with other arguments is refused, naming the arguments that differ.
* ``prune`` runs a method by its registered kind: ``"static"`` through the Rethinking protocol
  (:func:`sparsekern.methods.rethinking.run`), ``"dynamic"`` through the method's ``run_images`` (SANP: train,
  gate, calibrate, compile), ``"lowrank"`` through its ``run_lm`` (FLOP); each writes report.json and model.sk.
* ``prune --recipe NAME`` runs a paper's recipe (:mod:`sparsekern.recipes`, docs/recipes.md): the recipe fills
  every flag not given on the command line (explicit flags win) and the settings it cannot honour are printed
  before the run and recorded in its report; ``--scale F`` runs it shrunk on the embedded data.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from sparsekern.cli_checks import (
    UsageError,
    check_data_spec,
    check_file_out,
    check_image_model,
    check_json_out,
    check_lm,
    image_models,
    number,
    prepare_out,
    prune_methods,
    search_methods,
)
from sparsekern.recipes import DATA_NAMES, Recipe, RecipeError, list_recipes, load_recipe
from sparsekern.training.config import SCHEDULES

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
_HELP = """train, prune, compile and benchmark models (demo, prune, bench)

Arguments are checked before any work; errors print one line (exit code 2: bad command line, 1: failure
during the run, 130: interrupted), and --debug prints the traceback. demo and prune create --out and do
not replace files in it without --overwrite; prune checkpoints each completed stage and continues an
interrupted run with --resume."""
_DEBUG_HELP = "print the full traceback of an error"
CHECKPOINTS = "checkpoints"
DEMO_OUTPUTS = ("report.json", "model.sk", "plan.json")
PRUNE_OUTPUTS = ("report.json", "model.sk")

positive = number(float, low=0, low_open=True)
count = number(int, low=1)
nonnegative_int = number(int, low=0)


def round_to_arg(text: str) -> int | str:
    """``--round-to``: ``auto`` or a channel multiple (0: no rounding)."""
    return "auto" if text == "auto" else nonnegative_int(text)


class Interrupted(Exception):
    """Ctrl-C during a command; the message says what was saved and how to continue."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` (one line, exit 2, decided by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _interrupted(folder: Path, saved: Sequence[str], resume_hint: str) -> Interrupted:
    if saved:
        return Interrupted(f"interrupted; the completed stages ({', '.join(saved)}) are checkpointed in "
                           f"{folder}; {resume_hint}")
    return Interrupted("interrupted before any stage completed; nothing was saved")


# ----------------------------------------------------------------------------------------- demo

def _demo(args: argparse.Namespace) -> int:
    prepare_out(args.out, DEMO_OUTPUTS, overwrite=args.overwrite)
    from sparsekern.demo import run_demo

    try:
        run_demo(args.out, epochs=args.epochs, finetune_epochs=args.finetune_epochs, ratio=args.ratio,
                 threads=args.threads, repeats=args.repeats, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the demo keeps no checkpoints (it is a short run), so what it wrote to "
                          f"{args.out} is incomplete: run 'sparsekern demo --out {args.out} --overwrite' again")
    return 0


# ----------------------------------------------------------------------------------------- bench

#: flag -> default of the flags that define the cases of ``bench models --model`` (``passes``: None stands for
#: ``sk.optimize(..., script=True)``'s CPU path, ``sparsekern.bench.models.DEFAULT_PASSES``)
CASE_FLAGS = {"ratio": [0.3, 0.5], "batch": [1, 8], "size": 224, "scope": "all", "round_to": 16, "passes": None}


def _bench_models(args: argparse.Namespace) -> int:
    given = [k for k in CASE_FLAGS if getattr(args, k) is not None]
    if args.model and args.set:
        raise UsageError("--set runs a built-in set of cases; drop it to define cases with --model")
    if given and not args.model:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise UsageError(f"{flags} defines the cases of --model NAME; pass --model, or drop it to run the "
                         "standard set")
    from sparsekern.bench.models import DEFAULT_PASSES
    from sparsekern.passes import PASSES

    for k, default in CASE_FLAGS.items():
        if getattr(args, k) is None:
            setattr(args, k, default if k != "passes" else [",".join(DEFAULT_PASSES)])
    if args.model:
        check_image_model(args.model, args.size, flag="--size")

    paths = [tuple(p for p in spec.split(",") if p) for spec in args.passes]
    unknown = sorted({p for path in paths for p in path} - set(PASSES))
    if unknown:
        raise UsageError(f"--passes: unknown pass {', '.join(map(repr, unknown))}; known: {', '.join(PASSES)}")
    if args.out:
        check_json_out(args.out)
    if args.plot:
        check_file_out(args.plot, "--plot")

    from sparsekern.bench.models import LM_CASES, STANDARD_CASES, Case, lm_table, run_suite, summary_table
    from sparsekern.bench.timing import SERVING_BLOCK

    if args.model:
        cases = [Case(args.model, r, b, args.size, scope=args.scope, round_to=args.round_to or None, passes=p)
                 for p in paths for b in args.batch for r in args.ratio]
    else:
        cases = list(LM_CASES if args.set == "lm" else STANDARD_CASES)
    doc = run_suite(cases, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                    per_layer=args.per_layer, block=args.block or SERVING_BLOCK, out=args.out,
                    part="lm" if args.set == "lm" else None, progress=not args.no_progress)
    print(lm_table(doc) if args.set == "lm" else summary_table(doc))
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        from sparsekern.bench.plot import plot_speedup

        print(f"wrote {plot_speedup(doc['results'], args.plot)}")
    return 0


KERNEL_OPS = ("attention", "channel_skip_conv2d", "conv_chain", "fused_conv2d", "lowrank_linear")


def _bench_kernels(args: argparse.Namespace) -> int:
    import importlib

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if args.out:
        check_json_out(args.out)
    from sparsekern.bench.results import command_line, write_part
    from sparsekern.bench.timing import hold_freed_memory

    bench = importlib.import_module(f"sparsekern.bench.kernel_{args.op}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # as the model benchmarks: no timing pays page faults for its output
        hold_freed_memory()
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    doc = bench.run(device=device, dtype=dtype, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                    quick=args.quick, progress=not args.no_progress, budget_s=args.budget_s,
                    min_repeats=args.min_repeats)
    print(bench.table(doc))
    if args.out:
        key = f"{args.op}/{device}/{str(dtype).replace('torch.', '')}"
        write_part(args.out, {"command": command_line(), **doc}, "kernels", key)
        print(f"wrote {args.out} (kernels / {key})")
    return 0


# ----------------------------------------------------------------------------------------- prune

#: flag -> default, for the flags only the LM (``"lowrank"``) methods read and those only the image
#: (``"static"``) methods read; a flag given to a method that does not read it is refused rather than ignored.
#: ``None``: the pipeline's own default (``rethinking.run``'s, :class:`TrainConfig`'s, the zoo model's).
LM_ONLY = {"target": 0.5, "steps": 600, "eval_bytes": None, "d_model": None, "layers": None, "seq_len": None,
           "dropout": None, "grad_clip": None, "lambda_optimizer": None, "n_proj": None}
IMAGE_ONLY = {"budget": 0.5, "image_size": None, "protocol": None, "epochs": 10.0, "finetune_epochs": None,
              "search_epochs": None, "repeats": 30, "finetune_lr": None, "momentum": None, "nesterov": None,
              "milestones": None, "gamma": None, "slimming_penalty": None}
#: image flags that only the static methods read (the dynamic ones have no pruned-then-trained arm)
STATIC_ONLY = ("protocol", "finetune_epochs", "finetune_lr")
#: training flags of image runs that go to ``rethinking.run`` itself; the others of ``DEFAULTABLE``
#: (:func:`sparsekern.training.config.train_defaults`) reach every trainer the pipeline builds
RUN_SETTINGS = ("lr", "finetune_lr", "batch_size", "slimming_penalty")
#: arguments that do not change what a run computes (left out of the checkpoints' identity)
NOT_IDENTITY = ("out", "no_progress", "resume", "overwrite", "debug", "run", "command", "repeats", "list_recipes",
                "recipe_options")


@dataclass(frozen=True)
class RecipeRun:
    """A recipe applied to a command line: the recipe, its scale, and the flags given that replaced its values
    (flag -> (given, recipe's))."""

    recipe: Recipe
    scale: float
    overrides: dict[str, tuple[Any, Any]]


def _apply_recipe(args: argparse.Namespace) -> RecipeRun:
    """Fill every flag not given on the command line from ``--recipe`` (at ``--scale``); explicit flags win.

    Without ``--data``, a full-scale recipe is refused (it names the flag the paper's data needs) and a
    shrunk one reads the embedded data.
    """
    try:
        recipe = load_recipe(args.recipe)
    except RecipeError as e:
        raise UsageError(f"--recipe {args.recipe!r}: {e}") from None
    if args.method is not None and args.method != recipe.method:
        raise UsageError(f"--method {args.method}: --recipe {recipe.name} runs --method {recipe.method}; drop "
                         "--method, or choose a recipe of that method (--list-recipes)")
    scale = 1.0 if args.scale is None else args.scale
    overrides = {}
    for key, value in recipe.arguments(scale).items():
        value = list(value) if isinstance(value, tuple) else value
        given = getattr(args, key)
        if given is None:
            setattr(args, key, value)
        elif given != value:
            overrides[key] = (given, value)
    if args.data is None:
        if scale == 1.0:
            raise UsageError(f"--recipe {recipe.name} trains on {DATA_NAMES[recipe.data]} ({recipe.citation}); pass "
                             f"{recipe.data_flag}, or --scale F (e.g. --scale 0.01) to run it shrunk on the embedded "
                             f"{recipe.embedded_data} data")
        args.data = recipe.embedded_data
    return RecipeRun(recipe, scale, overrides)


def _check_prune(args: argparse.Namespace) -> RecipeRun | None:
    """Apply ``--recipe``, refuse flags the method does not read, fill the defaults, and check model, sizes
    and data; returns the applied recipe (None without ``--recipe``)."""
    run = _apply_recipe(args) if args.recipe is not None else None
    if args.scale is not None and run is None:
        raise UsageError(f"--scale {args.scale:g} shrinks a recipe; pass --recipe NAME (--list-recipes lists them)")
    if args.method is None:
        raise UsageError("pass --method NAME, or --recipe NAME to run a paper's recipe (--list-recipes lists them)")
    if args.slimming_penalty is not None and args.method != "slimming":
        raise UsageError(f"--slimming-penalty applies to --method slimming only; drop it for --method {args.method}")
    if args.milestones is not None and list(args.milestones) != sorted(args.milestones):
        raise UsageError(f"--milestones {' '.join(map(str, args.milestones))}: give the lr drops in increasing order")
    lm = _is_lm(args.method)
    if _kind(args.method) == "dynamic":
        from sparsekern.methods.registry import get_method

        if not callable(getattr(get_method(args.method), "run_images", None)):
            raise UsageError(f"--method {args.method}: this dynamic method has no image pipeline (a run_images "
                             "method, as SANP's) for sparsekern prune to run; use its Python API")
        static_only = [k for k in STATIC_ONLY if getattr(args, k) is not None]
        if static_only:
            flags = ", ".join("--" + k.replace("_", "-") for k in static_only)
            raise UsageError(f"{flags} applies to the static methods (pruned, then fine-tuned); --method "
                             f"{args.method} trains its gates jointly with the network: drop it")
    foreign = LM_ONLY if not lm else IMAGE_ONLY
    given = [k for k in foreign if getattr(args, k) is not None]
    if args.search_epochs is not None and not lm and args.method not in search_methods():
        given.append("search_epochs")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        if lm:
            readers = f"the image methods, not --method {args.method}"
        else:
            readers = f"--method {'/'.join(prune_methods('lowrank'))} only"
        if given == ["search_epochs"]:
            readers = f"--method {'/'.join(search_methods())} only"
        raise UsageError(f"{flags} applies to {readers}; drop it for --method {args.method}")
    for k, default in {**LM_ONLY, **IMAGE_ONLY}.items():
        if getattr(args, k) is None and k in (IMAGE_ONLY if not lm else LM_ONLY):
            setattr(args, k, default)
    if lm:
        args.model = args.model or "transformer_lm"
        args.data = args.data or "pystdlib"
        check_data_spec(args.data, kinds={"pystdlib": "", "enwik8": "file"})
        check_lm(args.model, _lm_kwargs(args), method=args.method)
    else:
        args.model = args.model or "resnet56"
        args.data = args.data or "digits"
        check_data_spec(args.data, kinds={"digits": "", "cifar10": "dir"})
        check_image_model(args.model, args.image_size or 32)
    return run


def _kind(method: str) -> str:
    """The registered kind of ``method``: ``"static"``, ``"dynamic"`` or ``"lowrank"``."""
    from sparsekern.methods.registry import get_method

    return get_method(method).kind


def _is_lm(method: str) -> bool:
    """Whether ``method`` is registered as ``"lowrank"`` (run on a byte-level LM) rather than on images."""
    return _kind(method) == "lowrank"


def _lm_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The zoo LM's constructor arguments given on the command line (or by a recipe)."""
    return {k: getattr(args, k) for k in ("d_model", "layers", "dropout") if getattr(args, k) is not None}


def _run_identity(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that decide what a run computes, as ``{"--flag": value}`` (checkpoints must match them)."""
    return {"--" + k.replace("_", "-"): v for k, v in sorted(vars(args).items()) if k not in NOT_IDENTITY}


def _prune(args: argparse.Namespace) -> int:
    from sparsekern.checkpoint import CheckpointMismatch, Checkpoints

    if args.list_recipes:
        print(_recipe_table())
        return 0
    recipe_run = _check_prune(args)
    out = prepare_out(args.out, PRUNE_OUTPUTS, overwrite=args.overwrite, resume=args.resume,
                      checkpoints=CHECKPOINTS)
    store = Checkpoints(out / CHECKPOINTS, _run_identity(args), resume=args.resume)
    if args.resume:
        try:
            store.check()  # other arguments: refused before loading data or training
        except CheckpointMismatch as e:
            raise UsageError(str(e)) from None
        if not store.completed():
            print(f"--resume: no checkpoints in {store.folder} yet; starting from the beginning")
    elif store.completed():  # prepare_out let them through: --overwrite
        store.clear()
    if recipe_run is not None:
        print(_recipe_header(recipe_run, args))
    args.recipe_options = recipe_run.recipe.run_options() if recipe_run is not None else {}  # implied by --recipe
    run = {"lowrank": _prune_lm, "dynamic": _prune_dynamic}.get(_kind(args.method), _prune_images)
    try:
        report_line = run(args, out, store)
    except KeyboardInterrupt:
        raise _interrupted(store.folder, store.completed(),
                           "run the same command with --resume to continue from there")
    if recipe_run is not None:
        _record_recipe(out / "report.json", recipe_run, args)
    print(report_line)
    print(f"wrote {out / 'report.json'} and {out / 'model.sk'}")
    return 0


def _load_data(load: Any, spec: str, **kwargs: Any) -> Any:
    try:
        return load(spec, **kwargs)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"--data {spec!r}: {e}") from None


def _prune_images(args: argparse.Namespace, out: Path, store: Any) -> str:
    from sparsekern.data import load
    from sparsekern.methods import rethinking
    from sparsekern.training.config import train_defaults

    data = _load_data(load, args.data, image_size=args.image_size)
    settings = {k: getattr(args, k) for k in RUN_SETTINGS if getattr(args, k) is not None}
    with train_defaults(**_train_defaults(args)):
        report = rethinking.run(args.method, data, model_name=args.model, budget=args.budget, epochs=args.epochs,
                                finetune_epochs=args.finetune_epochs, search_epochs=args.search_epochs,
                                arms=rethinking.default_arms(args.method, args.protocol), seed=args.seed,
                                progress=not args.no_progress, out=out / "report.json", model_out=out / "model.sk",
                                checkpoints=store, bench_repeats=args.repeats, **settings,
                                **getattr(args, "recipe_options", {}))
    return f"{args.method}: FLOPs {report.flops_pruned / report.flops_full:.1%} of the full {args.model}"


def _prune_lm(args: argparse.Namespace, out: Path, store: Any) -> str:
    """A ``"lowrank"`` method's byte-level LM pipeline (the registered method's ``run_lm``; FLOP's)."""
    import json

    import sparsekern as sk
    from sparsekern.methods.registry import get_method
    from sparsekern.text_data import load
    from sparsekern.train import TrainConfig

    corpus = _load_data(load, args.data)
    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}  # else TrainConfig's
    config = TrainConfig(max_steps=args.steps, epochs=1e9, optimizer="adam", lr=_given(args.lr, 3e-3),
                         weight_decay=_given(args.weight_decay, 0.0), schedule=_given(args.schedule, "constant"),
                         warmup_steps=_given(args.warmup_steps, max(1, args.steps // 20)),
                         grad_clip=_given(args.grad_clip, 1.0), seed=args.seed, progress=not args.no_progress, **batch)
    run = get_method(args.method).run_lm(args.model, corpus, config, target=args.target, seed=args.seed,
                                         eval_bytes=args.eval_bytes, model_kwargs=_lm_kwargs(args), checkpoints=store,
                                         seq_len=args.seq_len, n_proj=args.n_proj,
                                         **({} if args.lambda_optimizer is None
                                            else {"lambda_optimizer": args.lambda_optimizer}))
    sk.save(run.compiled, out / "model.sk")
    (out / "report.json").write_text(json.dumps(run.report, indent=1))
    return (f"{args.model}: sparsity {run.report['sparsity']:.3f} (target {args.target}), params "
            f"{run.report['params_dense']} -> {run.report['params_compiled']}, test bits per byte "
            f"{run.report['test_bpb']:.3f}")


def _prune_dynamic(args: argparse.Namespace, out: Path, store: Any) -> str:
    """A ``"dynamic"`` method's image pipeline (the registered method's ``run_images``; SANP's): train, gate,
    calibrate, compile; writes model.sk (the compiled per-sample model) and report.json."""
    import json

    import sparsekern as sk
    from sparsekern.data import load
    from sparsekern.methods.registry import get_method
    from sparsekern.training.config import train_defaults

    data = _load_data(load, args.data, image_size=args.image_size)
    with train_defaults(**_train_defaults(args)):
        run = get_method(args.method).run_images(
            args.model, data, budget=args.budget, epochs=args.epochs, search_epochs=args.search_epochs,
            lr=_given(args.lr, 0.1), batch_size=_given(args.batch_size, 64), seed=args.seed,
            progress=not args.no_progress, checkpoints=store, bench_repeats=args.repeats)
    sk.save(run.compiled, out / "model.sk")
    (out / "report.json").write_text(json.dumps(run.report, indent=1))
    r = run.report
    return (f"{args.method}: {r['cost_ratio']['mean']:.1%} of the dense {args.model}'s FLOPs per image on average "
            f"(budget {args.budget:g}), accuracy {r['compiled_accuracy']:.2%} (dense {r['full_accuracy']:.2%}), "
            f"measured speedup {r['measured_speedup']:.2f}x (efficiency {r['efficiency']:.2f})")


def _given(value: Any, default: Any) -> Any:
    """``value`` unless it is None (a flag not given)."""
    return default if value is None else value


def _train_defaults(args: argparse.Namespace) -> dict[str, Any]:
    """The :data:`~sparsekern.training.config.DEFAULTABLE` settings given (by flag or recipe), for
    :func:`~sparsekern.training.config.train_defaults`."""
    from sparsekern.training.config import DEFAULTABLE

    given = {k: getattr(args, k) for k in DEFAULTABLE if getattr(args, k, None) is not None}
    if "milestones" in given:
        given["milestones"] = tuple(given["milestones"])
    return given


# ----------------------------------------------------------------------------------------- recipes

def _recipe_table() -> str:
    """``--list-recipes``: one line per shipped recipe (name, method, model, data, paper), then how to run one."""
    rows = [("recipe", "method", "model", "data", "paper")]
    for name in list_recipes():
        r = load_recipe(name)
        rows.append((name, r.method, r.settings["model"], DATA_NAMES[r.data],
                     f"{r.citation}, \"{r.paper['title']}\" {r.paper['url']}"))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines += ["", "run one at full scale: sparsekern prune --recipe NAME --data cifar10:PATH (enwik8:PATH for flop); "
              "shrunk on the embedded data: sparsekern prune --recipe NAME --scale 0.01 (docs/recipes.md)"]
    return "\n".join(lines)


def _recipe_header(run: RecipeRun, args: argparse.Namespace) -> str:
    """What a recipe run prints before any work: the paper and code it follows, the data and scale, the flags
    that replaced recipe values, and every official setting the implementation cannot honour."""
    r = run.recipe
    lines = [f"recipe {r.name}: {r.citation}, \"{r.paper['title']}\"; following {r.code['repo']} ({r.code['follows']})"]
    if run.scale == 1.0:
        lines.append(f"  full scale on --data {args.data}")
    else:
        sizes = ", ".join(f"{k} {v}" for k, v in r.shrunk.items())
        lines.append(f"  shrunk: epochs and steps x {run.scale:g}, sizes {sizes}; --data {args.data}")
    for key, (given, value) in run.overrides.items():
        lines.append(f"  --{key.replace('_', '-')} {given} given on the command line (the recipe's: {value})")
    if r.not_supported:
        lines.append(f"  not honoured by this implementation ({len(r.not_supported)}):")
        lines += [f"    - {u.line()}" for u in r.not_supported]
    return "\n".join(lines)


def _record_recipe(path: Path, run: RecipeRun, args: argparse.Namespace) -> None:
    """Add the recipe, its scale, the overrides and what was not honoured to the run's ``report.json``."""
    import json

    doc = json.loads(path.read_text())
    doc["recipe"] = {"name": run.recipe.name, "source": run.recipe.source, "paper": dict(run.recipe.paper),
                     "code": dict(run.recipe.code), "scale": run.scale, "data": args.data,
                     "overrides": {k: {"given": g, "recipe": v} for k, (g, v) in run.overrides.items()},
                     "not_supported": [asdict(u) for u in run.recipe.not_supported]}
    path.write_text(json.dumps(doc, indent=1))


# ----------------------------------------------------------------------------------------- parser

def _method_help() -> str:
    """``--method``'s help, from the registry: each image method's own arms, which methods report robustness,
    and which prune byte-level LMs."""
    from sparsekern.methods.registry import get_method

    static = [get_method(m) for m in prune_methods("static")]
    own = ", ".join(f"{m.name}: {'/'.join(m.arms) or 'none'}" for m in static if m.arms != ("fine-tune",))
    robust = "/".join(m.name for m in static if m.robustness)
    return (f"a registered method (sparsekern.methods.registry). Image methods train the fine-tune arm unless "
            f"they have their own ({own}); {robust} also reports clean and PGD accuracy against adversarial "
            f"training. Per-sample (dynamic) methods ({'/'.join(prune_methods('dynamic'))}) train their gates with "
            "the network for --search-epochs, calibrate and compile them (model.sk runs the per-sample path). "
            f"Byte-level LM methods ({'/'.join(prune_methods('lowrank'))}) prune to a parameter sparsity (--target, "
            "--steps)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sparsekern`` parser: ``--debug`` accepted before or after any subcommand."""
    parser = _Parser(prog="sparsekern", description=_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    common = _Parser(add_help=False)  # lets --debug also follow the subcommand
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_demo_parser(sub, common)
    _add_prune_parser(sub, common)
    _add_bench_parser(sub, common)
    return parser


def _add_demo_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``sparsekern demo``."""
    demo = sub.add_parser("demo", parents=[common],
                          help="train, prune, compile and benchmark a ResNet-20 on embedded data")
    demo.add_argument("--out", default="sparsekern-demo",
                      help="output folder (report.json, model.sk, plan.json); refused if they exist, see --overwrite")
    demo.add_argument("--overwrite", action="store_true", help="replace the outputs already in --out")
    demo.add_argument("--epochs", type=positive, default=6)
    demo.add_argument("--finetune-epochs", type=positive, default=3)
    demo.add_argument("--ratio", type=number(float, low=0, high=1, low_open=True, high_open=True), default=0.5,
                      help="fraction of channels pruned per group, in (0, 1)")
    demo.add_argument("--threads", type=count, default=2)
    demo.add_argument("--repeats", type=count, default=30, help="timed runs per model and layer")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)


def _add_prune_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``sparsekern prune``."""
    prune = sub.add_parser("prune", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
                           help="train, prune to a FLOPs budget, fine-tune, save and report",
                           description="train, prune to a FLOPs budget, fine-tune, save and report.\n\n"
                                       "--recipe NAME runs a paper's recipe (--list-recipes lists them): it sets "
                                       "the flags below;\nflags given explicitly override the recipe's values.")
    prune.add_argument("--method", choices=prune_methods(), help=_method_help() + " (required unless --recipe)")
    prune.add_argument("--model", help=f"zoo model name (default: resnet56; transformer_lm for flop); image "
                                       f"methods: {', '.join(image_models())}")
    prune.add_argument("--budget", type=number(float, low=0, high=1, low_open=True, what="fraction of FLOPs kept"),
                       help="FLOPs to keep, as a fraction of the full model, in (0, 1] (default 0.5)")
    prune.add_argument("--data", help="'digits' (embedded, default) or 'cifar10:PATH'; for flop 'pystdlib' "
                                      "(default) or 'enwik8:PATH'")
    prune.add_argument("--target", type=number(float, low=0, high=1, high_open=True),
                       help="flop: target sparsity of the factorized layers, in [0, 1) (default 0.5)")
    prune.add_argument("--steps", type=count, help="flop: optimizer steps (default 600)")
    prune.add_argument("--eval-bytes", type=count, help="flop: bytes of the test split to evaluate (default: all)")
    prune.add_argument("--d-model", type=count, help="flop: LM width (default: the zoo's)")
    prune.add_argument("--layers", type=count, help="flop: LM depth (default: the zoo's)")
    prune.add_argument("--image-size", type=count, help="resize the data (default 32); checked against the model")
    prune.add_argument("--protocol", choices=("rethinking",),
                       help="train the fine-tune, Scratch-E and Scratch-B arms (and KD for tas)")
    prune.add_argument("--epochs", type=positive, help="epochs of the full model (and Scratch-E) (default 10)")
    prune.add_argument("--finetune-epochs", type=positive, help="default: epochs / 4")
    prune.add_argument("--search-epochs", type=positive,
                       help=f"{'/'.join(search_methods())}: the method's search (gate training, architecture "
                            "search, mask training) (default: epochs / 2)")
    _add_training_flags(prune)
    _add_recipe_flags(prune)
    prune.add_argument("--seed", type=nonnegative_int, default=0)
    prune.add_argument("--repeats", type=count, help="timed runs per model for the measured speedup (default 30)")
    prune.add_argument("--out", default="sparsekern-prune",
                       help="output folder (report.json, model.sk, checkpoints/); created if missing")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace the outputs and checkpoints already in --out (otherwise refused)")
    prune.add_argument("--resume", action="store_true",
                       help="continue an interrupted run: skip the stages checkpointed in --out/checkpoints "
                            "(refused if they were run with other arguments)")
    prune.add_argument("--no-progress", action="store_true")
    prune.set_defaults(run=_prune)


def _add_training_flags(prune: argparse.ArgumentParser) -> None:
    """``prune``'s optimisation flags (a recipe sets them; default: the pipeline's own settings)."""
    nonnegative = number(float, low=0)
    fraction = number(float, low=0, high=1)
    prune.add_argument("--lr", type=positive, help="learning rate of the full model and the scratch arms "
                                                   "(default 0.1; flop: Adam's, default 3e-3)")
    prune.add_argument("--finetune-lr", type=positive, help="the fine-tune arm's learning rate (default 0.01)")
    prune.add_argument("--batch-size", type=count, help="training batch (default 64; flop: 128)")
    prune.add_argument("--weight-decay", type=nonnegative, help="default 1e-4 (flop: 0)")
    prune.add_argument("--momentum", type=fraction, help="SGD momentum (default 0.9)")
    prune.add_argument("--nesterov", action=argparse.BooleanOptionalAction, help="Nesterov momentum (default off)")
    prune.add_argument("--schedule", choices=SCHEDULES,
                       help="lr schedule of every training run (default cosine; flop: constant)")
    prune.add_argument("--milestones", type=fraction, nargs="+",
                       help="--schedule step: the lr drops, as fractions of each run (default 0.5 0.75)")
    prune.add_argument("--gamma", type=number(float, low=0, high=1, low_open=True),
                       help="--schedule step: lr factor at each milestone (default 0.1)")
    prune.add_argument("--warmup-steps", type=nonnegative_int,
                       help="linear lr warm-up of every trainer the run builds without its own (default 0; flop: "
                            "steps / 20)")
    prune.add_argument("--slimming-penalty", type=positive,
                       help="slimming: the L1 penalty s on BN scales (default 1e-4 VGG, 1e-5 ResNet)")
    prune.add_argument("--seq-len", type=count, help="flop: training window in bytes (default: the model's)")
    prune.add_argument("--dropout", type=fraction, help="flop: the LM's dropout (default: the zoo's, 0)")
    prune.add_argument("--grad-clip", type=positive, help="flop: gradient norm clip (default 1)")
    prune.add_argument("--n-proj", type=count,
                       help="flop: factorize every layer at this rank, counted as a projection (the official "
                            "enwik8 SRU's n_proj: sparsity against the factors); default: the parameter-preserving "
                            "rank")
    prune.add_argument("--lambda-optimizer", choices=("trainer", "adam"),
                       help="flop: how the Lagrange multipliers are updated: 'trainer' (default: ascent in the "
                            "trainer's optimizer, no momentum) or 'adam' (the official code's separate Adam)")


def _add_recipe_flags(prune: argparse.ArgumentParser) -> None:
    """``prune --recipe``, ``--list-recipes`` and ``--scale``."""
    prune.add_argument("--recipe", metavar="NAME",
                       help="run a paper's recipe (sparsekern/recipes/NAME.json, or a path to a recipe .json): it "
                            "sets method, model and every training flag; explicitly given flags override its values")
    prune.add_argument("--list-recipes", action="store_true", help="list the recipes with their paper and data, "
                                                                   "and exit")
    prune.add_argument("--scale", type=number(float, low=0, high=1, low_open=True),
                       help="--recipe: run it shrunk, every epoch and step count x SCALE in (0, 1], with the "
                            "recipe's small sizes and, without --data, the embedded data (default 1: full scale)")


def _add_bench_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``sparsekern bench`` and its suites ``models``, ``kernels`` and ``gpu``, in that order."""
    bench = sub.add_parser("bench", parents=[common],
                           help="benchmarks: dense vs compiled, theoretical vs measured speedup")
    bench_sub = bench.add_subparsers(dest="suite", required=True, parser_class=_Parser)
    _add_bench_models_parser(bench_sub, common)
    _add_bench_kernels_parser(bench_sub, common)
    from sparsekern.bench.gpu import add_parser as add_gpu_parser
    add_gpu_parser(bench_sub)


def _add_bench_models_parser(bench_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``sparsekern bench models``."""
    models = bench_sub.add_parser("models", parents=[common],
                                  help="uniform L1-norm pruning of zoo models (default: the standard set)")
    models.add_argument("--model", help="zoo model name; default: the standard ResNet-50/ResNet-56 set")
    models.add_argument("--set", choices=("standard", "lm"),
                        help="a built-in set of cases: 'standard' (the default: ResNet-50/56/20, L1-norm pruned) or "
                             "'lm' (a d_model 768 Transformer and a d_model 1024 SRU, 512 tokens, FLOP low-rank "
                             "pruned to kept ranks 0.5/0.3/0.15; written under the key 'lm' of --out)")
    models.add_argument("--ratio", type=number(float, low=0, high=1, low_open=True, high_open=True), nargs="+",
                        help="fractions of channels pruned, each in (0, 1) (default 0.3 0.5)")
    models.add_argument("--batch", type=count, nargs="+", help="batch sizes (default 1 8)")
    models.add_argument("--size", type=count, help="input height and width, checked against the model (default 224)")
    models.add_argument("--scope", choices=("all", "internal"), help="channel groups pruned (default all)")
    models.add_argument("--round-to", type=round_to_arg,
                        help="channel multiple (0: no rounding; default 16), or 'auto': the count this CPU's "
                             "convolution kernels compute anyway (quarters of a SIMD vector up to one and a half "
                             "vectors, then whole vectors)")
    models.add_argument("--passes", nargs="+",
                        help="inference paths, each a comma-separated list of passes (e.g. fold_bn,freeze; "
                             "default: the CPU path of sk.optimize(..., script=True))")
    models.add_argument("--threads", type=count, default=2)
    models.add_argument("--warmup", type=nonnegative_int, default=10)
    models.add_argument("--repeats", type=count, default=50)
    models.add_argument("--block", type=count,
                        help="timed runs of a model per turn, after one untimed run (1: alternate single runs; "
                             "default sparsekern.bench.timing.SERVING_BLOCK: each model timed as a process serving it "
                             "runs it)")
    models.add_argument("--per-layer", action="store_true", help="also time every conv/linear layer")
    models.add_argument("--out", help="merge the results into this JSON (its other keys are kept; 'results' is "
                                      "replaced), e.g. bench/results/cpu.json")
    models.add_argument("--plot", help="write a PNG of measured vs theoretical speedup here (replaced if it exists)")
    models.add_argument("--no-progress", action="store_true")
    models.set_defaults(run=_bench_models)


def _add_bench_kernels_parser(bench_sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """``sparsekern bench kernels``."""
    kernels = bench_sub.add_parser("kernels", parents=[common],
                                   help="kernel microbenchmarks against the dense op and the naive baseline")
    kernels.add_argument("--op", required=True, choices=KERNEL_OPS)
    kernels.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    kernels.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                         help="default: float16 on cuda, float32 on cpu")
    kernels.add_argument("--threads", type=count, default=2)
    kernels.add_argument("--warmup", type=nonnegative_int, default=5)
    kernels.add_argument("--repeats", type=count, default=30)
    kernels.add_argument("--budget-s", type=positive, default=3.0,
                         help="timing budget per row in seconds (fewer repeats for slow rows)")
    kernels.add_argument("--min-repeats", type=count, default=7, help="repeats per row whatever the budget")
    kernels.add_argument("--quick", action="store_true", help="a few shapes only")
    kernels.add_argument("--out", help="merge the results into this JSON under kernels/OP/DEVICE/DTYPE (other "
                                       "keys are kept), e.g. bench/results/cpu.json")
    kernels.add_argument("--no-progress", action="store_true")
    kernels.set_defaults(run=_bench_kernels)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit code (0, 1 runtime failure, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        debug = args.debug
        return args.run(args)
    except UsageError as e:
        error, code, line = e, EXIT_USAGE, f"sparsekern: error: {_one_line(e)}"
    except Interrupted as e:
        error, code, line = e, EXIT_INTERRUPTED, f"sparsekern: {_one_line(e)}"
    except KeyboardInterrupt as e:
        error, code, line = e, EXIT_INTERRUPTED, "sparsekern: interrupted; nothing was saved"
    except Exception as e:
        hint = "" if debug else " (rerun with 'sparsekern --debug ...' for the traceback)"
        error, code, line = e, EXIT_RUNTIME, f"sparsekern: error: {type(e).__name__}: {_one_line(e)}{hint}"
    if debug:
        traceback.print_exception(error)
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
