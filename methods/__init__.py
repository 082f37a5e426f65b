"""Pruning methods. Each produces a :class:`sparsekern.Plan` (see docs/methods.md)."""
