"""The papers' recipes: named JSON files that ``sparsekern prune --recipe NAME`` runs unchanged.

A recipe is data, never code: one JSON object per file beside this module (shipped as package data), read with
:func:`json.loads` and checked against the schema below before anything runs. docs/recipes.md lists them.

Rules:

* ``name`` equals the file name without ``.json``; ``paper`` (title, authors, year, venue, url) and ``code``
  (repo, follows) say where every value comes from; ``data`` is the paper's data set (``"cifar10"`` or
  ``"enwik8"``).
* ``settings`` holds the arguments of the prune pipeline, keyed by the ``sparsekern prune`` flag they set
  (``finetune_lr`` is ``--finetune-lr``); :data:`SETTINGS` is the schema. Image methods (registry kind
  ``"static"``, run through the Rethinking protocol, :mod:`sparsekern.methods.rethinking`) and the byte-level
  LM methods (kind ``"lowrank"``) read different keys; a key the recipe's method does not read is refused.
* A few settings are keywords of :func:`sparsekern.methods.rethinking.run` that ``sparsekern prune`` has no
  flag for yet (``Setting.flag`` false: ``finetune_schedule``, ``scratch_b_cap``, ``scratch_b_rounding``,
  ``method_options``). :meth:`Recipe.arguments` (the flags) leaves them out and :meth:`Recipe.run_options`
  returns them; ``sparsekern prune --recipe`` passes them to ``rethinking.run``, so the recipe runs unchanged.
  ``method_options`` are checked against the options the method declares
  (:func:`sparsekern.methods.rethinking.check_method_options`).
* ``shrunk`` replaces sizes (model, image size, width, ...) when the recipe runs scaled down (``scale < 1``,
  :meth:`Recipe.arguments`), where every epoch and step count is also multiplied by ``scale``; the shrunk run
  reads the embedded data (:data:`EMBEDDED`).
* ``implementation_defaults`` lists the paper's settings that the method's module holds as constants
  (e.g. TAS's ``DISTILL_ALPHA``); loading checks that each still has the recipe's value, so a changed
  implementation cannot silently depart from the recipe.
* ``not_supported`` lists every official setting the implementation cannot honour, each with the official
  value and the reason; the CLI prints them whenever the recipe runs.
* Unknown keys, wrong types and unknown methods or models raise :class:`RecipeError` naming the recipe, the
  key and the fix.
"""
from __future__ import annotations

import importlib
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

from sparsekern.training.config import SCHEDULES

__all__ = ["RecipeError", "Recipe", "Setting", "Unsupported", "SETTINGS", "EMBEDDED", "DATA_NAMES", "list_recipes",
           "load_recipe", "recipe_from_dict"]

#: the paper's data set -> the embedded data a shrunk run reads instead
EMBEDDED = {"cifar10": "digits", "enwik8": "pystdlib"}
#: how the CLI and the docs name each data set
DATA_NAMES = {"cifar10": "CIFAR-10", "enwik8": "enwik8"}
_DATA_FLAGS = {"cifar10": "--data cifar10:PATH (PATH: the cifar-10-batches-py folder of the python version)",
               "enwik8": "--data enwik8:PATH (PATH: the enwik8 file, or enwik8.zip)"}
_KIND_DATA = {"static": "cifar10", "lowrank": "enwik8"}
_TOP_KEYS = {"name": True, "summary": True, "paper": True, "code": True, "data": True, "settings": True,
             "shrunk": True, "implementation_defaults": False, "not_supported": True, "notes": False}
