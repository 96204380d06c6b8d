"""The model's parts, named once: which weights are the vision tower, the merger, the decoder, the head.

Every per-part decision reads this table: the freeze switches (`model.freeze_*`), the vision
learning rate, the FLOP count's trainable parts (`qvl_core.flops` names its parts the same), and
the parameter groups of both frameworks. Keys are HF names in the hub's layout (`visual.*`,
`model.*`, `classifier.*`); `canonical_hf_key` rewrites the other layouts (newer transformers'
`model.visual.*` / `model.language_model.*`, a bare `Qwen2_5_VLModel`'s `language_model.*`, a torch
module's `model.` prefix) and `qvl_jax.param_map` turns NNX paths into these keys.

Adding a part, or a per-part option, is one row here.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Part:
    name: str  # as `qvl_core.flops.forward_parts` names it
    prefix: str  # canonical HF key prefix of its weights
    freeze: str | None  # the `ModelConfig` switch that freezes it (None: always trains)
    vision_lr: bool  # trains at `training.vision_learning_rate` when that is set
    lora_base: bool  # with `model.lora`, its weights are the frozen base (adapters may train inside it)


PARTS: tuple[Part, ...] = (
    Part("patch_embed", "visual.patch_embed.", freeze="freeze_vision", vision_lr=True, lora_base=True),
    Part("vision_blocks", "visual.blocks.", freeze="freeze_vision", vision_lr=True, lora_base=True),
    Part("merger", "visual.merger.", freeze="freeze_merger", vision_lr=False, lora_base=False),
    Part("decoder", "model.", freeze="freeze_decoder", vision_lr=False, lora_base=True),
    Part("head", "classifier.", freeze=None, vision_lr=False, lora_base=False),
)

# Other layouts of the same weights -> the hub's. The order matters: the newer layout's `model.visual.`
# must become `visual.` before a bare `model.` prefix could be read as the decoder's.
_LAYOUTS = (
    (re.compile(r"^model\.visual\."), "visual."),
    (re.compile(r"^model\.language_model\."), "model."),
    (re.compile(r"^language_model\."), "model."),
)


def canonical_hf_key(key: str) -> str:
    """Any known layout's key -> the hub layout's (`visual.*`, `model.*`, `classifier.*`)."""
    for pattern, repl in _LAYOUTS:
        if pattern.match(key):
            return pattern.sub(repl, key, count=1)
    return key


def module_layout_key(key: str) -> str:
    """A hub-layout key -> the same weight's (or module's) name in `qvl_torch`'s classifier, which holds
    transformers' `Qwen2_5_VLModel` as `model` (`model.visual.*`, `model.language_model.*`, `classifier.*`): the
    names a PEFT adapter of that model uses. `canonical_hf_key` reads them back."""
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def part_of(hf_key: str) -> Part:
    """The part a weight belongs to, by its HF key in any known layout."""
    key = canonical_hf_key(hf_key)
    for part in PARTS:
        if key.startswith(part.prefix):
            return part
    raise KeyError(f"{hf_key!r} belongs to no model part (known prefixes: {', '.join(p.prefix for p in PARTS)})")


def trains(part: Part, model_config) -> bool:
    """Whether `part`'s own weights train under a `qvl_core.config.ModelConfig`: its freeze switch, and with
    LoRA never for the base."""
    if part.lora_base and getattr(model_config, "lora", None) is not None:
        return False
    return part.freeze is None or not getattr(model_config, part.freeze)


def is_adapter(hf_key: str) -> bool:
    """A LoRA adapter's weight (PEFT's names: `<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    return ".lora_A." in hf_key or ".lora_B." in hf_key


def adapted(part: Part, model_config) -> bool:
    """Whether LoRA adapters train inside `part` (the decoder; the vision blocks with `lora.vision`)."""
    lora = getattr(model_config, "lora", None)
    return lora is not None and (part.name == "decoder" or (part.name == "vision_blocks" and lora.vision))


def trainable_parts(model_config) -> dict[str, bool | str]:
    """Part name -> True (trains), False (frozen) or "adapted" (frozen, with adapters that train): what
    `qvl_core.flops.train_flops_per_sample` takes."""
    return {part.name: "adapted" if adapted(part, model_config) else trains(part, model_config) for part in PARTS}


def key_trains(hf_key: str, model_config) -> bool:
    return is_adapter(hf_key) or trains(part_of(hf_key), model_config)


def learning_rate(hf_key: str, training_config) -> float:
    """The peak learning rate of one weight (`vision_learning_rate` for the vision tower when set)."""
    t = training_config
    if part_of(hf_key).vision_lr and t.vision_learning_rate is not None:
        return t.vision_learning_rate
    return t.learning_rate
