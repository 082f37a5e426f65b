"""The one dispatch per op: backend selection, forced backends, and errors that list every reason."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sparsekern.ops import NoBackendError, dispatch_of
from sparsekern.ops._dispatch import Dispatch


def _dispatch() -> Dispatch:
    d = Dispatch("toy")
    d.register("fast", lambda x: None if x > 0 else "needs a positive input", lambda x: ("fast", x))
    d.register("slow", lambda x: None if x != 0 else "cannot take zero", lambda x: ("slow", x))
    return d


def test_first_backend_that_can_take_the_input_runs() -> None:
    d = _dispatch()
    assert d(3) == ("fast", 3)
    assert d(-1) == ("slow", -1)
    assert d.reasons(-1) == {"fast": "needs a positive input", "slow": None}


def test_no_backend_lists_every_reason() -> None:
    with pytest.raises(NoBackendError) as err:
        _dispatch()(0)
    assert "fast: needs a positive input" in str(err.value) and "slow: cannot take zero" in str(err.value)


def test_forced_backend_says_why_it_cannot_run() -> None:
    d = _dispatch()
    assert d(3, backend="slow") == ("slow", 3)
    with pytest.raises(NoBackendError, match="'fast' cannot run these inputs: needs a positive input"):
        d(-1, backend="fast")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; known: \\['fast', 'slow'\\]"):
        d(1, backend="gpu")
    with pytest.raises(ValueError, match="already registered"):
        d.register("fast", lambda x: None, lambda x: x)


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
        "assert 'extension unavailable' in reasons['cpu'], reasons\n"
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
