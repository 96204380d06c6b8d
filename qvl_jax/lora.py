"""LoRA adapters on the model's `Linear` layers (which layers and their initial weights: `qvl_core.lora`).

    names = add_adapters(model, spec)   # lora_a / lora_b (nnx.LoRAParam) on each targeted layer; HF module names

An adapted layer computes `base(x) + scaling * (x @ A @ B)` (`qvl_jax.linear.Linear`); B starts at zero, so
the adapted model starts as the base model. Parameter paths are the layer's plus `lora_a` / `lora_b`, which
`qvl_jax.param_map` names as PEFT does (`<module>.lora_A.weight`, `<module>.lora_B.weight`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from qvl_core import lora
from qvl_core.parts import is_adapter, module_layout_key
from qvl_jax import param_map
from qvl_jax.linear import Linear


def linear_layers(model) -> dict[str, Linear]:
    """HF module name -> `Linear`, for every linear layer with an HF name."""
    out = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            mapped = param_map.jax_to_hf(".".join(map(str, path)) + ".kernel")
            if mapped is not None:
                out[mapped[0].removesuffix(".weight")] = module
    return out


def add_adapters(model, spec: lora.LoraSpec) -> list[str]:
    """Adds an adapter (A from `qvl_core.lora.initial_a`, B zero, in the layer's parameter dtype) to each layer
    `spec` targets; returns their HF module names. Raises `qvl_core.lora.LoraError` for a target that matches
    nothing."""
    if spec.dropout:
        raise lora.LoraError("model.lora.dropout: only 0.0 is supported so far")
    layers = linear_layers(model)
    names = lora.targeted(layers, spec)
    for name in names:
        layer = layers[name]
        dtype = layer.param_dtype
        layer.lora_a = nnx.LoRAParam(jnp.asarray(lora.initial_a(name, layer.in_features, spec).T, dtype))
        layer.lora_b = nnx.LoRAParam(jnp.zeros((spec.rank, layer.out_features), dtype))
        layer.lora_scaling = lora.scaling(spec)
    return names


def merge_adapters(model) -> list[str]:
    """Folds each adapter into its layer (`W + scaling * A @ B`, in float32) and removes it, in place: the model
    an HF checkpoint of the fine-tuned classifier holds. Returns the merged layers' HF names."""
    merged = []
    for name, layer in linear_layers(model).items():
        if layer.lora_a is None:
            continue
        a, b = (jnp.asarray(p[...], jnp.float32) for p in (layer.lora_a, layer.lora_b))
        layer.kernel = nnx.Param(jnp.asarray(layer.kernel[...], jnp.float32) + layer.lora_scaling * (a @ b))
        layer.lora_a = layer.lora_b = None
        merged.append(name)
    return merged


def save_adapter(model, path, *, spec: lora.LoraSpec, fully_trained: list[str], base_model: str | None,
                 meta: dict | None = None) -> Path:
    """Writes the model's adapters as PEFT does (`qvl_core.lora`: adapter_config.json, adapter_model.safetensors,
    float32), with the weights of the modules in `fully_trained` (hub-layout prefixes such as `classifier`,
    `visual.merger`) whole under `modules_to_save`; `meta` goes to qvl_classifier.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors, adapted = {}, []
    for name, layer in linear_layers(model).items():
        if layer.lora_a is None:
            continue
        torch_name = module_layout_key(name)
        key_a, key_b = lora.peft_keys(torch_name)
        tensors[key_a] = np.ascontiguousarray(_host(layer.lora_a).T)  # [r, in] (a transposed view would be
        tensors[key_b] = np.ascontiguousarray(_host(layer.lora_b).T)  # [out, r]  written in memory order)
        adapted.append(torch_name)
    if not adapted:
        raise lora.LoraError("the model has no LoRA adapters to save")
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        hit = param_map.jax_to_hf(".".join(map(str, p)))
        if hit is None or is_adapter(hit[0]) or not hit[0].startswith(tuple(m + "." for m in fully_trained)):
            continue
        key, kind = hit
        tensors["base_model.model." + module_layout_key(key)] = np.ascontiguousarray(
            param_map.to_hf(kind, _host(var)))
    save_file(tensors, str(path / lora.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = lora.adapter_config(spec, adapted, [module_layout_key(m) for m in fully_trained], base_model)
    (path / lora.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if meta is not None:
        (path / lora.ADAPTER_META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def _host(var) -> np.ndarray:
    return np.asarray(jax.device_get(var.get_value()), np.float32)


def apply_adapter(model, adapter: lora.Adapter) -> list[str]:
    """Puts a read adapter (`qvl_core.lora.read_adapter`) on `model`, in place: its LoRA weights on their layers
    and its `modules_to_save` weights over the base's. Returns the adapted layers' names. Raises
    `qvl_core.lora.LoraError` naming the adapter file for a module the model lacks or a shape it does not have."""
    where = adapter.path / lora.ADAPTER_WEIGHTS
    layers = linear_layers(model)
    params = nnx.state(model, nnx.Param)
    slots = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(params)}
    problems = []
    for module, (a, b) in adapter.lora.items():
        layer = layers.get(module)
        if layer is None:
            problems.append(f"{module}: no such linear layer in the model")
        elif a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
            problems.append(f"{module}: adapter [{b.shape[0]} x {a.shape[1]}] (out x in), the model's layer "
                            f"[{layer.out_features} x {layer.in_features}]")
    for key, array in adapter.saved.items():
        hit = param_map.hf_to_jax(key)
        slot = slots.get(hit[0]) if hit else None
        if slot is None:
            problems.append(f"{key}: no such weight in the model")
        elif param_map.to_jax(hit[1], array).shape != slot.shape:
            problems.append(f"{key}: adapter {tuple(array.shape)}, the model's "
                            f"{tuple(param_map.to_hf(hit[1], np.empty(slot.shape, np.uint8)).shape)}")
    if problems:
        shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise lora.LoraError(f"{where} does not fit this base model:\n  " + "\n  ".join(shown))
    for module, (a, b) in adapter.lora.items():
        layer = layers[module]
        layer.lora_a = nnx.LoRAParam(jnp.asarray(a.T, layer.param_dtype))
        layer.lora_b = nnx.LoRAParam(jnp.asarray(b.T, layer.param_dtype))
        layer.lora_scaling = adapter.scaling
    for key, array in adapter.saved.items():
        jax_path, kind = param_map.hf_to_jax(key)
        slots[jax_path].set_value(jnp.asarray(param_map.to_jax(kind, array), slots[jax_path].dtype))
    nnx.update(model, params)
    return sorted(adapter.lora)