_PAPER_KEYS = {"title": str, "authors": str, "year": int, "venue": str, "url": str}
_CODE_KEYS = {"repo": str, "follows": str}
_UNSUPPORTED_KEYS = {"setting": str, "official": object, "reason": str}
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_CONSTANT = re.compile(r"^[A-Z][A-Z0-9_]*$")
#: integer step counts among the ``"time"`` settings (rounded when scaled)
_STEP_COUNTS = ("steps", "warmup_steps")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the recipe, the key and the fix."""


Check = Callable[[Any], "str | None"]


def _number(low: float | None = None, *, low_open: bool = False, high: float | None = None,
            integer: bool = False) -> Check:
    """A check for a JSON number (an integer if ``integer``) in the given range; returns the problem or None."""
    want = "an integer" if integer else "a number"
    rng = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
    rng += "" if high is None else f"{' and' if rng else ''} <= {high:g}"

    def check(value: Any) -> str | None:
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value):
            return f"expected {want}{rng}, got {value!r}"
        if low is not None and (value <= low if low_open else value < low) or high is not None and value > high:
            return f"expected {want}{rng}, got {value!r}"
        return None

    return check


def _choice(*options: str) -> Check:
    def check(value: Any) -> str | None:
        return None if value in options else f"expected one of {list(options)}, got {value!r}"

    return check


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"expected true or false, got {value!r}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) and value else f"expected a non-empty string, got {value!r}"


def _options(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        return f"expected an object of option name -> value, got {value!r}"
    return None


def _milestones(value: Any) -> str | None:
    fraction = _number(0.0, high=1.0)
    if not isinstance(value, list) or any(fraction(v) for v in value) or value != sorted(value):
        return f"expected a sorted list of fractions of the run in [0, 1], got {value!r}"
    return None


@dataclass(frozen=True)
class Setting:
    """One key of a recipe's ``settings``: which methods read it (``"image"``, ``"lm"`` or ``"both"``), its
    check, its role when the recipe is shrunk (``"time"``: multiplied by the scale, ``"size"``: may be
    replaced by ``shrunk``), and whether ``sparsekern prune`` has a flag for it (``flag``; if not, it is a
    :func:`sparsekern.methods.rethinking.run` keyword only, module docstring)."""

    reads: str
    check: Check
    role: str = ""
    help: str = ""
    flag: bool = True


#: the keys of ``settings`` (the ``sparsekern prune`` flags they set, ``_`` for ``-``)
SETTINGS: dict[str, Setting] = {
    "method": Setting("both", _text, help="registered method (sparsekern.methods.registry)"),
    "model": Setting("both", _text, "size", "zoo model"),
    "budget": Setting("image", _number(0.0, low_open=True, high=1.0), help="fraction of FLOPs kept"),
    "protocol": Setting("image", _choice("rethinking"), help="train fine-tune, Scratch-E and Scratch-B"),
    "image_size": Setting("image", _number(1, integer=True), "size"),
    "epochs": Setting("image", _number(0.0, low_open=True), "time", "full model and Scratch-E"),
    "finetune_epochs": Setting("image", _number(0.0, low_open=True), "time"),
    "search_epochs": Setting("image", _number(0.0, low_open=True), "time", "the learned methods' search"),
    "finetune_lr": Setting("image", _number(0.0, low_open=True)),
    "finetune_schedule": Setting("image", _choice("constant", "step", "cosine"), flag=False,
                                 help="the fine-tune arm's lr schedule (the paper: constant)"),
    "scratch_b_cap": Setting("image", _number(1.0), flag=False,
                             help="cap on Scratch-B's FLOPs factor (the paper: 2 on ImageNet, none on CIFAR)"),
    "scratch_b_rounding": Setting("image", _choice("floor", "exact"), flag=False,
                                  help="Scratch-B epochs rounded down to whole epochs (the official code) or not"),
    "method_options": Setting("image", _options, flag=False,
                              help="options of the method's prune step (the method's prune_options)"),
    "momentum": Setting("image", _number(0.0, high=1.0)),
    "nesterov": Setting("image", _boolean),
    "milestones": Setting("image", _milestones, help="lr steps, as fractions of each run"),
    "gamma": Setting("image", _number(0.0, low_open=True, high=1.0), help="lr factor at each milestone"),
    "slimming_penalty": Setting("image", _number(0.0, low_open=True), help="Network Slimming's s"),
    "lr": Setting("both", _number(0.0, low_open=True)),
    "batch_size": Setting("both", _number(1, integer=True), "size"),
    "weight_decay": Setting("both", _number(0.0)),
    "schedule": Setting("both", _choice(*SCHEDULES)),
    "warmup_steps": Setting("both", _number(0, integer=True), "time"),
    "target": Setting("lm", _number(0.0, high=1.0), help="target sparsity"),
    "steps": Setting("lm", _number(1, integer=True), "time"),
    "d_model": Setting("lm", _number(1, integer=True), "size"),
    "layers": Setting("lm", _number(1, integer=True), "size"),
    "seq_len": Setting("lm", _number(1, integer=True), "size", "training window (the official unroll)"),
    "dropout": Setting("lm", _number(0.0, high=1.0)),
    "grad_clip": Setting("lm", _number(0.0, low_open=True)),
    "n_proj": Setting("lm", _number(1, integer=True), "size", "FLOP: the SRU's projection size (the factors' rank)"),
    "lambda_optimizer": Setting("lm", _choice("trainer", "adam"), help="how FLOP's Lagrange multipliers are updated"),
    "eval_bytes": Setting("lm", _number(1, integer=True), "size"),
}


@dataclass(frozen=True)
class Unsupported:
    """An official setting the implementation cannot honour: its name, the official value, why."""

    setting: str
    official: Any
    reason: str

    def line(self) -> str:
        return f"{self.setting} = {json.dumps(self.official)}: {self.reason}"


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (module docstring); build with :func:`load_recipe` or :func:`recipe_from_dict`."""

    name: str
    summary: str
    paper: Mapping[str, Any]
    code: Mapping[str, str]
    data: str
    settings: Mapping[str, Any]
    shrunk: Mapping[str, Any]
    implementation_defaults: Mapping[str, Any]
    not_supported: tuple[Unsupported, ...]
    notes: tuple[str, ...]
    source: str

    @property
    def method(self) -> str:
        return self.settings["method"]

    @property
    def embedded_data(self) -> str:
        """The embedded data a shrunk run reads (:data:`EMBEDDED`)."""
        return EMBEDDED[self.data]

    @property
    def data_flag(self) -> str:
        """The ``--data`` form the full-scale run needs, with what PATH is."""
        return _DATA_FLAGS[self.data]

    @property
    def citation(self) -> str:
        """``"Liu et al., ICLR 2019"``."""
        last = [a.strip().split()[-1] for a in self.paper["authors"].split(",")]
        who = last[0] if len(last) == 1 else " & ".join(last) if len(last) == 2 else f"{last[0]} et al."
        return f"{who}, {self.paper['venue']} {self.paper['year']}"

    def arguments(self, scale: float = 1.0) -> dict[str, Any]:
        """The prune pipeline's arguments (``sparsekern prune`` flag -> value) at ``scale`` in (0, 1]; the
        settings without a flag are :meth:`run_options`.

        At ``scale < 1`` every ``"time"`` setting (epochs, steps, warm-up) is multiplied by ``scale`` (integer
        step counts rounded, at least 1 for ``steps``) and the ``shrunk`` values replace the sizes.
        """
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"scale must be in (0, 1], got {scale}")
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in self.settings.items() if SETTINGS[k].flag}
        if scale == 1.0:
            return args
        for key, value in list(args.items()):
            if SETTINGS[key].role == "time" and key in _STEP_COUNTS:
                args[key] = max(1 if key == "steps" else 0, round(value * scale))
            elif SETTINGS[key].role == "time":
                args[key] = float(value) * scale
        args.update(self.shrunk)
        return args


    def run_options(self) -> dict[str, Any]:
        """The settings ``sparsekern prune`` has no flag for, as :func:`sparsekern.methods.rethinking.run`
        keywords (``finetune_schedule``, ``scratch_b_cap``, ``scratch_b_rounding``, ``method_options``), which
        ``sparsekern prune --recipe`` passes on; no scale changes them."""
        return {k: dict(v) if isinstance(v, dict) else v for k, v in self.settings.items() if not SETTINGS[k].flag}


