"""Static token bookkeeping for the vision tower, computed with numpy from the patch grids.

HF's vision tower permutes the patch sequence so that the tokens of each
attention window are contiguous (`get_vision_window_index`), runs every block
in that order, and undoes the permutation after the merger. Windowed blocks
attend block-diagonally over the windows; full-attention blocks over whole
frames. Both are "attention within contiguous segments of the permuted
sequence", which `Segments` describes as gather/scatter indices so the
segments run as one batched attention call.

A batch may hold images of different sizes: each image is padded to the
longest one, with its own permutation and segments.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from qvl_core.model_config import VisionConfig

Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """Block-diagonal attention over contiguous segments of a `[B, N]` sequence.

    `uniform` is the segment length when every segment of every image has it
    and there is no padding: then `[B, N] -> [B * N/S, S]` is a reshape.
    Otherwise `gather [B, G, S]` picks each segment's tokens (slots past the
    segment's length are masked), `lengths [B, G]`, and `scatter [B, N]` maps
    each token back to its flat `G * S` slot.
    """

    uniform: int | None
    gather: np.ndarray
    lengths: np.ndarray
    scatter: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
    grids: tuple[Grid, ...]
    num_patches: int  # N: longest image in the batch
    lengths: np.ndarray  # [B] patches per image
    perm: np.ndarray  # [B, N] permuted position p holds input patch perm[b, p]
    pos_hw: np.ndarray  # [B, N, 2] rotary (row, column) in permuted order
    unperm_merged: np.ndarray  # [B, N/4] merged token j of the output is row unperm_merged[b, j]
    window: Segments
    full: Segments


def hf_patch_positions(grid: Grid, merge: int) -> np.ndarray:
    """(row, column) of each patch in the processor's order (2x2 merge blocks contiguous); `[t*h*w, 2]`."""
    t, h, w = grid
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge, merge, w // merge, merge)
    hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).ravel()
    wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hpos, wpos], axis=-1), (t, 1))


def window_index(grid: Grid, merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """HF's `get_vision_window_index` for one image: merged-token order and window sizes (merged tokens)."""
    t, h, w = grid
    lh, lw = h // merge, w // merge
    index = np.arange(t * lh * lw).reshape(t, lh, lw)
    pad_h, pad_w = -lh % window, -lw % window
    nh, nw = (lh + pad_h) // window, (lw + pad_w) // window
    padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-1)
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, -1)
    sizes = (padded >= 0).sum(-1).ravel()
    order = padded.ravel()
    return order[order >= 0], [int(s) for s in sizes if s > 0]


def _segments(seg_lengths: list[list[int]], n: int) -> Segments:
    b = len(seg_lengths)
    flat = {s for lens in seg_lengths for s in lens}
    if len(flat) == 1 and all(sum(lens) == n for lens in seg_lengths):
        s = flat.pop()
        return Segments(s, np.zeros((b, 0, 0), np.int32), np.zeros((b, 0), np.int32), np.zeros((b, 0), np.int32))
    g = max(len(lens) for lens in seg_lengths)
    s = max(flat)
    gather = np.zeros((b, g, s), np.int32)
    lengths = np.zeros((b, g), np.int32)
    scatter = np.zeros((b, n), np.int32)
    for i, lens in enumerate(seg_lengths):
        start = 0
        for j, length in enumerate(lens):
            gather[i, j] = np.minimum(start + np.arange(s), n - 1)
            lengths[i, j] = length
            scatter[i, start:start + length] = j * s + np.arange(length)
            start += length
    return Segments(None, gather, lengths, scatter)


@functools.lru_cache(maxsize=64)
def vision_layout(grids: tuple[Grid, ...], cfg: VisionConfig) -> VisionLayout:
    m, mu = cfg.spatial_merge_size, cfg.merge_unit
    for g in grids:
        if len(g) != 3 or min(g) < 1 or g[1] % m or g[2] % m:
            raise ValueError(f"grid_thw {g} must be (t, h, w) >= 1 with h and w multiples of "
                             f"spatial_merge_size={m}")
    sizes = [t * h * w for t, h, w in grids]
    n = max(sizes)
    b = len(grids)
    perm = np.tile(np.arange(n), (b, 1))
    pos = np.zeros((b, n, 2), np.int32)
    unperm = np.tile(np.arange(n // mu), (b, 1))
    win_lens, full_lens = [], []
    for i, (grid, size) in enumerate(zip(grids, sizes)):
        order, win = window_index(grid, m, cfg.window_merged)
        patch_order = (order[:, None] * mu + np.arange(mu)).ravel()
        perm[i, :size] = patch_order
        pos[i, :size] = hf_patch_positions(grid, m)[patch_order]
        unperm[i, :size // mu] = np.argsort(order)
        win_lens.append([s * mu for s in win] + ([n - size] if size < n else []))
        t, h, w = grid
        full_lens.append([h * w] * t + ([n - size] if size < n else []))
    return VisionLayout(grids=grids, num_patches=n, lengths=np.asarray(sizes, np.int32), perm=perm, pos_hw=pos,
                        unperm_merged=unperm, window=_segments(win_lens, n), full=_segments(full_lens, n))
