"""The Triton channel-skipping convolution against the dense-then-mask reference.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET),
with one small tile config (32 pixels x 16 output channels x 16 input channels), so the shapes below span
several tiles in every dimension while staying small. GPU-marked tests repeat the checks in fp16/bf16/fp32
on ImageNet-sized layers, check that no host synchronisation happens, and cover the CUDA backend.
"""
from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sparsekern.kernels.triton import channel_skip_conv2d as mod
from sparsekern.ops import reference
from sparsekern.ops.shapes import conv2d_memory_format
from tests.conftest import assert_close_to_scale


def _triton(*args):
    """The op on its Triton backend (the launcher itself only writes a preallocated output)."""
    from sparsekern.ops import channel_skip_conv2d

    return channel_skip_conv2d(*args, backend="triton")


HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="interpreter tests run where there is no GPU")


def _problem(b: int, c_in: int, c_out: int, h: int, w: int, k: tuple[int, int], *, keep: float = 0.5, seed: int = 0,
             dtype: torch.dtype = torch.float32, device: str = "cpu", bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c_in, h, w, generator=g)
    weight = torch.randn(c_out, c_in, *k, generator=g) / (c_in * k[0] * k[1]) ** 0.5
    bias_t = torch.randn(c_out, generator=g) if bias else None
    in_mask = torch.rand(b, c_in, generator=g) < keep
    out_mask = torch.rand(b, c_out, generator=g) < keep
    to = {"dtype": dtype, "device": device}
    return (x.to(**to), weight.to(**to), None if bias_t is None else bias_t.to(**to), in_mask.to(device),
            out_mask.to(device))


def _check(x, weight, bias, in_mask, out_mask, stride, padding, dilation, relu, tol=1e-4) -> torch.Tensor:
    args = (x, weight, bias, in_mask, out_mask, list(stride), list(padding), list(dilation), relu)
    y = _triton(*args)
    ref = reference.channel_skip_conv2d(*args)
    assert y.dtype == x.dtype and y.is_contiguous()
    assert_close_to_scale(y.float(), ref.float(), tol)
    if out_mask is not None:  # masked-off outputs are exact zeros (bias included)
        assert (y[~out_mask] == 0).all()
    return y


# ----------------------------------------------------------------------------- index lists
def test_index_lists_are_the_stable_partition_of_each_mask() -> None:
    g = torch.Generator().manual_seed(1)
    in_mask = torch.rand(5, 37, generator=g) < 0.4
    out_mask = torch.rand(5, 70, generator=g) < 0.6
    in_mask[1] = False  # a sample with no active input
    out_mask[2] = True  # and one with every output active
    lists = mod.active_channel_lists(in_mask, out_mask, 5, 37, 70, in_mask.device)
    for mask, perm, count in ((in_mask, lists[:, :37], lists[:, 107]), (out_mask, lists[:, 37:107], lists[:, 108])):
        expect = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
        assert torch.equal(perm.long(), expect)
        assert torch.equal(count.long(), mask.sum(1))
    full = mod.active_channel_lists(None, None, 2, 3, 4, in_mask.device)
    assert full.tolist() == [[0, 1, 2, 0, 1, 2, 3, 3, 4]] * 2


def test_index_lists_accept_non_contiguous_masks() -> None:
    g = torch.Generator().manual_seed(2)
    wide = torch.rand(3, 40, generator=g) < 0.5
    mask = wide[:, ::2]  # column stride 2
    lists = mod.active_channel_lists(mask, None, 3, 20, 6, mask.device)
    expect = torch.sort(mask.to(torch.uint8), dim=1, descending=True, stable=True).indices
    assert torch.equal(lists[:, :20].long(), expect)
    assert torch.equal(lists[:, 26].long(), mask.sum(1))


