"""The command line: end to end runs, and its rules (cli.py's docstring): every argument checked before any
work, outputs never replaced without --overwrite, one-line errors with exit codes 2 (usage) / 1 (runtime),
checkpoints per stage and --resume.

Timed code runs here (the demo and the benchmarks measure speedups) but nothing asserts on time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import sparsekern as sk
import sparsekern.bench.kernel_channel_skip_conv2d as kernel_conv
import sparsekern.bench.kernel_lowrank_linear as kernel_lowrank
import sparsekern.bench.models as bench_models
import sparsekern.demo as demo_module
from sparsekern.cli import main
from sparsekern.dynamic import GatedConv2d
from sparsekern.hybrid import GuardedModel
from sparsekern.methods import flop, rethinking, sanp
from sparsekern.train import TrainConfig
from tests.conftest import training_backend

TINY = ["--model", "resnet20", "--image-size", "8", "--epochs", "0.05", "--repeats", "2", "--no-progress"]


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    with training_backend():  # one thread: two spin-wait for each other on a busy machine
        assert main(["demo", "--out", str(tmp_path), "--epochs", "2", "--finetune-epochs", "1", "--repeats", "3",
                     "--threads", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["compiled_vs_masked_error"] < 1e-4
    assert report["reload_bit_identical"] is True
    assert report["accuracy"]["dense"] > 0.8
    assert report["flops"]["compiled"] < report["flops"]["dense"] / 3  # 50% of every group's channels
    assert report["benchmark"]["theoretical_speedup"] > 3
    assert (tmp_path / "model.sk").exists() and (tmp_path / "plan.json").exists()


def test_bench_kernels_conv_chain_writes_its_rows(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    argv = ["bench", "kernels", "--op", "conv_chain", "--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    part = json.loads(out.read_text())["kernels"]["conv_chain/cpu/float32"]
    assert len(part["rows"]) == 3 * 2  # the demo's three stages, kept 100% and 50%, batch 1
    for r in part["rows"]:
        assert r["batch"] == 1 and set(r["us_per_layer"]) == {"calls", "chain"}
        assert r["gain"] == pytest.approx(r["us_per_layer"]["calls"] / r["us_per_layer"]["chain"])


def test_bench_models_writes_json_and_plot(tmp_path: Path) -> None:
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "models", "--model", "resnet20", "--size", "16", "--batch", "2", "--ratio", "0.5",
            "--round-to", "8", "--repeats", "3", "--block", "2", "--warmup", "1", "--out", str(out), "--plot",
            str(plot), "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    (result,) = doc["results"]
    assert result["case"]["model"] == "resnet20" and result["batch"] == 2
    assert result["theoretical_speedup"] > 3
    assert result["block"] == 2 and result["dense"]["n"] == result["fast"]["n"] == 4  # two turns of two
    assert result["case"]["passes"] == ["fold_bn", "onednn", "conv_chain", "onednn_linear", "attention", "script"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------- arguments checked before any work

@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[str]:
    """Replace every command's work by a recorder: a test using it proves the command stopped before."""
    started: list[str] = []

    def recorder(name: str) -> Any:
        def work(*args: Any, **kwargs: Any) -> Any:
            started.append(name)
            raise AssertionError(f"{name} started")
        return work

    for owner, name in ((rethinking, "run"), (flop, "run_lm"), (sanp, "run"), (demo_module, "run_demo"),
                        (bench_models, "run_suite"), (kernel_conv, "run"), (kernel_lowrank, "run")):
        monkeypatch.setattr(owner, name, recorder(f"{owner.__name__}.{name}"))
    monkeypatch.chdir(tmp_path)  # the default --out folders land here, if anything gets that far
    return started


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("sparsekern: error: ") and "Traceback" not in err[0]
    return err[0]


PRUNE = ["prune", "--method", "l1_norm"]
FLOP = ["prune", "--method", "flop"]
SANP = ["prune", "--method", "sanp"]
KERNELS = ["bench", "kernels", "--op", "lowrank_linear"]


