"""Byte-level text corpora for language-model pruning (FLOP, Wang, Wohlwend & Lei 2019).

* :func:`pystdlib`: a corpus that ships with every Python install: a fixed list of the standard library's
  own ``.py`` sources (:data:`STDLIB_FILES`), read from ``sysconfig.get_paths()["stdlib"]`` and concatenated
  in list order. Files missing from an installation are skipped (and listed in ``ByteCorpus.missing``); the
  content differs between Python versions, so every corpus records its size and SHA-256.
* :func:`enwik8`: the Hutter-prize enwik8 file (raw 100,000,000 bytes, or ``enwik8.zip``) from a path, split
  as in the character-level LM literature: the first 90M bytes train, the next 5M valid, the last 5M test.
* :func:`load`: ``"pystdlib"`` or ``"enwik8:PATH"`` -> :class:`ByteCorpus`.
* :class:`LMSequences`: fixed-length next-byte windows of one split, a map-style ``Dataset`` yielding
  ``(x, y)`` int64 pairs of shape (T,) that :func:`sparsekern.train.train` batches into (B, T) with the
  default token-level cross-entropy.
* :func:`bits_per_byte`: evaluation in bits per byte (= bits per character for enwik8's byte encoding).

The vocabulary is the 256 byte values; no preprocessing, no tokenizer.
"""
from __future__ import annotations

import hashlib
import math
import os
import sysconfig
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sparsekern.modes import eval_mode

__all__ = [
    "ENWIK8_SPLIT",
    "STDLIB_FILES",
    "ByteCorpus",
    "LMSequences",
    "bits_per_byte",
    "enwik8",
    "load",
    "pystdlib",
    "split_bytes",
]

VOCAB_SIZE = 256

#: Standard-library sources of the ``pystdlib`` corpus, relative to the stdlib folder, in concatenation order.
#: Well-known modules that are plain files (not packages) in every CPython from 3.9 on and are not scheduled
#: for removal (PEP 594); a file an installation lacks is skipped.
STDLIB_FILES: tuple[str, ...] = (
    "abc.py", "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "cmd.py", "code.py",
    "codecs.py", "collections/__init__.py", "colorsys.py", "configparser.py", "contextlib.py", "copy.py",
    "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "dis.py", "enum.py", "filecmp.py", "fnmatch.py",
    "fractions.py", "functools.py", "getopt.py", "gettext.py", "glob.py", "gzip.py", "heapq.py", "hmac.py",
    "inspect.py", "ipaddress.py", "json/decoder.py", "json/encoder.py", "keyword.py", "linecache.py",
    "locale.py", "logging/__init__.py", "numbers.py", "operator.py", "optparse.py", "os.py", "pickle.py",
    "pprint.py", "queue.py", "random.py", "shlex.py", "shutil.py", "statistics.py", "string.py",
    "textwrap.py", "threading.py", "tokenize.py", "traceback.py", "typing.py", "uuid.py", "warnings.py",
    "weakref.py",
)

#: enwik8 train / valid / test sizes in bytes (the standard split of the first 100M bytes).
ENWIK8_SPLIT: tuple[int, int, int] = (90_000_000, 5_000_000, 5_000_000)


@dataclass
class ByteCorpus:
    """A byte corpus split into train / valid / test.

    Attributes:
        name: ``"pystdlib"`` or ``"enwik8"``.
        train, valid, test: uint8 tensors of shape (n,), contiguous, disjoint slices of one byte string in
            that order.
        sha256: hex digest of the whole byte string (the three splits concatenated).
        source: where the bytes came from (folder or file).
        files: the files concatenated (``pystdlib``), in order.
        missing: files of :data:`STDLIB_FILES` this installation lacks (skipped).
    """

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    sha256: str
    source: str
    files: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    vocab_size: int = VOCAB_SIZE

    def split(self, name: str) -> Tensor:
        """The uint8 tensor of split ``name`` (``"train"``, ``"valid"`` or ``"test"``)."""
        if name not in ("train", "valid", "test"):
            raise ValueError(f"split must be 'train', 'valid' or 'test', got {name!r}")
        return getattr(self, name)

    def summary(self) -> dict[str, object]:
        """JSON description: name, sizes, digest, missing files."""
        return {"name": self.name, "train_bytes": len(self.train), "valid_bytes": len(self.valid),
                "test_bytes": len(self.test), "sha256": self.sha256, "missing": list(self.missing)}


def split_bytes(data: bytes, fractions: Sequence[float] = (0.9, 0.05, 0.05)) -> tuple[Tensor, Tensor, Tensor]:
    """Cut ``data`` into three contiguous, disjoint parts of the given fractions (train, valid, test).

    The boundaries are ``floor(f0 * n)`` and ``floor((f0 + f1) * n)``; test takes the rest. Returns uint8
    tensors (copies, independent of ``data``).
    """
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {tuple(fractions)}")
    n = len(data)
    a = math.floor(fractions[0] * n)
    b = math.floor((fractions[0] + fractions[1]) * n)
    if a == 0 or b == a or b == n:
        raise ValueError(f"{n} bytes are too few for a {tuple(fractions)} split")
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return whole[:a].clone(), whole[a:b].clone(), whole[b:].clone()


