"""The Rethinking report: every static method through fine-tune / Scratch-E / Scratch-B at one FLOPs budget.

    python bench/rethinking_report.py --model resnet56 --budget 0.5 --epochs 10 --image-size 16 \
        --out bench/results/rethinking_digits.json

Runs :func:`sparsekern.methods.rethinking.run` for each method on the embedded digits data and writes one JSON
with every report plus a markdown table (printed, and cited by the README).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsekern.data import load
from sparsekern.methods import rethinking


def table(reports: list[dict]) -> str:
    rows = [
        "| method | full model | fine-tune | Scratch-E | Scratch-B | FLOPs | params | measured speedup | efficiency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        acc = {a["name"]: a["accuracy"] for a in r["arms"]}
        rows.append(
            f"| {r['method']} | {r['full_accuracy']:.1%} | {acc['fine-tune']:.1%} | {acc['Scratch-E']:.1%} | "
            f"{acc['Scratch-B']:.1%} | {r['flops_pruned'] / r['flops_full']:.0%} | "
            f"{r['params_pruned'] / r['params_full']:.0%} | {r['measured_speedup']:.2f}x | {r['efficiency']:.2f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=list(rethinking.METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/rethinking_digits.json")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    data = load("digits", image_size=args.image_size)
    reports = []
    for method in args.methods:
        r = rethinking.run(method, data, model_name=args.model, budget=args.budget, epochs=args.epochs,
                           seed=args.seed, progress=False)
        reports.append(r.to_dict())
        doc = {"command": "python " + " ".join(sys.argv), "image_size": args.image_size, "reports": reports}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1))
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
