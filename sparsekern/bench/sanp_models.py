"""SANP at ImageNet size: dense vs per-sample vs hybrid ResNet-18 and ResNet-50 with learned-structure gates.

Training SANP on ImageNet is out of reach here, so the gates are set by hand to the structure SANP learns
(bench/results/sanp_digits.json: most channels of a layer always on or never on, a minority switching, the
kept fraction varying from layer to layer). For each gated layer of the SANP form (:func:`sparsekern.methods.
sanp.to_sanp`, random weights, BN statistics randomized), with C outputs and a target kept fraction ``k``:

* ``round(switching * C)`` channels **switch**: their SPM logit is a random linear function of the SPM's
  hidden features, its bias set to minus the median over reference images, so each is on for about half of
  the images (three passes, since the inputs of later layers change with earlier biases);
* ``round((k - switching / 2) * C)`` channels are **always on** and the rest **never on** (zero weights,
  bias +1 or -1); which ones is a random permutation per layer;
* ``k = clip(scale * u, 0.05, 1)`` with ``u`` uniform in [0.5, 1.5] per layer and ``scale`` found by
  bisection so that the mean cost over the reference images is ``--cost`` of the dense FLOPs.

Then the plan is calibrated on the reference images (:func:`sparsekern.dynamic.calibrate`), and the dense
model, the per-sample compile (channel-skipping layers, ``sk.optimize``'s CPU passes) and the hybrid compile
(static part traced by the ``script`` pass, dense baseline too) are timed on other random images
(``sk.bench.compare``: interleaved medians). Efficiency = measured / theoretical speedup, the theoretical one
from the per-sample FLOPs of the timed batch. Per gated layer the JSON records the classes and the channels the
static part computes. Run by hand::

    python -m sparsekern.bench.sanp_models --out bench/results/cpu.json
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from sparsekern.bench.results import command_line, write_part
from sparsekern.bench.timing import SERVING_BLOCK, environment

__all__ = ["CASES", "learned_structure", "run", "table", "main"]

#: (zoo model, batch, image size)
CASES = (("resnet18", 8, 224), ("resnet50", 8, 224))


def _gate_hidden(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per gated layer, the SPM's hidden features (B, hidden) on ``x`` (eval mode)."""
    from sparsekern.methods import sanp

    seen: dict[str, torch.Tensor] = {}
    handles = [u.gate.fc1.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, torch.relu(o)))
               for n, u in sanp.gated_layers(model).items() if u.gate is not None]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def learned_structure(model: torch.nn.Module, x: torch.Tensor, *, cost: float = 0.5, switching: float = 0.15,
                      seed: int = 0, steps: int = 12) -> float:
    """Set the SPM gates of a SANP-form ``model`` (in place) to the structure of the module docstring so that
    the mean cost over ``x`` is about ``cost``; returns the mean cost reached."""
    from sparsekern.methods import sanp

    g = torch.Generator().manual_seed(seed)
    units = {n: u for n, u in sanp.gated_layers(model).items() if u.gate is not None}
    order = {n: torch.randperm(u.out_channels, generator=g) for n, u in units.items()}
    spread = {n: 0.5 + torch.rand((), generator=g).item() for n in units}
    directions = {n: torch.randn(u.gate.fc2.weight.shape, generator=g) for n, u in units.items()}
    full = sanp.cost_reference(model, x[:2]).full
    switches: dict[str, torch.Tensor] = {}

    def apply(scale: float) -> float:
        for n, u in units.items():
            c = u.out_channels
            keep = min(max(scale * spread[n], 0.05), 1.0)
            n_switch = min(round(switching * c), round(2 * keep * c), round(2 * (1 - keep) * c))
            n_always = max(0, min(c - n_switch, round(keep * c - n_switch / 2)))
            roles = torch.full((c,), -1.0)
            roles[order[n][:n_always]] = 1.0
            switch = order[n][n_always:n_always + n_switch]
            fc2 = u.gate.fc2
            with torch.no_grad():
                fc2.weight.zero_()
                fc2.bias.copy_(roles)
                fc2.weight[switch] = directions[n][switch]
                fc2.bias[switch] = 0.0
            switches[n] = switch
        for _ in range(3):  # centre each switching logit on the median over x, so it is on for about half
            hidden = _gate_hidden(model, x)
            for n, u in units.items():
                fc2, switch = u.gate.fc2, switches[n]
                if len(switch):
                    with torch.no_grad():
                        logits = hidden[n] @ fc2.weight[switch].T
                        fc2.bias[switch] = -logits.median(0).values
        return float(sanp.cost_ratio(model, x, full=full).mean())

    lo, hi = 0.0, 2.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if apply(mid) < cost else (lo, mid)
    return apply((lo + hi) / 2)


