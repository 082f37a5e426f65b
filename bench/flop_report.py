"""The FLOP report: bits per byte against parameter count for byte-level LMs pruned with FLOP (Wang, Wohlwend &
Lei 2019), against dense models of the same size trained from scratch, plus measured CPU throughput.

    python bench/flop_report.py --seeds 0 1 2   # ~15-20 min per seed on 2 cores
    python bench/flop_report.py --quick         # ~1 min smoke run (tiny models, few steps)

For each architecture (``transformer_lm``, ``sru_lm``) and the same step budget everywhere:

1. **dense**: the full model trained from scratch;
2. **FLOP** at each target sparsity: the same architecture factorized (``init="random"``, rank
   ``in * out / (in + out)``, i.e. the dense parameter count), trained from scratch with the Lagrangian
   constraint (:func:`sparsekern.methods.flop.train_flop`), planned (:func:`~sparsekern.methods.flop.prune`) and
   compiled into low-rank layers (``sk.compile``; the compiled output is checked against ``sk.masked``);
3. **scratch**: for each FLOP model, a dense model whose width is chosen so that its parameter count is
   closest to the compiled FLOP model's, trained from scratch (the paper's comparison).

``--from-dense`` instead starts every FLOP run from the trained dense model of step 1 (SVD factors, gates at
``p = 0.05``) and trains it ``--steps`` more; the same-size dense models then get ``2 * --steps`` steps, the
same total budget.

Bits per byte are measured on the corpus' test split (non-overlapping windows of ``--context`` bytes). Speed:
the dense full model against each compiled FLOP model with :func:`sparsekern.bench.compare` (same inference
path on both sides, eval mode, interleaved timing), reported as tokens/s, theoretical (FLOP-count) speedup,
measured speedup and efficiency = measured / theoretical.

Every run above is repeated for each of ``--seeds`` (model initialisation, data order, gate noise). Writes
``--out`` (JSON: ``runs``, one per seed) and ``--plot`` (PNG, bits per byte vs parameters, one panel per
architecture, the mean over the seeds with their standard deviation as error bars), and prints the README's
table (``bench/tables.py``: mean +- standard deviation over the seeds).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsekern as sk
from sparsekern.bench.timing import environment
from sparsekern.methods import flop
from sparsekern.models import build
from sparsekern.text_data import LMSequences, bits_per_byte, load
from sparsekern.train import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import flop_markdown  # noqa: E402  (bench/tables.py: the README's tables)

ARCHS = ("transformer_lm", "sru_lm")
FULL = {"d_model": 128, "layers": 2, "context": 64, "batch": 32, "steps": 600, "eval_bytes": None,
        "time_batch": 8, "warmup": 5, "repeats": 30}
QUICK = {"d_model": 32, "layers": 1, "context": 32, "batch": 16, "steps": 150, "eval_bytes": 20_000,
         "time_batch": 4, "warmup": 2, "repeats": 5}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def arch_kwargs(arch: str, d_model: int, args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"d_model": d_model, "layers": args.layers}
    if arch == "transformer_lm":
        kw.update(heads=args.heads, context=args.context)
    return kw


def width_for_params(arch: str, target: int, args: argparse.Namespace) -> int:
    """The ``d_model`` (a multiple of the head count for the Transformer) whose dense model has the parameter
    count closest to ``target``."""
    step = args.heads if arch == "transformer_lm" else 1
    best = None
    for d in range(step, args.d_model + 1, step):
        n = n_params(build(arch, **arch_kwargs(arch, d, args)))
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (d, n)
    return best[0]


def train_config(args: argparse.Namespace, budget: int = 1) -> TrainConfig:
    # One config for every run: Adam at a constant lr after a short warm-up. (The trainer's schedule scales
    # every param group, FLOP's log_alpha and multipliers included, so a decaying schedule would also stop
    # the constraint from being enforced late in training.)
    return TrainConfig(max_steps=budget * args.steps, epochs=1e9, batch_size=args.batch, optimizer="adam", lr=args.lr,
                       weight_decay=0.0, schedule="constant", warmup_steps=max(1, args.steps // 20),
                       grad_clip=1.0, seed=args.seed, progress=False, device="cpu")


def train_dense(arch: str, d_model: int, data: LMSequences, args: argparse.Namespace,
                budget: int = 1) -> tuple[nn.Module, float]:
    torch.manual_seed(args.seed)
    model = build(arch, **arch_kwargs(arch, d_model, args))
    t0 = time.perf_counter()
    train(model, data, train_config(args, budget))
    return model.eval(), time.perf_counter() - t0


def run_arch(arch: str, corpus: Any, args: argparse.Namespace) -> dict[str, Any]:
    data = LMSequences(corpus.train, args.context)
    test = corpus.test

    def bpb(model: nn.Module) -> float:
        return bits_per_byte(model, test, args.context, batch_size=64, max_bytes=args.eval_bytes)

    gen = torch.Generator().manual_seed(args.seed + 1)
    x_time = torch.randint(0, 256, (args.time_batch, args.context), generator=gen)
    out: dict[str, Any] = {"kwargs": arch_kwargs(arch, args.d_model, args)}

    dense, secs = train_dense(arch, args.d_model, data, args)
    out["dense"] = {"d_model": args.d_model, "params": n_params(dense), "test_bpb": bpb(dense), "train_s": secs}
    print(f"[{arch}] dense d={args.d_model}: {out['dense']['params']} params, "
          f"{out['dense']['test_bpb']:.3f} bpb ({secs:.0f} s)", flush=True)

    out["flop"], out["scratch"] = [], []
    for target in args.targets:
        run = flop.run_lm(arch, corpus, train_config(args), target=target,
                          model_kwargs=arch_kwargs(arch, args.d_model, args), seq_len=args.context,
                          eval_bytes=args.eval_bytes, seed=args.seed,
                          start_from=dense if args.from_dense else None)
        fast = run.compiled
        report = sk.bench.compare(dense, fast, x_time, per_layer=False, threads=args.threads,
                                  warmup=args.warmup, repeats=args.repeats, label=f"{arch} flop t={target}")
        tokens = x_time.numel()
        entry = {
            **{k: run.report[k] for k in ("target", "expected_sparsity", "sparsity", "test_bpb", "train_s",
                                          "compiled_vs_masked_max_rel_err", "ranks")},
            "params": run.report["params_compiled"],
            "dense_tokens_per_s": tokens / (report.dense.median_ms / 1e3),
            "compiled_tokens_per_s": tokens / (report.fast.median_ms / 1e3),
            "dense_flops": report.dense_flops, "compiled_flops": report.fast_flops,
            "theoretical_speedup": report.theoretical_speedup, "measured_speedup": report.measured_speedup,
            "efficiency": report.efficiency, "timing_spread": [report.dense.spread, report.fast.spread],
        }
        secs = entry["train_s"]
        s_hat = entry["expected_sparsity"]
        out["flop"].append(entry)
        print(f"[{arch}] FLOP t={target}: s_hat {s_hat:.3f}, sparsity {entry['sparsity']:.3f}, {entry['params']} "
              f"params, {entry['test_bpb']:.3f} bpb, speedup {entry['measured_speedup']:.2f}x measured / "
              f"{entry['theoretical_speedup']:.2f}x theoretical ({secs:.0f} s)", flush=True)

        d_small = width_for_params(arch, entry["params"], args)
        small, secs = train_dense(arch, d_small, data, args, 2 if args.from_dense else 1)
        out["scratch"].append({"target": target, "d_model": d_small, "params": n_params(small),
                               "test_bpb": bpb(small), "train_s": secs})
        print(f"[{arch}] dense d={d_small} from scratch: {n_params(small)} params, "
              f"{out['scratch'][-1]['test_bpb']:.3f} bpb ({secs:.0f} s)", flush=True)
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(runs: list[dict[str, Any]], path: str | Path, corpus_name: str) -> Path:
    """Bits per byte against parameters per architecture: FLOP, same-size dense and the unpruned dense model,
    the mean over ``runs`` (one per seed) with the standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    archs = list(runs[0]["results"])
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        per_seed = [r["results"][arch] for r in runs]

        def series(kind: str) -> tuple[list[float], list[float], list[float]]:
            points = [[_mean_sd([s[kind][i][k] for s in per_seed]) for k in ("params", "test_bpb")]
                      for i in range(len(per_seed[0][kind]))]
            return [p[0][0] for p in points], [p[1][0] for p in points], [p[1][1] for p in points]

        x, y, err = series("flop")
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label="FLOP (pruned, compiled)")
        for f, xi, yi in zip(per_seed[0]["flop"], x, y):
            ax.annotate(f"t={f['target']:.2f}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
        x, y, err = series("scratch")
        ax.errorbar(x, y, yerr=err, fmt="s--", capsize=3, label="dense, same size, from scratch")
        dense, spread = _mean_sd([s["dense"]["test_bpb"] for s in per_seed])
        ax.errorbar([per_seed[0]["dense"]["params"]], [dense], yerr=[spread], fmt="k*", markersize=12,
                    label="dense (unpruned)")
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"test bits per byte ({corpus_name}; {len(runs)} seeds)")
        ax.set_title(arch)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models and few steps (~1 min)")
    p.add_argument("--data", default="pystdlib", help="'pystdlib' (bundled with Python) or 'enwik8:PATH'")
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument("--targets", nargs="+", type=float, default=[0.5, 0.7, 0.85], help="FLOP target sparsities")
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--steps", type=int, help="optimizer steps of every run")
    p.add_argument("--from-dense", action="store_true",
                   help="FLOP fine-tunes the trained dense model (same-size baselines get twice the steps)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-bytes", type=int, help="bytes of the test split to evaluate (default: all)")
    p.add_argument("--time-batch", type=int, help="sequences per timed forward")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one run of everything per seed (default 0)")
    p.add_argument("--out", default="bench/results/flop_lm.json")
    p.add_argument("--plot", default="bench/results/flop_lm.png")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    corpus = load(args.data)
    runs = []
    for seed in args.seeds:
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        runs.append({"seed": seed, "results": {arch: run_arch(arch, corpus, seeded) for arch in args.archs}})
    env = environment("cpu")
    env.update(dtype="float32", batch=args.time_batch)
    doc = {
        "command": "python " + " ".join(sys.argv),
        "environment": env,
        "corpus": corpus.summary(),
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "plot")},
        "runs": runs,
        "wall_s": time.perf_counter() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1))
    print(flop_markdown(doc))
    print(f"wrote {args.out} and {plot(runs, args.plot, corpus.name)} in {doc['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
