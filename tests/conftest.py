"""Shared test fixtures: small models exercising every coupling the dependency graph knows."""
from __future__ import annotations

import contextlib
import os

# One intra-op thread for the whole session (threading tests opt in to more with ``threads(n)``). Results must
# not depend on the thread count, and on a shared machine OpenMP threads spin-wait for each other whenever
# another process holds a core (observed: 5-20x slower steps). The variable is set before torch is imported
# so that OpenMP starts with one thread, and so that subprocesses the tests start (CLI, torchrun) inherit it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEST_THREADS = 1
torch.set_num_threads(TEST_THREADS)
try:
    torch.set_num_interop_threads(1)  # refused once inter-op work has started (torch imported by a plugin)
except RuntimeError:
    pass
# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. Triton reads the variable when a
# kernel is decorated, so it is set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Eager oneDNN convolutions reorder activations and weights on every call, which on the project's 2-core
# machine costs ~10 ms per conv (10x the conv itself). Correctness does not depend on the conv backend, so
# the test session uses PyTorch's native CPU convolution; benchmarks use the frozen oneDNN path instead.
torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True, scope="session")
def _no_kernel_timing():
    """No clock in tests: the ``onednn`` pass's per-layer kernel choice (:mod:`sparsekern.tuning`) answers
    oneDNN for any layer it has no timing for, instead of timing it; tests of the choice inject tables."""
    from sparsekern.tuning import Tuner, use_tuner

    with use_tuner(Tuner(measure=False)):
        yield


@pytest.fixture(autouse=True)
def _session_threads():
    """Every test starts with the session's one intra-op thread, and a test (or the code it calls, e.g. the
    demo's ``threads=``) that changes the count does not leak it into the tests after it."""
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)
    yield
    if torch.get_num_threads() != TEST_THREADS:
        torch.set_num_threads(TEST_THREADS)


def threads(n: int):
    """Opt in to ``n`` intra-op threads inside a threading test (restored after the block)."""
    from sparsekern.bench.timing import set_threads

    return set_threads(n)


@contextlib.contextmanager
def training_backend():
    """Train with oneDNN (the session disables it for inference checks; the native conv backward is much slower)."""
    onednn = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = True
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = onednn


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every norm layer non-trivial statistics and affine parameters, so wrong wiring shows up."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


class ConcatSplitNet(nn.Module):
    """Residual chain, concat with offsets, depthwise conv, split, grouped conv, GroupNorm, flatten->linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a1 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a1_bn = nn.BatchNorm2d(16)
        self.a2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.a2_bn = nn.BatchNorm2d(16)
        self.side = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.grouped = nn.Conv2d(32, 16, 1, groups=4)
        self.gn = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        y = F.relu(y + self.a2_bn(self.a2(F.relu(self.a1_bn(self.a1(y))))))
        z = torch.cat([y, self.side(x)], 1)
        z = self.dw(z)
        a, b = torch.split(z, [16, 16], 1)
        z = torch.cat([b, a], 1)
        z = F.relu(self.gn(self.grouped(z)))
        z = F.adaptive_avg_pool2d(z, 4)
        return self.fc(torch.flatten(z, 1))


class ChunkViewNet(nn.Module):
    """chunk along channels, multiplier-2 depthwise conv, view with an explicit size, LayerNorm on features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 24, 3, padding=1)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.proj = nn.Conv2d(12 + 24, 8, 1)
        self.fc1 = nn.Linear(8 * 2 * 2, 32)
        self.ln = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.conv(x).chunk(2, dim=1)
        z = torch.cat([a, self.dw(b)], dim=1)
        z = F.adaptive_max_pool2d(torch.sigmoid(self.proj(z)), 2)
        z = z.view(z.size(0), 32)
        return self.fc2(F.gelu(self.ln(self.fc1(z))))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def constraint_widths(cg) -> dict[str, int]:
    """Group name -> the width of the slices that must keep equal counts (grouped conv, GroupNorm), for the
    groups under such a constraint."""
    width: dict[str, int] = {}
    for c in cg.constraints:
        for name, cls in cg.group_classes.items():
            if np.isin(cg.roots[c.layout.atoms], cls).any():
                width[name] = min(width.get(name, c.layout.size), c.layout.size // c.groups)
    return width


def trained_resnet20(seed: int, *, epochs: float, image_size: int) -> nn.Module:
    """A ResNet-20 trained from ``torch.manual_seed(seed)`` on the digits at ``image_size`` px (eval mode)."""
    from sparsekern.data import digits
    from sparsekern.models import build
    from sparsekern.train import TrainConfig, train

    torch.manual_seed(seed)
    model = build("resnet20")
    with training_backend():
        train(model, digits("train", image_size=image_size),
              TrainConfig(epochs=epochs, lr=0.1, batch_size=64, progress=False, seed=seed))
    return model.eval()


def random_plan(model: nn.Module, x: torch.Tensor, seed: int, *, low: float = 0.2, high: float = 0.9):
    """A random valid plan: each unpinned group keeps a random fraction in [low, high] of its channels.

    Groups under a per-group count constraint (grouped conv, GroupNorm) are cut into slices of the
    constraint's group width and keep one shared random count in every slice, so all constraints hold.
    """
    from sparsekern.graph import trace_channels
    from sparsekern.plan import GroupKeep, Plan

    rng = np.random.default_rng(seed)
    cg = trace_channels(model, x)
    width = constraint_widths(cg)
    shared = rng.uniform(low, high)
    channels = {}
    for name, spec in cg.groups.items():
        if spec.pinned:
            continue
        per = width.get(name, spec.size)
        parts = spec.size // per
        frac = shared if name in width else rng.uniform(low, high)
        k = max(1, int(round(per * frac)))
        keep = sorted(int(i) for p in range(parts) for i in p * per + rng.choice(per, size=k, replace=False))
        channels[name] = GroupKeep(spec.size, tuple(keep), spec.members)
    return Plan(channels=channels, meta={"inputs": cg.input_spec})


def assert_close_to_scale(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    """max |out - ref| <= tol * max |ref| (docs/design.md#tolerances)."""
    assert out.shape == ref.shape
    scale = ref.abs().max().clamp_min(1e-12)
    err = (out - ref).abs().max() / scale
    assert err <= tol, f"max error {err:.3e} x output scale exceeds {tol}"
