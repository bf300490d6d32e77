"""Host-side position metadata for Qwen2.5-VL: M-RoPE ids and the vision tower's window layout.

Pure NumPy, computed once per batch outside `jit` (STYLE.md 5 rule 9), so the jitted model only
sees fixed-shape integer arrays and never permutes or segments data-dependently.

- `rope_index` / `decode_positions`: the 3-axis (temporal, height, width) text positions and
  per-row deltas of transformers 5.24 `get_rope_index`, images only (QWEN2_5_VL.md 3.2).
- `vision_metadata`: window permutation, its inverse, rotary (h, w) ids and segment ids of
  the vision tower (QWEN2_5_VL.md 3.1 items 2, 3, 4, 6; `vision_utils.get_vision_window_index`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def _grids(image_grid_thw: np.ndarray, merge_size: int) -> np.ndarray:
    grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
    bad = (grid <= 0).any(axis=1) | (grid[:, 1] % merge_size != 0) | (grid[:, 2] % merge_size != 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"image_grid_thw[{k}] = {grid[k].tolist()} must be positive with h and w divisible by "
            f"merge_size={merge_size}"
        )
    return grid


# ---------------------------------------------------------------------------------------------
# M-RoPE
# ---------------------------------------------------------------------------------------------


def rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    image_grid_thw: np.ndarray,
    *,
    image_token_id: int,
    vision_start_token_id: int,
    merge_size: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids and deltas (QWEN2_5_VL.md 3.2, transformers 5.24 rule, images only).

    Per row, over the tokens with attention_mask == 1: a text token takes position `cur` on all
    three axes and advances `cur` by 1; the k-th image (grid (t, h, w), gh = h / merge,
    gw = w / merge) takes the next t * gh * gw image-pad tokens, token (a, i, j) in row-major order
    getting (cur + a, cur + i, cur + j), then `cur += max(gh, gw)`. Images are consumed in grid
    order across the batch, row-major, so two adjacent images are split by their token counts.

    Args:
      input_ids: [B, L] int token ids.
      attention_mask: [B, L], nonzero on real tokens (any padding side).
      image_grid_thw: [n, 3] (t, h, w) patch grids of all images of the batch, in order.
      image_token_id: the `<|image_pad|>` id.
      vision_start_token_id: the `<|vision_start|>` id; every image must directly follow one
        (or directly follow another image, which is then split from it by token counts).

    Returns:
      position_ids: [3, B, L] int32 (temporal, height, width); 0 at padding.
      rope_deltas: [B] int32 = max position + 1 - number of real tokens (0 for text-only and
        empty rows); the next token's position is `num_valid + delta` (`decode_positions`).

    Raises:
      ValueError: image-pad token count does not match the grids, an image split across rows
        or preceded by neither `<|vision_start|>` nor another image.
    """
    ids = np.asarray(input_ids)
    mask = np.asarray(attention_mask) != 0
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise ValueError(
            f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} must both be [B, L]"
        )
    batch, length = ids.shape
    grid = _grids(image_grid_thw, merge_size)
    gh = grid[:, 1] // merge_size
    gw = grid[:, 2] // merge_size
    counts = grid[:, 0] * gh * gw
    ends = np.cumsum(counts)
    starts = ends - counts

    is_image = (ids == image_token_id) & mask
    flat_rows, flat_cols = np.nonzero(is_image)  # row-major = image order
    if flat_rows.size != int(counts.sum()):
        raise ValueError(
            f"the batch has {flat_rows.size} image-pad tokens but image_grid_thw "
            f"{grid.tolist()} needs {int(counts.sum())} (t * h * w / {merge_size**2} per image)"
        )
    # Each image's tokens must lie in one row, contiguous among the real tokens.
    valid_before = np.cumsum(mask, axis=1) - mask  # [B, L] index among the row's real tokens
    for k in range(grid.shape[0]):
        if counts[k] == 0:
            continue
        r0, c0 = flat_rows[starts[k]], flat_cols[starts[k]]
        r1, c1 = flat_rows[ends[k] - 1], flat_cols[ends[k] - 1]
        if r0 != r1 or valid_before[r1, c1] - valid_before[r0, c0] != counts[k] - 1:
            raise ValueError(
                f"image {k} (grid {grid[k].tolist()}) needs {int(counts[k])} consecutive "
                f"image-pad tokens in one row, starting at row {r0} column {c0}"
            )
        prev = np.flatnonzero(mask[r0, :c0])
        if prev.size == 0 or ids[r0, prev[-1]] not in (vision_start_token_id, image_token_id):
            raise ValueError(
                f"image {k} at row {r0} column {c0} is not preceded by the vision start token "
                f"{vision_start_token_id} (or by another image)"
            )

    # Advance of `cur` caused by each token: 1 per text token, max(gh, gw) at an image's last
    # token, 0 at its other tokens; `cur` before a token is the exclusive cumsum along the row.
    advance = mask.astype(np.int64)
    advance[is_image] = 0
    last_rows, last_cols = flat_rows[ends - 1], flat_cols[ends - 1]
    advance[last_rows, last_cols] = np.maximum(gh, gw)
    cur = np.cumsum(advance, axis=1) - advance  # [B, L]

    pos = np.broadcast_to(cur, (3, batch, length)).copy()
    if flat_rows.size:
        img = np.repeat(np.arange(grid.shape[0]), counts)  # image of each image token
        offset = np.arange(flat_rows.size) - starts[img]  # index inside its image
        hw = (gh * gw)[img]
        a, rem = offset // hw, offset % hw
        i, j = rem // gw[img], rem % gw[img]
        first = cur[flat_rows[starts[img]], flat_cols[starts[img]]]  # cur at the image start
        pos[0, flat_rows, flat_cols] = first + a
        pos[1, flat_rows, flat_cols] = first + i
        pos[2, flat_rows, flat_cols] = first + j
    pos[:, ~mask] = 0

    num_valid = mask.sum(axis=1)
    max_pos = np.where(mask[None], pos, -1).max(axis=(0, 2))
    deltas = np.where(num_valid > 0, max_pos + 1 - num_valid, 0)
    return pos.astype(np.int32), deltas.astype(np.int32)


