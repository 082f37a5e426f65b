"""The static-methods report: every static method at one FLOPs budget, through the same protocol runner.

    python bench/rethinking_report.py --model resnet56 --budget 0.5 --epochs 20 --image-size 16 \
        --out bench/results/rethinking_digits.json [--methods scratch tas anp]

Runs :func:`sparsekern.methods.rethinking.run` for each method on the embedded digits data (by default every
method the registry lists as static, :func:`sparsekern.methods.rethinking.protocol_methods`): the four
criteria through fine-tune / Scratch-E / Scratch-B, Pruning from Scratch through Scratch-B, TAS through KD,
ANP-VS with its robustness comparison. Reports of methods not rerun are kept from an existing ``--out``, so
one method can be rerun alone. Each report records the command that produced it (``command``) and the command
whose run timed its speedup (``timed_by``). ``--remeasure`` re-times the stored plans of ``--methods`` (all
of them by default) in one run and sets their ``timed_by``; run it on a quiet machine so that every row's
speedup comes from the same run:

    python bench/rethinking_report.py --image-size 16 --remeasure

Prints the README's markdown tables (``bench/tables.py``, which also checks them against the README) and
writes one JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sparsekern.data import load
from sparsekern.methods import rethinking
from sparsekern.methods.registry import get_method


sys.path.insert(0, str(Path(__file__).resolve().parent))
from tables import rethinking_table, robustness_table, row_commands  # noqa: E402  (bench/tables.py: the README's tables)


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
    p.add_argument("--methods", nargs="+", default=rethinking.protocol_methods(),
                   help="default: every registered static method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--search-epochs", type=float, default=None,
                   help=f"the search of {'/'.join(m for m in rethinking.protocol_methods() if get_method(m).searches)} "
                        "(default: epochs / 2)")
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
        command = "python " + " ".join(sys.argv)
        commands = doc.setdefault("commands", {})
        for r in doc["reports"]:  # record who trained each row before re-timing some of them
            r.setdefault("command", commands.get(r["method"], doc.get("command", "")))
            r.setdefault("timed_by", row_commands(doc, r)[1])
        doc["reports"] = [{**remeasure(r, doc["image_size"], data.in_channels, data.num_classes), "timed_by": command}
                          if r["method"] in args.methods else r for r in doc["reports"]]
        commands["remeasure"] = command
        out.write_text(json.dumps(doc, indent=1))
        print(rethinking_table(doc))
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
        command = "python " + " ".join(sys.argv)
        reports[method] = {**r.to_dict(), "command": command, "timed_by": command}
        commands[method] = command
        doc = {"image_size": args.image_size, "commands": commands,
               "reports": [reports[m] for m in rethinking.protocol_methods() if m in reports]}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    doc = {"image_size": args.image_size, "commands": commands,
           "reports": [reports[m] for m in rethinking.protocol_methods() if m in reports]}
    print(rethinking_table(doc))
    print(robustness_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
