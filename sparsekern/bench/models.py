"""Model-level benchmark suite: uniform L1-norm channel pruning of zoo models, dense vs compiled.

Each case builds a zoo model, plans uniform L1-norm pruning of every unpinned channel group
(``scope="all"``: residual streams included, logits never), compiles it with channel rounding, and times
dense and compiled through the same inference passes with :func:`~sparsekern.bench.report.compare`.
The suite writes one JSON file per device (``bench/results/<device>.json``) that the README cites.

Two CPU inference paths are measured, because neither wins everywhere: ``("fold_bn", "freeze")`` runs
oneDNN's blocked layout (best for wide layers at larger batches), ``("fold_bn", "onednn")`` runs NHWC with
shape-specialised prepacking and fused ReLU/residual adds (best for narrow layers and batch-1 latency).

Besides uniform L1 pruning (``method="l1"``, ``ratio`` = fraction of channels pruned), a case can measure the
dynamic and low-rank compilers on untrained models (speed does not depend on training, only on what is kept):

* ``method="sanp"``: the SANP form (:mod:`sparsekern.methods.sanp`) of a zoo CNN with random gates (zero-bias,
  random saliency weights: each channel kept for about half the samples), compiled to channel-skipping layers,
  against the plain dense model.
* ``method="flop"``: a zoo LM factorized (:mod:`sparsekern.methods.flop`, rank ``in * out / (in + out)``, the
  dense parameter count) with a fraction ``ratio`` of every gated layer's components (rank components, or input
  features of the SRU's first layer) gated off at random, compiled to low-rank layers, against the dense LM;
  ``size`` is the context (tokens per sequence), inputs are random bytes, ``model_kwargs`` the LM's size
  (default d_model 128, 2 layers). :data:`LM_CASES` are the real-size set: a GPT-2-small-like Transformer
  (d_model 768, 12 heads, 512 tokens, 4 layers) and an SRU of d_model 1024 (4 layers), at kept ranks 0.5,
  0.3 and 0.15, through ``sk.optimize(..., script=True)``'s CPU path, and the same Transformer with half of
  every block's heads and MLP neurons removed by L1-norm pruning (``method="l1"`` on a ``*_lm`` model: random
  byte inputs).

``device``/``dtype`` move both models and the input after compiling (GPU cases: e.g. ``"cuda"``, ``"float16"``,
passes ``("fold_bn", "channels_last")``); ``cuda_graphs`` replays each model from a CUDA graph
(:class:`~sparsekern.bench.timing.CudaGraphed`), the passes applied before capture.
"""
from __future__ import annotations

import copy
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from sparsekern.bench.report import BenchReport, compare
from sparsekern.bench.results import command_line, write_part
from sparsekern.bench.timing import SERVING_BLOCK, CudaGraphed, environment
from sparsekern.passes import DEVICE_PASSES

