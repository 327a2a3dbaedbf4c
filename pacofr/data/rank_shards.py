"""An epoch order in which every DDP rank reads only its own tar shards.

torch's ``DistributedSampler`` deals the items of a permutation round-robin, so every rank reads
from every shard. :class:`ShardRankSampler` first gives each rank a set of whole shards (the
largest remaining shard to the rank with the fewest items, so the counts differ by less than one
shard), then shuffles each rank's items per epoch. Every rank yields the same number of items
per epoch, ``ceil(N / world)`` as ``DistributedSampler``: a rank with fewer items repeats some of
its own, one with more leaves its surplus out of that epoch (a different surplus each epoch).
The order is a pure function of ``(seed, epoch, rank)`` and can start mid-epoch
(``set_position``), as ``pacofr.train.sampling.ResumableSampler`` can.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

logger = logging.getLogger(__name__)


def assign_shards(shard_of_item: Sequence[str], world_size: int) -> list[list[int]]:
    """Item indices per rank, every shard's items on one rank, counts balanced greedily.

    Args:
        shard_of_item: the shard name of every item (index order).
        world_size: number of ranks.
    Returns:
        ``world_size`` lists of item indices (ascending).
    Raises:
        ValueError: fewer shards than ranks (a rank would read nothing).
    """
    members: dict[str, list[int]] = {}
    for index, shard in enumerate(shard_of_item):
        members.setdefault(shard, []).append(index)
    if len(members) < world_size:
        raise ValueError(f"{len(members)} shard(s) for {world_size} ranks: every rank needs a shard of its own; "
                         "prepare the data with a smaller --shard-size")
    per_rank: list[list[int]] = [[] for _ in range(world_size)]
    for shard in sorted(members, key=lambda name: (-len(members[name]), name)):
        smallest = min(range(world_size), key=lambda rank: (len(per_rank[rank]), rank))
        per_rank[smallest].extend(members[shard])
    return [sorted(indices) for indices in per_rank]


class ShardRankSampler(Sampler[int]):
    """Indices of this rank's shards, shuffled per epoch, ``num_samples`` per epoch.

    Args:
        records: the prepared folder's index records (each with a ``"shard"``), e.g.
            ``ShardFaceDataset.records``.
        num_replicas: world size.
        rank: this process's rank.
        seed: base seed of the per-epoch shuffles.
    """

    def __init__(self, records: Sequence[dict[str, Any]], num_replicas: int = 1, rank: int = 0,
                 seed: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if any("shard" not in record for record in records):
            raise ValueError("ShardRankSampler needs the records of a folder prepared as shards (a 'shard' key)")
        self.own = assign_shards([record["shard"] for record in records], num_replicas)[rank]
        self.num_samples = math.ceil(len(records) / num_replicas)
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Start the next iteration at sample ``start`` of epoch ``epoch``."""
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"start must be in [0, {self.num_samples}], got {start}")
        self.epoch, self.start = epoch, start

    def epoch_order(self) -> list[int]:
        """This rank's ``num_samples`` indices of the current epoch."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [self.own[i] for i in torch.randperm(len(self.own), generator=generator).tolist()]
        while len(order) < self.num_samples:
            order += order[:self.num_samples - len(order)]
        return order[:self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def rank_shard_sampler(dataset: Dataset, num_replicas: int, rank: int, seed: int) -> ShardRankSampler | None:
    """A :class:`ShardRankSampler` for a multi-rank run over tar shards (``dataset.records`` with a
    ``"shard"`` each, as ``ShardFaceDataset`` has), or None: one rank, not shards, or fewer shards
    than ranks (then every rank reads every shard, as ``DistributedSampler`` deals; logged)."""
    records = getattr(dataset, "records", None)
    if num_replicas < 2 or not records or any("shard" not in record for record in records):
        return None
    shards = len({record["shard"] for record in records})
    if shards < num_replicas:
        logger.info("%d shard(s) for %d ranks: every rank reads every shard", shards, num_replicas)
        return None
    return ShardRankSampler(records, num_replicas, rank, seed)
