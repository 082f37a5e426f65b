"""sk.save / sk.load: plans and compiled models round-trip bit for bit; bad files fail clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern.models import build
from sparsekern.plan import PlanError
from sparsekern.serialize import SerializationError
from tests.conftest import random_plan, randomize_bn


@pytest.fixture
def compiled() -> tuple[nn.Module, torch.Tensor]:
    model = randomize_bn(build("resnet20", num_classes=7).eval())
    x = torch.randn(2, 3, 32, 32)
    return sk.compile(model, random_plan(model, x, 0), x, round_to=4, passes=("fold_bn",)).eval(), x


def test_compiled_model_round_trips_bit_for_bit(compiled, tmp_path: Path) -> None:
    fast, x = compiled
    sk.save(fast, tmp_path / "m.sk")
    loaded = sk.load(tmp_path / "m.sk")
    with torch.no_grad():
        assert torch.equal(loaded(x), fast(x))
    assert loaded.sk_plan.to_dict() == fast.sk_plan.to_dict()
    assert not loaded.training


def test_plan_round_trips_as_json(tmp_path: Path) -> None:
    model = build("resnet20").eval()
    x = torch.randn(1, 3, 32, 32)
    plan = random_plan(model, x, 1)
    sk.save(plan, tmp_path / "plan.json")
    again = sk.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    with torch.no_grad():
        assert torch.equal(sk.compile(model, again)(x), sk.compile(model, plan)(x))


def test_corrupt_file_is_rejected(compiled, tmp_path: Path) -> None:
    fast, _ = compiled
    path = sk.save(fast, tmp_path / "m.sk")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a bit in the last tensor's data
    path.write_bytes(bytes(data))
    with pytest.raises(SerializationError, match="checksum"):
        sk.load(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(SerializationError, match="corrupt or truncated"):
        sk.load(path)


def test_mismatched_tensors_are_rejected(compiled, tmp_path: Path) -> None:
    fast, _ = compiled
    fast.sk_plan.channels.popitem()  # the manifest's plan no longer matches the tensors
    with pytest.raises(SerializationError, match="do not match the rebuilt architecture"):
        sk.load(sk.save(fast, tmp_path / "m.sk"))


def test_model_without_architecture_reference_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="arch="):
        sk.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.sk")
    with pytest.raises(SerializationError, match="cannot import"):
        sk.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "m.sk", arch={"factory": "nowhere.at_all:f"})


def test_factory_reference_round_trips_in_the_saving_process(tmp_path: Path) -> None:
    """Saving trusts the factory the caller named; other processes pass it to sk.load (tests/test_security.py)."""
    model = nn.Sequential(nn.Linear(4, 3))
    sk.save(model, tmp_path / "m.sk", arch={"factory": "tests.test_serialize:tiny", "kwargs": {}})
    torch.manual_seed(5)
    loaded = sk.load(tmp_path / "m.sk")
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3))


def test_bad_plan_files_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(PlanError, match="not a sparsekern plan"):
        sk.load(tmp_path / "p.json")
    (tmp_path / "q.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        sk.load(tmp_path / "q.json")
    with pytest.raises(FileNotFoundError):
        sk.load(tmp_path / "missing.sk")


def test_a_deep_copy_of_a_compiled_model_still_saves(compiled, tmp_path: Path) -> None:
    import copy

    fast, x = compiled
    clone = copy.deepcopy(fast)  # fx rebuilds GraphModules on deepcopy; the manifest attributes must survive
    assert clone.sk_plan is not None and clone.sk_arch == fast.sk_arch
    with torch.no_grad():
        assert torch.equal(sk.load(sk.save(clone, tmp_path / "c.sk"))(x), fast(x))


def test_training_state_round_trips_without_pickle(tmp_path: Path) -> None:
    """Optimizer/RNG states keep their container and key types; a pickle is refused, not unpickled."""
    import random

    from sparsekern.serialize import load_state, save_state

    layer = nn.Linear(3, 2)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"opt": opt.state_dict(), "python": random.getstate(), "torch": torch.get_rng_state(),
             "best": float("inf"), 7: None, "flags": (True, "x", [1.5])}
    again = load_state(save_state(state, tmp_path / "state.sk"))
    assert again["python"] == state["python"] and again[7] is None and again["flags"] == (True, "x", [1.5])
    assert torch.equal(again["torch"], state["torch"]) and again["best"] == float("inf")
    assert list(again["opt"]["state"]) == [0, 1]
    assert torch.equal(again["opt"]["state"][0]["momentum_buffer"], state["opt"]["state"][0]["momentum_buffer"])
    assert again["opt"]["param_groups"] == state["opt"]["param_groups"]
    with pytest.raises(SerializationError, match=r"state\['bad'\] is a ndarray"):
        import numpy as np

        save_state({"bad": np.zeros(2)}, tmp_path / "bad.sk")
    torch.save(state, tmp_path / "pickled.pt")
    with pytest.raises(SerializationError, match="not a readable sparsekern state file"):
        load_state(tmp_path / "pickled.pt")
