"""Tests for ares_jax/models/qwen2_5_vl/positions.py (M-RoPE ids, vision window metadata)."""

import numpy as np
import pytest

from ares_jax.models.qwen2_5_vl import positions

IMG, VS, VE = 250, 252, 253
# Merged grids not multiples of the 4-unit window, and one image smaller than a window
# (QWEN2_5_VL.md 6.2 step 3, pitfall 8.3).
GRIDS = [(1, 16, 20), (1, 6, 4), (1, 10, 28)]


def _row(*parts):
    out = []
    for p in parts:
        out.extend(p)
    return out


def _image(grid):
    t, h, w = grid
    return [VS] + [IMG] * (t * h * w // 4) + [VE]


def _left_pad(rows, pad=0):
    length = max(len(r) for r in rows) + 3
    ids = np.full((len(rows), length), pad, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    return ids, mask


def _three_row_batch():
    rng = np.random.default_rng(0)

    def text(n):
        return rng.integers(1, 200, n).tolist()

    rows = [
        _row(text(5), _image(GRIDS[0]), text(3), _image(GRIDS[1]), text(4)),
        _row(text(2), _image(GRIDS[2]), text(7)),
        text(10),
    ]
    return _left_pad(rows)


def test_worked_example_delta_minus_70():
    # QWEN2_5_VL.md 3.2: 5 text, VS, 80 image tokens (merged 8 x 10), VE, 7 text.
    ids = np.array([[1, 2, 3, 4, 5] + _image((1, 16, 20)) + [6] * 7])
    mask = np.ones_like(ids)
    pos, delta = positions.rope_index(
        ids, mask, np.array([[1, 16, 20]]), image_token_id=IMG, vision_start_token_id=VS
    )
    assert pos.shape == (3, 1, 94) and pos.dtype == np.int32
    np.testing.assert_array_equal(pos[:, 0, :6], np.tile(np.arange(6), (3, 1)))
    img = pos[:, 0, 6:86]
    assert (img[0] == 6).all()
    np.testing.assert_array_equal(img[1], 6 + np.repeat(np.arange(8), 10))
    np.testing.assert_array_equal(img[2], 6 + np.tile(np.arange(10), 8))
    np.testing.assert_array_equal(pos[:, 0, 86:], np.tile(np.arange(16, 24), (3, 1)))
    assert delta.tolist() == [-70]
    np.testing.assert_array_equal(positions.decode_positions(np.array([94]), delta), [[24]] * 3)


def test_text_only_and_padding():
    ids, mask = _left_pad([[5, 6, 7], [1, 2, 3, 4, 5, 6]])
    pos, delta = positions.rope_index(
        ids, mask, np.zeros((0, 3)), image_token_id=IMG, vision_start_token_id=VS
    )
    assert delta.tolist() == [0, 0]
    assert (pos[:, ~mask.astype(bool)] == 0).all()
    np.testing.assert_array_equal(pos[:, 0, -3:], np.tile(np.arange(3), (3, 1)))
    np.testing.assert_array_equal(pos[:, 1, -6:], np.tile(np.arange(6), (3, 1)))


def test_adjacent_images_split_by_counts():
    # Two images in one vision block: HF 5.x would merge them; counts split them.
    ids = np.array([[1, VS] + [IMG] * 6 + [IMG] * 6 + [VE, 2]])
    pos, delta = positions.rope_index(
        ids,
        np.ones_like(ids),
        np.array([[1, 6, 4], [1, 4, 6]]),
        image_token_id=IMG,
        vision_start_token_id=VS,
    )
    # first image starts at 2, spans max(3, 2) = 3; second starts at 5.
    assert pos[1, 0, 2:8].tolist() == [2, 2, 3, 3, 4, 4]
    assert pos[2, 0, 8:14].tolist() == [5, 6, 7, 5, 6, 7]
    assert pos[0, 0, 14] == 8 and delta.tolist() == [10 - 16]


def test_rope_index_errors():
    ids = np.array([[1, VS] + [IMG] * 6 + [VE]])
    mask = np.ones_like(ids)
    with pytest.raises(ValueError, match="6 image-pad tokens but .* needs 20"):
        positions.rope_index(
            ids, mask, np.array([[1, 8, 10]]), image_token_id=IMG, vision_start_token_id=VS
        )
    bad = np.array([[1, 7] + [IMG] * 6 + [VE]])
    with pytest.raises(ValueError, match="not preceded by the vision start token 252"):
        positions.rope_index(
            bad, mask, np.array([[1, 6, 4]]), image_token_id=IMG, vision_start_token_id=VS
        )
    with pytest.raises(ValueError, match="divisible by merge_size"):
        positions.rope_index(
            ids, mask, np.array([[1, 3, 8]]), image_token_id=IMG, vision_start_token_id=VS
        )


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.hf_tiny import hf_model as tiny

    return tiny()


@pytest.mark.requires_torch
def test_rope_index_matches_hf(hf_model):
    import torch

    ids, mask = _three_row_batch()
    grid = np.array(GRIDS)
    pos, delta = positions.rope_index(ids, mask, grid, image_token_id=IMG, vision_start_token_id=VS)

    hf_model.model.rope_deltas = None
    with torch.no_grad():
        hf_pos, hf_delta = hf_model.model.get_rope_index(
            torch.tensor(ids),
            torch.tensor((ids == IMG).astype(np.int64)),
            torch.tensor(grid),
            attention_mask=torch.tensor(mask),
        )
    hf_model.model.rope_deltas = None
    valid = mask.astype(bool)
    np.testing.assert_array_equal(pos[:, valid], hf_pos.numpy()[:, valid])
    np.testing.assert_array_equal(delta, hf_delta.numpy().reshape(-1))
    assert delta[2] == 0 and delta[0] < 0 and delta[1] < 0
    # Next-token positions: max + 1 per row.
    nxt = positions.decode_positions(mask.sum(1), delta)
    for b in range(3):
        assert (nxt[:, b] == pos[:, b][:, valid[b]].max() + 1).all()


# ---------------------------------------------------------------------------------------------
# Vision metadata
# ---------------------------------------------------------------------------------------------

GRID_SETS = [
    [(1, 16, 20)],
    [(1, 6, 4)],
    [(1, 10, 28)],
    [(1, 16, 20), (1, 6, 4), (1, 10, 28)],
    [(1, 8, 8), (2, 12, 18), (1, 2, 2)],  # a window-aligned image, a 2-frame grid, one unit
]


def _blocks(meta, rows_per_block):
    """Original unit indices held by each block of the layout (padding dropped)."""
    units = np.where(meta.source >= 0, meta.source // 4, -1).reshape(-1, rows_per_block)
    return [sorted(set(b[b >= 0].tolist())) for b in units]


@pytest.mark.requires_torch
@pytest.mark.parametrize("grids", GRID_SETS)
def test_vision_metadata_matches_hf(grids):
    torch = pytest.importorskip("torch")
    vision_utils = pytest.importorskip("transformers.vision_utils")

    grid = np.array(grids)
    meta = positions.vision_metadata(grid)
    g = torch.tensor(grid)
    hf_index, hf_cu_window = vision_utils.get_vision_window_index(
        g, spatial_merge_size=2, window_size=112, patch_size=14
    )
    hf_cu_full = vision_utils.get_vision_cu_seqlens(g).numpy()
    hf_rot = vision_utils.get_vision_position_ids(g, 2).numpy()
    hf_index = hf_index.numpy()
    n = int((grid.prod(1)).sum())
    assert meta.num_patches == n and meta.num_tokens == n // 4
    assert meta.source.dtype == np.int32 and (meta.segment_ids > 0).sum() == n
    # Every real patch row appears exactly once; units keep their 4 rows together, in order.
    real = meta.source[meta.source >= 0]
    np.testing.assert_array_equal(np.sort(real), np.arange(n))
    rows = meta.source.reshape(-1, 4)
    used = rows[:, 0] >= 0
    np.testing.assert_array_equal(rows[used], rows[used][:, :1] + np.arange(4))
    # Windows: the non-empty 64-row blocks hold HF's windows, in HF's order.
    hf_windows = np.split(hf_index, (np.asarray(hf_cu_window.numpy()) // 4)[1:-1])
    ours = [w for w in _blocks(meta, 64) if w]
    assert ours == [sorted(w.tolist()) for w in hf_windows]
    # Full attention: the segments hold HF's cu_seqlens segments, in order, and padding is 0.
    hf_frames = [
        list(range(a // 4, b // 4)) for a, b in zip(hf_cu_full[:-1], hf_cu_full[1:], strict=True)
    ]
    unit_seg = meta.segment_ids.reshape(-1, 4)[:, 0]
    ours = [sorted(set(rows[unit_seg == f, 0] // 4)) for f in range(1, unit_seg.max() + 1)]
    assert ours == hf_frames
    np.testing.assert_array_equal(meta.segment_ids > 0, meta.source >= 0)
    # Packed: the frames' windows follow each other, nothing padded beyond the last window.
    assert len(meta.source) == 64 * positions.num_windows(grid)
    # Rotary positions follow their rows.
    np.testing.assert_array_equal(meta.rotary_pos[meta.source >= 0], hf_rot[real])
    assert (meta.rotary_pos[meta.source < 0] == 0).all()
    # unpermute lists the slot of each unit in original order, then the padding slots.
    slot_unit = rows[:, 0] // 4
    np.testing.assert_array_equal(slot_unit[meta.unpermute[: n // 4]], np.arange(n // 4))
    assert (rows[meta.unpermute[n // 4 :], 0] < 0).all()
    assert sorted(meta.unpermute.tolist()) == list(range(rows.shape[0]))


def test_vision_metadata_small_image_and_nonmultiple_grid():
    # 6 x 4 patches = 3 x 2 units: one clipped window holding all 6 units, row-major.
    meta = positions.vision_metadata(np.array([[1, 6, 4]]))
    assert meta.segment_ids.shape == (64,)
    # Units sit at their place in the 4 x 4 window; the clipped part is padding.
    slots = meta.source.reshape(4, 4, 4)[..., 0] // 4
    assert slots.tolist() == [[0, 1, -1, -1], [2, 3, -1, -1], [4, 5, -1, -1], [-1] * 4]
    np.testing.assert_array_equal(meta.source[meta.source >= 0], np.arange(24))
    # 16 x 20 patches = 8 x 10 units: windows of 4 x 4, the last column of windows 4 x 2.
    meta = positions.vision_metadata(np.array([[1, 16, 20]]))
    assert meta.segment_ids.shape == (6 * 64,)
    first_window = meta.source.reshape(-1, 4)[:16, 0] // 4
    np.testing.assert_array_equal(first_window, (np.arange(4)[:, None] * 10 + np.arange(4)).ravel())
    sizes = (meta.segment_ids > 0).reshape(6, 64).sum(1) // 4
    assert sizes.tolist() == [16, 16, 8, 16, 16, 8]


def test_vision_metadata_buckets():
    grid = np.array(GRIDS)
    exact = positions.vision_metadata(grid)
    # 8 x 10 units: 6 windows; 3 x 2 units: 1; 5 x 14 units: 8. Packed, no frame padded to the
    # largest (which would be 3 x 8 windows).
    assert positions.num_windows(grid) == 15
    assert exact.segment_ids.shape == (15 * 64,)
    frame_windows = (exact.segment_ids.reshape(15, 64).max(1)).tolist()
    assert frame_windows == [1] * 6 + [2] + [3] * 8
    meta = positions.vision_metadata(grid, num_windows=16)
    assert meta.segment_ids.shape == (16 * 64,) and meta.unpermute.shape == (16 * 64 // 4,)
    assert (meta.segment_ids > 0).sum() == 624 and not meta.segment_ids[15 * 64 :].any()
    np.testing.assert_array_equal(meta.source[: 15 * 64], exact.source)
    with pytest.raises(ValueError, match="num_windows=14 is less than the 15 attention windows"):
        positions.vision_metadata(grid, num_windows=14)


def test_vision_metadata_no_images():
    meta = positions.vision_metadata(np.zeros((0, 3), np.int32), num_windows=2)
    assert meta.num_tokens == 0 and meta.num_patches == 0
    assert meta.segment_ids.shape == (128,) and not meta.segment_ids.any()
    assert (meta.source == -1).all() and meta.unpermute.shape == (32,)


def test_rotary_positions_merge_block_order():
    rot = positions.vision_rotary_positions(np.array([[1, 4, 4]]))
    # First merged unit (0, 0): patches (0,0) (0,1) (1,0) (1,1); then unit (0, 1).
    assert rot[:8].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