def _err(recipe: str, key: str, problem: str, fix: str) -> RecipeError:
    return RecipeError(f"recipe {recipe!r}: {key}: {problem}; {fix}")


def _table(doc: Any, recipe: str, key: str, spec: Mapping[str, Any], *, required: bool = True) -> dict[str, Any]:
    """``doc`` as an object whose keys are those of ``spec`` (all of them when ``required``), typed as ``spec``."""
    if not isinstance(doc, dict):
        raise _err(recipe, key, f"expected an object, got {type(doc).__name__}", "see docs/recipes.md")
    def path(k: str) -> str:
        return f"{key}.{k}" if key else k

    unknown = sorted(set(doc) - set(spec))
    if unknown:
        raise _err(recipe, path(unknown[0]), "unknown key", f"use one of {sorted(spec)}")
    missing = sorted(k for k, v in spec.items() if k not in doc and (v if isinstance(v, bool) else required))
    if missing:
        raise _err(recipe, path(missing[0]), "missing", "add it (see docs/recipes.md)")
    for k, kind in spec.items():
        if isinstance(kind, type) and kind is not object and k in doc:
            if not isinstance(doc[k], kind) or isinstance(doc[k], bool):
                raise _err(recipe, path(k), f"expected {kind.__name__}, got {doc[k]!r}", "fix the value")
    return doc


