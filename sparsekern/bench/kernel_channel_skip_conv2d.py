"""Microbenchmark of :func:`sparsekern.ops.channel_skip_conv2d` against the dense convolution and the naive
dense-then-mask baseline, on real layer shapes.

For every layer shape (by default the unique groups=1 convolutions of CIFAR ResNet-56, CIFAR VGG-16 and ImageNet
ResNet-18, traced from :mod:`sparsekern.models`), batch size, keep ratio and mask mode it draws random masks
(each channel kept with probability ``keep``; never all-zero inputs) and times, with bias and a fused ReLU:

* ``dense``: the dense convolution of the same backend family. CPU: oneDNN with the weight prepacked for the
  input shape, channels-last activations and the ReLU fused (the ``onednn`` inference pass of
  :mod:`sparsekern.passes` applied to a one-layer model), i.e. what a dense model gets after ``sk.compile``.
  GPU: cuDNN (``F.conv2d`` on channels-last input) then ReLU.
* ``dense_then_mask``: ``dense`` followed by multiplying the output with the output mask, the way published
  dynamic-pruning code runs (it computes everything and zeroes afterwards).
* the op's kernels: ``cpu`` (the C++ kernel, NCHW input) on CPU; ``cuda`` and ``triton`` on GPU, each where it can
  run. ``backend`` in a row is the one the dispatch picks by default.

Mask modes: ``"out"`` (only ``out_mask``: a gated layer whose input is dense) and ``"in+out"`` (both masks: the
second of two consecutive gated layers, which also skips the inputs the first one zeroed; not for the stem,
whose input is the image). Theoretical speedup = dense multiply-adds / the kernel's, from the channel counts
actually drawn: ``B C_in C_out / sum_b |in_b| |out_b|``. Efficiency = measured speedup / theoretical speedup
(docs/design.md#measuring); ``efficiency_vs_dense_then_mask`` divides the speedup over the naive baseline by the
same theoretical speedup.

Timing: CPU candidates are timed interleaved with :func:`~sparsekern.bench.timing.time_interleaved` at
``threads`` intra-op threads (median, spread = IQR / median); the rounds per row shrink for large shapes so
that a row costs about ``budget_s`` seconds (never fewer than ``min_repeats``), and the row records its count.
GPU candidates are timed with ``triton.testing.do_bench`` (median between CUDA events, L2 flushed), round-robin.

    doc = run(quick=True); print(table(doc))
"""
from __future__ import annotations

import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsekern.bench.timing import environment, set_threads, time_interleaved
from sparsekern.ops import channel_skip_conv2d, reference
from sparsekern.ops.channel_skip_conv2d import DISPATCH, select_backend

__all__ = ["LayerShape", "model_shapes", "default_shapes", "quick_shapes", "gpu_shapes", "theoretical_speedup", "run",
           "table"]

MODELS = ("resnet56", "vgg16_bn", "resnet18")
#: The GPU benchmark's layer shapes: ImageNet ResNet-50 and ResNet-18, CIFAR VGG-16.
GPU_MODELS = ("resnet50", "resnet18", "vgg16_bn")
_KERNELS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}  # kernel backends timed (forced) on each device


@dataclass(frozen=True)
class LayerShape:
    """One convolution: ``layer`` names the first layer of ``model`` with it, ``count`` how many share it."""

    model: str
    layer: str
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    h: int
    w: int
    count: int = 1

    @property
    def stem(self) -> bool:
        """Whether the layer reads the image (3 channels), whose channels are never gated."""
        return self.c_in <= 3

    @property
    def name(self) -> str:
        return f"{self.model}.{self.layer}"

    def describe(self) -> str:
        k, s = self.kernel, self.stride
        return f"{self.c_in}->{self.c_out} {k[0]}x{k[1]}/{s[0]} @{self.h}x{self.w}"


def model_shapes(name: str) -> list[LayerShape]:
    """The unique groups=1 ``nn.Conv2d`` geometries of zoo model ``name`` at its default input size, in the order
    the forward pass meets them."""
    from sparsekern import models

    model = models.build(name).eval()
    size = models.default_input_size(name)
    found: dict[tuple, list] = {}
    hooks = []
    for layer_name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str):
            def hook(mod, args, _out, layer_name=layer_name):
                x = args[0]
                key = (mod.in_channels, mod.out_channels, tuple(mod.kernel_size), tuple(mod.stride),
                       tuple(mod.padding), tuple(mod.dilation), x.shape[2], x.shape[3])
                found.setdefault(key, [layer_name, 0])[1] += 1
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for h in hooks:
        h.remove()
    return [LayerShape(name, layer, *key, count=n) for key, (layer, n) in found.items()]


