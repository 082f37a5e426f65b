"""bench/tables.py: the README's benchmark tables are recomputed from the committed JSON and match it verbatim.

Nothing here times anything; the tables are read from ``bench/results/*.json``.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "tables.py"


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("bench_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tables):
    return tables.tables()


def test_script_runs_on_the_committed_json_and_prints_every_table(built):
    out = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for t in built:
        assert t.markdown in out, t.name


def test_every_table_appears_in_the_readme_verbatim(tables, built):
    readme = (ROOT / "README.md").read_text()
    stale = [t.name for t in built if tables.block(t) not in readme]
    assert not stale, f"README tables differ from bench/results: {stale}; run python bench/tables.py --update"


def test_check_mode_agrees(built):
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout


def test_each_table_names_the_command_recorded_for_its_rows(built):
    cpu = json.loads((ROOT / "bench/results/cpu.json").read_text())
    by_name = {t.name: t.markdown for t in built}
    assert f"`{cpu['command']}`" in by_name["models"]
    for name, key in (("channel_skip_conv2d", "channel_skip_conv2d/cpu/float32"),
                      ("lowrank_linear", "lowrank_linear/cpu/float32")):
        assert f"`{cpu['kernels'][key]['command']}`" in by_name[name]
    for r in json.loads((ROOT / "bench/results/sanp_digits.json").read_text())["results"]:
        assert f"`{r['command']}`" in by_name["sanp"]
    flop = json.loads((ROOT / "bench/results/flop_lm.json").read_text())
    assert f"`{flop['command']}`" in by_name["flop_lm"]


def test_channel_skip_table_has_a_row_for_every_measured_case(built):
    rows = json.loads((ROOT / "bench/results/cpu.json").read_text())["kernels"]["channel_skip_conv2d/cpu/float32"]
    measured = {(r["shape"]["model"], str(r["batch"]), str(r["keep"]), r["masks"]) for r in rows["rows"]}
    table = next(t.markdown for t in built if t.name == "channel_skip_conv2d")
    shown = {tuple(c.strip() for c in line.split("|")[1:5]) for line in table.splitlines()
             if line.startswith("| ") and not line.startswith("| model")}
    assert shown == measured


def test_lowrank_table_shows_every_token_count_and_flags_noise_by_its_rule(tables, built):
    rows = json.loads((ROOT / "bench/results/cpu.json").read_text())["kernels"]["lowrank_linear/cpu/float32"]["rows"]
    table = next(t.markdown for t in built if t.name == "lowrank_linear")
    lines = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ") and "tokens" not in line]
    assert sum(int(c[2]) for c in lines) == len(rows)  # every measured row is counted once
    for c in lines:  # the shown median spread is rounded to a percent: check away from the threshold
        median_spread = float(c[7].split("%")[0]) / 100
        if abs(median_spread - tables.NOISE) > 0.005:
            assert (c[8].strip() == "yes") == (median_spread > tables.NOISE), c


def test_static_methods_rows_name_the_run_that_trained_and_timed_them(tables):
    doc = {
        "commands": {"a": "python bench/rethinking_report.py", "b": "python bench/rethinking_report.py --methods b",
                     "remeasure": "python bench/rethinking_report.py --methods b --remeasure"},
        "reports": [
            {"method": "a", "full_accuracy": 0.9, "arms": [], "flops_pruned": 1, "flops_full": 2,
             "params_pruned": 1, "params_full": 2, "measured_speedup": 1.5, "efficiency": 0.75},
            {"method": "b", "full_accuracy": 0.9, "arms": [], "flops_pruned": 1, "flops_full": 2,
             "params_pruned": 1, "params_full": 2, "measured_speedup": 1.5, "efficiency": 0.75},
            {"method": "c", "full_accuracy": 0.9, "arms": [], "flops_pruned": 1, "flops_full": 2,
             "params_pruned": 1, "params_full": 2, "measured_speedup": 1.5, "efficiency": 0.75,
             "command": "train c", "timed_by": "time c"},
        ],
    }
    assert tables.row_commands(doc, doc["reports"][0]) == (doc["commands"]["a"], doc["commands"]["a"])
    assert tables.row_commands(doc, doc["reports"][1]) == (doc["commands"]["b"], doc["commands"]["remeasure"])
    assert tables.row_commands(doc, doc["reports"][2]) == ("train c", "time c")
    text = tables.rethinking_table(doc)
    for cmd in (*doc["commands"].values(), "train c", "time c"):
        assert f"`{cmd}`" in text


def _report(method: str, seed: int, full: float, arms: dict[str, float], speedup: float, **extra) -> dict:
    return {"method": method, "seed": seed, "full_accuracy": full, "flops_pruned": 1, "flops_full": 2,
            "params_pruned": 1, "params_full": 2, "measured_speedup": speedup, "efficiency": speedup / 2,
            "arms": [{"name": a, "accuracy": v} for a, v in arms.items()], "command": f"train {seed}",
            "timed_by": "time", **extra}


def test_static_methods_rows_show_mean_and_spread_over_seeds(tables):
    attacked = [{"ANP-VS": {"clean_accuracy": c, "pgd_accuracy": c / 2, "n": 359}} for c in (0.9, 0.7)]
    doc = {"commands": {}, "reports": [
        _report("a", 0, 0.9, {"fine-tune": 0.8, "Scratch-E": 0.6}, 1.4),
        _report("a", 1, 0.8, {"fine-tune": 0.6}, 1.6),
        _report("b", 0, 0.5, {}, 1.2, robustness=attacked[0]),
        _report("b", 1, 0.5, {}, 1.2, robustness=attacked[1]),
    ]}
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in tables.rethinking_table(doc).splitlines()
            if line.startswith("| a ") or line.startswith("| b ")}
    a, b = rows["a"], rows["b"]
    assert a[1] == "0, 1" and a[2] == "85.0 ± 7.1%" and a[3] == "70.0 ± 14.1%"  # sample standard deviation
    assert a[4] == "-"  # Scratch-E ran for one seed only: no mean over a different set of seeds
    assert a[7] == "50 ± 0%" and a[9] == "1.50 ± 0.14x" and a[11] == "1, 2" and a[12] == "3 |"
    assert b[2] == "50.0 ± 0.0%"
    robust = tables.robustness_table(doc).splitlines()[2]
    assert robust == "| ANP-VS | 2 | 80.0 ± 14.1% | 40.0 ± 7.1% | 359 |"
    single = tables.rethinking_table({"commands": {}, "reports": doc["reports"][:1]})
    assert "| a | 0 | 90.0% | 80.0% | 60.0% |" in single  # one seed: the value alone


def test_flop_rows_show_mean_and_spread_over_seeds(tables):
    def run(seed: int, bpb: float, speedup: float) -> dict:
        flop_row = {"target": 0.5, "sparsity": 0.5, "params": 100 + seed, "test_bpb": bpb, "dense_tokens_per_s": 10.0,
                    "compiled_tokens_per_s": 10.0 * speedup, "measured_speedup": speedup,
                    "theoretical_speedup": 2.0, "efficiency": speedup / 2, "timing_spread": [0.01, 0.02 + seed]}
        return {"seed": seed, "results": {"sru_lm": {
            "dense": {"params": 200, "test_bpb": bpb - 1}, "flop": [flop_row],
            "scratch": [{"target": 0.5, "params": 98, "test_bpb": 2 * bpb}]}}}

    doc = {"runs": [run(0, 2.0, 1.0), run(1, 3.0, 1.4)]}
    lines = tables.flop_markdown(doc).splitlines()
    assert lines[2] == "| SRU dense | 0, 1 | - | - | 200 | 1.500 ± 0.707 | - | - | - | - | - |"
    assert lines[3] == ("| SRU | 0, 1 | 0.50 | 0.500 ± 0.000 | 100 | 2.500 ± 0.707 | 5.000 ± 1.414 (98) | 10 -> 12 "
                        "| 1.20 ± 0.28x (2.00x) | 0.60 ± 0.14 | 102.0% |")
    old = {"config": {"seed": 3}, "results": run(3, 2.0, 1.0)["results"]}  # the layout before seeds
    assert tables.flop_markdown(old).splitlines()[3].startswith("| SRU | 3 | 0.50 | 0.500 | 103 | 2.000 | ")


def test_sanp_rows_group_the_seeds_of_a_model(tables):
    def result(seed: int, acc: float, efficiency: float) -> dict:
        timing = {"path": "hybrid", "batch": 64, "theoretical_speedup": 2.0, "measured_speedup": 2 * efficiency,
                  "efficiency": efficiency, "dense_ms": 10.0, "compiled_ms": 5.0 + seed, "spread": 0.03 + seed / 100}
        return {"model": "resnet56", "seed": seed, "command": f"run {seed}", "dense_accuracy": 0.9,
                "sanp_accuracy": acc, "cost_ratio": {"mean": 0.5, "min": 0.4 + seed / 10, "max": 0.6},
                "plan": {"meta": {"inputs": [{"shape": [64, 1, 16, 16]}]}}, "timings": [timing]}

    text = tables.sanp_markdown({"results": [result(0, 0.9, 0.7), result(1, 0.8, 0.9)]})
    row = text.splitlines()[-1]
    assert row == ("| resnet56 (16x16) | 0, 1 | 90.0 ± 0.0% | 85.0 ± 7.1% | 50.0 ± 0.0% (40%-60%) | hybrid | 64 | 2.00x "
                   "| 1.60 ± 0.28x | 0.80 ± 0.14 | 10.00 | 5.50 | 4.0% | 1, 2 |")
    assert "1. `run 0`" in text and "2. `run 1`" in text


def test_update_rewrites_only_between_the_markers(tables, built):
    t = built[0]
    stale = f"before\n{tables.BEGIN.format(name=t.name)}\nold table\n{tables.END}\nafter\n"
    fresh = tables.update(stale, [t])
    assert fresh == f"before\n{tables.block(t)}\nafter\n"
    assert tables.update(fresh, [t]) == fresh
