"""``sparsekern demo``: the whole path on embedded data, in about two minutes on two CPU cores.

1. Train a CIFAR-style ResNet-20 on scikit-learn's handwritten digits (ships with the install).
2. Plan L1-norm filter pruning (Li et al. 2017) of every channel group by ``ratio``.
3. Compile the plan into a physically smaller model and check it against the masked reference.
4. Fine-tune the compiled model briefly.
5. Save and reload it (manifest + safetensors), checking the outputs are bit-identical.
6. Benchmark dense vs compiled through the same inference passes: theoretical vs measured speedup.

Writes ``report.json``, ``model.sk`` and ``plan.json`` into the output folder.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import sparsekern as sk
from sparsekern.bench.report import compare
from sparsekern.bench.timing import SERVING_BLOCK
from sparsekern.data import digits, loader
from sparsekern.methods import l1_norm
from sparsekern.models import build
from sparsekern.train import TrainConfig, evaluate, train


def run_demo(
    out: str | Path = "sparsekern-demo",
    *,
    model_name: str = "resnet20",
    image_size: int = 16,
    epochs: float = 6,
    finetune_epochs: float = 3,
    ratio: float = 0.5,
    batch: int = 64,
    threads: int = 2,
    repeats: int = 30,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the demo (see the module docstring); returns the report also written to ``out/report.json``.

    Arguments are checked before any training: ``epochs`` and ``finetune_epochs`` > 0, ``ratio`` in (0, 1),
    ``threads``, ``repeats``, ``batch`` and ``image_size`` >= 1. Files in ``out`` are replaced (the CLI asks
    first).
    """
    _check_arguments(epochs=epochs, finetune_epochs=finetune_epochs, ratio=ratio, threads=threads,
                     repeats=repeats, batch=batch, image_size=image_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    train_set, test_set = digits("train", image_size=image_size), digits("test", image_size=image_size)
    test_data = loader(test_set, 512, shuffle=False)

    model, acc_dense = _train_dense(model_name, train_set, test_data, epochs=epochs, seed=seed, progress=progress)
    x = test_set.tensors[0][:batch]
    plan = _plan(model, x, ratio)
    fast, err, acc_pruned = _compile(model, plan, x, test_data)
    acc_finetuned = _finetune(fast, train_set, test_data, epochs=finetune_epochs, seed=seed, progress=progress)
    identical = _save_and_reload(fast, plan, x, out)
    report = _benchmark(model, fast, x, threads=threads, repeats=repeats)

    dense_flops, pruned_flops = sk.flops(model, x), sk.flops(fast, x)
    result = {
        "model": model_name,
        "data": f"digits {image_size}x{image_size}",
        "ratio": ratio,
        "accuracy": {"dense": acc_dense, "pruned": acc_pruned, "finetuned": acc_finetuned},
        "flops": {"dense": dense_flops.total, "compiled": pruned_flops.total},
        "params": {"dense": dense_flops.params, "compiled": pruned_flops.params},
        "compiled_vs_masked_error": err,
        "reload_bit_identical": identical,
        "benchmark": report.to_dict(),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1))
    _print_summary(result, report, out / "report.json")
    return result


def _check_arguments(*, epochs: float, finetune_epochs: float, ratio: float, threads: int, repeats: int,
                     batch: int, image_size: int) -> None:
    """Raise ``ValueError`` naming the first argument out of range, in the order of :func:`run_demo`'s rules."""
    checks = (("epochs", epochs, epochs > 0, "> 0"), ("finetune_epochs", finetune_epochs, finetune_epochs > 0, "> 0"),
              ("ratio", ratio, 0 < ratio < 1, "in (0, 1)"), ("threads", threads, threads >= 1, ">= 1"),
              ("repeats", repeats, repeats >= 1, ">= 1"), ("batch", batch, batch >= 1, ">= 1"),
              ("image_size", image_size, image_size >= 1, ">= 1"))
    for name, value, ok, rule in checks:
        if not ok:
            raise ValueError(f"run_demo: {name} must be {rule}, got {value}")


def _train_dense(model_name: str, train_set: Any, test_data: Any, *, epochs: float, seed: int,
                 progress: bool) -> tuple[torch.nn.Module, float]:
    """Step 1: train the dense model (left in eval mode); returns it and its test accuracy."""
    print(f"[1/6] training {model_name} on the embedded digits data ({len(train_set)} images, {epochs} epochs)")
    model = build(model_name, num_classes=10)
    train(model, train_set, TrainConfig(epochs=epochs, lr=0.1, batch_size=64, seed=seed, progress=progress))
    model.eval()
    acc_dense = evaluate(model, test_data)["accuracy"]
    print(f"      dense test accuracy {acc_dense:.2%}")
    return model, acc_dense