#: The CPU path of ``sk.optimize(model, x, script=True)``, the default of the static cases.
DEFAULT_PASSES = DEVICE_PASSES["cpu"] + ("script",)
CPU_PATHS = (("fold_bn", "freeze"), DEFAULT_PASSES)


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: a zoo model pruned by ``ratio`` at ``batch`` x 3 x ``size`` x ``size``."""

    model: str
    ratio: float
    batch: int
    size: int
    scope: str = "all"
    round_to: int | str | None = 16
    passes: tuple[str, ...] = DEFAULT_PASSES
    method: str = "l1"
    device: str = "cpu"
    dtype: str = "float32"
    cuda_graphs: bool = False
    model_kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        model = self.model + (f"({','.join(f'{k}={v}' for k, v in self.model_kwargs)})" if self.model_kwargs else "")
        label = f"{model} {self.method} {self.scope} {self.ratio:.0%} b{self.batch} [{'+'.join(self.passes)}]"
        if (self.device, self.dtype, self.cuda_graphs) != ("cpu", "float32", False):
            label += f" {self.device} {self.dtype}{' graphs' if self.cuda_graphs else ''} round {self.round_to}"
        return label


# The acceptance set: ResNet-50 (224x224, batch 1 and 8), ResNet-56 (CIFAR, batch 64 on both paths, batch 1 on
# the NHWC path) and ResNet-20 (CIFAR, batch 64 and 1, NHWC path), 30% and 50%. Kept counts round up to 16 for
# ResNet-50 (AVX-512 holds 16 floats). The CIFAR ResNets' stages are only 16/32/64 wide: rounding to 16 would
# undo most of the pruning, so they are not rounded (the onednn pass picks the faster kernel per layer).
STANDARD_CASES = tuple(
    [Case("resnet50", r, b, 224, round_to=16, passes=p) for p in CPU_PATHS for b in (1, 8) for r in (0.3, 0.5)]
    + [Case("resnet56", r, 64, 32, round_to=None, passes=p) for p in CPU_PATHS for r in (0.3, 0.5)]
    + [Case(m, r, b, 32, round_to=None) for m, b in (("resnet56", 1), ("resnet20", 64), ("resnet20", 1))
       for r in (0.3, 0.5)]
)

#: The real-size language models (``sparsekern bench models --set lm``): kept ranks 0.5, 0.3, 0.15 of the
#: parameter-preserving rank, one 512-token sequence, through ``sk.optimize(..., script=True)``'s CPU path.
LM_SIZES: dict[str, tuple[tuple[str, Any], ...]] = {
    "transformer_lm": (("d_model", 768), ("layers", 4), ("heads", 12), ("context", 512)),
    "sru_lm": (("d_model", 1024), ("layers", 4)),
}
LM_CASES = tuple(Case(m, r, 1, 512, round_to=None, passes=DEFAULT_PASSES, method="flop", model_kwargs=kw)
                 for m, kw in LM_SIZES.items() for r in (0.5, 0.7, 0.85)) + (
    # static L1-norm pruning of half the heads and half the MLP neurons of every block (the residual stream kept)
    Case("transformer_lm", 0.5, 1, 512, scope="internal", round_to=None, passes=DEFAULT_PASSES,
         model_kwargs=LM_SIZES["transformer_lm"]),)


def run_case(
    case: Case,
    *,
    threads: int | None = 2,
    warmup: int = 10,
    repeats: int = 50,
    per_layer: bool = False,
    seed: int = 0,
    block: int = SERVING_BLOCK,
) -> BenchReport:
    """Prune, compile and benchmark one case (random weights and inputs, seeded: never zeros)."""
    torch.manual_seed(seed)
    dense, fast, x = _BUILDERS[case.method](case)
    device, dtype = torch.device(case.device), getattr(torch, case.dtype)
    dense, fast = dense.to(device=device, dtype=dtype).eval(), fast.to(device=device, dtype=dtype).eval()
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    passes = case.passes
    if case.cuda_graphs:
        from sparsekern.passes import apply

        with torch.no_grad():
            dense, fast = (CudaGraphed(apply(copy.deepcopy(m), passes, (x,))) for m in (dense, fast))
        passes = ()
    return compare(dense, fast, x, warmup=warmup, repeats=repeats, per_layer=per_layer, threads=threads, block=block,
                   label=case.label, passes=passes, device=device)


def _build_l1(case: Case) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    import sparsekern as sk
    from sparsekern.methods import l1_norm
    from sparsekern.models import build

    model = build(case.model, **dict(case.model_kwargs)).eval()
    if case.model.endswith("_lm"):  # ``size`` tokens of random bytes per sequence
        x = torch.randint(0, 256, (case.batch, case.size), generator=torch.Generator().manual_seed(0))
    else:
        x = torch.randn(case.batch, 3, case.size, case.size)
    example = x[:1]  # planning and compiling trace one sample (a batch of 64 224x224 images: seconds on CPU)
    plan = l1_norm.prune(model, example, ratio=case.ratio, scope=case.scope)
    return model, sk.compile(model, plan, example, round_to=case.round_to).eval(), x


def _build_sanp(case: Case) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    import sparsekern as sk
    from sparsekern.methods import sanp
    from sparsekern.models import build

    dense = build(case.model).eval()
    model = sanp.to_sanp(dense, init_logit=0.0).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, sanp.SaliencyPruningModule):
                torch.nn.init.normal_(m.fc2.weight, std=m.hidden ** -0.5)
    x = torch.randn(case.batch, 3, case.size, case.size)
    example = x[:1]
    return dense, sk.compile(model, sanp.to_plan(model, example), example).eval(), x


def _build_flop(case: Case) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    import sparsekern as sk
    from sparsekern.methods import flop
    from sparsekern.models import build

    kwargs = dict(case.model_kwargs) or {"d_model": 128, "layers": 2,
                                         **({"heads": 4, "context": case.size} if case.model == "transformer_lm" else {})}
    dense = build(case.model, **kwargs).eval()
    model = flop.factorize(copy.deepcopy(dense), init="random").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in flop.gated_layers(model).values():
            off = torch.randperm(layer.n_gates, generator=g)[: round(layer.n_gates * case.ratio)]
            layer.log_alpha.fill_(10.0)
            layer.log_alpha[off] = -10.0
    x = torch.randint(0, 256, (case.batch, case.size), generator=g)
    return dense, sk.compile(model, flop.prune(model, x[:1]), x[:1]).eval(), x


_BUILDERS = {"l1": _build_l1, "sanp": _build_sanp, "flop": _build_flop}


def run_suite(
    cases: Iterable[Case],
    *,
    threads: int | None = 2,
    warmup: int = 10,
    repeats: int = 50,
    per_layer: bool = False,
    block: int = SERVING_BLOCK,
    out: str | Path | None = None,
    part: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run ``cases``; return (and write to ``out``, under its key ``part`` if given) ``{"command", "environment",
    "results"}``.

    Each result is a :meth:`BenchReport.to_dict` plus the case's parameters. The table of each case is
    printed as it finishes.
    """
    from tqdm import tqdm

    cases = list(cases)
    results = []
    for case in tqdm(cases, desc="benchmark", disable=not progress, file=sys.stderr):
        report = run_case(case, threads=threads, warmup=warmup, repeats=repeats, per_layer=per_layer, block=block)
        print(report.table(), flush=True)
        results.append({"case": {**case.__dict__, "passes": list(case.passes),
                                 "model_kwargs": dict(case.model_kwargs)}, **report.to_dict()})
    doc = {
        "command": command_line(),
        "environment": {**environment(cases[0].device if cases else "cpu"), "python": platform.python_version()},
        "results": results,
    }
    if out is not None:
        write_part(out, doc, *([part] if part else []))
    return doc