def decode_positions(num_valid: np.ndarray, rope_deltas: np.ndarray) -> np.ndarray:
    """[3, B] int32 M-RoPE position of the next token of each row: num_valid + delta, all axes.

    Args:
      num_valid: [B] real tokens (prompt plus generated so far) in each row.
      rope_deltas: [B] from `rope_index`.
    """
    nxt = np.asarray(num_valid, np.int64) + np.asarray(rope_deltas, np.int64)
    return np.broadcast_to(nxt, (3, nxt.shape[0])).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Vision tower metadata
# ---------------------------------------------------------------------------------------------


class VisionMeta(NamedTuple):
    """Where each patch row of a batch's images sits in the vision tower's packed layout.

    All images of a batch are packed into one sequence of windows (QWEN2_5_VL.md 3.1): each
    frame (one per image and temporal frame) contributes its own windows, one after the other,
    and the sequence is padded with empty windows to a bucket of W windows. A window holds
    S = (window_size / patch_size / merge)^2 merged units of m2 = merge^2 patch rows (S * m2 = 64
    rows for the real models); it lists its units row-major, windows run row-major over the
    frame's merged grid (the last ones clipped), and the empty slots of a clipped window are
    padding. No frame is padded to another's size: a batch of one large and many small images
    costs its real windows only.

    Both kinds of vision attention follow (exactly transformers' cu_window_seqlens and
    cu_seqlens): a window-attention block attends within each run of S * m2 rows, padding
    masked out of the keys; a full-attention block attends within each frame, the frames being
    segments of the packed sequence (`segment_ids`, 0 at padding), through `ops.attention`,
    which never holds [R, R] scores.

    The device code does:
      x = patch_embed(pixel_values[source])    # zero rows where source == -1
      cos/sin from rotary_pos, row for row
      window blocks: rows.reshape(W, S * m2), keys where segment_ids != 0
      full blocks:   attention over all R rows with segment_ids
      merged = merger(x)                       # [R / m2] slots: rows m2*u .. m2*u+m2-1
      features = merged[unpermute]             # original unit (= image token) order first

    Fields (R = W * S * m2 rows):
      source: [R] int32 patch row of pixel_values (original order) for each layout row, -1 at
        padding.
      rotary_pos: [R, 2] int32 (hpos, wpos) of each row; (0, 0) at padding.
      segment_ids: [R] int32, the row's frame (1, 2, ... over the batch's frames), 0 at padding.
      unpermute: [R / m2] int32 slot of each merged unit in original order (num_tokens of them),
        followed by the padding slots.
      num_tokens: real merged units = image tokens (sum of t * h * w / m2).
      num_patches: real patch rows (sum of t * h * w).
    """

    source: np.ndarray
    rotary_pos: np.ndarray
    segment_ids: np.ndarray
    unpermute: np.ndarray
    num_tokens: int
    num_patches: int


