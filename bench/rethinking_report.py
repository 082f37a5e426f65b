"""The static-methods report: every static method at one FLOPs budget, through the same protocol runner, over
seeds.

    python bench/rethinking_report.py --model resnet56 --budget 0.5 --epochs 20 --image-size 16 \
        --seeds 0 1 2 --search-epochs anp=3 --out bench/results/rethinking_digits.json [--methods scratch tas anp]

Runs :func:`sparsekern.methods.rethinking.run` for each seed and method on the embedded digits data (by default
every method the registry lists as static, :func:`sparsekern.methods.rethinking.protocol_methods`), seeds in the
outer loop so that an interrupted run leaves whole seeds: the four criteria and Pruning from Scratch through
fine-tune / Scratch-E / Scratch-B, the methods of ``--own-arms`` (TAS: KD; ANP-VS: its robustness comparison)
through their own arms. Reports are keyed by (method, seed); those not rerun are kept from an existing
``--out``, so one method or one seed can be rerun alone. Each report records the command that produced it
(``command``) and the command whose run timed its speedup (``timed_by``). ``--remeasure`` re-times the stored
plans of ``--methods`` (all of them by default, every seed) in one run and sets their ``timed_by``; run it on a
quiet machine so that every row's speedup comes from the same run:

    python bench/rethinking_report.py --image-size 16 --remeasure

Seeds can run in parallel processes, each with its own ``--out``; ``--merge FILE ...`` then adds their reports
(keyed by method and seed, with the commands that produced them) to ``--out``.

Prints the README's markdown tables (``bench/tables.py``: mean and standard deviation over the seeds, which
also checks them against the README) and writes one JSON after every finished (method, seed).
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
    depend on the weight values) on this machine, with the settings of :func:`rethinking.run`. A plan made on
    another network than the full model (``meta["source_arch"]``) compiles against that one."""
    import sparsekern as sk
    from sparsekern.models import build

    from sparsekern.serialize import build_arch

    full = build(report["model"], num_classes=num_classes, in_channels=in_channels).eval()
    x = torch.randn(batch, in_channels, image_size, image_size)
    plan = sk.Plan.from_dict(report["plan"])
    source = plan.meta.get("source_arch")  # the network the plan was made on (Pruning from Scratch's wider one)
    pruned = sk.compile(build_arch(source).eval() if source else full, plan, x).eval()
    bench = sk.bench.compare(full, pruned, x, passes=("fold_bn", "onednn"), threads=2, repeats=30, per_layer=False)
    return {**report, "measured_speedup": bench.measured_speedup, "theoretical_speedup": bench.theoretical_speedup,
            "efficiency": bench.measured_speedup / bench.theoretical_speedup}


def search_epochs_of(values: list[str] | None, methods: list[str]) -> dict[str, float | None]:
    """``--search-epochs`` as method -> epochs: a plain number applies to every method, ``METHOD=N`` to one
    (later values win); methods not named get None (the runner's default, epochs / 2)."""
    out: dict[str, float | None] = dict.fromkeys(methods)
    for value in values or []:
        method, _, number = value.rpartition("=")
        try:
            epochs = float(number)
        except ValueError:
            raise SystemExit(f"--search-epochs {value!r}: expected N or METHOD=N (e.g. anp=3)") from None
        if method and method not in out:
            raise SystemExit(f"--search-epochs {value!r}: {method!r} is not one of --methods {methods}")
        out.update({method: epochs} if method else dict.fromkeys(out, epochs))
    return out


def _key(report: dict) -> tuple[str, int]:
    """A report's (method, seed); reports written before seeds were recorded ran seed 0."""
    return report["method"], int(report.get("seed", 0))


def _document(image_size: int, commands: dict[str, str], reports: dict[tuple[str, int], dict]) -> dict:
    order = {m: i for i, m in enumerate(rethinking.protocol_methods())}
    keys = sorted((k for k in reports if k[0] in order), key=lambda k: (order[k[0]], k[1]))
    return {"image_size": image_size, "commands": commands, "reports": [reports[k] for k in keys]}


def _remeasure(out: Path, methods: list[str], data) -> dict:
    doc = json.loads(out.read_text())
    command = "python " + " ".join(sys.argv)
    commands = doc.setdefault("commands", {})
    for r in doc["reports"]:  # record who trained each row before re-timing some of them
        r.setdefault("command", commands.get(r["method"], doc.get("command", "")))
        r.setdefault("timed_by", row_commands(doc, r)[1])
    doc["reports"] = [{**remeasure(r, doc["image_size"], data.in_channels, data.num_classes), "timed_by": command}
                      if r["method"] in methods else r for r in doc["reports"]]
    commands["remeasure"] = command
    out.write_text(json.dumps(doc, indent=1))
    return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet56")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--methods", nargs="+", default=rethinking.protocol_methods(),
                   help="default: every registered static method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="one report per method and seed (default 0)")
    p.add_argument("--search-epochs", nargs="+", default=None, metavar="[METHOD=]N",
                   help=f"the search of {'/'.join(m for m in rethinking.protocol_methods() if get_method(m).searches)} "
                        "(default: epochs / 2); METHOD=N sets one method's, e.g. anp=3")
    p.add_argument("--own-arms", nargs="*", default=["tas", "anp"], metavar="METHOD",
                   help="methods trained through their own arms (KD for tas, the robustness comparison for anp) "
                        "instead of fine-tune / Scratch-E / Scratch-B (default: tas anp)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for training (timing always uses 2)")
    p.add_argument("--out", default="bench/results/rethinking_digits.json")
    p.add_argument("--merge", nargs="+", metavar="FILE",
                   help="only add the reports of these outputs of this script (other seeds run in parallel) to --out")
    p.add_argument("--remeasure", action="store_true",
                   help="only re-time the stored plans of --methods in --out (run this on a quiet machine)")
    args = p.parse_args(argv)
    data = load("digits", image_size=args.image_size)
    out = Path(args.out)
    if args.remeasure:
        torch.set_num_threads(2)
        doc = _remeasure(out, args.methods, data)
        print(rethinking_table(doc))
        return 0
    previous = json.loads(out.read_text()) if out.is_file() else {}
    reports = {_key(r): r for r in previous.get("reports", [])}
    commands = dict(previous.get("commands", {}))
    if "command" in previous:  # the single-command layout of earlier reports
        commands.update({m: previous["command"] for m, _ in reports})
    if args.merge:
        for other in map(Path, args.merge):
            reports.update({_key(r): r for r in json.loads(other.read_text())["reports"]})
        doc = _document(args.image_size, commands, reports)
        out.write_text(json.dumps(doc, indent=1))
        print(rethinking_table(doc))
        return 0
    search_epochs = search_epochs_of(args.search_epochs, args.methods)
    command = "python " + " ".join(sys.argv)
    torch.set_num_threads(args.threads)  # the runner's timing sets 2 threads and restores these
    for seed in args.seeds:
        for method in args.methods:
            own = method in args.own_arms
            r = rethinking.run(method, data, model_name=args.model, budget=args.budget, epochs=args.epochs,
                               search_epochs=search_epochs[method], seed=seed, progress=False,
                               arms=rethinking.default_arms(method, None if own else "rethinking"))
            reports[method, seed] = {**r.to_dict(), "seed": seed, "command": command, "timed_by": command}
            commands[method] = command
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(_document(args.image_size, commands, reports), indent=1))
    doc = _document(args.image_size, commands, reports)
    print(rethinking_table(doc))
    print(robustness_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
