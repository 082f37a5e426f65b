"""Pruning methods. Each produces a :class:`sparsekern.Plan` (see docs/methods.md) and registers itself in
:mod:`sparsekern.methods.registry` (``get_method(name)``, ``list_methods()``; docs/adding-a-method.md)."""
