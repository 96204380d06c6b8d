"""Qwen2.5-VL as an image classifier: vision tower (+ decoder) -> pooling -> linear head."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qvl_core.model_config import QwenVLConfig, head_input_size
from qvl_core.sequence import build_input_ids
from qvl_jax.options import RuntimeOptions
from qvl_jax.rotary import one_row_if_shared
from qvl_jax.text import TextModel, get_rope_index
from qvl_jax.vision import VisionTransformer, take_rows
from qvl_jax.vision_layout import Grid, vision_layout


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ClassifierOutput:
    logits: jax.Array | None  # [B, num_labels] float32; None when the model has no head
    pooled: jax.Array  # [B, D] the head's input
    last_hidden_state: jax.Array  # [B, L, hidden] (vlm) or the image features [B, N/4, out_hidden] (vision)


def normalize_grids(grid_thw: Any, batch: int) -> tuple[Grid, ...]:
    """`(t, h, w)` for the whole batch, or `[B, 3]` one per image -> a static tuple of B grids."""
    if isinstance(grid_thw, jax.core.Tracer):
        raise TypeError("grid_thw must be static (a tuple or numpy array), not a traced array: the patch grid "
                        "decides shapes; close over it instead of passing it through jit")
    arr = np.asarray(grid_thw, dtype=np.int64)
    if arr.shape == (3,):
        arr = np.tile(arr, (batch, 1))
    if arr.ndim != 2 or arr.shape[1] != 3 or (arr.shape[0] != batch and arr.shape[0] != 1):
        raise ValueError(f"grid_thw has shape {arr.shape}; expected (3,) or ({batch}, 3)")
    if arr.shape[0] == 1:
        arr = np.tile(arr, (batch, 1))
    return tuple(tuple(int(x) for x in row) for row in arr)


class _EagerKeys(nnx.RngStream):
    """A stream whose key arithmetic runs eagerly, also while the model is built under a trace.

    flax 0.12 advances a stream's counter through `Variable.set_value`, which reads the new counter's
    `.sharding`; on a tracer JAX answers with an error message that walks the whole trace so far, so building
    the 3B model under `nnx.eval_shape` (~800 parameters, one draw each) was quadratic: 20 s, against 3.6 s with
    the counter and keys kept concrete. The keys are the same either way."""

    def __call__(self) -> jax.Array:
        with jax.ensure_compile_time_eval():
            return super().__call__()


def model_rngs(seed: int) -> nnx.Rngs:
    """`nnx.Rngs(seed)` for building a model, fast under `nnx.eval_shape` too (the same keys)."""
    with jax.ensure_compile_time_eval():
        rngs = nnx.Rngs(seed)
        rngs.default = _EagerKeys(jax.random.key(seed), tag="default")
    return rngs


class QwenVLClassifier(nnx.Module):
    """`mode: vlm`: vision tower -> image tokens in the decoder -> pooling -> head.
    `mode: vision`: vision tower -> mean of the image features -> head."""

    def __init__(self, config: QwenVLConfig, *, opts: RuntimeOptions = RuntimeOptions(), rngs: nnx.Rngs):
        self.config, self.opts = config, opts
        self.visual = VisionTransformer(config.vision, opts, rngs)
        self.language_model = TextModel(config.text, opts, rngs) if config.head.mode == "vlm" else None
        if config.head.num_labels:
            # The head is float32, parameters and compute, whatever the backbone's dtypes (as in
            # qvl_torch): a bfloat16 head weight adds its rounding error to the logits and to every
            # gradient upstream of them. Measured (bf16 parity, 6 seeds): the head-bias gradient error
            # was 1.53-1.78x torch's on 4 of 6 seeds; with a float32 head, no gradient is above 1.30x.
            self.classifier = nnx.Linear(head_input_size(config), config.head.num_labels, rngs=rngs,
                                         kernel_init=nnx.initializers.normal(config.text.initializer_range),
                                         dtype=jnp.float32, param_dtype=jnp.float32)
        else:
            self.classifier = None

    def encode_image(self, pixel_values, grid_thw):
        """`pixel_values [B, N, 1176]` (or one frame per patch, `[B, N, 588]`), `grid_thw` `(t, h, w)` or `[B, 3]`
        -> `[B, N/4, out_hidden]`, HF's order."""
        grids = normalize_grids(grid_thw, pixel_values.shape[0])
        layout = vision_layout(grids, self.config.vision)
        if pixel_values.shape[1] != layout.num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[1]} patches per image but grid_thw "
                             f"{grids[0] if len(set(grids)) == 1 else grids} needs {layout.num_patches}")
        return self.visual(pixel_values, layout)

    def __call__(self, pixel_values, grid_thw, input_ids=None, attention_mask=None) -> ClassifierOutput:
        """`input_ids [B, L]` with one run of image-pad tokens per row (built when omitted);
        `attention_mask [B, L]` right-padded."""
        cfg = self.config
        grids = normalize_grids(grid_thw, pixel_values.shape[0])
        feats = self.encode_image(pixel_values, grids)
        merge = cfg.vision.spatial_merge_size
        if cfg.head.mode == "vision":
            n_tok = jnp.asarray([t * h * w // merge**2 for t, h, w in grids])
            valid = jnp.arange(feats.shape[1])[None, :] < n_tok[:, None]
            pooled = jnp.sum(jnp.where(valid[..., None], feats.astype(jnp.float32), 0), 1) / n_tok[:, None]
            return ClassifierOutput(self._head(pooled), pooled, feats)
        if input_ids is None:
            with jax.ensure_compile_time_eval():  # concrete, so the positions below are constants too
                input_ids, attention_mask = (jnp.asarray(a) for a in build_input_ids(cfg, grids))
        _check_tokens(cfg, input_ids, attention_mask, grids)
        is_img = input_ids == cfg.image_token_id
        if attention_mask is not None:
            is_img &= attention_mask.astype(bool)
        text_embeds = self.language_model.embed_tokens(input_ids)
        # HF's masked_scatter: the k-th image token of row b takes feature k of image b.
        k = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, feats.shape[1] - 1)
        embeds = jnp.where(is_img[..., None], take_rows(feats, k).astype(text_embeds.dtype), text_embeds)
        with jax.ensure_compile_time_eval():  # concrete when the prompt was built from the (static) grids
            merged_hw = jnp.asarray([(h // merge, w // merge) for _, h, w in grids])
            position_ids = get_rope_index(cfg, input_ids, attention_mask, merged_hw)
        position_ids = one_row_if_shared(position_ids, 1)  # the rotary tables become constants (qvl_jax.rotary)
        kv_lengths = None if attention_mask is None else attention_mask.sum(-1)
        hidden = self.language_model(embeds, position_ids, kv_lengths)
        pooled = pool(hidden, is_img, attention_mask, cfg.head.pooling)
        return ClassifierOutput(self._head(pooled), pooled, hidden)

    def _head(self, pooled):
        pooled = pooled.astype(jnp.float32)
        return None if self.classifier is None else self.classifier(pooled)


def pool(hidden, is_img, attention_mask, pooling: str):
    """`hidden [B, L, D]` -> `[B, D]` float32: the last valid token, or the mean over image tokens."""
    hidden = hidden.astype(jnp.float32)
    if pooling == "mean_image":
        w = is_img.astype(jnp.float32)
        return jnp.einsum("bl,bld->bd", w, hidden) / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    length = hidden.shape[1]
    if attention_mask is None:
        return hidden[:, -1]
    last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(length)[None], -1), axis=1)
    return take_rows(hidden, last[:, None])[:, 0]


def _check_tokens(cfg: QwenVLConfig, input_ids, attention_mask, grids) -> None:
    """With concrete inputs, checks what would otherwise silently misplace features."""
    if isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer):
        return
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if np.any(np.diff(mask, axis=1) > 0):
        raise ValueError("attention_mask must be right-padded (ones, then zeros) in every row")
    merge = cfg.vision.spatial_merge_size
    for b, (row, m, (t, h, w)) in enumerate(zip(ids, mask, grids)):
        pos = np.flatnonzero((row == cfg.image_token_id) & (m > 0))
        want = t * h * w // merge**2
        if len(pos) != want:
            raise ValueError(f"row {b} of input_ids has {len(pos)} image tokens but its image gives {want} features")
        if len(pos) and pos[-1] - pos[0] + 1 != len(pos):
            raise ValueError(f"row {b} of input_ids: image tokens must form one contiguous run (one image per row)")
