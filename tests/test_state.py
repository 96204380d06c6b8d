"""The compute copy of the weights (`qvl_jax.state.compute_dtypes`): narrower only where the model casts anyway."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qvl_core.model_config import QwenVLConfig
from qvl_jax.classifier import QwenVLClassifier
from qvl_jax.options import RuntimeOptions
from qvl_jax.state import _path_names, cast_to, compute_dtypes, keeps_compute_copy
from qvl_jax.vision import PatchEmbed
from tests.train_helpers import TINY_MODEL

GRID = (1, 4, 4)  # one 56 px image: 4 x 4 patches of 14 px


def _model(dtype: str):
    cfg = QwenVLConfig.from_hf_dict(TINY_MODEL).with_head(num_labels=3)
    return QwenVLClassifier(cfg, opts=RuntimeOptions(dtype=dtype), rngs=nnx.Rngs(0))


def _forward(graphdef, params, pixels):
    return jax.jit(lambda p: nnx.merge(graphdef, p)(pixels, GRID).logits)(params)


def _pixels(rows: int, width: int):
    return jnp.asarray(np.random.default_rng(0).normal(size=(2, rows, width)), jnp.bfloat16)


def test_compute_copy_gives_the_logits_of_the_float32_weights():
    """A step on the bf16 compute copy computes what a step on the float32 weights computes (each cast moved out
    of the step); which weights are narrower: the matmul weights, not norms, the patch embedding or the head."""
    model = _model("bfloat16")
    graphdef, params = nnx.split(model)
    dtypes = compute_dtypes(model, params)
    narrow = {".".join(map(str, _path_names(p))) for p, d in jax.tree_util.tree_flatten_with_path(dtypes)[0]
              if d == jnp.bfloat16}
    assert "language_model.layers.0.self_attn.q_proj.kernel" in narrow
    assert "language_model.layers.0.self_attn.q_proj.bias" in narrow
    assert "visual.blocks.0.mlp.down_proj.kernel" in narrow and "visual.merger.mlp_0.kernel" in narrow
    assert "language_model.embed_tokens.embedding" in narrow
    assert not any(n.endswith("scale") or n.startswith(("classifier", "visual.patch_embed")) for n in narrow), narrow
    assert "classifier.kernel" in {".".join(map(str, _path_names(p))) for p, _ in
                                   jax.tree_util.tree_flatten_with_path(dtypes)[0]}  # the float32 head is there
    cfg = model.config.vision
    pixels = _pixels(16, cfg.frame_dim)  # one frame per patch: the kernel summed over time in float32
    np.testing.assert_array_equal(_forward(graphdef, cast_to(params, dtypes), pixels),
                                  _forward(graphdef, params, pixels))


def test_compute_copy_check_fails_when_a_weight_used_in_float32_is_cast(monkeypatch):
    """Negative control of the test above: the patch embedding cast to bf16 before its float32 sum changes the
    logits, so the comparison can see a wrong choice."""
    model = _model("bfloat16")
    graphdef, params = nnx.split(model)
    monkeypatch.setattr(PatchEmbed, "reads_weights_of", ())
    dtypes = compute_dtypes(model, params)
    pixels = _pixels(16, model.config.vision.frame_dim)
    assert not np.array_equal(_forward(graphdef, cast_to(params, dtypes), pixels), _forward(graphdef, params, pixels))


@pytest.mark.parametrize("strategy,devices,dtype,kept", [
    ("zero2", 8, "bfloat16", True), ("fsdp", 2, "bfloat16", True),
    ("dp", 8, "bfloat16", False), ("zero2", 1, "bfloat16", False), ("zero2", 8, "float32", False)])
def test_a_compute_copy_is_kept_where_it_saves_memory(strategy, devices, dtype, kept):
    """zero2/fsdp on several devices with a narrower compute dtype; not under dp (everything whole), on one device
    (the master weights are whole there: the copy would only add) or without a narrower dtype."""
    model = _model(dtype)
    _, params = nnx.split(model)
    layout = types.SimpleNamespace(strategy=strategy, axis_size=devices)
    assert keeps_compute_copy(layout, params, compute_dtypes(model, params)) is kept
