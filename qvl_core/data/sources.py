"""Readers for the data set formats: one random-access `ImageSplit` per split.

Every reader checks the layout before training starts and raises `DataError`
naming the path and what is wrong: a missing directory or meta file, an empty
class, a label that is not among the classes, a column that is not there.
Image bytes are read lazily, one record at a time, in the loader workers.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import DatasetConfig
from .image import ImageSource

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"})


class DataError(ValueError):
    """A data set that cannot be read as configured."""


class ImageSplit:
    """One split of one data set: `len`, `classes`, `image(i)`, `label(i)`, `where(i)`.

    `labels` is an int array of per-record class indices into `classes` when the
    format gives it without reading the images (all but tfds), else None.
    `missing` lists records known to be unreadable before any image is decoded
    (files named by a meta file but absent); they count as bad records.
    """

    dataset: str
    split: str
    classes: tuple[str, ...]
    labels: np.ndarray | None
    missing: tuple[int, ...] = ()

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, i: int) -> tuple[ImageSource, int]:
        """(image as path / bytes / array, class index) of record i."""
        raise NotImplementedError

    def where(self, i: int) -> str:
        """Human-readable location of record i, for logs and errors."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r}, {self.split!r}, n={len(self)}, classes={len(self.classes)})"


class FileSplit(ImageSplit):
    """Images stored as files (food101, imagefolder, digits)."""

    def __init__(self, dataset: str, split: str, classes: Sequence[str], paths: Sequence[str], labels, missing=()):
        self.dataset, self.split, self.classes = dataset, split, tuple(classes)
        self.paths = np.asarray(paths, dtype=object)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.missing = tuple(missing)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, i: int) -> tuple[ImageSource, int]:
        return self.paths[i], int(self.labels[i])

    def where(self, i: int) -> str:
        return str(self.paths[i])


