"""Reading a ``sparsekern bench gpu`` document (:mod:`sparsekern.bench.gpu`): the dispatch thresholds its kernel
rows imply, the issue's GPU goals against what it measured, and its summary table.

Step records are ``{"status", "seconds", "reason", "result"}``; a kernel step's ``result`` is a
:func:`sparsekern.bench.kernel_channel_skip_conv2d.run` or :func:`sparsekern.bench.kernel_lowrank_linear.run`
document (``op``, ``environment``, ``rows``); model rows are those of ``results``. Only rows measured on CUDA count
for thresholds and goals.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

__all__ = ["derive_thresholds", "goals", "summary_table"]


def _cuda_docs(steps: dict[str, dict[str, Any]], dtype: str | None = None) -> list[dict[str, Any]]:
    """The kernel documents of the finished steps measured on CUDA (in ``dtype`` when given)."""
    docs = []
    for rec in steps.values():
        doc = rec.get("result")
        if rec.get("status") == "ok" and isinstance(doc, dict) and "rows" in doc \
                and doc.get("environment", {}).get("device") == "cuda" \
                and (dtype is None or doc["environment"].get("dtype") == dtype):
            docs.append(doc)
    return docs


def _geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def _faster_first(ms: dict[str, list[float]], names: tuple[str, ...]) -> list[str] | None:
    """``names`` ordered by the geometric mean of their times over the rows that timed all of them."""
    if not all(ms.get(n) for n in names) or len({len(ms[n]) for n in names}) != 1:
        return None
    return sorted(names, key=lambda n: _geomean(ms[n]))


def derive_thresholds(steps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dispatch thresholds from the GPU kernel rows of ``steps`` (keys of
    :class:`sparsekern.ops.thresholds.GpuThresholds`; a threshold without data is left out).

    * ``lowrank_min_fused_tokens``: over the fp16 ``lowrank_linear`` rows with r <= 256, the smallest token
      count T such that at T and every larger measured count the median ``fused_vs_two_gemm`` is >= 1
      (one more than the largest count when fusion never wins).
    * ``lowrank_fused_order`` / ``channel_skip_order``: ``cuda`` and ``triton`` ordered by the geometric mean
      of their times over the rows that timed both.
    """
    by_tokens: dict[int, list[float]] = {}
    lr_ms: dict[str, list[float]] = {"cuda": [], "triton": []}
    cs_ms: dict[str, list[float]] = {"cuda": [], "triton": []}
    for doc in _cuda_docs(steps):
        for row in doc["rows"]:
            if doc.get("op") == "lowrank_linear":
                if "fused_vs_two_gemm" in row and row["r"] <= 256 and doc["environment"]["dtype"] == "float16":
                    by_tokens.setdefault(row["tokens"], []).append(row["fused_vs_two_gemm"])
                if "cuda" in row["ms"] and "triton" in row["ms"]:
                    for k in lr_ms:
                        lr_ms[k].append(row["ms"][k])
            elif doc.get("op") == "channel_skip_conv2d" and {"cuda", "triton"} <= set(row["kernels"]):
                for k in cs_ms:
                    cs_ms[k].append(row["kernels"][k]["ms"])
    out: dict[str, Any] = {}
    if by_tokens:
        counts = sorted(by_tokens)
        wins = [statistics.median(by_tokens[t]) >= 1.0 for t in counts]
        first = len(counts)
        while first > 0 and wins[first - 1]:
            first -= 1
        out["lowrank_min_fused_tokens"] = counts[first] if first < len(counts) else counts[-1] + 1
    for key, ms in (("lowrank_fused_order", lr_ms), ("channel_skip_order", cs_ms)):
        order = _faster_first(ms, ("cuda", "triton"))
        if order:
            out[key] = order
    return out


