"""Train-time augmentation and eval-time resizing to the run's fixed image size.

Both return uint8 [H, W, 3]. Randomness comes only from the generator passed in,
which the pipeline seeds from (seed, stream position): the same record at the same
position gets the same crop in every loader, worker count and framework.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from .config import AugmentConfig

_BICUBIC = Image.Resampling.BICUBIC


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[float, float, float, float]:
    """A crop (left, top, right, bottom) with area in `scale` of the image and aspect in `ratio`.

    The Inception-style sampler (as in torchvision's RandomResizedCrop): ten tries
    at a random area and log-uniform aspect, else the largest centred crop whose
    aspect is clamped to `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            left = rng.uniform(0, width - w)
            top = rng.uniform(0, height - h)
            return (left, top, left + w, top + h)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, width / ratio[0]
    elif aspect > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


def center_box(width: int, height: int, out_hw: tuple[int, int], fraction: float) -> tuple[float, float, float, float]:
    """The centred box of aspect out_w/out_h covering `fraction` of the largest such box."""
    out_h, out_w = out_hw
    scale = min(width / out_w, height / out_h) * math.sqrt(fraction)
    w, h = out_w * scale, out_h * scale
    left, top = (width - w) / 2, (height - h) / 2
    return (left, top, left + w, top + h)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    image_hw: tuple[int, int]
    augment: AugmentConfig = AugmentConfig()

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        h, w = self.image_hw
        if self.augment.random_resized_crop:
            box = random_resized_crop_box(image.width, image.height, rng, self.augment.scale, self.augment.ratio)
        else:
            box = (0, 0, image.width, image.height)
        out = image.resize((w, h), _BICUBIC, box=box)
        if self.augment.hflip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    image_hw: tuple[int, int]
    crop_fraction: float = 1.0

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
        h, w = self.image_hw
        box = center_box(image.width, image.height, self.image_hw, self.crop_fraction)
        return np.asarray(image.resize((w, h), _BICUBIC, box=box))
