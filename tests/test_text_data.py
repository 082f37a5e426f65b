"""Byte corpora: the stdlib corpus is deterministic and split into disjoint contiguous parts, enwik8's
standard split from a path, next-byte windows, and bits per byte against hand-computed values."""
from __future__ import annotations

import math
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsekern.text_data import (
    STDLIB_FILES,
    LMSequences,
    bits_per_byte,
    enwik8,
    load,
    pystdlib,
    split_bytes,
)


def test_pystdlib_is_deterministic_and_splits_are_disjoint_and_cover_the_files() -> None:
    a, b = pystdlib(), pystdlib()
    assert a.sha256 == b.sha256
    for part in ("train", "valid", "test"):
        assert torch.equal(a.split(part), b.split(part))
        assert a.split(part).dtype == torch.uint8
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = b"".join((root / f).read_bytes() for f in a.files)
    assert a.files == tuple(f for f in STDLIB_FILES if (root / f).is_file())
    assert len(a.files) >= 30
    # the three splits are consecutive pieces of the concatenated files: disjoint and complete
    joined = torch.cat([a.train, a.valid, a.test]).numpy().tobytes()
    assert joined == expected
    n = len(expected)
    assert len(a.train) == int(0.9 * n) and len(a.train) + len(a.valid) == int(0.95 * n)
    assert abs(len(a.test) - 0.05 * n) <= 2
    assert a.summary()["train_bytes"] == len(a.train)


def test_pystdlib_skips_missing_files_and_fails_when_none_exist(tmp_path: Path) -> None:
    (tmp_path / "one.py").write_bytes(b"x = 1\n" * 50)
    corpus = pystdlib(["one.py", "gone.py"], root=tmp_path)
    assert corpus.files == ("one.py",) and corpus.missing == ("gone.py",)
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 300
    with pytest.raises(FileNotFoundError, match="none of the 1 standard-library files"):
        pystdlib(["gone.py"], root=tmp_path)


def test_split_bytes_rejects_bad_fractions_and_tiny_inputs() -> None:
    with pytest.raises(ValueError, match="summing to 1"):
        split_bytes(b"abcdef" * 10, (0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="too few"):
        split_bytes(b"ab")


@pytest.mark.parametrize("zipped", [False, True])
def test_enwik8_takes_consecutive_byte_ranges(tmp_path: Path, zipped: bool) -> None:
    data = bytes(range(256)) * 4 + b"tail-not-used"
    path = tmp_path / "enwik8"
    path.write_bytes(data)
    if zipped:
        zpath = tmp_path / "enwik8.zip"
        with zipfile.ZipFile(zpath, "w") as zf:
            zf.write(path, "enwik8")
        path = zpath
    corpus = enwik8(path, split=(800, 100, 124))
    assert corpus.train.numpy().tobytes() == data[:800]
    assert corpus.valid.numpy().tobytes() == data[800:900]
    assert corpus.test.numpy().tobytes() == data[900:1024]
    with pytest.raises(ValueError, match="fewer than"):
        enwik8(path, split=(2000, 100, 100))


def test_load_specs(tmp_path: Path) -> None:
    assert load("pystdlib").name == "pystdlib"
    with pytest.raises(FileNotFoundError, match="enwik8.zip"):
        load(f"enwik8:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="unknown text corpus"):
        load("wikitext")


def test_lm_sequences_are_next_byte_pairs() -> None:
    data = torch.arange(100, dtype=torch.uint8)
    ds = LMSequences(data, 10)
    assert len(ds) == 9  # windows start at 0, 10, ..., 80; the one at 90 lacks its last target
    x, y = ds[3]
    assert x.dtype == torch.int64 and x.tolist() == list(range(30, 40)) and y.tolist() == list(range(31, 41))
    assert ds[-1][1][-1].item() == 90
    overlapping = LMSequences(data, 10, stride=5)
    assert len(overlapping) == 18 and overlapping[1][0][0].item() == 5
    with pytest.raises(IndexError):
        ds[9]
    with pytest.raises(ValueError, match="too few"):
        LMSequences(data[:5], 10)


class _Unigram(nn.Module):
    """Predicts the same byte distribution at every position (logits (256,))."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*x.shape, 256)


def test_bits_per_byte_uniform_model_is_8_bits() -> None:
    data = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert bits_per_byte(_Unigram(torch.zeros(256)), data, 16) == pytest.approx(8.0, abs=1e-6)


def test_bits_per_byte_matches_hand_computed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    data = torch.randint(97, 101, (401,), dtype=torch.uint8, generator=g)
    logits = torch.randn(256, generator=g)
    model = _Unigram(logits).train()
    seq = 20
    bpb = bits_per_byte(model, data, seq, batch_size=3)
    # every byte after the first is predicted exactly once (400 targets in 20 windows of 20)
    logp = torch.log_softmax(logits, 0)
    expected = -logp[data[1:].long()].double().mean().item() / math.log(2)
    assert bpb == pytest.approx(expected, rel=1e-6)
    assert model.training  # train/eval flags restored
    assert bits_per_byte(model, data, seq, max_bytes=100) == pytest.approx(
        -logp[data[1:101].long()].double().mean().item() / math.log(2), rel=1e-6)
