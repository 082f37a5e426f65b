"""ONNX export of compiled models: :func:`export_onnx`.

A compiled static model is plain torch layers, only smaller, and exports as it is. sparsekern's own layers are
rewritten on a copy into standard ops first:

* :class:`~sparsekern.lowrank.LowRankLinear` (``x Q^T P^T + b``, the fused ``lowrank_linear`` op) becomes two
  MatMuls (``F.linear`` twice), so any ONNX runtime runs it;
* the SRU's fused recurrence (``sru_recurrence`` op) runs as its plain-torch loop, unrolled over the example
  inputs' time steps.

Per-sample gated layers (SANP's dynamic plans) choose their channels from the data, which an exported graph
cannot, and are refused. The export goes through ``torch.onnx.export(..., dynamo=True)`` (``torch.export``, then
ONNX Script), which needs the ``onnx`` and ``onnxscript`` packages; :func:`check_onnx` runs the file in
``onnxruntime`` against the torch model. All three are optional dependencies (``pip install
"sparsekern[onnx]"``).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["export_onnx", "check_onnx"]


class _TwoMatmuls(nn.Module):
    """``LowRankLinear`` as standard ops: ``linear(linear(x, Q), P, bias)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.Q, self.P, self.bias = layer.Q, layer.P, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.Q), self.P, self.bias)


def _standard_ops(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose sparsekern layers compute with standard torch ops (module docstring)."""
    from sparsekern.dynamic import dynamic_layers
    from sparsekern.lowrank import LowRankLinear
    from sparsekern.models.lm import SRURecurrence

    dynamic = dynamic_layers(model)
    if dynamic:
        raise ValueError(f"export_onnx: {dynamic[0]} ({len(dynamic)} layers in all) computes per-sample channel "
                         "masks, which an exported graph cannot; export the static or low-rank models only")
    model = copy.deepcopy(model).eval()
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear) and m.rank > 0:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, _TwoMatmuls(m))
        elif isinstance(m, SRURecurrence):
            m.fused = False
    return model


def export_onnx(model: nn.Module, example_inputs: Any, path: str | Path, *, overwrite: bool = False,
                opset_version: int | None = None) -> Path:
    """Write ``model`` (a compiled static or low-rank model, or a dense one) as ONNX to ``path``.

    Args:
        model: the model to export; not modified (sparsekern's layers are rewritten on a copy).
        example_inputs: a tensor or tuple of tensors; the graph has their shapes.
        path: the ``.onnx`` file to write.
        overwrite: replace an existing file (else an existing ``path`` is an error).
        opset_version: the ONNX opset (default: the exporter's).

    Returns:
        ``path``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"export_onnx: {path} exists; pass overwrite=True to replace it")
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"export_onnx needs the onnx and onnxscript packages ({e}); install them with "
                          "pip install 'sparsekern[onnx]'") from e
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    standard = _standard_ops(model)
    with torch.no_grad():
        program = torch.onnx.export(standard, inputs, dynamo=True, opset_version=opset_version, verbose=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    return path


def check_onnx(path: str | Path, model: nn.Module, example_inputs: Any) -> float:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on ``example_inputs`` and return the largest difference
    from ``model``'s output (its first tensor, for a tuple or a ``transformers`` ``ModelOutput``), relative to the
    output's scale (needs the ``onnxruntime`` package)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("check_onnx needs onnxruntime; pip install 'sparsekern[onnx]'") from e
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = model.eval()(*inputs)
    if not isinstance(want, torch.Tensor):  # a tuple or a ModelOutput: its first tensor is the first ONNX output
        want = torch.utils._pytree.tree_leaves(want)[0]
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12))