def test_launch_path_has_no_host_synchronisation_by_construction() -> None:
    """The launcher, its checks and the list builder never pull device values to the host, so a launch stays
    asynchronous; test_gpu_launch_never_synchronises checks the same on a device."""
    syncing = {"item", "tolist", "nonzero", "cpu", "numpy", "synchronize", "argwhere", "unique"}
    tree = ast.parse(inspect.getsource(mod))
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in ("active_channel_lists", "channel_skip_conv2d"):
        calls = {n.func.attr for n in ast.walk(functions[name])
                 if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert not calls & syncing, f"{name} calls {calls & syncing}"


# ----------------------------------------------------------------------------- numerics vs the reference
CASES = {
    # name: (b, c_in, c_out, h, w, kernel, stride, padding, dilation, relu, bias)
    "3x3_pad1": (2, 20, 24, 7, 9, (3, 3), (1, 1), (1, 1), (1, 1), True, True),
    "3x3_stride2_odd": (2, 12, 20, 9, 7, (3, 3), (2, 2), (1, 1), (1, 1), False, True),
    "1x1": (3, 40, 36, 5, 6, (1, 1), (1, 1), (0, 0), (1, 1), True, False),
    "1x1_stride2": (2, 24, 18, 7, 7, (1, 1), (2, 2), (0, 0), (1, 1), False, True),
    "dilated_pad2": (2, 10, 18, 8, 8, (3, 3), (1, 1), (2, 2), (2, 2), True, True),
    "rect_kernel_asym": (1, 9, 17, 6, 11, (3, 1), (1, 2), (1, 0), (1, 1), False, True),
    "batch1_no_padding": (1, 18, 20, 6, 5, (3, 3), (1, 1), (0, 0), (1, 1), True, True),
}


@interpreted
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_on_random_masks(name: str) -> None:
    b, c_in, c_out, h, w, k, stride, padding, dilation, relu, bias = CASES[name]
    x, weight, bias_t, in_mask, out_mask = _problem(b, c_in, c_out, h, w, k, bias=bias, seed=len(name))
    _check(x, weight, bias_t, in_mask, out_mask, stride, padding, dilation, relu)


@interpreted
def test_empty_and_full_masks() -> None:
    x, weight, bias, in_mask, out_mask = _problem(3, 12, 20, 6, 6, (3, 3), seed=3)
    in_mask[0] = False  # no active input: the output is bias (ReLU'd) on the active outputs
    out_mask[1] = False  # no active output: all zeros
    in_mask[2] = True
    out_mask[2] = True  # every channel active
    y = _check(x, weight, bias, in_mask, out_mask, (1, 1), (1, 1), (1, 1), True)
    active = out_mask[0]
    assert torch.allclose(y[0, active], torch.relu(bias[active])[:, None, None].expand(-1, 6, 6))
    assert (y[1] == 0).all()
    _check(x, weight, bias, None, None, (1, 1), (1, 1), (1, 1), False)  # masks omitted = all active
    _check(x, weight, bias, torch.zeros_like(in_mask), torch.zeros_like(out_mask), (1, 1), (1, 1), (1, 1), False)


@interpreted
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # inf * 0 in the masked-off columns
def test_masked_off_inputs_are_never_read() -> None:
    """NaN in the masked-off input channels would poison every output they touched; inf in an active input
    must not turn the masked-off outputs into NaN (they are exact zeros)."""
    x, weight, bias, in_mask, out_mask = _problem(2, 18, 20, 6, 7, (3, 3), seed=4)
    poisoned = x.clone()
    poisoned[~in_mask] = float("nan")
    y = _triton(poisoned, weight, bias, in_mask, out_mask, [1, 1], [1, 1], [1, 1], False)
    assert torch.isfinite(y).all()
    assert_close_to_scale(y, reference.channel_skip_conv2d(x, weight, bias, in_mask, out_mask, [1, 1], [1, 1],
                                                           [1, 1], False))
    c = int(in_mask[0].nonzero()[0])
    poisoned[0, c, 2, 3] = float("inf")
    y = _triton(poisoned, weight, bias, in_mask, out_mask, [1, 1], [1, 1], [1, 1], False)
    assert (y[0][~out_mask[0]] == 0).all()


@interpreted
def test_any_input_and_weight_layout() -> None:
    """channels-last, sliced and transposed inputs; OIHW, channels-last and (kh, kw, C_in, C_out) weights.
    Nothing is copied: the kernel reads through the strides (and picks the tile orientation from them); the
    output's memory format follows the input's."""
    x, weight, bias, in_mask, out_mask = _problem(2, 14, 20, 7, 8, (3, 3), seed=5)
    layouts_x = {
        "channels_last": x.to(memory_format=torch.channels_last),
        "sliced": torch.stack([x, x], 2).flatten(1, 2)[:, ::2],  # channel stride 2 H W
        "hw_transposed": x.transpose(2, 3).contiguous().transpose(2, 3),
    }
    layouts_w = {
        "oihw": weight,
        "channels_last": weight.to(memory_format=torch.channels_last),
        "hwio": weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1),  # output channels fastest
    }
    ref = reference.channel_skip_conv2d(x, weight, bias, in_mask, out_mask, [2, 1], [1, 1], [1, 1], True)
    for (nx, xl), (nw, wl) in zip(layouts_x.items(), layouts_w.items()):
        assert torch.equal(xl, x) and torch.equal(wl, weight)
        y = _triton(xl, wl, bias, in_mask, out_mask, [2, 1], [1, 1], [1, 1], True)
        assert_close_to_scale(y, ref)
        assert y.is_contiguous(memory_format=conv2d_memory_format(xl)), (nx, nw)  # the op's one rule
    y = _triton(layouts_x["channels_last"], layouts_w["hwio"], bias, in_mask, out_mask, [2, 1], [1, 1], [1, 1], True)
    assert_close_to_scale(y, ref)


