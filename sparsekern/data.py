"""Data: an embedded default that needs no download, CIFAR-10 from disk, and seeded synthetic inputs.

* :func:`digits`: scikit-learn's bundled handwritten digits (1797 8x8 grey images, 10 classes; the
  UCI "optdigits" test set, shipped inside the sklearn package), upsampled so that CIFAR-sized models
  take it unchanged. This is the default for ``sparsekern demo`` and for end-to-end tests.
* :func:`cifar10`: CIFAR-10 (Krizhevsky 2009) from the standard "python version" folder.
* :func:`synthetic_inputs`: seeded standard-normal tensors for benchmarks (never zeros).
* :func:`load` turns a spec string (``"digits"`` or ``"cifar10:PATH"``) into a :class:`DataBundle`;
  :func:`loader` wraps a dataset in a seeded, single-process ``DataLoader``.

All image tensors are float32 (N, C, H, W), normalised per channel; labels are int64 (N,).

Augmentation (:class:`RandomCropFlip`, :class:`AugmentedTensorDataset`): the standard CIFAR recipe of every
official CIFAR script of the papers reproduced here (Network Slimming, Rethinking, TAS, Pruning from Scratch):
pad 4 pixels with black (zero) pixels, crop a random 32x32 window, flip horizontally with probability 1/2.
It is on by default for the CIFAR-10 training split (``cifar10(root, "train")``, ``load("cifar10:PATH")``) and
off for test splits and for the tiny embedded digits (8x8 images upsampled; the recipe is meant for
CIFAR's natural images, and ``digits(augment=True)`` turns it on). The random draws come from torch's global RNG
in ``__getitem__``, so a run is reproducible given ``torch.manual_seed`` (the trainer seeds it at the start
of training), also with ``num_workers > 0`` (each worker's RNG is seeded from the global one).
"""
from __future__ import annotations

import codecs
import functools
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "AugmentedTensorDataset",
    "CIFAR10_MEAN",
    "CIFAR10_PAD",
    "CIFAR10_STD",
    "DataBundle",
    "RandomCropFlip",
    "cifar10",
    "digits",
    "load",
    "loader",
    "synthetic_inputs",
]

# Per-channel statistics used by the CIFAR training code of the pruning papers reproduced here
# (Network Slimming, Rethinking the Value of Network Pruning). The std is the mean per-image std; the
# per-pixel std of the training set is (0.2470, 0.2435, 0.2616).
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2023, 0.1994, 0.2010)

CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES: tuple[str, ...] = ("test_batch",)

#: Padding of the random crop of the CIFAR recipe, in pixels of a 32x32 image.
CIFAR10_PAD = 4

DIGITS_TEST_FRACTION = 0.2
_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def _resize(images: torch.Tensor, image_size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear resize (N, C, H, W) -> (N, C, image_size, image_size), chunked to bound memory."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if images.shape[-2:] == (image_size, image_size):
        return images
    parts = [
        F.interpolate(images[i:i + chunk], size=(image_size, image_size), mode="bilinear", align_corners=False)
        for i in range(0, images.shape[0], chunk)
    ]
    return torch.cat(parts) if parts else images.new_zeros(0, images.shape[1], image_size, image_size)


# ----------------------------------------------------------------------------------------------- augmentation

class RandomCropFlip:
    """Random crop of a padded image and random horizontal flip, on one image (C, H, W) -> (C, H, W).

    The image is padded by ``padding`` pixels on every side with ``fill`` (one value, or one per channel:
    for normalised data, the value of a black pixel, ``-mean / std``, so that the padding is the zero
    padding of the raw pixels as in ``torchvision.transforms.RandomCrop(32, padding=4)``); a window of the
    original size is taken at a uniformly random offset ``(i, j)`` in ``[0, 2 * padding]^2`` and, with
    probability 1/2 if ``flip``, mirrored along the width. The output is a real window of the padded image
    (possibly flipped): pixels move, values do not change.

    Each call draws three integers from torch's global RNG (two offsets and the flip coin, the coin also
    without ``flip``), so the draws are seeded by ``torch.manual_seed``.

    Args:
        padding: pixels of padding per side (>= 0; CIFAR: 4).
        flip: also flip horizontally with probability 1/2.
        fill: padding value, a float or a sequence of one float per channel.
    """

    def __init__(self, padding: int = CIFAR10_PAD, *, flip: bool = True, fill: float | Sequence[float] = 0.0) -> None:
        if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
            raise ValueError(f"padding must be an int >= 0, got {padding!r}")
        self.padding = padding
        self.flip = bool(flip)
        self.fill = torch.as_tensor(fill, dtype=torch.float32).flatten()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3:
            raise ValueError(f"RandomCropFlip expects one image (C, H, W), got shape {tuple(image.shape)}")
        c, h, w = image.shape
        if self.fill.numel() not in (1, c):
            raise ValueError(f"RandomCropFlip: fill has {self.fill.numel()} values for an image of {c} channels")
        p = self.padding
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        coin = bool(torch.randint(0, 2, ()).item())  # drawn even without flip: the same draws per call
        flip = self.flip and coin
        fill = self.fill.to(device=image.device, dtype=image.dtype).view(-1, 1, 1)
        padded = fill.expand(c, h + 2 * p, w + 2 * p).clone()
        padded[:, p:p + h, p:p + w] = image
        out = padded[:, i:i + h, j:j + w]
        return out.flip(-1) if flip else out.contiguous()

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip}, fill={self.fill.tolist()})"


