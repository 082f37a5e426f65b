"""Dense vs compiled models in onnxruntime: are the compiled models faster outside torch too?

Each case is a zoo model pruned with L1-norm (every channel group, as ``sparsekern bench models``), exported
with :func:`sparsekern.onnx_export.export_onnx` with and without the plan, and run in onnxruntime's CPU
provider (``threads`` intra-op threads that do not spin-wait, graph optimisations on), timed interleaved
(:func:`~sparsekern.bench.timing.time_interleaved`) on random inputs. Efficiency = measured / theoretical
(FLOP) speedup. Needs the ``onnx``, ``onnxscript`` and ``onnxruntime`` packages. Run by hand::

    python -m sparsekern.bench.onnx_models --out bench/results/cpu.json
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsekern.bench.results import command_line, write_part
from sparsekern.bench.timing import environment, time_interleaved

__all__ = ["CASES", "run", "table", "main"]

#: (model, kept fraction pruned away, batch, image size)
CASES = (("resnet56", 0.5, 64, 32), ("resnet56", 0.5, 1, 32), ("resnet50", 0.5, 1, 224))


def _session(path: Path, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # no spin-waiting: the dense and compiled sessions alternate, and spinning threads of one slow the other
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _case(name: str, ratio: float, batch: int, size: int, threads: int, warmup: int, repeats: int,
          folder: Path) -> dict[str, Any]:
    import sparsekern as sk
    from sparsekern.methods import l1_norm
    from sparsekern.models import build
    from sparsekern.onnx_export import check_onnx, export_onnx

    torch.manual_seed(0)
    dense = build(name).eval()
    x = torch.randn(batch, 3, size, size)
    fast = sk.compile(dense, l1_norm.prune(dense, x[:1], ratio=ratio, scope="all"), x[:1]).eval()
    models = {"dense": dense, "fast": fast}
    paths = {k: export_onnx(m, x, folder / f"{name}_{k}_b{batch}.onnx", overwrite=True) for k, m in models.items()}
    errors = {k: check_onnx(paths[k], models[k], x) for k in models}
    sessions = {k: _session(p, threads) for k, p in paths.items()}
    feed = {k: {s.get_inputs()[0].name: x.numpy()} for k, s in sessions.items()}
    timed = time_interleaved({k: (lambda k=k: sessions[k].run(None, feed[k])) for k in sessions},
                             warmup=warmup, repeats=repeats)
    ms = {k: t.median_ms for k, t in timed.items()}
    theory = sk.flops(dense, x).total / sk.flops(fast, x).total
    measured = ms["dense"] / ms["fast"]
    return {"model": name, "ratio": ratio, "batch": batch, "size": size, "ms": ms,
            "spread": {k: t.spread for k, t in timed.items()}, "theoretical_speedup": theory,
            "measured_speedup": measured, "efficiency": measured / theory, "max_rel_error": errors}


def run(*, threads: int = 2, warmup: int = 10, repeats: int = 30) -> dict[str, Any]:
    """Every case of :data:`CASES` (module docstring); returns a JSON-able document."""
    import onnxruntime

    env = environment("cpu")
    env.update(onnxruntime=onnxruntime.__version__, threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        rows = [_case(*case, threads, warmup, repeats, Path(folder)) for case in CASES]
    return {"environment": env, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    lines = [f"{'model':>9} {'pruned':>6} {'batch':>5} {'dense ms':>9} {'compiled ms':>11} {'theory':>7} "
             f"{'measured':>8} {'efficiency':>10} {'spread':>7}"]
    for r in doc["rows"]:
        lines.append(f"{r['model']:>9} {r['ratio']:>6.0%} {r['batch']:>5} {r['ms']['dense']:>9.2f} "
                     f"{r['ms']['fast']:>11.2f} {r['theoretical_speedup']:>6.2f}x {r['measured_speedup']:>7.2f}x "
                     f"{r['efficiency']:>10.2f} {max(r['spread'].values()):>7.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsekern.bench.onnx_models [--threads N] [--out PATH]``: print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m sparsekern.bench.onnx_models", description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--out", help="merge the results into this JSON under the key 'onnx'")
    args = p.parse_args(argv)
    doc = run(threads=args.threads, warmup=args.warmup, repeats=args.repeats)
    print(table(doc))
    if args.out:
        write_part(args.out, {"command": command_line(), **doc}, "onnx")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
