"""Checks that reject a bad ``sparsekern`` command line before any work is done.

Rules:

* Every check raises :class:`UsageError` (the CLI exits with code 2) whose message names the flag, the value
  it got and what would be accepted; none of them trains, loads a data set or writes a result.
* Numeric flags are checked by their argparse ``type`` (:func:`number`), so argparse reports them by name.
* :func:`check_image_model` runs the model once on one random sample of the requested size, so a size the
  architecture cannot take fails here rather than after training.
* :func:`prepare_out` creates the output folder, proves it writable, and refuses to replace files that are
  already there unless the user passed ``--overwrite`` (or ``--resume`` with checkpoints to resume from).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["UsageError", "number", "check_data_spec", "check_image_model", "check_lm", "prepare_out",
           "check_json_out", "check_file_out", "LM_MODELS", "PRUNE_KINDS", "image_models", "prune_methods",
           "search_methods"]

#: zoo models that take (B, T) bytes rather than images
LM_MODELS = ("transformer_lm", "sru_lm")
#: kinds of registered method that ``sparsekern prune`` runs: ``"static"`` through the Rethinking protocol on
#: images, ``"dynamic"`` through the method's image pipeline (its ``run_images``), ``"lowrank"`` through the
#: method's byte-level LM pipeline (its ``run_lm``)
PRUNE_KINDS = ("static", "dynamic", "lowrank")


class UsageError(Exception):
    """A command line that cannot work; the message says which flag, its value and the fix."""


def number(kind: type, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, what: str = "") -> Callable[[str], Any]:
    """An argparse ``type`` parsing ``kind`` (int or float) within ``[low, high]`` (``*_open``: excluded).

    NaN and infinities are refused; ``what`` explains the flag in the error.
    """
    lo_br, hi_br = "(" if low_open else "[", ")" if high_open else "]"
    if low is not None and high is not None:
        allowed = f"in {lo_br}{low:g}, {high:g}{hi_br}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"{'<' if high_open else '<='} {high:g}"

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {allowed}, "
                                             f"got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {allowed}{' (' + what + ')' if what else ''}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


def prune_methods(kind: str | None = None) -> list[str]:
    """The methods ``sparsekern prune --method`` accepts (of ``kind`` if given): the registered methods
    (:mod:`sparsekern.methods.registry`) of the kinds in :data:`PRUNE_KINDS`, in registry order."""
    from sparsekern.methods.registry import get_method, list_methods

    return [m for m in list_methods(kind) if get_method(m).kind in PRUNE_KINDS]


def search_methods() -> list[str]:
    """The image methods that read ``--search-epochs`` (static and dynamic methods with ``searches = True``)."""
    from sparsekern.methods.registry import get_method

    return [m for m in prune_methods() if get_method(m).kind != "lowrank" and get_method(m).searches]


def image_models() -> list[str]:
    """Zoo models that take images (every model but the byte-level LMs)."""
    from sparsekern.models import list_models

    return [m for m in list_models() if m not in LM_MODELS]


def check_data_spec(spec: str, *, flag: str = "--data", kinds: Mapping[str, str]) -> None:
    """``spec`` is ``NAME`` or ``NAME:PATH`` for one of ``kinds`` (name -> ``"dir"``, ``"file"`` or ``""``
    for no path), and PATH exists and is of that sort."""
    name, sep, arg = spec.partition(":")
    forms = ", ".join(f"'{k}:PATH'" if v else f"'{k}'" for k, v in kinds.items())
    if name not in kinds or bool(sep) != bool(kinds[name]) or (sep and not arg):
        raise UsageError(f"{flag} {spec!r} is not a data spec this command reads; use one of {forms}")
    if kinds[name]:
        path = Path(arg).expanduser()
        if not path.exists():
            raise UsageError(f"{flag} {spec!r}: {str(path)!r} does not exist; give the path of the {name} "
                             f"{'folder' if kinds[name] == 'dir' else 'file'}")
        if kinds[name] == "dir" and not path.is_dir():
            raise UsageError(f"{flag} {spec!r}: {str(path)!r} is not a folder; give the {name} folder")
        if kinds[name] == "file" and not path.is_file():
            raise UsageError(f"{flag} {spec!r}: {str(path)!r} is not a file; give the {name} file")


def _runs(model: Any, size: int, in_channels: int) -> bool:
    import torch

    try:
        with torch.no_grad():
            model(torch.randn(1, in_channels, size, size))
    except Exception:  # any failure means "this size does not work"; the caller names model and size
        return False
    return True


def check_image_model(name: str, size: int, *, flag: str = "--image-size", in_channels: int = 3,
                      num_classes: int = 10) -> None:
    """``name`` is an image model of the zoo that runs on one ``size`` x ``size`` sample.

    When it does not, the error names the smallest size that works, found by bisection up to the model's
    default input size (assuming larger inputs keep working, as they do for the zoo's CNNs).
    """
    from sparsekern.models import build, default_input_size

    if name not in image_models():
        raise UsageError(f"--model {name!r} is not an image model of the zoo; choose one of "
                         f"{', '.join(image_models())}")
    model = build(name, num_classes=num_classes, in_channels=in_channels).eval()
    if _runs(model, size, in_channels):
        return
    lo, hi = size, default_input_size(name)  # lo fails; hi is the first candidate known to work
    if hi <= lo or not _runs(model, hi, in_channels):
        raise UsageError(f"{name} does not run on {size}x{size} inputs ({flag} {size}); try its default input "
                         f"size {default_input_size(name)}")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs(model, mid, in_channels) else (mid, hi)
    raise UsageError(f"{name} does not run on {size}x{size} inputs (its downsampling leaves nothing); pass "
                     f"{flag} {hi} or more")


def check_lm(name: str, kwargs: Mapping[str, Any], *, method: str = "flop") -> None:
    """``name`` is a byte-level LM of the zoo that builds with ``kwargs`` and runs on one short sequence
    (``method``: the ``--method`` named in the error)."""
    import torch

    from sparsekern.models import build

    if name not in LM_MODELS:
        raise UsageError(f"--method {method} prunes the byte-level LMs {' or '.join(LM_MODELS)}, not --model {name!r}")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in kwargs.items())
    try:
        model = build(name, **kwargs).eval()
        with torch.no_grad():
            model(torch.zeros(1, 8, dtype=torch.long))
    except Exception as e:  # the constructor's own message says what is wrong with the sizes
        raise UsageError(f"{name} cannot be built with {flags}: {e}") from None


def _writable(folder: Path, flag: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".sparsekern-write-test-"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {str(folder)!r} cannot be created or written ({e.strerror or e}); choose a "
                         "writable folder") from None


def prepare_out(out: str | Path, outputs: Sequence[str], *, overwrite: bool, resume: bool = False,
                checkpoints: str | None = None) -> Path:
    """Create the output folder ``out`` and check it is writable; refuse to replace existing files.

    ``outputs`` are the file names the command writes into ``out``; ``checkpoints`` a sub-folder of stage
    checkpoints. Existing outputs are refused unless ``overwrite``, or ``resume`` while checkpoints exist (a
    resumed run rewrites its own outputs).
    """
    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--out {str(folder)!r} is a file, not a folder; choose a folder for the outputs")
    _writable(folder, "--out")
    existing = [folder / n for n in outputs if (folder / n).exists()]
    stages = sorted((folder / checkpoints).glob("*.safetensors")) if checkpoints else []
    if resume and stages:
        return folder
    if (existing or stages) and not overwrite:
        names = ", ".join([p.name for p in existing] + ([f"{checkpoints}/ ({len(stages)} stage checkpoints)"]
                                                       if stages else []))
        hint = ", --resume to continue the interrupted run" if stages else ""
        raise UsageError(f"--out {str(folder)!r} already holds {names}; pass --overwrite to replace them{hint}, or "
                         "choose another --out")
    return folder


def check_file_out(path: str | Path, flag: str) -> Path:
    """``path`` names a file (not a folder) in a folder that exists or can be created, and is writable."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; give a file name")
    _writable(path.parent, flag)
    return path


def check_json_out(path: str | Path, flag: str = "--out") -> None:
    """``path`` can be written, and if it exists it is a JSON object (results are merged into it)."""
    path = check_file_out(path, flag)
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{flag} {str(path)!r} exists and is not JSON ({e}); results are merged into an "
                             "existing file, so give a new file or a results JSON") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{flag} {str(path)!r} holds JSON that is not an object; give a new file or a "
                             "results JSON")