def _method_kind(recipe: str, method: Any) -> str:
    """The registry kind of ``method``; RecipeError naming the methods ``sparsekern prune`` runs otherwise."""
    from sparsekern.cli_checks import prune_methods
    from sparsekern.methods.registry import get_method

    if method not in prune_methods():
        raise _err(recipe, "settings.method", f"unknown method {method!r}",
                   f"use a registered method: {', '.join(prune_methods())}")
    return get_method(method).kind


def _check_settings(recipe: str, key: str, settings: Any, kind: str, *, method: str) -> None:
    """Every key known, read by ``method``'s kind, and of the right type and range."""
    from sparsekern.cli_checks import LM_MODELS, image_models

    reads = "image" if kind == "static" else "lm"
    for k, value in _table(settings, recipe, key, {k: object for k in SETTINGS}, required=False).items():
        spec = SETTINGS[k]
        if spec.reads not in (reads, "both"):
            raise _err(recipe, f"{key}.{k}", f"not read by {method} (a {kind} method)",
                       "drop it, or list the official value in not_supported")
        problem = spec.check(value)
        if problem:
            raise _err(recipe, f"{key}.{k}", problem, "fix the value")
    if "slimming_penalty" in settings and method != "slimming":
        raise _err(recipe, f"{key}.slimming_penalty", f"only Network Slimming reads it, not {method}", "drop it")
    if "method_options" in settings:
        from sparsekern.methods.rethinking import check_method_options

        try:
            check_method_options(method, settings["method_options"])
        except ValueError as e:
            raise _err(recipe, f"{key}.method_options", str(e), "drop it, or list the official value in "
                                                                  "not_supported") from None
    models = image_models() if kind == "static" else list(LM_MODELS)
    if "model" in settings and settings["model"] not in models:
        raise _err(recipe, f"{key}.model", f"{settings['model']!r} is not a model {method} can prune",
                   f"use one of {', '.join(models)}")


def _check_implementation(recipe: str, method: str, defaults: Any) -> None:
    """Each ``implementation_defaults`` entry is a public constant of the method's module with that value."""
    from sparsekern.methods.registry import get_method

    if not isinstance(defaults, dict):
        raise _err(recipe, "implementation_defaults", f"expected an object, got {type(defaults).__name__}",
                   "map constant names of the method's module to their values")
    module = importlib.import_module(type(get_method(method)).__module__)
    for name, value in defaults.items():
        if not _CONSTANT.match(name) or not hasattr(module, name):
            raise _err(recipe, f"implementation_defaults.{name}", f"{module.__name__} has no public {name}",
                       "name a public constant (UPPER_CASE) of the method's module")
        actual = getattr(module, name)
        if not _same(actual, value):
            raise _err(recipe, f"implementation_defaults.{name}",
                       f"the recipe says {value!r} but {module.__name__}.{name} is {actual!r}",
                       "the implementation changed: update the recipe, or move the setting to not_supported")


def _same(actual: Any, expected: Any) -> bool:
    """``actual`` (a module constant) equals the JSON value ``expected``: sequences element by element, numbers to
    float precision."""
    if isinstance(actual, (tuple, list)) and isinstance(expected, list):
        return len(actual) == len(expected) and all(_same(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)) and not isinstance(expected, bool):
        return math.isclose(float(actual), float(expected), rel_tol=1e-12)
    return actual == expected


