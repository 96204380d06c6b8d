"""Rotary embeddings: the vision tower's 2D axial RoPE and the decoder's M-RoPE."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp


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


def vision_cos_sin(pos_hw, head_dim: int, theta: float):
    """`pos_hw [B, N, 2]` (row, column of each patch) -> `cos, sin [B, N, head_dim]`.

    Mirrors `Qwen2_5_VLVisionRotaryEmbedding`: head_dim/4 frequencies shared by
    the row and column axes, `[f_h, f_w]` repeated twice over the head dim.
    """
    spatial = head_dim // 2
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
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # [3, B, L, H/2]
    chunks, start = [], 0
    for i, size in enumerate(mrope_section):
        chunks.append(freqs[i % 3, ..., start:start + size])
        start += size
    freqs = jnp.concatenate(chunks, axis=-1)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)
