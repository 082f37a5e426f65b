"""Random graphs x random plans: every plan compiles to exactly the masked reference, or is refused with a
PlanError/GraphError that names a layer of the model. Never a silently wrong model, never another crash.

The normal suite runs a few hundred cases. The long run is opt-in:
``SPARSEKERN_FUZZ_CASES=10000 python -m pytest tests/fuzz -m slow -s`` prints the counts per outcome.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest
import torch

import sparsekern as sk
from sparsekern.graph import GraphError, trace_channels
from sparsekern.plan import PlanError
from tests.fuzz.generator import NOT_MASKS, random_model, random_plan

CI_CASES = 300
TOLERANCE = 1e-4  # of the output scale, as in tests/conftest.py assert_close_to_scale


def run_case(seed: int) -> tuple[str, str]:
    """Outcome of one random model and plan: ("exact" | "refused" | "wrong" | "crash", detail)."""
    model, x = random_model(seed)
    names = {n for n, _ in model.named_modules() if n}
    rng = np.random.default_rng(seed + 7)
    round_to = int(rng.choice([2, 3, 4])) if rng.random() < 0.2 else None
    styles: list[str] = []
    try:
        plan = random_plan(model, x, seed, styles)
        fast = sk.compile(model, plan, x, round_to=round_to)
        ref = sk.masked(model, fast.sk_plan, x)
        with torch.no_grad():
            out, expected = fast(x), ref(x)
    except (PlanError, GraphError) as e:
        # a layer, or a dependency group (the key a plan uses; an untracked concat piece is one too)
        try:
            names |= set(trace_channels(model, x).groups)
        except GraphError:
            pass
        if any(f"'{n}'" in str(e) for n in names):
            return "refused", str(e)
        return "crash", f"{type(e).__name__} that names no layer: {e}"
    except Exception as e:  # noqa: BLE001 (any other exception is what this test looks for)
        return "crash", f"{type(e).__name__}: {e}"
    if set(styles) & set(NOT_MASKS):
        return "wrong", f"masks of styles {styles} are not all keep masks, but the plan was accepted"
    if out.shape != expected.shape:
        return "wrong", f"output shape {tuple(out.shape)} != {tuple(expected.shape)}"
    err = float((out - expected).abs().max() / expected.abs().max().clamp_min(1e-12))
    if not err <= TOLERANCE:
        return "wrong", f"max error {err:.3e} x output scale (round_to={round_to})"
    return "exact", ""


@pytest.mark.parametrize("seed", range(CI_CASES))
def test_random_plan_on_random_graph_is_exact_or_refused(seed: int) -> None:
    outcome, detail = run_case(seed)
    assert outcome in ("exact", "refused"), f"seed {seed}: {outcome}: {detail}"


def test_random_cases_exercise_both_outcomes() -> None:
    """The generator must produce plans that compile, not only ones that are refused (or the test above could
    pass without compiling anything)."""
    outcomes = Counter(run_case(seed)[0] for seed in range(40))
    assert outcomes["exact"] >= 10 and outcomes["refused"] >= 5, dict(outcomes)


@pytest.mark.slow
@pytest.mark.skipif("SPARSEKERN_FUZZ_CASES" not in os.environ,
                    reason="long fuzz run: set SPARSEKERN_FUZZ_CASES (e.g. 10000) to run it")
def test_many_random_plans() -> None:
    cases = int(os.environ["SPARSEKERN_FUZZ_CASES"])
    counts: Counter[str] = Counter()
    failures: list[str] = []
    for seed in range(CI_CASES, CI_CASES + cases):  # beyond the seeds the normal suite runs
        outcome, detail = run_case(seed)
        counts[outcome] += 1
        if outcome in ("wrong", "crash"):
            failures.append(f"seed {seed}: {outcome}: {detail}")
    summary = ", ".join(f"{k} {counts[k]}" for k in ("exact", "refused", "wrong", "crash"))
    print(f"\nfuzz: {cases} random plans: {summary}")
    assert not failures, f"{summary}\n" + "\n".join(failures[:20])
