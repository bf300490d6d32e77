"""Host-side assembly of the model's inputs for every stage (NumPy, static shapes).

The sampler (rollouts, AdaCS pass rates, evaluation), the AEPO learner and AdaCS fine-tuning all
take their batches from here; this module sits below the stages and imports none of them.

A batch of prompts is encoded once (`encode_prompts`): token ids left-padded to a length bucket,
M-RoPE positions, and each prompt's image patches. From it the sampler gets one row per prompt
(`sampler_inputs`). The learner gets micro-batches of (prompt + response) rows (`learner_batch`),
padded or packed end to end into rows of a token budget (`pack_plan`). Each micro-batch carries
the images of the prompts its rows belong to, packed for the vision tower into one sequence of
attention windows padded to a bucket shared by all the micro-batches of a step (`window_bucket`),
so they stack and one compiled update serves every step of that bucket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import numpy as np

from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import positions, processor
from ares_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.parallel import rules as R


class Packing(NamedTuple):
    """Where a packed micro-batch's response tokens sit (`learner_batch`): R packed rows of
    L tokens hold the micro-batch's sequences end to end; its mb = R * slots per-row entries are
    share-major (entries [d * slots, (d + 1) * slots) are packed row d's sequences)."""

    targets: jax.Array  # [M, R, L] int32: the token position j predicts (0 where none)
    index: jax.Array  # [M, mb, T] int32: flat position in R * L predicting response token t


class LearnerBatch(NamedTuple):
    """M micro-batches of mb rows; S = prompt length P + response length T.

    Padded, each micro-batch's inputs are its mb rows [mb, S]; packed (`packing` set), they are
    R rows of L tokens with segment ids in `attention_mask`. Everything else is per row or per
    response token either way.
    """

    inputs: ModelInputs  # leaves [M, ...]: ids [M, mb, S] or [M, R, L], vision per micro-batch
    tokens: jax.Array  # [M, mb, T] int32 response tokens
    mask: jax.Array  # [M, mb, T] bool response positions (False on padding rows)
    advantages: jax.Array  # [M, mb] float32
    bucket: jax.Array  # [M, mb] int32, 0 easy / 1 medium / 2 hard
    correct: jax.Array  # [M, mb] bool
    soft_cost: jax.Array  # [M, mb] float32
    window_mask: jax.Array  # [M, mb, T] bool, tokens in validated HWE windows
    row_valid: jax.Array  # [M, mb] bool, False on padding rows
    old_logp: jax.Array  # [M, mb, T] float32
    ref_logp: jax.Array  # [M, mb, T] float32
    packing: Packing | None = None


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
    image_mean: Sequence[float] = processor.IMAGE_MEAN,
    image_std: Sequence[float] = processor.IMAGE_STD,
) -> Prompts:
    """Chat prompts (question + the think/boxed instruction) with their images, encoded; images
    resized within [min_pixels, max_pixels] and normalised with image_mean/image_std."""
    texts = [
        processor.chat_prompt(tokenizer, q, len(imgs), suffix=template)
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
        mean=image_mean,
        std=image_std,
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


def _vision(prompts: Prompts, which: Sequence[int], cfg, num_windows: int):
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
        num_windows=num_windows,
    )
    tokens = [int(np.prod(g, 1).sum()) // v.spatial_merge_size**2 for g in grids]
    offsets = np.concatenate([[0], np.cumsum(tokens)[:-1]]).astype(np.int64)
    return model_inputs.vision_inputs(pixels, meta), dict(zip(which, offsets, strict=True))


def _prompt_image_index(ids_row, mask_row, image_token_id, offset):
    is_image = (ids_row == image_token_id) & mask_row
    return np.where(is_image, offset + np.cumsum(is_image) - 1, -1)


def sampler_inputs(prompts: Prompts, cfg, *, num_windows: int | None = None) -> ModelInputs:
    """One row per prompt, with all the batch's images, their windows padded to `num_windows`
    (default: `window_bucket` of what they need, so few shapes ever compile)."""
    vision, index = None, None
    if prompts.has_images:
        order = list(range(prompts.size))
        if num_windows is None:
            num_windows = window_bucket(windows_of(prompts, order, cfg))
        vision, offsets = _vision(prompts, order, cfg, num_windows)
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


def pow2(n: int) -> int:
    """The power of two at or above n (a bucket that changes rarely: window counts, lengths)."""
    return 1 << max(int(n) - 1, 0).bit_length()


def window_bucket(n: int) -> int:
    """The static window count of a packed vision layout holding n windows: n rounded up to an
    eighth of the power of two above it (at most 4 sizes per octave, at most 25% padding; 8 and
    below: the power of two)."""
    p = pow2(n)
    if p <= 8:
        return p
    step = p // 8
    return -(-int(n) // step) * step


def windows_of(prompts: Prompts, which: Sequence[int], cfg) -> int:
    """Attention windows of the packed vision layout of the images of prompts `which`."""
    v = cfg.vision
    grids = [np.asarray(prompts.grids[p]).reshape(-1, 3) for p in which]
    return positions.num_windows(
        np.concatenate(grids) if grids else np.zeros((0, 3), np.int64),
        merge_size=v.spatial_merge_size,
        window_size=v.window_size,
        patch_size=v.patch_size,
    )


def windows_needed(
    prompts: Prompts, rows: Rows, micro_batch_size: int, cfg, *, plan: PackPlan | None = None
) -> int:
    """The most attention windows the images of one micro-batch need: of consecutive rows, or
    of the rows a `plan` puts in it."""
    if plan is None:
        groups = [
            rows.prompt[start : start + micro_batch_size]
            for start in range(0, len(rows.prompt), micro_batch_size)
        ]
    else:
        groups = [rows.prompt[[i for share in micro for i in share]] for micro in plan.shares]
    return max(
        (windows_of(prompts, list(dict.fromkeys(g.tolist())), cfg) for g in groups), default=0
    )


def sequence_lengths(prompts: Prompts, rows: Rows) -> np.ndarray:
    """[N] tokens of each row's packed sequence: its prompt without padding, then its response
    (the mask's prefix; a response is contiguous from position 0)."""
    resp = rows.mask.sum(1)
    if not (rows.mask == (np.arange(rows.mask.shape[1])[None] < resp[:, None])).all():
        raise ValueError("learner_batch: a response mask is not a prefix of its row.")
    return prompts.mask[rows.prompt].sum(1) + resp


def pack_length_needed(prompts: Prompts, rows: Rows, micro_batch_size: int, pack_rows: int) -> int:
    """The most tokens one packed row needs when each micro-batch of consecutive rows is split
    into `pack_rows` equal, consecutive shares, one packed row each (`learner_batch`)."""
    if micro_batch_size % pack_rows:
        raise ValueError(
            f"learner_batch: pack_rows={pack_rows} must divide the micro-batch of "
            f"{micro_batch_size} rows."
        )
    lengths = sequence_lengths(prompts, rows)
    share = micro_batch_size // pack_rows
    padded = np.zeros(-(-len(lengths) // share) * share, np.int64)
    padded[: len(lengths)] = lengths
    return int(padded.reshape(-1, share).sum(1).max(initial=0))


def pack_bucket(n: int) -> int:
    """The static length of a packed row holding n tokens: `window_bucket` of n, at least 128
    (a multiple of 128 from 1024 tokens on, as the attention kernels' blocks want)."""
    return max(window_bucket(n), 128)


@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Which rows each packed row holds: `shares[m][d]` are the indices (into the mini-batch's
    Rows) of the sequences packed, in this order, into row d of micro-batch m."""

    shares: tuple[tuple[tuple[int, ...], ...], ...]
    pack_rows: int

    @property
    def num_micro(self) -> int:
        return len(self.shares)

    @property
    def slots(self) -> int:
        """The most sequences one packed row holds."""
        return max((len(share) for micro in self.shares for share in micro), default=0)

    def index(self, num_micro: int, slots: int) -> np.ndarray:
        """[num_micro, pack_rows * slots] int64: the row in entry d * slots + j of micro-batch m
        (share d's j-th sequence), -1 on padding entries."""
        if num_micro < self.num_micro or slots < self.slots:
            raise ValueError(
                f"learner_batch: the plan needs {self.num_micro} micro-batches of "
                f"{self.slots} slots per packed row, got {num_micro} and {slots}."
            )
        out = np.full((num_micro, self.pack_rows, slots), -1, np.int64)
        for m, micro in enumerate(self.shares):
            for d, share in enumerate(micro):
                out[m, d, : len(share)] = share
        return out.reshape(num_micro, self.pack_rows * slots)

    def tokens(self, lengths: np.ndarray) -> int:
        """The most tokens one packed row holds, given each row's `sequence_lengths`."""
        return max(
            (int(lengths[list(share)].sum()) for micro in self.shares for share in micro),
            default=0,
        )


def fixed_plan(n: int, micro_batch_size: int, pack_rows: int) -> PackPlan:
    """Micro-batches of `micro_batch_size` consecutive rows, each split into `pack_rows` equal,
    consecutive shares (the layout of a fixed number of sequences per packed row)."""
    if micro_batch_size % pack_rows:
        raise ValueError(
            f"learner_batch: pack_rows={pack_rows} must divide the micro-batch of "
            f"{micro_batch_size} rows."
        )
    share = micro_batch_size // pack_rows
    micros = []
    for start in range(0, n, micro_batch_size):
        micros.append(
            tuple(
                tuple(range(min(start + d * share, n), min(start + (d + 1) * share, n)))
                for d in range(pack_rows)
            )
        )
    return PackPlan(tuple(micros), pack_rows)


def pack_plan(
    lengths: np.ndarray, *, pack_rows: int, pack_tokens: int, max_sequences: int | None = None
) -> PackPlan:
    """Micro-batches of a fixed token budget: `pack_rows` packed rows of at most `pack_tokens`
    tokens each, holding as many sequences as fit (at most `max_sequences` per micro-batch).

    Deterministic (the same on every host): micro-batch after micro-batch, the first
    `max_sequences` rows not yet placed, in their order (so a micro-batch holds few prompts and
    few images), are taken longest first (ties: lower index) and each goes to the packed row
    with the fewest tokens (ties: lower row) if it fits there; a row that fits nowhere waits for
    the next micro-batch. Within a packed row, sequences keep their order in the Rows.

    Args:
      lengths: [N] int, tokens of each row's packed sequence (`sequence_lengths`).
      pack_rows: R >= 1, packed rows per micro-batch (one per device of the batch axes).
      pack_tokens: tokens of a packed row; every length must fit.
      max_sequences: the most sequences of one micro-batch (None: no bound).
    """
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > pack_tokens:
        raise ValueError(
            f"learner_batch: a sequence of {int(lengths.max())} tokens is longer than a packed "
            f"row of {pack_tokens} (train.pack_tokens)."
        )
    cap = len(lengths) if max_sequences is None else int(max_sequences)
    if cap < 1:
        raise ValueError(f"learner_batch: max_sequences={max_sequences} must be at least 1.")
    waiting = list(range(len(lengths)))
    micros = []
    while waiting:
        window = waiting[:cap]
        load = [0] * pack_rows
        placed: list[list[int]] = [[] for _ in range(pack_rows)]
        for i in sorted(window, key=lambda i: (-lengths[i], i)):
            d = min(range(pack_rows), key=lambda d: (load[d], d))
            if load[d] + lengths[i] <= pack_tokens:
                load[d] += int(lengths[i])
                placed[d].append(i)
        taken = {i for share in placed for i in share}
        micros.append(tuple(tuple(sorted(share)) for share in placed))
        waiting = [i for i in waiting if i not in taken]
    return PackPlan(tuple(micros), pack_rows)


def micro_bucket(n: int) -> int:
    """The static micro-batch count of an update that needs n: `window_bucket` of n (at most 4
    counts per octave); the micro-batches beyond n are all padding and cost no compute
    (aepo/learner.py)."""
    return window_bucket(max(n, 1))


def slot_bucket(n: int, multiple: int = 1) -> int:
    """The static sequences per packed row when the fullest holds n: the power of two at or
    above n, rounded up to a multiple of `multiple`."""
    return -(-pow2(max(n, 1)) // multiple) * multiple


def _packed_micro(prompts, r, valid, sl, cfg, pack_rows, pack_len, t, offsets):
    """One micro-batch (entries `sl` of `r`, share-major: entry i goes to packed row
    i // (mb / pack_rows); padding entries are skipped) packed into `pack_rows` rows of `pack_len`
    tokens.

    Returns (ids, segments, positions [3, R, L], image_index or None, targets [R, L],
    index [mb, t]): targets[j] is the token position j predicts when j + 1 is a response token of
    the same sequence (0 elsewhere); index[i, k] is the flat position (in R * L) whose hidden state
    predicts response token k of row i (0 where the row has no token k).
    """
    rows = np.arange(sl.start, sl.stop)
    mb = len(rows)
    share = mb // pack_rows
    ids = np.full((pack_rows, pack_len), cfg.pad_token_id, np.int32)
    segments = np.zeros((pack_rows, pack_len), np.int32)
    pos = np.zeros((3, pack_rows, pack_len), np.int32)
    image = np.full((pack_rows, pack_len), -1, np.int32) if offsets is not None else None
    targets = np.zeros((pack_rows, pack_len), np.int32)
    index = np.zeros((mb, t), np.int32)
    fill = np.zeros(pack_rows, np.int64)  # tokens used in each packed row
    for i, row in enumerate(rows):
        pr = i // share
        start = int(fill[pr])
        if not valid[row]:
            continue
        p = r.prompt[row]
        keep = prompts.mask[p]
        n_prompt, n_resp = int(keep.sum()), int(r.mask[row].sum())
        end = start + n_prompt + n_resp
        if end > pack_len:
            raise ValueError(f"learner_batch: a share needs {end} tokens, pack length {pack_len}.")
        seq = np.concatenate([prompts.ids[p][keep], r.tokens[row, :n_resp]])
        ids[pr, start:end] = seq
        segments[pr, start:end] = i % share + 1
        pos[:, pr, start : start + n_prompt] = prompts.positions[:, p][:, keep]
        pos[:, pr, start + n_prompt : end] = prompts.next_pos[p] + np.arange(n_resp)
        if image is not None:
            image[pr, start : start + n_prompt] = _prompt_image_index(
                prompts.ids[p], prompts.mask[p], cfg.image_token_id, offsets[p]
            )[keep]
        first = start + n_prompt - 1  # predicts response token 0
        targets[pr, first : first + n_resp] = r.tokens[row, :n_resp]
        index[i, :n_resp] = pr * pack_len + first + np.arange(n_resp)
        fill[pr] = end
    return ids, segments, pos, image, targets, index


def learner_batch(
    prompts: Prompts,
    rows: Rows,
    cfg: Qwen2_5_VLConfig,
    *,
    micro_batch_size: int,
    num_micro: int,
    num_windows: int | None = None,
    pack_rows: int | None = None,
    pack_len: int | None = None,
    plan: PackPlan | None = None,
    slots: int | None = None,
) -> LearnerBatch:
    """Rows (prompt + response) in `num_micro` micro-batches.

    Padded (neither `pack_rows` nor `plan`): micro-batches of `micro_batch_size` consecutive rows,
    each row its left-padded prompt then its response, [mb, P + T].

    Packed: micro-batch m is `plan.pack_rows` = R rows of `pack_len` tokens (default:
    `pack_bucket` of the fullest); row d holds the sequences `plan.shares[m][d]` (prompt without
    padding, then the response's real tokens) end to end, one per device of the batch axes.
    `plan` defaults to `fixed_plan` (`micro_batch_size` consecutive rows split into `pack_rows`
    equal shares); `pack_plan` makes micro-batches of a token budget instead. The inputs are
    [R, pack_len], `attention_mask` holds segment ids (1, 2, ... per sequence, 0 at padding) and
    positions restart per sequence; `packing` says which positions predict which response token.
    Everything per row or per response token has mb = R * `slots` entries (default: the plan's
    fullest row; `micro_batch_size / pack_rows` for the fixed plan), share-major, so each device
    holds its own row's sequences (`PackPlan.index`).

    Padding entries (row_valid False, empty masks) fill the rest; a micro-batch may be all
    padding (the learner skips it). old_logp and ref_logp are zeros, to be filled by the
    learner's log-prob passes. Every micro-batch's packed images are padded to `num_windows`
    attention windows, by default the `window_bucket` of the most any micro-batch needs (they
    are stacked).
    """
    n, t = rows.tokens.shape
    packed = pack_rows is not None or plan is not None
    if packed:
        if plan is None:
            plan = fixed_plan(n, micro_batch_size, pack_rows)
            slots = micro_batch_size // pack_rows
        pack_rows = plan.pack_rows
        slots = plan.slots if slots is None else slots
        order = plan.index(num_micro, max(slots, 1))
        mb = order.shape[1]
        if sorted(order[order >= 0].tolist()) != list(range(n)):
            raise ValueError(f"learner_batch: the plan does not hold each of the {n} rows once.")
        valid = order.reshape(-1) >= 0
        idx = np.where(valid, order.reshape(-1), max(n - 1, 0))
    else:
        mb = micro_batch_size
        if n > num_micro * mb:
            raise ValueError(f"learner_batch: {n} rows do not fit {num_micro} x {mb}.")
        valid = np.arange(num_micro * mb) < n
        idx = np.concatenate([np.arange(n), np.full(num_micro * mb - n, max(n - 1, 0))])
    idx = idx.astype(np.int64)
    r = rows.select(idx)
    p_ids = prompts.ids[r.prompt]
    ids = np.concatenate([p_ids, np.where(r.mask, r.tokens, cfg.pad_token_id)], 1).astype(np.int32)
    mask = np.concatenate([prompts.mask[r.prompt], r.mask & valid[:, None]], 1)
    resp_pos = prompts.next_pos[r.prompt][:, None] + np.arange(t)[None, :]
    pos = np.concatenate(
        [prompts.positions[:, r.prompt], np.broadcast_to(resp_pos, (3, len(idx), t))], 2
    ).astype(np.int32)

    def prompts_of(sl):
        """The prompts whose images micro-batch `sl` needs (padded: every row's, as before)."""
        which = r.prompt[sl][valid[sl]] if packed else r.prompt[sl]
        return list(dict.fromkeys((which if len(which) else r.prompt[sl][:1]).tolist()))

    if prompts.has_images and num_windows is None:
        num_windows = window_bucket(
            max(
                windows_of(prompts, prompts_of(slice(s, s + mb)), cfg)
                for s in range(0, len(idx), mb)
            )
        )
    if packed and pack_len is None:
        pack_len = pack_bucket(plan.tokens(sequence_lengths(prompts, rows)))
    micro_inputs, packing = [], []
    for m in range(num_micro):
        sl = slice(m * mb, (m + 1) * mb)
        vision, index, offsets = None, None, None
        if prompts.has_images:
            vision, offsets = _vision(prompts, prompts_of(sl), cfg, num_windows)
        if packed:
            p_ids, seg, p_pos, p_image, targets, gather = _packed_micro(
                prompts, r, valid, sl, cfg, pack_rows, pack_len, t, offsets
            )
            micro_inputs.append(ModelInputs(p_ids, seg, p_pos, p_image, vision))
            packing.append((targets, gather))
            continue
        if prompts.has_images:
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
        packing=None
        if not packed
        else Packing(
            targets=np.stack([p[0] for p in packing]), index=np.stack([p[1] for p in packing])
        ),
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
        packing=None
        if batch.packing is None
        else Packing(targets=(*rows, None), index=(*rows, None)),
    )
    return R.tree_shardings(mesh, axes, batch, rules)