def goals(steps: dict[str, dict[str, Any]], results: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's GPU targets against the measurements (``measured`` None while unmeasured):

    * ``resnet50_static_efficiency_b64_fp16`` >= 0.9 (best of the 50 % and 30 % rows at batch 64 in fp16);
    * ``channel_skip_efficiency_keep0.5_b8plus`` >= 0.8 (median over fp16 rows at keep 0.5, batch >= 8);
    * ``lowrank_fused_vs_two_gemm_r128_t1024plus`` >= 1.2 (median over fp16 rows with r <= 128, >= 1024 tokens).
    """
    rn = [r["efficiency"] for r in results if r["case"]["model"] == "resnet50" and r["case"]["method"] == "l1"
          and r["case"]["batch"] == 64 and r["case"]["dtype"] == "float16" and r["device"] == "cuda"]
    cs, lr = [], []
    for doc in _cuda_docs(steps, "float16"):
        for row in doc["rows"]:
            if doc.get("op") == "channel_skip_conv2d" and row["keep"] == 0.5 and row["batch"] >= 8:
                cs.append(row["efficiency"])
            if doc.get("op") == "lowrank_linear" and row["r"] <= 128 and row["tokens"] >= 1024 \
                    and "fused_vs_two_gemm" in row:
                lr.append(row["fused_vs_two_gemm"])
    measured = {"resnet50_static_efficiency_b64_fp16": (max(rn) if rn else None, 0.9),
                "channel_skip_efficiency_keep0.5_b8plus": (statistics.median(cs) if cs else None, 0.8),
                "lowrank_fused_vs_two_gemm_r128_t1024plus": (statistics.median(lr) if lr else None, 1.2)}
    return {k: {"measured": v, "target": t, "met": None if v is None else v >= t} for k, (v, t) in measured.items()}


def _figure(rec: dict[str, Any]) -> str:
    """The one figure that says most about a finished step."""
    res = rec.get("result")
    if not isinstance(res, dict):
        return ""
    if "device_name" in res:
        return (f"{res['device_name']}, torch {res.get('torch')}, CUDA {res.get('cuda')}, Triton {res.get('triton')}, "
                f"git {res.get('git')}")
    if "counts" in res:
        return ", ".join(f"{n} {k}" for k, n in res["counts"].items())
    if "efficiency" in res and "theoretical_speedup" in res:
        return (f"theo {res['theoretical_speedup']:.2f}x, measured {res['measured_speedup']:.2f}x, "
                f"eff {res['efficiency']:.2f} ({res['dense_ms']:.2f} -> {res['fast_ms']:.2f} ms)")
    rows = res.get("rows")
    if rows is not None:
        done = f"{len(rows)} of {res.get('cases', len(rows))} rows"
        if rows and res.get("op") == "channel_skip_conv2d":
            return f"{done}, median eff {statistics.median(r['efficiency'] for r in rows):.2f}"
        fused = [r["fused_vs_two_gemm"] for r in rows if "fused_vs_two_gemm" in r]
        return done + (f", median fused/two-GEMM {statistics.median(fused):.2f}x" if fused else "")
    if "kernels" in res:
        return ", ".join(k for k, ok in res["kernels"].items() if ok) or "no native kernel"
    if res and all(isinstance(v, dict) and "max_rel_error" in v for v in res.values()):
        return f"{len(res)} kernels, max error {max(v['max_rel_error'] for v in res.values()):.1e} x scale"
    return ", ".join(f"{k}={v}" for k, v in res.items() if isinstance(v, (int, str, list)))[:80]


def summary_table(doc: dict[str, Any]) -> str:
    """One line per step (status, seconds, its main figure), then the goals."""
    env = doc.get("environment") or {}
    lines = [f"sparsekern bench gpu ({doc['mode']}) on {env.get('device_name')} (capability "
             f"{env.get('capability')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, driver {env.get('driver')}, "
             f"Triton {env.get('triton')}); budget {doc['budget_s']:.0f} s",
             f"{'step':32} {'status':8} {'s':>6}  result"]
    for name, rec in doc["steps"].items():
        text = _figure(rec) if rec["status"] == "ok" else rec.get("reason", "")
        lines.append(f"{name:32} {rec['status']:8} {rec['seconds']:6.1f}  {text[:110]}")
    lines.append("goals:")
    for name, g in (doc.get("goals") or {}).items():
        value = "unmeasured" if g["measured"] is None else f"{g['measured']:.2f} ({'met' if g['met'] else 'NOT met'})"
        lines.append(f"  {name}: {value}, target >= {g['target']}")
    return "\n".join(lines)
