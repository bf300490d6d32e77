"""Host-side assembly of the sampler's and the learner's inputs (NumPy, static shapes).

A batch of prompts is encoded once (`encode_prompts`): token ids left-padded to a length bucket,
M-RoPE positions, and each prompt's image patches. From it the sampler gets one row per prompt
(`sampler_inputs`). The learner gets micro-batches of (prompt + response) rows (`learner_batch`).
Each micro-batch carries the images of the prompts its rows belong to, laid out for the vision
tower with static (frames, windows) sizes, so every micro-batch has the same shapes and one
compiled update serves the whole run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ares_jax.aepo.learner import LearnerBatch
from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import positions, processor
from ares_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.parallel import rules as R


@dataclasses.dataclass
class Prompts:
    """B encoded prompts."""

    ids: np.ndarray  # [B, P] int32, left-padded
    mask: np.ndarray  # [B, P] bool
    positions: np.ndarray  # [3, B, P] int32
    next_pos: np.ndarray  # [B] int32, the first response token's position on all three axes
    patches: list[np.ndarray]  # per prompt [patch rows, patch_in] float32
    grids: list[np.ndarray]  # per prompt [images, 3] int32

    @property
    def size(self) -> int:
        return self.ids.shape[0]

    @property
    def has_images(self) -> bool:
        return any(len(g) for g in self.grids)


def encode_prompts(
    questions: Sequence[str],
    images: Sequence[Sequence[bytes]],
    tokenizer,
    cfg: Qwen2_5_VLConfig,
    *,
    template: str,
    min_pixels: int,
    max_pixels: int,
    length_buckets: Sequence[int],
) -> Prompts:
    """Chat prompts (question + the think/boxed instruction) with their images, encoded."""
    texts = [
        processor.build_prompt(q, len(imgs), suffix=template)
        for q, imgs in zip(questions, images, strict=True)
    ]
    enc = processor.encode_batch(
        texts,
        [list(imgs) for imgs in images],
        tokenizer,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_token_id=cfg.image_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        pad_id=cfg.pad_token_id,
        length_buckets=length_buckets,
        patch_size=cfg.vision.patch_size,
        temporal_patch_size=cfg.vision.temporal_patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        window_size=cfg.vision.window_size,
    )
    counts = [len(imgs) for imgs in images]
    grid = np.asarray(enc["image_grid_thw"]).reshape(-1, 3)
    grids = np.split(grid, np.cumsum(counts)[:-1]) if len(counts) else []
    rows = np.split(
        np.asarray(enc["pixel_values"]), np.cumsum([int(np.prod(g, 1).sum()) for g in grids])[:-1]
    )
    mask = np.asarray(enc["attention_mask"]).astype(bool)
    pos = np.asarray(enc["position_ids"], np.int32)
    next_pos = np.max(np.where(mask[None], pos, -1), axis=(0, 2)) + 1
    return Prompts(
        ids=np.asarray(enc["input_ids"], np.int32),
        mask=mask,
        positions=pos,
        next_pos=next_pos.astype(np.int32),
        patches=[r.astype(np.float32) for r in rows],
        grids=[g.astype(np.int32) for g in grids],
    )


def encode_examples(examples: Sequence, tokenizer, cfg: Qwen2_5_VLConfig, **kwargs) -> Prompts:
    """`encode_prompts` of data-set Examples (their questions and images)."""
    return encode_prompts(
        [e.question for e in examples], [e.images for e in examples], tokenizer, cfg, **kwargs
    )


def _vision(prompts: Prompts, which: Sequence[int], cfg, num_frames, windows_per_frame):
    """VisionInputs for the images of prompts `which`, in that order, and each prompt's first
    feature row."""
    v = cfg.vision
    grids = [prompts.grids[p] for p in which]
    grid = np.concatenate(grids) if grids else np.zeros((0, 3), np.int32)
    patches = [prompts.patches[p] for p in which]
    pixels = np.concatenate(patches) if patches else np.zeros((0, v.patch_dim), np.float32)
    meta = positions.vision_metadata(
        grid,
        merge_size=v.spatial_merge_size,
        window_size=v.window_size,
        patch_size=v.patch_size,
        num_frames=num_frames,
        windows_per_frame=windows_per_frame,
    )
    tokens = [int(np.prod(g, 1).sum()) // v.spatial_merge_size**2 for g in grids]
    offsets = np.concatenate([[0], np.cumsum(tokens)[:-1]]).astype(np.int64)
    return model_inputs.vision_inputs(pixels, meta), dict(zip(which, offsets, strict=True))


def _prompt_image_index(ids_row, mask_row, image_token_id, offset):
    is_image = (ids_row == image_token_id) & mask_row
    return np.where(is_image, offset + np.cumsum(is_image) - 1, -1)


def sampler_inputs(
    prompts: Prompts, cfg, *, num_frames=None, windows_per_frame=None
) -> ModelInputs:
    """One row per prompt, with all the batch's images."""
    vision, index = None, None
    if prompts.has_images:
        order = list(range(prompts.size))
        vision, offsets = _vision(prompts, order, cfg, num_frames, windows_per_frame)
        index = np.stack(
            [
                _prompt_image_index(prompts.ids[b], prompts.mask[b], cfg.image_token_id, offsets[b])
                for b in order
            ]
        ).astype(np.int32)
    return ModelInputs(prompts.ids, prompts.mask, prompts.positions, index, vision)