def summary_table(doc: dict[str, Any]) -> str:
    """Markdown table (one row per case) of a suite document, as in the README."""
    rows = [
        "| model | pruned | batch | inference path | dense ms | compiled ms | theoretical | measured | efficiency | spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        c = r["case"]
        spread = max(r["dense"]["spread"], r["fast"]["spread"])
        rows.append(
            f"| {c['model']} | {c['ratio']:.0%} ({c['scope']}) | {c['batch']} | {' + '.join(c['passes'])} | "
            f"{r['dense']['median_ms']:.1f} | "
            f"{r['fast']['median_ms']:.1f} | {r['theoretical_speedup']:.2f}x | {r['measured_speedup']:.2f}x | "
            f"{r['efficiency']:.2f} | {spread:.1%} |"
        )
    return "\n".join(rows)


def lm_table(doc: dict[str, Any]) -> str:
    """Markdown table (one row per case) of a language-model suite document (:data:`LM_CASES`), as in the README."""
    rows = [
        "| model | size | pruning | tokens | dense ms | compiled ms | theoretical | measured | efficiency | spread |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        c = r["case"]
        kw = c.get("model_kwargs") or {}
        size = ", ".join(f"{k} {v}" for k, v in kw.items() if k != "context")
        spread = max(r["dense"]["spread"], r["fast"]["spread"])
        pruning = (f"FLOP, kept rank {1 - c['ratio']:.2f}" if c.get("method", "flop") == "flop"
                   else f"L1, {c['ratio']:.0%} of heads and MLP")
        rows.append(
            f"| {c['model']} | {size} | {pruning} | {c['batch'] * c['size']} | "
            f"{r['dense']['median_ms']:.1f} | {r['fast']['median_ms']:.1f} | {r['theoretical_speedup']:.2f}x | "
            f"{r['measured_speedup']:.2f}x | {r['efficiency']:.2f} | {spread:.1%} |"
        )
    return "\n".join(rows)