class AugmentedTensorDataset(TensorDataset):
    """A ``TensorDataset`` (images (N, C, H, W), labels (N,), ...) whose images pass through ``transform`` on
    every read: ``dataset[i] == (transform(images[i]), labels[i], ...)``; the other tensors are unchanged.

    ``tensors`` still holds the unaugmented data, so code that reads it directly (statistics, data ranges,
    example inputs) sees the original images. Reads draw from torch's global RNG (see :class:`RandomCropFlip`).
    """

    def __init__(self, *tensors: torch.Tensor, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__(*tensors)
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        items = super().__getitem__(index)
        return (self.transform(items[0]),) + tuple(items[1:])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, ...]]:
        """Batched reads (``DataLoader`` prefers this method when it exists): each item through
        :meth:`__getitem__`, so a batch is augmented exactly as single reads are."""
        return [self[i] for i in indices]


def _augmented(dataset: TensorDataset, fill: Sequence[float], padding: int) -> AugmentedTensorDataset:
    """``dataset`` with :class:`RandomCropFlip` (``padding``, flip, ``fill``) on its images."""
    return AugmentedTensorDataset(*dataset.tensors, transform=RandomCropFlip(padding, fill=list(fill)))


def _black(mean: Sequence[float], std: Sequence[float]) -> list[float]:
    """A black (0) pixel after normalisation with ``mean`` and ``std``, per channel."""
    return [-m / s for m, s in zip(mean, std)]


def _scaled_pad(image_size: int) -> int:
    """The CIFAR padding (4 at 32x32) scaled to ``image_size``, at least 1."""
    return max(1, int(round(CIFAR10_PAD * image_size / 32)))


# ----------------------------------------------------------------------------------------------- digits

@functools.lru_cache(maxsize=4)
def _digits_split_indices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Cached: callers must not modify the returned arrays (digits() only reads and copies them).
    """(pixels (1797, 8, 8) float32 in [0, 1], labels (1797,) int64, train idx, test idx) for ``seed``.

    Stratified: each class contributes round(20%) of its samples to the test split, chosen by a
    permutation from ``numpy.random.default_rng(seed)``. Index arrays are sorted.
    """
    from sklearn.datasets import load_digits  # local import: sklearn is only needed for this dataset

    bunch = load_digits()
    pixels = (np.asarray(bunch.images, dtype=np.float32) / 16.0).astype(np.float32)
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    test_parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n_test = int(round(len(members) * DIGITS_TEST_FRACTION))
        test_parts.append(rng.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test_parts))
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    train_idx = np.flatnonzero(train_mask)
    return pixels, labels, train_idx, test_idx


