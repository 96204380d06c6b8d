"""load_hf / save_hf on the directory shapes users have, and the errors bad ones give."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import qvl_jax
from parity_tests.tiny import grid_for, make_checkpoint, random_batch
from qvl_core.hf_checkpoint import CheckpointError

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("base"), num_labels=3, seed=5)


@pytest.fixture(scope="module")
def batch():
    return random_batch([grid_for(56, 84)] * 2, seed=3)


def _logits(model, batch):
    pix, grids = batch
    return np.asarray(model(jnp.asarray(pix), grids).logits)


@pytest.fixture(scope="module")
def base_logits(base, batch):
    return _logits(qvl_jax.load_hf(base), batch)


@pytest.mark.parametrize("variant", [
    dict(flat_config=True),
    dict(layout="new"),
    dict(max_shard_size="40KB"),
    dict(dtype="bfloat16"),
])
def test_checkpoint_variants_load_to_the_same_model(tmp_path, variant, batch, base_logits):
    ckpt = make_checkpoint(tmp_path / "v", num_labels=3, seed=5, **variant)
    if "max_shard_size" in variant:
        assert (ckpt / "model.safetensors.index.json").exists()
        assert len(list(ckpt.glob("model-*.safetensors"))) > 2
    logits = _logits(qvl_jax.load_hf(ckpt), batch)
    tol = 2e-2 if variant.get("dtype") == "bfloat16" else 1e-6  # bf16 on disk rounds the weights
    np.testing.assert_allclose(logits, base_logits, rtol=tol, atol=tol)


def test_flat_config_reads_the_same_config(tmp_path, base):
    flat = make_checkpoint(tmp_path / "flat", num_labels=3, seed=5, flat_config=True)
    assert qvl_jax.read_config(flat)[0] == qvl_jax.read_config(base)[0]


def test_stored_head_is_loaded_and_mismatched_num_labels_is_an_error(base):
    model = qvl_jax.load_hf(base)
    with safe_open(base / "model.safetensors", "np") as f:
        np.testing.assert_array_equal(np.asarray(model.classifier.kernel.get_value()), f.get_tensor("classifier.weight").T)
    assert model.config.head.id2label == ("class_0", "class_1", "class_2")
    with pytest.raises(CheckpointError, match="stored classification head has 3 labels but num_labels=101"):
        qvl_jax.load_hf(base, num_labels=101)


def test_the_head_stays_float32_in_a_bfloat16_model(base, tmp_path):
    # A bfloat16 head weight would add its rounding error to the logits and every gradient (README: Numerics).
    model = qvl_jax.load_hf(base, dtype="bfloat16")
    assert model.visual.blocks[0].attn.qkv.kernel.get_value().dtype == jnp.bfloat16
    with safe_open(base / "model.safetensors", "np") as f:
        stored = f.get_tensor("classifier.weight").T
    head = model.classifier.kernel.get_value()
    assert head.dtype == jnp.float32 and model.classifier.bias.get_value().dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(head), stored)  # not rounded through bfloat16
    fresh = qvl_jax.load_hf(make_checkpoint(tmp_path / "nohead", seed=2), dtype="bfloat16", num_labels=4)
    assert fresh.classifier.kernel.get_value().dtype == jnp.float32
    assert fresh.classifier.bias.get_value().dtype == jnp.float32


def test_no_head_and_no_num_labels_gives_a_backbone(tmp_path, batch):
    ckpt = make_checkpoint(tmp_path / "nohead", seed=2)
    model = qvl_jax.load_hf(ckpt)
    out = model(jnp.asarray(batch[0]), batch[1])
    assert out.logits is None and out.pooled.shape == (2, model.config.text.hidden_size)
    headed = qvl_jax.load_hf(ckpt, num_labels=9, head_seed=4)
    again = qvl_jax.load_hf(ckpt, num_labels=9, head_seed=4)
    np.testing.assert_array_equal(np.asarray(headed.classifier.kernel.get_value()),
                                  np.asarray(again.classifier.kernel.get_value()))


def _rewrite(ckpt, fn):
    tensors = load_file(ckpt / "model.safetensors")
    fn(tensors)
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_keys_are_one_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "bad", seed=1)

    def damage(t):
        del t["visual.blocks.0.attn.qkv.bias"]
        t["model.layers.0.mlp.extra.weight"] = np.zeros((2, 2), np.float32)
        t["model.norm.weight"] = np.zeros((7,), np.float32)

    _rewrite(ckpt, damage)
    with pytest.raises(CheckpointError) as e:
        qvl_jax.load_hf(ckpt)
    msg = str(e.value)
    assert "missing (1): visual.blocks.0.attn.qkv.bias" in msg
    assert "unexpected (1): model.layers.0.mlp.extra.weight" in msg
    assert "wrong shape (1): model.norm.weight: checkpoint (7,), model expects (48,)" in msg


@pytest.mark.parametrize("case,match", [
    ("no_dir", "does not exist"),
    ("no_config", "config.json is missing"),
    ("no_weights", "no model.safetensors or model.safetensors.index.json"),
    ("not_qwen", "model_type is 'llama'"),
    ("bad_mrope", "mrope_section"),
])
def test_bad_directories_give_clear_errors(tmp_path, case, match):
    ckpt = make_checkpoint(tmp_path / "c", seed=1)
    cfg = json.loads((ckpt / "config.json").read_text())
    if case == "no_dir":
        ckpt = tmp_path / "nowhere"
    elif case == "no_config":
        (ckpt / "config.json").unlink()
    elif case == "no_weights":
        (ckpt / "model.safetensors").unlink()
    elif case == "not_qwen":
        cfg["model_type"] = "llama"
    elif case == "bad_mrope":
        cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 3]
    if case in ("not_qwen", "bad_mrope"):
        (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        qvl_jax.load_hf(ckpt)


def test_jax_hf_jax_round_trip_gives_identical_logits(tmp_path, base, batch, base_logits):
    model = qvl_jax.load_hf(base)
    out = qvl_jax.save_hf(model, tmp_path / "export")
    again = qvl_jax.load_hf(out)
    np.testing.assert_array_equal(_logits(again, batch), base_logits)
    assert again.config == model.config
    sharded = qvl_jax.save_hf(model, tmp_path / "sharded", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").exists()
    np.testing.assert_array_equal(_logits(qvl_jax.load_hf(sharded), batch), base_logits)


def test_export_loads_in_transformers_and_qvl_torch(tmp_path, base, batch, base_logits):
    import torch
    from transformers import Qwen2_5_VLModel

    import qvl_torch
    from parity_tests.compare import rel_l2
    out = qvl_jax.save_hf(qvl_jax.load_hf(base), tmp_path / "export")
    _, info = Qwen2_5_VLModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert info["unexpected_keys"] <= {"classifier.weight", "classifier.bias"}
    tm = qvl_torch.load_pretrained(out)
    with torch.no_grad():
        t = tm(torch.from_numpy(batch[0]), batch[1]).logits.numpy()
    assert rel_l2(base_logits, t) <= 1e-4


@pytest.mark.parametrize("variant", [dict(layout="new"), dict(layout="new", max_shard_size="40KB")])
def test_qvl_torch_loads_the_newer_key_layout(tmp_path, variant, batch, base_logits):
    # transformers alone loads `model.visual.*` into a bare Qwen2_5_VLModel as `model.language_model.visual.*`,
    # leaving the vision tower random (a warning, no error); qvl_torch maps the keys and checks the load.
    import torch

    import qvl_torch
    from parity_tests.compare import rel_l2
    ckpt = make_checkpoint(tmp_path / "v", num_labels=3, seed=5, **variant)
    with torch.no_grad():
        t = qvl_torch.load_pretrained(ckpt)(torch.from_numpy(batch[0]), batch[1]).logits.numpy()
    assert rel_l2(base_logits, t) <= 1e-4


def test_qvl_torch_refuses_a_checkpoint_with_missing_weights(tmp_path):
    import qvl_torch
    ckpt = make_checkpoint(tmp_path / "bad", seed=1, num_labels=3)
    _rewrite(ckpt, lambda t: t.pop("visual.blocks.0.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match=r"missing \['visual.blocks.0.attn.qkv.bias'\]"):
        qvl_torch.load_pretrained(ckpt)


def test_vision_mode_export_round_trips(tmp_path, batch):
    ckpt = make_checkpoint(tmp_path / "v", seed=8)
    vis = qvl_jax.load_hf(ckpt, mode="vision", num_labels=4)
    assert vis.language_model is None and vis.config.head.pooling == "mean_image"
    out = qvl_jax.save_hf(vis, tmp_path / "vexport", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "np") as f:
        assert not any(k.startswith("model.") for k in f.keys())
    again = qvl_jax.load_hf(out)
    assert again.config.head.mode == "vision" and again.opts.param_dtype == "float32"
    a = np.asarray(vis(jnp.asarray(batch[0]), batch[1]).logits)
    b = np.asarray(again(jnp.asarray(batch[0]), batch[1]).logits)
    np.testing.assert_allclose(a, b, rtol=3e-2, atol=3e-2)  # exported in bf16
    with pytest.raises(CheckpointError, match="missing"):
        qvl_jax.load_hf(out, mode="vlm")