def default_shapes() -> list[LayerShape]:
    """Every unique layer shape of CIFAR ResNet-56, CIFAR VGG-16 and ImageNet ResNet-18."""
    return [s for m in MODELS for s in model_shapes(m)]


def quick_shapes() -> list[LayerShape]:
    """All ImageNet ResNet-18 shapes plus one mid-network shape of each CIFAR model."""
    cifar = [s for m in ("resnet56", "vgg16_bn") for s in model_shapes(m) if (s.c_in, s.c_out, s.stride) in
             ((32, 32, (1, 1)), (256, 256, (1, 1)))]
    return cifar[:1] + cifar[-1:] + model_shapes("resnet18")


def gpu_shapes(models: Sequence[str] = GPU_MODELS) -> list[LayerShape]:
    """Every unique layer shape of ``models`` (default :data:`GPU_MODELS`), in model order."""
    return [s for m in models for s in model_shapes(m)]


def theoretical_speedup(in_mask: torch.Tensor | None, out_mask: torch.Tensor, c_in: int) -> float:
    """Dense multiply-adds over the kernel's: ``B C_in C_out / sum_b |in_b| |out_b|`` (spatial size and taps
    cancel); ``inf`` when no output is active."""
    active_in = in_mask.sum(1).double() if in_mask is not None else torch.full((out_mask.shape[0],), float(c_in))
    work = (active_in * out_mask.sum(1).double()).sum().item()
    dense = out_mask.shape[0] * c_in * out_mask.shape[1]
    return dense / work if work > 0 else float("inf")


def _masks(shape: LayerShape, batch: int, keep: float, mode: str, g: torch.Generator):
    """Random masks; a sample keeps at least one output (a sample with none costs nothing and would make the
    theoretical speedup meaningless at batch 1)."""
    om = torch.rand(batch, shape.c_out, generator=g) < keep
    om[torch.arange(batch), torch.randint(shape.c_out, (batch,), generator=g)] = True
    im = None
    if mode == "in+out":
        im = torch.rand(batch, shape.c_in, generator=g) < keep
        im[torch.arange(batch), torch.randint(shape.c_in, (batch,), generator=g)] = True
    return im, om


def _dense_cpu(conv: nn.Conv2d, x_cl: torch.Tensor) -> Callable[[], torch.Tensor]:
    from sparsekern.passes import onednn

    gm = onednn(nn.Sequential(conv, nn.ReLU()), x_cl)
    return lambda: gm(x_cl)


def _dense_gpu(conv: nn.Conv2d, x_cl: torch.Tensor) -> Callable[[], torch.Tensor]:
    w = conv.weight.detach().contiguous(memory_format=torch.channels_last)  # both NHWC: cuDNN's tensor-core path
    b, s, p, d = conv.bias.detach(), conv.stride, conv.padding, conv.dilation
    return lambda: torch.relu_(F.conv2d(x_cl, w, b, s, p, d))


def _time_cpu(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int, budget_s: float,
              min_repeats: int) -> tuple[dict[str, dict[str, float]], int]:
    for fn in fns.values():  # first calls: lazy builds, allocator and primitive caches
        fn()
    t0 = time.perf_counter()
    for fn in fns.values():
        fn()
    rounds = budget_s / max(time.perf_counter() - t0, 1e-9)
    n = max(min_repeats, min(repeats, int(rounds)))
    timings = time_interleaved(fns, warmup=max(1, min(warmup, int(rounds / 4))), repeats=n)
    return {k: {"ms": v.median_ms, "spread": v.spread} for k, v in timings.items()}, n