def digits(
    split: str = "train", *, image_size: int = 32, channels: int = 3, seed: int = 0, augment: bool = False,
) -> TensorDataset:
    """scikit-learn's handwritten digits as a ``TensorDataset`` of (image, label).

    The 1797 images are split once, stratified by class and seeded: about 80% "train" (1438) and
    20% "test" (359; round(20%) of each class), disjoint and identical for the same ``seed``. Pixels 0..16 are scaled to [0, 1],
    bilinearly upsampled from 8x8 to ``image_size``, replicated to ``channels`` and normalised with the
    mean and std of the train split (after upsampling), so the train images have mean 0 and std 1.

    ``augment=True`` returns an :class:`AugmentedTensorDataset` with the CIFAR recipe (:class:`RandomCropFlip`,
    padding ``4 * image_size / 32`` of black, i.e. 0-valued, pixels); off by default for these tiny
    upsampled images.

    Returns images float32 (N, channels, image_size, image_size) and labels int64 (N,) in 0..9.
    """
    _check_split(split)
    if channels <= 0:
        raise ValueError(f"channels must be positive, got {channels}")
    pixels, labels, train_idx, test_idx = _digits_split_indices(int(seed))
    images = _resize(torch.from_numpy(pixels.copy()).unsqueeze(1), image_size)  # (1797, 1, S, S)
    train_images = images[torch.from_numpy(train_idx)]
    mean = train_images.mean()
    std = train_images.std()
    chosen = train_idx if split == "train" else test_idx
    x = ((images[torch.from_numpy(chosen)] - mean) / std).expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(labels[chosen])
    dataset = TensorDataset(x.float(), y.long())
    if augment:
        return _augmented(dataset, _black([float(mean)] * channels, [float(std)] * channels), _scaled_pad(image_size))
    return dataset


# ----------------------------------------------------------------------------------------------- CIFAR-10

def _resolve_cifar_root(root: str | os.PathLike[str]) -> Path:
    """Accept the batches folder itself or its parent holding ``cifar-10-batches-py``."""
    path = Path(root).expanduser()
    nested = path / "cifar-10-batches-py"
    if not (path / "test_batch").exists() and nested.is_dir():
        return nested
    return path


def _numpy_core(submodule: str) -> Any:
    """``numpy._core.<submodule>`` (numpy >= 2) or ``numpy.core.<submodule>`` (numpy 1.x)."""
    import importlib

    try:
        return importlib.import_module(f"numpy._core.{submodule}")
    except ImportError:
        return importlib.import_module(f"numpy.core.{submodule}")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only plain data: dicts, lists, tuples, strings, bytes, numbers and numpy arrays.

    CIFAR-10's batches are pickles, and a pickle can name any callable to run while it loads. This
    unpickler resolves only the few globals that rebuild a numpy array (``_reconstruct`` for protocols
    0-4, ``_frombuffer`` for protocol 5) and the byte-string codec of protocol-2 pickles; any other
    global is refused, so a tampered batch file cannot execute code.
    """

    _ALLOWED = {
        **{(f"numpy.{core}.multiarray", "_reconstruct"): lambda: _numpy_core("multiarray")._reconstruct
           for core in ("core", "_core")},
        **{(f"numpy.{core}.numeric", "_frombuffer"): lambda: _numpy_core("numeric")._frombuffer
           for core in ("core", "_core")},
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        resolve = self._ALLOWED.get((module, name))
        if resolve is None:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays, lists and strings"
            )
        return resolve()


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (data (N, 3072) uint8, labels (N,) int64), read by :class:`_ArrayUnpickler`."""
    with open(path, "rb") as fh:
        try:
            batch = _ArrayUnpickler(fh, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ValueError(f"{path}: not a CIFAR-10 batch: {e}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a pickled dict with b'data' and b'labels', got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path}: pickled dict lacks b'data' or b'labels' (keys: {sorted(map(str, batch))})")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{path}: expected data (N, 3072) and labels (N,), got {tuple(data.shape)} and {tuple(labels.shape)}"
        )
    return data, labels