def _unsupported(recipe: str, entries: Any) -> tuple[Unsupported, ...]:
    if not isinstance(entries, list):
        raise _err(recipe, "not_supported", f"expected a list, got {type(entries).__name__}",
                   "list {setting, official, reason} objects (an empty list if everything is honoured)")
    out = []
    for i, entry in enumerate(entries):
        _table(entry, recipe, f"not_supported[{i}]", _UNSUPPORTED_KEYS)
        for k in ("setting", "reason"):
            if not entry[k].strip():
                raise _err(recipe, f"not_supported[{i}].{k}", "empty", "say which setting and why")
        out.append(Unsupported(entry["setting"], entry["official"], entry["reason"]))
    return tuple(out)


def recipe_from_dict(doc: Any, name: str, source: str = "<dict>") -> Recipe:
    """Validate a parsed recipe ``doc`` (module docstring) named ``name``; :class:`RecipeError` otherwise."""
    _table(doc, name, "", _TOP_KEYS)
    for key in ("name", "summary"):
        if _text(doc[key]):
            raise _err(name, key, _text(doc[key]), "fix the value")
    if doc["data"] not in EMBEDDED:
        raise _err(name, "data", f"unknown data set {doc['data']!r}", f"use one of {sorted(EMBEDDED)}")
    if doc["name"] != name:
        raise _err(name, "name", f"is {doc['name']!r}", f"a recipe's name must be its file name, {name!r}")
    _table(doc["paper"], name, "paper", _PAPER_KEYS)
    _table(doc["code"], name, "code", _CODE_KEYS)
    settings = doc["settings"]
    if not isinstance(settings, dict) or "method" not in settings or "model" not in settings:
        raise _err(name, "settings", "needs at least method and model", "add them (see docs/recipes.md)")
    kind = _method_kind(name, settings["method"])
    if doc["data"] != _KIND_DATA[kind]:
        raise _err(name, "data", f"{doc['data']!r} is not the data {settings['method']} trains on",
                   f"use {_KIND_DATA[kind]!r}")
    _check_settings(name, "settings", settings, kind, method=settings["method"])
    _check_settings(name, "shrunk", doc["shrunk"], kind, method=settings["method"])
    not_size = sorted(k for k in doc["shrunk"] if SETTINGS[k].role != "size")
    if not_size:
        raise _err(name, f"shrunk.{not_size[0]}", "only sizes can be shrunk (epochs and steps follow --scale)",
                   f"use one of {sorted(k for k, s in SETTINGS.items() if s.role == 'size')}")
    _check_implementation(name, settings["method"], doc.get("implementation_defaults", {}))
    notes = doc.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise _err(name, "notes", "expected a list of strings", "fix the value")
    return Recipe(name=name, summary=doc["summary"], paper=dict(doc["paper"]), code=dict(doc["code"]),
                  data=doc["data"], settings=dict(settings), shrunk=dict(doc["shrunk"]),
                  implementation_defaults=dict(doc.get("implementation_defaults", {})),
                  not_supported=_unsupported(name, doc["not_supported"]),
                  notes=tuple(notes), source=source)


def _files() -> dict[str, Any]:
    """Recipe name -> its file among this package's data."""
    return {f.name[: -len(".json")]: f for f in resources.files(__name__).iterdir() if f.name.endswith(".json")}


def list_recipes() -> list[str]:
    """The names of the shipped recipes, sorted."""
    return sorted(_files())


def load_recipe(name: str) -> Recipe:
    """The shipped recipe ``name``, or the recipe in the JSON file at path ``name`` (``*.json``), validated.

    Reading a recipe parses JSON and nothing else; :class:`RecipeError` names the problem and the fix.
    """
    if name.endswith(".json"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise RecipeError(f"recipe file {name!r} does not exist; give the path of a recipe JSON, or the name "
                              f"of a shipped recipe: {', '.join(list_recipes())}")
        stem, text, source = path.name[: -len(".json")], _read(path, name), str(path)
    else:
        files = _files()
        if not _NAME.match(name) or name not in files:
            raise RecipeError(f"unknown recipe {name!r}; shipped recipes: {', '.join(sorted(files))}")
        stem, text, source = name, _read(files[name], name), f"sparsekern/recipes/{name}.json"
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"recipe {stem!r} ({source}) is not valid JSON: {e}") from None
    return recipe_from_dict(doc, stem, source)


def _read(file: Any, name: str) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"recipe {name!r} cannot be read: {e}") from None
