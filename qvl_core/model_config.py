"""Framework-free description of a Qwen2.5-VL backbone plus classification head.

Both trainers build their models from these dataclasses, and the FLOP count is
computed from them, so neither jax nor torch is imported here.

`QwenVLConfig.from_hf_dict` reads the `config.json` forms users have on disk:
the hub's flat form (text fields at top level, `rope_scaling` with
`mrope_section`) and the nested `text_config` form that newer transformers
writes. `to_hf_dict` writes the nested form, which every transformers version
that knows Qwen2.5-VL reads back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

Pooling = Literal["last", "mean_image"]
Mode = Literal["vlm", "vision"]

# Token ids of the Qwen2.5-VL tokenizer; used when a config.json omits them.
VISION_START_TOKEN_ID = 151652
VISION_END_TOKEN_ID = 151653
IMAGE_TOKEN_ID = 151655
VIDEO_TOKEN_ID = 151656


class ConfigError(ValueError):
    """A config.json (or config block) that does not describe a usable model."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (`Qwen2_5_VisionTransformerPretrainedModel`)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584  # = text hidden size: merger output feeds the decoder
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # pixels; windows are window_size // patch_size patches wide
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch row of `pixel_values` (1176 for Qwen2.5-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def frame_dim(self) -> int:
        """Length of one frame of a patch row (588): an image's `pixel_values` row is this repeated
        `temporal_patch_size` times per channel, and the vision tower also takes rows of this length."""
        return self.in_channels * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (HF's `vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2.5 decoder (`Qwen2_5_VLTextModel`)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """The classification head stored beside the backbone."""

    num_labels: int | None = None
    pooling: Pooling = "last"  # last valid token | mean over image tokens
    mode: Mode = "vlm"  # vision tower + decoder | vision tower only
    id2label: tuple[str, ...] | None = None  # names in head order, when known


@dataclasses.dataclass(frozen=True)
class QwenVLConfig:
    vision: VisionConfig
    text: TextConfig
    head: HeadConfig = HeadConfig()
    image_token_id: int = IMAGE_TOKEN_ID
    video_token_id: int = VIDEO_TOKEN_ID
    vision_start_token_id: int = VISION_START_TOKEN_ID
    vision_end_token_id: int = VISION_END_TOKEN_ID

    def __post_init__(self):
        validate(self)

    def replace(self, **kw) -> "QwenVLConfig":
        return dataclasses.replace(self, **kw)

    def with_head(self, **kw) -> "QwenVLConfig":
        return dataclasses.replace(self, head=dataclasses.replace(self.head, **kw))

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> "QwenVLConfig":
        """Builds the config from a parsed HF `config.json` (flat or nested form)."""
        model_type = raw.get("model_type")
        if model_type not in (None, "qwen2_5_vl"):
            raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl' (Qwen2.5-VL)")
        if "vision_config" not in raw:
            raise ConfigError(f"{source}: no 'vision_config' block; this is not a Qwen2.5-VL config")
        text_raw = dict(raw.get("text_config") or {})
        if not text_raw:  # hub form: the text fields sit at top level
            text_raw = {k: v for k, v in raw.items() if k not in ("vision_config", "text_config")}
        if text_raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported (Qwen2.5-VL does not use it)")
        rope = dict(text_raw.get("rope_parameters") or text_raw.get("rope_scaling") or raw.get("rope_scaling") or {})
        theta = rope.get("rope_theta", text_raw.get("rope_theta", raw.get("rope_theta", TextConfig.rope_theta)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ConfigError(f"{source}: rope type {rope_type!r} is not supported (expected default/mrope)")
        text = _take(TextConfig, text_raw, source, "text",
                     rope_theta=float(theta),
                     mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)))
        v_raw = dict(raw["vision_config"])
        if "in_chans" in v_raw and "in_channels" not in v_raw:  # hub configs spell it in_chans
            v_raw["in_channels"] = v_raw["in_chans"]
        v_rope = v_raw.get("rope_parameters") or {}
        vision = _take(VisionConfig, v_raw, source, "vision_config",
                       rope_theta=float(v_rope.get("rope_theta", v_raw.get("rope_theta", VisionConfig.rope_theta))),
                       fullatt_block_indexes=tuple(v_raw.get("fullatt_block_indexes",
                                                             VisionConfig.fullatt_block_indexes)))
        qvl = raw.get("qvl_classifier") or {}
        id2label = raw.get("id2label")
        num_labels = raw.get("num_labels") if qvl else None
        if id2label and qvl:
            id2label = tuple(id2label[str(i)] if str(i) in id2label else id2label[i] for i in range(len(id2label)))
            num_labels = len(id2label)
        else:
            id2label = None
        head = HeadConfig(num_labels=num_labels, pooling=qvl.get("pooling", "last"),
                          mode=qvl.get("mode", "vlm"), id2label=id2label)
        tokens = {k: int(raw[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                          "vision_end_token_id") if raw.get(k) is not None}
        try:
            return cls(vision=vision, text=text, head=head, **tokens)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The nested config.json form, plus the standard HF label fields and our head block."""
        t, v = self.text, self.vision
        out: dict[str, Any] = {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": False,
            "text_config": {
                "model_type": "qwen2_5_vl_text",
                "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "hidden_act": t.hidden_act, "rms_norm_eps": t.rms_norm_eps,
                "max_position_embeddings": t.max_position_embeddings,
                "initializer_range": t.initializer_range, "use_sliding_window": False,
                "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                                    "mrope_section": list(t.mrope_section)},
            },
            "vision_config": {
                "model_type": "qwen2_5_vl_vision",
                "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads, "out_hidden_size": v.out_hidden_size, "in_channels": v.in_channels,
                "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
                "spatial_merge_size": v.spatial_merge_size, "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes), "hidden_act": v.hidden_act,
                "tokens_per_second": v.tokens_per_second, "initializer_range": v.initializer_range,
                "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            },
        }
        h = self.head
        if h.num_labels is not None:
            names = h.id2label or tuple(f"LABEL_{i}" for i in range(h.num_labels))
            out["num_labels"] = h.num_labels
            out["id2label"] = {str(i): n for i, n in enumerate(names)}
            out["label2id"] = {n: i for i, n in enumerate(names)}
            out["qvl_classifier"] = {"pooling": h.pooling, "mode": h.mode}
        return out


def _take(cls, raw: dict[str, Any], source: str, where: str, **overrides) -> Any:
    """Picks the dataclass fields of `cls` out of `raw`, type-checking each one."""
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kw[f.name] = overrides[f.name]
        elif f.name in raw and raw[f.name] is not None:
            val, want = raw[f.name], type(f.default)
            if want is float and isinstance(val, int) and not isinstance(val, bool):
                val = float(val)
            if not isinstance(val, want) or isinstance(val, bool) != (want is bool):
                raise ConfigError(f"{source}: {where}.{f.name} = {val!r} should be {want.__name__}")
            kw[f.name] = val
    return cls(**kw)


def validate(cfg: QwenVLConfig) -> None:
    v, t, h = cfg.vision, cfg.text, cfg.head
    if v.hidden_size % v.num_heads:
        raise ConfigError(f"vision hidden_size {v.hidden_size} is not divisible by num_heads {v.num_heads}")
    if v.head_dim % 4:
        raise ConfigError(f"vision head_dim {v.head_dim} must be divisible by 4 (2D rotary)")
    if v.window_size % (v.spatial_merge_size * v.patch_size):
        raise ConfigError(f"vision window_size {v.window_size} must be a multiple of "
                          f"spatial_merge_size*patch_size = {v.spatial_merge_size * v.patch_size}")
    bad = [i for i in v.fullatt_block_indexes if not 0 <= i < v.depth]
    if bad:
        raise ConfigError(f"vision fullatt_block_indexes {bad} are outside 0..{v.depth - 1}")
    if t.hidden_size % t.num_attention_heads:
        raise ConfigError(f"text hidden_size {t.hidden_size} is not divisible by num_attention_heads "
                          f"{t.num_attention_heads}")
    if t.num_attention_heads % t.num_key_value_heads:
        raise ConfigError(f"text num_attention_heads {t.num_attention_heads} is not divisible by "
                          f"num_key_value_heads {t.num_key_value_heads}")
    if 2 * sum(t.mrope_section) != t.head_dim:
        raise ConfigError(f"text mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)}; "
                          f"it must sum to head_dim/2 = {t.head_dim // 2}")
    if h.mode == "vlm":
        # Out of range, JAX's embedding lookup would clamp the id without a word and torch's would fail deep inside.
        out = {k: getattr(cfg, k) for k in ("image_token_id", "vision_start_token_id", "vision_end_token_id")
               if not 0 <= getattr(cfg, k) < t.vocab_size}
        if out:
            raise ConfigError(", ".join(f"{k} {i}" for k, i in out.items())
                              + f" outside the text vocab_size {t.vocab_size}")
        if v.out_hidden_size != t.hidden_size:
            raise ConfigError(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    if h.pooling not in ("last", "mean_image"):
        raise ConfigError(f"pooling {h.pooling!r} must be 'last' or 'mean_image'")
    if h.mode not in ("vlm", "vision"):
        raise ConfigError(f"mode {h.mode!r} must be 'vlm' or 'vision'")
    if h.mode == "vision" and h.pooling != "mean_image":
        raise ConfigError("mode 'vision' has no token sequence to take the last token of: use pooling 'mean_image'")
    if h.num_labels is not None and h.num_labels < 1:
        raise ConfigError(f"num_labels must be >= 1, got {h.num_labels}")
    if h.id2label is not None and h.num_labels != len(h.id2label):
        raise ConfigError(f"id2label has {len(h.id2label)} names but num_labels is {h.num_labels}")
    for act in (v.hidden_act, t.hidden_act):
        if act not in ACTIVATIONS:
            raise ConfigError(f"activation {act!r} is not supported (known: {sorted(ACTIVATIONS)})")


# Activation names as HF spells them; each framework maps them to its function.
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")


def head_input_size(cfg: QwenVLConfig) -> int:
    return cfg.vision.out_hidden_size if cfg.head.mode == "vision" else cfg.text.hidden_size