@pytest.mark.parametrize("argv, named", [
    (PRUNE + ["--budget", "0"], "--budget"),
    (PRUNE + ["--budget", "1.5"], "--budget"),
    (PRUNE + ["--budget", "-1"], "--budget"),
    (PRUNE + ["--budget", "nan"], "--budget"),
    (PRUNE + ["--epochs", "0"], "--epochs"),
    (PRUNE + ["--finetune-epochs", "-2"], "--finetune-epochs"),
    (PRUNE + ["--image-size", "0"], "--image-size"),
    (PRUNE + ["--seed", "-1"], "--seed"),
    (PRUNE + ["--model", "resnet99"], "resnet99"),
    (PRUNE + ["--model", "transformer_lm"], "transformer_lm"),
    (PRUNE + ["--data", "mnist"], "--data"),
    (PRUNE + ["--data", "cifar10:does/not/exist"], "does/not/exist"),
    (PRUNE + ["--target", "0.3"], "--target"),  # a flop flag the method would ignore
    (PRUNE + ["--search-epochs", "1"], "--search-epochs"),
    (PRUNE + ["--dropout", "0.1"], "--dropout"),  # an LM flag
    (PRUNE + ["--momentum", "1.5"], "--momentum"),
    (PRUNE + ["--milestones", "0.8", "0.2"], "--milestones"),
    (PRUNE + ["--schedule", "linear"], "--schedule"),
    (FLOP + ["--momentum", "0.9"], "--momentum"),  # an image flag
    (FLOP + ["--target", "1"], "--target"),
    (FLOP + ["--steps", "0"], "--steps"),
    (FLOP + ["--model", "resnet20"], "resnet20"),
    (FLOP + ["--budget", "0.3"], "--budget"),
    (FLOP + ["--repeats", "3"], "--repeats"),
    (FLOP + ["--d-model", "6"], "--d-model 6"),  # not divisible by the 4 heads
    (FLOP + ["--data", "enwik8:does/not/exist"], "does/not/exist"),
    (SANP + ["--protocol", "rethinking"], "--protocol"),  # SANP has no pruned-then-trained arms
    (SANP + ["--finetune-epochs", "2"], "--finetune-epochs"),
    (SANP + ["--target", "0.3"], "--target"),
    (SANP + ["--budget", "0"], "--budget"),
    (["demo", "--ratio", "1"], "--ratio"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--epochs", "-1"], "--epochs"),
    (["bench", "models", "--model", "resnet99"], "resnet99"),
    (["bench", "models", "--ratio", "0"], "--ratio"),
    (["bench", "models", "--batch", "0"], "--batch"),
    (["bench", "models", "--model", "resnet20", "--passes", "fold_bn,nope"], "nope"),
    (["bench", "models", "--batch", "4"], "--model"),  # a case flag the standard set would ignore
    (["bench", "models", "--set", "lm", "--model", "resnet20"], "--set"),
    (["bench", "models", "--set", "lm", "--ratio", "0.5"], "--model"),
    (KERNELS + ["--threads", "0"], "--threads"),
    (KERNELS + ["--repeats", "0"], "--repeats"),
    (KERNELS + ["--budget-s", "0"], "--budget-s"),
])
def test_bad_arguments_are_refused_before_any_work(argv: list[str], named: str, no_work: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert named in _one_error_line(capsys)
    assert no_work == []
    assert not Path("sparsekern-prune").exists() and not Path("sparsekern-demo").exists()


def test_training_flags_reach_the_pipeline_without_a_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--lr/--batch-size go to rethinking.run; --schedule/--milestones/--weight-decay become the defaults of every
    TrainConfig built during the run, and only during it."""
    seen: dict[str, Any] = {}

    def run(method: str, data: Any, **kwargs: Any) -> Any:
        seen.update(kwargs, config=TrainConfig(), explicit=TrainConfig(schedule="cosine"))
        raise KeyboardInterrupt  # stop before any work

    monkeypatch.setattr(rethinking, "run", run)
    argv = PRUNE + TINY + ["--out", str(tmp_path), "--lr", "0.05", "--batch-size", "32", "--schedule", "step",
                           "--milestones", "0.3", "0.6", "--weight-decay", "5e-4", "--nesterov"]
    assert main(argv) == 130
    assert (seen["lr"], seen["batch_size"]) == (0.05, 32) and "finetune_lr" not in seen
    config = seen["config"]
    assert (config.schedule, config.milestones, config.weight_decay, config.nesterov) == ("step", (0.3, 0.6), 5e-4,
                                                                                          True)
    assert seen["explicit"].schedule == "cosine"  # an explicit argument still wins
    assert TrainConfig().schedule == "cosine" and TrainConfig().weight_decay == 1e-4  # restored after the run


@pytest.mark.parametrize("argv, flag", [(PRUNE + ["--model", "vgg16_bn", "--image-size", "8"], "--image-size"),
                                        (["bench", "models", "--model", "vgg16_bn", "--size", "8"], "--size")])
def test_an_input_size_the_model_cannot_take_names_the_smallest_that_works(
        argv: list[str], flag: str, no_work: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "vgg16_bn" in line and "8x8" in line
    smallest = int(line.split(f"{flag} ")[-1].split()[0])
    model = sk.models.build("vgg16_bn").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, smallest, smallest)).shape == (1, 10)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, smallest - 1, smallest - 1))
    assert no_work == []


def test_bench_out_must_be_a_json_it_can_merge_into(tmp_path: Path, no_work: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    assert main(KERNELS + ["--out", str(out)]) == 2
    assert "notes.txt" in _one_error_line(capsys)
    assert out.read_text() == "my notes" and no_work == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_kernels_on_cuda_without_a_gpu_is_refused(no_work: list[str],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(KERNELS + ["--device", "cuda"]) == 2
    assert "--device cuda" in _one_error_line(capsys) and no_work == []


# ------------------------------------------------------------------------- the output folder

def test_prune_creates_a_new_out_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "run"
    assert main(PRUNE + TINY + ["--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in report["arms"]] == ["fine-tune"]
    assert sk.load(out / "model.sk")(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_prune_sanp_writes_a_model_that_loads_into_the_compiled_per_sample_path(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """SANP through the CLI on the embedded digits (tiny epochs): report.json, and a model.sk that sk.load
    rebuilds (the SANP factory) into the guarded static model (per-sample layers as its fallback) giving the
    saved model's outputs."""
    saved: list[torch.nn.Module] = []
    real_save = sk.save
    monkeypatch.setattr(sk, "save", lambda obj, path, **kw: saved.append(obj) or real_save(obj, path, **kw))
    out = tmp_path / "sanp"
    argv = SANP + TINY + ["--search-epochs", "0.05", "--out", str(out)]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "sanp" and report["budget"] == 0.5 and report["compiled_vs_masked_max_error"] < 1e-4
    assert report["calibration"]["samples"] > 1000 and len(report["classes"]) == 9  # resnet20: 9 gated conv1
    assert set(report["plan"]["dynamic"]["layer1.0.conv1"]) >= {"never_on", "always_on"}
    loaded = sk.load(out / "model.sk")
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, GatedConv2d)}
    assert len(layers) == 18 and isinstance(loaded, GuardedModel)
    assert loaded.sk_plan.to_dict() == saved[0].sk_plan.to_dict()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), saved[0].eval()(x))


