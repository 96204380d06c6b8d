"""Module by module against transformers' own modules, same weights, float32 "highest": <= 1e-5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from parity_tests.compare import rel_l2
from parity_tests.tiny import grid_for, random_batch

MODULE_LIMIT = 1e-5


@pytest.fixture(scope="module")
def pair(gqa_ckpt):
    import qvl_jax
    import qvl_torch
    jax.config.update("jax_default_matmul_precision", "highest")
    return qvl_jax.load_hf(gqa_ckpt), qvl_torch.load_pretrained(gqa_ckpt)


def _hf_window(grid, visual):
    from transformers.vision_utils import get_vision_window_index
    return get_vision_window_index(torch.tensor([grid]), spatial_merge_size=visual.spatial_merge_size,
                                   window_size=visual.window_size, patch_size=visual.patch_size)


@pytest.mark.parametrize("hw", [(140, 252), (56, 56), (112, 224), (252, 28)])
def test_window_layout_matches_hf_window_index(pair, hw):
    from qvl_jax.vision_layout import vision_layout
    jm, tm = pair
    grid = grid_for(*hw)
    window_index, cu = _hf_window(grid, tm.model.visual)
    layout = vision_layout((grid,), jm.config.vision)
    mu = jm.config.vision.merge_unit
    expected_perm = (window_index.numpy()[:, None] * mu + np.arange(mu)).ravel()
    np.testing.assert_array_equal(layout.perm[0], expected_perm)
    lens = np.diff(cu.numpy())
    if layout.window.uniform is not None:
        assert set(lens.tolist()) == {layout.window.uniform}
    else:
        np.testing.assert_array_equal(layout.window.lengths[0][layout.window.lengths[0] > 0], lens)


def test_patch_embed_matches_conv3d(pair):
    jm, tm = pair
    pix, grids = random_batch([grid_for(56, 84)])
    j = jm.visual.patch_embed(jnp.asarray(pix))[0]
    with torch.no_grad():
        t = tm.model.visual.patch_embed(torch.from_numpy(pix[0]))
    assert rel_l2(j, t.numpy()) <= MODULE_LIMIT


def test_patch_embed_of_one_frame_matches_conv3d_of_the_repeated_frame(pair):
    """The trainers feed one frame per patch: the kernel summed over time, against HF's Conv3d on both copies."""
    from flax import nnx
    jm, tm = pair
    pix, _ = random_batch([grid_for(56, 84)])
    b, n, _ = pix.shape
    frame = pix.reshape(b, n, 3, 2, -1)[:, :, :, 0]  # [B, N, C, P*P]: the first of the two temporal copies
    full = np.repeat(frame[:, :, :, None], 2, axis=3).reshape(b, n, -1)  # the processor's layout: (C, T, P, P)
    j = jm.visual.patch_embed(jnp.asarray(frame.reshape(b, n, -1)))
    with torch.no_grad():
        t = tm.model.visual.patch_embed(torch.from_numpy(full[0]))
    assert rel_l2(j[0], t.numpy()) <= MODULE_LIMIT
    # The kernel's gradient reaches both temporal slices, as through the repeated rows.
    graphdef, state = nnx.split(jm.visual.patch_embed)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(j.shape), jnp.float32)
    grad = jax.grad(lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x) * weights))
    one, both = grad(state, jnp.asarray(frame.reshape(b, n, -1))), grad(state, jnp.asarray(full))
    assert rel_l2(one["proj"]["kernel"][...], both["proj"]["kernel"][...]) <= MODULE_LIMIT
    with pytest.raises(ValueError, match="pixel_values rows have 500 values; the patch embedding takes 1176"):
        jm.visual.patch_embed(jnp.zeros((1, n, 500)))


def test_vision_rotary_matches_hf(pair):
    from transformers.vision_utils import get_vision_position_ids

    from qvl_jax.rotary import vision_cos_sin
    from qvl_jax.vision_layout import hf_patch_positions
    jm, tm = pair
    grid = grid_for(140, 252)
    pos = get_vision_position_ids(torch.tensor([grid]), 2)
    np.testing.assert_array_equal(hf_patch_positions(grid, 2), pos.numpy())
    visual = tm.model.visual
    with torch.no_grad():
        cos_t, sin_t = visual.rotary_pos_emb(torch.zeros(1), pos)
    cos_j, sin_j = vision_cos_sin(pos.numpy()[None], jm.config.vision.head_dim, jm.config.vision.rope_theta)
    assert rel_l2(cos_j[0], cos_t.numpy()) <= MODULE_LIMIT
    assert rel_l2(sin_j[0], sin_t.numpy()) <= MODULE_LIMIT


