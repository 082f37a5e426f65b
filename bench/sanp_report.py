"""The SANP report: dynamic channel gating trained at a cost budget, its accuracy, cost and CPU speed.

    python bench/sanp_report.py --models resnet20 vgg-tiny --budget 0.5 --epochs 20 --image-size 16 \
        --seeds 0 1 2 --out bench/results/sanp_digits.json

For each model, on the embedded digits data: trains the dense model and its SANP form
(:mod:`sparsekern.methods.sanp`, same seed and schedule, cost objective at ``--budget``), evaluates both,
measures the average theoretical cost of the SANP model over the test set (per-sample FLOPs of the gated
execution / dense FLOPs; mean, min, max, std), and compiles it twice: per sample (``sk.compile`` of the plan:
channel-skipping gated layers) and hybrid (the plan calibrated on the training images,
:func:`sparsekern.dynamic.calibrate`, compiled to a static model guarded by the per-sample one,
:mod:`sparsekern.hybrid`; ``--no-calibration`` skips it). Both are checked against the dense masked reference
and timed against the dense model with ``sk.bench.compare`` for each of ``--batches`` test images (interleaved,
median of ``--repeats``), every model through ``sk.optimize``'s CPU passes (the hybrid one and its dense
baseline also through ``script``, which the per-sample model's Python control flow does not allow). The JSON
has per gated layer the learned masks and the calibration classes, the fraction of test batches the guard
sent to the per-sample model, and the static part's FLOPs against the per-sample cost. Each of ``--seeds``
trains and times everything again; results are keyed by model and seed, and those not rerun are kept from an
existing ``--out``. Prints the README's table (``bench/tables.py``: mean +- standard deviation over the seeds)
and writes one JSON. Timing belongs on a quiet machine; a quick check that everything runs is
``--epochs 1 --repeats 3``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import sparsekern as sk
from sparsekern.bench.timing import SERVING_BLOCK, environment
from sparsekern.data import load
from sparsekern.dynamic import calibrate
from sparsekern.methods import sanp
from sparsekern.models import build
from sparsekern.ops.channel_skip_conv2d import select_backend
from sparsekern.passes import DEVICE_PASSES
from sparsekern.train import TrainConfig, evaluate, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import sanp_markdown  # noqa: E402  (bench/tables.py: the README's tables)

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
    first = x_test[: args.batches[0]]
    plan = sanp.to_plan(model, first)
    fast = sk.compile(model, plan, first).eval()
    with torch.no_grad():
        want = sk.masked(model, plan, first).eval()(first)
        err = float((fast(first) - want).abs().max() / want.abs().max().clamp_min(1e-12))
    weight = fast.get_submodule(next(iter(plan.dynamic))).weight  # the first gated layer (inside a block: not 3 inputs)
    backend = select_backend(torch.randn(2, weight.shape[1], *x_test.shape[2:]), weight, padding=1)
    calibrated = None if args.no_calibration else calibrate(plan, model, data.train)
    timings = []
    for batch in args.batches:
        x = x_test[:batch]
        timings.append(timing(dense, sk.compile(model, plan, x).eval(), x, "per-sample", PER_SAMPLE_PASSES, args))
        if calibrated is not None:
            timings.append(timing(dense, sk.compile(model, calibrated, x).eval(), x, "hybrid", HYBRID_PASSES, args))
    return {
        "model": key,
        "seed": args.seed,
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
        "plan": plan.to_dict(),
        "calibrated": None if calibrated is None else hybrid_report(model, calibrated, x_test, args.batches[0]),
        "timings": timings,
    }


#: inference paths: the per-sample model keeps Python control flow per layer (no ``script``); the hybrid model's
#: fast part is static and runs traced and frozen (its guard and fallback stay in Python)
PER_SAMPLE_PASSES = DEVICE_PASSES["cpu"]
HYBRID_PASSES = DEVICE_PASSES["cpu"] + ("script",)


def timing(dense: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, path: str, passes: tuple[str, ...],
           args: argparse.Namespace) -> dict:
    """Dense against ``fast`` on ``x``, both through ``passes`` (``sk.bench.compare``: medians, timed in
    alternating blocks of :data:`~sparsekern.bench.timing.SERVING_BLOCK` forwards)."""
    bench = sk.bench.compare(dense.eval(), fast, x, passes=passes, threads=args.threads, warmup=args.warmup,
                             repeats=args.repeats, per_layer=False, label=f"sanp {path} batch {len(x)}",
                             block=SERVING_BLOCK)
    print(f"  {path:>10} batch {len(x):>3}: theory {bench.theoretical_speedup:.2f}x measured "
          f"{bench.measured_speedup:.2f}x efficiency {bench.efficiency:.2f}", flush=True)
    return {"path": path, "batch": len(x), "passes": list(passes), "theoretical_speedup": bench.theoretical_speedup,
            "measured_speedup": bench.measured_speedup, "efficiency": bench.efficiency,
            "dense_ms": bench.dense.median_ms, "compiled_ms": bench.fast.median_ms,
            "spread": max(bench.dense.spread, bench.fast.spread), "block": bench.block}


def hybrid_report(model: torch.nn.Module, plan: sk.Plan, x_test: torch.Tensor, batch: int) -> dict:
    """The hybrid compile (the plan calibrated on the training images): its error against the masked reference
    over the test set, the fraction of test batches the guard sent to the per-sample model, the work of the
    static part against the per-sample cost (its switching channels are computed for the whole batch), and per
    gated layer the classes and whether its output is compact."""
    fast = sk.compile(model, plan, x_test[:batch]).eval()
    ref = sk.masked(model, plan, x_test[:batch]).eval()
    err, batches = 0.0, x_test.split(batch)
    with torch.no_grad():
        for xb in batches:
            want = ref(xb)
            err = max(err, float((fast(xb) - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    static_flops = sk.flops(fast.fast, x_test[:batch]).total
    needed = sk.flops(fast, x_test[:batch]).total  # counted on the per-sample path
    parts = dict(fast.fast.named_modules())
    layers = {}
    for name, spec in plan.dynamic_layers().items():
        layers[name] = {"never_on": None if spec.never_on is None else len(spec.never_on),
                        "always_on": None if spec.always_on is None else len(spec.always_on),
                        "computed_channels": getattr(parts[name], "out_channels", 0)}
    return {"samples": plan.meta["calibration"]["samples"], "compiled_vs_masked_max_error": err,
            "fallback_fraction": fast.fallbacks / len(batches), "static_over_per_sample_flops": static_flops / needed,
            "layers": layers, "plan": plan.to_dict()}


def _order(args: argparse.Namespace):
    """Sort key of (model, seed): models in :data:`MODELS` order, then seeds."""
    order = {m: i for i, m in enumerate(MODELS)}
    return lambda key: (order[key[0]], key[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg-tiny"], choices=sorted(MODELS))
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default 0)")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 1], help="test images per timed forward")
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
    # (model, seed) pairs not rerun are kept (rows of an older layout, without per-batch timings, are not)
    rows = {(r["model"], r.get("seed", 0)): r for r in previous.get("results", []) if "timings" in r}
    report = {"env": environment("cpu"), "results": list(rows.values())}
    for seed in args.seeds:
        for key in args.models:
            row = run_model(key, argparse.Namespace(**{**vars(args), "seed": seed}))
            row["command"] = "python " + " ".join(sys.argv)
            rows[key, seed] = row
            report = {"env": environment("cpu"), "results": [rows[k] for k in sorted(rows, key=_order(args))]}
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")
    print(sanp_markdown(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