def pystdlib(files: Sequence[str] = STDLIB_FILES, *, root: str | os.PathLike[str] | None = None) -> ByteCorpus:
    """The Python standard-library corpus: ``files`` concatenated in order, split 90/5/5.

    Args:
        files: paths relative to ``root`` (default :data:`STDLIB_FILES`).
        root: the stdlib folder; default ``sysconfig.get_paths()["stdlib"]``.

    Raises:
        FileNotFoundError: when none of the files exists under ``root``.
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    parts, used, missing = [], [], []
    for rel in files:
        path = base / rel
        if path.is_file():
            parts.append(path.read_bytes())
            used.append(rel)
        else:
            missing.append(rel)
    if not parts:
        raise FileNotFoundError(
            f"none of the {len(files)} standard-library files was found under {base}; pass root= the folder "
            "of the Python standard library (sysconfig.get_paths()['stdlib'])"
        )
    data = b"".join(parts)
    train, valid, test = split_bytes(data)
    return ByteCorpus("pystdlib", train, valid, test, hashlib.sha256(data).hexdigest(), str(base),
                      tuple(used), tuple(missing))


def enwik8(path: str | os.PathLike[str], *, split: Sequence[int] = ENWIK8_SPLIT) -> ByteCorpus:
    """enwik8 from ``path`` (the raw file, or ``enwik8.zip`` holding it), split by byte counts.

    Args:
        path: the file.
        split: train / valid / test sizes in bytes, taken in order from the start of the file (default the
            standard 90M / 5M / 5M).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is shorter than ``sum(split)``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no enwik8 file at {path}; download http://mattmahoney.net/dc/enwik8.zip and pass its path "
            "(zipped or unzipped)"
        )
    total = sum(int(s) for s in split)
    if len(split) != 3 or any(int(s) <= 0 for s in split):
        raise ValueError(f"split must be three positive byte counts, got {tuple(split)}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = "enwik8" if "enwik8" in zf.namelist() else zf.namelist()[0]
            with zf.open(name) as f:
                data = f.read(total)
    else:
        with open(path, "rb") as f:
            data = f.read(total)
    if len(data) < total:
        raise ValueError(f"{path} holds {len(data)} bytes, fewer than the {total} of the split {tuple(split)}")
    whole = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    a, b = int(split[0]), int(split[0]) + int(split[1])
    return ByteCorpus("enwik8", whole[:a], whole[a:b], whole[b:total], hashlib.sha256(data).hexdigest(),
                      str(path))


def load(spec: str) -> ByteCorpus:
    """A corpus from a spec string: ``"pystdlib"`` or ``"enwik8:PATH"``."""
    name, _, arg = spec.partition(":")
    if name == "pystdlib" and not arg:
        return pystdlib()
    if name == "enwik8" and arg:
        return enwik8(arg)
    raise ValueError(f"unknown text corpus {spec!r}; use 'pystdlib' or 'enwik8:PATH'")


class LMSequences(Dataset):
    """Next-byte prediction windows of a byte tensor: item ``i`` is ``(x, y)`` with
    ``x = data[i*stride : i*stride + T]`` and ``y = data[i*stride + 1 : i*stride + T + 1]`` (int64, shape (T,)).

    Args:
        data: uint8 (or integer) tensor of shape (n,), e.g. ``corpus.train``.
        seq_len: window length ``T``.
        stride: start offset between windows (default ``T``: non-overlapping windows that cover every byte
            but the last once as an input).
    """

    def __init__(self, data: Tensor, seq_len: int, stride: int | None = None) -> None:
        if data.dim() != 1:
            raise ValueError(f"data must be a 1-D byte tensor, got shape {tuple(data.shape)}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.stride = seq_len if stride is None else int(stride)
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        if len(data) < seq_len + 1:
            raise ValueError(f"{len(data)} bytes are too few for one window of {seq_len} + 1 bytes")
        self.data = data
        self.seq_len = seq_len
        self.n = (len(data) - seq_len - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not -self.n <= i < self.n:
            raise IndexError(f"window {i} out of range for {self.n} windows")
        i = i % self.n
        start = i * self.stride
        chunk = self.data[start:start + self.seq_len + 1].long()
        return chunk[:-1], chunk[1:]


@torch.no_grad()
def bits_per_byte(
    model: nn.Module,
    data: Tensor,
    seq_len: int,
    *,
    batch_size: int = 32,
    max_bytes: int | None = None,
    device: str | torch.device | None = None,
) -> float:
    """Mean negative log2-likelihood per predicted byte of ``model`` on ``data`` (eval mode, flags restored).

    The bytes are cut into non-overlapping windows of ``seq_len`` (as :class:`LMSequences`); each window is an
    independent sequence (Transformer: no memory across windows; SRU: zero initial state), so every byte is
    predicted from the at most ``seq_len - 1`` bytes before it in its window.

    Args:
        model: maps int64 (B, T) to logits (B, T, 256).
        data: uint8 tensor (n,), e.g. ``corpus.test``.
        seq_len: window length.
        batch_size: windows per forward.
        max_bytes: evaluate only the first this many bytes (quick runs).
        device: default: the model's device.

    Returns:
        bits per byte (cross-entropy in nats / ln 2), averaged over every predicted byte.
    """
    if max_bytes is not None:
        data = data[: max_bytes + 1]
    windows = LMSequences(data, seq_len)
    if device is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(windows), batch_size):
            items = [windows[i] for i in range(start, min(start + batch_size, len(windows)))]
            x = torch.stack([a for a, _ in items]).to(device)
            y = torch.stack([b for _, b in items]).to(device)
            logits = model(x)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), y.reshape(-1),
                                           reduction="sum"))
            count += y.numel()
    return total / count / math.log(2.0)
