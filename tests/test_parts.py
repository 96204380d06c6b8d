"""The model-part table (`qvl_core.parts`) and the two frameworks that read it."""

import itertools

import pytest

from qvl_core import flops, parts
from qvl_core.config import ModelConfig, TrainingConfig
from qvl_core.model_config import QwenVLConfig
from tests.train_helpers import TINY_MODEL


def test_every_weight_of_the_parameter_table_belongs_to_one_part():
    from qvl_jax import param_map

    owners = {rule.hf: parts.part_of(rule.hf).name for rule in param_map.RULES}
    assert set(owners.values()) == {p.name for p in parts.PARTS}
    assert owners["visual.merger.mlp.0.weight"] == "merger" and owners["model.embed_tokens.weight"] == "decoder"
    # every layout of a checkpoint key, and a torch module's names, land in the same part
    for key in ("model.visual.blocks.0.attn.qkv.weight", "visual.blocks.0.attn.qkv.weight"):
        assert parts.part_of(key).name == "vision_blocks"
    for key in ("model.language_model.layers.0.mlp.up_proj.weight", "language_model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight"):
        assert parts.part_of(key).name == "decoder"
    with pytest.raises(KeyError, match="lm_head.weight.*belongs to no model part"):
        parts.part_of("lm_head.weight")


def test_part_names_are_the_flop_counts_parts():
    cfg = QwenVLConfig.from_hf_dict(TINY_MODEL).with_head(num_labels=3)
    assert list(flops.forward_parts(cfg, (1, 4, 4))) == [p.name for p in parts.PARTS]


def test_both_frameworks_freeze_and_rate_the_same_weights():
    """For every mix of freeze switches: the JAX filter and the torch optimizer train the same HF keys, and the
    vision learning rate goes to the same ones."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qvl_jax.classifier import QwenVLClassifier
    from qvl_jax.state import hf_key, make_optimizer as jax_optimizer, trainable_filter
    from qvl_torch.model import from_config
    from qvl_torch.optim import make_optimizer as torch_optimizer

    cfg = QwenVLConfig.from_hf_dict(TINY_MODEL).with_head(num_labels=3)
    jax_model = QwenVLClassifier(cfg, rngs=nnx.Rngs(0))
    torch_model = from_config(cfg, attn_implementation="eager", seed=0)
    all_keys = {parts.canonical_hf_key(n) for n, _ in torch_model.named_parameters()}
    assert all_keys == {hf_key(path) for path, _ in nnx.to_flat_state(nnx.state(jax_model))}
    seen = set()
    for vision, merger, decoder in itertools.product([False, True], repeat=3):
        model_cfg = ModelConfig(config={}, freeze_vision=vision, freeze_merger=merger, freeze_decoder=decoder)
        _, jax_params, _ = nnx.split(jax_model, trainable_filter(model_cfg), ...)
        jax_trains = {hf_key(path) for path, _ in nnx.to_flat_state(jax_params)}

        class Run:  # what make_optimizer reads of a run config
            model = model_cfg
            training = TrainingConfig(learning_rate=1e-3, vision_learning_rate=1e-4, warmup_steps=0,
                                      lr_schedule="constant", max_grad_norm=None)

        optimizer, _ = torch_optimizer(torch_model, Run, total_steps=10)
        torch_trains = {parts.canonical_hf_key(n) for n, p in torch_model.named_parameters() if p.requires_grad}
        assert jax_trains == torch_trains, (vision, merger, decoder)
        assert torch_trains == {k for k in all_keys if parts.key_trains(k, model_cfg)}
        seen.add(frozenset(torch_trains))
        # The vision rate goes to the same weights: torch's parameter groups, and the size of JAX's first AdamW
        # update for a gradient of ones (Adam's first step moves every element by its learning rate).
        slow = {id(p) for g in optimizer.param_groups if g["initial_lr"] == 1e-4 for p in g["params"]}
        torch_slow = {parts.canonical_hf_key(n) for n, p in torch_model.named_parameters() if id(p) in slow}
        tx, _ = jax_optimizer(Run, jax_params, total_steps=10)
        ones = jax.tree.map(jnp.ones_like, jax_params)
        updates, _ = tx.update(ones, tx.init(jax_params), jax_params)
        steps = {hf_key(path): float(jnp.abs(u.get_value()).max()) for path, u in nnx.to_flat_state(updates)}
        jax_slow = {k for k, step in steps.items() if step == pytest.approx(1e-4, rel=1e-4)}
        assert set(steps) - jax_slow == {k for k, step in steps.items() if step == pytest.approx(1e-3, rel=1e-4)}
        assert torch_slow == jax_slow == {k for k in jax_trains if parts.part_of(k).vision_lr}
    assert len(seen) == 8  # every combination trains a different set of weights
