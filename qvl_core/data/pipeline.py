"""From a `data:` config to random-access sources of training and eval examples.

`load_data` reads and checks every split and builds the label map. `TrainSource`
and `EvalSource` are random-access (len + getitem) and picklable, so grain (JAX)
and torch's DataLoader run the same decode and transform in their workers. One
example is a dict:

    patches  uint8 [N, 3*14*14]   the image in Qwen2.5-VL patch order (see image.patchify)
    label    int32                head index
    dataset  int32                index of the data set in the config
    record   int64                record index in its split
    valid    bool                 False for padding and for unreadable images
    error    str                  why an image was unreadable ('' otherwise)

An unreadable image does not stop the loader: it yields an invalid example whose
`error` names the file, and `BadRecords` (in the main process) logs it, counts it
and stops the run once a data set has more than `data.max_bad_fraction` bad images.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable

import numpy as np
from PIL import Image

from .config import DataConfig
from .image import PATCH_SIZE, BadImageError, decode_image, patchify
from .labels import LabelMap
from .mixture import MixtureOrder
from .sources import DataError, ImageSplit, read_dataset
from .transforms import EvalTransform, TrainTransform

log = logging.getLogger(__name__)
_AUGMENT = 0xA06  # seed-sequence stream of the augmentation draws


@dataclasses.dataclass
class Data:
    """Every split of a run, checked, with the label map."""

    config: DataConfig
    train: dict[str, ImageSplit]  # data set name -> train split (data sets that have one)
    eval: dict[str, ImageSplit]  # data set name -> eval split
    label_map: LabelMap

    def dataset_index(self, name: str) -> int:
        return [d.name for d in self.config.datasets].index(name)

    def summary(self) -> str:
        rows = []
        for d in self.config.datasets:
            tr, ev = self.train.get(d.name), self.eval.get(d.name)
            rows.append(f"{d.name} ({d.format}, {d.path}): {len(tr) if tr else 0} train, {len(ev) if ev else 0} eval, "
                        f"{len((tr or ev).classes)} classes, weight {d.weight}")
        return "; ".join(rows) + f"; {self.label_map.num_labels} labels ({self.label_map.space})"


def load_data(config: DataConfig) -> Data:
    """Reads and checks every configured split; raises DataError before any training."""
    train, evaluation, classes = {}, {}, {}
    for d in config.datasets:
        tr, ev = read_dataset(d)
        if tr is not None:
            train[d.name] = tr
        if ev is not None:
            evaluation[d.name] = ev
        classes[d.name] = (tr or ev).classes
        for split in (tr, ev):
            if split is not None and split.missing and len(split.missing) > _bad_limit(config, len(split)):
                raise DataError(
                    f"data set {d.name!r} ({split.split}): {len(split.missing)} of {len(split)} listed images are missing, "
                    f"more than data.max_bad_fraction={config.max_bad_fraction}; first: {split.where(split.missing[0])}"
                )
    if not train:
        log.info("no data set has a train split: evaluation only")
    return Data(config, train, evaluation, LabelMap.build(config.label_space, classes))


def _bad_limit(config: DataConfig, n: int) -> int:
    return math.floor(config.max_bad_fraction * n)


def _example(split: ImageSplit, record: int, to_pixels: Callable[[Image.Image], np.ndarray], head: np.ndarray,
             dataset: int, num_patches: int) -> dict:
    try:
        source, label = split.read(record)
        image = decode_image(source, where=split.where(record))
        patches = patchify(to_pixels(image))
        error = ""
    except (BadImageError, OSError, ValueError) as e:  # PIL raises OSError for data it finds broken mid-decode
        patches, label = np.zeros((num_patches, 3 * PATCH_SIZE**2), np.uint8), 0
        error = str(e) if isinstance(e, BadImageError) else f"{split.where(record)}: {type(e).__name__}: {e}"
    return {
        "patches": patches,
        "label": np.int32(head[label]),
        "dataset": np.int32(dataset),
        "record": np.int64(record),
        "valid": np.bool_(not error),
        "error": error,
    }


class TrainSource:
    """Stream position -> augmented training example, over the weighted mixture."""

    def __init__(self, data: Data, *, seed: int, num_records: int | None = None):
        cfg = data.config
        if not data.train:
            raise DataError("no data set has a train split")
        names = list(data.train)
        self.splits = [data.train[n] for n in names]
        self.dataset_ids = [data.dataset_index(n) for n in names]
        self.heads = [data.label_map.head_index(n) for n in names]
        weights = [cfg.dataset(n).weight for n in names]
        self.order = MixtureOrder([len(s) for s in self.splits], weights, seed)
        self.seed = int(seed)
        self.transform = TrainTransform(cfg.image_hw, cfg.augment)
        self.num_patches = cfg.num_patches
        self.length = int(num_records) if num_records is not None else self.order.epoch_length

    @property
    def epoch_length(self) -> int:
        return self.order.epoch_length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:  # deterministic: grain compares it when restoring iterator state
        return f"TrainSource({self.splits!r}, {self.order!r}, {self.transform!r}, length={self.length})"

    def __getitem__(self, position: int) -> dict:
        if not 0 <= position < self.length:
            raise IndexError(position)
        d, record = self.order[position]
        rng = np.random.default_rng([self.seed, _AUGMENT, int(position)])
        return _example(self.splits[d], record, lambda im: self.transform(im, rng), self.heads[d],
                        self.dataset_ids[d], self.num_patches)


class EvalSource:
    """Index -> eval example of one split, padded with invalid examples to a multiple of `pad_to`."""

    def __init__(self, data: Data, name: str, *, pad_to: int = 1):
        cfg = data.config
        self.split = data.eval[name]
        self.dataset_id = data.dataset_index(name)
        self.head = data.label_map.head_index(name)
        self.transform = EvalTransform(cfg.image_hw, cfg.eval_crop_fraction)
        self.num_patches = cfg.num_patches
        self.length = -(-len(self.split) // pad_to) * pad_to

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"EvalSource({self.split!r}, {self.transform!r}, length={self.length})"

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        if index >= len(self.split):
            return {
                "patches": np.zeros((self.num_patches, 3 * PATCH_SIZE**2), np.uint8),
                "label": np.int32(0), "dataset": np.int32(self.dataset_id), "record": np.int64(-1),
                "valid": np.bool_(False), "error": "",
            }
        return _example(self.split, index, self.transform, self.head, self.dataset_id, self.num_patches)


class BadRecords:
    """Main-process bookkeeping of unreadable images: logs each once, fails past the limit."""

    def __init__(self, data: Data, logger: logging.Logger | None = None):
        self.data = data
        self.log = logger or log
        self.seen: dict[tuple[str, int], set[int]] = {}
        names = [d.name for d in data.config.datasets]
        for kind, splits in (("train", data.train), ("eval", data.eval)):
            for name, split in splits.items():
                self.seen[(kind, names.index(name))] = set(split.missing)

    def update(self, batch: dict, kind: str = "train") -> int:
        """Records the bad examples of a (host-side) batch; returns how many it had."""
        bad = np.flatnonzero(np.asarray(batch["error"]).astype(bool))
        for i in bad:
            dataset = int(np.asarray(batch["dataset"])[i])
            record = int(np.asarray(batch["record"])[i])
            seen = self.seen.setdefault((kind, dataset), set())
            if record in seen:
                continue
            seen.add(record)
            self.log.warning("skipped unreadable image: %s", np.asarray(batch["error"])[i])
            self._check(kind, dataset)
        return len(bad)

    def _check(self, kind: str, dataset: int) -> None:
        cfg = self.data.config
        name = cfg.datasets[dataset].name
        split = (self.data.train if kind == "train" else self.data.eval)[name]
        count = len(self.seen[(kind, dataset)])
        if count > _bad_limit(cfg, len(split)):
            raise DataError(
                f"data set {name!r} ({split.split}): {count} of {len(split)} images are unreadable, more than "
                f"data.max_bad_fraction={cfg.max_bad_fraction}; the log lists them"
            )

    def counts(self) -> dict[str, int]:
        names = [d.name for d in self.data.config.datasets]
        return {f"{kind}/{names[d]}": len(s) for (kind, d), s in self.seen.items()}
