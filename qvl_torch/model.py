"""The PyTorch reference: transformers' `Qwen2_5_VLModel` + the same pooling and head as qvl_jax.

It takes the batch layout qvl_jax takes (`pixel_values [B, N, 1176]`, padded
per image; `grid_thw [B, 3]`; right-padded `input_ids`/`attention_mask`) and
packs it the way transformers wants (all patches in one `[sum N_b, 1176]`).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os

import numpy as np
import torch
from torch import nn

from qvl_core.hf_checkpoint import CheckpointError, init_head, read_head, resolve_config
from qvl_core.model_config import QwenVLConfig, head_input_size
from qvl_core.sequence import build_input_ids

log = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Checkpoint key layouts -> a bare `Qwen2_5_VLModel`'s (`visual.*`, `language_model.*`): the hub's
# (`visual.*`, `model.*`) and newer transformers' (`model.visual.*`, `model.language_model.*`). Without
# this, transformers 5.24 loads the newer layout into a bare model by renaming `model.visual.*` to
# `model.language_model.visual.*`: every vision weight stays randomly initialised, with only a warning.
KEY_MAPPING = {r"^model\.visual\.": "visual.", r"^model\.language_model\.": "language_model.",
               r"^model\.(?!visual\.|language_model\.)": "language_model."}
_NOT_BACKBONE = ("lm_head.", "classifier.")  # the LM head is not used; the classifier is read by read_head


@dataclasses.dataclass
class TorchClassifierOutput:
    logits: torch.Tensor | None
    pooled: torch.Tensor
    last_hidden_state: torch.Tensor


class TorchQwenVLClassifier(nn.Module):
    def __init__(self, cfg: QwenVLConfig, backbone: nn.Module):
        super().__init__()
        self.config = cfg
        self.model = backbone  # HF Qwen2_5_VLModel (its language_model removed in vision mode)
        # float32 whatever the backbone's dtype: logits and loss are what the two frameworks compare.
        self.classifier = nn.Linear(head_input_size(cfg), cfg.head.num_labels) if cfg.head.num_labels else None

    def forward(self, pixel_values: torch.Tensor, grid_thw, input_ids=None, attention_mask=None):
        cfg = self.config
        grid = torch.as_tensor(np.asarray(grid_thw), dtype=torch.long).reshape(-1, 3)
        if grid.shape[0] == 1 and pixel_values.shape[0] > 1:
            grid = grid.expand(pixel_values.shape[0], 3)
        counts = grid.prod(-1)
        packed = torch.cat([pixel_values[b, :n] for b, n in enumerate(counts.tolist())])
        merge = cfg.vision.spatial_merge_size**2
        if cfg.head.mode == "vision":
            visual = self.model.visual
            feats = visual(packed.to(visual.dtype), grid_thw=grid).pooler_output
            per_image = torch.split(feats, (counts // merge).tolist())
            pooled = torch.stack([f.float().mean(0) for f in per_image])
            hidden = nn.utils.rnn.pad_sequence(list(per_image), batch_first=True)
            return TorchClassifierOutput(self._head(pooled), pooled, hidden)
        if input_ids is None:
            ids, mask = build_input_ids(cfg, grid.numpy())
            input_ids, attention_mask = torch.as_tensor(ids).long(), torch.as_tensor(mask).long()
        input_ids = torch.as_tensor(input_ids).long()
        is_img = input_ids == cfg.image_token_id
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).long()
            is_img &= attention_mask.bool()
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=packed,
                         image_grid_thw=grid, mm_token_type_ids=is_img.int())
        hidden = out.last_hidden_state
        pooled = pool(hidden, is_img, attention_mask, cfg.head.pooling)
        return TorchClassifierOutput(self._head(pooled), pooled, hidden)

    def _head(self, pooled):
        if self.classifier is None:
            return None
        # float32 even when DeepSpeed's bf16 mode has cast the head's parameters (as qvl_jax's head does)
        return nn.functional.linear(pooled.float(), self.classifier.weight.float(), self.classifier.bias.float())


def pool(hidden, is_img, attention_mask, pooling: str):
    hidden = hidden.float()
    if pooling == "mean_image":
        w = is_img.float()
        return torch.einsum("bl,bld->bd", w, hidden) / w.sum(-1, keepdim=True).clamp_min(1.0)
    if attention_mask is None:
        return hidden[:, -1]
    last = attention_mask.sum(-1) - 1  # right padding
    return hidden[torch.arange(hidden.shape[0]), last]


def load_pretrained(path: str | os.PathLike, *, num_labels: int | None = None, dtype: str = "float32",
                    mode: str | None = None, pooling: str | None = None, attn_implementation: str = "sdpa",
                    head_seed: int = 0) -> TorchQwenVLClassifier:
    """The torch twin of `qvl_jax.load_hf`: same directory, same head resolution, same seeded fresh head."""
    from transformers import Qwen2_5_VLModel

    cfg, files = resolve_config(path, num_labels=num_labels, mode=mode, pooling=pooling)
    backbone, info = Qwen2_5_VLModel.from_pretrained(path, dtype=TORCH_DTYPES[dtype], key_mapping=KEY_MAPPING,
                                                     attn_implementation=attn_implementation,
                                                     output_loading_info=True)
    missing = [k for k in info["missing_keys"] if cfg.head.mode == "vlm" or k.startswith("visual.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith(_NOT_BACKBONE)]
    if missing or unexpected or info["mismatched_keys"]:
        raise CheckpointError(f"{path}: transformers could not load every Qwen2.5-VL weight: "
                              f"missing {sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}, "
                              f"wrong shape {sorted(map(str, info['mismatched_keys']))[:10]}")
    if cfg.head.mode == "vision":
        del backbone.language_model
    model = TorchQwenVLClassifier(cfg, backbone)
    if model.classifier is not None:
        head = read_head(files) or init_head(cfg, head_seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.from_numpy(np.asarray(head["classifier.weight"], np.float32)))
            model.classifier.bias.copy_(torch.from_numpy(np.asarray(head["classifier.bias"], np.float32)))
    return model.eval()


def choose_attention(requested: str, device: torch.device) -> str:
    """flash_attention_2 -> sdpa -> eager for `auto`, logged with the reason; an impossible explicit choice raises."""
    from qvl_core.schema import SchemaError

    def flash_problem() -> str | None:
        if device.type != "cuda":
            return "flash-attn needs a CUDA device"
        try:
            importlib.import_module("flash_attn")  # a GLIBC mismatch surfaces here as ImportError/OSError
        except (ImportError, OSError) as e:
            return f"flash_attn does not import ({type(e).__name__}: {e})"
        return None

    if requested == "flash_attention_2":
        problem = flash_problem()
        if problem:
            raise SchemaError(f"model.attention: flash_attention_2 cannot be used: {problem}; use auto or sdpa")
        return requested
    if requested in ("sdpa", "eager"):
        return requested
    problem = flash_problem()
    if problem is None:
        choice, reason = "flash_attention_2", "flash_attn imports and a CUDA device is present"
    elif hasattr(torch.nn.functional, "scaled_dot_product_attention"):
        choice, reason = "sdpa", problem
    else:
        choice, reason = "eager", problem + "; no torch sdpa"
    log.info("attention: %s (%s)", choice, reason)
    return choice


def from_config(cfg: QwenVLConfig, *, attn_implementation: str, seed: int, head_seed: int = 0) -> TorchQwenVLClassifier:
    """A freshly initialised classifier (backbone drawn from torch's generator seeded with `seed`; the head
    drawn from `head_seed`, as `qvl_jax` draws it)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    raw = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("qvl_classifier", "id2label", "label2id",
                                                                  "num_labels")}
    raw["text_config"] = {**raw["text_config"], "bos_token_id": None, "eos_token_id": None}  # no generation here
    torch.manual_seed(seed)
    backbone = Qwen2_5_VLModel._from_config(Qwen2_5_VLConfig(**raw), attn_implementation=attn_implementation)
    if cfg.head.mode == "vision":
        del backbone.language_model
    model = TorchQwenVLClassifier(cfg, backbone)
    if model.classifier is not None:
        head = init_head(cfg, head_seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.from_numpy(head["classifier.weight"]))
            model.classifier.bias.copy_(torch.from_numpy(head["classifier.bias"]))
    return model


