"""The papers' recipes (sparsekern/recipes/, docs/recipes.md): every shipped recipe validates and runs shrunk end
to end on the embedded data; its settings reach the trainers; bad recipes are refused with the key named; flags
given on the command line override the recipe's values."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sparsekern.cli import main
from sparsekern.methods import flop, rethinking
from sparsekern.recipes import EMBEDDED, RecipeError, list_recipes, load_recipe, recipe_from_dict
from sparsekern.train import TrainConfig
from tests.conftest import training_backend

#: the papers the issue asks a recipe for, by the method each one runs
PAPERS = {"rethinking-l1_norm": "l1_norm", "rethinking-thinet": "thinet", "rethinking-lasso": "lasso",
          "rethinking-slimming": "slimming", "network-slimming-vgg19": "slimming", "tas-resnet56": "tas",
          "pruning-from-scratch-resnet56": "scratch", "anp-vs-vgg16": "anp", "flop-sru-enwik8": "flop"}
#: shrinks every recipe to a few optimizer steps on the embedded data
SCALE = "0.0005"
QUICK = ["--scale", SCALE, "--no-progress"]


# ------------------------------------------------------------------------------------------------ shipped recipes

def test_the_papers_recipes_are_shipped() -> None:
    assert set(PAPERS) <= set(list_recipes())
    assert {load_recipe(name).method for name in PAPERS} == set(PAPERS.values())


@pytest.mark.parametrize("name", list_recipes())
def test_every_shipped_recipe_loads_and_validates(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.data in EMBEDDED
    assert all(recipe.paper[k] for k in ("title", "authors", "year", "venue", "url"))
    assert recipe.code["repo"].startswith("https://github.com/") and recipe.code["follows"]
    assert all(u.setting and u.reason for u in recipe.not_supported)
    full, shrunk = recipe.arguments(1.0), recipe.arguments(0.01)
    assert full["method"] == shrunk["method"] == recipe.method
    for key in ("epochs", "search_epochs", "finetune_epochs"):
        if key in full:
            assert shrunk[key] == pytest.approx(full[key] * 0.01)
    assert all(shrunk[k] == v for k, v in recipe.shrunk.items())


def test_the_package_data_ships_the_recipes() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "sparsekern.recipes" in project["packages"]
    assert project["package-data"]["sparsekern.recipes"] == ["*.json"]


def test_the_rethinking_recipe_holds_the_papers_schedule() -> None:
    args = load_recipe("rethinking-l1_norm").arguments()
    assert (args["epochs"], args["batch_size"], args["lr"], args["weight_decay"]) == (160, 64, 0.1, 1e-4)
    assert (args["schedule"], args["milestones"], args["gamma"]) == ("step", (0.5, 0.75), 0.1)
    assert (args["finetune_epochs"], args["finetune_lr"], args["protocol"]) == (40, 0.001, "rethinking")


@pytest.mark.parametrize("name", ["rethinking-l1_norm", "rethinking-slimming", "rethinking-thinet", "rethinking-lasso"])
def test_the_rethinking_recipes_ask_for_the_official_finetune_and_scratch_b(name: str) -> None:
    """Constant fine-tune lr and whole Scratch-B epochs (main_finetune.py, main_B.py) are run options, and the
    run's defaults, so nothing about them is listed as not honoured; CIFAR runs leave Scratch-B uncapped."""
    recipe = load_recipe(name)
    assert recipe.run_options() == {"finetune_schedule": "constant", "scratch_b_rounding": "floor"}
    assert not set(recipe.run_options()) & set(recipe.arguments())  # not sparsekern prune flags (yet)
    defaults = {k: rethinking.run.__kwdefaults__[k] for k in rethinking.RUN_OPTION_DEFAULTS}
    assert defaults == rethinking.RUN_OPTION_DEFAULTS  # what the loader compares a recipe's run options with
    assert {k: defaults[k] for k in recipe.run_options()} == recipe.run_options() and defaults["scratch_b_cap"] is None
    assert not [u for u in recipe.not_supported if "Scratch-B" in u.setting or "finetune" in u.setting]


