"""Data for training and evaluation: seeded sharding samplers, loaders, batches, step counts."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, Sampler, TensorDataset

class SeededSampler(Sampler[int]):
    """Indices of a dataset of size ``n``: a permutation seeded by ``(seed, epoch key)`` (or the identity),
    padded to a multiple of ``world_size`` by wrapping around and sharded ``rank::world_size``."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.key: tuple[int, ...] = (0,)

    def set_epoch(self, *key: int) -> None:
        self.key = tuple(key)

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(hash((self.seed,) + self.key) & 0x7FFF_FFFF_FFFF_FFFF)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = len(self) * self.world_size
        if total > len(order) and order:
            order += (order * math.ceil(total / len(order)))[: total - len(order)]
        return iter(order[self.rank:total:self.world_size])


def as_dataset(data: Any) -> Any:
    """An ``(X, Y)`` tensor pair as a ``TensorDataset``; anything else unchanged."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        return TensorDataset(*data)
    return data


def make_loader(
    data: Any, *, batch_size: int, shuffle: bool, seed: int, rank: int, world_size: int,
    drop_last: bool = False, num_workers: int = 0,
) -> tuple[Any, SeededSampler | None]:
    """A loader for ``data`` (DataLoader, Dataset or an (X, Y) tensor pair) and its seeded sampler, if any.

    A user's DataLoader is kept as is in one process; under DDP it is rebuilt around a sharding sampler
    (shuffled if it used a ``RandomSampler``).
    """
    data = as_dataset(data)
    if isinstance(data, DataLoader):
        if world_size == 1:
            return data, None
        if data.batch_size is None:
            raise ValueError("under DDP a DataLoader must have a batch_size (custom batch samplers are not sharded)")
        sampler = SeededSampler(
            len(data.dataset), shuffle=isinstance(data.sampler, RandomSampler), seed=seed,
            rank=rank, world_size=world_size,
        )
        loader = DataLoader(
            data.dataset, batch_size=data.batch_size, sampler=sampler, num_workers=data.num_workers,
            collate_fn=data.collate_fn, pin_memory=data.pin_memory, drop_last=data.drop_last,
        )
        return loader, sampler
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be a DataLoader, a map-style Dataset or an (X, Y) pair, got {type(data).__name__}")
    sampler = SeededSampler(len(data), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers)
    return loader, sampler


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in ``obj`` (nested tuples, lists, dicts) moved to ``device``; other values unchanged."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=obj.is_pinned())
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch ``(x, y, ...)``; further items are ignored."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"a batch must be an (inputs, targets) tuple or list, got {type(batch).__name__}")


def count_samples(x: Any) -> int:
    """Samples in inputs ``x``: the first dimension of its first tensor (1 for a scalar or no tensor)."""
    if isinstance(x, Tensor):
        return int(x.shape[0]) if x.dim() else 1
    if isinstance(x, (tuple, list)) and x:
        return count_samples(x[0])
    if isinstance(x, dict) and x:
        return count_samples(next(iter(x.values())))
    return 1


def module_device(model: nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``model``; CPU for a module without tensors."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def detach_inputs(x: Any) -> Any:
    """``x`` detached: a tensor, or a tuple/list of them (other values pass through)."""
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, (tuple, list)):
        return type(x)(detach_inputs(v) for v in x)
    return x


@dataclass(frozen=True)
class StepCounts:
    """How long a run is: ``total_steps`` optimizer steps of the main stage, ``steps_per_epoch`` batches per
    epoch (``None`` for a loader without a length) and ``num_epochs`` (``None`` likewise)."""

    steps_per_epoch: int | None
    total_steps: int
    num_epochs: int | None


def count_steps(loader: Any, epochs: float, max_steps: int | None) -> StepCounts:
    """Steps of a run over ``loader``: ``max(1, ceil(epochs * len(loader)))`` capped by ``max_steps``.

    A loader without a length needs ``max_steps``; a loader of length 0 is an error.
    """
    try:
        steps_per_epoch: int | None = len(loader)
    except TypeError:
        steps_per_epoch = None
    if steps_per_epoch == 0:
        raise ValueError("train_data yields no batches")
    if steps_per_epoch is None:
        if max_steps is None:
            raise ValueError("train_data has no length: set config.max_steps")
        return StepCounts(None, max_steps, None)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)
    return StepCounts(steps_per_epoch, total_steps, math.ceil(total_steps / steps_per_epoch))
