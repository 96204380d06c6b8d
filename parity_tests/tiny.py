"""Tiny random Qwen2.5-VL checkpoints, written with transformers' own classes and `save_pretrained`.

No hub is reachable here, so every test builds its checkpoint this way; the
loading code under test is the one a user runs on a 7B directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Shapes chosen so each path is exercised: window 56 px = 2x2 merged tokens per
# window, so 140x252 images (10x18 patches -> 5x9 merged) leave ragged windows.
TINY_VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=48,
                   window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
TINY_TEXT = dict(vocab_size=160, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]})
# Token ids inside the tiny vocabulary.
TINY_TOKENS = dict(vision_start_token_id=150, vision_end_token_id=151, image_token_id=152, video_token_id=153)


def hf_config(vision: dict | None = None, text: dict | None = None, **tokens):
    from transformers import Qwen2_5_VLConfig
    return Qwen2_5_VLConfig(vision_config={**TINY_VISION, **(vision or {})},
                            text_config={**TINY_TEXT, **(text or {}), "bos_token_id": 0, "eos_token_id": 1},
                            **{**TINY_TOKENS, **tokens})


def make_checkpoint(path: str | Path, *, vision: dict | None = None, text: dict | None = None, seed: int = 0,
                    dtype: str = "float32", num_labels: int | None = None, flat_config: bool = False,
                    layout: str = "hub", max_shard_size: str | None = None) -> Path:
    """Writes a random Qwen2.5-VL checkpoint; returns its directory.

    Weights are drawn with a wider spread than HF's 0.02 init so the tiny model's
    outputs are not dominated by the residual path (which would hide bugs).
    `num_labels` adds a stored classifier head; `flat_config` rewrites config.json
    in the hub's flat form; `layout="new"` renames keys to `model.visual.*` /
    `model.language_model.*`.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    cfg = hf_config(vision, text)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or "layernorm" in name or "norm" in name.split(".")[-2]:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(max(p.shape[-1] if p.ndim > 1 else 1, 1)) * 0.8)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.to(getattr(torch, dtype)).save_pretrained(path, **kwargs)
    files = sorted(path.glob("*.safetensors"))
    if num_labels or layout == "new":
        for f in files:
            tensors = load_file(f)
            if layout == "new":
                tensors = {_new_layout(k): v for k, v in tensors.items()}
            if num_labels and f == files[-1]:
                g = torch.Generator().manual_seed(seed + 1)
                width = cfg.text_config.hidden_size
                tensors["classifier.weight"] = (torch.randn(num_labels, width, generator=g) * 0.1).to(
                    getattr(torch, dtype))
                tensors["classifier.bias"] = (torch.randn(num_labels, generator=g) * 0.1).to(getattr(torch, dtype))
            save_file(tensors, f, metadata={"format": "pt"})
        index = path / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            wm = data["weight_map"]
            if layout == "new":
                wm = {_new_layout(k): v for k, v in wm.items()}
            if num_labels:
                wm["classifier.weight"] = wm["classifier.bias"] = files[-1].name
            data["weight_map"] = wm
            index.write_text(json.dumps(data, indent=2))
    if num_labels:
        raw = json.loads((path / "config.json").read_text())
        raw["num_labels"] = num_labels
        raw["id2label"] = {str(i): f"class_{i}" for i in range(num_labels)}
        raw["label2id"] = {f"class_{i}": i for i in range(num_labels)}
        raw["qvl_classifier"] = {"pooling": "last", "mode": "vlm"}
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    if flat_config:
        raw = json.loads((path / "config.json").read_text())
        text_cfg = raw.pop("text_config")
        rope = text_cfg.pop("rope_parameters")
        text_cfg.pop("model_type", None)
        raw.update(text_cfg)
        raw["rope_theta"] = rope["rope_theta"]
        raw["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
        vis = raw["vision_config"]
        vis["in_chans"] = vis.pop("in_channels")
        vis.pop("rope_parameters", None)
        (path / "config.json").write_text(json.dumps(raw, indent=2))
    return path


def _new_layout(key: str) -> str:
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model."):
        return "model.language_model." + key[len("model."):]
    return key


def random_batch(grids, *, patch_dim: int = 1176, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`pixel_values [B, N_max, patch_dim]` (zero-padded per image) and `grid_thw [B, 3]`."""
    rng = np.random.default_rng(seed)
    grids = np.asarray(grids, np.int64).reshape(-1, 3)
    n = int(grids.prod(-1).max())
    pix = np.zeros((len(grids), n, patch_dim), np.float32)
    for i, g in enumerate(grids):
        pix[i, :g.prod()] = rng.standard_normal((g.prod(), patch_dim)).astype(np.float32)
    return pix, grids


def grid_for(height: int, width: int, patch: int = 14) -> tuple[int, int, int]:
    return (1, height // patch, width // patch)
