"""Host-side assembly of `ModelInputs` from Hugging Face processor-shaped arrays.

Everything data-dependent (M-RoPE positions, the window permutation, segment ids, which feature
row goes to which image token) is computed here in NumPy, once per batch, so the jitted model only
sees static shapes (QWEN2_5_VL.md 2, 3.1, 3.2).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ares_jax.models.qwen2_5_vl import positions
from ares_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ares_jax.models.qwen2_5_vl.model import ModelInputs, VisionInputs
from ares_jax.parallel import rules as R


def vision_inputs(pixel_values: np.ndarray, meta: positions.VisionMeta) -> VisionInputs:
    """Patch rows gathered into the vision layout (zeros at padding), with their metadata."""
    pixels = np.asarray(pixel_values, np.float32)
    padded = np.concatenate([pixels, np.zeros((1, pixels.shape[1]), np.float32)])
    return VisionInputs(
        pixels=padded[meta.source],  # source -1 picks the zero row
        rotary_pos=meta.rotary_pos,
        segment_ids=meta.segment_ids,
        unpermute=meta.unpermute,
    )


def image_index(input_ids: np.ndarray, image_token_id: int) -> np.ndarray:
    """[B, T] row of the image features for each image token (row-major over the batch), -1 else."""
    is_image = np.asarray(input_ids) == image_token_id
    order = np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1
    return np.where(is_image, order, -1).astype(np.int32)


def from_hf(
    cfg: Qwen2_5_VLConfig,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    *,
    num_windows: int | None = None,
) -> ModelInputs:
    """`ModelInputs` (NumPy) from input_ids [B, T], attention_mask [B, T], pixel_values
    [P, patch_in] in the processor's order and image_grid_thw [n, 3], as the Hugging Face
    processor returns them."""
    ids = np.asarray(input_ids).astype(np.int32)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    mask = mask.astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape} but input_ids has {ids.shape}.")
    grid = (
        np.zeros((0, 3), np.int32) if image_grid_thw is None else np.asarray(image_grid_thw)
    ).astype(np.int64)
    v = cfg.vision
    num_image_tokens = int(np.sum((ids == cfg.image_token_id) & mask))
    expected = int(np.sum(np.prod(grid, axis=1))) // v.spatial_merge_size**2
    if num_image_tokens != expected:
        raise ValueError(
            f"The batch has {num_image_tokens} image tokens but image_grid_thw describes "
            f"{expected}: more or fewer images than placeholders."
        )
    pos, _ = positions.rope_index(
        ids,
        mask,
        grid,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        merge_size=v.spatial_merge_size,
    )
    vision = None
    if len(grid):
        if pixel_values is None:
            raise ValueError("image_grid_thw is given but pixel_values is None.")
        pixels = np.asarray(pixel_values)
        if pixels.ndim != 2 or pixels.shape[1] != v.patch_dim:
            raise ValueError(
                f"pixel_values must be [patches, {v.patch_dim}], got shape {pixels.shape}."
            )
        if pixels.shape[0] != int(np.sum(np.prod(grid, axis=1))):
            raise ValueError(
                f"pixel_values has {pixels.shape[0]} patch rows but image_grid_thw describes "
                f"{int(np.sum(np.prod(grid, axis=1)))}."
            )
        meta = positions.vision_metadata(
            grid,
            merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            patch_size=v.patch_size,
            num_windows=num_windows,
        )
        vision = vision_inputs(pixels, meta)
    return ModelInputs(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos.astype(np.int32),
        image_index=image_index(ids, cfg.image_token_id) if vision is not None else None,
        vision=vision,
    )


def from_encoded(encoded: Mapping[str, object]) -> ModelInputs:
    """`ModelInputs` (NumPy) from the dict of `processor.encode_batch`."""
    meta = encoded.get("vision")
    vision = None
    index = None
    if meta is not None and len(np.asarray(encoded["image_grid_thw"])):
        vision = vision_inputs(np.asarray(encoded["pixel_values"]), meta)
        types = np.asarray(encoded["mm_token_type_ids"])
        index = np.where(types == 1, np.asarray(encoded["image_feature_index"]), -1)
        index = index.astype(np.int32)
    return ModelInputs(
        input_ids=np.asarray(encoded["input_ids"], np.int32),
        attention_mask=np.asarray(encoded["attention_mask"]).astype(bool),
        position_ids=np.asarray(encoded["position_ids"], np.int32),
        image_index=index,
        vision=vision,
    )


def logical_axes(inputs: ModelInputs, *, leading: int = 0) -> ModelInputs:
    """Logical axis names of each array of `inputs` (None where a field is None), for placing a
    host batch on the mesh: token rows over `batch`, positions whole; the vision arrays are
    replicated, since the tower constrains its patches itself and its index arrays are gathered
    from whole. `leading` unnamed axes come first (the learner's micro-batch axis)."""
    lead = (None,) * leading
    rows = (*lead, R.BATCH, R.LENGTH)
    vision = None
    if inputs.vision is not None:
        vision = type(inputs.vision)(*[(None,) * np.ndim(x) for x in inputs.vision])
    return ModelInputs(
        input_ids=rows,
        attention_mask=rows,
        position_ids=(*lead, None, R.BATCH, R.LENGTH),
        image_index=None if inputs.image_index is None else rows,
        vision=vision,
    )
