"""torch DataLoader over the same sources as the JAX loader, in the same order.

Rank r of R reads stream positions r, r+R, r+2R, ... (DistributedSampler without
shuffling: the source is already in its seeded order), so for any R the k-th
batches of all ranks together are positions [k*B, (k+1)*B), as with grain.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler in source order that can start after `start` of this rank's indices."""

    def __init__(self, dataset, num_replicas: int, rank: int, start: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, super().__len__() - self.start)


def _collate(examples: list[dict]) -> dict:
    batch = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        batch[key] = values if isinstance(values[0], str) else torch.from_numpy(np.stack(values))
    return batch


def make_loader(
    source,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    start_batch: int = 0,
) -> DataLoader:
    """Per-rank batches of `source`; `start_batch` skips that many of this rank's batches (resume)."""
    sampler = ResumableDistributedSampler(source, world_size, rank, start=start_batch * batch_size)
    return DataLoader(
        source,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=_collate,
        persistent_workers=num_workers > 0,
        multiprocessing_context="spawn" if num_workers > 0 else None,
    )
