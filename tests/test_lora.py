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
from qvl_jax.state import _path_names, compute_dtypes
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


def test_a_lora_run_trains_adapters_head_and_merger_and_exports_them_merged(tmp_path):
    """A LoRA run (bf16 compute) on an HF base trains exactly the adapters, the head and the merger, holds the
    frozen base in bf16, and its checkpoint, its merged HF export and its PEFT adapter on the base evaluate as the
    run's own last evaluation did."""
    import json

    from qvl_core.config import RunConfig
    from qvl_core.schema import from_dict
    from qvl_jax.evaluate import run_evaluation
    from qvl_jax.train import run
    from tests.train_helpers import tiny_config

    from qvl_jax.hf_io import save_hf

    base = save_hf(QwenVLClassifier(QwenVLConfig.from_hf_dict(TINY_MODEL), rngs=nnx.Rngs(0)), tmp_path / "base")
    config = tiny_config(tmp_path, model={"compute_dtype": "bfloat16", "lora": {"rank": 4, "alpha": 8},
                                          "pretrained_name": str(base), "num_labels": 3},
                         training={"max_steps": 6, "learning_rate": 1e-2,
                                   # remat over a frozen base: nnx.remat failed there (TraceContextError)
                                   "gradient_checkpointing": True})
    del config["model"]["config"]
    result = run(from_dict(RunConfig, config))
    run_dir = tmp_path / "outputs" / "run"
    sharding = json.loads((run_dir / "logs" / "sharding.json").read_text())
    model = _model()
    sizes = {".".join(map(str, p)): v.get_value().size for p, v in nnx.to_flat_state(nnx.state(model))}
    full = sum(v for k, v in sizes.items() if k.startswith(("visual.merger", "classifier")))
    adapters = sum(4 * (layer.in_features + layer.out_features) for name, layer in linear_layers(model).items()
                   if name.startswith("model.layers."))
    assert adapters == 4 * 512 and sharding["trainable_params"] == full + adapters
    assert sharding["frozen_params"] == sum(sizes.values()) - full
    # the frozen base in bf16 where the model casts (its matmul weights; the tiny model's float32 patch embedding
    # is half of its base): the bytes the compute dtypes say
    bf16 = QwenVLClassifier(model.config, opts=RuntimeOptions(dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = compute_dtypes(bf16, nnx.state(bf16))
    held = {".".join(map(str, _path_names(p))): d.itemsize for p, d in jax.tree_util.tree_flatten_with_path(dtypes)[0]}
    expected = sum(sizes[k] * b for k, b in held.items() if not k.startswith(("visual.merger", "classifier")))
    frozen_bytes = sharding["params_bytes_per_device"] - 4 * sharding["trainable_params"]
    assert frozen_bytes == expected < 3.5 * sharding["frozen_params"], (frozen_bytes, expected, sharding)
    assert result["step"] == 6 and result["eval/overall_loss"] < 0.9 * np.log(3)  # it learns (ln 3: chance)
    exported = run_evaluation(run_dir / "hf_final")
    assert exported["eval/overall_accuracy"] == result["eval/overall_accuracy"]
    restored = run_evaluation(run_dir / "checkpoints" / "6")  # the orbax checkpoint, adapters and all
    assert restored["eval/overall_loss"] == pytest.approx(result["eval/overall_loss"], rel=1e-6)
    assert exported["eval/overall_loss"] == pytest.approx(result["eval/overall_loss"], rel=1e-3)
    # the adapter in PEFT's format on its base (named in its adapter_config.json), unmerged: the same evaluation
    adapter = run_evaluation(run_dir / "adapter_final")
    assert adapter["eval/overall_accuracy"] == result["eval/overall_accuracy"]
    assert adapter["eval/overall_loss"] == pytest.approx(result["eval/overall_loss"], rel=1e-3)
    # resuming it without LoRA: an error naming the key, before any state is read
    from qvl_core.schema import SchemaError

    plain = {**config, "model": {k: v for k, v in config["model"].items() if k != "lora"},
             "training": {**config["training"], "max_steps": 8}}
    with pytest.raises(SchemaError, match=r"was trained with model.lora = \{.*\"rank\": 4.*this run has null"):
        run(from_dict(RunConfig, plain), resume_from="auto")


def test_a_lora_target_matching_nothing_stops_the_run_naming_it(tmp_path):
    from qvl_core.config import RunConfig
    from qvl_core.schema import SchemaError, from_dict
    from qvl_jax.train import run
    from tests.train_helpers import tiny_config

    config = tiny_config(tmp_path, model={"lora": {"rank": 4, "targets": ["q_proj", "qkv_proj"]}})
    with pytest.raises(SchemaError, match="model.lora.targets: 'qkv_proj' matches no linear layer"):
        run(from_dict(RunConfig, config))
    with pytest.raises(SchemaError, match="model.lora.rank: must be >= 1"):
        from_dict(RunConfig, tiny_config(tmp_path, model={"lora": {"rank": 0}}))


def test_the_pytorch_trainer_refuses_lora_until_it_has_it(tmp_path):
    from qvl_core.config import RunConfig
    from qvl_core.schema import SchemaError, from_dict
    from qvl_torch.train import setup
    from tests.train_helpers import tiny_config

    with pytest.raises(SchemaError, match="model.lora: the PyTorch trainer has no LoRA yet"):
        setup(from_dict(RunConfig, tiny_config(tmp_path, model={"lora": {"rank": 4}})))


def _adapted_checkpoint(tmp_path, *, vision: bool):
    """A base HF directory (no head) and a model on it with drawn adapters (B not zero), a new head and a changed
    merger: what a LoRA run ends with."""
    from qvl_jax.hf_io import load_hf, save_hf

    cfg = QwenVLConfig.from_hf_dict(TINY_MODEL)
    base = save_hf(QwenVLClassifier(cfg, opts=RuntimeOptions(), rngs=nnx.Rngs(0)), tmp_path / "Tiny-VL-Base")
    model = load_hf(base, num_labels=3, head_seed=5)
    spec = lora.LoraSpec(rank=4, alpha=8, vision=vision)
    names = add_adapters(model, spec)
    rng = np.random.default_rng(2)
    for layer in (linear_layers(model)[n] for n in names):
        layer.lora_b[...] = jnp.asarray(rng.normal(size=layer.lora_b.shape) * 0.05, jnp.float32)
    merger = model.visual.merger.mlp_2.bias
    merger[...] = merger[...] + 0.1
    return base, model, spec, names


@pytest.mark.parametrize("vision", [False, True], ids=["decoder", "decoder+vision"])
def test_a_peft_adapter_reloads_in_jax_and_in_peft_with_the_same_logits(tmp_path, vision):
    """The adapter as PEFT's files: `load_hf(base, adapter=DIR)` and `PeftModel.from_pretrained` on qvl_torch's
    classifier of the same base both give the adapted model's logits (float32, 1e-5), head and merger included;
    and the merged export reads back in JAX and torch to the same logits."""
    import json

    import torch
    from peft import PeftModel

    import qvl_torch
    from qvl_jax.hf_io import load_hf, save_hf
    from qvl_jax.lora import merge_adapters, save_adapter

    base, model, spec, names = _adapted_checkpoint(tmp_path, vision=vision)
    # rows of the processor's width (the frame repeated over time), which transformers' tower takes
    pixels = np.random.default_rng(0).normal(size=(2, 16, model.config.vision.patch_dim)).astype(np.float32)
    expected = np.asarray(model(jnp.asarray(pixels), GRID).logits)
    out = save_adapter(model, tmp_path / "adapter_final", spec=spec, fully_trained=["classifier", "visual.merger"],
                       base_model=str(base), meta={"mode": "vlm", "pooling": "last"})
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["modules_to_save"] == ["classifier", "model.visual.merger"]

    reloaded = load_hf(base, adapter=out)
    assert sorted(n for n, layer in linear_layers(reloaded).items() if layer.lora_a is not None) == sorted(names)
    np.testing.assert_allclose(np.asarray(reloaded(jnp.asarray(pixels), GRID).logits), expected, rtol=1e-5, atol=1e-6)

    torch_model = PeftModel.from_pretrained(qvl_torch.load_pretrained(base, num_labels=3), str(out)).eval()
    adapted = [n for n, m in torch_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert len(adapted) == len(names)
    grid = torch.tensor([GRID, GRID])
    with torch.no_grad():
        peft_logits = torch_model(torch.from_numpy(pixels), grid).logits.numpy()
    np.testing.assert_allclose(peft_logits, expected, rtol=1e-5, atol=1e-5)

    merge_adapters(model)
    merged = save_hf(model, tmp_path / "hf_final")
    np.testing.assert_allclose(np.asarray(load_hf(merged)(jnp.asarray(pixels), GRID).logits), expected,
                               rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch_logits = qvl_torch.load_pretrained(merged)(
            torch.from_numpy(pixels), grid).logits.numpy()
    np.testing.assert_allclose(torch_logits, expected, rtol=1e-5, atol=1e-5)


def test_an_adapter_that_does_not_fit_its_base_is_an_error_naming_the_file(tmp_path):
    import json
    import shutil

    from qvl_jax.hf_io import load_hf, save_hf
    from qvl_jax.lora import save_adapter

    base, model, spec, _ = _adapted_checkpoint(tmp_path, vision=False)
    out = save_adapter(model, tmp_path / "adapter", spec=spec, fully_trained=["classifier"], base_model=str(base))
    config_file = out / lora.ADAPTER_CONFIG
    # another model's name in base_model_name_or_path
    renamed = shutil.copytree(base, tmp_path / "Other-Model")
    with pytest.raises(lora.LoraError, match=r"adapter_config.json: base_model_name_or_path is .*Tiny-VL-Base"):
        load_hf(renamed, adapter=out)
    assert load_hf(renamed, adapter=out, check_base=False).config.head.num_labels == 3
    # a base of the same name whose MLP is narrower: every adapted layer that does not fit is named
    narrow = {**TINY_MODEL, "text_config": {**TINY_MODEL["text_config"], "intermediate_size": 48}}
    other = save_hf(QwenVLClassifier(QwenVLConfig.from_hf_dict(narrow), rngs=nnx.Rngs(0)),
                    tmp_path / "elsewhere" / "Tiny-VL-Base")
    with pytest.raises(lora.LoraError, match=r"adapter_model.safetensors does not fit this base model") as e:
        load_hf(other, adapter=out)
    assert "model.layers.0.mlp.up_proj: adapter [64 x 32] (out x in), the model's layer [48 x 32]" in str(e.value)
    assert "model.layers.0.mlp.down_proj: adapter [32 x 64]" in str(e.value)
    assert "self_attn" not in str(e.value)  # the attention layers fit
    # a rank that is not a positive integer; a file that is not PEFT's
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 0}))
    with pytest.raises(lora.LoraError, match=r"adapter_config.json: r must be a positive integer"):
        load_hf(base, adapter=out)
    config_file.unlink()
    with pytest.raises(lora.LoraError, match=r"not a PEFT adapter directory \(adapter_config.json is missing\)"):
        load_hf(base, adapter=out)
