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
    """What the jitted vision tower needs, all in WINDOW-PERMUTED order (P rows, U = P / 4 units).

    The device code does, with `m2 = merge_size**2` (4):
      x = patch_embed(pixel_values[perm])                  # rows in window order
      cos/sin from rotary_pos (hpos, wpos), row for row    # no further permutation
      window blocks: attend iff window_segment[q] == window_segment[k]
      full blocks:   attend iff full_segment[q] == full_segment[k]
      merged = merger(x)                                   # [U, D]: rows 4u..4u+3 -> unit u
      features = merged[unpermute][:num_tokens]            # image/token order

    Fields:
      perm: [P] int32 patch-row permutation: `pixel_values[perm]` is the window order. Padded
        rows (P >= num_patches) map to themselves.
      rotary_pos: [P, 2] int32 (hpos, wpos) of each permuted row; (0, 0) on padded rows.
      window_segment: [P] int32 window id (non-decreasing; one per non-empty 4x4-unit window of
        each image frame); padded rows share one id no real row has (the largest).
      full_segment: [P] int32 id of the (image, temporal frame) the row belongs to
        (non-decreasing); padded rows share one id no real row has (the largest).
      valid: [P] bool, True on the num_patches real rows (the first ones).
      unpermute: [U] int32 = argsort of the unit-level window order; `merged[unpermute]` puts the
        merged units back in original image/token order, padded units last.
      num_tokens: real merged units = image tokens (sum of t * h * w / 4).
      num_patches: real patch rows (sum of t * h * w).
    """

    perm: np.ndarray
    rotary_pos: np.ndarray
    window_segment: np.ndarray
    full_segment: np.ndarray
    valid: np.ndarray
    unpermute: np.ndarray
    num_tokens: int
    num_patches: int


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


def _unit_rows(unit_order: np.ndarray, m2: int) -> np.ndarray:
    """Patch-row permutation from a unit permutation: the m2 rows of each unit stay together."""
    return (np.asarray(unit_order, np.int64)[:, None] * m2 + np.arange(m2)).reshape(-1)


def vision_metadata(
    image_grid_thw: np.ndarray,
    *,
    merge_size: int = 2,
    window_size: int = 112,
    patch_size: int = 14,
    pad_to: int | None = None,
) -> VisionMeta:
    """Builds `VisionMeta` for a batch of images (QWEN2_5_VL.md 3.1, 5.4, pitfalls 8.3).

    Args:
      image_grid_thw: [n, 3] (t, h, w) patch grids, in the order of the pixel rows.
      pad_to: pad the P patch rows up to this many (a multiple of merge_size**2) so shapes stay
        static; padded rows and units go last. None: P = the real patch count.

    Raises:
      ValueError: bad grids, or `pad_to` too small or not a multiple of merge_size**2.
    """
    m2 = merge_size * merge_size
    grid = _grids(image_grid_thw, merge_size)
    frame_patches = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])  # one entry per frame
    num_patches = int(frame_patches.sum())
    num_tokens = num_patches // m2
    total = num_patches if pad_to is None else int(pad_to)
    if total < num_patches or total % m2:
        raise ValueError(
            f"pad_to={pad_to} must be a multiple of {m2} and at least the {num_patches} patch rows"
        )
    units = total // m2

    order, window_units = window_index(
        grid, merge_size=merge_size, window_size=window_size, patch_size=patch_size
    )
    unit_perm = np.concatenate([order, np.arange(num_tokens, units)])
    perm = _unit_rows(unit_perm, m2)

    rotary = np.zeros((total, 2), np.int32)
    rotary[:num_patches] = vision_rotary_positions(grid, merge_size=merge_size)[perm[:num_patches]]

    window_segment = np.full((total,), len(window_units), np.int32)
    window_segment[:num_patches] = np.repeat(np.arange(len(window_units)), window_units * m2)
    full_segment = np.full((total,), len(frame_patches), np.int32)
    full_segment[:num_patches] = np.repeat(np.arange(len(frame_patches)), frame_patches)
    valid = np.arange(total) < num_patches

    return VisionMeta(
        perm=perm.astype(np.int32),
        rotary_pos=rotary,
        window_segment=window_segment,
        full_segment=full_segment,
        valid=valid,
        unpermute=np.argsort(unit_perm, kind="stable").astype(np.int32),
        num_tokens=num_tokens,
        num_patches=num_patches,
    )
