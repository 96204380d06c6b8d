"""The token sequence a classifier feeds the decoder, built without any framework.

One image per sequence: `<|vision_start|>`, one `<|image_pad|>` per merged image
token, `<|vision_end|>`, then optional prompt tokens. The image-pad positions
are where the vision features are placed (HF's `masked_scatter`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qvl_core.model_config import QwenVLConfig


def num_image_tokens(grid_thw: Sequence[int], merge_size: int) -> int:
    t, h, w = (int(x) for x in grid_thw)
    return t * h * w // merge_size**2


def build_input_ids(cfg: QwenVLConfig, grid_thw: Sequence[Sequence[int]] | np.ndarray,
                    prompt_ids: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Returns `(input_ids [B, L] int32, attention_mask [B, L] int32)`, right-padded.

    `grid_thw` is `[B, 3]`: one `(t, h, w)` patch grid per image. Images of
    different sizes give sequences of different lengths; the shorter ones are
    padded on the right with `vision_end_token_id` and masked out.
    """
    grids = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    rows = []
    for g in grids:
        n = num_image_tokens(g, cfg.vision.spatial_merge_size)
        rows.append([cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
                    + [int(p) for p in prompt_ids])
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), cfg.vision_end_token_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return ids, mask