@pytest.mark.parametrize("block_index", [0, 1])  # 0: windowed, 1: full attention (fullatt_block_indexes=[1])
def test_one_vision_block_matches_hf(pair, block_index):
    from transformers.vision_utils import get_vision_position_ids

    from qvl_jax.rotary import vision_cos_sin
    from qvl_jax.vision_layout import vision_layout
    jm, tm = pair
    grid = grid_for(140, 252)
    n = grid[1] * grid[2]
    layout = vision_layout((grid,), jm.config.vision)
    x = np.random.default_rng(0).standard_normal((n, jm.config.vision.hidden_size)).astype(np.float32)
    visual = tm.model.visual
    window_index, cu_window = _hf_window(grid, visual)
    cu_full = torch.tensor([0, n], dtype=torch.int32)
    pos = get_vision_position_ids(torch.tensor([grid]), 2)
    with torch.no_grad():
        emb = visual.rotary_pos_emb(torch.zeros(1), pos)
        emb = tuple(visual.permute_input_for_window_attn(e, window_index, seq_len=n) for e in emb)
        xt = torch.from_numpy(x)  # the block sees the permuted sequence; any input works for the comparison
        cu = cu_full if block_index in visual.fullatt_block_indexes else cu_window
        t = visual.blocks[block_index](xt, cu_seqlens=cu, position_embeddings=emb)
    cos, sin = vision_cos_sin(layout.pos_hw, jm.config.vision.head_dim, jm.config.vision.rope_theta)
    seg = layout.full if block_index in jm.config.vision.fullatt_block_indexes else layout.window
    j = jm.visual.blocks[block_index](jnp.asarray(x)[None], cos, sin, seg)[0]
    assert rel_l2(j, t.numpy()) <= MODULE_LIMIT


def test_patch_merger_matches_hf(pair):
    jm, tm = pair
    x = np.random.default_rng(1).standard_normal((64, jm.config.vision.hidden_size)).astype(np.float32)
    with torch.no_grad():
        t = tm.model.visual.merger(torch.from_numpy(x))
    j = jm.visual.merger(jnp.asarray(x)[None])[0]
    assert rel_l2(j, t.numpy()) <= MODULE_LIMIT


def _rope_inputs(cfg, grids, prompt_before=(), prompt_after=()):
    """Rows of `[prompt_before] <vs> <img>*n <ve> [prompt_after]`, right-padded, as HF would see them."""
    rows = []
    for t, h, w in grids:
        n = t * h * w // 4
        rows.append(list(prompt_before) + [cfg.vision_start_token_id] + [cfg.image_token_id] * n
                    + [cfg.vision_end_token_id] + list(prompt_after))
    length = max(map(len, rows))
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


@pytest.mark.parametrize("before,after", [((), ()), ((5, 6, 7), ()), ((9,), (3, 4, 5, 6))])
def test_rope_index_matches_hf(pair, before, after):
    from qvl_jax.text import get_rope_index
    jm, tm = pair
    cfg = jm.config
    grids = [grid_for(140, 252), grid_for(56, 112)]
    ids, mask = _rope_inputs(cfg, grids, before, after)
    tids = torch.from_numpy(ids)
    hf_pos, _ = tm.model.get_rope_index(tids, mm_token_type_ids=(tids == cfg.image_token_id).int(),
                                        image_grid_thw=torch.tensor(grids), attention_mask=torch.from_numpy(mask))
    merged = np.asarray([(h // 2, w // 2) for _, h, w in grids])
    pos = np.asarray(get_rope_index(cfg, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(merged)))
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos.numpy()[:, valid])


def test_mrope_and_one_decoder_layer_match_hf(pair):
    from qvl_jax.rotary import mrope_cos_sin
    jm, tm = pair
    cfg = jm.config
    rng = np.random.default_rng(2)
    b, length = 2, 23
    pos = np.stack([np.sort(rng.integers(0, 40, (b, length)), axis=-1)] * 3)
    pos[1] += rng.integers(0, 3, (b, length))
    lm = tm.model.language_model
    x = rng.standard_normal((b, length, cfg.text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        cos_t, sin_t = lm.rotary_emb(torch.from_numpy(x), torch.from_numpy(pos))
        t = lm.layers[0](torch.from_numpy(x), attention_mask=None, position_embeddings=(cos_t, sin_t))
    cos_j, sin_j = mrope_cos_sin(jnp.asarray(pos), cfg.text.head_dim, cfg.text.rope_theta, cfg.text.mrope_section)
    assert rel_l2(cos_j, cos_t.numpy()) <= MODULE_LIMIT
    assert rel_l2(sin_j, sin_t.numpy()) <= MODULE_LIMIT
    t = t[0] if isinstance(t, tuple) else t
    j = jm.language_model.layers[0](jnp.asarray(x), cos_j, sin_j, None)
    assert rel_l2(j, t.numpy()) <= MODULE_LIMIT
