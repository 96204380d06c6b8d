"""The HF <-> JAX parameter name mapping, as one declarative table.

Each rule pairs an HF key (in the hub's layout: `visual.*`, `model.*`) with the
NNX state path, `*` standing for a layer index, and names the transform that
turns the torch tensor into the JAX array. Other key layouts are rewritten to
the hub's first (`canonical_hf_key`, from `qvl_core.parts`, which also says
which part of the model each key belongs to).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from qvl_core.parts import canonical_hf_key  # noqa: F401  (re-exported: the loaders read any layout)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    jax: str
    kind: str  # "linear" (torch [out, in] <-> [in, out]), "patch_conv" (Conv3d <-> matmul), "copy"


RULES: tuple[Rule, ...] = (
    Rule("visual.patch_embed.proj.weight", "visual.patch_embed.proj.kernel", "patch_conv"),
    Rule("visual.blocks.*.norm1.weight", "visual.blocks.*.norm1.scale", "copy"),
    Rule("visual.blocks.*.norm2.weight", "visual.blocks.*.norm2.scale", "copy"),
    Rule("visual.blocks.*.attn.qkv.weight", "visual.blocks.*.attn.qkv.kernel", "linear"),
    Rule("visual.blocks.*.attn.qkv.bias", "visual.blocks.*.attn.qkv.bias", "copy"),
    Rule("visual.blocks.*.attn.proj.weight", "visual.blocks.*.attn.proj.kernel", "linear"),
    Rule("visual.blocks.*.attn.proj.bias", "visual.blocks.*.attn.proj.bias", "copy"),
    Rule("visual.blocks.*.mlp.gate_proj.weight", "visual.blocks.*.mlp.gate_proj.kernel", "linear"),
    Rule("visual.blocks.*.mlp.gate_proj.bias", "visual.blocks.*.mlp.gate_proj.bias", "copy"),
    Rule("visual.blocks.*.mlp.up_proj.weight", "visual.blocks.*.mlp.up_proj.kernel", "linear"),
    Rule("visual.blocks.*.mlp.up_proj.bias", "visual.blocks.*.mlp.up_proj.bias", "copy"),
    Rule("visual.blocks.*.mlp.down_proj.weight", "visual.blocks.*.mlp.down_proj.kernel", "linear"),
    Rule("visual.blocks.*.mlp.down_proj.bias", "visual.blocks.*.mlp.down_proj.bias", "copy"),
    Rule("visual.merger.ln_q.weight", "visual.merger.ln_q.scale", "copy"),
    Rule("visual.merger.mlp.0.weight", "visual.merger.mlp_0.kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual.merger.mlp_0.bias", "copy"),
    Rule("visual.merger.mlp.2.weight", "visual.merger.mlp_2.kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual.merger.mlp_2.bias", "copy"),
    Rule("model.embed_tokens.weight", "language_model.embed_tokens.embedding", "copy"),
    Rule("model.layers.*.input_layernorm.weight", "language_model.layers.*.input_layernorm.scale", "copy"),
    Rule("model.layers.*.post_attention_layernorm.weight",
         "language_model.layers.*.post_attention_layernorm.scale", "copy"),
    Rule("model.layers.*.self_attn.q_proj.weight", "language_model.layers.*.self_attn.q_proj.kernel", "linear"),
    Rule("model.layers.*.self_attn.q_proj.bias", "language_model.layers.*.self_attn.q_proj.bias", "copy"),
    Rule("model.layers.*.self_attn.k_proj.weight", "language_model.layers.*.self_attn.k_proj.kernel", "linear"),
    Rule("model.layers.*.self_attn.k_proj.bias", "language_model.layers.*.self_attn.k_proj.bias", "copy"),
    Rule("model.layers.*.self_attn.v_proj.weight", "language_model.layers.*.self_attn.v_proj.kernel", "linear"),
    Rule("model.layers.*.self_attn.v_proj.bias", "language_model.layers.*.self_attn.v_proj.bias", "copy"),
    Rule("model.layers.*.self_attn.o_proj.weight", "language_model.layers.*.self_attn.o_proj.kernel", "linear"),
    Rule("model.layers.*.mlp.gate_proj.weight", "language_model.layers.*.mlp.gate_proj.kernel", "linear"),
    Rule("model.layers.*.mlp.up_proj.weight", "language_model.layers.*.mlp.up_proj.kernel", "linear"),
    Rule("model.layers.*.mlp.down_proj.weight", "language_model.layers.*.mlp.down_proj.kernel", "linear"),
    Rule("model.norm.weight", "language_model.norm.scale", "copy"),
    Rule("classifier.weight", "classifier.kernel", "linear"),
    Rule("classifier.bias", "classifier.bias", "copy"),
)

# Keys of a causal-LM checkpoint that a classifier does not use.
IGNORED_HF = (re.compile(r"^lm_head\."),)

def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\*", r"(\d+)") + "$")


_HF_RE = [(_compile(r.hf), r) for r in RULES]
_JAX_RE = [(_compile(r.jax), r) for r in RULES]


# LoRA adapters (`qvl_core.lora`): a `Linear`'s `lora_a [in, r]` / `lora_b [r, out]` beside its kernel, PEFT's
# `<module>.lora_A.weight [r, in]` / `<module>.lora_B.weight [out, r]` beside the module's weight.
_LORA_JAX = {"lora_a": "lora_A", "lora_b": "lora_B"}
_LORA_HF = {v: k for k, v in _LORA_JAX.items()}


def hf_to_jax(hf_key: str) -> tuple[str, str] | None:
    """Canonical HF key -> (JAX path, transform kind), or None when no rule matches."""
    module, _, leaf = hf_key.removesuffix(".weight").rpartition(".")
    if leaf in _LORA_HF and hf_key.endswith(".weight"):
        base = hf_to_jax(module + ".weight")
        return (base[0].removesuffix(".kernel") + "." + _LORA_HF[leaf], "linear") if base else None
    for pattern, rule in _HF_RE:
        m = pattern.match(hf_key)
        if m:
            return _fill(rule.jax, m.groups()), rule.kind
    return None


def jax_to_hf(jax_path: str) -> tuple[str, str] | None:
    module, _, leaf = jax_path.rpartition(".")
    if leaf in _LORA_JAX:
        base = jax_to_hf(module + ".kernel")
        return (base[0].removesuffix(".weight") + f".{_LORA_JAX[leaf]}.weight", "linear") if base else None
    for pattern, rule in _JAX_RE:
        m = pattern.match(jax_path)
        if m:
            return _fill(rule.hf, m.groups()), rule.kind
    return None


def _fill(template: str, groups: tuple[str, ...]) -> str:
    for g in groups:
        template = template.replace("*", g, 1)
    return template


def to_jax(kind: str, tensor: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return tensor.T
    if kind == "patch_conv":  # [D, C, T, P, P] -> [C*T*P*P, D]
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor


def to_hf(kind: str, array: np.ndarray, hf_shape: tuple[int, ...] | None = None) -> np.ndarray:
    if kind == "linear":
        return array.T
    if kind == "patch_conv":
        return array.T.reshape(hf_shape)
    return array


def expected_hf_shape(kind: str, jax_shape: tuple[int, ...], patch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape an HF tensor must have to land in a JAX array of `jax_shape`."""
    if kind == "linear":
        return tuple(reversed(jax_shape))
    if kind == "patch_conv":
        return (jax_shape[1], *patch_shape)
    return tuple(jax_shape)