def _time_gpu(fns: dict[str, Callable[[], Any]], warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    from triton.testing import do_bench

    out = {}
    for name, fn in fns.items():
        q25, med, q75 = do_bench(fn, warmup=max(warmup, 1) * 5, rep=max(repeats, 1) * 4, quantiles=[0.25, 0.5, 0.75])
        out[name] = {"ms": med, "spread": (q75 - q25) / med if med > 0 else float("inf")}
    return out


def _row(shape: LayerShape, batch: int, keep: float, mode: str, device: str, dtype: torch.dtype, warmup: int,
         repeats: int, budget_s: float, min_repeats: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(zlib.crc32(f"{shape.name} {shape.describe()} {batch} {keep} {mode}".encode()))
    conv = nn.Conv2d(shape.c_in, shape.c_out, shape.kernel, shape.stride, shape.padding, shape.dilation)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (shape.c_in * shape.kernel[0] * shape.kernel[1]) ** 0.5)
        conv.bias.copy_(torch.randn(shape.c_out, generator=g) * 0.1)
    conv = conv.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, shape.c_in, shape.h, shape.w, generator=g).to(device=device, dtype=dtype)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    im, om = _masks(shape, batch, keep, mode, g)
    im, om = (None if im is None else im.to(device)), om.to(device)
    om4 = om[:, :, None, None].to(dtype)
    w, b = conv.weight.detach(), conv.bias.detach()
    args = (x, w, b, im, om, list(shape.stride), list(shape.padding), list(shape.dilation), True)

    dense = _dense_gpu(conv, x_cl) if device == "cuda" else _dense_cpu(conv, x_cl)
    fns: dict[str, Callable[[], Any]] = {"dense": dense, "dense_then_mask": lambda: dense().mul_(om4)}
    for name in _KERNELS[device]:
        if not DISPATCH.reasons(*args)[name]:
            fns[name] = lambda name=name: channel_skip_conv2d(*args[:-1], relu=True, backend=name)
    kernels = [k for k in _KERNELS[device] if k in fns]
    if not kernels:
        raise RuntimeError(f"kernel_channel_skip_conv2d: no {device} kernel can run here: {DISPATCH.reasons(*args)}")
    backend = select_backend(*args)

    want = reference.channel_skip_conv2d(*args).float()
    scale = want.abs().max().clamp_min(1e-12)
    errors = {k: float((fns[k]().float() - want).abs().max() / scale) for k in kernels}

    if device == "cuda":
        timed, n = _time_gpu(fns, warmup, repeats), None
    else:
        timed, n = _time_cpu(fns, warmup, repeats, budget_s, min_repeats)
    theo = theoretical_speedup(None if im is None else im.cpu(), om.cpu(), shape.c_in)
    ms = {k: v["ms"] for k, v in timed.items()}
    per_kernel = {k: {"ms": ms[k], "speedup": ms["dense"] / ms[k], "efficiency": ms["dense"] / ms[k] / theo,
                      "efficiency_vs_dense_then_mask": ms["dense_then_mask"] / ms[k] / theo,
                      "spread": timed[k]["spread"], "max_rel_error": errors[k]} for k in kernels}
    main = backend if backend in per_kernel else min(kernels, key=lambda k: ms[k])
    return {
        "layer": shape.name, "count": shape.count, "shape": {**asdict(shape), "describe": shape.describe()},
        "batch": batch, "keep": keep, "masks": mode,
        "active_in": shape.c_in if im is None else float(im.float().sum(1).mean()),
        "active_out": float(om.float().sum(1).mean()),
        "theoretical_speedup": theo, "backend": main,
        "dense_ms": ms["dense"], "dense_then_mask_ms": ms["dense_then_mask"], "kernel_ms": ms[main],
        "speedup": ms["dense"] / ms[main], "speedup_vs_dense_then_mask": ms["dense_then_mask"] / ms[main],
        "efficiency": per_kernel[main]["efficiency"],
        "efficiency_vs_dense_then_mask": per_kernel[main]["efficiency_vs_dense_then_mask"],
        "spread": {k: v["spread"] for k, v in timed.items()},
        "kernels": per_kernel, "repeats": n,
    }