def test_an_out_folder_that_cannot_be_written_is_refused_before_training(
        tmp_path: Path, no_work: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for argv in (PRUNE + ["--out", str(blocker)], PRUNE + ["--out", str(blocker / "run")],
                 ["demo", "--out", str(blocker / "run")]):
        assert main(argv) == 2
        assert str(blocker) in _one_error_line(capsys)
    assert no_work == []


@pytest.mark.parametrize("command, outputs", [(PRUNE, ("report.json", "model.sk")),
                                              (["demo"], ("report.json", "model.sk", "plan.json"))])
def test_existing_outputs_are_not_replaced_without_overwrite(
        command: list[str], outputs: tuple[str, ...], tmp_path: Path, no_work: list[str],
        capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / outputs[0]).write_text("the user's file")
    assert main(command + ["--out", str(tmp_path)]) == 2
    line = _one_error_line(capsys)
    assert outputs[0] in line and "--overwrite" in line
    assert (tmp_path / outputs[0]).read_text() == "the user's file" and no_work == []
    assert main(command + ["--out", str(tmp_path), "--overwrite"]) == 1  # allowed: the (recorded) work starts
    assert len(no_work) == 1


def test_overwrite_replaces_the_outputs(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("old")
    assert main(PRUNE + TINY + ["--out", str(tmp_path), "--overwrite"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "l1_norm"


# ------------------------------------------------------------------------- errors and interruptions

def test_a_runtime_failure_is_one_line_with_exit_code_1_and_a_traceback_with_debug(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the disk is full\nsecond line")

    monkeypatch.setattr(rethinking, "run", fail)
    assert main(PRUNE + ["--out", str(tmp_path / "a")]) == 1
    line = _one_error_line(capsys)
    assert "RuntimeError: the disk is full second line" in line and "--debug" in line
    for argv in (["--debug"] + PRUNE + ["--out", str(tmp_path / "b")],
                 PRUNE + ["--out", str(tmp_path / "c"), "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "the disk is full" in err


def test_usage_errors_have_exit_code_2_and_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune"]) == 2  # --method missing (argparse's own check)
    assert "--method" in _one_error_line(capsys)
    assert main(["nonsense"]) == 2
    assert "nonsense" in _one_error_line(capsys)


# ------------------------------------------------------------------------- checkpoints and --resume

class _Interrupt:
    """Wraps ``owner.name``: counts calls and raises KeyboardInterrupt on call number ``at`` (1-based)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, at: int | None = None) -> None:
        self.calls, self.at, self.inner = 0, at, getattr(owner, name)
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return self.inner(*args, **kwargs)


def _same_report(a: dict[str, Any], b: dict[str, Any], timed: tuple[str, ...]) -> None:
    assert {k: v for k, v in a.items() if k not in timed} == {k: v for k, v in b.items() if k not in timed}


def test_an_interrupted_prune_resumes_after_its_last_completed_stage(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = PRUNE + TINY
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        trainer = _Interrupt(m, rethinking, "train", at=2)  # 1: the full model, 2: the fine-tune arm
        assert main(argv + ["--out", str(out)]) == 130
    err = capsys.readouterr().err.strip()
    assert "full, prune" in err and "--resume" in err and trainer.calls == 2
    assert not (out / "report.json").exists()

    assert main(argv + ["--out", str(out), "--budget", "0.4", "--resume"]) == 2  # other arguments: refused
    assert "--budget: checkpoint 0.5, now 0.4" in _one_error_line(capsys)
    assert main(argv + ["--out", str(out)]) == 2  # neither --resume nor --overwrite: refused
    assert "--resume" in _one_error_line(capsys)

    with monkeypatch.context() as m:
        trainer = _Interrupt(m, rethinking, "train")
        pruner = _Interrupt(m, rethinking, "prune_to_budget")
        assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert trainer.calls == 1 and pruner.calls == 0  # only the fine-tune arm ran again
    resumed = json.loads((out / "report.json").read_text())
    _same_report(resumed, whole, timed=("measured_speedup", "efficiency"))
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(sk.load(out / "model.sk")(x), sk.load(tmp_path / "whole" / "model.sk")(x))


def test_an_interrupted_sanp_run_resumes_after_the_dense_model(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = SANP + TINY + ["--search-epochs", "0.05"]
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _Interrupt(m, sanp, "train_sanp", at=1)  # right after the dense model's stage
        assert main(argv + ["--out", str(out)]) == 130
    assert "(full)" in capsys.readouterr().err and not (out / "model.sk").exists()
    with monkeypatch.context() as m:
        dense = _Interrupt(m, sanp, "train")
        gates = _Interrupt(m, sanp, "train_sanp")
        assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert gates.calls == 1 and dense.calls == 1  # the one training is train_sanp's: the dense model was resumed
    report = json.loads((out / "report.json").read_text())
    assert report["compiled_vs_masked_max_error"] < 1e-4 and report["plan"]["meta"]["weight"] == 8.0


def test_an_interrupted_flop_run_resumes_without_training_again(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = FLOP + ["--steps", "3", "--d-model", "16", "--layers", "1", "--eval-bytes", "512", "--no-progress"]
    assert main(argv + ["--out", str(tmp_path / "whole")]) == 0
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        _Interrupt(m, flop, "prune", at=1)  # right after the training stage
        assert main(argv + ["--out", str(out)]) == 130
    assert "(train)" in capsys.readouterr().err

    with monkeypatch.context() as m:
        trainer = _Interrupt(m, flop, "train_flop")
        assert main(argv + ["--out", str(out), "--resume"]) == 0
    assert trainer.calls == 0
    _same_report(json.loads((out / "report.json").read_text()), whole, timed=("train_s",))


def test_an_interruption_before_any_stage_says_nothing_was_saved(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _Interrupt(monkeypatch, rethinking, "train", at=1)
    assert main(PRUNE + TINY + ["--out", str(tmp_path)]) == 130
    assert "nothing was saved" in capsys.readouterr().err
