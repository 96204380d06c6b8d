"""The Qwen2.5-VL vision tower in Flax NNX; mirrors HF's `Qwen2_5_VisionTransformerPretrainedModel`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qvl_core.model_config import VisionConfig
from qvl_jax.attention import dot_product_attention
from qvl_jax.linear import dense, matmul
from qvl_jax.norm import rms_norm
from qvl_jax.options import ACTIVATIONS, RuntimeOptions, swiglu
from qvl_jax.rotary import apply_rotary, one_row_if_shared, vision_cos_sin
from qvl_jax.sharding import split_over_examples
from qvl_jax.vision_layout import Segments, VisionLayout


def take_rows(x, index):
    """`x [B, N, ...]`, `index [B, M]` -> `[B, M, ...]`."""
    index = jnp.asarray(index).reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def segment_attention(q, k, v, seg: Segments, requested: str):
    """Attention within each segment of `q, k, v [B, N, H, D]` -> `[B, N, H, D]`."""
    b, n, h, d = q.shape
    if seg.uniform is not None:
        s = seg.uniform
        q, k, v = (x.reshape(b * n // s, s, h, d) for x in (q, k, v))
        return dot_product_attention(q, k, v, requested=requested).reshape(b, n, h, d)
    g, s = seg.gather.shape[1:]
    flat = seg.gather.reshape(b, g * s)
    q, k, v = (take_rows(x, flat).reshape(b * g, s, h, d) for x in (q, k, v))
    out = dot_product_attention(q, k, v, requested=requested, kv_lengths=jnp.asarray(seg.lengths.reshape(-1)))
    return take_rows(out.reshape(b, g * s, h, d), seg.scatter)


class PatchEmbed(nnx.Module):
    """HF's Conv3d with kernel == stride over a flattened (C, T, P, P) patch is a matmul; stored as one.

    Rows of one frame (`[B, N, C*P*P]`) stand for an image's patches, whose T temporal copies are equal (the
    processor repeats the frame): they meet the kernel summed over its T slices, half the matmul for T = 2.
    The sum is taken in float32 before the cast to the compute dtype, so `proj` keeps its stored dtype in a
    compute copy of the weights (`qvl_jax.state.compute_dtypes`).
    """

    reads_weights_of = ("proj",)  # children whose weights this module uses itself, not through their __call__

    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.proj = dense(cfg.patch_dim, cfg.hidden_size, bias=False, init_std=cfg.initializer_range, opts=opts,
                          rngs=rngs)
        self.channels, self.frames, self.frame_dim = cfg.in_channels, cfg.temporal_patch_size, cfg.frame_dim

    def __call__(self, pixel_values):  # [B, N, C*T*P*P] or [B, N, C*P*P] -> [B, N, D]
        width = pixel_values.shape[-1]
        if width == self.proj.in_features:
            return self.proj(pixel_values)
        if width != self.frame_dim:
            raise ValueError(f"pixel_values rows have {width} values; the patch embedding takes "
                             f"{self.proj.in_features} (C*T*P*P) or one frame of {self.frame_dim} (C*P*P)")
        kernel = self.proj.kernel[...].reshape(self.channels, self.frames, -1, self.proj.out_features)
        return matmul(pixel_values, kernel.astype(jnp.float32).sum(1).reshape(self.frame_dim, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        init, d, f = cfg.initializer_range, cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense(d, f, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.up_proj = dense(d, f, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.down_proj = dense(f, d, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.down_proj(swiglu(self.act, self.gate_proj(x), self.up_proj(x)))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        d, init = cfg.hidden_size, cfg.initializer_range
        self.qkv = dense(d, 3 * d, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.proj = dense(d, d, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.requested = opts.attention

    def __call__(self, x, cos, sin, seg: Segments):  # x [B, N, D]
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        # One split, not three slices: its backward is one concatenate, not three pads and two adds
        # (fwd+bwd of the projection and split on bench_small shapes: 8.4 -> 7.1 ms).
        q, k, v = (t[:, :, 0] for t in jnp.split(qkv, 3, axis=2))
        q, k = apply_rotary(q, k, cos, sin)
        out = segment_attention(q, k, v, seg, self.requested)
        return self.proj(out.reshape(b, n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.norm1 = rms_norm(cfg.hidden_size, 1e-6, opts, rngs)
        self.norm2 = rms_norm(cfg.hidden_size, 1e-6, opts, rngs)
        self.attn = VisionAttention(cfg, opts, rngs)
        self.mlp = VisionMLP(cfg, opts, rngs)

    def __call__(self, x, cos, sin, seg: Segments):
        x = x + self.attn(self.norm1(x), cos, sin, seg)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of neighbouring patches -> one token of the decoder's width."""

    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        wide = cfg.hidden_size * cfg.merge_unit
        self.merge_unit = cfg.merge_unit
        self.ln_q = rms_norm(cfg.hidden_size, 1e-6, opts, rngs)
        init = cfg.initializer_range
        self.mlp_0 = dense(wide, wide, bias=True, init_std=init, opts=opts, rngs=rngs)
        self.mlp_2 = dense(wide, cfg.out_hidden_size, bias=True, init_std=init, opts=opts, rngs=rngs)

    def __call__(self, x):  # [B, N, D] -> [B, N/4, out_hidden]
        b, n, d = x.shape
        x = self.ln_q(x).reshape(b, n // self.merge_unit, d * self.merge_unit)
        h = self.mlp_0(x)
        return self.mlp_2(ACTIVATIONS["gelu"](h.astype(jnp.float32)).astype(h.dtype))  # rounded once, like torch


class VisionTransformer(nnx.Module):
    def __init__(self, cfg: VisionConfig, opts: RuntimeOptions, rngs: nnx.Rngs):
        self.config, self.opts = cfg, opts
        self.patch_embed = PatchEmbed(cfg, opts, rngs)
        self.blocks = nnx.List([VisionBlock(cfg, opts, rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, opts, rngs)

    def __call__(self, pixel_values, layout: VisionLayout):
        """`pixel_values [B, N, C*T*P*P]` (or one frame, `[B, N, C*P*P]`) in the processor's patch order
        -> `[B, N/4, out_hidden]`.

        The output is in HF's token order (the window permutation undone);
        rows past an image's own `N_b/4` tokens (padding) are zero.
        """
        cfg, opts = self.config, self.opts
        x = self.patch_embed(pixel_values.astype(opts.jnp_dtype))
        x = take_rows(x, layout.perm)
        # Positions from the static layout: the tables are constants of the program (qvl_jax.rotary).
        cos, sin = vision_cos_sin(one_row_if_shared(layout.pos_hw, 0), cfg.head_dim, cfg.rope_theta)
        full = set(cfg.fullatt_block_indexes)
        run_window = opts.maybe_remat(_partial(layout.window))
        run_full = opts.maybe_remat(_partial(layout.full))
        for i, block in enumerate(self.blocks):
            x = split_over_examples((run_full if i in full else run_window)(block, split_over_examples(x), cos, sin))
        y = take_rows(self.merger(x), layout.unperm_merged)
        if int(layout.lengths.min()) < layout.num_patches:
            valid = jnp.arange(y.shape[1])[None, :] < jnp.asarray(layout.lengths // cfg.merge_unit)[:, None]
            y = jnp.where(valid[..., None], y, 0)
        return y


def _partial(seg: Segments):
    """A block call with its (static, numpy) segments closed over, so `nnx.remat` sees only arrays."""
    def run(block: VisionBlock, x, cos, sin):
        return block(x, cos, sin, seg)
    return run
