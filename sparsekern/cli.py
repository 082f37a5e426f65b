"""The ``sparsekern`` command line: ``demo``, ``prune`` and ``bench``."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    from sparsekern.demo import run_demo

    run_demo(args.out, epochs=args.epochs, finetune_epochs=args.finetune_epochs, ratio=args.ratio,
             threads=args.threads, repeats=args.repeats, progress=not args.no_progress)
    return 0


def _bench_models(args: argparse.Namespace) -> int:
    from sparsekern.bench.models import STANDARD_CASES, Case, run_suite, summary_table

    if args.model:
        paths = [tuple(p for p in spec.split(",") if p) for spec in args.passes]
        cases = [Case(args.model, r, b, args.size, scope=args.scope, round_to=args.round_to or None, passes=p)
                 for p in paths for b in args.batch for r in args.ratio]
    else:
        cases = list(STANDARD_CASES)
    doc = run_suite(cases, threads=args.threads, warmup=args.warmup, repeats=args.repeats,
                    per_layer=args.per_layer, out=args.out, progress=not args.no_progress)
    print(summary_table(doc))
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        from sparsekern.bench.plot import plot_speedup

        print(f"wrote {plot_speedup(doc['results'], args.plot)}")
    return 0


KERNEL_OPS = ("channel_skip_conv2d", "lowrank_linear")


def _bench_kernels(args: argparse.Namespace) -> int:
    import importlib

    import torch

    from sparsekern.bench.results import command_line, write_part

    bench = importlib.import_module(f"sparsekern.bench.kernel_{args.op}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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


def _prune_flop(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import sparsekern as sk
    from sparsekern.methods import flop
    from sparsekern.text_data import load
    from sparsekern.train import TrainConfig

    model = args.model or "transformer_lm"
    if model not in ("transformer_lm", "sru_lm"):
        raise SystemExit(f"--method flop prunes the byte-level LMs transformer_lm or sru_lm, not {model!r}")
    config = TrainConfig(max_steps=args.steps, epochs=1e9, optimizer="adam", lr=3e-3, weight_decay=0.0,
                         schedule="constant", warmup_steps=max(1, args.steps // 20), grad_clip=1.0, seed=args.seed,
                         progress=not args.no_progress)
    kwargs = {k: v for k, v in (("d_model", args.d_model), ("layers", args.layers)) if v is not None}
    run = flop.run_lm(model, load(args.data or "pystdlib"), config, target=args.target, seed=args.seed,
                      eval_bytes=args.eval_bytes, model_kwargs=kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sk.save(run.compiled, out / "model.sk")
    (out / "report.json").write_text(json.dumps(run.report, indent=1))
    print(f"{model}: sparsity {run.report['sparsity']:.3f} (target {args.target}), params "
          f"{run.report['params_dense']} -> {run.report['params_compiled']}, test bits per byte "
          f"{run.report['test_bpb']:.3f}")
    print(f"wrote {out / 'report.json'} and {out / 'model.sk'}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.method == "flop":
        return _prune_flop(args)

    from sparsekern.data import load
    from sparsekern.methods import rethinking

    out = Path(args.out)
    rethinking.run(args.method, load(args.data or "digits", image_size=args.image_size),
                   model_name=args.model or "resnet56",
                   budget=args.budget, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                   search_epochs=args.search_epochs, arms=rethinking.default_arms(args.method, args.protocol),
                   seed=args.seed, progress=not args.no_progress, out=out / "report.json",
                   model_out=out / "model.sk")
    print(f"wrote {out / 'report.json'} and {out / 'model.sk'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsekern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train, prune, compile and benchmark a ResNet-20 on embedded data")
    demo.add_argument("--out", default="sparsekern-demo", help="output folder (report.json, model.sk)")
    demo.add_argument("--epochs", type=float, default=6)
    demo.add_argument("--finetune-epochs", type=float, default=3)
    demo.add_argument("--ratio", type=float, default=0.5, help="fraction of channels pruned per group")
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--repeats", type=int, default=30, help="timed runs per model and layer")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)

    prune = sub.add_parser("prune", help="train, prune to a FLOPs budget, fine-tune, save and report")
    prune.add_argument("--method", required=True,
                       choices=("l1_norm", "slimming", "thinet", "lasso", "scratch", "tas", "anp", "flop"),
                       help="scratch trains the pruned net from scratch (Scratch-B), tas with distillation (KD), "
                            "anp reports clean and PGD accuracy against adversarial training; flop prunes a "
                            "byte-level LM to a parameter sparsity (--target, --steps)")
    prune.add_argument("--model", help="zoo model name (default: resnet56; transformer_lm for flop)")
    prune.add_argument("--budget", type=float, default=0.5, help="FLOPs to keep, as a fraction of the full model")
    prune.add_argument("--data", help="'digits' (embedded, default) or 'cifar10:PATH'; for flop 'pystdlib' "
                                      "(default) or 'enwik8:PATH'")
    prune.add_argument("--target", type=float, default=0.5, help="flop: target sparsity of the factorized layers")
    prune.add_argument("--steps", type=int, default=600, help="flop: optimizer steps")
    prune.add_argument("--eval-bytes", type=int, help="flop: bytes of the test split to evaluate (default: all)")
    prune.add_argument("--d-model", type=int, help="flop: LM width (default: the zoo's)")
    prune.add_argument("--layers", type=int, help="flop: LM depth (default: the zoo's)")
    prune.add_argument("--image-size", type=int, default=None, help="resize the data (digits default: 32)")
    prune.add_argument("--protocol", choices=("rethinking",),
                       help="train the fine-tune, Scratch-E and Scratch-B arms (and KD for tas)")
    prune.add_argument("--epochs", type=float, default=10, help="epochs of the full model (and Scratch-E)")
    prune.add_argument("--finetune-epochs", type=float, default=None, help="default: epochs / 4")
    prune.add_argument("--search-epochs", type=float, default=None,
                       help="scratch/tas/anp: gate training, architecture search, mask training (default: epochs / 2)")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", default="sparsekern-prune", help="output folder (report.json, model.sk)")
    prune.add_argument("--no-progress", action="store_true")
    prune.set_defaults(run=_prune)

    bench = sub.add_parser("bench", help="benchmarks: dense vs compiled, theoretical vs measured speedup")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    models = bench_sub.add_parser("models", help="uniform L1-norm pruning of zoo models (default: the standard set)")
    models.add_argument("--model", help="zoo model name; default: the standard ResNet-50/ResNet-56 set")
    models.add_argument("--ratio", type=float, nargs="+", default=[0.3, 0.5])
    models.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    models.add_argument("--size", type=int, default=224, help="input height and width")
    models.add_argument("--scope", choices=("all", "internal"), default="all")
    models.add_argument("--round-to", type=int, default=16, help="channel multiple (0: no rounding)")
    models.add_argument("--passes", nargs="+", default=["fold_bn,onednn"],
                        help="inference paths, each a comma-separated list of passes (e.g. fold_bn,freeze)")
    models.add_argument("--threads", type=int, default=2)
    models.add_argument("--warmup", type=int, default=10)
    models.add_argument("--repeats", type=int, default=50)
    models.add_argument("--per-layer", action="store_true", help="also time every conv/linear layer")
    models.add_argument("--out", help="write the JSON here (e.g. bench/results/cpu.json)")
    models.add_argument("--plot", help="write a PNG of measured vs theoretical speedup here")
    models.add_argument("--no-progress", action="store_true")
    models.set_defaults(run=_bench_models)
    kernels = bench_sub.add_parser("kernels", help="kernel microbenchmarks against the dense op and the naive baseline")
    kernels.add_argument("--op", required=True, choices=KERNEL_OPS)
    kernels.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    kernels.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                         help="default: float16 on cuda, float32 on cpu")
    kernels.add_argument("--threads", type=int, default=2)
    kernels.add_argument("--warmup", type=int, default=5)
    kernels.add_argument("--repeats", type=int, default=30)
    kernels.add_argument("--budget-s", type=float, default=3.0,
                         help="timing budget per row in seconds (fewer repeats for slow rows)")
    kernels.add_argument("--min-repeats", type=int, default=7, help="repeats per row whatever the budget")
    kernels.add_argument("--quick", action="store_true", help="a few shapes only")
    kernels.add_argument("--out", help="merge the results into this JSON (e.g. bench/results/cpu.json)")
    kernels.add_argument("--no-progress", action="store_true")
    kernels.set_defaults(run=_bench_kernels)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