def build_classifier(config, label_map, attention: str) -> TorchQwenVLClassifier:
    """The classifier a run config asks for (`model.pretrained_name` or `model.config`), with the data's labels."""
    from qvl_core.model_config import ConfigError
    from qvl_core.schema import SchemaError

    m = config.model
    if m.pretrained_name is not None:  # a local directory: start_run resolved hub ids
        model = load_pretrained(m.pretrained_name, num_labels=label_map.num_labels, dtype=m.param_dtype, mode=m.mode,
                                pooling=m.resolved_pooling, attn_implementation=attention, head_seed=m.head_seed)
        stored = model.config.head.id2label
        if stored is not None and tuple(stored) != label_map.names:
            raise CheckpointError(f"{m.pretrained_name}: its head's labels are not this run's (same count, other "
                                  "classes or order)")
        model.config = model.config.with_head(id2label=label_map.names)
        return model.train()
    try:
        cfg = QwenVLConfig.from_hf_dict(m.config, source="model.config").with_head(
            num_labels=label_map.num_labels, mode=m.mode, pooling=m.resolved_pooling, id2label=label_map.names)
    except ConfigError as e:
        raise SchemaError(str(e)) from None
    return from_config(cfg, attn_implementation=attention, seed=config.training.seed, head_seed=m.head_seed).train()
