"""Stage checkpoints (sparsekern/checkpoint.py): what a completed stage reads back, when it is reused, and
that an interrupted save never looks like a completed stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsekern.checkpoint as checkpoint
from sparsekern.checkpoint import CheckpointMismatch, Checkpoints

ARGS = {"--budget": 0.5, "--model": "resnet20", "--protocol": None, "--arms": ("fine-tune",)}


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied weights share storage, which safetensors refuses as is
        self.bn = nn.BatchNorm1d(3)


def test_a_saved_stage_reads_back_its_info_and_weights(tmp_path: Path) -> None:
    model = Tied()
    model.bn.running_mean.fill_(2.0)
    Checkpoints(tmp_path, ARGS).save("full", {"accuracy": 0.25, "history": [{"loss": 1.5}]}, {"full": model})
    stage = Checkpoints(tmp_path, ARGS, resume=True).load("full")
    assert stage is not None and stage.info == {"accuracy": 0.25, "history": [{"loss": 1.5}]}
    fresh = stage.load_into(Tied(), "full")
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(CheckpointMismatch, match="holds no model 'pruned'"):
        stage.load_into(Tied(), "pruned")


def test_stages_are_reused_only_when_resuming(tmp_path: Path) -> None:
    Checkpoints(tmp_path, ARGS).save("prune", {"plan": {}})
    assert Checkpoints(tmp_path, ARGS).load("prune") is None
    assert Checkpoints(tmp_path, ARGS, resume=True).load("prune") is not None
    assert Checkpoints(tmp_path, ARGS, resume=True).load("arm-fine-tune") is None  # not completed yet
    assert Checkpoints(tmp_path, ARGS).completed() == ["prune"]


def test_resuming_with_other_arguments_is_refused_naming_each_difference(tmp_path: Path) -> None:
    Checkpoints(tmp_path, ARGS).save("full", {})
    other = {**ARGS, "--budget": 0.6, "--protocol": "rethinking"}
    del other["--model"]
    store = Checkpoints(tmp_path, other, resume=True)
    with pytest.raises(CheckpointMismatch) as e:
        store.check()
    message = str(e.value)
    assert "--budget: checkpoint 0.5, now 0.6" in message
    assert '--protocol: checkpoint unset, now "rethinking"' in message
    assert '--model: checkpoint "resnet20", now unset' in message
    assert "--arms" not in message  # a tuple equals the list it reads back as
    with pytest.raises(CheckpointMismatch):
        store.load("full")


def test_an_interrupted_save_leaves_no_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def save_half(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"\x00" * 10)  # a partial write, then the interruption
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", save_half)
    store = Checkpoints(tmp_path, ARGS, resume=True)
    with pytest.raises(KeyboardInterrupt):
        store.save("full", {"accuracy": 1.0}, {"full": nn.Linear(2, 2)})
    assert store.completed() == [] and store.load("full") is None
    assert list(tmp_path.iterdir()) == []  # the partial file is removed too


def test_a_corrupt_checkpoint_is_reported_not_used(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path, ARGS, resume=True)
    store.save("full", {}, {"full": nn.Linear(2, 2)})
    store.path("full").write_bytes(store.path("full").read_bytes()[:40])
    with pytest.raises(CheckpointMismatch, match="not a readable stage checkpoint.*delete it"):
        store.load("full")


def test_info_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="stage 'full'"):
        Checkpoints(tmp_path, ARGS).save("full", {"model": nn.Linear(2, 2)})
    assert Checkpoints(tmp_path, ARGS).completed() == []


def test_clear_deletes_only_stage_files(tmp_path: Path) -> None:
    store = Checkpoints(tmp_path, ARGS)
    store.save("full", {})
    (tmp_path / "notes.txt").write_text("keep")
    assert [p.name for p in store.clear()] == ["full.safetensors"]
    assert (tmp_path / "notes.txt").read_text() == "keep" and store.completed() == []


def test_a_disabled_store_checkpoints_nothing(tmp_path: Path) -> None:
    store = Checkpoints(None, ARGS, resume=True)
    store.save("full", {"accuracy": 1.0}, {"full": nn.Linear(2, 2)})
    assert store.load("full") is None and store.completed() == [] and store.clear() == []
    store.check()


def test_a_stage_file_is_a_serialize_state_file_with_format_stage_and_arguments(tmp_path: Path) -> None:
    from sparsekern.serialize import load_state

    Checkpoints(tmp_path, ARGS).save("full", {"accuracy": 0.5}, {"full": nn.Linear(2, 2)})
    state = load_state(tmp_path / "full.safetensors")
    assert state["format"] == checkpoint.FORMAT and state["stage"] == "full"
    assert state["args"]["--budget"] == 0.5 and state["info"] == {"accuracy": 0.5}
    assert set(state["models"]["full"]) == {"weight", "bias"}
