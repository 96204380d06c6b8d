"""Image decoding and the Qwen2.5-VL pixel layout.

`preprocess_image` gives the arrays of transformers' PIL image processor for
Qwen2-VL/Qwen2.5-VL (`Qwen2VLImageProcessorPil`, the processor users without
torchvision get): `smart_resize`, PIL bicubic resampling, rescale by 1/255,
normalisation with the OpenAI-CLIP mean/std, `temporal_patch_size` copies of the
frame and the merge-grouped patch order. The training pipeline splits the same
computation in two: `patchify` gives uint8 patches on the host (1/8 of the
float32 bytes to move), `expand_patches` turns them into `pixel_values` with the
same table of float32 values the processor computes.
"""

from __future__ import annotations

import io
import math
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Qwen2.5-VL's image processor statistics (OpenAI CLIP) and patch geometry.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # image sides are multiples of 28
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280

ImageSource = Union[bytes, str, os.PathLike, Image.Image, np.ndarray]


class BadImageError(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


def open_image(source: ImageSource, *, where: str | None = None) -> Image.Image:
    """Opens and fully decodes `source` (path, bytes, PIL image or HWC uint8 array).

    Truncated and corrupt files raise `BadImageError` naming `where` (or the path).
    EXIF orientation is applied. The mode is left as stored; see `to_rgb`.
    """
    label = where or (str(source) if isinstance(source, (str, os.PathLike)) else "<image bytes>")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
        image = Image.open(fp)
        image.load()
        return ImageOps.exif_transpose(image)
    except FileNotFoundError as e:
        raise BadImageError(f"{label}: file not found") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB, as transformers' `convert_to_rgb` does, except 16-bit.

    Transparency is composited onto white (palette transparency included). 16-bit
    and 32-bit integer greyscale (`I;16*`, `I`) are scaled to 8 bits; PIL's own
    conversion, which transformers uses, clips every value above 255 to white.
    """
    if image.mode.startswith("I;16") or (image.mode == "I" and image.getextrema()[1] > 255):
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("I", "F"):
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(source: ImageSource, *, where: str | None = None) -> Image.Image:
    """`open_image` then `to_rgb`: the RGB image every transform starts from."""
    return to_rgb(open_image(source, where=where))


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen2-VL's target size: sides multiples of `factor`, area in [min, max], aspect kept.

    Same rule as transformers' `smart_resize`.
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} of a {height}x{width} image is over 200")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * grow / factor) * factor
        w = math.ceil(width * grow / factor) * factor
    return h, w


def normalize_table(mean=IMAGE_MEAN, std=IMAGE_STD) -> np.ndarray:
    """[3, 256] float32: the processor's value for each channel and byte.

    transformers rescales in float64 and casts to float32, then normalises in
    float32; a table of those 768 values reproduces it bit for bit.
    """
    scaled = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, np.float32)[:, None]
    std32 = np.asarray(std, np.float32)[:, None]
    return (scaled[None, :] - mean32) / std32


_TABLE = normalize_table()


def patchify(image_hwc: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H/14 * W/14, 3*14*14], patches in the processor's order.

    Patches are grouped by 2x2 merge unit (row-major over units, then within a
    unit), each patch flattened channel-major, as `Qwen2VLImageProcessor.patchify`
    orders them (before the temporal copy).
    """
    h, w, c = image_hwc.shape
    if h % FACTOR or w % FACTOR:
        raise ValueError(f"image of {h}x{w} pixels: both sides must be multiples of {FACTOR}")
    gh, gw = h // PATCH_SIZE, w // PATCH_SIZE
    x = image_hwc.reshape(gh // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, gw // MERGE_SIZE, MERGE_SIZE, PATCH_SIZE, c)
    # (gh/2, gw/2, 2, 2, C, 14, 14)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)
    return np.ascontiguousarray(x).reshape(gh * gw, c * PATCH_SIZE * PATCH_SIZE)


def expand_patches(patches: np.ndarray, table: np.ndarray = _TABLE) -> np.ndarray:
    """uint8 [..., N, 3*14*14] -> float32 [..., N, 3*2*14*14] `pixel_values`.

    Normalises through `normalize_table` and repeats each channel's patch
    `temporal_patch_size` times (channel-major, then time), the processor's layout.
    """
    *lead, n, d = patches.shape
    per_channel = PATCH_SIZE * PATCH_SIZE
    x = patches.reshape(*lead, n, 3, per_channel)
    values = table[np.arange(3)[:, None], x]  # [..., N, 3, 196]
    values = np.broadcast_to(values[..., None, :], (*lead, n, 3, TEMPORAL_PATCH_SIZE, per_channel))
    return values.reshape(*lead, n, 3 * TEMPORAL_PATCH_SIZE * per_channel)


def preprocess_image(
    image: ImageSource,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray]:
    """One image -> (`pixel_values` float32 [N, 1176], `grid_thw` int64 [1, 3]).

    Equal to transformers' Qwen2-VL image processor with the same `min_pixels`
    and `max_pixels` on the same image (paths and bytes are decoded first, EXIF
    orientation applied; 16-bit greyscale is scaled, see `to_rgb`).
    """
    rgb = decode_image(image)
    h, w = smart_resize(rgb.height, rgb.width, min_pixels=min_pixels, max_pixels=max_pixels)
    resized = rgb.resize((w, h), Image.Resampling.BICUBIC)
    pixel_values = expand_patches(patchify(np.asarray(resized)))
    grid_thw = np.array([[1, h // PATCH_SIZE, w // PATCH_SIZE]], dtype=np.int64)
    return pixel_values, grid_thw


