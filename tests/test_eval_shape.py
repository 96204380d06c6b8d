"""The real 3B and 7B shapes, checked without allocating them (jax.eval_shape; torch's meta device)."""

import copy

import jax
import numpy as np
import pytest
from flax import nnx

from qvl_core.model_config import QwenVLConfig
from qvl_jax import QwenVLClassifier
from qvl_jax.classifier import model_rngs
from tests.real_configs import QWEN25_VL_3B, QWEN25_VL_7B


def _jax_param_count(cfg):
    model = nnx.eval_shape(lambda: QwenVLClassifier(cfg, rngs=model_rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _hf_param_count(raw):
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
    with torch.device("meta"):
        model = Qwen2_5_VLModel(Qwen2_5_VLConfig(**copy.deepcopy(raw)))
    return sum(p.numel() for p in model.parameters()), model


@pytest.mark.parametrize("raw,approx", [(QWEN25_VL_3B, 3.75e9), (QWEN25_VL_7B, 7.75e9)], ids=["3B", "7B"])
def test_real_config_param_count_equals_transformers(raw, approx):
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(raw))
    hf_count, hf_model = _hf_param_count(raw)
    assert _jax_param_count(cfg) == hf_count
    assert abs(hf_count - approx) / approx < 0.02  # model-card sizes less the untied lm_head
    assert cfg.vision.window_merged == 4 and cfg.text.head_dim == 128
    head = _jax_param_count(cfg.with_head(num_labels=101))
    assert head == hf_count + cfg.text.hidden_size * 101 + 101


@pytest.mark.parametrize("raw", [QWEN25_VL_3B, QWEN25_VL_7B], ids=["3B", "7B"])
def test_real_config_forward_shapes(raw):
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(raw)).with_head(num_labels=101)
    model = nnx.eval_shape(lambda: QwenVLClassifier(cfg, rngs=model_rngs(0)))
    graphdef, state = nnx.split(model)
    grid = (1, 32, 32)  # a 448x448 image

    def forward(state, pix):
        m = nnx.merge(graphdef, state)
        return m.encode_image(pix, grid), m(pix, grid).logits

    pix = jax.ShapeDtypeStruct((2, 1024, 1176), np.float32)
    feats, logits = jax.eval_shape(forward, state, pix)
    assert feats.shape == (2, 256, cfg.text.hidden_size)
    assert logits.shape == (2, 101)


def test_vision_mode_counts_only_the_tower():
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(QWEN25_VL_7B)).with_head(mode="vision", pooling="mean_image")
    _, hf_model = _hf_param_count(QWEN25_VL_7B)
    assert _jax_param_count(cfg) == sum(p.numel() for p in hf_model.visual.parameters())


def test_rotary_tables_are_constants_of_the_program():
    """The vision and M-RoPE cos/sin tables depend only on the static grid, so they are evaluated while tracing.
    Left in the program, XLA:CPU evaluates cos/sin again inside every fusion that reads them (~8% of the
    bench_small step, docs/performance.md). With one grid for the whole batch they are one row each, so the
    program's constants do not grow with the batch."""
    cfg = QwenVLConfig.from_hf_dict(copy.deepcopy(QWEN25_VL_3B)).with_head(num_labels=101)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: QwenVLClassifier(cfg, rngs=model_rngs(0))))

    def forward(state, pix):
        return nnx.merge(graphdef, state)(pix, (1, 32, 32)).logits

    closed = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((8, 1024, 1176), np.float32))
    jaxpr = str(closed)
    assert " = cos " not in jaxpr and " = sin " not in jaxpr
    assert " = dot_general" in jaxpr  # the forward was traced
    tables = [c.shape for c in closed.consts if np.issubdtype(getattr(c, "dtype", np.int32), np.floating)]
    assert sorted(tables) == [(1, 258, 128)] * 2 + [(1, 1024, 80)] * 2  # decoder (256 image tokens + 2), vision


def test_one_row_if_shared_keeps_differing_rows_and_tracers():
    from qvl_jax.rotary import one_row_if_shared

    same = np.tile(np.arange(6).reshape(1, 3, 2), (4, 1, 1))
    assert one_row_if_shared(same, 0).shape == (1, 3, 2)
    differ = same.copy()
    differ[2, 1, 0] = 7  # one image of another size
    assert one_row_if_shared(differ, 0).shape == (4, 3, 2)
    assert one_row_if_shared(np.stack([same, same, differ]), 1).shape == (3, 4, 3, 2)
    assert jax.jit(lambda p: one_row_if_shared(p, 0))(same).shape == (4, 3, 2)  # traced: left as it is
