"""Model FLOPs of the classifier, from the config alone, and MFU.

Counts 2 FLOPs per multiply-add of every matmul: patch embedding (of one frame
per patch: for an image the processor's temporal copies are equal, and the JAX
vision tower multiplies the frame by the kernel summed over time), every vision
block (q/k/v/proj, SwiGLU MLP, attention scores and values over the real window
sizes, full attention in `fullatt_block_indexes`), the merger, every decoder layer
(attention over the whole sequence, as the kernels compute it) and the head.
Training = forward + backward. A part's backward costs 1x its forward for the
weight gradients if it trains, and 1x for the input gradients if anything
before it trains, or if it trains and opens with a norm (vision blocks, merger,
decoder: the norm's scale gradient needs the first matmul's input gradient, as
in the merger of a run with the vision tower frozen). The patch embedding never
needs input gradients (its input is the pixels). Recomputation from gradient
checkpointing is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

import dataclasses

from qvl_core.model_config import QwenVLConfig

# Dense bf16 peak per chip in TFLOP/s, matched as substrings of the device kind, first hit wins.
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("H20", 148.0),
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),
    ("TPU v6", 918.0),
)


def peak_tflops(device_kind: str, override: float | None = None) -> float | None:
    """Per-chip peak for `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'); None when unknown."""
    if override is not None:
        return float(override)
    for key, value in PEAK_TFLOPS:
        if key in device_kind:
            return value
    return None


def window_sizes(grid_hw: tuple[int, int], cfg: QwenVLConfig) -> list[int]:
    """Patches per attention window of one image (HF's window partition over merged tokens)."""
    m = cfg.vision.spatial_merge_size
    side = cfg.vision.window_merged
    hm, wm = grid_hw[0] // m, grid_hw[1] // m
    return [min(side, hm - i) * min(side, wm - j) * m * m for i in range(0, hm, side) for j in range(0, wm, side)]


@dataclasses.dataclass(frozen=True)
class PartFlops:
    """Forward FLOPs of one part: `weights` (matmuls with parameters) and `attention` (scores and values)."""

    weights: float
    attention: float = 0.0

    @property
    def total(self) -> float:
        return self.weights + self.attention


def forward_parts(cfg: QwenVLConfig, grid_thw: tuple[int, int, int], prompt_tokens: int = 0) -> dict[str, PartFlops]:
    """Forward FLOPs per sample, by part: patch_embed, vision_blocks, merger, decoder, head."""
    v, t = cfg.vision, cfg.text
    frames, gh, gw = grid_thw
    n = frames * gh * gw
    d, inter = v.hidden_size, v.intermediate_size
    per_block = 2 * n * d * (3 * d + d + 3 * inter)
    windowed = sum(s * s for s in window_sizes((gh, gw), cfg)) * frames
    attention = 0.0
    for i in range(v.depth):
        attention += 4 * d * (n * n if i in v.fullatt_block_indexes else windowed)
    merged_in = d * v.spatial_merge_size**2
    tokens = n // v.spatial_merge_size**2
    parts = {
        "patch_embed": PartFlops(2 * n * v.frame_dim * d),  # one frame: an image's temporal copies are equal
        "vision_blocks": PartFlops(v.depth * per_block, attention),
        "merger": PartFlops(2 * tokens * merged_in * (merged_in + v.out_hidden_size)),
    }
    if cfg.head.mode == "vlm":
        seq = tokens + 2 + prompt_tokens
        h, kv = t.hidden_size, t.num_key_value_heads * t.head_dim
        layer = 2 * seq * h * (h + 2 * kv + h + 3 * t.intermediate_size)
        parts["decoder"] = PartFlops(t.num_hidden_layers * layer, t.num_hidden_layers * 4 * seq * seq * h)
        head_in = h
    else:
        head_in = v.out_hidden_size
    parts["head"] = PartFlops(2 * head_in * (cfg.head.num_labels or 0))
    return parts


def train_flops_per_sample(cfg: QwenVLConfig, grid_thw: tuple[int, int, int], *, trainable: dict[str, bool],
                           prompt_tokens: int = 0) -> float:
    """Forward + backward FLOPs of one training sample. `trainable`: part name -> True (trains), False (frozen)
    or "adapted" (frozen weights with LoRA adapters that train: input gradients, no weight gradients; the
    adapters' own FLOPs are left out); missing: True."""
    total = 0.0
    upstream = False  # does anything before this part train (so its input gradients are needed)?
    for name, part in forward_parts(cfg, grid_thw, prompt_tokens).items():
        mode = trainable.get(name, True)
        trains, grads_inside = mode is True, mode is True or mode == "adapted"
        # The head is one matmul; every other part but the patch embedding opens with a norm (see above).
        input_grads = name != "patch_embed" and (upstream or (grads_inside and name != "head"))
        total += part.total
        total += part.weights * (int(trains) + int(input_grads))
        total += part.attention * 2 * int(grads_inside or input_grads)
        upstream = upstream or grads_inside
    return total


def forward_flops_per_sample(cfg: QwenVLConfig, grid_thw: tuple[int, int, int], prompt_tokens: int = 0) -> float:
    return sum(p.total for p in forward_parts(cfg, grid_thw, prompt_tokens).values())


def mfu(flops_per_step: float, step_time: float, num_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1]; None when the device peak is unknown."""
    if peak is None or step_time <= 0:
        return None
    return flops_per_step / step_time / (num_devices * peak * 1e12)
