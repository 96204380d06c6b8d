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
from pathlib import Path

import numpy as np

from qvl_core.schema import SchemaError, read_json

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


# --------------------------------------------------------------------------------------------- PEFT's files
# An adapter directory as `peft.PeftModel.save_pretrained` writes one for `qvl_torch`'s classifier (module names
# `model.language_model.layers.*`, `model.visual.*`, `classifier`: `qvl_core.parts.module_layout_key`), so
# `PeftModel.from_pretrained(qvl_torch.load_pretrained(base, num_labels=...), DIR)` reads it; plus qvl's own
# `qvl_classifier.json` (head mode, pooling, image size) and `label_map.json`, which PEFT ignores.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "qvl_classifier.json"
_PREFIX = "base_model.model."


def target_pattern(module_names: list[str]) -> str | list[str]:
    """PEFT's `target_modules` for exactly these modules: one regular expression with the layer index as `\\d+`
    (PEFT full-matches a string against each module name) when every layer 0..n-1 of each kind is adapted (as
    `targeted` chooses), else the names themselves."""
    by_kind: dict[str, set[int]] = {}
    for n in module_names:
        m = re.fullmatch(r"(.*?\.)(\d+)(\..*)", n)
        if m is None:
            return sorted(module_names)
        by_kind.setdefault(m.group(1) + "<i>" + m.group(3), set()).add(int(m.group(2)))
    if any(indices != set(range(len(indices))) for indices in by_kind.values()):
        return sorted(module_names)
    return "|".join(re.escape(kind).replace("<i>", r"\d+") for kind in sorted(by_kind))


def adapter_config(spec: LoraSpec, module_names: list[str], modules_to_save: list[str],
                   base_model: str | None) -> dict:
    """`adapter_config.json` (PEFT's LoraConfig fields) for adapters on `module_names` (`qvl_torch` module
    names) with `modules_to_save` trained fully and stored whole."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": spec.rank, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": target_pattern(module_names), "modules_to_save": modules_to_save or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }


@dataclasses.dataclass
class Adapter:
    """An adapter directory, read: `lora[module] = (A [r, in], B [out, r])` and `saved[weight] = array` (both keyed
    on hub-layout names, `qvl_core.parts.canonical_hf_key`), `scaling`, the config and qvl's metadata."""
    path: Path
    config: dict
    scaling: float
    lora: dict[str, tuple]
    saved: dict
    meta: dict


def read_adapter(path) -> Adapter:
    """Reads a PEFT LoRA adapter directory; a clear error (naming the file) for anything qvl cannot apply."""
    from safetensors.numpy import load_file

    from qvl_core.parts import canonical_hf_key

    path = Path(path)
    cfg_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    for f in (cfg_file, weights_file):
        if not f.is_file():
            raise LoraError(f"{path}: not a PEFT adapter directory ({f.name} is missing)")
    cfg = read_json(cfg_file, LoraError)
    if cfg.get("peft_type") != "LORA":
        raise LoraError(f"{cfg_file}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if cfg.get(k)]
    unsupported += [k for k in ("rank_pattern", "alpha_pattern") if cfg.get(k)]
    if unsupported or cfg.get("bias", "none") != "none":
        raise LoraError(f"{cfg_file}: {', '.join(unsupported) or 'bias=' + str(cfg.get('bias'))} is not supported "
                        "(plain LoRA: one rank and alpha, no bias)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise LoraError(f"{cfg_file}: r must be a positive integer and lora_alpha a number (got r={r!r}, "
                        f"lora_alpha={alpha!r})")
    try:
        tensors = load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise LoraError(f"{weights_file}: cannot be read as safetensors ({e})") from None
    lora, saved, halves = {}, {}, {}
    for key, array in tensors.items():
        if not key.startswith(_PREFIX):
            raise LoraError(f"{weights_file}: key {key!r} does not start with {_PREFIX!r} (not a PeftModel's file)")
        name = key[len(_PREFIX):]
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m:
            halves.setdefault(canonical_hf_key(m.group(1)), {})[m.group(2)] = array
        else:
            saved[canonical_hf_key(name.replace(".modules_to_save.default", ""))] = array
    for module, pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LoraError(f"{weights_file}: {module} has lora_{'A' if 'A' in pair else 'B'} without its pair")
        a, b = pair["A"], pair["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise LoraError(f"{weights_file}: {module}: lora_A {a.shape} / lora_B {b.shape} do not have rank r={r} "
                            f"of {cfg_file.name}")
        lora[module] = (a, b)
    if not lora:
        raise LoraError(f"{weights_file}: no lora_A/lora_B weights")
    meta_file = path / ADAPTER_META
    meta = read_json(meta_file, LoraError) if meta_file.is_file() else {}
    return Adapter(path, cfg, float(alpha) / r, lora, saved, meta)
