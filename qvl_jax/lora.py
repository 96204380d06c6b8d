"""LoRA adapters on the model's `Linear` layers (which layers and their initial weights: `qvl_core.lora`).

    names = add_adapters(model, spec)   # lora_a / lora_b (nnx.LoRAParam) on each targeted layer; HF module names

An adapted layer computes `base(x) + scaling * (x @ A @ B)` (`qvl_jax.linear.Linear`); B starts at zero, so
the adapted model starts as the base model. Parameter paths are the layer's plus `lora_a` / `lora_b`, which
`qvl_jax.param_map` names as PEFT does (`<module>.lora_A.weight`, `<module>.lora_B.weight`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from qvl_core import lora
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
