"""The SANP report: dynamic channel gating trained at a cost budget, its accuracy, cost and CPU speed.

    python bench/sanp_report.py --models resnet20 vgg-tiny --budget 0.5 --epochs 20 --image-size 16 \
        --out bench/results/sanp_digits.json

For each model, on the embedded digits data: trains the dense model and its SANP form
(:mod:`sparsekern.methods.sanp`, same seed and schedule, cost objective at ``--budget``), evaluates both,
measures the average theoretical cost of the SANP model over the test set (per-sample FLOPs of the gated
execution / dense FLOPs; mean, min, max, std), compiles it (``sk.compile``: channel-skipping gated layers),
checks the compiled model against its dense masked reference, and times dense vs compiled with
``sk.bench.compare`` on a batch of test images (both through the ``fold_bn`` and ``onednn`` passes, so the
convolutions that stay dense run on the same prepacked oneDNN path on both sides; interleaved, median of
``--repeats``); then the same for the hybrid compile (the plan calibrated on the training images,
:func:`sparsekern.dynamic.calibrate`; ``--no-calibration`` skips it), with per layer the channel classes and
the fraction of test batches that ran the static path. Prints a markdown table and writes one JSON. Timing
belongs on a quiet machine; a quick check that everything runs is ``--epochs 1 --repeats 3``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import sparsekern as sk
from sparsekern.bench.timing import environment
from sparsekern.data import load
from sparsekern.dynamic import HybridGatedConv2d, calibrate
from sparsekern.methods import sanp
from sparsekern.models import build
from sparsekern.ops.channel_skip_conv2d import select_backend
from sparsekern.train import TrainConfig, evaluate, train

#: name -> (zoo name, build kwargs); "vgg-tiny" is the 4-conv CIFAR-layout VGG the tests use.
MODELS = {
    "resnet20": ("resnet20", {}),
    "resnet56": ("resnet56", {}),
    "vgg-tiny": ("vgg16_bn", {"cfg": [16, "M", 32, "M", 64, 64]}),
    "vgg16_bn": ("vgg16_bn", {}),
}


def masks_per_layer(model: torch.nn.Module, x: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per gated layer: mean kept fraction, and how many channels are on for some samples and off for others."""
    seen: dict[str, torch.Tensor] = {}
    handles = [u.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o[1]))
               for n, u in sanp.gated_layers(model).items() if u.gated]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, m in seen.items():
        frac = m.float().mean(0)
        out[name] = {"keep": float(frac.mean()), "mixed_channels": int(((frac > 0) & (frac < 1)).sum()),
                     "channels": int(m.shape[1])}
    return out


def run_model(key: str, args: argparse.Namespace) -> dict:
    name, kwargs = MODELS[key]
    data = load("digits", image_size=args.image_size)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=64, schedule="cosine", progress=False, seed=args.seed)

    torch.manual_seed(args.seed)
    dense = build(name, num_classes=data.num_classes, **kwargs)
    train(dense, data.train, cfg)
    dense_acc = evaluate(dense, data.test)["accuracy"]

    torch.manual_seed(args.seed)
    model = sanp.to_sanp(build(name, num_classes=data.num_classes, **kwargs), granularity=args.granularity)
    result = sanp.train_sanp(model, data.train, cfg, budget=args.budget)
    model.eval()
    sanp_acc = evaluate(model, data.test)["accuracy"]

    x_test = data.test.tensors[0]
    full = sanp.cost_reference(model, x_test[:2]).full
    ratio = sanp.cost_ratio(model, x_test, full=full)
    x = x_test[: args.batch]
    plan = sanp.to_plan(model, x)
    fast = sk.compile(model, plan, x).eval()
    ref = sk.masked(model, plan, x).eval()
    with torch.no_grad():
        want = ref(x)
        err = float((fast(x) - want).abs().max() / want.abs().max().clamp_min(1e-12))
    weight = fast.get_submodule(next(iter(plan.dynamic))).weight  # the first gated layer (inside a block: not 3 inputs)
    backend = select_backend(torch.randn(x.shape[0], weight.shape[1], *x.shape[2:]), weight, padding=1)
    bench = sk.bench.compare(dense.eval(), fast, x, passes=("fold_bn", "onednn"), threads=args.threads, warmup=args.warmup,
                             repeats=args.repeats, per_layer=False, label=f"sanp {key} budget {args.budget}")
    masked_bench = sk.bench.compare(dense.eval(), ref, x, passes=("fold_bn", "onednn"), threads=args.threads,
                                    warmup=args.warmup, repeats=args.repeats, per_layer=False)
    calibrated = None if args.no_calibration else run_calibrated(model, plan, data, dense, x, args)
    return {
        "model": key,
        "zoo": {"name": name, "kwargs": kwargs},
        "granularity": args.granularity,
        "budget": args.budget,
        "epochs": args.epochs,
        "dense_accuracy": dense_acc,
        "sanp_accuracy": sanp_acc,
        "cost_ratio": {"mean": float(ratio.mean()), "min": float(ratio.min()), "max": float(ratio.max()),
                       "std": float(ratio.std())},
        "train_cost_per_epoch": [h.get("train_cost") for h in result.history],
        "layers": masks_per_layer(model, x_test),
        "compiled_vs_masked_max_error": err,
        "backend": backend,
        "bench_batch": int(x.shape[0]),
        "bench_cost_ratio": float(sanp.cost_ratio(model, x, full=full).mean()),
        "theoretical_speedup": bench.theoretical_speedup,
        "measured_speedup": bench.measured_speedup,
        "efficiency": bench.efficiency,
        "dense_ms": bench.dense.median_ms,
        "compiled_ms": bench.fast.median_ms,
        "masked_ms": masked_bench.fast.median_ms,
        "plan": plan.to_dict(),
        "calibrated": calibrated,
    }


