"""sparsekern::_gate_guard: the C++ CPU kernel against the plain-torch formulation (float64 logits as ground
truth of the decisions) over groups, layouts, batch 1 and the scale's channel subsets; opcheck; the errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsekern.ops import _ext
from sparsekern.ops.gate_guard import _reference, gate_guard


def problem(batch: int, c_in: int, channels: int, granularity: int, seed: int, channels_last: bool = False,
            size: tuple[int, int] = (5, 6)):
    g = torch.Generator().manual_seed(seed)
    n, hidden = -(-channels // granularity), 8
    x = torch.randn(batch, c_in, *size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(hidden, c_in, generator=g), torch.randn(hidden, generator=g)
    w2, b2 = torch.randn(n, hidden, generator=g), torch.randn(n, generator=g)
    fixed = torch.rand(n, generator=g) < 0.5
    always = fixed & (torch.rand(n, generator=g) < 0.5)
    computed = torch.randperm(channels, generator=g)[: channels // 2].sort().values
    return x, w1, b1, w2, b2, always, fixed, computed


def truth_on(x, w1, b1, w2, b2) -> torch.Tensor:
    """(B, n) decisions from float64 logits (away from 0 the float32 ones agree)."""
    pooled = x.double().mean((2, 3))
    return F.linear(F.relu(F.linear(pooled, w1.double(), b1.double())), w2.double(), b2.double()) > 0


@pytest.mark.parametrize("batch, c_in, channels, granularity, size", [
    (1, 3, 1, 1, (5, 6)), (4, 16, 16, 1, (5, 6)), (3, 12, 10, 4, (5, 6)), (2, 5, 7, 3, (5, 6)),
    (8, 32, 64, 8, (5, 6)), (1, 16, 9, 16, (5, 6)),
    (2, 70, 20, 1, (9, 9)), (1, 150, 33, 2, (11, 13))])  # several vector groups of channels and of pixels
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_scale", [True, False])
def test_kernel_equals_the_reference(batch, c_in, channels, granularity, size, channels_last, with_scale) -> None:
    if _ext.status() is not None:
        pytest.skip(f"the C++ extension is unavailable: {_ext.status()}")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::_gate_guard", "CPU")
    for seed in range(3):
        args = list(problem(batch, c_in, channels, granularity, seed, channels_last, size))
        if not with_scale:
            args[-1] = args[-1][:0]
        x, w1, b1, w2, b2, always, fixed, computed = args
        mask, scale, outside = gate_guard(*args, granularity, channels)
        want = _reference(*args, granularity, channels)
        on = truth_on(x, w1, b1, w2, b2)
        expanded = on.repeat_interleave(granularity, dim=1)[:, :channels]
        assert mask.dtype == torch.bool and torch.equal(mask, expanded) and torch.equal(want[0], expanded)
        assert scale.shape == (batch, computed.numel(), 1, 1) and scale.dtype == x.dtype
        assert torch.equal(scale, want[1]) and torch.equal(scale[:, :, 0, 0], expanded[:, computed].float())
        assert outside.shape == () and bool(outside) == bool(((on ^ always) & fixed).any()) == bool(want[2])


def test_outside_is_exactly_a_fixed_group_deciding_against_its_class() -> None:
    x, w1, b1, w2, _, _, _, computed = problem(2, 4, 4, 1, 0)
    w2 = torch.zeros_like(w2)
    b2 = torch.tensor([1.0, -1.0, 1.0, -1.0])  # on, off, on, off for every sample
    always = torch.tensor([True, False, False, False])
    for fixed, outside in (([True, True, False, False], False), ([False, False, True, False], True),
                           ([False, False, False, False], False), ([True, True, True, True], True)):
        assert bool(gate_guard(x, w1, b1, w2, b2, always, torch.tensor(fixed), computed, 1, 4)[2]) == outside


def test_other_dtypes_take_the_plain_torch_formulation() -> None:
    args = [a.double() if a.is_floating_point() else a for a in problem(3, 6, 10, 4, 1)]
    mask, scale, outside = gate_guard(*args, 4, 10)
    want = _reference(*args, 4, 10)
    assert scale.dtype == torch.float64 and torch.equal(mask, want[0]) and torch.equal(scale, want[1])
    assert bool(outside) == bool(want[2])


def test_opcheck() -> None:
    args = problem(3, 6, 10, 4, 1)
    torch.library.opcheck(torch.ops.sparsekern._gate_guard.default, (*args, 4, 10),
                          test_utils=("test_schema", "test_faketensor"))


def test_kernel_errors_name_the_argument() -> None:
    if _ext.status() is not None:
        pytest.skip(f"the C++ extension is unavailable: {_ext.status()}")
    x, w1, b1, w2, b2, always, fixed, computed = problem(2, 4, 8, 1, 0)
    with pytest.raises(RuntimeError, match=r"w2 \(n, h\).*n = ceil\(out_channels / granularity\) = 4 do not fit"):
        gate_guard(x, w1, b1, w2, b2, always, fixed, computed, 2, 8)
    with pytest.raises(RuntimeError, match="computed channel 9 is not one of the 8 output channels"):
        gate_guard(x, w1, b1, w2, b2, always, fixed, torch.tensor([9]), 1, 8)
    with pytest.raises(RuntimeError, match="bool tensors"):
        gate_guard(x, w1, b1, w2, b2, always.float(), fixed, computed, 1, 8)
