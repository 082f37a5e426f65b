"""One dispatch per op: an ordered list of backends, each able to say why it cannot take an input.

An op (``channel_skip_conv2d``, ``lowrank_linear``, ...) owns one :class:`Dispatch`. Backends register
with a ``check`` that returns ``None`` when the backend can run the given arguments and otherwise a short
reason ("no CUDA device", "extension failed to build: ...", "dtype float16 not supported on CPU"), and a
``run`` that computes the result. :meth:`Dispatch.__call__` runs the first backend whose check passes; when
none can, :class:`NoBackendError` lists every backend with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Backend", "Dispatch", "NoBackendError"]


class NoBackendError(RuntimeError):
    """No registered backend can run these arguments; the message lists each backend's reason."""


@dataclass(frozen=True)
class Backend:
    """A way to compute an op: ``check(*args) -> reason | None`` and ``run(*args) -> result``."""

    name: str
    check: Callable[..., str | None]
    run: Callable[..., Any]


class Dispatch:
    """Ordered backends of one op. Registration order is priority order (first = preferred)."""

    def __init__(self, op: str) -> None:
        self.op = op
        self.backends: list[Backend] = []

    def register(self, name: str, check: Callable[..., str | None], run: Callable[..., Any]) -> None:
        if any(b.name == name for b in self.backends):
            raise ValueError(f"{self.op}: backend {name!r} is already registered")
        self.backends.append(Backend(name, check, run))

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.backends]

    def reasons(self, *args: Any) -> dict[str, str | None]:
        """Backend name -> why it cannot take ``args`` (``None`` when it can)."""
        return {b.name: b.check(*args) for b in self.backends}

    def select(self, *args: Any, backend: str | None = None) -> Backend:
        """The backend that would run ``args``: ``backend`` if named (an error says why it cannot), else the
        first whose check passes."""
        if backend is not None:
            chosen = [b for b in self.backends if b.name == backend]
            if not chosen:
                raise ValueError(f"{self.op}: unknown backend {backend!r}; known: {self.names}")
            why = chosen[0].check(*args)
            if why is not None:
                raise NoBackendError(f"{self.op}: backend {backend!r} cannot run these inputs: {why}")
            return chosen[0]
        reasons = []
        for b in self.backends:
            why = b.check(*args)
            if why is None:
                return b
            reasons.append(f"  {b.name}: {why}")
        raise NoBackendError(f"{self.op}: no backend can run these inputs:\n" + "\n".join(reasons))

    def __call__(self, *args: Any, backend: str | None = None) -> Any:
        return self.select(*args, backend=backend).run(*args)
