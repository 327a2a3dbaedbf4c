"""Data order that can be resumed mid-epoch, and augmentation randomness tied to (epoch, index).

The order of an epoch is a pure function of ``(seed, epoch)`` (torch's ``DistributedSampler``
permutation, sharded by rank); ``ResumableSampler.start`` skips the samples this rank already
consumed. ``EpochSeededDataset`` draws each item's augmentation from a seed derived from
``(seed, epoch, index)``, so an item looks the same whatever the number of loader workers and
whether the epoch was interrupted and resumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import Dataset, DistributedSampler

from pacofr.train.seeding import derive_seed, isolated_rng


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (also for one process) that can start an epoch at a position.

    Args: dataset, num_replicas (world size), rank, seed, shuffle. Every rank yields
    ``num_samples`` indices per epoch (the last ones padded by repetition, as torch does).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start = 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start the next iteration at sample ``start`` (per rank) of epoch ``epoch``."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class EpochSeededDataset(Dataset):
    """Wraps a map-style dataset so item ``i`` of epoch ``e`` uses random seed f(seed, e, i).

    Set ``epoch`` before creating the loader iterator (workers get a copy at that moment).
    Each item gains ``"substituted"`` (bool): True when the dataset returned another item than
    the one asked for (pacofr's datasets skip an unreadable image and return the next readable
    one, with its own ``index``). The loop counts these in the main process, which a counter
    inside the dataset cannot do once loader workers hold their own copies.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        with isolated_rng(derive_seed(self.seed, self.epoch, index), include_cuda=False):
            item = self.dataset[index]
        if isinstance(item, dict) and "index" in item:
            item = {**item, "substituted": int(item["index"]) != index}
        return item

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