def test_the_command_line_passes_a_recipes_run_options_to_the_runner(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """Network Slimming refines with its training schedule (a run option, no flag): sparsekern prune --recipe
    hands it to rethinking.run, so nothing is listed as not honoured on the command line."""
    recipe = load_recipe("network-slimming-vgg19")
    assert recipe.run_options() == {"finetune_schedule": "step"} and "finetune_schedule" not in recipe.arguments()
    assert not any("command line" in u.setting for r in list_recipes() for u in load_recipe(r).not_supported)
    seen = {}

    def fake_run(method, data, **kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before training; the CLI reports an interrupted run

    monkeypatch.setattr(rethinking, "run", fake_run)
    assert main(["prune", "--recipe", "network-slimming-vgg19", "--scale", "0.01", "--out", str(tmp_path / "run"),
                 "--no-progress"]) != 0
    assert seen["finetune_schedule"] == "step"


def test_the_anp_recipe_builds_the_papers_two_fc_vgg16() -> None:
    assert not any("classifier" in u.setting for u in load_recipe("anp-vs-vgg16").not_supported)
    from sparsekern.methods.registry import get_method

    assert get_method("anp").model_kwargs["vgg16_bn"] == {"classifier": "two_fc"}  # what rethinking.base_model reads


def test_a_recipes_method_option_the_method_does_not_declare_is_refused_naming_both() -> None:
    doc = _mutated(lambda d: d["settings"].update(method_options={"search_batch_size": 256}), "tas-resnet56")
    with pytest.raises(RecipeError, match="recipe 'tas-resnet56': settings.method_options: method 'tas' has no prune "
                                          "option 'search_batch_size'"):
        recipe_from_dict(doc, "tas-resnet56")


# ------------------------------------------------------------------------------------------------ end to end, shrunk

def _run_shrunk(name: str, out: Path, *extra: str) -> dict[str, Any]:
    timing = ["--repeats", "1"] if load_recipe(name).data == "cifar10" else []  # the image runs time a speedup
    with training_backend():
        assert main(["prune", "--recipe", name, "--out", str(out), *QUICK, *timing, *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "anp-vs-vgg16" else n
                                  for n in list_recipes()])
def test_each_recipe_runs_shrunk_on_the_embedded_data(name: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    recipe = load_recipe(name)
    report = _run_shrunk(name, tmp_path)
    printed = capsys.readouterr().out
    assert f"recipe {name}:" in printed
    for unsupported in recipe.not_supported:  # shown to the user, never dropped
        assert unsupported.line() in printed
    assert report["recipe"]["name"] == name and report["recipe"]["scale"] == float(SCALE)
    assert report["recipe"]["data"] == recipe.embedded_data
    assert len(report["recipe"]["not_supported"]) == len(recipe.not_supported)
    assert (tmp_path / "model.sk").exists()


class _Recorder:
    """Wraps ``owner.name`` so every call's arguments are kept, then calls the real function."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        real = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def test_a_recipes_training_settings_reach_the_trainer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    trainer = _Recorder(monkeypatch, rethinking, "train")
    _run_shrunk("rethinking-l1_norm", tmp_path)
    configs = [args[2] for args, _ in trainer.calls]  # train(model, data, config, hooks=...)
    assert len(configs) == 4  # full model, fine-tune, Scratch-E, Scratch-B
    for config in configs:
        assert (config.milestones, config.gamma) == ((0.5, 0.75), 0.1)
        assert (config.momentum, config.weight_decay, config.batch_size) == (0.9, 1e-4, 64)
    full, finetune, scratch_e, scratch_b = configs
    assert full.schedule == scratch_e.schedule == scratch_b.schedule == "step"
    assert finetune.schedule == "constant"  # the paper's fine-tune: constant lr 0.001, not the full model's steps
    assert full.epochs == scratch_e.epochs == pytest.approx(160 * float(SCALE)) and full.lr == 0.1
    assert finetune.epochs == pytest.approx(40 * float(SCALE)) and finetune.lr == 0.001
    assert TrainConfig().schedule == "cosine"  # the recipe's defaults ended with the run


def test_the_tas_recipe_trains_the_teacher_with_its_base_schedule(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    trainer = _Recorder(monkeypatch, rethinking, "train")
    _run_shrunk("tas-resnet56", tmp_path, "--search-epochs", "0.05")  # the search is not what this test checks
    full = trainer.calls[0][0][2]
    assert (full.schedule, full.nesterov, full.weight_decay, full.lr) == ("cosine", True, 5e-4, 0.1)
    assert full.epochs == pytest.approx(300 * float(SCALE))
    assert json.loads((tmp_path / "report.json").read_text())["budget"] == 0.47


def test_the_flop_recipe_reaches_the_lm_pipeline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    run_lm = _Recorder(monkeypatch, flop, "run_lm")
    _run_shrunk("flop-sru-enwik8", tmp_path)
    (model_name, _, config), kwargs = run_lm.calls[0]
    assert model_name == "sru_lm" and kwargs["seq_len"] == 32 and kwargs["target"] == 0.7
    assert kwargs["lambda_optimizer"] == "adam"  # the official multipliers' optimiser, --lambda-optimizer
    assert kwargs["model_kwargs"] == {"d_model": 32, "layers": 2, "dropout": 0.1}
    assert (config.batch_size, config.grad_clip, config.lr, config.schedule) == (8, 0.3, 0.003, "noam")
    assert kwargs["n_proj"] == 8  # the shrunk projection (512 at full scale)
    assert config.max_steps == round(100000 * float(SCALE)) and config.warmup_steps == round(5000 * float(SCALE))


def test_flags_given_on_the_command_line_override_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    trainer = _Recorder(monkeypatch, rethinking, "train")
    report = _run_shrunk("rethinking-l1_norm", tmp_path, "--epochs", "0.05", "--lr", "0.05", "--milestones", "0.3",
                         "0.6", "--finetune-lr", "0.002")
    full, finetune = trainer.calls[0][0][2], trainer.calls[1][0][2]
    assert (full.epochs, full.lr, full.milestones) == (0.05, 0.05, (0.3, 0.6))
    assert finetune.lr == 0.002 and full.batch_size == 64  # the recipe's value where no flag was given
    assert report["recipe"]["overrides"]["epochs"] == {"given": 0.05, "recipe": pytest.approx(160 * float(SCALE))}
    assert "--lr 0.05 given on the command line (the recipe's: 0.1)" in capsys.readouterr().out


def test_the_help_says_flags_override_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["prune", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--recipe" in text and "--list-recipes" in text and "--scale" in text
    assert "override the recipe's values" in text


def test_list_recipes_names_each_with_its_paper_and_data(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--list-recipes"]) == 0
    out = capsys.readouterr().out
    for name in list_recipes():
        recipe = load_recipe(name)
        line = next(l for l in out.splitlines() if l.startswith(name + " "))
        assert recipe.paper["url"] in line and recipe.citation in line and recipe.method in line
    assert "CIFAR-10" in out and "enwik8" in out


# ------------------------------------------------------------------------------------------------ refused

def _recipe_dir(name: str) -> Path:
    return Path(__file__).parents[1] / "sparsekern" / "recipes" / f"{name}.json"


def _mutated(change: Any, name: str = "rethinking-l1_norm") -> dict[str, Any]:
    doc = json.loads(_recipe_dir(name).read_text())
    change(doc)
    return doc


@pytest.mark.parametrize("change, key", [
    (lambda d: d.update(extra=1), "extra"),
    (lambda d: d["settings"].update(epoch=160), "settings.epoch"),
    (lambda d: d["settings"].update(epochs="160"), "settings.epochs"),
    (lambda d: d["settings"].update(epochs=0), "settings.epochs"),
    (lambda d: d["settings"].update(batch_size=64.5), "settings.batch_size"),
    (lambda d: d["settings"].update(batch_size=True), "settings.batch_size"),
    (lambda d: d["settings"].update(method="l2_norm"), "settings.method"),
    (lambda d: d["settings"].update(model="resnet99"), "settings.model"),
    (lambda d: d["settings"].update(steps=600), "settings.steps"),  # an LM setting on an image method
    (lambda d: d["settings"].update(slimming_penalty=1e-4), "settings.slimming_penalty"),
    (lambda d: d["settings"].update(milestones=[0.75, 0.5]), "settings.milestones"),
    (lambda d: d["settings"].update(schedule="linear"), "settings.schedule"),
    (lambda d: d["settings"].update(finetune_schedule="noam"), "settings.finetune_schedule"),
    (lambda d: d["settings"].update(scratch_b_cap=0.5), "settings.scratch_b_cap"),
    (lambda d: d["settings"].update(scratch_b_rounding="round"), "settings.scratch_b_rounding"),
    (lambda d: d["settings"].update(method_options=[256]), "settings.method_options"),
    (lambda d: d["settings"].update(method_options={"batch_size": 256}), "settings.method_options"),
    (lambda d: d["shrunk"].update(epochs=1), "shrunk.epochs"),
    (lambda d: d["paper"].pop("year"), "paper.year"),
    (lambda d: d["paper"].update(year="2019"), "paper.year"),
    (lambda d: d.update(name="other"), "name"),
    (lambda d: d.update(data="imagenet"), "data"),
    (lambda d: d["not_supported"].insert(0, {"setting": "x", "official": 1}), "not_supported[0].reason"),
    (lambda d: d.update(implementation_defaults={"prune": 1}), "implementation_defaults.prune"),
    (lambda d: d.update(implementation_defaults={"NOT_A_CONSTANT": 1}), "implementation_defaults.NOT_A_CONSTANT"),
])
def test_a_bad_recipe_is_refused_naming_the_key(change: Any, key: str) -> None:
    with pytest.raises(RecipeError, match=r"recipe 'rethinking-l1_norm': " + key.replace("[", r"\[").replace(
            "]", r"\]") + ":"):
        recipe_from_dict(_mutated(change), "rethinking-l1_norm")


def test_a_recipe_whose_implementation_changed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekern.methods import tas

    monkeypatch.setattr(tas, "DISTILL_ALPHA", 0.5)
    with pytest.raises(RecipeError, match="implementation_defaults.DISTILL_ALPHA: the recipe says 0.9 but"):
        load_recipe("tas-resnet56")


def test_a_flop_recipe_refuses_image_settings() -> None:
    doc = _mutated(lambda d: d["settings"].update(budget=0.5), "flop-sru-enwik8")
    with pytest.raises(RecipeError, match="settings.budget: not read by flop"):
        recipe_from_dict(doc, "flop-sru-enwik8")


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
             tmp_path: Path) -> str:
    """Run ``argv`` with the pipelines replaced by a failure: it must exit 2 with one line, before any work."""
    def no_work(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the run started")

    monkeypatch.setattr(rethinking, "run", no_work)
    monkeypatch.setattr(flop, "run_lm", no_work)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsekern: error: ")
    return err[0]


@pytest.mark.parametrize("argv, named", [
    (["prune", "--recipe", "rethinking-l1_norm"], "--data cifar10:PATH"),
    (["prune", "--recipe", "flop-sru-enwik8"], "--data enwik8:PATH"),
    (["prune", "--recipe", "no-such-recipe", "--scale", "0.1"], "rethinking-l1_norm"),
    (["prune", "--recipe", "../pyproject", "--scale", "0.1"], "unknown recipe"),
    (["prune", "--recipe", "tas-resnet56", "--method", "l1_norm", "--scale", "0.1"], "--method l1_norm"),
    (["prune", "--recipe", "tas-resnet56", "--scale", "0"], "--scale"),
    (["prune", "--recipe", "tas-resnet56", "--scale", "1.5"], "--scale"),
    (["prune", "--recipe", "flop-sru-enwik8", "--scale", "0.1", "--budget", "0.5"], "--budget"),
    (["prune", "--method", "l1_norm", "--scale", "0.1"], "--recipe"),
    (["prune"], "--method"),
    (["prune", "--method", "l1_norm", "--slimming-penalty", "1e-4"], "--slimming-penalty"),
    (["prune", "--method", "l1_norm", "--milestones", "0.8", "0.2"], "--milestones"),
    (["prune", "--method", "l1_norm", "--seq-len", "64"], "--seq-len"),
    (["prune", "--method", "flop", "--finetune-lr", "0.1"], "--finetune-lr"),
])
def test_bad_recipe_command_lines_are_refused_before_any_work(argv: list[str], named: str,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert named in _refused(argv, capsys, monkeypatch, tmp_path)


def test_a_recipe_file_with_a_bad_key_is_refused_naming_it(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    doc = _mutated(lambda d: d["settings"].update(learning_rate=0.1))
    path = tmp_path / "rethinking-l1_norm.json"
    path.write_text(json.dumps(doc))
    line = _refused(["prune", "--recipe", str(path), "--scale", "0.1"], capsys, monkeypatch, tmp_path)
    assert "settings.learning_rate: unknown key" in line and "'lr'" in line


def test_a_recipe_is_data_loading_it_runs_no_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _mutated(lambda d: d["settings"].update(model="__import__('os').system('touch pwned')"))
    path = tmp_path / "rethinking-l1_norm.json"
    path.write_text(json.dumps(doc))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError, match="settings.model"):
        load_recipe(str(path))
    assert not (tmp_path / "pwned").exists()


def test_a_recipe_copy_with_a_valid_change_loads_from_a_path(tmp_path: Path) -> None:
    doc = _mutated(lambda d: d["settings"].update(epochs=20))
    path = tmp_path / "rethinking-l1_norm.json"
    path.write_text(json.dumps(doc))
    recipe = load_recipe(str(path))
    assert recipe.arguments()["epochs"] == 20 and recipe.source == str(path)


def test_train_defaults_apply_inside_the_block_only_and_explicit_arguments_win() -> None:
    from sparsekern.training.config import train_defaults

    with train_defaults(schedule="step", milestones=(0.3, 0.6)):
        with train_defaults(milestones=(0.2,), weight_decay=5e-4):  # nested blocks merge, the inner one wins
            inner = TrainConfig()
        outer, explicit = TrainConfig(), TrainConfig(schedule="constant", milestones=(0.5,))
    assert (inner.schedule, inner.milestones, inner.weight_decay) == ("step", (0.2,), 5e-4)
    assert (outer.schedule, outer.milestones, outer.weight_decay) == ("step", (0.3, 0.6), 1e-4)
    assert (explicit.schedule, explicit.milestones) == ("constant", (0.5,))
    assert (TrainConfig().schedule, TrainConfig().milestones) == ("cosine", (0.5, 0.75))
    with pytest.raises(ValueError, match="lr"):
        with train_defaults(lr=0.5):  # not a defaultable field: recipes pass lr to the pipeline itself
            pass
