"""Benchmark of the fused SRU recurrence (:func:`sparsekern.ops.sru_recurrence`) against the plain-torch loop.

The SRU paper (Lei et al., "Simple Recurrent Units for Highly Parallelizable Recurrence", EMNLP 2018) claims the
recurrence costs little next to the matrix products once it is one kernel; this measures it on a dense
:class:`~sparsekern.models.lm.SRULM` (random weights; default d = 1024, 4 layers, one sequence of 512 bytes), the
same weights run twice: ``fused`` (``fused=True``: the op's C++ kernels, forward and backward) and ``loop``
(``fused=False``: the elementwise loop, about five small ops per time step, differentiated by autograd). Rows:

* ``forward``: the model's forward under ``torch.inference_mode``;
* ``train_step``: forward, cross-entropy on the next byte, backward (gradients of every parameter; no optimiser);
* ``recurrence``: the recurrence alone on one layer's inputs u (B, T, 3d), x (B, T, d), forward only;
* ``recurrence_train``: the recurrence alone, forward and backward.

Each row times both candidates interleaved (:func:`~sparsekern.bench.timing.time_interleaved`: median, spread =
IQR / median) at ``threads`` intra-op threads and reports ``speedup`` = loop / fused and the largest difference of
the outputs relative to their scale; ``recurrence_share`` estimates the recurrence's share of the forward
(layers x ``recurrence`` / ``forward``) for each candidate. Tests never time; this module is run by hand::

    python -m sparsekern.bench.kernel_sru --threads 2 --out /tmp/sru.json
"""
from __future__ import annotations

import argparse
import copy
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sparsekern.bench.results import command_line, write_part
from sparsekern.bench.timing import environment, set_threads, time_interleaved
from sparsekern.models.lm import SRULM, SRURecurrence
from sparsekern.ops.sru_recurrence import select_backend

__all__ = ["run", "table", "main"]


def _models(d_model: int, layers: int, seed: int) -> tuple[SRULM, SRULM]:
    torch.manual_seed(seed)
    fused = SRULM(d_model=d_model, layers=layers, fused=True)
    loop = copy.deepcopy(fused)
    for m in loop.modules():
        if isinstance(m, SRURecurrence):
            m.fused = False
    return fused, loop


def _train_step(model: SRULM, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        return logits.detach()

    return step


def _recurrence(cell: SRURecurrence, u: torch.Tensor, x: torch.Tensor, fused: bool,
                train: bool) -> Callable[[], torch.Tensor]:
    def call() -> torch.Tensor:
        cell.fused = fused
        if not train:
            with torch.inference_mode():
                return cell(u, x)
        uu, xx = u.detach().requires_grad_(), x.detach().requires_grad_()
        h = cell(uu, xx)
        h.sum().backward()
        return uu.grad

    return call


def _error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


def _row(name: str, fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, Any]:
    error = _error(fns["fused"](), fns["loop"]())  # also the first calls: the extension's build, allocator warm-up
    timed = time_interleaved(fns, warmup=warmup, repeats=repeats)
    ms = {k: v.median_ms for k, v in timed.items()}
    return {"name": name, "ms": ms, "spread": {k: v.spread for k, v in timed.items()},
            "speedup": ms["loop"] / ms["fused"], "max_rel_error": error, "repeats": repeats}


def run(*, d_model: int = 1024, layers: int = 4, tokens: int = 512, batch: int = 1, threads: int | None = 2,
        warmup: int = 3, repeats: int = 15, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Time the fused recurrence against the loop (module docstring); returns a JSON-able document.

    Args:
        d_model, layers: the SRU's width and depth.
        tokens: the sequence length T; the model reads ``tokens`` bytes and predicts the next (T = tokens).
        batch: sequences per call.
        threads: intra-op threads while timing (``None``: leave as is).
        warmup, repeats: untimed and timed interleaved rounds per row.
        seed: weights and bytes.
        progress: print each row to stderr when done.

    Returns:
        ``{"op", "environment", "config", "backend", "rows"}``; each row has per candidate its median ms and
        spread, ``speedup`` (loop / fused) and ``max_rel_error`` (fused against loop, relative to the scale).
    """
    fused, loop = _models(d_model, layers, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, tokens + 1), generator=g)
    u, xr = torch.randn(batch, tokens, 3 * d_model, generator=g), torch.randn(batch, tokens, d_model, generator=g)
    cell = copy.deepcopy(fused.layers[0].rnn)
    rows = []
    with set_threads(threads):
        env = environment("cpu")
        env.update(dtype="float32", batch=batch)

        def forward(model: SRULM) -> Callable[[], torch.Tensor]:
            def call() -> torch.Tensor:
                with torch.inference_mode():
                    return model(x[:, :-1])

            return call

        cases = {
            "forward": {"fused": forward(fused), "loop": forward(loop)},
            "train_step": {"fused": _train_step(fused, x), "loop": _train_step(loop, x)},
            "recurrence": {"fused": _recurrence(cell, u, xr, True, False),
                           "loop": _recurrence(cell, u, xr, False, False)},
            "recurrence_train": {"fused": _recurrence(cell, u, xr, True, True),
                                 "loop": _recurrence(cell, u, xr, False, True)},
        }
        for name, fns in cases.items():
            rows.append(_row(name, fns, warmup, repeats))
            if progress:
                r = rows[-1]
                print(f"{name}: fused {r['ms']['fused']:.2f} ms, loop {r['ms']['loop']:.2f} ms, "
                      f"{r['speedup']:.2f}x", file=sys.stderr, flush=True)
    backend = select_backend(u, xr, cell.v_f, cell.v_r, cell.b_f, cell.b_r)
    config = {"d_model": d_model, "layers": layers, "tokens": tokens, "batch": batch, "seed": seed}
    ms = {r["name"]: r["ms"] for r in rows}
    share = {k: layers * ms["recurrence"][k] / ms["forward"][k] for k in ("fused", "loop")}
    return {"op": "sru_recurrence", "environment": env, "config": config, "backend": backend, "rows": rows,
            "recurrence_share": share}


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    env, cfg = doc["environment"], doc["config"]
    head = (f"SRU d={cfg['d_model']}, {cfg['layers']} layers, {cfg['batch']} x {cfg['tokens']} tokens on "
            f"{env['device_name']} ({env['threads']} threads, torch {env['torch']}); fused backend "
            f"{doc['backend']!r}; median ms (spread = IQR / median)")
    lines = [head, f"{'row':>17} {'fused':>16} {'loop':>16} {'speedup':>8} {'max err':>9}"]
    for r in doc["rows"]:
        ms, sp = r["ms"], r["spread"]
        lines.append(f"{r['name']:>17} {ms['fused']:>9.2f} ({sp['fused']:>4.0%}) {ms['loop']:>9.2f} "
                     f"({sp['loop']:>4.0%}) {r['speedup']:>7.2f}x {r['max_rel_error']:>9.1e}")
    share = doc["recurrence_share"]
    lines.append(f"recurrence's share of the forward (layers x recurrence / forward): fused {share['fused']:.1%}, "
                 f"loop {share['loop']:.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsekern.bench.kernel_sru [--threads N] [--out PATH] ...``: print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m sparsekern.bench.kernel_sru", description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", default=None, help="write the JSON document here")
    args = p.parse_args(argv)
    doc = run(d_model=args.d_model, layers=args.layers, tokens=args.tokens, batch=args.batch, threads=args.threads,
              warmup=args.warmup, repeats=args.repeats)
    print(table(doc))
    if args.out:
        write_part(args.out, {"command": command_line(), **doc}, "kernels", "sru_recurrence/cpu/float32")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
