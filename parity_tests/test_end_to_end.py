"""The numerical contract end to end: features, hidden states, logits, loss, grads, AdamW."""

import numpy as np
import pytest

from parity_tests import compare


def _failures(results):
    return {k: (r.rel_l2, r.limit) for k, r in results.items() if not r.ok}


def test_float32_gqa_vlm_matches_transformers(gqa_ckpt):
    results = compare.run(gqa_ckpt, dtype="float32", image_sizes=[(140, 252), (56, 56)])
    assert not _failures(results)
    # every quantity the contract names is there, for every batch
    for tag in ("140x252", "56x56", "mixed"):
        for q in ("image_features", "last_hidden_state", "logits"):
            assert f"{q}@{tag}" in results
    assert "loss@140x252" in results
    assert sum(k.startswith("grad/") for k in results) == sum(k.startswith("adamw3/") for k in results) > 60
    n = sum(k.startswith("adamw3/") for k in results)
    assert sum(k.startswith("adamw_update/") for k in results) == sum(k.startswith("adamw_update_eps1e-8/")
                                                                     for k in results) == n


def test_float32_mha_vision_mode_matches_transformers(mha_ckpt):
    results = compare.run(mha_ckpt, dtype="float32", image_sizes=[(252, 140), (112, 168)], mode="vision",
                          num_labels=3)
    assert not _failures(results)
    assert not any("model.layers" in k for k in results)  # the decoder is not part of vision mode


def test_float32_mha_vlm_mean_image_pooling(mha_ckpt):
    from qvl_core.model_config import QwenVLConfig  # noqa: F401  (import check: framework-free)
    results = compare.run(mha_ckpt, dtype="float32", image_sizes=[(84, 308)], num_labels=4, train=False)
    assert not _failures(results)


