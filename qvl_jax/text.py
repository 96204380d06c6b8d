"""The Qwen2.5 decoder in Flax NNX; mirrors HF's `Qwen2_5_VLTextModel`, plus `get_rope_index`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qvl_core.model_config import QwenVLConfig, TextConfig
from qvl_jax.attention import dot_product_attention
from qvl_jax.linear import dense
from qvl_jax.norm import rms_norm
from qvl_jax.options import ACTIVATIONS, RuntimeOptions, swiglu
from qvl_jax.rotary import apply_rotary, mrope_cos_sin
from qvl_jax.sharding import split_over_examples


class TextAttention(nnx.Module):
    """Causal GQA attention with bias on q/k/v (not on o)."""

    def __init__(self, cfg: TextConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        init, d, hd = cfg.initializer_range, cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = dense(d, self.num_heads * hd, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.k_proj = dense(d, self.num_kv_heads * hd, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.v_proj = dense(d, self.num_kv_heads * hd, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.o_proj = dense(self.num_heads * hd, d, bias=False, init_std=init, opts=opts, rngs=rngs)
        self.requested = opts.attention

    def __call__(self, x, cos, sin, kv_lengths):  # x [B, L, D]
        b, length, _ = x.shape
        q = self.q_proj(x).reshape(b, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, cos, sin)
        out = dot_product_attention(q, k, v, requested=self.requested, is_causal=True, kv_lengths=kv_lengths)
        return self.o_proj(out.reshape(b, length, -1))


class TextMLP(nnx.Module):
    def __init__(self, cfg: TextConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        init, d, f = cfg.initializer_range, cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense(d, f, bias=False, init_std=init, opts=opts, rngs=rngs)
        self.up_proj = dense(d, f, bias=False, init_std=init, opts=opts, rngs=rngs)
        self.down_proj = dense(f, d, bias=False, init_std=init, opts=opts, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.down_proj(swiglu(self.act, self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.input_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, opts, rngs)
        self.post_attention_layernorm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, opts, rngs)
        self.self_attn = TextAttention(cfg, opts, rngs)
        self.mlp = TextMLP(cfg, opts, rngs)

    def __call__(self, x, cos, sin, kv_lengths):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_lengths)
        return x + self.mlp(self.post_attention_layernorm(x))


def _run_layer(layer: DecoderLayer, x, cos, sin, kv_lengths):
    return layer(x, cos, sin, kv_lengths)


class TextModel(nnx.Module):
    def __init__(self, cfg: TextConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.config, self.opts = cfg, opts
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(cfg.initializer_range),
                                      **opts.linear_kwargs())
        self.layers = nnx.List([DecoderLayer(cfg, opts, rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = rms_norm(cfg.hidden_size, cfg.rms_norm_eps, opts, rngs)

    def __call__(self, inputs_embeds, position_ids, kv_lengths=None):
        """`inputs_embeds [B, L, D]`, `position_ids [3, B or 1, L]`, `kv_lengths [B]` (right padding)
        -> `[B, L, D]`."""
        cfg = self.config
        cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
        run = self.opts.maybe_remat(_run_layer)
        x = inputs_embeds.astype(self.opts.jnp_dtype)
        for layer in self.layers:
            x = split_over_examples(run(layer, split_over_examples(x), cos, sin, kv_lengths))
        return self.norm(x)


def get_rope_index(cfg: QwenVLConfig, input_ids, attention_mask, merged_hw):
    """M-RoPE positions `[3, B, L]` for sequences holding one image each (HF's `get_rope_index`).

    `merged_hw [B, 2]` is each image's merged grid `(h/2, w/2)`. Tokens before
    the image count 0, 1, 2, ...; image token k at sequence start s gets
    `(s + k // (h*w), s + k % (h*w) // w, s + k % w)`; text after the image
    continues from `s + max(h, w)`. Padding (mask 0) is skipped when counting.
    """
    valid = jnp.ones_like(input_ids, bool) if attention_mask is None else attention_mask.astype(bool)
    idx = jnp.cumsum(valid, axis=1) - 1  # position among the valid tokens
    is_img = (input_ids == cfg.image_token_id) & valid
    seen = jnp.cumsum(is_img, axis=1)  # image tokens up to and including this one
    lh, lw = merged_hw[:, 0:1], merged_hw[:, 1:2]
    k = seen - 1
    start = idx - k
    text = idx - seen + jnp.where(seen > 0, jnp.maximum(lh, lw), 0)
    t_pos = jnp.where(is_img, start + k // (lh * lw), text)
    h_pos = jnp.where(is_img, start + k % (lh * lw) // lw, text)
    w_pos = jnp.where(is_img, start + k % lw, text)
    pos = jnp.stack([t_pos, h_pos, w_pos])
    return jnp.where(valid[None], pos, 0).astype(jnp.int32)
