"""The order in which training visits records: a seeded, weighted mixture of data sets.

Position p of the training stream is record `order[p] = (dataset, record)`. An
epoch is `epoch_length` positions (by default the total number of training
records); in each epoch data set d contributes `counts[d]` positions, its share
of the weights (largest remainder). Each data set is read as an endless stream of
fresh permutations of its records, so a weight above its size share oversamples
it without repeating a record before all others were seen. Everything is a pure
function of (seed, position): the JAX and torch loaders, any number of workers and
any process count see the same records, and resuming needs only the position.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_INTERLEAVE = 0x51F1  # distinct streams of the seed sequence
_PERMUTE = 0x9E37


def shares(total: int, weights: Sequence[float]) -> np.ndarray:
    """Largest-remainder split of `total` in proportion to `weights` (sums to total)."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


class MixtureOrder:
    """(seed, position) -> (data set index, record index)."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int, epoch_length: int | None = None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("sizes and weights must be non-empty and of equal length")
        if min(sizes) <= 0:
            raise ValueError(f"every training data set needs records, got sizes {list(sizes)}")
        self.sizes = tuple(int(s) for s in sizes)
        self.weights = tuple(float(w) for w in weights)
        self.seed = int(seed)
        self.epoch_length = int(epoch_length or sum(self.sizes))
        self.counts = shares(self.epoch_length, self.weights)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __repr__(self) -> str:  # deterministic: grain checks it when restoring iterator state
        return f"MixtureOrder(sizes={self.sizes}, weights={self.weights}, seed={self.seed}, epoch_length={self.epoch_length})"

    def _permutation(self, dataset: int, epoch_pass: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _PERMUTE, dataset, epoch_pass])
        return rng.permutation(self.sizes[dataset])

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(dataset int32 [L], record int64 [L]) of one epoch (the last two are cached)."""
        if epoch not in self._cache:
            if len(self._cache) >= 2:
                self._cache.pop(next(iter(self._cache)))
            self._cache[epoch] = self._compute_epoch(epoch)
        return self._cache[epoch]

    def _compute_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        datasets = np.repeat(np.arange(len(self.sizes), dtype=np.int32), self.counts)
        rng = np.random.default_rng([self.seed, _INTERLEAVE, epoch])
        datasets = datasets[rng.permutation(len(datasets))]
        records = np.empty(self.epoch_length, np.int64)
        for d, (n, c) in enumerate(zip(self.sizes, self.counts)):
            if c == 0:
                continue
            start = epoch * int(c)  # this data set's stream position at the start of the epoch
            stream = np.arange(start, start + c)
            passes = stream // n
            picked = np.empty(c, np.int64)
            for p in np.unique(passes):
                sel = passes == p
                picked[sel] = self._permutation(d, int(p))[stream[sel] % n]
            records[datasets == d] = picked
        return datasets, records

    def __getitem__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(int(position), self.epoch_length)
        datasets, records = self.epoch(epoch)
        return int(datasets[offset]), int(records[offset])