@dataclasses.dataclass
class Rows:
    """N generated rows and what the update needs of them (host NumPy)."""

    prompt: np.ndarray  # [N] int, index into the Prompts
    tokens: np.ndarray  # [N, T] int32
    mask: np.ndarray  # [N, T] bool
    advantages: np.ndarray  # [N] float32
    bucket: np.ndarray  # [N] int32
    correct: np.ndarray  # [N] bool
    soft_cost: np.ndarray  # [N] float32
    window_mask: np.ndarray  # [N, T] bool

    def select(self, idx: np.ndarray) -> Rows:
        return Rows(**{f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)})


def frames_needed(prompts: Prompts, rows: Rows, micro_batch_size: int) -> int:
    """The largest number of image frames one micro-batch of consecutive rows needs."""
    most = 0
    for start in range(0, len(rows.prompt), micro_batch_size):
        which = dict.fromkeys(rows.prompt[start : start + micro_batch_size].tolist())
        most = max(most, sum(int(prompts.grids[p][:, 0].sum()) for p in which))
    return most


def windows_needed(prompts: Prompts, which: Sequence[int], cfg) -> int:
    """The most attention windows one image frame of prompts `which` has (the vision layout pads
    every frame to this many)."""
    v = cfg.vision
    win = v.window_size // v.spatial_merge_size // v.patch_size
    most = 1
    for p in which:
        for _, h, w in np.asarray(prompts.grids[p]).reshape(-1, 3).tolist():
            gh, gw = h // v.spatial_merge_size, w // v.spatial_merge_size
            most = max(most, -(-gh // win) * -(-gw // win))
    return most


def learner_batch(
    prompts: Prompts,
    rows: Rows,
    cfg: Qwen2_5_VLConfig,
    *,
    micro_batch_size: int,
    num_micro: int,
    num_frames: int | None = None,
    windows_per_frame: int | None = None,
) -> LearnerBatch:
    """Rows (prompt + response) in `num_micro` micro-batches of `micro_batch_size` rows.

    Rows beyond N are padding (row_valid False, empty masks). old_logp and ref_logp are zeros, to
    be filled by the learner's log-prob passes. Every micro-batch's image frames are padded to
    `windows_per_frame` windows, by default the largest frame's of the whole batch.
    """
    n, t = rows.tokens.shape
    mb = micro_batch_size
    if n > num_micro * mb:
        raise ValueError(f"learner_batch: {n} rows do not fit {num_micro} x {mb}.")
    pad = num_micro * mb - n
    idx = np.concatenate([np.arange(n), np.full(pad, max(n - 1, 0))]).astype(np.int64)
    valid = np.arange(num_micro * mb) < n
    r = rows.select(idx)
    p_ids = prompts.ids[r.prompt]
    ids = np.concatenate([p_ids, np.where(r.mask, r.tokens, cfg.pad_token_id)], 1).astype(np.int32)
    mask = np.concatenate([prompts.mask[r.prompt], r.mask & valid[:, None]], 1)
    resp_pos = prompts.next_pos[r.prompt][:, None] + np.arange(t)[None, :]
    pos = np.concatenate(
        [prompts.positions[:, r.prompt], np.broadcast_to(resp_pos, (3, len(idx), t))], 2
    ).astype(np.int32)
    if prompts.has_images and windows_per_frame is None:
        # One frame layout for every micro-batch (they are stacked): the largest frame of all.
        windows_per_frame = windows_needed(prompts, sorted(set(r.prompt.tolist())), cfg)
    micro_inputs = []
    for m in range(num_micro):
        sl = slice(m * mb, (m + 1) * mb)
        vision, index = None, None
        if prompts.has_images:
            which = list(dict.fromkeys(r.prompt[sl].tolist()))
            vision, offsets = _vision(prompts, which, cfg, num_frames, windows_per_frame)
            index = np.stack(
                [
                    np.concatenate(
                        [
                            _prompt_image_index(
                                prompts.ids[p], prompts.mask[p], cfg.image_token_id, offsets[p]
                            ),
                            np.full(t, -1),
                        ]
                    )
                    for p in r.prompt[sl]
                ]
            ).astype(np.int32)
        micro_inputs.append(ModelInputs(ids[sl], mask[sl], pos[:, sl], index, vision))
    stacked = ModelInputs(
        input_ids=np.stack([x.input_ids for x in micro_inputs]),
        attention_mask=np.stack([x.attention_mask for x in micro_inputs]),
        position_ids=np.stack([x.position_ids for x in micro_inputs]),
        image_index=None
        if micro_inputs[0].image_index is None
        else np.stack([x.image_index for x in micro_inputs]),
        vision=None
        if micro_inputs[0].vision is None
        else type(micro_inputs[0].vision)(
            *[np.stack(parts) for parts in zip(*[x.vision for x in micro_inputs], strict=True)]
        ),
    )

    def micro(x):
        return x.reshape(num_micro, mb, *x.shape[1:])

    zeros = np.zeros((num_micro, mb, t), np.float32)
    return LearnerBatch(
        inputs=stacked,
        tokens=micro(r.tokens.astype(np.int32)),
        mask=micro(r.mask & valid[:, None]),
        advantages=micro(r.advantages.astype(np.float32)),
        bucket=micro(r.bucket.astype(np.int32)),
        correct=micro(r.correct.astype(bool)),
        soft_cost=micro(r.soft_cost.astype(np.float32)),
        window_mask=micro(r.window_mask & valid[:, None]),
        row_valid=micro(valid),
        old_logp=zeros,
        ref_logp=zeros.copy(),
    )


def learner_shardings(batch: LearnerBatch, mesh, rules=None) -> LearnerBatch:
    """Shardings that put a host `LearnerBatch` on `mesh` (with `parallel.multihost.put`): each
    micro-batch's rows over the `batch` axes, everything else whole."""
    rows = (None, R.BATCH)
    axes = LearnerBatch(
        inputs=model_inputs.logical_axes(batch.inputs, leading=1),
        tokens=(*rows, None),
        mask=(*rows, None),
        advantages=rows,
        bucket=rows,
        correct=rows,
        soft_cost=rows,
        window_mask=(*rows, None),
        row_valid=rows,
        old_logp=(*rows, None),
        ref_logp=(*rows, None),
    )
    return R.tree_shardings(mesh, axes, batch, rules)
