"""The embedded default data set: scikit-learn's 1,797 handwritten digits.

Real scanned digits that ship inside the scikit-learn wheel, so the default run
needs no download. Written once, on first use, as a Food-101 layout directory
(64x64 greyscale JPEGs, classes "0".."9") so the demo goes through the same
reader as Food-101. The split is fixed: every fifth image of each class (in the
data set's own order) is a test image.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
_VERSION = 1
_SCALE = 8  # 8x8 scans -> 64x64 pixels


def ensure_digits(path: str | os.PathLike) -> Path:
    """Writes the digits data set to `path` unless a complete copy is there."""
    root = Path(path)
    marker = root / "meta" / "qvl_digits.json"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == _VERSION:
        return root
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise FileExistsError(f"{root} exists and is not a qvl digits directory; point the digits data set elsewhere")
    from sklearn.datasets import load_digits

    digits = load_digits()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    classes = [str(c) for c in range(10)]
    (tmp / "meta").mkdir()
    train, test = [], []
    seen = {c: 0 for c in range(10)}
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        cls = str(int(target))
        folder = tmp / "images" / cls
        folder.mkdir(parents=True, exist_ok=True)
        img = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)
        img = np.kron(img, np.ones((_SCALE, _SCALE), np.uint8))
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.jpg", quality=95)
        (test if seen[int(target)] % 5 == 4 else train).append(f"{cls}/{i:04d}")
        seen[int(target)] += 1
    (tmp / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (tmp / "meta" / "train.txt").write_text("\n".join(train) + "\n")
    (tmp / "meta" / "test.txt").write_text("\n".join(test) + "\n")
    (tmp / "meta" / "qvl_digits.json").write_text(json.dumps({"version": _VERSION, "train": len(train), "test": len(test)}))
    if root.exists():
        shutil.rmtree(root)
    try:
        tmp.rename(root)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the scikit-learn digits (%d train, %d test) to %s", len(train), len(test), root)
    return root