def cifar10(root: str | os.PathLike[str], split: str = "train", *, augment: bool | None = None) -> TensorDataset:
    """CIFAR-10 from the standard python-pickle folder (``cifar-10-batches-py``).

    ``root`` holds ``data_batch_1`` .. ``data_batch_5`` (train, 50000 images) and ``test_batch``
    (test, 10000), each a pickled dict with ``b"data"`` (N, 3072) uint8 in channel-major RGB order and
    ``b"labels"``; ``root`` may also be the folder that contains ``cifar-10-batches-py``.
    Pixels are scaled to [0, 1] and normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`.

    ``augment``: the CIFAR training recipe (:class:`RandomCropFlip`: pad 4 with black pixels, random 32x32
    crop, horizontal flip with probability 1/2), applied on every read of an :class:`AugmentedTensorDataset`
    whose ``tensors`` stay the unaugmented images. ``None`` (default): on for ``"train"``, off for
    ``"test"``.

    Returns images float32 (N, 3, 32, 32) and labels int64 (N,). Raises ``FileNotFoundError`` naming the
    missing file.
    """
    _check_split(split)
    folder = _resolve_cifar_root(root)
    names = CIFAR10_TRAIN_FILES if split == "train" else CIFAR10_TEST_FILES
    for name in names:
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"CIFAR-10 file {name!r} not found in {str(folder)!r}; the folder should be the extracted "
                f"'cifar-10-batches-py' (python version) with {', '.join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES)}"
            )
    batches = [_read_cifar_batch(folder / name) for name in names]
    data = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    images = torch.from_numpy(data).view(-1, 3, 32, 32).float().div_(255.0)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    images.sub_(mean).div_(std)
    dataset = TensorDataset(images, torch.from_numpy(labels))
    if (split == "train") if augment is None else augment:
        return _augmented(dataset, _black(CIFAR10_MEAN, CIFAR10_STD), CIFAR10_PAD)
    return dataset


# ----------------------------------------------------------------------------------------------- specs

@dataclass
class DataBundle:
    """A train/test pair plus what a model needs to know to consume it."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    name: str


_SPEC_HELP = ("accepted data specs: 'digits' or 'cifar10:PATH' (PATH = folder with data_batch_1..5 and test_batch); "
              "byte-level text corpora ('pystdlib', 'enwik8:PATH') load with sparsekern.text_data.load")


def load(spec: str, *, image_size: int | None = None, augment: bool | None = None) -> DataBundle:
    """Load a dataset by spec: ``"digits"`` (embedded, 3x32x32 by default) or ``"cifar10:PATH"``.

    ``image_size`` resizes the images (bilinear); ``None`` keeps 32 for both. ``augment`` applies to the
    training split only (the test split is never augmented): ``None`` (default) is each dataset's default,
    on for CIFAR-10 (:func:`cifar10`) and off for digits (:func:`digits`); ``True`` / ``False`` forces it.
    The random crop pads ``4 * image_size / 32`` pixels (4 at 32x32). Bad specs raise ``ValueError``
    naming the accepted forms.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"bad data spec {spec!r}; {_SPEC_HELP}")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    size = 32 if image_size is None else int(image_size)
    if kind == "digits" and not sep:
        return DataBundle(
            train=digits("train", image_size=size, augment=bool(augment)),
            test=digits("test", image_size=size),
            num_classes=10,
            in_channels=3,
            image_size=size,
            name="digits",
        )
    if kind == "cifar10" and sep and arg.strip():
        path = arg.strip()
        train, test = cifar10(path, "train", augment=False), cifar10(path, "test", augment=False)
        if size != 32:
            train = TensorDataset(_resize(train.tensors[0], size), train.tensors[1])
            test = TensorDataset(_resize(test.tensors[0], size), test.tensors[1])
        if augment is None or augment:
            train = _augmented(train, _black(CIFAR10_MEAN, CIFAR10_STD), _scaled_pad(size))
        return DataBundle(train=train, test=test, num_classes=10, in_channels=3, image_size=size, name="cifar10")
    raise ValueError(f"bad data spec {spec!r}; {_SPEC_HELP}")


# ----------------------------------------------------------------------------------------------- helpers

def synthetic_inputs(
    shape: int | Sequence[int],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Seeded standard-normal tensor of ``shape`` (e.g. (N, C, H, W)) for benchmarks and tests.

    Drawn in float32 on the CPU from ``torch.Generator().manual_seed(seed)`` and then cast and moved,
    so the values are the same on every device and dtype (up to the cast).
    """
    size = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DataLoader:
    """Single-process ``DataLoader`` whose shuffle order is fixed by ``seed``."""
    gen = torch.Generator().manual_seed(int(seed))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last, num_workers=0)
