"""Small synthetic data sets in every supported layout, for tests and benchmarks.

Each class has its own colour and stripe direction, so a model can learn them;
sizes vary per image. `corrupt` adds unreadable files (garbage bytes and
truncated JPEGs) whose paths are returned, so tests can check they are reported.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def synthetic_image(cls: int, index: int, *, size: tuple[int, int] | None = None, seed: int = 0) -> Image.Image:
    """An RGB image of class `cls`: class colour, class stripe direction, noise."""
    rng = np.random.default_rng([seed, cls, index])
    h, w = size or (int(rng.integers(40, 120)), int(rng.integers(40, 120)))
    hue = np.array([(cls * 67) % 256, (cls * 151 + 80) % 256, (cls * 29 + 160) % 256], np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if cls % 2 else yy) / (3.0 + cls % 5)) * 40
    pixels = hue[None, None, :] + stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _corrupt_bytes(kind: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    if kind % 2 == 0:
        return rng.integers(0, 256, 300, dtype=np.uint8).tobytes()  # not an image at all
    good = jpeg_bytes(synthetic_image(0, seed, size=(64, 64)))
    return good[: len(good) // 2]  # truncated JPEG


def write_food101(root: str | Path, classes: Sequence[str] = ("apple_pie", "bibimbap", "churros"), *,
                  train_per_class: int = 4, test_per_class: int = 2, corrupt: int = 0, seed: int = 0) -> list[str]:
    """Food-101 layout under `root`; returns the paths of the corrupt files written (train split)."""
    root = Path(root)
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    splits: dict[str, list[str]] = {"train": [], "test": []}
    bad: list[str] = []
    for c, name in enumerate(classes):
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class + test_per_class):
            ident = f"{c * 1000 + i}"
            path = folder / f"{ident}.jpg"
            path.write_bytes(jpeg_bytes(synthetic_image(c, i, seed=seed)))
            splits["train" if i < train_per_class else "test"].append(f"{name}/{ident}")
    for k in range(corrupt):
        entry = splits["train"][k * max(1, len(splits["train"]) // max(corrupt, 1))]
        path = root / "images" / f"{entry}.jpg"
        path.write_bytes(_corrupt_bytes(k, seed + k))
        bad.append(str(path))
    for split, entries in splits.items():
        (root / "meta" / f"{split}.txt").write_text("\n".join(entries) + "\n")
    return bad


def write_imagefolder(root: str | Path, classes: Sequence[str] = ("cat", "dog", "fox"), *, splits=("train", "test"),
                      per_class: int = 3, formats: Sequence[str] = ("JPEG", "PNG"), seed: int = 0) -> None:
    """<root>/<split>/<class>/<file> with a mix of file formats."""
    root = Path(root)
    for s, split in enumerate(splits):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                fmt = formats[i % len(formats)]
                ext = {"JPEG": "jpg", "PNG": "png", "BMP": "bmp", "WEBP": "webp"}[fmt]
                synthetic_image(c, s * 100 + i, seed=seed).save(folder / f"{name}_{i}.{ext}", fmt)


def _records(classes: Sequence[str], per_class: int, offset: int, seed: int) -> list[dict]:
    return [{"image": jpeg_bytes(synthetic_image(c, offset + i, seed=seed)), "label": c}
            for c in range(len(classes)) for i in range(per_class)]


def write_hf(root: str | Path, classes: Sequence[str] = ("red", "green", "blue"), *, per_class: int = 3,
             parquet: bool = False, image_column: str = "image", label_column: str = "label", seed: int = 0) -> None:
    """A `datasets` DatasetDict (train/test) with an Image and a ClassLabel column.

    `parquet=True` writes `<root>/data/<split>-00000-of-00001.parquet` (the hub layout)
    instead of `save_to_disk`.
    """
    import datasets

    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=list(classes))})
    dd = datasets.DatasetDict()
    for s, split in enumerate(("train", "test")):
        rows = _records(classes, per_class, s * 100, seed)
        dd[split] = datasets.Dataset.from_dict(
            {image_column: [{"bytes": r["image"], "path": None} for r in rows], label_column: [r["label"] for r in rows]},
            features=features,
        )
    root = Path(root)
    if parquet:
        (root / "data").mkdir(parents=True, exist_ok=True)
        for split, ds in dd.items():
            ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    else:
        dd.save_to_disk(str(root))


def write_tfds(root: str | Path, classes: Sequence[str] = ("circle", "square"), *, per_class: int = 3, seed: int = 0) -> Path:
    """A prepared TFDS data set (array_record) built without TensorFlow; returns its version directory."""
    import tensorflow_datasets as tfds

    class QvlSynthetic(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {"image": tfds.features.Image(encoding_format="jpeg"), "label": tfds.features.ClassLabel(names=list(classes))}
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0), "test": self._generate_examples(100)}

        def _generate_examples(self, offset):
            for k, r in enumerate(_records(classes, per_class, offset, seed)):
                yield k, r

    builder = QvlSynthetic(data_dir=str(root), file_format="array_record")
    builder.download_and_prepare()
    return Path(builder.data_dir)
