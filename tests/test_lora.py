"""LoRA: which layers get adapters, their initial weights, their PEFT names, and the adapted JAX layer's math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qvl_core import lora
from qvl_core.model_config import QwenVLConfig
from qvl_jax import param_map
from qvl_jax.classifier import QwenVLClassifier
from qvl_jax.lora import add_adapters, linear_layers
from qvl_jax.options import RuntimeOptions
from tests.train_helpers import TINY_MODEL

GRID = (1, 4, 4)


def _model():
    cfg = QwenVLConfig.from_hf_dict(TINY_MODEL).with_head(num_labels=3)
    return QwenVLClassifier(cfg, opts=RuntimeOptions(), rngs=nnx.Rngs(0))


def test_targets_pick_decoder_layers_and_vision_blocks_on_request():
    names = list(linear_layers(_model()))
    spec = lora.LoraSpec(rank=4, alpha=8)
    chosen = lora.targeted(names, spec)
    assert TINY_MODEL["text_config"]["num_hidden_layers"] == 1
    assert len(chosen) == 7 and all(n.startswith("model.layers.0.") for n in chosen)
    assert "model.layers.0.self_attn.q_proj" in chosen and "model.layers.0.mlp.down_proj" in chosen
    with_vision = lora.targeted(names, lora.LoraSpec(rank=4, alpha=8, vision=True))
    vision = [n for n in with_vision if n.startswith("visual.")]
    assert "visual.blocks.0.attn.qkv" in vision and "visual.blocks.0.attn.proj" in vision
    assert "visual.blocks.0.mlp.up_proj" in vision and not any("merger" in n for n in with_vision)
    # a regular expression, matched whole
    only_q = lora.targeted(names, lora.LoraSpec(rank=4, alpha=8, targets=(r"model\.layers\.0\..*q_proj",)))
    assert only_q == ["model.layers.0.self_attn.q_proj"]


def test_a_target_that_matches_nothing_is_an_error_naming_it():
    names = list(linear_layers(_model()))
    with pytest.raises(lora.LoraError, match=r"model\.lora\.targets: 'qproj' matches no linear layer"):
        lora.targeted(names, lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "qproj")))
    with pytest.raises(lora.LoraError, match="'attn.qkv' matches no"):  # a vision name without vision: true
        lora.targeted(names, lora.LoraSpec(rank=4, alpha=8, targets=("attn.qkv",)))


def test_initial_a_is_peft_default_and_reproducible():
    spec = lora.LoraSpec(rank=8, alpha=16, seed=3)
    a = lora.initial_a("model.layers.0.self_attn.q_proj", 64, spec)
    assert a.shape == (8, 64) and a.dtype == np.float32 and np.abs(a).max() <= 1 / 8
    assert np.array_equal(a, lora.initial_a("model.layers.0.self_attn.q_proj", 64, spec))
    assert not np.array_equal(a, lora.initial_a("model.layers.0.self_attn.k_proj", 64, spec))
    assert lora.peft_keys("model.layers.0.self_attn.q_proj")[0] == \
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_param_map_names_adapters_as_peft_does():
    path = "language_model.layers.1.mlp.up_proj.lora_a"
    hf, kind = param_map.jax_to_hf(path)
    assert hf == "model.layers.1.mlp.up_proj.lora_A.weight" and kind == "linear"
    assert param_map.hf_to_jax(hf) == (path, "linear")
    assert param_map.hf_to_jax("visual.blocks.0.attn.qkv.lora_B.weight") == ("visual.blocks.0.attn.qkv.lora_b",
                                                                               "linear")


def test_an_adapted_model_starts_as_the_base_and_computes_w_plus_scaled_ab():
    model = _model()
    graphdef, base_params = nnx.split(model)
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, model.config.vision.frame_dim)), jnp.float32)

    def logits(m):
        return np.asarray(m(pixels, GRID).logits)

    before = logits(model)
    spec = lora.LoraSpec(rank=4, alpha=8)
    names = add_adapters(model, spec)
    assert len(names) == 7 and np.array_equal(logits(model), before)  # B = 0: the base model's logits
    # with B drawn, the adapted layer equals a plain layer whose kernel is W + (alpha / r) * A @ B
    layers = linear_layers(model)
    rng = np.random.default_rng(1)
    for name in names:
        layer = layers[name]
        layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.05, jnp.float32)
    adapted = logits(model)
    assert not np.allclose(adapted, before, atol=1e-3)
    merged = nnx.merge(graphdef, base_params)
    merged_layers = linear_layers(merged)
    for name in names:
        layer = layers[name]
        delta = lora.scaling(spec) * (layer.lora_a[...] @ layer.lora_b[...])
        merged_layers[name].kernel[...] = layer.kernel[...] + delta
    np.testing.assert_allclose(logits(merged), adapted, rtol=1e-5, atol=1e-5)
    assert jax.tree.leaves(nnx.state(model, nnx.LoRAParam))  # the adapters are LoRAParams (an nnx filter)
