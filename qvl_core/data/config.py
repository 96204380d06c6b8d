"""The `data:` section of a run config."""

from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional, Union

from qvl_core.schema import SchemaError

from .image import FACTOR

Format = Literal["food101", "imagefolder", "hf", "tfds", "digits"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """One labelled image set."""

    name: str  # used in metric names: eval/<name>_accuracy
    format: Format  # food101 | imagefolder | hf | tfds | digits (sklearn digits written as food101)
    path: str  # directory (food101, imagefolder, digits), save_to_disk/parquet dir (hf), prepared dir (tfds)
    train_split: Optional[str] = "train"  # null: eval only
    eval_split: Optional[str] = "test"  # null: train only
    weight: float = 1.0  # sampling weight in the training mixture
    image_column: str = "image"  # hf/tfds: feature holding the image
    label_column: str = "label"  # hf/tfds: feature holding the class

    def validate(self, where: str) -> None:
        if not _NAME.match(self.name):
            raise SchemaError(f"{where}.name: {self.name!r} must be letters, digits, '_', '-' or '.'")
        if not self.weight > 0:
            raise SchemaError(f"{where}.weight: must be > 0, got {self.weight}")
        if self.train_split is None and self.eval_split is None:
            raise SchemaError(f"{where}: train_split and eval_split are both null")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Train-time augmentation; eval images are resized and centre-cropped."""

    random_resized_crop: bool = True  # false: resize the whole image to image_size
    scale: tuple[float, float] = (0.25, 1.0)  # crop area as a fraction of the image
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range (w / h)
    hflip: bool = True  # random horizontal flip (turn off for digits and text)

    def validate(self, where: str) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise SchemaError(f"{where}.scale: need 0 < min <= max <= 1, got {list(self.scale)}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise SchemaError(f"{where}.ratio: need 0 < min <= max, got {list(self.ratio)}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Data sets, label space, image geometry and bad-input policy."""

    datasets: tuple[DatasetConfig, ...] = ()
    label_space: Literal["shared", "separate"] = "shared"  # shared: equal class names share a head index
    image_size: Union[int, tuple[int, int]] = 448  # side or [height, width], multiples of 28
    eval_crop_fraction: float = 1.0  # eval: resize so the centre crop covers this fraction, then crop
    augment: AugmentConfig = AugmentConfig()
    max_bad_fraction: float = 0.001  # a data set with more unreadable images than this fails the run

    def validate(self, where: str) -> None:
        if not self.datasets:
            raise SchemaError(f"{where}.datasets: list at least one data set")
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"{where}.datasets: names must be unique, repeated: {', '.join(dupes)}")
        if not any(d.train_split for d in self.datasets) and not any(d.eval_split for d in self.datasets):
            raise SchemaError(f"{where}.datasets: no split to read")
        for side in self.image_hw:
            if side <= 0 or side % FACTOR:
                raise SchemaError(f"{where}.image_size: {self.image_size!r}: sides must be positive multiples of {FACTOR}")
        if not 0 < self.eval_crop_fraction <= 1:
            raise SchemaError(f"{where}.eval_crop_fraction: must be in (0, 1], got {self.eval_crop_fraction}")
        if not 0 <= self.max_bad_fraction < 1:
            raise SchemaError(f"{where}.max_bad_fraction: must be in [0, 1), got {self.max_bad_fraction}")

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def num_patches(self) -> int:
        h, w = self.image_hw
        return (h // 14) * (w // 14)

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        h, w = self.image_hw
        return (1, h // 14, w // 14)

    def dataset(self, name: str) -> DatasetConfig:
        for d in self.datasets:
            if d.name == name:
                return d
        raise KeyError(name)
