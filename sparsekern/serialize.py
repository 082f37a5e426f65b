"""Save and load plans and compiled models without pickle.

A model file is one `safetensors <https://github.com/huggingface/safetensors>`_ file: the tensors of the
state dict, and in its header a JSON **manifest**:

``format``/``version``
    ``"sparsekern.model"`` and the manifest version.
``arch``
    how to rebuild the unpruned architecture: ``{"name": zoo_name, "kwargs": {...}}`` for
    :mod:`sparsekern.models`, or ``{"factory": "package.module:function", "kwargs": {...}}``.
``plan``, ``compile``
    the plan that was compiled and the compile options (inference passes, example input shapes).
``sha256``
    a digest of every tensor's bytes, so a corrupted file fails loudly instead of computing garbage.

:func:`load` rebuilds the architecture, compiles the same plan with the same options, and loads the
tensors into it with ``strict=True``; outputs are bit-for-bit those of the saved model. safetensors was
chosen over ``torch.save`` because it cannot execute code on load and memory-maps tensors.

A plan alone is saved as a JSON file (:meth:`sparsekern.plan.Plan.to_json`).
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from sparsekern.plan import Plan

MODEL_FORMAT = "sparsekern.model"
MODEL_VERSION = 1
_HEADER_KEY = "sparsekern"

__all__ = ["save", "load", "SerializationError", "build_arch"]


class SerializationError(RuntimeError):
    """A file that is not a sparsekern model or plan, is corrupt, or does not match its manifest."""


def save(obj: nn.Module | Plan, path: str | Path, *, arch: Mapping[str, Any] | None = None) -> Path:
    """Save a plan (JSON) or a model (safetensors + manifest) to ``path``.

    Args:
        obj: a :class:`~sparsekern.plan.Plan`, a model from :mod:`sparsekern.models`, or a model returned by
            :func:`sparsekern.compile`.
        path: destination file.
        arch: architecture reference for models that did not come from :mod:`sparsekern.models`:
            ``{"factory": "package.module:function", "kwargs": {...}}`` (JSON-serializable kwargs).
    """
    path = Path(path)
    if isinstance(obj, Plan):
        obj.to_json(path)
        return path
    if isinstance(obj, torch.jit.ScriptModule):
        raise SerializationError(
            "cannot save a TorchScript module: save the model before the 'freeze' pass and apply "
            "sparsekern.passes.apply(model, ['freeze']) after loading"
        )
    if not isinstance(obj, nn.Module):
        raise TypeError(f"sk.save takes a Plan or an nn.Module, got {type(obj).__name__}")
    arch = dict(arch) if arch is not None else getattr(obj, "sk_arch", None)
    if not arch:
        raise SerializationError(
            f"cannot save {type(obj).__name__}: sparsekern stores an architecture reference plus tensors (no "
            "pickle). Build the model with sparsekern.models.build(...), or pass "
            "arch={'factory': 'package.module:function', 'kwargs': {...}}"
        )
    build_arch(arch, check_only=True)
    plan = getattr(obj, "sk_plan", None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in obj.state_dict().items()}
    manifest = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "arch": arch,
        "plan": plan.to_dict() if plan is not None else None,
        "compile": getattr(obj, "sk_compile", None),
        "torch": torch.__version__,
        "sha256": _digest(tensors),
    }
    try:
        json.dumps(manifest)
    except TypeError as e:
        raise SerializationError(f"the architecture reference must be JSON-serializable: {e}") from e
    from safetensors.torch import save_file

    save_file(_dedupe_shared(tensors), str(path), metadata={_HEADER_KEY: json.dumps(manifest)})
    return path


def load(path: str | Path) -> nn.Module | Plan:
    """Load what :func:`save` wrote: a :class:`~sparsekern.plan.Plan` or a model in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such sparsekern file: {path}")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        return Plan.from_json(path)
    manifest, tensors = _read(path)
    model = build_arch(manifest["arch"])
    if manifest.get("plan") is not None:
        from sparsekern.compiler import compile, example_inputs_for

        options = manifest.get("compile") or {}
        plan = Plan.from_dict(manifest["plan"])
        inputs = example_inputs_for(options.get("inputs") or plan.meta.get("inputs"))
        model = compile(model, plan, inputs, passes=options.get("passes", ()))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise SerializationError(f"{path}: the tensors do not match the rebuilt architecture: {e}") from e
    return model.eval()


def build_arch(arch: Mapping[str, Any], *, check_only: bool = False) -> nn.Module | None:
    """Construct the model an architecture reference names (see the module docstring)."""
    kwargs = dict(arch.get("kwargs", {}))
    if "name" in arch:
        from sparsekern import models

        if arch["name"] not in models.list_models():
            raise SerializationError(f"unknown zoo model {arch['name']!r}; known: {models.list_models()}")
        return None if check_only else models.build(arch["name"], **kwargs)
    if "factory" in arch:
        module_name, _, fn_name = str(arch["factory"]).partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise SerializationError(f"cannot import architecture factory {arch['factory']!r}: {e}") from e
        if check_only:
            return None
        model = factory(**kwargs)
        model.sk_arch = dict(arch)
        return model
    raise SerializationError(f"architecture reference needs 'name' or 'factory', got {dict(arch)}")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get(_HEADER_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise SerializationError(f"{path} is not a readable sparsekern model file (corrupt or truncated?): {e}") from e
    if header is None:
        raise SerializationError(f"{path} is a safetensors file without a sparsekern manifest")
    try:
        manifest = json.loads(header)
    except json.JSONDecodeError as e:
        raise SerializationError(f"{path}: the manifest is not valid JSON: {e}") from e
    if manifest.get("format") != MODEL_FORMAT:
        raise SerializationError(f"{path}: unknown format {manifest.get('format')!r}")
    if manifest.get("version") != MODEL_VERSION:
        raise SerializationError(
            f"{path}: manifest version {manifest.get('version')} is not supported (this sparsekern reads "
            f"{MODEL_VERSION})"
        )
    if _digest(tensors) != manifest.get("sha256"):
        raise SerializationError(f"{path}: tensor checksum mismatch, the file is corrupt")
    return manifest, tensors


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): store independent copies.

    ``load`` fills each state-dict entry from its own copy, so tied weights are saved and loaded by value.
    """
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out

