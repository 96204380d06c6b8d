"""Rotary embeddings: the vision tower's 2D axial RoPE and the decoder's M-RoPE.

The cos/sin tables depend only on the positions, which the classifier knows while tracing (they follow from the
static image grids). Given concrete positions, `vision_cos_sin` and `mrope_cos_sin` evaluate the tables then, and
they enter the program as constants: computed inside it, XLA:CPU re-evaluates cos/sin in every fusion that reads
them (~8% of the bench_small step, docs/performance.md). Traced positions trace as usual.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rotary(q, k, cos, sin):
    """`q [B, T, N, H]`, `k [B, T, K, H]`, `cos/sin [B or 1, T, H]`; computed in float32 like HF's vision path."""
    cos, sin = cos[:, :, None, :].astype(jnp.float32), sin[:, :, None, :].astype(jnp.float32)

    def rot(x):
        xf = x.astype(jnp.float32)
        return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)

    return rot(q), rot(k)


def one_row_if_shared(positions, batch_axis: int):
    """Concrete positions whose rows along `batch_axis` are all equal -> that one row (size 1 on the axis), as
    numpy: the tables are then broadcast over the batch and the constants do not grow with it. Anything else is
    returned as it is."""
    if isinstance(positions, jax.core.Tracer):
        return positions
    positions = np.asarray(positions)
    first = np.take(positions, [0], axis=batch_axis)
    return first if (positions == first).all() else positions


def vision_cos_sin(pos_hw, head_dim: int, theta: float):
    """`pos_hw [B, N, 2]` (row, column of each patch) -> `cos, sin [B, N, head_dim]`.

    Mirrors `Qwen2_5_VLVisionRotaryEmbedding`: head_dim/4 frequencies shared by
    the row and column axes, `[f_h, f_w]` repeated twice over the head dim.
    """
    spatial = head_dim // 2
    with jax.ensure_compile_time_eval():  # constants for concrete positions (module docstring)
        inv_freq = 1.0 / (theta ** (jnp.arange(0, spatial, 2, dtype=jnp.float32) / spatial))
        freqs = jnp.asarray(pos_hw, jnp.float32)[..., None] * inv_freq  # [B, N, 2, H/4]
        freqs = freqs.reshape(*freqs.shape[:-2], -1)  # [B, N, H/2] = [f_h, f_w]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)


def mrope_cos_sin(position_ids, head_dim: int, theta: float, mrope_section: Sequence[int]):
    """`position_ids [3, B, L]` (temporal, height, width) -> `cos, sin [B, L, head_dim]`.

    Mirrors `Qwen2_5_VLRotaryEmbedding`: frequency chunk i of `mrope_section`
    takes its angle from position axis i % 3.
    """
    with jax.ensure_compile_time_eval():  # constants for concrete positions (module docstring)
        inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        freqs = jnp.asarray(position_ids, jnp.float32)[..., None] * inv_freq  # [3, B, L, H/2]
        chunks, start = [], 0
        for i, size in enumerate(mrope_section):
            chunks.append(freqs[i % 3, ..., start:start + size])
            start += size
        freqs = jnp.concatenate(chunks, axis=-1)
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)
