"""Save and load plans and compiled models without pickle.

A model file is one `safetensors <https://github.com/huggingface/safetensors>`_ file: the tensors of the
state dict, and in its header a JSON **manifest**:

``format``/``version``
    ``"sparsekern.model"`` and the manifest version.
``arch``
    how to rebuild the unpruned architecture: ``{"name": zoo_name, "kwargs": {...}}`` for
    :mod:`sparsekern.models`, or ``{"factory": NAME, "kwargs": {...}}`` for a trusted factory (below).
``plan``, ``compile``
    the plan that was compiled and the compile options (inference passes, example input shapes).
``sha256``
    a digest of every tensor's bytes, so a corrupted file fails loudly instead of computing garbage.

:func:`load` rebuilds the architecture, compiles the same plan with the same options, and loads the
tensors into it with ``strict=True``; outputs are bit-for-bit those of the saved model. safetensors was
chosen over ``torch.save`` because it cannot execute code on load and memory-maps tensors.

**Loading never executes code named by the file.** A file names its architecture, it does not provide it:
``"name"`` must be a zoo model, and ``"factory"`` must be a *trusted* factory, one of

* the factories sparsekern itself records (SANP, FLOP and Pruning-from-Scratch models, :data:`BUILTIN_FACTORIES`),
* factories registered in this process with :func:`register_factory`,
* factories passed to the call: ``sk.load(path, factories={NAME: callable})``.

Any other name is refused with a :class:`SerializationError` that says how to allow it; nothing named by
the file is imported. The digest protects against corruption, not against tampering: anyone can recompute
it, which is why trust comes from the loading code and never from the file.

A plan alone is saved as a JSON file (:meth:`sparsekern.plan.Plan.to_json`). Training state (optimizer
and scheduler state dicts, RNG states: nested containers of tensors and plain values) is saved by
:func:`save_state` in the same safetensors-plus-JSON form, so checkpoints load without pickle too.
"""
from __future__ import annotations

import contextvars
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from sparsekern.plan import Plan

MODEL_FORMAT = "sparsekern.model"
MODEL_VERSION = 1
_HEADER_KEY = "sparsekern"

__all__ = ["save", "load", "SerializationError", "build_arch", "register_factory", "BUILTIN_FACTORIES",
           "save_state", "load_state"]

#: Factories that sparsekern records in the models it builds; the only names :func:`load` imports by itself.
BUILTIN_FACTORIES: tuple[str, ...] = (
    "sparsekern.methods.sanp:build_sanp",
    "sparsekern.methods.flop:build_factorized",
    "sparsekern.methods.scratch:build_expanded",
)
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}
# The ``factories`` of the :func:`load` call in progress, so that nested references (a SANP or FLOP factory
# rebuilding its base architecture through build_arch) trust the same factories as the outer call.
_CALL_FACTORIES: contextvars.ContextVar[Mapping[str, Callable[..., nn.Module]]] = contextvars.ContextVar(
    "sparsekern_load_factories", default={}
)


class SerializationError(RuntimeError):
    """A file that is not a sparsekern model or plan, is corrupt, or does not match its manifest."""


