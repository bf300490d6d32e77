"""Host-side Qwen2.5-VL input pipeline: images, chat prompt, placeholders, padded batches.

Everything here is NumPy/PIL, run once per batch outside `jit` (STYLE.md 5 rule 9). It mirrors
transformers 5.24 `Qwen2VLImageProcessorPil` pixel for pixel and the Qwen2.5-VL chat template
(QWEN2_5_VL.md 2.1, 2.2), and emits fixed-shape arrays for the jitted model: left-padded token
ids, M-RoPE positions (positions.py), the vision metadata (positions.py) and the row of the
image feature each image-pad token takes.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import PIL.Image

from ares_jax.models.qwen2_5_vl import positions

# Hub preprocessor_config.json values (QWEN2_5_VL.md 2.1).
IMAGE_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
HUB_MIN_PIXELS = 56 * 56
HUB_MAX_PIXELS = 16384 * 28 * 28

MAX_ASPECT_RATIO = 200

IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_BLOCK = VISION_START + IMAGE_PAD + VISION_END
IMAGE_MARKER = "<image>"

DEFAULT_SYSTEM = "You are a helpful assistant."
# METHOD.md 4.1 (EasyR1 `math.jinja`: "{{ content | trim }} " followed by this sentence).
THINK_BOXED_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}."
)

ImageLike = PIL.Image.Image | np.ndarray | str | os.PathLike | bytes


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target (height, width) of Qwen2-VL's `smart_resize` (QWEN2_5_VL.md 2.1).

    Both sides become multiples of `factor` (patch x merge = 28), the area lands in
    [min_pixels, max_pixels] and the aspect ratio is kept as far as possible. Rounding is Python's
    `round` (half to even), so a 70 px side becomes 56 px, not 84 px (QWEN2_5_VL.md 8.7).

    Raises:
      ValueError: a side is not positive, or the aspect ratio exceeds 200.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {height} x {width} (height x width) must be positive")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of {height} x {width} pixels (height x width) has aspect ratio "
            f"{max(height, width) / min(height, width):.1f}; Qwen2.5-VL accepts at most "
            f"{MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb(image: ImageLike) -> PIL.Image.Image:
    """PIL RGB image; transparency is composited onto white (as transformers does)."""
    name = None
    if isinstance(image, str | os.PathLike | bytes):
        name = "<bytes>" if isinstance(image, bytes) else os.fspath(image)
        try:
            src = io.BytesIO(image) if isinstance(image, bytes) else image
            with PIL.Image.open(src) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError, PIL.Image.DecompressionBombError) as e:
            raise ValueError(f"cannot read image {name}: {e}") from e
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(
                f"image arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got {image.dtype} "
                f"{list(image.shape)}"
            )
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
            raise ValueError(
                f"image arrays must be uint8 [H, W], [H, W, 3] or [H, W, 4]; got shape "
                f"{list(image.shape)}"
            )
        image = PIL.Image.fromarray(np.ascontiguousarray(image))
    elif not isinstance(image, PIL.Image.Image):
        raise ValueError(f"unsupported image type {type(image).__name__}")
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return PIL.Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {name or type(image).__name__}: {e}") from e


def patchify(
    image_chw: np.ndarray,
    *,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> np.ndarray:
    """[C, H, W] float32 -> [gh * gw, C * temporal * patch * patch] float32 patch rows.

    Rows are merge-block major (for each merged unit, row-major, its merge x merge patches in
    (dy, dx) order); each row is flattened in (channel, temporal, py, px) order with the still
    image repeated along the temporal axis (QWEN2_5_VL.md 2.1).
    """
    c, h, w = image_chw.shape
    gh, gw = h // patch_size, w // patch_size
    if gh * patch_size != h or gw * patch_size != w or gh % merge_size or gw % merge_size:
        raise ValueError(
            f"image of {h} x {w} pixels is not a multiple of patch x merge = "
            f"{patch_size * merge_size}"
        )
    m, p = merge_size, patch_size
    x = image_chw.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    return np.ascontiguousarray(x.reshape(gh * gw, c * temporal_patch_size * p * p))


def preprocess_image(
    image: ImageLike,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    strict: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> Qwen2.5-VL patch rows, as `Qwen2VLImageProcessorPil` does (QWEN2_5_VL.md 2.1).

    RGB conversion (alpha over white), bicubic resize to `smart_resize`, rescale by 1/255 (in
    float64, then float32), normalise with `mean`/`std`, duplicate along time, patchify.

    Args:
      image: PIL image, uint8 array [H, W(, 3|4)], a file path, or encoded bytes.
      min_pixels, max_pixels: the resize area limits (hub: 3136 and 12845056; METHOD.md 4.1
        trains with 262144 and 4194304).
      strict: also reject an image whose original area lies outside [min_pixels, max_pixels]
        instead of resizing it.

    Returns:
      patches: [P, C * temporal * patch^2] float32 (P = gh * gw; 1176 columns for Qwen2.5-VL).
      grid_thw: (1, gh, gw) in patches; the image takes gh * gw / merge^2 tokens.

    Raises:
      ValueError: unreadable image, aspect ratio > 200, or (strict) area outside the limits.
    """
    rgb = _to_rgb(image)
    width, height = rgb.size
    if strict and not min_pixels <= height * width <= max_pixels:
        raise ValueError(
            f"image of {height} x {width} = {height * width} pixels (height x width) is outside "
            f"the pixel limits [min_pixels={min_pixels}, max_pixels={max_pixels}]"
        )
    new_h, new_w = smart_resize(
        height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    resized = np.asarray(rgb.resize((new_w, new_h), resample=PIL.Image.Resampling.BICUBIC))
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    patches = patchify(
        x.transpose(2, 0, 1),
        patch_size=patch_size,
        temporal_patch_size=temporal_patch_size,
        merge_size=merge_size,
    )
    return patches, (1, new_h // patch_size, new_w // patch_size)


# ---------------------------------------------------------------------------------------------
# Tokens
# ---------------------------------------------------------------------------------------------


def _grid_list(grids: Any) -> list[tuple[int, int, int]]:
    arr = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    return [tuple(int(v) for v in row) for row in arr]


def tokens_per_image(grid_thw: Sequence[int], *, merge_size: int = 2) -> int:
    """Number of image-pad tokens of one image: t * gh * gw / merge^2."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // (merge_size * merge_size)


def expand_image_placeholders(
    token_ids: Sequence[int], grids: Any, *, image_token_id: int, merge_size: int = 2
) -> list[int]:
    """Replaces the k-th single `<|image_pad|>` by `tokens_per_image(grids[k])` copies.

    Args:
      token_ids: one tokenized prompt with one image-pad token per image.
      grids: [n, 3] (t, h, w) patch grids of this prompt's images, in image order.

    Raises:
      ValueError: more or fewer images than placeholders (naming both counts).
    """
    grid_list = _grid_list(grids)
    n_placeholders = sum(1 for t in token_ids if t == image_token_id)
    if n_placeholders != len(grid_list):
        raise ValueError(
            f"more or fewer images than placeholders: the prompt has {n_placeholders} image "
            f"placeholder(s) (token id {image_token_id}) but {len(grid_list)} image(s) were given"
        )
    out: list[int] = []
    k = 0
    for t in token_ids:
        if t == image_token_id:
            out.extend([image_token_id] * tokens_per_image(grid_list[k], merge_size=merge_size))
            k += 1
        else:
            out.append(int(t))
    return out


def build_prompt(
    question: str,
    num_images: int,
    *,
    system: str | None = DEFAULT_SYSTEM,
    suffix: str | None = THINK_BOXED_SUFFIX,
) -> str:
    """The Qwen2.5-VL chat text of one single-turn question (QWEN2_5_VL.md 2.2, METHOD.md 4.1).

    The user text is `question.strip() + " " + suffix` (EasyR1 `math.jinja`). Each image becomes
    `<|vision_start|><|image_pad|><|vision_end|>`: at the `<image>` markers of the question, in
    order, when it has any; otherwise all before the text. The result ends with
    `<|im_start|>assistant\\n`, ready for generation. `system=None` omits the system turn.

    Raises:
      ValueError: the question has `<image>` markers but not exactly `num_images` of them.
    """
    text = question.strip()
    if suffix:
        text = f"{text} {suffix}" if text else suffix
    n_markers = text.count(IMAGE_MARKER)
    if n_markers:
        if n_markers != num_images:
            raise ValueError(
                f"more or fewer images than placeholders: the question has {n_markers} "
                f"{IMAGE_MARKER} marker(s) but {num_images} image(s) were given"
            )
        user = text.replace(IMAGE_MARKER, IMAGE_BLOCK)
    else:
        user = IMAGE_BLOCK * num_images + text
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# The chat template of the hub's Qwen2.5-VL checkpoints (tokenizer_config.json / chat_template
# .json): a default system turn, images as vision blocks, the generation prompt. `chat_prompt`
# renders a question with it exactly as `build_prompt` writes it.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_messages(
    question: str, num_images: int, *, suffix: str | None = THINK_BOXED_SUFFIX
) -> list[dict[str, Any]]:
    """One user turn in the chat-template message format: the question's text and images in
    `build_prompt`'s order (at the `<image>` markers, else images first)."""
    text = question.strip()
    if suffix:
        text = f"{text} {suffix}" if text else suffix
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) > 1 and len(pieces) - 1 != num_images:
        raise ValueError(
            f"more or fewer images than placeholders: the question has {len(pieces) - 1} "
            f"{IMAGE_MARKER} marker(s) but {num_images} image(s) were given"
        )
    image = {"type": "image"}
    if len(pieces) == 1:
        content = [image] * num_images + ([{"type": "text", "text": text}] if text else [])
    else:
        content = []
        for i, piece in enumerate(pieces):
            if i:
                content.append(image)
            if piece:
                content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def chat_prompt(
    tokenizer: Any, question: str, num_images: int, *, suffix: str | None = THINK_BOXED_SUFFIX
) -> str:
    """The chat text of one question: with the tokenizer's chat template (the checkpoint's
    tokenizer_config.json or chat_template file: its system prompt and format) when it has one,
    else `build_prompt` (the hub template's output, written in code)."""
    if not getattr(tokenizer, "chat_template", None):
        return build_prompt(question, num_images, suffix=suffix)
    return tokenizer.apply_chat_template(
        chat_messages(question, num_images, suffix=suffix),
        tokenize=False,
        add_generation_prompt=True,
    )


def _token_id(tokenizer: Any, token: str, given: int | None) -> int:
    if given is not None:
        return int(given)
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == getattr(tokenizer, "unk_token_id", None):
        raise ValueError(f"tokenizer has no {token} token; pass its id explicitly")
    return int(i)


def _padded_length(n: int, pad_to_multiple: int, length_buckets: Sequence[int] | None) -> int:
    if length_buckets:
        buckets = sorted(int(b) for b in length_buckets)
        for b in buckets:
            if b >= n:
                return b
        raise ValueError(
            f"prompt of {n} tokens (after image expansion) exceeds the largest length bucket "
            f"{buckets[-1]}"
        )
    m = max(1, int(pad_to_multiple))
    return max(m, -(-n // m) * m)


def encode_batch(
    prompts: Sequence[str],
    images: Sequence[Sequence[ImageLike]] | None,
    tokenizer: Any,
    *,
    min_pixels: int,
    max_pixels: int,
    image_token_id: int | None = None,
    vision_start_token_id: int | None = None,
    pad_id: int | None = None,
    pad_to_multiple: int = 8,
    length_buckets: Sequence[int] | None = None,
    num_windows: int | None = None,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    window_size: int = 112,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
    strict: bool = False,
) -> dict[str, Any]:
    """Tokenizes and preprocesses a batch of chat prompts into fixed-shape model inputs.

    Args:
      prompts: B chat texts (`build_prompt`), one `<|image_pad|>` per image.
      images: B lists of images (row b's images in prompt order); None for a text-only batch.
      tokenizer: a transformers tokenizer knowing the Qwen2.5 special tokens.
      image_token_id, vision_start_token_id, pad_id: default to the tokenizer's `<|image_pad|>`,
        `<|vision_start|>` and pad token (`<|endoftext|>` when it has none).
      pad_to_multiple: L is the longest row rounded up to this, when `length_buckets` is None.
      length_buckets: L is the smallest bucket that holds the longest row (static shapes).
      num_windows: static size of the packed vision layout (positions.VisionMeta): attention
        windows of all the batch's images together; None: what this batch needs.

    Returns:
      A dict of NumPy arrays (B rows, L tokens, P patch rows, n images):
        input_ids: [B, L] int32, LEFT-padded with `pad_id`.
        attention_mask: [B, L] int32, 1 on real tokens.
        mm_token_type_ids: [B, L] int32, 1 at image-pad tokens, else 0 (vision start/end are 0).
        pixel_values: [P, 1176] float32, all images of all rows in order (the processor's
          order; the model gathers them into its layout with `vision.source`).
        image_grid_thw: [n, 3] int32 (t, h, w) per image, in order.
        position_ids: [3, B, L] int32 M-RoPE (t, h, w) positions; pads 0 (positions.rope_index).
        rope_deltas: [B] int32; the next token's position is num_valid + delta on all 3 axes.
        image_feature_index: [B, L] int32; at image-pad tokens the row of the image features in
          original order (`merged[vision.unpermute]`) to place there, 0 elsewhere (use with
          `mm_token_type_ids == 1`). Image tokens are numbered row-major over the batch, as HF's
          `masked_scatter` does.
        vision: positions.VisionMeta, the vision tower's padded layout.

    Raises:
      ValueError: image count != placeholder count for a row, a row longer than the largest
        length bucket, more windows than the vision layout holds, bad images.
    """
    batch = len(prompts)
    if images is None:
        images = [[] for _ in prompts]
    if len(images) != batch:
        raise ValueError(f"got {batch} prompts but {len(images)} image lists")
    image_token_id = _token_id(tokenizer, IMAGE_PAD, image_token_id)
    vision_start_token_id = _token_id(tokenizer, VISION_START, vision_start_token_id)
    if pad_id is None:
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = _token_id(tokenizer, "<|endoftext|>", None)

    all_patches: list[np.ndarray] = []
    all_grids: list[tuple[int, int, int]] = []
    rows: list[list[int]] = []
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if batch else []
    for b, (ids, row_images) in enumerate(zip(encoded, images, strict=True)):
        grids = []
        for image in row_images or ():
            patches, grid = preprocess_image(
                image,
                min_pixels=min_pixels,
                max_pixels=max_pixels,
                patch_size=patch_size,
                temporal_patch_size=temporal_patch_size,
                merge_size=merge_size,
                mean=mean,
                std=std,
                strict=strict,
            )
            all_patches.append(patches)
            grids.append(grid)
        try:
            rows.append(
                expand_image_placeholders(
                    ids, grids, image_token_id=image_token_id, merge_size=merge_size
                )
            )
        except ValueError as e:
            raise ValueError(f"batch row {b}: {e}") from e
        all_grids.extend(grids)

    longest = max((len(r) for r in rows), default=0)
    length = _padded_length(longest, pad_to_multiple, length_buckets)
    input_ids = np.full((batch, length), pad_id, np.int32)
    attention_mask = np.zeros((batch, length), np.int32)
    for b, r in enumerate(rows):
        if r:
            input_ids[b, length - len(r) :] = r
            attention_mask[b, length - len(r) :] = 1
    is_image = (input_ids == image_token_id) & (attention_mask == 1)
    mm_token_type_ids = is_image.astype(np.int32)
    image_feature_index = np.where(
        is_image, np.cumsum(is_image.reshape(-1)).reshape(is_image.shape) - 1, 0
    )

    grid_thw = np.asarray(all_grids, np.int32).reshape(-1, 3)
    patch_dim = 3 * temporal_patch_size * patch_size * patch_size
    vision = positions.vision_metadata(
        grid_thw,
        merge_size=merge_size,
        window_size=window_size,
        patch_size=patch_size,
        num_windows=num_windows,
    )
    if all_patches:
        pixel_values = np.concatenate(all_patches, axis=0).astype(np.float32)
    else:
        pixel_values = np.zeros((0, patch_dim), np.float32)

    position_ids, rope_deltas = positions.rope_index(
        input_ids,
        attention_mask,
        grid_thw,
        image_token_id=image_token_id,
        vision_start_token_id=vision_start_token_id,
        merge_size=merge_size,
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": pixel_values,
        "image_grid_thw": grid_thw,
        "position_ids": position_ids,
        "rope_deltas": rope_deltas,
        "image_feature_index": image_feature_index.astype(np.int32),
        "vision": vision,
    }


# ---------------------------------------------------------------------------------------------
# Settings from a checkpoint directory
# ---------------------------------------------------------------------------------------------


class ImageSettings(NamedTuple):
    """The image processor's settings that `preprocess_image` and `encode_batch` take."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def kwargs(self) -> dict[str, Any]:
        return self._asdict()


def load_image_settings(path: str | os.PathLike[str]) -> ImageSettings:
    """The image processor's settings of a checkpoint directory, in either layout: the hub's
    preprocessor_config.json or transformers 5's processor_config.json
    (`hub_files.read_image_settings`). Our preprocessing with them matches transformers'
    processor pixel for pixel.

    Raises:
      FileNotFoundError: the directory holds neither file.
      ValueError: naming the file and key, for a missing or malformed value.
    """
    from ares_jax.models.qwen2_5_vl import hub_files

    settings = hub_files.read_image_settings(path)
    if settings is None:
        raise FileNotFoundError(
            f"No {hub_files.PREPROCESSOR} or {hub_files.PROCESSOR} in checkpoint directory "
            f"{os.fspath(path)}."
        )
    return settings