def _case(name: str, batch: int, size: int, args: argparse.Namespace) -> dict[str, Any]:
    import sparsekern as sk
    from sparsekern.dynamic import calibrate
    from sparsekern.methods import sanp
    from sparsekern.models import build
    from sparsekern.passes import DEVICE_PASSES

    torch.manual_seed(args.seed)
    dense = build(name).eval()
    _randomize_bn(dense)
    model = sanp.to_sanp(dense, granularity=1).eval()
    g = torch.Generator().manual_seed(args.seed)
    reference = torch.randn(args.calibration, 3, size, size, generator=g)
    x = torch.randn(batch, 3, size, size, generator=g)
    reached = learned_structure(model, reference[:16], cost=args.cost, seed=args.seed)
    plan = sanp.to_plan(model, x)
    calibrated = calibrate(plan, model, reference)
    rows = []
    for path, compiled, passes in (("per-sample", sk.compile(model, plan, x), DEVICE_PASSES["cpu"]),
                                   ("hybrid", sk.compile(model, calibrated, x), DEVICE_PASSES["cpu"] + ("script",))):
        compiled.eval()
        with torch.no_grad():
            want = sk.masked(model, plan, x).eval()(x)
            error = float((compiled(x) - want).abs().max() / want.abs().max())
        bench = sk.bench.compare(dense, compiled, x, passes=passes, threads=args.threads, warmup=args.warmup,
                                 repeats=args.repeats, per_layer=False, label=f"sanp {name} {path}", block=args.block)
        print(f"{name} {path:>10}: theory {bench.theoretical_speedup:.2f}x measured {bench.measured_speedup:.2f}x "
              f"efficiency {bench.efficiency:.2f}", flush=True)
        rows.append({"path": path, "passes": list(passes), "max_rel_error": error,
                     "theoretical_speedup": bench.theoretical_speedup, "measured_speedup": bench.measured_speedup,
                     "efficiency": bench.efficiency, "dense_ms": bench.dense.median_ms,
                     "compiled_ms": bench.fast.median_ms, "spread": max(bench.dense.spread, bench.fast.spread)})
    hybrid = sk.compile(model, calibrated, x).eval()
    parts = dict(hybrid.fast.named_modules())
    layers = {n: {"channels": spec.out_channels, "never_on": len(spec.never_on or ()),
                  "always_on": len(spec.always_on or ()), "computed": getattr(parts[n], "out_channels", 0)}
              for n, spec in calibrated.dynamic_layers().items() if spec.gated}
    return {"model": name, "batch": batch, "size": size, "cost": reached, "calibration_samples": args.calibration,
            "static_over_per_sample_flops": sk.flops(hybrid.fast, x).total / sk.flops(hybrid, x).total,
            "timings": rows, "layers": layers}


def _randomize_bn(model: torch.nn.Module) -> None:
    """Random BN statistics and affine parameters (a trained network's are not 0/1), seeded by the caller."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every case of :data:`CASES` named in ``args.models``; a JSON-able document."""
    env = environment("cpu")
    env.update(threads=args.threads, dtype="float32")
    rows = [_case(name, batch, size, args) for name, batch, size in CASES if name in args.models]
    return {"environment": env, "cost": args.cost, "rows": rows}


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    lines = [f"{'model':>9} {'batch':>5} {'cost':>5} {'path':>10} {'dense ms':>9} {'compiled ms':>11} {'theory':>7} "
             f"{'measured':>8} {'efficiency':>10} {'spread':>7}"]
    for r in doc["rows"]:
        for t in r["timings"]:
            lines.append(f"{r['model']:>9} {r['batch']:>5} {r['cost']:>5.0%} {t['path']:>10} {t['dense_ms']:>9.1f} "
                         f"{t['compiled_ms']:>11.1f} {t['theoretical_speedup']:>6.2f}x {t['measured_speedup']:>7.2f}x "
                         f"{t['efficiency']:>10.2f} {t['spread']:>7.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m sparsekern.bench.sanp_models [--models ...] [--out PATH]``: print the table, write JSON."""
    p = argparse.ArgumentParser(prog="python -m sparsekern.bench.sanp_models", description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    p.add_argument("--cost", type=float, default=0.5, help="target mean cost (fraction of the dense FLOPs)")
    p.add_argument("--calibration", type=int, default=64, help="random reference images (calibration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--block", type=int, default=SERVING_BLOCK, help="timed runs of a model per turn (time_interleaved)")
    p.add_argument("--out", help="merge the results into this JSON under the key 'sanp_models'")
    args = p.parse_args(argv)
    doc = run(args)
    print(table(doc))
    if args.out:
        write_part(args.out, {"command": command_line(), **doc}, "sanp_models")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
