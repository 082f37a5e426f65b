"""PNG plots of benchmark results (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from sparsekern.bench.report import BenchReport

__all__ = ["plot_speedup", "plot_layers"]


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _as_dict(r: Any) -> dict[str, Any]:
    return r.to_dict() if hasattr(r, "to_dict") else dict(r)


def _theory(d: dict[str, Any]) -> float:
    if d.get("theoretical_speedup") is not None:
        return float(d["theoretical_speedup"])
    return float(d["dense_flops"]) / float(d["fast_flops"])


def _series_key(d: dict[str, Any]) -> tuple[str, str]:
    """(model and batch, inference path): one line per pair, across pruning ratios."""
    case = d.get("case") or {}
    model = case.get("model") or d.get("model") or d.get("label") or "model"
    batch = d.get("batch")
    group = f"{model} (batch {batch})" if batch is not None else str(model)
    return group, " + ".join(case.get("passes", ()))


def plot_speedup(
    results: list[dict[str, Any]] | list["BenchReport"],
    path: str | os.PathLike[str],
    *,
    x: Literal["theoretical", "reduction"] = "theoretical",
    title: str | None = None,
) -> str:
    """Measured speedup against theoretical speedup (or FLOP reduction), one series per
    (model, batch), with the ideal curve.

    Args:
        results: :meth:`BenchReport.to_dict` dicts (or reports). Each needs
            ``measured_speedup`` and ``theoretical_speedup`` (or ``dense_flops`` + ``fast_flops``);
            the series is ``model`` (else ``label``) and ``batch``.
        path: PNG to write.
        x: ``"theoretical"``: x = dense FLOPs / fast FLOPs, ideal y = x;
            ``"reduction"``: x = 1 - fast FLOPs / dense FLOPs, ideal y = 1 / (1 - x).
        title: figure title (default names the device when all results share one).

    Returns:
        ``str(path)``.
    """
    plt = _pyplot()
    rows = [_as_dict(r) for r in results]
    series: OrderedDict[tuple[str, str], list[tuple[float, float]]] = OrderedDict()
    for d in rows:
        theory = _theory(d)
        xv = theory if x == "theoretical" else 1.0 - 1.0 / theory
        series.setdefault(_series_key(d), []).append((xv, float(d["measured_speedup"])))

    fig, ax = plt.subplots(figsize=(10.5, 5), dpi=120)
    xs_all = [p[0] for pts in series.values() for p in pts]
    ys_all = [p[1] for pts in series.values() for p in pts]
    if x == "theoretical":
        hi = max(xs_all + ys_all + [2.0]) * 1.08
        ax.plot([1.0, hi], [1.0, hi], "--", color="0.45", lw=1.2, label="ideal (measured = theoretical)")
        ax.set_xlim(1.0 if min(xs_all, default=1) >= 1 else 0.0, hi)
        ax.set_xlabel("theoretical speedup (dense FLOPs / pruned FLOPs)")
    else:
        top = min(max(xs_all + [0.5]) + 0.05, 0.98)
        grid = [i * top / 100 for i in range(101)]
        ax.plot(grid, [1.0 / (1.0 - g) for g in grid], "--", color="0.45", lw=1.2,
                label="ideal: 1 / (1 - reduction)")
        ax.set_xlim(0.0, top)
        ax.set_xlabel("FLOP reduction (1 - pruned / dense)")
    ax.axhline(1.0, color="0.7", lw=0.8, ls=":")
    groups = list(dict.fromkeys(k[0] for k in series))
    pipelines = list(dict.fromkeys(k[1] for k in series))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [("o", "-"), ("s", "--"), ("^", ":"), ("D", "-.")]
    for (group, pipeline), pts in series.items():
        pts.sort()
        marker, line = styles[pipelines.index(pipeline) % len(styles)]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, ls=line, ms=6, lw=1.5,
                color=palette[groups.index(group) % len(palette)], label=f"{group} {pipeline}".strip())
    ax.set_ylim(0.0, max(ys_all + [ax.get_xlim()[1] if x == "theoretical" else 2.0]) * 1.05)
    ax.set_ylabel("measured speedup (dense time / pruned time)")
    if title is None:
        devices = {d.get("device_name") or d.get("device") for d in rows}
        title = "measured vs theoretical speedup"
        if len(devices) == 1 and None not in devices:
            title += f"\n{devices.pop()}"
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)


def plot_layers(
    report: "BenchReport | dict[str, Any]",
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
) -> str:
    """Horizontal bar chart of per-layer efficiency (measured / theoretical speedup).

    The first bar is the whole model; each bar is annotated with its theoretical and measured
    speedup; the line at 100 % is a perfect conversion of FLOPs into time.

    Returns:
        ``str(path)``.
    """
    plt = _pyplot()
    d = _as_dict(report)
    names = ["<model>"]
    eff = [d["efficiency"]]
    notes = [f"{d['theoretical_speedup']:.2f}x theory, {d['measured_speedup']:.2f}x measured"]
    for row in d.get("layers", []):
        names.append(row["name"])
        eff.append(row["efficiency"] if row["efficiency"] is not None else 0.0)
        th = row["theoretical_speedup"]
        notes.append(f"{th:.2f}x theory, {row['measured_speedup']:.2f}x measured"
                     if th is not None else f"{row['measured_speedup']:.2f}x measured")
    pct = [100.0 * e for e in eff]

    height = max(2.5, 0.32 * len(names) + 1.4)
    fig, ax = plt.subplots(figsize=(8, height), dpi=120)
    ypos = list(range(len(names)))[::-1]
    colors = ["#444444"] + ["#2a7ab9" if p >= 100 else "#d9822b" for p in pct[1:]]
    ax.barh(ypos, pct, color=colors, height=0.7)
    ax.set_yticks(ypos)
    ax.set_yticklabels(names, fontsize=8)
    ax.axvline(100.0, color="0.3", ls="--", lw=1)
    right = max(pct + [100.0]) * 1.55
    ax.set_xlim(0.0, right)
    for y, p, note in zip(ypos, pct, notes):
        ax.text(p + right * 0.01, y, f"{p:.0f}%  ({note})", va="center", fontsize=7)
    ax.set_xlabel("efficiency = measured speedup / theoretical speedup (%)")
    if title is None:
        title = (f"{d.get('label') or 'per-layer efficiency'}: {d.get('device_name', d.get('device'))}, "
                 f"{d.get('dtype')}, batch {d.get('batch')}, {d.get('threads')} threads")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return str(path)
