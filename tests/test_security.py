"""Loading never executes code named by a file: sk.load's architecture factories and CIFAR-10's pickles."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import sparsekern as sk
from sparsekern import data, serialize
from sparsekern.models import build
from sparsekern.serialize import SerializationError


def _write_manifest_file(path: Path, arch: dict, **extra) -> None:
    """A model file as an attacker would write it: any manifest, with a correct digest of its tensors."""
    from safetensors.torch import save_file

    t = {"w": torch.zeros(1)}
    sha = hashlib.sha256(b"w:torch.float32:(1,);" + t["w"].numpy().tobytes()).hexdigest()
    man = {"format": "sparsekern.model", "version": 1, "plan": None, "compile": None, "sha256": sha,
           "arch": arch, **extra}
    save_file(t, str(path), metadata={"sparsekern": json.dumps(man)})


def test_a_factory_named_by_the_file_is_never_imported(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.sk"
    _write_manifest_file(evil, {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(marker)]}})
    with pytest.raises(SerializationError, match=r"does not trust.*factories=\{'subprocess:run'"):
        sk.load(evil)
    assert not marker.exists()


def test_an_untrusted_module_is_not_even_imported(tmp_path: Path, monkeypatch) -> None:
    """Importing a module runs its top-level code, so refusal must come before any import."""
    (tmp_path / "sk_evil_module.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').close()\n"
                                                "def make():\n    raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = tmp_path / "evil.sk"
    _write_manifest_file(evil, {"factory": "sk_evil_module:make"})
    with pytest.raises(SerializationError, match="does not trust"):
        sk.load(evil)
    assert not (tmp_path / "IMPORTED").exists()


class TinyNet(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def make_tiny(width: int = 4) -> nn.Module:
    return TinyNet(width)


def test_user_factories_load_only_when_trusted_at_load_time(tmp_path: Path) -> None:
    model = make_tiny(6).eval()
    path = sk.save(model, tmp_path / "m.sk", arch={"factory": make_tiny, "kwargs": {"width": 6}})
    name = f"{__name__}:make_tiny"
    serialize._REGISTERED.pop(name)  # a fresh process: saving registered it in this one
    with pytest.raises(SerializationError, match="does not trust"):
        sk.load(path)
    x = torch.randn(2, 3, 8, 8)
    loaded = sk.load(path, factories={name: make_tiny})
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert name not in serialize._REGISTERED  # trust given to one call does not outlive it
    serialize.register_factory(name, make_tiny)
    try:
        with torch.no_grad():
            assert torch.equal(sk.load(path)(x), model(x))
    finally:
        serialize._REGISTERED.pop(name)


def test_a_factory_without_an_importable_name_is_refused_at_save(tmp_path: Path) -> None:
    with pytest.raises(SerializationError, match="module level"):
        sk.save(make_tiny(), tmp_path / "m.sk", arch={"factory": lambda: make_tiny()})
    assert not (tmp_path / "m.sk").exists()


def test_builtin_factories_load_without_being_passed(tmp_path: Path) -> None:
    """SANP models record sparsekern's own factory, which wraps a zoo reference: both are trusted."""
    from sparsekern.methods import sanp

    model = sanp.to_sanp(build("resnet20", num_classes=3)).eval()
    x = torch.randn(2, 3, 16, 16)
    loaded = sk.load(sk.save(model, tmp_path / "sanp.sk"))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_malformed_input_records_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.sk"
    _write_manifest_file(path, {"name": "resnet20"}, compile={"inputs": [{"shape": [1, 3, 8, 8], "dtype": "load"}]})
    with pytest.raises(SerializationError, match="invalid example-input record"):
        sk.load(path)


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_batches_cannot_execute_code(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar"
    folder.mkdir()
    batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"extra": _Payload(str(marker))}
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="refusing to load .*system"):
        data.cifar10(folder, "test")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path: Path, protocol: int) -> None:
    folder = tmp_path / "cifar"
    folder.mkdir()
    pixels = np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8)
    batch = {b"batch_label": b"test", b"data": pixels, b"labels": [3, 7], b"filenames": [b"a.png", b"b.png"]}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=protocol))
    images, labels = data.cifar10(folder, "test").tensors
    assert labels.tolist() == [3, 7]
    assert images.shape[0] == 2
