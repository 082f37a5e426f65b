"""The one dispatch per op: backend selection, forced backends, and errors that list every reason."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from sparsekern.ops import Backend, Dispatch, NoBackendError, dispatch_of


@dataclass(frozen=True)
class Toy:
    """A toy op's problem: one number on a device."""

    value: int
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32


def _toy(value: int) -> Toy:
    if not isinstance(value, int):
        raise TypeError("toy: value must be an int")
    return Toy(value)


def _dispatch() -> Dispatch:
    d = Dispatch("toy", _toy)
    d.register(Backend("fast", lambda pr: ("fast", pr.value), devices=("cpu",),
                       limits=lambda pr: [] if pr.value > 0 else ["needs a positive input"]))
    d.register(Backend("slow", lambda pr: ("slow", pr.value),
                       limits=lambda pr: [] if pr.value != 0 else ["cannot take zero"]))
    return d


def test_first_backend_that_can_take_the_input_runs() -> None:
    d = _dispatch()
    assert d.run(Toy(3)) == ("fast", 3)
    assert d.run(Toy(-1)) == ("slow", -1)
    assert d.reasons_for(Toy(-1)) == {"fast": ["needs a positive input"], "slow": []}
    assert d.reasons(-1) == d.reasons_for(Toy(-1))  # the op's own arguments go through its validator
    with pytest.raises(TypeError, match="value must be an int"):
        d.reasons("one")
    assert d.run(Toy(3), order=["slow"]) == ("slow", 3)  # a preferred order is tried first


def test_a_backend_returns_all_its_reasons() -> None:
    backend = Backend("gpu_only", lambda pr: None, devices=("cuda",), dtypes=(torch.float16,),
                      available=lambda: "no driver", limits=lambda pr: ["too big", "too odd"])
    assert backend.reasons(Toy(1)) == ["runs on CUDA, got a CPU tensor", "takes float16, got float32", "no driver",
                                       "too big", "too odd"]


def test_no_backend_lists_every_reason() -> None:
    with pytest.raises(NoBackendError) as err:
        _dispatch().run(Toy(0))
    assert "fast: needs a positive input" in str(err.value) and "slow: cannot take zero" in str(err.value)


def test_forced_backend_says_why_it_cannot_run() -> None:
    d = _dispatch()
    assert d.run(Toy(3), "slow") == ("slow", 3)
    with pytest.raises(NoBackendError, match="'fast' cannot run these inputs: needs a positive input"):
        d.run(Toy(-1), "fast")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; known: \\['fast', 'slow'\\]"):
        d.run(Toy(1), "gpu")
    with pytest.raises(ValueError, match="already registered"):
        d.register(Backend("fast", lambda pr: None))


def test_register_before_and_unregister() -> None:
    d = _dispatch()
    d.register(Backend("first", lambda pr: ("first", pr.value)), before="fast")
    assert d.names == ["first", "fast", "slow"] and d.run(Toy(1)) == ("first", 1)
    d.unregister("first")
    assert d.names == ["fast", "slow"]


def test_ops_list_their_backends_in_priority_order() -> None:
    assert dispatch_of("channel_skip_conv2d").names[-1] == "reference"
    assert dispatch_of("lowrank_linear").names[-1] == "reference"


def test_missing_sources_warn_and_fall_back(tmp_path) -> None:
    code = (
        "import warnings, torch\n"
        "from sparsekern.ops import _ext, channel_skip_conv2d, dispatch_of\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    assert _ext.load() is None\n"
        "assert any('could not be built' in str(m.message) for m in w), [str(m.message) for m in w]\n"
        "assert 'sources are not at' in _ext.status()\n"
        "x, wt = torch.randn(2, 3, 4, 4), torch.randn(5, 3, 1, 1)\n"
        "m = torch.tensor([[True, False, True]] * 2)\n"
        "reasons = dispatch_of('channel_skip_conv2d').reasons(x, wt, None, m, None, [1, 1], [0, 0], [1, 1], False)\n"
        "assert any('extension unavailable' in r for r in reasons['cpu']), reasons\n"
        "y = channel_skip_conv2d(x, wt, in_mask=m)\n"
        "torch.testing.assert_close(y, torch.nn.functional.conv2d(x * m[:, :, None, None], wt))\n"
    )
    env = {"SPARSEKERN_CSRC": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_public_op_checks_its_inputs() -> None:
    from sparsekern.ops import channel_skip_conv2d

    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match="in_mask must be a bool tensor of shape \\(2, 4\\)"):
        channel_skip_conv2d(x, w, in_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="groups=1 only"):
        channel_skip_conv2d(x, torch.randn(6, 2, 3, 3))


def _conv_then_mask(pr) -> torch.Tensor:
    """A backend of channel_skip_conv2d that skips nothing: the dense convolution, then the masks."""
    x = pr.x if pr.in_mask is None else pr.x.masked_fill(~pr.in_mask[:, :, None, None], 0)
    y = torch.nn.functional.conv2d(x, pr.weight, pr.bias, pr.stride, pr.padding, pr.dilation)
    y = torch.relu(y) if pr.relu else y
    y = y if pr.out_mask is None else y * pr.out_mask[:, :, None, None]
    return y.contiguous(memory_format=pr.memory_format)


@pytest.fixture
def conv_then_mask():
    """docs/adding-an-op-backend.md's example, registered first for the test and removed afterwards."""
    dispatch = dispatch_of("channel_skip_conv2d")
    dispatch.register(Backend("conv_then_mask", _conv_then_mask, devices=("cpu",), dtypes=(torch.float32,),
                              limits=lambda pr: [] if pr.dilation == [1, 1] else ["dilation must be 1"]),
                      before=dispatch.names[0])
    yield dispatch
    dispatch.unregister("conv_then_mask")


def test_a_backend_added_from_outside_runs_through_the_op(conv_then_mask) -> None:
    from sparsekern.ops import channel_skip_conv2d, reference
    from sparsekern.ops.channel_skip_conv2d import select_backend

    x, w, b = torch.randn(2, 3, 6, 6), torch.randn(4, 3, 3, 3), torch.randn(4)
    im, om = torch.rand(2, 3) > 0.5, torch.rand(2, 4) > 0.5
    assert select_backend(x, w, b, im, om, padding=1) == "conv_then_mask"
    y = channel_skip_conv2d(x, w, b, im, om, padding=1, relu=True)
    torch.testing.assert_close(y, reference.channel_skip_conv2d(x, w, b, im, om, [1, 1], [1, 1], [1, 1], True))
    assert conv_then_mask.reasons(x, w, dilation=2)["conv_then_mask"] == ["dilation must be 1"]
    assert select_backend(x, w, dilation=2) != "conv_then_mask"  # the next backend takes what it refuses
    assert conv_then_mask.reasons(x.half(), w.half())["conv_then_mask"] == ["takes float32, got float16"]