def save(obj: nn.Module | Plan, path: str | Path, *, arch: Mapping[str, Any] | None = None) -> Path:
    """Save a plan (JSON) or a model (safetensors + manifest) to ``path``.

    Args:
        obj: a :class:`~sparsekern.plan.Plan`, a model from :mod:`sparsekern.models`, or a model returned by
            :func:`sparsekern.compile`.
        path: destination file.
        arch: architecture reference for models that did not come from :mod:`sparsekern.models`:
            ``{"factory": fn, "kwargs": {...}}`` with JSON-serializable kwargs, where ``fn`` is the callable
            that builds the unpruned model (recorded as ``"module:qualname"``) or that name as a string. The
            saving process registers it (:func:`register_factory`); any other process that loads the file
            must trust it explicitly (see :func:`load`).
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
    arch = _named_factory(dict(arch)) if arch is not None else getattr(obj, "sk_arch", None)
    if not arch:
        raise SerializationError(
            f"cannot save {type(obj).__name__}: sparsekern stores an architecture reference plus tensors (no "
            "pickle). Build the model with sparsekern.models.build(...), or pass "
            "arch={'factory': build_fn, 'kwargs': {...}}"
        )
    _check_arch_at_save(arch)
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


def load(
    path: str | Path, *, factories: Mapping[str, Callable[..., nn.Module]] | None = None
) -> nn.Module | Plan:
    """Load what :func:`save` wrote: a :class:`~sparsekern.plan.Plan` or a model in eval mode.

    Args:
        path: a file written by :func:`save`.
        factories: architecture factories trusted for this call, by the name the file records
            (``"module:qualname"``), in addition to the zoo, :data:`BUILTIN_FACTORIES` and
            :func:`register_factory`. Nothing the file names is imported unless it is one of these.

    Raises:
        SerializationError: the file is corrupt, does not match its manifest, or names an architecture
            factory that is not trusted.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such sparsekern file: {path}")
    with open(path, "rb") as f:
        head = f.read(1)
    if head == b"{":
        return Plan.from_json(path)
    manifest, tensors = _read(path)
    _check_inputs_spec(path, manifest)
    token = _CALL_FACTORIES.set(dict(factories or {}))
    try:
        model = build_arch(manifest["arch"])
    finally:
        _CALL_FACTORIES.reset(token)
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


def register_factory(name: str, factory: Callable[..., nn.Module]) -> None:
    """Trust ``factory`` to rebuild architectures recorded as ``{"factory": name, ...}`` in this process.

    ``name`` is the string the file records (``"module:qualname"`` for a callable passed to :func:`save`).
    Registering the same name again replaces the factory.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_factory: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_factory: factory for {name!r} must be callable, got {type(factory).__name__}")
    _REGISTERED[name] = factory


def build_arch(
    arch: Mapping[str, Any], *, factories: Mapping[str, Callable[..., nn.Module]] | None = None
) -> nn.Module:
    """Construct the model an architecture reference names (see the module docstring).

    Only trusted code runs: zoo models, :data:`BUILTIN_FACTORIES`, :func:`register_factory` and
    ``factories``. ``kwargs`` must be a JSON object; nested architecture references in it (as the
    SANP and FLOP factories record) are built by the factory through this same function.
    """
    if not isinstance(arch, Mapping):
        raise SerializationError(f"architecture reference must be a JSON object, got {type(arch).__name__}")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise SerializationError(f"architecture kwargs must be a JSON object with string keys, got {kwargs!r}")
    kwargs = dict(kwargs)
    if "name" in arch:
        from sparsekern import models

        if arch["name"] not in models.list_models():
            raise SerializationError(f"unknown zoo model {arch['name']!r}; known: {models.list_models()}")
        return models.build(arch["name"], **kwargs)
    if "factory" in arch:
        factory = _trusted_factory(str(arch["factory"]), {**_CALL_FACTORIES.get(), **(factories or {})})
        model = factory(**kwargs)
        if not isinstance(model, nn.Module):
            raise SerializationError(f"architecture factory {arch['factory']!r} returned {type(model).__name__}, "
                                     "not an nn.Module")
        model.sk_arch = dict(arch)
        return model
    raise SerializationError(f"architecture reference needs 'name' or 'factory', got {dict(arch)}")


def _trusted_factory(name: str, factories: Mapping[str, Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    if name in factories:
        return factories[name]
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in BUILTIN_FACTORIES:
        return _import_factory(name)
    raise SerializationError(
        f"the file names architecture factory {name!r}, which this process does not trust: sparsekern never "
        "imports code named by a file. If you trust the file, pass the function that builds it: "
        f"sk.load(path, factories={{{name!r}: build_fn}}), or call "
        f"sparsekern.serialize.register_factory({name!r}, build_fn) before loading"
    )


def _import_factory(name: str) -> Callable[..., nn.Module]:
    module_name, _, qualname = name.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SerializationError(f"cannot import architecture factory {name!r}: {e}") from e
    return obj


def _named_factory(arch: dict[str, Any]) -> dict[str, Any]:
    """``{"factory": callable}`` -> ``{"factory": "module:qualname"}``, registering the callable as trusted."""
    factory = arch.get("factory")
    if callable(factory):
        name = f"{factory.__module__}:{factory.__qualname__}"
        if "<locals>" in name or "<lambda>" in name:
            raise SerializationError(
                f"architecture factory {name!r} has no importable name: define it at module level"
            )
        register_factory(name, factory)
        arch["factory"] = name
    return arch


def _check_arch_at_save(arch: Mapping[str, Any]) -> None:
    """Refuse at save time what no process could load: unknown zoo names, factories that cannot be found."""
    if "name" in arch:
        from sparsekern import models

        if arch["name"] not in models.list_models():
            raise SerializationError(f"unknown zoo model {arch['name']!r}; known: {models.list_models()}")
    elif "factory" in arch:
        name = str(arch["factory"])
        if name not in _REGISTERED and name not in BUILTIN_FACTORIES:
            # The caller named it, so importing it runs the caller's own code; the saving process trusts it.
            register_factory(name, _import_factory(name))
    else:
        raise SerializationError(f"architecture reference needs 'name' or 'factory', got {dict(arch)}")


def _check_inputs_spec(path: Path, manifest: Mapping[str, Any]) -> None:
    """The recorded example inputs must be valid records (:func:`sparsekern.compiler.check_input_spec`)."""
    from sparsekern.compiler import check_input_spec
    from sparsekern.plan import PlanError

    try:
        check_input_spec((manifest.get("compile") or {}).get("inputs"))
        check_input_spec((manifest.get("plan") or {}).get("meta", {}).get("inputs"))
    except PlanError as e:
        raise SerializationError(f"{path}: {e}, in the manifest") from e


STATE_FORMAT = "sparsekern.state"


def save_state(state: Any, path: str | Path) -> Path:
    """Save nested training state without pickle: tensors to safetensors, the structure to JSON.

    ``state`` may nest dicts (any int/str/float/bool/None keys), lists and tuples of tensors, ints, floats,
    bools, strings and None, as optimizer, scheduler and RNG states do; :func:`load_state` returns it with
    the same container and key types. The file is written to a temporary name and renamed, so an interrupted
    save never leaves a truncated file at ``path``.

    Raises:
        SerializationError: ``state`` holds another type (the message names where).
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode_state(state, tensors, "state")
    tmp = path.with_name(path.name + ".tmp")
    save_file(_dedupe_shared(tensors), str(tmp),
              metadata={_HEADER_KEY: json.dumps({"format": STATE_FORMAT, "version": 1, "state": skeleton,
                                                 "sha256": _digest(tensors)})})
    tmp.replace(path)
    return path


