"""Every prompt's token length as the stages encode it, checked once when a stage builds its data.

    settings = PromptSettings(template=..., min_pixels=..., max_pixels=..., max_len=256)
    source, stats = check_prompts(source, tokenizer, settings, drop_overlong=True)

A prompt longer than the largest prompt length bucket, or one the processor cannot encode, would
otherwise stop a run in the first rollout that draws it, with no file or line named. The length
is the one `batching.encode_prompts` gives (the chat text of `processor.chat_prompt`, its
tokens, each `<|image_pad|>` expanded to the image's tokens), computed cheaply: the texts are
tokenized in batches, and each image's token count comes from its size, read from the file header
without decoding, through the processor's `smart_resize` (tests/data/prompts_test.py checks the
lengths against the real encoding).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import PIL.Image

from ares_jax.data import records
from ares_jax.data.records import DataError, Example, ReadStats
from ares_jax.models.qwen2_5_vl import processor

_BATCH = 1024  # prompts tokenized per call


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    """How the stages encode prompts (batching.encode_prompts) and the longest one allowed.

    Attributes:
      template: the instruction after the question (config data.prompt_template).
      min_pixels, max_pixels: the processor's resize limits.
      max_len: the largest prompt length bucket, in tokens (text and image tokens).
      patch_size, merge_size: the vision tower's patch side and spatial merge.
      image_token_id: the `<|image_pad|>` id; None takes the tokenizer's.
    """

    template: str
    min_pixels: int
    max_pixels: int
    max_len: int
    patch_size: int = 14
    merge_size: int = 2
    image_token_id: int | None = None


class Subset(Sequence):
    """The kept Examples of a random-access source, by index, with the source's read stats."""

    def __init__(self, source: Sequence[Example], indices: Sequence[int], stats: ReadStats):
        self._source = source
        self._indices = list(indices)
        self.read_stats = stats

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._source[i] for i in self._indices[index]]
        return self._source[self._indices[index]]


def prompt_lengths(
    examples: Sequence[Example], tokenizer: Any, settings: PromptSettings
) -> list[int | tuple[str, str]]:
    """Each Example's prompt length in tokens, or (reason, message) where it cannot be encoded.

    Reasons are `records` skip reasons: MARKER_MISMATCH (the `<image>` markers do not fit the
    images), UNREADABLE_IMAGE, BAD_IMAGE_SIZE (an aspect ratio over 200).
    """
    s = settings
    pad_id = s.image_token_id
    if pad_id is None:
        pad_id = int(tokenizer.convert_tokens_to_ids(processor.IMAGE_PAD))
    out: list[int | tuple[str, str]] = []
    for start in range(0, len(examples), _BATCH):
        chunk = [examples[i] for i in range(start, min(start + _BATCH, len(examples)))]
        lengths: list[int | tuple[str, str]] = []
        texts, rows = [], []
        for ex in chunk:
            try:
                image_tokens = [_image_tokens(image, s) for image in ex.images]
                text = processor.chat_prompt(
                    tokenizer, ex.question, len(ex.images), suffix=s.template
                )
            except _Unusable as e:
                lengths.append((e.reason, str(e)))
                continue
            except ValueError as e:  # markers that do not fit the images
                lengths.append((records.MARKER_MISMATCH, str(e)))
                continue
            lengths.append(0)
            texts.append(text)
            rows.append((len(lengths) - 1, image_tokens))
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        for (at, image_tokens), row in zip(rows, ids, strict=True):
            pads = sum(1 for t in row if t == pad_id)
            if pads != len(image_tokens):
                lengths[at] = (
                    records.MARKER_MISMATCH,
                    f"the prompt has {pads} image token(s) but {len(image_tokens)} image(s)",
                )
            else:  # encode_batch: each pad token becomes its image's tokens
                lengths[at] = len(row) - pads + sum(image_tokens)
        out.extend(lengths)
    return out


def check_prompts(
    source: Sequence[Example],
    tokenizer: Any,
    settings: PromptSettings,
    *,
    drop_overlong: bool,
    on_error: str = "raise",
    stats: ReadStats | None = None,
) -> tuple[Sequence[Example], ReadStats]:
    """Checks every prompt of `source` once: it must encode and fit `settings.max_len`.

    Args:
      source: random-access Examples (a list, or a source of pipeline.example_source).
      drop_overlong: True drops an over-long prompt and counts it under
        records.OVERLONG_PROMPT; False raises on the first one.
      on_error: a prompt that cannot be encoded: "raise" or "skip" (counted by reason).
      stats: counts to add to; default the source's `read_stats`, else a new ReadStats.

    Returns:
      (the source itself when every prompt is kept, else a `Subset` of the kept ones carrying
      the stats; the stats, whose `examples` counts the kept ones).

    Raises:
      DataError: naming the example's file and line (its `origin`); or naming the files and
        the counts when no example is left.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    name = getattr(source, "path", None)  # a tfds build's directory
    if stats is None:
        stats = getattr(source, "read_stats", None)
    if not isinstance(stats, ReadStats):
        stats = ReadStats(rows=len(source), examples=len(source), paths=[name] if name else [])
    kept: list[int] = []
    for i, length in enumerate(prompt_lengths(source, tokenizer, settings)):
        if isinstance(length, int) and length <= settings.max_len:
            kept.append(i)
            continue
        where = _where(source[i], name)
        if isinstance(length, int):
            message = (
                f"{where}: the prompt has {length} tokens (text and image tokens), more than the "
                f"largest prompt length bucket ({settings.max_len})"
            )
            if not drop_overlong:
                raise DataError(
                    f"{message}; raise data.prompt_len_buckets and data.max_prompt_len, or set "
                    "data.drop_overlong_prompts=True to drop such prompts",
                    reason=records.OVERLONG_PROMPT,
                )
            reason = records.OVERLONG_PROMPT
        else:
            reason, message = length[0], f"{where}: {length[1]}"
            if on_error == "raise":
                raise DataError(message, reason=reason)
        stats.skip(reason, message)
        stats.examples -= 1
    if len(kept) == len(source):
        return source, stats
    stats.require_examples()
    return Subset(source, kept, stats), stats


class _Unusable(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _where(example: Example, name: str | None) -> str:
    return example.origin or f"{name or 'data'}, example {example.id!r}"


def _image_tokens(image: bytes, s: PromptSettings) -> int:
    """Tokens of one encoded image: its header size through `smart_resize`, as the processor."""
    try:
        with PIL.Image.open(io.BytesIO(image)) as opened:
            width, height = opened.size
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise _Unusable(records.UNREADABLE_IMAGE, f"an image cannot be read: {e}") from None
    factor = s.patch_size * s.merge_size
    try:
        h, w = processor.smart_resize(
            height, width, factor=factor, min_pixels=s.min_pixels, max_pixels=s.max_pixels
        )
    except ValueError as e:
        raise _Unusable(records.BAD_IMAGE_SIZE, str(e)) from None
    return (h // s.patch_size) * (w // s.patch_size) // (s.merge_size * s.merge_size)