def _plan(model: torch.nn.Module, x: torch.Tensor, ratio: float) -> Any:
    """Step 2: the L1-norm pruning plan of every channel group; prints its summary."""
    print(f"[2/6] L1-norm filter pruning: {ratio:.0%} of the channels of every prunable group")
    plan = l1_norm.prune(model, x, ratio=ratio, scope="all")
    print(plan.summary())
    return plan


def _compile(model: torch.nn.Module, plan: Any, x: torch.Tensor,
             test_data: Any) -> tuple[torch.nn.Module, float, float]:
    """Step 3: compile the plan; returns the compiled model, its max error against the masked reference
    (relative to the reference's output scale) and its accuracy before fine-tuning."""
    print("[3/6] compiling the plan into a smaller model")
    fast = sk.compile(model, plan, x)
    with torch.no_grad():
        ref = sk.masked(model, plan, x)(x)
        err = float((fast(x) - ref).abs().max() / ref.abs().max())
    acc_pruned = evaluate(fast, test_data)["accuracy"]
    print(f"      compiled == masked reference: max error {err:.1e} of output scale; accuracy before "
          f"fine-tuning {acc_pruned:.2%}")
    return fast, err, acc_pruned


def _finetune(fast: torch.nn.Module, train_set: Any, test_data: Any, *, epochs: float, seed: int,
              progress: bool) -> float:
    """Step 4: fine-tune the compiled model in place (left in eval mode); returns its test accuracy."""
    print(f"[4/6] fine-tuning the compiled model ({epochs} epochs)")
    fast.train()
    train(fast, train_set, TrainConfig(epochs=epochs, lr=0.01, batch_size=64, seed=seed, progress=progress))
    fast.eval()
    acc_finetuned = evaluate(fast, test_data)["accuracy"]
    print(f"      fine-tuned accuracy {acc_finetuned:.2%}")
    return acc_finetuned


def _save_and_reload(fast: torch.nn.Module, plan: Any, x: torch.Tensor, out: Path) -> bool:
    """Step 5: save the model and plan into ``out``, reload the model; returns whether its outputs on ``x``
    are bit-identical."""
    print("[5/6] save + load (manifest + safetensors, no pickle)")
    sk.save(fast, out / "model.sk")
    sk.save(plan, out / "plan.json")
    loaded = sk.load(out / "model.sk")
    with torch.no_grad():
        identical = bool(torch.equal(loaded(x), fast(x)))
    print(f"      reloaded outputs bit-identical: {identical}")
    return identical


def _benchmark(model: torch.nn.Module, fast: torch.nn.Module, x: torch.Tensor, *, threads: int,
               repeats: int) -> Any:
    """Step 6: dense vs compiled, per layer too, both through ``sk.optimize``'s CPU path (BatchNorm folded, each
    conv and linear layer on oneDNN or sparsekern's kernel, whichever measured faster, the graph run by
    TorchScript); prints the table."""
    from sparsekern.passes import DEVICE_PASSES

    passes = DEVICE_PASSES["cpu"] + ("script",)
    print(f"[6/6] benchmark: dense vs compiled, batch {len(x)}, {threads} threads, both through "
          f"sk.optimize(script=True) ({' + '.join(passes)}, the kernel of each layer chosen by measurement: "
          "'backend d/f')")
    report = compare(model, fast, x, threads=threads, repeats=repeats, per_layer=True, label="demo", passes=passes,
                     block=SERVING_BLOCK)
    print(report.table())
    return report


def _print_summary(result: dict[str, Any], report: Any, report_path: Path) -> None:
    """The closing lines: accuracy, FLOPs, params and speedups, plus a note when efficiency is below 0.8."""
    acc, flops, params = result["accuracy"], result["flops"], result["params"]
    print(
        f"\naccuracy {acc['dense']:.2%} -> {acc['finetuned']:.2%} | FLOPs {flops['dense'] / 1e6:.1f}M -> "
        f"{flops['compiled'] / 1e6:.1f}M | params {params['dense'] / 1e3:.0f}k -> {params['compiled'] / 1e3:.0f}k\n"
        f"theoretical speedup {report.theoretical_speedup:.2f}x, measured {report.measured_speedup:.2f}x, "
        f"efficiency {report.efficiency:.2f} (spread {max(report.dense.spread, report.fast.spread):.1%})\n"
        f"report: {report_path}"
    )
    if report.efficiency < 0.8:
        print("note: this small model's pruned layers are 8-32 channels wide on 4x4 to 16x16 maps, where the "
              "kernels run at 0.7-0.85 of the dense layers' GFLOP/s (README, 'Performance', narrow convolutions).")
