"""qvl_core.data.image against transformers' Qwen2-VL image processor, on real photographs."""

import io

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from qvl_core.data import decode_image, expand_patches, patchify, preprocess_image, smart_resize

PHOTOS = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg (427x640)
# (photo, crop box): landscape, portrait, thin strip, tiny, square; sizes not multiples of 28.
CROPS = [(0, (0, 0, 640, 427)), (1, (100, 20, 331, 410)), (0, (5, 200, 605, 241)), (1, (300, 300, 311, 318)),
         (1, (64, 64, 320, 320))]
PIXELS = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 256 * 28 * 28)]


def _hf(image, min_pixels, max_pixels):
    out = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=image, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def _with_alpha(image: Image.Image, mode: str) -> Image.Image:
    rgba = np.array(image.convert("RGBA"))
    rgba[..., 3] = (np.arange(rgba.shape[1])[None, :] * 3 + np.arange(rgba.shape[0])[:, None]) % 256
    return Image.fromarray(rgba, "RGBA").convert(mode)


def _variants(image: Image.Image):
    yield "RGB", image
    yield "L", image.convert("L")
    yield "RGBA", _with_alpha(image, "RGBA")
    yield "LA", _with_alpha(image, "LA")
    yield "P", image.convert("P")
    transparent = image.convert("P")
    transparent.info["transparency"] = 0
    yield "P+transparency", transparent
    yield "CMYK", image.convert("CMYK")


@pytest.mark.parametrize("min_pixels,max_pixels", PIXELS)
@pytest.mark.parametrize("photo,box", CROPS)
def test_preprocess_matches_transformers_on_photographs(photo, box, min_pixels, max_pixels):
    image = PHOTOS[photo].crop(box)
    for mode, variant in _variants(image):
        ref_pixels, ref_grid = _hf(variant, min_pixels, max_pixels)
        pixels, grid = preprocess_image(variant, min_pixels=min_pixels, max_pixels=max_pixels)
        assert grid.tolist() == ref_grid.tolist(), mode
        assert pixels.dtype == np.float32 and pixels.shape == ref_pixels.shape, mode
        assert np.abs(pixels - ref_pixels).max() <= 1e-5, mode


def test_preprocess_of_encoded_files_matches_transformers_on_the_decoded_image():
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        PHOTOS[1].save(buf, fmt)
        pixels, _ = preprocess_image(buf.getvalue(), max_pixels=200 * 28 * 28)
        ref, _ = _hf(Image.open(io.BytesIO(buf.getvalue())), 56 * 56, 200 * 28 * 28)
        assert np.abs(pixels - ref).max() <= 1e-5, fmt


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey = np.asarray(PHOTOS[0].convert("L").crop((0, 0, 300, 200)), np.uint16)
    wide = Image.fromarray(grey * 257)  # the same picture stored in 16 bits
    assert wide.mode == "I;16"
    pixels, _ = preprocess_image(wide)
    ref, _ = _hf(Image.fromarray(grey.astype(np.uint8)), 56 * 56, 28 * 28 * 1280)
    assert np.abs(pixels - ref).max() <= 1e-5
    # transformers itself converts I;16 with PIL, which clips: almost every pixel becomes white.
    clipped, _ = _hf(wide, 56 * 56, 28 * 28 * 1280)
    assert np.abs(clipped - ref).max() > 1.0


def test_exif_orientation_is_applied():
    image = PHOTOS[0].crop((0, 0, 300, 120))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: display needs a 90 degree clockwise turn
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    decoded = decode_image(buf.getvalue())
    assert decoded.size == (120, 300)
    plain = Image.open(io.BytesIO(buf.getvalue())).convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(decoded), np.asarray(plain))


def test_smart_resize_matches_transformers():
    rng = np.random.default_rng(0)
    for h, w in [(1, 1), (13, 27), (27, 2000), (224, 224), (427, 640), (4000, 3000), *rng.integers(5, 3000, (40, 2))]:
        for lo, hi in PIXELS:
            assert smart_resize(int(h), int(w), min_pixels=lo, max_pixels=hi) == hf_smart_resize(int(h), int(w), 28, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def test_uint8_patches_expand_to_the_processor_pixel_values():
    image = PHOTOS[1].resize((280, 196))
    patches = patchify(np.asarray(image))
    assert patches.dtype == np.uint8 and patches.shape == (20 * 14, 3 * 14 * 14)
    ref, grid = _hf(image, 56 * 56, 280 * 196)
    assert grid.tolist() == [[1, 14, 20]]
    np.testing.assert_array_equal(expand_patches(patches), ref)
    np.testing.assert_array_equal(expand_patches(patches[None])[0], ref)  # batched form
    # On the device: the jnp twin, and the one frame per patch that the JAX trainers feed the vision tower.
    from qvl_jax.pixels import expand_patches as expand_on_device, frame_values
    np.testing.assert_array_equal(np.asarray(expand_on_device(patches[None]))[0], ref)
    copies = ref.reshape(len(ref), 3, 2, 14 * 14)  # (C, T, P*P): the processor repeats the frame over T
    assert np.array_equal(copies[:, :, 0], copies[:, :, 1])
    np.testing.assert_array_equal(np.asarray(frame_values(patches[None]))[0], copies[:, :, 0].reshape(len(ref), -1))
