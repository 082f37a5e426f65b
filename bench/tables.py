"""Every README table that is derived from ``bench/results/*.json``, recomputed from the JSON.

    python bench/tables.py            # print each table as markdown, after the command(s) of its rows
    python bench/tables.py --check    # exit 1 unless README.md holds every table verbatim
    python bench/tables.py --update   # rewrite each table between its markers in README.md

In README.md each table sits between ``<!-- bench/tables.py NAME -->`` and ``<!-- /bench/tables.py -->``;
the block holds the source line (the JSON file and the command recorded in it for the table's rows), the
table, and, where rows come from different commands, a numbered list of those commands. Nothing here
times anything: every figure is read from the committed JSON. ``tests/bench/test_tables.py`` checks that
the README and the JSON agree.

Conventions shared by the tables:

- *spread* of one timing = interquartile range / median of its samples, as recorded in the JSON. A row that
  is a ratio of two timings (a speedup, an efficiency) shows the larger spread of the two.
- A kernel summary row aggregates several measured shapes; it shows the median and the maximum spread over
  them, and is marked *within noise* when that median spread is ``NOISE`` (10%) or more: its efficiency is
  then not resolved to better than about +-0.1.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sparsekern.bench.models import lm_table, summary_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
NOISE = 0.10
BEGIN = "<!-- bench/tables.py {name} -->"
END = "<!-- /bench/tables.py -->"

CHANNEL_SKIP = "channel_skip_conv2d/cpu/float32"
NARROW_CONV = "fused_conv2d/cpu/float32"
CONV_CHAIN = "conv_chain/cpu/float32"
LOWRANK = "lowrank_linear/cpu/float32"
ATTENTION = "attention/cpu/float32"
SRU = "sru_recurrence/cpu/float32"
MODEL_ORDER = ("resnet18", "vgg16_bn", "resnet56")  # the kernel benchmark's shape sets, in its own order
ARMS = ("fine-tune", "Scratch-E", "Scratch-B", "KD")


@dataclass(frozen=True)
class Table:
    """One README table: its marker name, the JSON it comes from, and the markdown block."""

    name: str
    source: str
    markdown: str


def _load(name: str, results: Path) -> dict[str, Any]:
    return json.loads((results / name).read_text())


def _link(name: str) -> str:
    return f"[`bench/results/{name}`](bench/results/{name})"


def _source(name: str, command: str, part: str = "", environment: dict[str, Any] | None = None) -> str:
    where = f" ({part})" if part else ""
    machine = f" on {environment['cpu_model']}" if environment and environment.get("cpu_model") else ""
    if machine and environment.get("cpu_isa"):
        machine += f" ({environment['cpu_isa']})"
    return f"Source: {_link(name)}{where}, written by `{command}`{machine}."


def _numbered(commands: list[str]) -> str:
    return "\n".join(f"{i}. `{c}`" for i, c in enumerate(commands, 1))


def _spread_cell(spreads: list[float]) -> str:
    return f"{statistics.median(spreads):.0%} ({max(spreads):.0%})"


def _mean_of(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.fmean(r[key] for r in rows)


def _mean_sd(values: list[float], percent: bool = True, digits: int | None = None) -> str:
    """``mean +- sample standard deviation`` of the seeds' values (the plain value for one seed), as percent
    with one decimal or as numbers with two, unless ``digits`` says otherwise."""
    scale, unit, default_digits = (100, "%", 1) if percent else (1, "", 2)
    digits = default_digits if digits is None else digits
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}{unit}"


# -- cpu.json: whole models ------------------------------------------------------------------------------------

def models_table(results: Path = RESULTS) -> Table:
    """Dense vs compiled zoo models (``cpu.json``, ``results``), one row per case."""
    doc = _load("cpu.json", results)
    return Table("models", "cpu.json", _source("cpu.json", doc["command"], "`results`", doc.get("environment"))
                 + "\n\n" + summary_table(doc))


def lm_models_table(results: Path = RESULTS) -> Table:
    """Dense vs FLOP-compiled language models at real sizes (``cpu.json``, ``lm``), one row per case."""
    doc = _load("cpu.json", results)["lm"]
    return Table("lm_models", "cpu.json", _source("cpu.json", doc["command"], "`lm`", doc.get("environment"))
                 + "\n\n" + lm_table(doc))


# -- cpu.json: ONNX -----------------------------------------------------------------------------------------------

def onnx_table(results: Path = RESULTS) -> Table:
    """Dense vs compiled models exported to ONNX and run in onnxruntime (``cpu.json``, ``onnx``)."""
    doc = _load("cpu.json", results)["onnx"]
    rows = ["| model | pruned | batch | dense ms | compiled ms | theoretical | measured | efficiency | spread |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        rows.append(f"| {r['model']} | {r['ratio']:.0%} (all) | {r['batch']} | {r['ms']['dense']:.2f} | "
                    f"{r['ms']['fast']:.2f} | {r['theoretical_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
                    f"{r['efficiency']:.2f} | {max(r['spread'].values()):.0%} |")
    env = doc["environment"]
    text = _source("cpu.json", doc["command"], "`onnx`", env) + f" onnxruntime {env['onnxruntime']}.\n\n" \
        + "\n".join(rows)
    return Table("onnx", "cpu.json", text)


# -- cpu.json: narrow convolutions (fused_conv2d) --------------------------------------------------------------

def narrow_conv_table(results: Path = RESULTS) -> Table:
    """Per CIFAR ResNet stage, kept fraction and batch: GFLOP/s of oneDNN and of the direct convolution, and the
    faster one's rate against the dense layer's (``kernel_fused_conv2d``)."""
    def cells(r: dict[str, Any]) -> list[str]:
        g = r["gflops"]
        return [f"{g['onednn']:.0f}", f"{g['direct']:.0f}", r["best"], f"{r['vs_dense']:.2f}"]

    return _stage_table("narrow_conv", NARROW_CONV, ["oneDNN GFLOP/s", "direct GFLOP/s", "faster", "vs dense"], cells,
                        results)


def conv_chain_table(results: Path = RESULTS) -> Table:
    """Per stage, kept fraction and batch: microseconds per layer of a stack of convolutions as separate calls and
    as one chain call (``kernel_conv_chain``)."""
    def cells(r: dict[str, Any]) -> list[str]:
        t = r["us_per_layer"]
        return [f"{t['calls']:.1f}", f"{t['chain']:.1f}", f"{r['gain']:.2f}x"]

    return _stage_table("conv_chain", CONV_CHAIN, ["separate calls, us/layer", "chain, us/layer", "gain"], cells,
                        results)


def _stage_table(name: str, key: str, columns: list[str], cells: Callable[[dict[str, Any]], list[str]],
                 results: Path) -> Table:
    """A table of a kernel benchmark over CIFAR/demo stages (``kernel_fused_conv2d.STAGES``): the stage columns,
    ``columns`` filled by ``cells(row)``, and the row's largest spread."""
    part = _load("cpu.json", results)["kernels"][key]
    head = ["images", "dense layer", "kept", "channels", "batch", *columns, "spread"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in part["rows"]:
        images = "CIFAR 32x32" if r["network"] == "cifar" else "demo 16x16"
        stage = [images, f"{r['dense_channels']} ch, {r['size']}x{r['size']}", f"{r['keep']:.0%}", str(r["channels"]),
                 str(r["batch"])]
        rows.append("| " + " | ".join([*stage, *cells(r), f"{max(r['spread'].values()):.0%}"]) + " |")
    text = _source("cpu.json", part["command"], f"`kernels[\"{key}\"]`", part.get("environment")) + "\n\n" \
        + "\n".join(rows)
    return Table(name, "cpu.json", text)


# -- cpu.json: channel_skip_conv2d -----------------------------------------------------------------------------

def _conv_macs(shape: dict[str, Any]) -> int:
    (kh, kw), (sh, sw), (ph, pw) = shape["kernel"], shape["stride"], shape["padding"]
    dh, dw = shape.get("dilation", (1, 1))
    ho = (shape["h"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (shape["w"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return shape["c_in"] * shape["c_out"] * kh * kw * ho * wo


def _row_spread(row: dict[str, Any], candidate: str) -> float:
    return max(row["spread"]["dense"], row["spread"][candidate])


def channel_skip_table(results: Path = RESULTS) -> Table:
    """Per model, batch, keep and mask mode: per-layer and whole-model efficiency of channel_skip_conv2d."""
    part = _load("cpu.json", results)["kernels"][CHANNEL_SKIP]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in part["rows"]:
        groups[(r["shape"]["model"], r["batch"], r["keep"], r["masks"])].append(r)

    def order(key: tuple) -> tuple:
        model, batch, keep, masks = key
        rank = MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)
        return rank, model, batch, keep, masks != "out"

    rows = [
        "| model | batch | keep | masks | layers with eff >= 0.7 | median efficiency | whole-model: measured / "
        "theoretical speedup (efficiency) | vs dense-then-mask | spread: median (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(groups, key=order):
        model, batch, keep, masks = key
        g = groups[key]
        dense = sum(r["count"] * r["dense_ms"] for r in g)
        kernel = sum(r["count"] * r["kernel_ms"] for r in g)
        naive = sum(r["count"] * r["dense_then_mask_ms"] for r in g)
        macs = sum(r["count"] * _conv_macs(r["shape"]) for r in g)
        active = sum(r["count"] * _conv_macs(r["shape"]) / r["theoretical_speedup"] for r in g)
        measured, theoretical = dense / kernel, macs / active
        good = sum(r["efficiency"] >= 0.7 for r in g)
        median = statistics.median(r["efficiency"] for r in g)
        spreads = [_row_spread(r, r["backend"]) for r in g]
        rows.append(
            f"| {model} | {batch} | {keep} | {masks} | {good}/{len(g)} | {median:.2f} | {measured:.2f}x / "
            f"{theoretical:.2f}x ({measured / theoretical:.2f}) | {naive / kernel:.2f}x | {_spread_cell(spreads)} |")
    text = _source("cpu.json", part["command"], f"`kernels[\"{CHANNEL_SKIP}\"]`", part.get("environment")) + "\n\n" \
        + "\n".join(rows)
    return Table("channel_skip_conv2d", "cpu.json", text)


# -- cpu.json: lowrank_linear ----------------------------------------------------------------------------------

def lowrank_table(results: Path = RESULTS, min_tokens: int = 256) -> Table:
    """Per token range and rank: efficiency of the dispatched lowrank_linear (against FLOPs and against the
    roofline), its spread, and whether the row is within noise (median spread >= NOISE)."""
    part = _load("cpu.json", results)["kernels"][LOWRANK]
    all_tokens = sorted({r["tokens"] for r in part["rows"]})
    large = [t for t in all_tokens if t >= min_tokens]
    label_large = f"{min(large)}-{max(large)}" if len(large) > 1 else str(large[0])
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in part["rows"]:
        label = label_large if r["tokens"] >= min_tokens else str(r["tokens"])
        groups[(label, r["r"])].append(r)
    labels = [label_large] + [str(t) for t in reversed(all_tokens) if t < min_tokens]
    rows = [
        "| tokens | r | rows | dispatched to | efficiency, median (min-max) | vs roofline, median "
        "| fused vs two GEMMs, median | spread: median (max) | within noise |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in labels:
        for rank in sorted(r for lab, r in groups if lab == label):
            g = groups[(label, rank)]
            eff = [r["efficiency"]["dispatch"] for r in g]
            backends = "/".join(sorted({r["backend"] for r in g}))
            spreads = [_row_spread(r, "dispatch") for r in g]
            fused = statistics.median(r["fused_vs_two_gemm"] for r in g)
            roof = statistics.median(r["roofline_efficiency"]["dispatch"] for r in g)
            noisy = "yes" if statistics.median(spreads) >= NOISE else "no"
            rows.append(
                f"| {label} | {rank} | {len(g)} | {backends} | {statistics.median(eff):.2f} ({min(eff):.2f}-"
                f"{max(eff):.2f}) | {roof:.2f} | {fused:.2f}x | {_spread_cell(spreads)} | {noisy} |")
    text = _source("cpu.json", part["command"], f"`kernels[\"{LOWRANK}\"]`", part.get("environment")) + "\n\n" \
        + "\n".join(rows)
    return Table("lowrank_linear", "cpu.json", text)


# -- cpu.json: attention and the SRU recurrence (what low-rank pruning leaves whole) ----------------------------

def attention_table(results: Path = RESULTS) -> Table:
    """Per shape and mask: GFLOP/s of sk.ops.attention's CPU kernel, torch's SDPA and the matmul beside it."""
    part = _load("cpu.json", results)["kernels"][ATTENTION]
    rows = ["| B x H x T x E | causal | sparsekern GFLOP/s | torch GFLOP/s | matmul GFLOP/s | vs matmul | spread |",
            "|---|---|---|---|---|---|---|"]
    for r in part["rows"]:
        g = r["gflops"]
        rows.append(f"| {' x '.join(map(str, r['shape']))} | {'yes' if r['causal'] else 'no'} | {g['sparsekern']:.0f} "
                    f"| {g['torch']:.0f} | {g['matmul']:.0f} | {r['vs_matmul']:.2f} | "
                    f"{max(r['spread'][k] for k in ('sparsekern', 'matmul')):.0%} |")
    text = _source("cpu.json", part["command"], f"`kernels[\"{ATTENTION}\"]`", part.get("environment")) + "\n\n" \
        + "\n".join(rows)
    return Table("attention", "cpu.json", text)


def sru_table(results: Path = RESULTS) -> Table:
    """The fused SRU recurrence against the elementwise loop: model forward, training step, recurrence alone."""
    part = _load("cpu.json", results)["kernels"][SRU]
    cfg = part["config"]
    rows = ["| row | fused ms | loop ms | speedup | spread |", "|---|---|---|---|---|"]
    for r in part["rows"]:
        rows.append(f"| {r['name']} | {r['ms']['fused']:.2f} | {r['ms']['loop']:.2f} | {r['speedup']:.2f}x | "
                    f"{max(r['spread'].values()):.0%} |")
    share = part["recurrence_share"]
    text = (_source("cpu.json", part["command"], f"`kernels[\"{SRU}\"]`", part.get("environment"))
            + f" SRU d_model {cfg['d_model']}, {cfg['layers']} layers, {cfg['batch']} x {cfg['tokens']} tokens; the "
            f"recurrence's share of the forward: {share['fused']:.0%} fused, {share['loop']:.0%} loop.\n\n"
            + "\n".join(rows))
    return Table("sru_recurrence", "cpu.json", text)


# -- sanp_digits.json ------------------------------------------------------------------------------------------

def sanp_markdown(doc: dict[str, Any]) -> str:
    """SANP end to end: one row per model, compiled path and batch, with the seeds it ran (``seed`` of each
    result; 0 when absent): accuracies, cost, speedups and efficiency as mean +- standard deviation over the
    seeds, times as means, spread as the largest of any seed, and the commands that produced the rows."""
    commands: list[str] = []
    rows = [
        "| model | seeds | dense acc | SANP acc | cost: mean (min-max) | compiled | batch | theoretical | measured | "
        "efficiency | dense ms | compiled ms | spread | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["results"]:
        groups[r["model"]].append(r)
    for model, runs in groups.items():
        for cmd in (r["command"] for r in runs):
            if cmd not in commands:
                commands.append(cmd)
        numbers = ", ".join(str(n) for n in sorted({commands.index(r["command"]) + 1 for r in runs}))
        h, w = runs[0]["plan"]["meta"]["inputs"][0]["shape"][-2:]
        seeds = ", ".join(str(r.get("seed", 0)) for r in runs)
        cost = (f"{_mean_sd([r['cost_ratio']['mean'] for r in runs])} "
                f"({min(r['cost_ratio']['min'] for r in runs):.0%}-{max(r['cost_ratio']['max'] for r in runs):.0%})")
        for i, first in enumerate(runs[0]["timings"]):
            t = [r["timings"][i] for r in runs]
            rows.append(
                f"| {model} ({h}x{w}) | {seeds} | {_mean_sd([r['dense_accuracy'] for r in runs])} | "
                f"{_mean_sd([r['sanp_accuracy'] for r in runs])} | {cost} | {first['path']} | {first['batch']} | "
                f"{_mean_of(t, 'theoretical_speedup'):.2f}x | {_mean_sd([x['measured_speedup'] for x in t], False)}x | "
                f"{_mean_sd([x['efficiency'] for x in t], False)} | {_mean_of(t, 'dense_ms'):.2f} | "
                f"{_mean_of(t, 'compiled_ms'):.2f} | {max(x['spread'] for x in t):.1%} | {numbers} |")
    return f"commands:\n\n{_numbered(commands)}\n\n" + "\n".join(rows)


def sanp_table(results: Path = RESULTS) -> Table:
    doc = _load("sanp_digits.json", results)
    machine = doc["env"].get("cpu_model")
    text = f"Source: {_link('sanp_digits.json')}{f', measured on {machine}' if machine else ''}; {sanp_markdown(doc)}"
    return Table("sanp", "sanp_digits.json", text)


def sanp_models_table(results: Path = RESULTS) -> Table:
    """SANP at ImageNet size with learned-structure gates (``cpu.json``, ``sanp_models``): per model and compiled
    path, the speedup against the dense model."""
    doc = _load("cpu.json", results)["sanp_models"]
    rows = ["| model | batch | cost | classes (never / switching / always) | compiled | dense ms | compiled ms | "
            "theoretical | measured | efficiency | spread |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        layers = r["layers"].values()
        total = sum(v["channels"] for v in layers)
        never, always = sum(v["never_on"] for v in layers), sum(v["always_on"] for v in layers)
        classes = f"{never / total:.0%} / {(total - never - always) / total:.0%} / {always / total:.0%}"
        for t in r["timings"]:
            rows.append(f"| {r['model']} ({r['size']}x{r['size']}) | {r['batch']} | {r['cost']:.1%} | {classes} | "
                        f"{t['path']} | {t['dense_ms']:.1f} | {t['compiled_ms']:.1f} | {t['theoretical_speedup']:.2f}x | "
                        f"{t['measured_speedup']:.2f}x | {t['efficiency']:.2f} | {t['spread']:.0%} |")
    text = _source("cpu.json", doc["command"], "`sanp_models`", doc["environment"]) + "\n\n" + "\n".join(rows)
    return Table("sanp_models", "cpu.json", text)


# -- rethinking_digits.json ------------------------------------------------------------------------------------

def _named_methods(command: str) -> list[str] | None:
    """The ``--methods`` of a rethinking_report command line (None when it names none: every method)."""
    args = shlex.split(command)
    if "--methods" not in args:
        return None
    out = []
    for a in args[args.index("--methods") + 1:]:
        if a.startswith("--"):
            break
        out.append(a)
    return out


def row_commands(doc: dict[str, Any], report: dict[str, Any]) -> tuple[str, str]:
    """(command that trained and first timed the row, command whose run the row's speedup comes from).

    Reports written by the current ``bench/rethinking_report.py`` carry both (``command``, ``timed_by``);
    for older ones they are read from the document's ``commands``, where a ``remeasure`` command re-timed the
    methods it names."""
    commands = doc.get("commands", {})
    trained = report.get("command") or commands.get(report["method"]) or doc.get("command", "")
    timed = report.get("timed_by")
    if timed is None:
        remeasure = commands.get("remeasure")
        named = _named_methods(remeasure) if remeasure else []
        timed = remeasure if remeasure and (named is None or report["method"] in named) else trained
    return trained, timed


def _by_method(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The document's reports grouped by method (one report per seed), in document order."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in doc["reports"]:
        groups[r["method"]].append(r)
    return groups


def _arm_accuracies(r: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """arm -> (accuracy, suffix) of one report; ANP-VS's fine-tune cell is its adversarially fine-tuned model's
    clean accuracy."""
    acc = {a["name"]: (a["accuracy"], "") for a in r["arms"]}
    tuned = r.get("robustness", {}).get("ANP-VS + adversarial fine-tune")
    if tuned:
        acc.setdefault("fine-tune", (tuned["clean_accuracy"], " (adversarial)"))
    return acc


def rethinking_table(doc: dict[str, Any], results_name: str = "rethinking_digits.json") -> str:
    """One row per method: accuracy of each arm it ran ("-" for arms it did not), FLOPs, params, speed, as the
    mean +- standard deviation over the seeds it ran (``seed`` of each report; 0 when absent), and the numbered
    commands that trained it and that timed its speedup (listed above the table)."""
    commands: list[str] = []

    def numbers(cmds: list[str]) -> str:
        for cmd in cmds:
            if cmd not in commands:
                commands.append(cmd)
        return ", ".join(str(n) for n in sorted({commands.index(c) + 1 for c in cmds}))

    rows = [
        "| method | seeds | full model | " + " | ".join(ARMS) + " | FLOPs | params | measured speedup | efficiency "
        "| trained by | timed by |",
        "|---|---|---|" + "---|" * len(ARMS) + "---|---|---|---|---|---|",
    ]
    for method, group in _by_method(doc).items():
        accs = [_arm_accuracies(r) for r in group]
        cells = []
        for arm in ARMS:
            values = [a[arm][0] for a in accs if arm in a]
            cells.append(_mean_sd(values) + accs[0][arm][1] if len(values) == len(group) else "-")
        seeds = ", ".join(str(r.get("seed", 0)) for r in group)
        trained = numbers([row_commands(doc, r)[0] for r in group])
        timed = numbers([row_commands(doc, r)[1] for r in group])
        rows.append(
            f"| {method} | {seeds} | {_mean_sd([r['full_accuracy'] for r in group])} | " + " | ".join(cells)
            + f" | {_mean_sd([r['flops_pruned'] / r['flops_full'] for r in group], digits=0)}"
            f" | {_mean_sd([r['params_pruned'] / r['params_full'] for r in group], digits=0)}"
            f" | {_mean_sd([r['measured_speedup'] for r in group], percent=False)}x"
            f" | {_mean_sd([r['efficiency'] for r in group], percent=False)} | {trained} | {timed} |")
    return f"Source: {_link(results_name)}; commands:\n\n{_numbered(commands)}\n\n" + "\n".join(rows)


def robustness_table(doc: dict[str, Any]) -> str:
    """Clean and PGD accuracy of each model a report evaluated under attack (ANP-VS and its baselines), mean +-
    standard deviation over the seeds."""
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for r in doc["reports"]:
        for name, acc in r.get("robustness", {}).items():
            runs[name].append(acc)
    rows = ["| model | seeds | clean | PGD | test images |", "|---|---|---|---|---|"]
    for name, accs in runs.items():
        rows.append(f"| {name} | {len(accs)} | {_mean_sd([a['clean_accuracy'] for a in accs])} | "
                    f"{_mean_sd([a['pgd_accuracy'] for a in accs])} | {accs[0]['n']:.0f} |")
    return "\n".join(rows) if len(rows) > 2 else ""


def static_methods_tables(results: Path = RESULTS) -> list[Table]:
    doc = _load("rethinking_digits.json", results)
    out = [Table("static_methods", "rethinking_digits.json", rethinking_table(doc))]
    robust = robustness_table(doc)
    if robust:
        cmds = sorted({row_commands(doc, r)[0] for r in doc["reports"] if r.get("robustness")})
        out.append(Table("robustness", "rethinking_digits.json",
                         f"Source: {_link('rethinking_digits.json')}, written by "
                         + ", ".join(f"`{c}`" for c in cmds) + ".\n\n" + robust))
    return out


# -- flop_lm.json ----------------------------------------------------------------------------------------------

def flop_runs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-seed runs of a FLOP report, ``[{"seed": s, "results": {arch: ...}}]``; a report written before
    seeds were recorded is one run of its ``config["seed"]``."""
    if "runs" in doc:
        return doc["runs"]
    return [{"seed": doc.get("config", {}).get("seed", 0), "results": doc["results"]}]


def flop_markdown(doc: dict[str, Any]) -> str:
    """FLOP on byte-level LMs: one dense row per architecture, then one row per target; bits per byte,
    sparsity, speedup and efficiency as mean +- standard deviation over the seeds, parameters and tokens/s as
    means, spread as the largest timing spread of any seed."""
    names = {"transformer_lm": "transformer", "sru_lm": "SRU"}
    runs = flop_runs(doc)
    rows = [
        "| model | seeds | target | sparsity | params | FLOP bpb | same-size dense bpb | tokens/s dense -> compiled "
        "| measured (theoretical) speedup | efficiency | spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def stat(values: list[float], digits: int) -> str:
        return _mean_sd(values, percent=False, digits=digits)

    seeds = ", ".join(str(r["seed"]) for r in runs)
    for arch in runs[0]["results"]:
        name = names.get(arch, arch)
        per_seed = [r["results"][arch] for r in runs]
        dense = [r["dense"] for r in per_seed]
        rows.append(f"| {name} dense | {seeds} | - | - | {round(statistics.fmean(d['params'] for d in dense)):,} | "
                    f"{stat([d['test_bpb'] for d in dense], 3)} | - | - | - | - | - |")
        for i, first in enumerate(per_seed[0]["flop"]):
            f = [r["flop"][i] for r in per_seed]
            sc = [r["scratch"][i] for r in per_seed]
            rows.append(
                f"| {name} | {seeds} | {first['target']:.2f} | {stat([x['sparsity'] for x in f], 3)} | "
                f"{round(_mean_of(f, 'params')):,} | {stat([x['test_bpb'] for x in f], 3)} | "
                f"{stat([x['test_bpb'] for x in sc], 3)} ({round(_mean_of(sc, 'params')):,}) | "
                f"{_mean_of(f, 'dense_tokens_per_s'):,.0f} -> {_mean_of(f, 'compiled_tokens_per_s'):,.0f} | "
                f"{stat([x['measured_speedup'] for x in f], 2)}x ({_mean_of(f, 'theoretical_speedup'):.2f}x) | "
                f"{stat([x['efficiency'] for x in f], 2)} | {max(max(x['timing_spread']) for x in f):.1%} |")
    return "\n".join(rows)


def flop_table(results: Path = RESULTS) -> Table:
    doc = _load("flop_lm.json", results)
    return Table("flop_lm", "flop_lm.json", _source("flop_lm.json", doc["command"]) + "\n\n" + flop_markdown(doc))


# -- all -------------------------------------------------------------------------------------------------------

BUILDERS: tuple[Callable[[Path], Table | list[Table]], ...] = (
    models_table, narrow_conv_table, conv_chain_table, onnx_table, channel_skip_table, lowrank_table, attention_table,
    sru_table,
    lm_models_table, sanp_table,
    sanp_models_table, static_methods_tables, flop_table)


def tables(results: Path = RESULTS) -> list[Table]:
    """Every README table derived from the JSON under ``results``, in README order."""
    out: list[Table] = []
    for build in BUILDERS:
        t = build(results)
        out.extend(t if isinstance(t, list) else [t])
    return out


def block(t: Table) -> str:
    """The table as it stands in README.md, markers included."""
    return f"{BEGIN.format(name=t.name)}\n{t.markdown}\n{END}"


def update(readme: str, ts: list[Table]) -> str:
    """``readme`` with the text between each table's markers replaced by the table (markers must exist)."""
    for t in ts:
        pattern = re.compile(re.escape(BEGIN.format(name=t.name)) + r"\n.*?" + re.escape(END), re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no marker {BEGIN.format(name=t.name)!r}; add the marker pair first")
        readme = pattern.sub(lambda _m, t=t: block(t), readme, count=1)
    return readme


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 unless README.md holds every table verbatim")
    mode.add_argument("--update", action="store_true", help="rewrite the tables between their markers")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    ts = tables(args.results)
    if args.update:
        args.readme.write_text(update(args.readme.read_text(), ts))
        print(f"updated {len(ts)} tables in {args.readme}")
        return 0
    if args.check:
        text = args.readme.read_text()
        stale = [t.name for t in ts if block(t) not in text]
        for name in stale:
            print(f"{args.readme}: table {name!r} differs from bench/results (run python bench/tables.py --update)")
        return 1 if stale else 0
    for t in ts:
        print(f"### {t.name} ({t.source})\n\n{t.markdown}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
