"""The command line: the demo runs end to end, and the model benchmark writes its JSON."""
from __future__ import annotations

import json
from pathlib import Path

from sparsekern.cli import main


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path), "--epochs", "2", "--finetune-epochs", "1", "--repeats", "3",
                 "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["compiled_vs_masked_error"] < 1e-4
    assert report["reload_bit_identical"] is True
    assert report["accuracy"]["dense"] > 0.8
    assert report["flops"]["compiled"] < report["flops"]["dense"] / 3  # 50% of every group's channels
    assert report["benchmark"]["theoretical_speedup"] > 3
    assert (tmp_path / "model.sk").exists() and (tmp_path / "plan.json").exists()


def test_bench_models_writes_json_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "models", "--model", "resnet20", "--size", "16", "--batch", "2", "--ratio", "0.5",
            "--round-to", "8", "--repeats", "2", "--warmup", "1", "--out", str(out), "--plot", str(plot),
            "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["case"]["model"] == "resnet20" and result["batch"] == 2
    assert result["theoretical_speedup"] > 3 and result["dense"]["n"] == 2
    assert result["case"]["passes"] == ["fold_bn", "onednn"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