def num_windows(
    image_grid_thw: np.ndarray, *, merge_size: int = 2, window_size: int = 112, patch_size: int = 14
) -> int:
    """Attention windows of the packed vision layout of these images (`vision_metadata`)."""
    grid = _grids(image_grid_thw, merge_size)
    win = max(window_size // merge_size // patch_size, 1)
    return sum(
        t * -(-(h // merge_size) // win) * -(-(w // merge_size) // win) for t, h, w in grid.tolist()
    )


def vision_rotary_positions(image_grid_thw: np.ndarray, *, merge_size: int = 2) -> np.ndarray:
    """[P, 2] int32 (hpos, wpos) per patch row in ORIGINAL (merge-block major) order.

    Matches transformers `vision_utils.get_vision_position_ids` (frames repeat the list).
    """
    grid = _grids(image_grid_thw, merge_size)
    out = []
    for t, h, w in grid.tolist():
        hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge_size, merge_size, w // merge_size, merge_size)
        hpos = hpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    if not out:
        return np.zeros((0, 2), np.int32)
    return np.concatenate(out).astype(np.int32)


def window_index(
    image_grid_thw: np.ndarray, *, merge_size: int = 2, window_size: int = 112, patch_size: int = 14
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-level window order and window sizes (transformers `get_vision_window_index`).

    Per image and frame with merged grid gh x gw, windows of `window_size / merge / patch`
    (4) units square tile the grid (the last ones clipped), taken row-major, each listing its
    units row-major; offsets run over frames and images.

    Returns:
      order: [U] int64, order[k] = original unit index of the k-th unit in window order.
      window_units: [n_windows] int64 units per non-empty window, in order.
    """
    grid = _grids(image_grid_thw, merge_size)
    win = window_size // merge_size // patch_size
    if win < 1:
        raise ValueError(
            f"window_size={window_size} is smaller than one merged unit "
            f"(merge_size * patch_size = {merge_size * patch_size})"
        )
    orders, sizes = [], []
    offset = 0
    for t, h, w in grid.tolist():
        gh, gw = h // merge_size, w // merge_size
        nh, nw = -(-gh // win), -(-gw // win)
        padded = np.full((t, nh * win, nw * win), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t * nh * nw, win * win)
        keep = padded >= 0
        orders.append(padded[keep] + offset)
        sizes.append(keep.sum(axis=1))
        offset += t * gh * gw
    if not orders:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    sizes_all = np.concatenate(sizes)
    return np.concatenate(orders), sizes_all[sizes_all > 0]


def vision_metadata(
    image_grid_thw: np.ndarray,
    *,
    merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    num_windows: int | None = None,
) -> VisionMeta:
    """Builds the packed vision layout of `VisionMeta` (QWEN2_5_VL.md 3.1, 5.4, pitfall 8.3).

    Args:
      image_grid_thw: [n, 3] (t, h, w) patch grids, in the order of the pixel rows.
      num_windows: W, pad the sequence with empty windows up to this many (static shapes);
        None: the real count (at least 1).

    Raises:
      ValueError: bad grids, or a bucket smaller than the batch needs.
    """
    m2 = merge_size * merge_size
    grid = _grids(image_grid_thw, merge_size)
    win = window_size // merge_size // patch_size
    if win < 1:
        raise ValueError(
            f"window_size={window_size} is smaller than one merged unit "
            f"(merge_size * patch_size = {merge_size * patch_size})"
        )
    s_units = win * win
    windows, frame_of = [], []  # per window: its units (original index, -1 empty); its frame
    unit = 0
    frame = 0
    for t, h, w in grid.tolist():
        gh, gw = h // merge_size, w // merge_size
        nh, nw = -(-gh // win), -(-gw // win)
        for _ in range(t):
            frame += 1
            padded = np.full((nh * win, nw * win), -1, np.int64)
            padded[:gh, :gw] = unit + np.arange(gh * gw).reshape(gh, gw)
            windows.append(
                padded.reshape(nh, win, nw, win).transpose(0, 2, 1, 3).reshape(nh * nw, s_units)
            )
            frame_of.append(np.full(nh * nw, frame, np.int32))
            unit += gh * gw
    num_tokens = unit
    w_real = sum(len(x) for x in windows)
    w_total = max(w_real, 1) if num_windows is None else int(num_windows)
    if w_total < w_real:
        raise ValueError(
            f"num_windows={num_windows} is less than the {w_real} attention windows of the "
            "batch's images"
        )
    if w_total < 1:
        raise ValueError(f"num_windows={num_windows} must be at least 1")
    slots = np.full((w_total, s_units), -1, np.int64)  # original unit per slot
    frames = np.zeros(w_total, np.int32)
    if w_real:
        slots[:w_real] = np.concatenate(windows)
        frames[:w_real] = np.concatenate(frame_of)
    real_units = slots >= 0
    segment = np.repeat(np.where(real_units, frames[:, None], 0).reshape(-1), m2)
    slots = slots.reshape(-1)
    real = slots >= 0
    source = np.where(real[:, None], slots[:, None] * m2 + np.arange(m2), -1).reshape(-1)
    rotary = np.zeros((source.shape[0], 2), np.int32)
    has = source >= 0
    rotary[has] = vision_rotary_positions(grid, merge_size=merge_size)[source[has]]
    unpermute = np.empty(num_tokens, np.int64)
    unpermute[slots[real]] = np.flatnonzero(real)
    unpermute = np.concatenate([unpermute, np.flatnonzero(~real)])
    return VisionMeta(
        source=source.astype(np.int32),
        rotary_pos=rotary,
        segment_ids=segment.astype(np.int32),
        unpermute=unpermute.astype(np.int32),
        num_tokens=num_tokens,
        num_patches=num_tokens * m2,
    )