def run_calibrated(model: torch.nn.Module, plan: sk.Plan, data, dense: torch.nn.Module, x: torch.Tensor,
                   args: argparse.Namespace) -> dict:
    """The hybrid compile (``sparsekern.dynamic.calibrate`` on the training images): its error against the
    masked reference over the test set, speed against the dense model, and per layer the classes and the
    fraction of test batches (of ``--batch`` images) that ran the static path rather than the guard's fallback."""
    x_test = data.test.tensors[0]
    cal = calibrate(plan, model, data.train)
    fast = sk.compile(model, cal, x).eval()
    ref = sk.masked(model, cal, x).eval()
    err = 0.0
    with torch.no_grad():
        for xb in x_test.split(args.batch):
            want = ref(xb)
            err = max(err, float((fast(xb) - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    bench = sk.bench.compare(dense.eval(), fast, x, passes=("fold_bn", "onednn"), threads=args.threads,
                             warmup=args.warmup, repeats=args.repeats, per_layer=False,
                             label=f"sanp {args.budget} calibrated")
    return {"samples": cal.meta["calibration"]["samples"], "compiled_vs_masked_max_error": err,
            "measured_speedup": bench.measured_speedup, "efficiency": bench.efficiency,
            "theoretical_speedup": bench.theoretical_speedup, "compiled_ms": bench.fast.median_ms,
            "dense_ms": bench.dense.median_ms, "layers": static_paths(fast, cal, x_test, args.batch)}


def static_paths(fast: torch.nn.Module, plan: sk.Plan, x_test: torch.Tensor, batch: int) -> dict[str, dict]:
    """Per gated layer: calibration classes, the compiled layer type, and the fraction of test batches that took
    the static path (hybrid layers; the others always run per sample)."""
    fell: dict[str, int] = {}
    layers = {n: m for n, m in fast.named_modules() if isinstance(m, HybridGatedConv2d)}
    for name, m in layers.items():
        def counting(x, in_mask, out_mask, real=m.per_sample, name=name):
            fell[name] = fell.get(name, 0) + 1
            return real(x, in_mask, out_mask)
        m.per_sample = counting
    batches = x_test.split(batch)
    try:
        with torch.no_grad():
            for xb in batches:
                fast(xb)
    finally:
        for m in layers.values():
            del m.per_sample
    out = {}
    for name, spec in plan.dynamic_layers().items():
        m = fast.get_submodule(name)
        out[name] = {"type": type(m).__name__, "never_on": None if spec.never_on is None else len(spec.never_on),
                     "always_on": None if spec.always_on is None else len(spec.always_on),
                     "static_fraction": (1 - fell.get(name, 0) / len(batches)) if name in layers else 0.0}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| model | G | dense acc | SANP acc | cost (mean, min-max) | theory x | measured x | efficiency | "
             "dense ms | compiled ms | dense-then-mask ms | calibrated: measured x | efficiency | ms |",
             "|---" * 14 + "|"]
    for r in rows:
        c, cal = r["cost_ratio"], r.get("calibrated") or {}
        hybrid = (f"{cal['measured_speedup']:.2f}x | {cal['efficiency']:.2f} | {cal['compiled_ms']:.2f}" if cal
                  else "- | - | -")
        lines.append(
            f"| {r['model']} | {r['granularity']} | {r['dense_accuracy']:.1%} | {r['sanp_accuracy']:.1%} | "
            f"{c['mean']:.1%} ({c['min']:.0%}-{c['max']:.0%}) | {r['theoretical_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x | {r['efficiency']:.2f} | {r['dense_ms']:.2f} | {r['compiled_ms']:.2f} | "
            f"{r['masked_ms']:.2f} | {hybrid} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg-tiny"], choices=sorted(MODELS))
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64, help="test images per timed forward")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave as is)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--no-calibration", action="store_true",
                   help="skip the hybrid compile (sparsekern.dynamic.calibrate on the training images)")
    p.add_argument("--out", default="bench/results/sanp_digits.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = {r["model"]: r for r in previous.get("results", [])}  # models not rerun are kept
    for key in args.models:
        row = run_model(key, args)
        row["command"] = "python " + " ".join(sys.argv)
        rows[key] = row
        print(table([row]), flush=True)
        report = {"env": environment("cpu"), "results": list(rows.values())}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    rows = list(rows.values())
    print(table(rows))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
