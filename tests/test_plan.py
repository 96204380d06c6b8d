"""`python -m qvl_jax.plan`: the trainer's step compiled for GPUs on this CPU machine (JAX's CUDA plugin, no GPU)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from qvl_core import gpus
from qvl_core.config import load_config
from qvl_core.known_models import known_config
from qvl_jax import plan as plan_lib
from tests.train_helpers import TINY_MODEL, tiny_config, write_config

# The tiny model with head dims of 16 (cuDNN's fused attention needs multiples of 8).
CUDNN_MODEL = {**TINY_MODEL,
               "vision_config": {**TINY_MODEL["vision_config"], "hidden_size": 32, "num_heads": 2},
               "text_config": {**TINY_MODEL["text_config"], "hidden_size": 32, "num_attention_heads": 2}}


def _config(tmp_path, **sections):
    raw = tiny_config(tmp_path, **sections)
    raw["model"] = {**raw["model"], "config": CUDNN_MODEL, "num_labels": 3}
    for key, value in sections.get("model", {}).items():
        raw["model"][key] = value
    return write_config(tmp_path, raw)


def test_gpu_table_and_names():
    assert gpus.gpu("H100").name == "NVIDIA H100 80GB HBM3" and gpus.key("h200") == "h200-141gb"
    assert set(gpus.GPUS) >= {"h100-80gb", "h200-141gb", "a100-80gb", "a100-40gb", "l40s"}
    with pytest.raises(ValueError, match="unknown GPU 'v100'; known: h100-80gb, h200-141gb"):
        gpus.gpu("v100")
    text = gpus.gpu("a100-40gb").target_config(cudnn=(9, 8), cuda=(12, 9))
    assert "core_count: 108" in text and "device_memory_size: 42949672960" in text and "major: 8 minor: 0" in text


def test_known_model_configs_match_on_the_name(tmp_path):
    assert known_config("/models/Qwen2.5-VL-7B-Instruct")[1]["hidden_size"] == 3584
    raw = tiny_config(tmp_path)
    raw["model"] = {"pretrained_name": "/models/Qwen2.5-VL-7B-Instruct", "num_labels": 101}
    cfg, source = plan_lib.model_config(load_config(write_config(tmp_path, raw)))
    assert source == "qvl_core/known_models/Qwen2.5-VL-7B-Instruct.json"
    assert (cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.vision.depth, cfg.head.num_labels) == (3584, 28, 32, 101)
    assert known_config("Qwen/qwen2.5-vl-72b-instruct/")[1]["num_hidden_layers"] == 80
    with pytest.raises(ValueError, match="'/models/llava-7b' is not a local directory"):
        known_config("/models/llava-7b")


def test_find_max_batch_compiles_few_and_finds_the_boundary():
    """On an affine memory curve with a bump, the search returns exactly what checking every batch would."""
    @dataclasses.dataclass
    class P:
        total: int
        usable: int

        @property
        def fits(self):
            return self.total <= self.usable

    for usable in (5, 100, 1003, 5000, 9000, 10**6):
        calls = []

        def plan_at(b, usable=usable):
            calls.append(b)
            return P(total=40 + 9 * b + (7 if b % 5 == 0 else 0), usable=usable)

        best, totals = plan_lib.find_max_batch(plan_at, limit=1024)
        brute = max((b for b in range(1, 1025) if plan_at(b).fits), default=None)
        assert best == brute, (usable, best, brute)
        assert len(totals) <= 8, (usable, sorted(totals))

    # steeper past a kink (XLA's rematerialisation giving up, as the 3B step does past ~30 per device): the line
    # from below overshoots, and the search must not then walk down one batch per compile
    for usable in (60, 75, 90, 140):
        def kinked(b, usable=usable):
            return P(total=int(20 + 1.2 * b if b <= 30 else 56 + 3.5 * (b - 30)), usable=usable)

        best, totals = plan_lib.find_max_batch(kinked, limit=1024)
        brute = max((b for b in range(1, 1025) if kinked(b).fits), default=None)
        assert best == brute and len(totals) <= 8, (usable, best, brute, sorted(totals))


def test_plan_of_the_tiny_model_for_two_h100(tmp_path, capsys):
    path = _config(tmp_path, model={"compute_dtype": "bfloat16"}, sharding={"strategy": "zero2", "min_shard_size": 1})
    out = tmp_path / "plan.json"
    rc = plan_lib.main(["--config", str(path), "--gpu", "h100", "--devices", "2", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["gpu"] == "h100-80gb" and result["devices"] == 2 and result["fits"] is True
    b = result["per_device_bytes"]
    assert b["card"] == 81559 * 2**20 and b["usable"] == int(b["card"] * gpus.USABLE_FRACTION)
    assert b["total"] == b["arguments"] + result["outputs_bytes"] - result["aliased_bytes"] + b["temporaries"]
    # bf16 zero2 (DeepSpeed's layout): the float32 master weights, AdamW's two moments and the gradients split in
    # two; the compute copy whole, bf16 where the model casts (the tiny model's float32 norms, patch embedding and
    # head are a large share of it)
    params = result["params"]
    assert abs(b["master_params"] - 2 * params) < 0.02 * 2 * params
    assert abs(b["optimizer"] - 4 * params) < 0.02 * 4 * params
    assert abs(b["gradients"] - 2 * params) < 0.02 * 2 * params
    assert 2 * params < b["compute_params"] < 3 * params
    assert b["arguments"] >= b["compute_params"] + b["master_params"] + b["optimizer"]
    # the gather after the update moves the compute copy (bf16 where narrower), not float32 weights
    assert 0 < result["collectives"]["all-gather"]["bytes"] <= 1.05 * b["compute_params"] < 4 * params
    # bf16 attention on Hopper: cuDNN's fused kernel, forward and backward, for every block and layer
    assert result["cudnn_attention_calls"] > 0 and result["xla_attention_calls"] == 0
    assert result["collectives"]["reduce-scatter"]["count"] + result["collectives"]["all-reduce"]["count"] > 0
    assert result["deepspeed_zero2"]["bytes_per_device"] == 2 * params + 18 * params // 2
    assert "fits: yes" in text and "NVIDIA H100 80GB HBM3" in text and "DeepSpeed" in text


def test_fsdp_compiles_with_cudnn_when_the_devices_do_not_divide_the_heads(tmp_path):
    """7B's pattern (28 heads, 4 KV heads on 8 devices) at tiny size: 6 heads and 2 KV heads on 4 devices. fsdp
    splits o_proj's input dimension (heads x head_dim) over the devices; without the attention operands pinned to
    a split over examples, XLA carried that split into the heads and cuDNN's partitioner refused it."""
    model = {**CUDNN_MODEL, "vision_config": {**CUDNN_MODEL["vision_config"], "out_hidden_size": 96},
             "text_config": {**CUDNN_MODEL["text_config"], "hidden_size": 96, "num_attention_heads": 6,
                             "num_key_value_heads": 2}}
    path = _config(tmp_path, model={"compute_dtype": "bfloat16", "config": model}, training={"batch_size": 2},
                   sharding={"strategy": "fsdp", "min_shard_size": 1})
    config = load_config(path)
    planned = plan_lib.plan_step(config, plan_lib.Target("h100-80gb", 4))
    assert planned.plan.fits and planned.plan.cudnn_attention_calls > 0 and planned.plan.xla_attention_calls == 0


