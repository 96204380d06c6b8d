"""The PyTorch reference: transformers' `Qwen2_5_VLModel` + the same pooling and head as qvl_jax.

It takes the batch layout qvl_jax takes (`pixel_values [B, N, 1176]`, padded
per image; `grid_thw [B, 3]`; right-padded `input_ids`/`attention_mask`) and
packs it the way transformers wants (all patches in one `[sum N_b, 1176]`).
"""

from __future__ import annotations

import dataclasses
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