@interpreted
def test_half_precision_in_the_interpreter() -> None:
    x, weight, bias, in_mask, out_mask = _problem(2, 20, 18, 6, 6, (3, 3), dtype=torch.float16, seed=6)
    _check(x, weight, bias, in_mask, out_mask, (1, 1), (1, 1), (1, 1), True, tol=5e-3)


@interpreted
def test_bfloat16_needs_a_gpu() -> None:
    pytest.skip("Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (triton-lang/triton#11584); "
                "bf16 is checked in test_gpu_matches_reference")


# ----------------------------------------------------------------------------- op plumbing and errors
@interpreted
def test_the_op_passes_opcheck_on_the_triton_backend() -> None:
    x, weight, bias, in_mask, out_mask = _problem(1, 4, 5, 4, 4, (3, 3), seed=7)
    args = (x, weight, bias, in_mask, out_mask, [1, 1], [1, 1], [1, 1], True)
    torch.library.opcheck(torch.ops.sparsekern.channel_skip_conv2d.default, (*args, "triton"),
                          test_utils=("test_schema", "test_faketensor"))
    from sparsekern.ops import channel_skip_conv2d

    y = channel_skip_conv2d(x, weight, bias, in_mask, out_mask, 1, 1, 1, True, backend="triton")
    assert_close_to_scale(y, reference.channel_skip_conv2d(*args))
    xc = x.contiguous(memory_format=torch.channels_last)  # the output follows the input's memory format
    y = channel_skip_conv2d(xc, weight, bias, in_mask, out_mask, 1, 1, 1, True, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_scale(y, reference.channel_skip_conv2d(*args))


def test_the_triton_backend_names_what_it_cannot_take(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekern.ops import NoBackendError, channel_skip_conv2d, dispatch_of

    x, weight, bias, in_mask, out_mask = _problem(2, 4, 6, 5, 5, (3, 3))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not HAS_CUDA:
        with pytest.raises(NoBackendError, match=r"'triton' cannot run these inputs: runs on CUDA \(or CPU with "
                                                 r"TRITON_INTERPRET=1\), got a CPU tensor"):
            channel_skip_conv2d(x, weight, bias, in_mask, out_mask, 1, 1, backend="triton")
    big = torch.empty(65536, 1, 1, 1)
    assert any("65535 samples" in r for r in dispatch_of("channel_skip_conv2d").reasons(big, torch.empty(1, 1, 1, 1))
               ["triton"])


# ----------------------------------------------------------------------------- GPU lowering without a GPU
_LOWER = textwrap.dedent("""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sparsekern.kernels.triton import channel_skip_conv2d as mod

    kernel = mod._channel_skip_conv2d_kernel.fn
    for arch, dtype, channels_last, bm, bn, bk, warps in ((90, "fp16", False, 128, 128, 32, 8),
                                                         (80, "bf16", True, 64, 64, 32, 4)):
        const = dict(KH=3, KW=3, HAS_BIAS=True, RELU=True, X_CHANNELS_LAST=channels_last, W_N_FASTEST=False,
                     INPUT_PRECISION=None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8)
        sig = {name: ("constexpr" if name in const else "*i32" if name == "lists_ptr"
                      else f"*{dtype}" if name.endswith("_ptr") else "i32") for name in kernel.arg_names}
        try:
            src = ASTSource(fn=kernel, signature=sig, constexprs=const)
        except TypeError as e:
            print("API_MISMATCH", e)
            sys.exit(0)
        asm = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps)).asm["ptx"]
        print(arch, "wgmma" if "wgmma.mma_async" in asm else "mma.sync" if "mma.sync" in asm else "no-mma")
    lists = mod._active_lists_kernel
    const = dict(HAS_IN_MASK=True, HAS_OUT_MASK=False, BLOCK_C=256)
    sig = {name: ("constexpr" if name in const else "*u8" if name.endswith("mask_ptr") else "*i32"
                  if name.endswith("_ptr") else "i32") for name in lists.arg_names}
    triton.compile(ASTSource(fn=lists, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    print("lists")
""")


def test_kernel_lowers_to_tensor_cores_for_hopper_and_ampere() -> None:
    """Compile (no launch) the kernels for sm_90 and sm_80 outside the interpreter: the GPU lowering works,
    and tl.dot becomes wgmma on Hopper and mma.sync on Ampere, for NCHW and channels-last inputs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, "-c", _LOWER], capture_output=True, text=True, env=env, timeout=600)
    if "API_MISMATCH" in done.stdout:
        pytest.skip(f"this Triton's compile API differs: {done.stdout.strip()}")
    if done.returncode != 0 and ("ptxas" in done.stderr and "not found" in done.stderr):
        pytest.skip("Triton's ptxas is not available")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["90", "wgmma", "80", "mma.sync", "lists"]


# ----------------------------------------------------------------------------- GPU
GPU_LAYERS = {  # ImageNet ResNet-18 shapes: (c_in, c_out, hw, kernel, stride, padding)
    "layer1_3x3": (64, 64, 56, 3, 1, 1),
    "layer2_down_3x3": (64, 128, 56, 3, 2, 1),
    "layer3_1x1_down": (128, 256, 28, 1, 2, 0),
    "layer4_3x3": (512, 512, 7, 3, 1, 1),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layer", list(GPU_LAYERS))
def test_gpu_matches_reference(layer: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 in kernel and reference
    c_in, c_out, hw, k, s, p = GPU_LAYERS[layer]
    x, weight, bias, in_mask, out_mask = _problem(8, c_in, c_out, hw, hw, (k, k), dtype=dtype, device="cuda")
    in_mask[0] = False
    out_mask[1] = False
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    _check(x, weight, bias, in_mask, out_mask, (s, s), (p, p), (1, 1), True, tol=tol)
    _check(x.to(memory_format=torch.channels_last), weight.to(memory_format=torch.channels_last), bias, in_mask,
           out_mask, (s, s), (p, p), (1, 1), False, tol=tol)


@pytest.mark.gpu
@gpu
def test_gpu_launch_never_synchronises() -> None:
    """Index lists and launches stay on the device (set_sync_debug_mode raises on any host synchronisation)."""
    from sparsekern.ops import _ext, channel_skip_conv2d

    x, weight, bias, in_mask, out_mask = _problem(8, 64, 64, 28, 28, (3, 3), dtype=torch.float16, device="cuda")
    args = (x, weight, bias, in_mask, out_mask, [1, 1], [1, 1], [1, 1], True)
    backends = ["triton"] + (["cuda"] if _ext.kernel("channel_skip_conv2d_cuda") is not None else [])
    for backend in backends:  # warm up: autotuning and the first launch may synchronise
        channel_skip_conv2d(*args, backend=backend)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in backends:
            channel_skip_conv2d(*args, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_cuda_backend_matches_reference(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekern.ops import _ext, channel_skip_conv2d

    if _ext.kernel("channel_skip_conv2d_cuda") is None:
        pytest.skip(f"the CUDA extension is unavailable ({_ext.status()})")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for c_in, c_out, hw, k, s, p in GPU_LAYERS.values():
        x, weight, bias, in_mask, out_mask = _problem(8, c_in, c_out, hw, hw, (k, k), dtype=dtype, device="cuda")
        in_mask[0] = False
        out_mask[1] = False
        x[~in_mask] = float("nan")  # never read
        args = (x, weight, bias, in_mask, out_mask, (s, s), (p, p), (1, 1), True)
        y = channel_skip_conv2d(*args, backend="cuda")
        ref = reference.channel_skip_conv2d(x.nan_to_num(0.0), *args[1:])
        assert_close_to_scale(y.float(), ref.float(), tol)
        assert (y[~out_mask] == 0).all()
