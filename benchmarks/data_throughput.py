"""Input-pipeline throughput: decoded + augmented + patchified images per second.

Writes a Food-101-layout set of 512x512 JPEGs cut from scikit-learn's two sample
photographs, then runs the training source (random resized crop + flip to the
output size, uint8 patches) through the grain loader with each worker count and
prints images/s. Run:

    python benchmarks/data_throughput.py --workers 0 1 2 --image-size 448
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_photos(root: Path, count: int, side: int) -> None:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(0)
    classes = ["china", "flower"]
    (root / "meta").mkdir(parents=True, exist_ok=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    entries = []
    for i in range(count):
        c = i % 2
        photo = photos[c]
        crop = int(rng.integers(300, min(photo.size)))
        left, top = int(rng.integers(0, photo.width - crop)), int(rng.integers(0, photo.height - crop))
        image = photo.crop((left, top, left + crop, top + crop)).resize((side, side), Image.Resampling.BICUBIC)
        folder = root / "images" / classes[c]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.jpg", quality=90)
        entries.append(f"{classes[c]}/{i}")
    (root / "meta" / "train.txt").write_text("\n".join(entries) + "\n")
    (root / "meta" / "test.txt").write_text("\n".join(entries[:8]) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("--source-size", type=int, default=512)
    parser.add_argument("--images", type=int, default=256, help="distinct JPEGs on disk")
    parser.add_argument("--batches", type=int, default=48, help="timed batches per setting")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="grain read threads per process")
    args = parser.parse_args()

    from qvl_core.data import DataConfig, DatasetConfig, TrainSource, load_data
    from qvl_jax.input_pipeline import make_loader

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        write_photos(root, args.images, args.source_size)
        config = DataConfig(datasets=(DatasetConfig(name="photos", format="food101", path=str(root)),),
                            image_size=args.image_size)
        source = TrainSource(load_data(config), seed=0, num_records=10**7)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"{args.source_size}px JPEG -> {args.image_size}px uint8 patches {source[0]['patches'].shape}")
        for workers in args.workers:
            loader = iter(make_loader(source, batch_size=args.batch_size, num_workers=workers, num_threads=args.threads))
            for _ in range(4 + workers * 4):  # warm up: spawn workers, fill buffers
                next(loader)
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(loader)
            elapsed = time.perf_counter() - start
            assert batch["valid"].all()
            rate = args.batches * args.batch_size / elapsed
            print(f"workers={workers} threads={args.threads}: {rate:7.1f} images/s")
            loader.close()


if __name__ == "__main__":
    main()