def test_plan_in_float32_has_no_cudnn_attention(tmp_path):
    path = _config(tmp_path)
    out = tmp_path / "plan.json"
    assert plan_lib.main(["--config", str(path), "--gpu", "a100-40gb", "--devices", "1", "--no-deepspeed",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["cudnn_attention_calls"] == 0 and result["xla_attention_calls"] > 0


def test_max_batch_and_what_to_change_when_nothing_fits(tmp_path, monkeypatch, capsys):
    # the vision tower alone, one block: the smallest program, as this test compiles ~9 of them
    one_block = {**CUDNN_MODEL, "vision_config": {**CUDNN_MODEL["vision_config"], "depth": 1,
                                                  "fullatt_block_indexes": [0]}}
    path = _config(tmp_path, model={"compute_dtype": "bfloat16", "mode": "vision", "config": one_block},
                   sharding={"strategy": "dp"})
    config = load_config(path)
    target = plan_lib.Target("l40s", 1)
    one, two = (plan_lib.plan_step(config, target, batch_size=b).plan.total for b in (1, 2))
    # A card whose usable memory holds batch 2 of this step, not the config's 4 (the growth is below linear).
    per_example = two - one
    usable = one + int(1.5 * per_example)
    monkeypatch.setattr(gpus.GpuSpec, "usable_bytes", property(lambda self: usable))
    out = tmp_path / "plan.json"
    rc = plan_lib.main(["--config", str(path), "--gpu", "l40s", "--devices", "1", "--max-batch", "--no-deepspeed",
                        "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result["fits"] is False  # the config's batch of 4 does not fit
    totals = {int(b): v for b, v in result["max_batch_totals"].items()}
    assert result["max_batch"] in (2, 3) and totals[result["max_batch"]] <= usable
    assert totals[result["max_batch"] + 1] > usable
    assert f"largest batch per device that fits: {result['max_batch']}" in capsys.readouterr().out

    # Nothing fits: each change planned at batch 1.
    monkeypatch.setattr(gpus.GpuSpec, "usable_bytes", property(lambda self: one // 2))
    rc = plan_lib.main(["--config", str(path), "--gpu", "l40s", "--devices", "1", "--max-batch", "--no-deepspeed",
                        "--json", str(out)])
    result = json.loads(out.read_text())
    assert rc == 1 and result["max_batch"] is None
    changes = {a["change"]: a["total_bytes"] for a in result["alternatives"]}
    assert list(changes) == ["training.gradient_checkpointing=true", "sharding.strategy=fsdp", "--devices 2",
                             "model.freeze_vision=true", "data.image_size=[28, 28]"]
    assert changes["data.image_size=[28, 28]"] < one and changes["model.freeze_vision=true"] < one
    assert changes["--devices 2"] >= one  # dp replicates everything: more devices do not help
    assert "batch 1 does not fit" in capsys.readouterr().out


def test_plan_errors_are_one_line(tmp_path, capsys):
    path = _config(tmp_path)
    assert plan_lib.main(["--config", str(path), "--gpu", "v100"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown GPU 'v100'")
    assert plan_lib.main(["--config", str(path), "--devices", "3", "--hosts", "2"]) == 2
    assert "--devices 3 must be a positive multiple of --hosts 2" in capsys.readouterr().err
    raw = tiny_config(tmp_path)
    raw["model"] = {"pretrained_name": str(tmp_path / "nowhere" / "my-model")}
    assert plan_lib.main(["--config", str(write_config(tmp_path, raw, "bad.yaml"))]) == 2
    assert "does not match a known Qwen2.5-VL size" in capsys.readouterr().err


def test_a_step_xla_cannot_compile_is_one_line(tmp_path, monkeypatch, capsys):
    import jax

    from qvl_jax import memory

    def refuse(*a, **k):  # what XLA raised for 7B under fsdp on 8 devices with cuDNN attention (see the README)
        raise jax.errors.JaxRuntimeError("INTERNAL: custom_partitioner: Traceback (most recent call last):\n  ...\n"
                                         "IndivisibleError: dim_size=4 is not divisible by axis_size=8.")

    monkeypatch.setattr(memory, "compile_step", refuse)
    assert plan_lib.main(["--config", str(_config(tmp_path)), "--devices", "8"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: the train step does not compile for 8 x h100-80gb: IndivisibleError: dim_size=4 is not divisible by "
        "axis_size=8.")


def test_without_the_cuda_plugin_the_error_names_the_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "jax_plugins.xla_cuda12" else real(name, *a))
    monkeypatch.setattr(plan_lib, "_TOPOLOGIES", {})
    assert plan_lib.main(["--config", str(_config(tmp_path)), "--gpu", "a100-80gb", "--devices", "1"]) == 2
    assert "pip install -e '.[cuda]'" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["3B", "7B"])
def test_real_shapes_compile_for_an_h100(tmp_path, size):
    """The published 3B and 7B layer shapes (widths, heads, KV heads, windows; one small step: 56 px, batch 1)
    compile for an H100 with cuDNN attention. Two decoder layers and two vision blocks (one windowed, one with
    full attention) stand for the 36/28 and 32 of the real models: every layer of a kind has the same shapes, and
    the whole depth compiles in ~2 minutes each (`python -m qvl_jax.plan` on the seed configs, README)."""
    from tests.test_eval_shape import _hf_param_count

    flat = known_config(f"Qwen2.5-VL-{size}-Instruct")[1]
    shallow = {**flat, "num_hidden_layers": 2,
               "vision_config": {**flat["vision_config"], "depth": 2, "fullatt_block_indexes": [1]}}
    raw = tiny_config(tmp_path)
    raw["model"] = {"config": shallow, "num_labels": 101, "compute_dtype": "bfloat16", "freeze_decoder": True}
    raw["training"].update(batch_size=1)
    config = load_config(write_config(tmp_path, raw))
    planned = plan_lib.plan_step(config, plan_lib.Target("h100-80gb", 1))
    hidden = flat["hidden_size"]
    assert planned.params == _hf_param_count(shallow)[0] + hidden * 101 + 101  # transformers' count, and the head
    p = planned.plan
    assert p.fits and p.cudnn_attention_calls > 0 and p.xla_attention_calls == 0
    # the frozen decoder has no optimizer state: AdamW holds two float32 moments of the vision tower and head
    assert p.optimizer == pytest.approx(8 * planned.trainable, rel=1e-3)
    assert planned.trainable < planned.params - 2 * hidden * flat["intermediate_size"] * 3
    assert np.isclose(p.master_params, 4 * planned.params, rtol=1e-6)