def _optional_import(module: str, cfg: DatasetConfig, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(f"data set {cfg.name!r}: format {cfg.format!r} needs {module} "
                        f"(pip install 'qvl[{extra}]'): {e}") from e


def _require_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what}: directory {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what}: {path} is not a directory")


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{what}: {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_classes(classes: Sequence[int], labels: np.ndarray, what: str, names: Sequence[str]) -> None:
    counts = np.bincount(labels, minlength=len(names)) if len(labels) else np.zeros(len(names), int)
    empty = [names[c] for c in classes if counts[c] == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
        raise DataError(f"{what}: {len(empty)} class(es) have no images: {shown}")


def read_food101(cfg: DatasetConfig, split: str, classes: Sequence[str] | None = None) -> FileSplit:
    """Food-101 layout: images/<class>/<id>.jpg, meta/classes.txt, meta/<split>.txt ('<class>/<id>' lines).

    `classes` is given for eval splits (then a class may have no images).
    """
    is_train = classes is None
    root = Path(cfg.path)
    what = f"data set {cfg.name!r} (food101)"
    _require_dir(root, what)
    _require_dir(root / "images", what)
    classes = _read_lines(root / "meta" / "classes.txt", what)
    repeated = [c for c, n in Counter(classes).items() if n > 1]
    if repeated:
        raise DataError(f"{what}: {root / 'meta' / 'classes.txt'} lists {repeated[0]!r} more than once")
    index = {c: i for i, c in enumerate(classes)}
    meta = root / "meta" / f"{split}.txt"
    if not meta.is_file():
        present = sorted(p.name for p in (root / "meta").glob("*.txt") if p.name != "classes.txt")
        raise DataError(f"{what}: split {split!r} needs {meta}, which does not exist (meta has: {', '.join(present) or 'nothing'})")
    paths, labels = [], []
    for lineno, entry in enumerate(_read_lines(meta, what), 1):
        cls, _, _ = entry.partition("/")
        if cls not in index:
            raise DataError(f"{meta}:{lineno}: class {cls!r} of {entry!r} is not in {root / 'meta' / 'classes.txt'}")
        paths.append(str(root / "images" / f"{entry}.jpg"))
        labels.append(index[cls])
    labels = np.asarray(labels, np.int32)
    if is_train:
        _check_classes(range(len(classes)), labels, f"{what}, {meta}", classes)
    present = set()
    for cls in classes:
        folder = root / "images" / cls
        if folder.is_dir():
            present.update(str(folder / name) for name in os.listdir(folder))
    missing = [i for i, p in enumerate(paths) if p not in present]
    if missing:
        log.warning("%s: %d of %d images listed in %s are missing, e.g. %s", what, len(missing), len(paths), meta, paths[missing[0]])
    return FileSplit(cfg.name, split, classes, paths, labels, missing)


def _list_images(folder: Path) -> tuple[list[str], list[str]]:
    images, others = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file():
            continue
        (images if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS else others).append(entry.path)
    return images, others


def read_imagefolder(cfg: DatasetConfig, split: str, classes: Sequence[str] | None = None) -> FileSplit:
    """ImageFolder layout: <path>/<split>/<class>/<file>. Classes: the train split's folders."""
    root = Path(cfg.path)
    what = f"data set {cfg.name!r} (imagefolder)"
    _require_dir(root, what)
    split_dir = root / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"{what}: split folder {split_dir} does not exist (found: {', '.join(present) or 'nothing'})")
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{what}: {split_dir} has no class folders")
    if classes is None:
        classes = folders
    unknown = [f for f in folders if f not in classes]
    if unknown:
        raise DataError(f"{what}: {split_dir / unknown[0]} is a class the train split does not have")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels, skipped = [], [], []
    for cls in folders:
        images, others = _list_images(split_dir / cls)
        if not images:
            raise DataError(f"{what}: class folder {split_dir / cls} has no images")
        paths += images
        labels += [index[cls]] * len(images)
        skipped += others
    if skipped:
        log.warning("%s: skipped %d files without an image extension, e.g. %s", what, len(skipped), skipped[0])
    return FileSplit(cfg.name, split, classes, paths, labels)


class HFSplit(ImageSplit):
    """A `datasets.Dataset` (save_to_disk or parquet) with an image and a label column."""

    def __init__(self, cfg: DatasetConfig, split: str, table, classes: Sequence[str], labels: np.ndarray, source: str):
        self.dataset, self.split, self.classes = cfg.name, split, tuple(classes)
        self.table, self.labels, self.source = table, labels, source
        self.image_column = cfg.image_column

    def __len__(self) -> int:
        return len(self.table)

    def read(self, i: int) -> tuple[ImageSource, int]:
        cell = self.table[int(i)][self.image_column]
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        return cell, int(self.labels[i])

    def where(self, i: int) -> str:
        return f"{self.source}[{self.split}][{i}]"


def _hf_table(cfg: DatasetConfig, split: str):
    datasets = _optional_import("datasets", cfg, "hf")
    root = Path(cfg.path)
    what = f"data set {cfg.name!r} (hf)"
    _require_dir(root, what)
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        loaded = datasets.load_from_disk(str(root))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{what}: {root} has no split {split!r} (splits: {', '.join(loaded)})")
            return loaded[split], str(root)
        return loaded, str(root)
    files = sorted(f for d in (root, root / "data") if d.is_dir() for f in d.glob("*.parquet"))
    if not files:
        raise DataError(f"{what}: {root} holds neither a save_to_disk data set nor *.parquet files")
    chosen = [f for f in files if f.name == f"{split}.parquet" or f.name.startswith(f"{split}-")]
    if not chosen:
        raise DataError(f"{what}: no parquet file for split {split!r} in {root} (expected {split}.parquet or {split}-*.parquet)")
    table = datasets.Dataset.from_parquet([str(f) for f in chosen], keep_in_memory=False)
    return table, str(chosen[0].parent / f"{split}*.parquet")


def read_hf(cfg: DatasetConfig, split: str, classes: Sequence[str] | None = None) -> HFSplit:
    import datasets

    table, source = _hf_table(cfg, split)
    what = f"data set {cfg.name!r} (hf, {source})"
    missing = [c for c in (cfg.image_column, cfg.label_column) if c not in table.column_names]
    if missing:
        raise DataError(f"{what}: no column {missing[0]!r} (columns: {', '.join(table.column_names)}); "
                        f"set image_column / label_column")
    feature = table.features[cfg.label_column]
    raw = np.asarray(table.data.column(cfg.label_column).to_numpy(zero_copy_only=False))
    if isinstance(feature, datasets.ClassLabel):
        names, labels = list(feature.names), raw.astype(np.int64)
    else:
        names = sorted({str(v) for v in raw}, key=lambda s: (len(s), s) if s.lstrip("-").isdigit() else (0, s))
        lookup = {n: i for i, n in enumerate(names)}
        labels = np.asarray([lookup[str(v)] for v in raw], np.int64)
    if classes is not None:
        remap = {n: i for i, n in enumerate(classes)}
        unknown = [n for n in names if n not in remap and np.any(labels == names.index(n))]
        if unknown:
            raise DataError(f"{what}: label {unknown[0]!r} does not occur in the train split")
        labels = np.asarray([remap[names[v]] for v in labels], np.int64) if len(labels) else labels
        names = list(classes)
    if isinstance(table.features[cfg.image_column], datasets.Image):
        table = table.cast_column(cfg.image_column, datasets.Image(decode=False))
    table = table.select_columns([cfg.image_column])
    labels = labels.astype(np.int32)
    if classes is None:
        _check_classes(range(len(names)), labels, f"{what}, split {split!r}", names)
    return HFSplit(cfg, split, table, names, labels, source)


class TfdsSplit(ImageSplit):
    """A prepared TFDS directory read through array_record, without TensorFlow."""

    def __init__(self, cfg: DatasetConfig, split: str):
        tfds = _optional_import("tensorflow_datasets", cfg, "tfds")
        root = Path(cfg.path)
        what = f"data set {cfg.name!r} (tfds)"
        _require_dir(root, what)
        if not (root / "dataset_info.json").is_file():
            found = sorted(str(p.parent) for p in root.glob("**/dataset_info.json"))
            hint = f"; did you mean {found[0]}?" if found else ""
            raise DataError(f"{what}: {root} is not a prepared TFDS directory (no dataset_info.json){hint}")
        builder = tfds.builder_from_directory(str(root))
        features = builder.info.features
        for column in (cfg.image_column, cfg.label_column):
            if column not in features:
                raise DataError(f"{what}: {root} has no feature {column!r} (features: {', '.join(features)})")
        if split not in builder.info.splits:
            raise DataError(f"{what}: {root} has no split {split!r} (splits: {', '.join(builder.info.splits)})")
        label_feature = features[cfg.label_column]
        if not hasattr(label_feature, "names"):
            raise DataError(f"{what}: feature {cfg.label_column!r} is not a ClassLabel")
        try:
            self.source = builder.as_data_source(split, decoders={cfg.image_column: tfds.decode.SkipDecoding()})
        except Exception as e:  # e.g. a TFRecord-only directory
            raise DataError(f"{what}: cannot open split {split!r} as an array_record data source ({e}); "
                            "prepare it with file_format='array_record'") from e
        self.dataset, self.split, self.classes = cfg.name, split, tuple(label_feature.names)
        self.labels, self.root = None, str(root)
        self.image_column, self.label_column = cfg.image_column, cfg.label_column

    def __len__(self) -> int:
        return len(self.source)

    def read(self, i: int) -> tuple[ImageSource, int]:
        record = self.source[int(i)]
        return record[self.image_column], int(record[self.label_column])

    def where(self, i: int) -> str:
        return f"{self.root}[{self.split}][{i}]"


def read_tfds(cfg: DatasetConfig, split: str, classes: Sequence[str] | None = None) -> TfdsSplit:
    out = TfdsSplit(cfg, split)
    if classes is not None and tuple(classes) != out.classes:
        raise DataError(f"data set {cfg.name!r} (tfds): split {split!r} has other classes than the train split")
    return out


def read_split(cfg: DatasetConfig, split: str, classes: Sequence[str] | None = None) -> ImageSplit:
    """The reader for `cfg.format`; `classes` (the train split's) fixes the label order of eval splits."""
    if cfg.format == "digits":
        from .digits import ensure_digits

        ensure_digits(cfg.path)
    readers: dict[str, Callable[..., ImageSplit]] = {
        "food101": read_food101, "digits": read_food101, "imagefolder": read_imagefolder, "hf": read_hf, "tfds": read_tfds,
    }
    return readers[cfg.format](cfg, split, classes)


def read_dataset(cfg: DatasetConfig) -> tuple[ImageSplit | None, ImageSplit | None]:
    """(train split or None, eval split or None) of one configured data set."""
    train = read_split(cfg, cfg.train_split) if cfg.train_split else None
    classes = train.classes if train is not None else None
    evaluation = read_split(cfg, cfg.eval_split, classes) if cfg.eval_split else None
    if train is not None and evaluation is not None and evaluation.classes != train.classes:
        raise DataError(f"data set {cfg.name!r}: the {cfg.eval_split!r} split has other classes than {cfg.train_split!r}")
    return train, evaluation

