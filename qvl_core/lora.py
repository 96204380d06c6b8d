"""LoRA, framework-neutral: which layers get adapters, their initial weights and their names in PEFT's format.

    spec = LoraSpec(rank=16, alpha=32, targets=DECODER_TARGETS)
    names = targeted(all_linear_module_names, spec)   # HF module names, every target matched (else an error)
    a = initial_a("model.layers.0.self_attn.q_proj", in_features, spec)   # [rank, in], as PEFT stores lora_A
    y = base(x) + scaling(spec) * (dropout(x) @ A.T @ B.T)                # B [out, rank] starts at zero

Module names are HF's in the hub's layout (`model.layers.0.self_attn.q_proj`,
`visual.blocks.0.attn.qkv`). A target matches a module whose name is the target or
ends with `.<target>` (PEFT's rule for a list of names), or that the target matches
whole as a regular expression. Only the decoder's layers are adapted unless
`vision` is set, which adds the vision tower's blocks; the merger and the head are
never adapted (they train fully, or stay frozen, by the freeze switches).

Both frameworks draw the initial A from here (`initial_a`: PEFT's default init, a
uniform in +-1/sqrt(in_features), seeded per module name), so a JAX run and a
transformers+peft run start from the same adapters without exchanging files.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import numpy as np

from qvl_core.schema import SchemaError

DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vision tower's layers `vision: true` adds: fused qkv, output projection, the gated MLP.
VISION_TARGETS = ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_SCOPES = ("model.layers.",)
_VISION_SCOPES = ("visual.blocks.",)


class LoraError(SchemaError):
    """A LoRA setting that cannot apply to the model (names the key or the file)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = DECODER_TARGETS
    dropout: float = 0.0
    vision: bool = False
    seed: int = 0


def scaling(spec: LoraSpec) -> float:
    """PEFT's `lora_alpha / r`: the factor on the adapter's output."""
    return spec.alpha / spec.rank


def _matches(name: str, target: str) -> bool:
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def in_scope(name: str, spec: LoraSpec) -> bool:
    """Whether a module may carry an adapter: a decoder layer, or a vision block with `vision`."""
    return name.startswith(_SCOPES) or (spec.vision and name.startswith(_VISION_SCOPES))


def targeted(module_names, spec: LoraSpec, where: str = "model.lora.targets") -> list[str]:
    """The names (of linear layers, HF module names) that get an adapter. A target that matches none of them is an
    error naming it: a typo would otherwise train the head alone."""
    names = [n for n in module_names if in_scope(n, spec)]
    targets = tuple(spec.targets) + (VISION_TARGETS if spec.vision else ())
    chosen = [n for n in names if any(_matches(n, t) for t in targets)]
    for t in spec.targets:
        if not any(_matches(n, t) for n in names):
            scope = "decoder layers" + (" or vision blocks" if spec.vision else "")
            example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})[:12])
            raise LoraError(f"{where}: {t!r} matches no linear layer of the {scope} (their names end in: {example})")
    return chosen


def initial_a(module_name: str, in_features: int, spec: LoraSpec) -> np.ndarray:
    """lora_A's initial weights `[rank, in_features]` (float32): uniform in +-1/sqrt(in_features), as PEFT's
    default (kaiming-uniform with a = sqrt(5)), drawn from the seed and the module's name."""
    rng = np.random.default_rng([spec.seed, zlib.crc32(module_name.encode())])
    bound = 1.0 / np.sqrt(in_features)
    return rng.uniform(-bound, bound, size=(spec.rank, in_features)).astype(np.float32)


def peft_keys(module_name: str) -> tuple[str, str]:
    """The keys of a module's A and B in a PEFT adapter file (`adapter_model.safetensors`)."""
    return f"base_model.model.{module_name}.lora_A.weight", f"base_model.model.{module_name}.lora_B.weight"