def test_float32_wider_decoder_with_a_near_zero_gradient(tmp_path):
    """A decoder of width 64 (head_dim 16, the k_proj bias gradient zero up to roundoff), written in bf16.

    With Adam eps 1e-6 this failed adamw3/k_proj.bias at 3.3e-4 (torch eager vs sdpa: 1.6e-4); see ADAMW_EPS.
    """
    from parity_tests.tiny import make_checkpoint
    ckpt = make_checkpoint(tmp_path / "w64", seed=21, num_labels=9, dtype="bfloat16",
                           vision={"depth": 4, "hidden_size": 64, "num_heads": 4, "intermediate_size": 96,
                                   "fullatt_block_indexes": [3], "window_size": 112, "out_hidden_size": 64},
                           text={"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "hidden_size": 64, "intermediate_size": 128,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                                     "mrope_section": [2, 3, 3]}})
    results = compare.run(ckpt, dtype="float32", image_sizes=[(140, 252), (84, 56)])
    assert not _failures(results)


def test_bfloat16_jax_error_within_contract(gqa_ckpt):
    # Every quantity, every tensor, held to the contract as written (batches of 8, gradients stacked
    # over three batches: see compare's docstring for why a bfloat16 comparison needs that much data).
    results = compare.run(gqa_ckpt, dtype="bfloat16", image_sizes=[(140, 252), (56, 56)])
    assert not _failures(results)
    assert sum(k.startswith("grad/") for k in results) == sum(k.startswith("adamw3/") for k in results) > 60


def test_bfloat16_vision_mode(mha_ckpt):
    results = compare.run(mha_ckpt, dtype="bfloat16", image_sizes=[(140, 252)], mode="vision", num_labels=3)
    assert not _failures(results)


def test_comparison_fails_when_one_jax_weight_is_perturbed(gqa_ckpt):
    """The suite can fail: a 1e-3 nudge to one weight of one decoder layer shows up."""
    import jax.numpy as jnp
    sides = compare.Sides(gqa_ckpt, dtype="float32", mode=None, num_labels=None)
    kernel = sides.jax.language_model.layers[1].mlp.down_proj.kernel
    kernel.set_value(kernel.get_value() + 1e-3 * jnp.sign(kernel.get_value()))
    results = compare.run(gqa_ckpt, dtype="float32", image_sizes=[(56, 56)], sides=sides, train=False)
    failed = _failures(results)
    assert "logits@56x56" in failed and "last_hidden_state@56x56" in failed
    assert "image_features@56x56" not in failed  # the vision tower was not touched


def test_gradient_check_fails_when_a_gradient_goes_missing(gqa_ckpt, monkeypatch):
    """Negative control: the final norm's gradient dropped on the JAX side shows up."""
    import jax

    from qvl_jax.state import hf_key

    sides = compare.Sides(gqa_ckpt, dtype="float32", mode=None, num_labels=None)
    grads_state = compare._grads_state

    def drop_norm_gradient(*args):
        loss, grads = grads_state(*args)
        return loss, jax.tree_util.tree_map_with_path(
            lambda path, g: g * 0 if hf_key(path) == "model.norm.weight" else g, grads)

    monkeypatch.setattr(compare, "_grads_state", drop_norm_gradient)
    _, pix, grids = compare.image_batches([(56, 56)], seed=0)[0]
    labels = np.arange(len(grids)) % sides.config.head.num_labels
    _, jax_grads = sides.loss_and_grads_jax(sides.jax, pix, grids, labels)
    _, torch_grads = sides.loss_and_grads_torch(sides.torch, pix, grids, labels)
    failed = {k for k in torch_grads if compare.rel_l2(jax_grads[k], torch_grads[k]) > compare.FP32_LIMIT}
    assert failed == {"model.norm.weight"}


def test_optimizer_check_fails_on_a_wrong_adamw_step(monkeypatch):
    """Negative controls: AdamW with coupled L2 decay instead of decoupled weight decay, and an optimizer that
    leaves the norm scales alone, each fail the update comparison (which a correct AdamW passes), in both
    dtypes' settings and at the default epsilon."""
    import jax
    import optax

    rng = np.random.default_rng(0)
    params = {"model.norm.weight": 1 + 0.1 * rng.standard_normal(48, dtype=np.float32),
              "model.layers.0.mlp.up_proj.weight": 0.1 * rng.standard_normal((80, 48), dtype=np.float32)}
    # gradients of several scales, some elements near zero: 3 steps
    grads = {k: rng.standard_normal((3, *v.shape)).astype(np.float32) * np.float32(1e-3) *
             rng.choice([1e-4, 1e-2, 1.0, 10.0], v.shape).astype(np.float32) for k, v in params.items()}
    for dtype in ("float32", "bfloat16"):
        assert not _failures(compare.optimizer_results(params, grads, dtype))
    a, adamw = compare.ADAMW, compare._jax_adamw
    wrong_steps = {
        "coupled decay": lambda eps: optax.chain(optax.add_decayed_weights(a["weight_decay"]),
                                                 optax.adam(a["lr"], b1=a["b1"], b2=a["b2"], eps=eps)),
        "norms not updated": lambda eps: optax.masked(adamw(eps), lambda p: (
            jax.tree_util.tree_map_with_path(lambda path, _: "norm" not in jax.tree_util.keystr(path), p))),
    }
    for name, tx in wrong_steps.items():
        with monkeypatch.context() as m:
            m.setattr(compare, "_jax_adamw", tx)
            for dtype in ("float32", "bfloat16"):
                failed = _failures(compare.optimizer_results(params, grads, dtype))
                assert {"adamw_update/model.norm.weight", "adamw_update_eps1e-8/model.norm.weight"} <= set(failed), \
                    (name, dtype, failed)


def test_sides_can_be_reused(mha_ckpt):
    """The optimizer comparison trains copies: a second run on the same Sides gives the same numbers."""
    sides = compare.Sides(mha_ckpt, dtype="float32", mode="vision", num_labels=3)
    first, second = (compare.run(mha_ckpt, image_sizes=[(56, 56)], sides=sides) for _ in range(2))
    assert {k: r.rel_l2 for k, r in first.items()} == {k: r.rel_l2 for k, r in second.items()}


@pytest.mark.parametrize("bad", ["1000x56", "56"])
def test_check_cli_rejects_bad_sizes(gqa_ckpt, bad, capsys):
    from parity_tests import check
    with pytest.raises(SystemExit):
        check.main(["--checkpoint", str(gqa_ckpt), "--image-sizes", bad])
