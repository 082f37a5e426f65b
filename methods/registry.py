"""One registry of pruning methods: what the CLI, the protocol runner and the report scripts read.

A method is a subclass of :class:`Method` registered under a name (docs/adding-a-method.md)::

    @register_method("l1_norm")
    class L1Norm(Method):
        order = 10
        summary = "filters ranked by L1 norm (Li et al., ICLR 2017)"

        def prune(self, model, budget, ctx):
            ratio, _ = ratio_for_budget(model, ctx.example_inputs, budget, scope="internal")
            return Pruned(prune(model, ctx.example_inputs, ratio=ratio), model)

Rules:

* One signature for every method: :meth:`Method.prune` takes the model to prune, a budget (the fraction of
  the full model's cost to keep, in (0, 1]) and a :class:`PruneContext` (example inputs, training data,
  seed, search length, method options) and returns :class:`Pruned`: the plan and the model to compile it
  against (the model itself, a refitted copy, a searched network or a converted form).
* ``kind`` says what the plan holds: ``"static"`` (channel keep-sets and removed blocks, run through the
  Rethinking protocol, :mod:`sparsekern.methods.rethinking`), ``"dynamic"`` (per-sample gates,
  :mod:`sparsekern.dynamic`) or ``"lowrank"`` (factorized layers, :mod:`sparsekern.lowrank`).
* A name is registered once; registering it again raises unless ``replace=True``.
* The built-in methods register themselves when their module is imported. :func:`get_method` and
  :func:`list_methods` first import every public module of this package (names without a leading
  underscore), so a new method is one new file in ``methods/``; a method defined elsewhere is registered
  when the module defining it is imported.
* Listings are ordered by ``Method.order``, then by name.
"""
from __future__ import annotations

import abc
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, NamedTuple, TypeVar

if TYPE_CHECKING:
    import torch.nn as nn

    from sparsekern.plan import Plan

__all__ = ["KINDS", "Method", "PruneContext", "Pruned", "register_method", "unregister_method", "get_method",
           "list_methods"]

#: what a method's plan holds (module docstring)
KINDS = ("static", "dynamic", "lowrank")
#: modules of this package that hold no method (the registry itself, the protocol, shared helpers)
_NOT_METHODS = frozenset({"registry", "rethinking", "budget"})

_REGISTRY: dict[str, "Method"] = {}
_discovered = False

M = TypeVar("M", bound=type)


class Pruned(NamedTuple):
    """What :meth:`Method.prune` returns: the plan and the model to compile it against."""

    plan: "Plan"
    model: "nn.Module"


@dataclass(frozen=True)
class PruneContext:
    """Everything a method reads besides the model and the budget.

    Attributes:
        example_inputs: a batch to trace with (and to count FLOPs on).
        train_data: the training set (a Dataset or DataLoader of ``(x, y)``), for data-driven methods.
        seed: seeds every random choice of the method.
        search_epochs: length of a learned method's search (gate training, architecture search, mask
            training, joint training); ignored by methods with ``searches = False``.
        progress: show progress bars.
        options: method-specific settings, as returned by :meth:`Method.prepare` (e.g. Network Slimming's
            ``slimming_penalty``).
    """

    example_inputs: Any
    train_data: Any = None
    seed: int = 0
    search_epochs: float = 5
    progress: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


class Method(abc.ABC):
    """A registered pruning method: metadata for the CLI and the protocol runner, and :meth:`prune`.

    Class attributes (the metadata):
        name: set by :func:`register_method`.
        kind: one of :data:`KINDS`.
        arms: the arms ``sparsekern prune`` trains without ``--protocol`` (static methods; default fine-tune).
        protocol_arms: arms added to the Rethinking protocol's three (TAS's ``KD``).
        searches: the method reads ``PruneContext.search_epochs`` (the CLI's ``--search-epochs``).
        robustness: the protocol also reports clean and PGD accuracy (ANP-VS).
        order: position in listings (CLI choices, reports); ties by name.
        summary: one line for help texts and docs, citing the paper.
    """

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "static"
    arms: ClassVar[tuple[str, ...]] = ("fine-tune",)
    protocol_arms: ClassVar[tuple[str, ...]] = ()
    searches: ClassVar[bool] = False
    robustness: ClassVar[bool] = False
    order: ClassVar[int] = 100
    summary: ClassVar[str] = ""

    def prepare(self, model: "nn.Module", options: Mapping[str, Any]) -> dict[str, Any]:
        """The method's options with their defaults filled for ``model``, before the full model trains.

        The protocol records the result with the full model's checkpoint and passes it to
        :meth:`train_hooks` and, as ``PruneContext.options``, to :meth:`prune`. Default: unchanged.
        """
        return dict(options)

    def train_hooks(self, options: Mapping[str, Any]) -> tuple[Any, ...]:
        """Trainer hooks (:class:`sparsekern.train.Hook`) for training the full model before pruning
        (Network Slimming's sparsity penalty). Default: none."""
        return ()

    @abc.abstractmethod
    def prune(self, model: "nn.Module", budget: float, ctx: PruneContext) -> Pruned:
        """Prune the trained ``model`` so its plan keeps at most ``budget`` of its cost; ``model`` is not
        modified (a method that changes weights works on a copy and returns it in :class:`Pruned`)."""


def register_method(name: str, *, replace: bool = False) -> Callable[[M], M]:
    """Class decorator: register a :class:`Method` subclass under ``name`` and set its ``name``; the registry
    keeps one instance, made without arguments.

    Raises ``ValueError`` if ``name`` is taken (unless ``replace``), the class is not a :class:`Method` or
    its ``kind`` is not one of :data:`KINDS`.
    """

    def decorate(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise ValueError(f"register_method({name!r}): {cls!r} is not a subclass of Method")
        if cls.kind not in KINDS:
            raise ValueError(f"register_method({name!r}): kind {cls.kind!r} is not one of {list(KINDS)}")
        if name in _REGISTRY and not replace:
            raise ValueError(f"a method named {name!r} is already registered ({type(_REGISTRY[name]).__module__}); "
                             "pass replace=True to replace it")
        cls.name = name
        _REGISTRY[name] = cls()
        return cls

    return decorate


def unregister_method(name: str) -> None:
    """Remove ``name`` from the registry (a test's temporary method); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every public module of this package once, so the built-in methods are registered."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # set first: a module that lists methods while it is imported does not recurse
    package = importlib.import_module(__name__.rpartition(".")[0])
    try:
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_") and info.name not in _NOT_METHODS:
                importlib.import_module(f"{package.__name__}.{info.name}")
    except BaseException:
        _discovered = False  # the next call retries (and raises the same import error)
        raise


def list_methods(kind: str | None = None) -> list[str]:
    """Names of the registered methods (of ``kind`` if given), by ``order`` then name."""
    _discover()
    methods = [m for m in _REGISTRY.values() if kind is None or m.kind == kind]
    return [m.name for m in sorted(methods, key=lambda m: (m.order, m.name))]


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` naming the known ones if there is none."""
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {list_methods()}") from None
