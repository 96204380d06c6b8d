"""uint8 patches from the input pipeline -> the processor's `pixel_values`, on the device."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qvl_core.data.image import PATCH_SIZE, TEMPORAL_PATCH_SIZE, normalize_table

_TABLE = normalize_table()  # [3, 256] float32, bit-identical to transformers' rescale + normalise


def frame_values(patches, dtype=jnp.float32):
    """uint8 `[B, N, 3*14*14]` -> the normalised frame `[B, N, 3*14*14]` in `dtype`: a `pixel_values` row
    before the processor repeats it over time, which the vision tower takes as it is (`PatchEmbed`)."""
    *lead, n, _ = patches.shape
    idx = patches.reshape(*lead, n, 3, PATCH_SIZE * PATCH_SIZE).astype(jnp.int32)
    values = jnp.asarray(_TABLE)[np.arange(3)[:, None], idx]  # [..., N, 3, 196]
    return values.reshape(*lead, n, -1).astype(dtype)


def expand_patches(patches, dtype=jnp.float32):
    """uint8 `[B, N, 3*14*14]` -> `[B, N, 3*2*14*14]` in `dtype`; the jnp twin of
    `qvl_core.data.expand_patches` (same float32 values before the cast)."""
    *lead, n, _ = patches.shape
    values = frame_values(patches).reshape(*lead, n, 3, 1, PATCH_SIZE * PATCH_SIZE)
    values = jnp.broadcast_to(values, (*lead, n, 3, TEMPORAL_PATCH_SIZE, PATCH_SIZE * PATCH_SIZE))
    return values.reshape(*lead, n, -1).astype(dtype)
