"""The static-methods report: every static method at one FLOPs budget, through the same protocol runner.

    python bench/rethinking_report.py --model resnet56 --budget 0.5 --epochs 20 --image-size 16 \
        --out bench/results/rethinking_digits.json [--methods scratch tas anp]

Runs :func:`sparsekern.methods.rethinking.run` for each method on the embedded digits data: the four
criteria through fine-tune / Scratch-E / Scratch-B, Pruning from Scratch through Scratch-B, TAS through KD,
ANP-VS with its robustness comparison. Reports of methods not rerun are kept from an existing ``--out``, so
one method can be rerun alone. Prints markdown tables (cited by the README) and writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsekern.data import load
from sparsekern.methods import rethinking


ARMS = ("fine-tune", "Scratch-E", "Scratch-B", "KD")


def table(reports: list[dict]) -> str:
    """One row per method: accuracies of each arm it ran ("-" for arms it did not), FLOPs, params, speed."""
    rows = [
        "| method | full model | " + " | ".join(ARMS) + " | FLOPs | params | measured speedup | efficiency |",
        "|---|---|" + "---|" * len(ARMS) + "---|---|---|---|",
    ]
    for r in reports:
        acc = {a["name"]: f"{a['accuracy']:.1%}" for a in r["arms"]}
        tuned = r.get("robustness", {}).get("ANP-VS + adversarial fine-tune")
        if tuned:  # ANP-VS: the pruned model after adversarial fine-tuning (clean accuracy)
            acc.setdefault("fine-tune", f"{tuned['clean_accuracy']:.1%} (adversarial)")
        rows.append(
            f"| {r['method']} | {r['full_accuracy']:.1%} | " + " | ".join(acc.get(a, "-") for a in ARMS)
            + f" | {r['flops_pruned'] / r['flops_full']:.0%} | {r['params_pruned'] / r['params_full']:.0%} | "
            f"{r['measured_speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(rows)


def robustness_table(reports: list[dict]) -> str:
    """Clean and PGD accuracy of each model a report evaluated under attack (ANP-VS and its baselines)."""
    rows = ["| model | clean | PGD |", "|---|---|---|"]
    for r in reports:
        for name, acc in r.get("robustness", {}).items():
            rows.append(f"| {name} | {acc['clean_accuracy']:.1%} | {acc['pgd_accuracy']:.1%} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def remeasure(report: dict, image_size: int, in_channels: int, num_classes: int, batch: int = 64) -> dict:
    """Re-time a report's pruned model against the full model (same plan, fresh weights: timing does not
    depend on the weight values) on this machine, with the settings of :func:`rethinking.run`."""
    import sparsekern as sk
    from sparsekern.models import build

    full = build(report["model"], num_classes=num_classes, in_channels=in_channels).eval()
    x = torch.randn(batch, in_channels, image_size, image_size)
    pruned = sk.compile(full, sk.Plan.from_dict(report["plan"]), x).eval()
    bench = sk.bench.compare(full, pruned, x, passes=("fold_bn", "onednn"), threads=2, repeats=30, per_layer=False)
    return {**report, "measured_speedup": bench.measured_speedup, "theoretical_speedup": bench.theoretical_speedup,
            "efficiency": bench.measured_speedup / bench.theoretical_speedup}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(rethinking.METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-epochs", type=float, default=None, help="scratch/tas/anp search (default: epochs / 2)")
    p.add_argument("--arms", choices=("protocol", "own"), default="protocol",
                   help="protocol: fine-tune, Scratch-E, Scratch-B (+ KD for tas); own: each method's own arm "
                        "(Scratch-B for scratch, KD for tas, none for anp)")
    p.add_argument("--out", default="bench/results/rethinking_digits.json")
    p.add_argument("--remeasure", action="store_true",
                   help="only re-time the stored plans of --methods in --out (run this on a quiet machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    data = load("digits", image_size=args.image_size)
    out = Path(args.out)
    if args.remeasure:
        doc = json.loads(out.read_text())
        doc["reports"] = [remeasure(r, doc["image_size"], data.in_channels, data.num_classes)
                          if r["method"] in args.methods else r for r in doc["reports"]]
        doc.setdefault("commands", {})["remeasure"] = "python " + " ".join(sys.argv)
        out.write_text(json.dumps(doc, indent=1))
        print(table(doc["reports"]))
        return 0
    previous = json.loads(out.read_text()) if out.is_file() else {}
    reports = {r["method"]: r for r in previous.get("reports", [])}
    commands = dict(previous.get("commands", {}))
    if "command" in previous:  # the single-command layout of earlier reports
        commands.update({m: previous["command"] for m in reports})
    for method in args.methods:
        r = rethinking.run(method, data, model_name=args.model, budget=args.budget, epochs=args.epochs,
                           search_epochs=args.search_epochs, seed=args.seed, progress=False,
                           arms=rethinking.default_arms(method, "rethinking" if args.arms == "protocol" else None))
        reports[method] = r.to_dict()
        commands[method] = "python " + " ".join(sys.argv)
        doc = {"image_size": args.image_size, "commands": commands,
               "reports": [reports[m] for m in rethinking.METHODS if m in reports]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    ordered = [reports[m] for m in rethinking.METHODS if m in reports]
    print(table(ordered))
    print(robustness_table(ordered))
    return 0


if __name__ == "__main__":
    sys.exit(main())
