"""Pruning methods. Each produces a :class:`sparsekern.Plan` (see METHODS.md)."""