def run(
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batches: Iterable[int] = (1, 8, 64),
    keeps: Iterable[float] = (0.25, 0.5, 0.75),
    shapes: Sequence[LayerShape] | None = None,
    modes: Iterable[str] = ("out", "in+out"),
    threads: int | None = 2,
    warmup: int = 5,
    repeats: int = 30,
    quick: bool = False,
    progress: bool = True,
    budget_s: float = 3.0,
    min_repeats: int = 7,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Benchmark every (shape, batch, keep, mode); returns a JSON-able document (module docstring).

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        dtype: float32 on CPU (the C++ kernel's type); float16 / bfloat16 (or float32) on GPU.
        batches, keeps, modes: the grid (``modes`` from ``"out"`` and ``"in+out"``).
        shapes: layer shapes (:class:`LayerShape`); default :func:`default_shapes`, or :func:`quick_shapes`
            with ``quick``.
        threads: CPU intra-op threads while timing (``None``: leave as is).
        warmup, repeats: untimed / timed rounds on CPU (repeats may shrink, see ``budget_s``); on GPU they scale
            ``do_bench``'s warm-up and measuring time (5 ms and 4 ms per unit).
        quick: :func:`quick_shapes` at batch 8 and keep 0.5 only (unless ``shapes`` is given).
        progress: print one line per row to stderr.
        budget_s, min_repeats: CPU only: rounds per row = clamp(budget_s / one round's time, min_repeats,
            repeats).
        deadline: a ``time.perf_counter()`` value after which no new row starts (the rows done are returned,
            ``cases`` still counts all of them).

    Returns:
        ``{"op", "environment", "rows", "cases"}`` (``cases``: rows planned). A row: ``layer`` (first layer with the
        shape), ``count`` (layers of the model with it), ``shape`` (:class:`LayerShape` fields and ``describe``),
        ``batch``, ``keep``, ``masks`` (``"out"`` / ``"in+out"``), ``active_in`` / ``active_out`` (mean kept
        channels per sample), ``theoretical_speedup``, ``backend`` (the dispatch's default), ``dense_ms``,
        ``dense_then_mask_ms``, ``kernel_ms`` (that backend), ``speedup`` and ``speedup_vs_dense_then_mask``,
        ``efficiency`` and ``efficiency_vs_dense_then_mask``, ``spread`` per candidate, ``kernels`` (the same
        figures and ``max_rel_error`` for every kernel backend timed) and ``repeats`` (CPU rounds).
    """
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("kernel_channel_skip_conv2d.run: device='cuda' but no CUDA device is available")
    if device == "cpu" and dtype != torch.float32:
        raise ValueError(f"kernel_channel_skip_conv2d.run: the CPU kernel takes float32, got {dtype}")
    if quick:
        batches, keeps = (8,), (0.5,)
    if shapes is None:
        shapes = quick_shapes() if quick else default_shapes()
    modes = tuple(modes)
    cases = [(s, b, k, m) for s in shapes for b in batches for k in keeps for m in modes
             if not (m == "in+out" and s.stem)]
    rows = []
    with set_threads(threads if device == "cpu" else None), torch.inference_mode():
        env = environment(device)
        env["dtype"] = str(dtype).replace("torch.", "")
        for i, (shape, batch, keep, mode) in enumerate(cases):
            if deadline is not None and time.perf_counter() >= deadline:
                break
            row = _row(shape, batch, keep, mode, device, dtype, warmup, repeats, budget_s, min_repeats)
            rows.append(row)
            if progress:
                print(f"[{i + 1}/{len(cases)}] {_line(row)}", file=sys.stderr, flush=True)
    return {"op": "channel_skip_conv2d", "environment": env, "rows": rows, "cases": len(cases)}


def _line(row: dict[str, Any]) -> str:
    return (f"{row['layer']} {row['shape']['describe']} B={row['batch']} keep={row['keep']} {row['masks']}: "
            f"theo {row['theoretical_speedup']:.2f}x, dense {row['dense_ms']:.3f} ms, dense+mask "
            f"{row['dense_then_mask_ms']:.3f} ms, {row['backend']} {row['kernel_ms']:.3f} ms -> efficiency "
            f"{row['efficiency']:.2f} (vs dense+mask {row['efficiency_vs_dense_then_mask']:.2f})")


def table(doc: dict[str, Any]) -> str:
    """A fixed-width text table of a :func:`run` document."""
    env = doc["environment"]
    head = (f"channel_skip_conv2d on {env['device_name']} ({env['device']}, {env['dtype']}, {env['threads']} threads, "
            f"torch {env['torch']}); ms; efficiency = measured / theoretical speedup")
    cols = [("layer", 32), ("shape", 24), ("B", 4), ("keep", 5), ("masks", 7), ("theo", 6), ("dense", 9),
            ("dense+mask", 11), ("kernel", 9), ("backend", 8), ("eff", 6), ("eff/naive", 9), ("spread", 7)]
    lines = [head, " ".join(f"{c:>{w}}" for c, w in cols)]
    for r in doc["rows"]:
        vals = [r["layer"][-32:], r["shape"]["describe"], r["batch"], r["keep"], r["masks"],
                f"{r['theoretical_speedup']:.2f}", f"{r['dense_ms']:.3f}", f"{r['dense_then_mask_ms']:.3f}",
                f"{r['kernel_ms']:.3f}", r["backend"], f"{r['efficiency']:.2f}",
                f"{r['efficiency_vs_dense_then_mask']:.2f}", f"{max(r['spread'].values()):.1%}"]
        lines.append(" ".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols)))
    return "\n".join(lines)