def load_state(path: str | Path) -> Any:
    """Load what :func:`save_state` wrote (tensors on the CPU)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(_HEADER_KEY) or "null")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise SerializationError(f"{path} is not a readable sparsekern state file (corrupt or truncated?): {e}") from e
    if not isinstance(header, dict) or header.get("format") != STATE_FORMAT:
        raise SerializationError(f"{path} is not a sparsekern state file")
    if _digest(tensors) != header.get("sha256"):
        raise SerializationError(f"{path}: tensor checksum mismatch, the file is corrupt")
    return _decode_state(header["state"], tensors)


def _encode_state(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [_encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise SerializationError(f"cannot save state: key {k!r} of {where} is a {type(k).__name__}")
            items.append([k, _encode_state(v, tensors, f"{where}[{k!r}]")])
        return {"dict": items}
    raise SerializationError(f"cannot save state: {where} is a {type(obj).__name__} (tensors, numbers, strings, "
                             "None and lists, tuples and dicts of them are supported)")


def _decode_state(node: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict) or len(node) != 1:
        raise SerializationError(f"malformed state record {node!r}")
    (kind, payload), = node.items()
    if kind == "tensor":
        return tensors[payload]
    if kind == "value":
        return payload
    if kind == "list":
        return [_decode_state(v, tensors) for v in payload]
    if kind == "tuple":
        return tuple(_decode_state(v, tensors) for v in payload)
    if kind == "dict":
        return {k: _decode_state(v, tensors) for k, v in payload}
    raise SerializationError(f"malformed state record of kind {kind!r}")


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

