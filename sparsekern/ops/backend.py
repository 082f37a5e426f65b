"""Backends of an op, declared as data, and the dispatch that picks one for a validated problem.

An op (``channel_skip_conv2d``, ``lowrank_linear``, ...) validates its arguments once, in its public function,
into a *problem*: a small dataclass with the tensors, the derived output shape, and ``device`` / ``dtype``
properties. Its :class:`Dispatch` holds the op's backends in priority order. A :class:`Backend` declares what it
supports (devices, dtypes, whether the Triton interpreter lets it run CPU tensors) and two optional functions:
``available()`` for what this machine lacks (an extension that failed to build, Triton not installed) and
``limits(problem)`` for inputs it cannot take (a rank beyond its tile, a batch beyond its grid).
:meth:`Backend.reasons` returns *every* reason it refuses a problem, so an error can say all that would have to
change; :meth:`Dispatch.select` runs the first backend with none (or the one named, or the first of a preferred
order), and :class:`NoBackendError` lists each backend with its reasons.

Adding a backend is one :meth:`Dispatch.register` call (docs/adding-an-op-backend.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch

__all__ = ["Backend", "Dispatch", "NoBackendError", "OnInput", "Problem", "FLOATS"]

#: The floating dtypes the ops take.
FLOATS: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


class NoBackendError(RuntimeError):
    """No registered backend can run this problem; the message lists each backend's reasons."""


class Problem(Protocol):
    """What a dispatch needs of an op's validated arguments."""

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...


class OnInput:
    """Mixin for an op's problem dataclass whose device and dtype are those of its first input ``x``."""

    x: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Backend:
    """One way to compute an op.

    Attributes:
        name: the name ``backend=`` forces and errors show.
        run: ``run(problem) -> Tensor``: the result, with the output shape and memory format the op promises.
        devices: device types it runs on (``"cpu"``, ``"cuda"``); ``None``: any.
        dtypes: input dtypes it takes.
        interpreted: a Triton kernel: it also runs CPU tensors when ``TRITON_INTERPRET=1``.
        available: ``available() -> reason | None``: what this machine lacks to run it at all.
        limits: ``limits(problem) -> [reasons]``: inputs beyond what it supports.
    """

    name: str
    run: Callable[[Any], torch.Tensor]
    devices: tuple[str, ...] | None = None
    dtypes: tuple[torch.dtype, ...] = FLOATS
    interpreted: bool = False
    available: Callable[[], str | None] | None = None
    limits: Callable[[Any], list[str]] | None = None

    def reasons(self, problem: Problem) -> list[str]:
        """Every reason this backend cannot run ``problem``; empty when it can."""
        out = []
        device = problem.device.type
        interpreted = self.interpreted and device == "cpu" and _triton_interpreting()
        if self.devices is not None and device not in self.devices and not interpreted:
            needs = "/".join(d.upper() for d in self.devices)
            extra = " (or CPU with TRITON_INTERPRET=1)" if self.interpreted else ""
            out.append(f"runs on {needs}{extra}, got a {device.upper()} tensor")
        if problem.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"takes {names}, got {str(problem.dtype).replace('torch.', '')}")
        why = self.available() if self.available is not None else None
        if why is not None:
            out.append(why)
        if self.limits is not None:
            out.extend(self.limits(problem))
        return out


class Dispatch:
    """The ordered backends of one op (registration order is priority order) and the op's validator.

    Args:
        op: the op's name, for messages.
        problem: the op's validator: ``problem(*args) -> Problem`` raises on invalid arguments; it lets
            :meth:`reasons` and :meth:`select` take the op's own arguments.
    """

    def __init__(self, op: str, problem: Callable[..., Any]) -> None:
        self.op = op
        self.problem = problem
        self.backends: list[Backend] = []

    def register(self, backend: Backend, *, before: str | None = None) -> None:
        """Add ``backend`` last, or just before the backend named ``before``."""
        if any(b.name == backend.name for b in self.backends):
            raise ValueError(f"{self.op}: backend {backend.name!r} is already registered")
        index = len(self.backends) if before is None else self.names.index(before)
        self.backends.insert(index, backend)

    def unregister(self, name: str) -> Backend:
        """Remove and return the backend ``name`` (tests, experiments)."""
        backend = self[name]
        self.backends.remove(backend)
        return backend

    def __getitem__(self, name: str) -> Backend:
        for b in self.backends:
            if b.name == name:
                return b
        raise ValueError(f"{self.op}: unknown backend {name!r}; known: {self.names}")

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def reasons(self, *args: Any, **kwargs: Any) -> dict[str, list[str]]:
        """Backend name -> every reason it cannot run the op on these arguments (the op's own, validated by its
        ``problem``); an empty list when it can."""
        return self.reasons_for(self.problem(*args, **kwargs))

    def reasons_for(self, problem: Problem) -> dict[str, list[str]]:
        """Backend name -> every reason it cannot run ``problem``; an empty list when it can."""
        return {b.name: b.reasons(problem) for b in self.backends}

    def select(self, problem: Problem, backend: str | None = None, order: Sequence[str] = ()) -> Backend:
        """The backend that runs ``problem``: ``backend`` if named (an error lists why it cannot), else the
        first of ``order`` that can, else the first registered that can."""
        if backend is not None:
            why = self[backend].reasons(problem)
            if why:
                raise NoBackendError(f"{self.op}: backend {backend!r} cannot run these inputs: {'; '.join(why)}")
            return self[backend]
        candidates = [self[name] for name in order if name in self.names]
        candidates += [b for b in self.backends if b not in candidates]
        lines = []
        for b in candidates:
            why = b.reasons(problem)
            if not why:
                return b
            lines.append(f"  {b.name}: {'; '.join(why)}")
        raise NoBackendError(f"{self.op}: no backend can run these inputs:\n" + "\n".join(lines))

    def run(self, problem: Problem, backend: str | None = None, order: Sequence[str] = ()) -> torch.Tensor:
        """Run ``problem`` on the backend :meth:`select` picks."""
        return self.select(problem, backend, order).run(problem)
