"""Tests for ares_jax/models/qwen2_5_vl/processor.py (images, prompt, placeholders, batches)."""

import io
import math

import numpy as np
import PIL.Image
import pytest

from ares_jax.models.qwen2_5_vl import positions, processor
from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer, special_ids

MIN_PIXELS = 3136
MAX_PIXELS = 28 * 28 * 256
# (height, width) -> patch grid (QWEN2_5_VL.md 6.2 step 3).
SIZES = {(230, 270): (1, 16, 20), (90, 60): (1, 6, 4), (130, 400): (1, 10, 28)}


def _random_image(h, w, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    shape = (h, w) if channels == 1 else (h, w, channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# smart_resize
# ---------------------------------------------------------------------------------------------


def _floor_half_up(h, w, factor=28):
    return math.floor(h / factor + 0.5) * factor, math.floor(w / factor + 0.5) * factor


def test_smart_resize_bankers_rounding():
    # 70 / 28 = 2.5 -> 2 (half to even), not 3: 56 px, where floor(x + 0.5) gives 84.
    assert processor.smart_resize(70, 140, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (
        56,
        140,
    )
    assert _floor_half_up(70, 140) == (84, 140)
    # 98 / 28 = 3.5 -> 4 (even).
    assert processor.smart_resize(98, 98, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (
        112,
        112,
    )


def test_smart_resize_limits():
    # Tiny images are scaled up to min_pixels: 10 x 10 -> 56 x 56.
    assert processor.smart_resize(10, 10, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (56, 56)
    # 20 x 50: round gives 28 x 56 = 1568 < 3136; beta = sqrt(3136 / 1000).
    assert processor.smart_resize(20, 50, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (56, 112)
    # Large images are scaled down under max_pixels: beta = sqrt(6e6 / 200704).
    h, w = processor.smart_resize(2000, 3000, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert (h, w) == (364, 532) and h * w <= MAX_PIXELS
    for hh, ww in SIZES:
        gh, gw = SIZES[(hh, ww)][1:]
        assert processor.smart_resize(hh, ww, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) == (
            14 * gh,
            14 * gw,
        )


def test_smart_resize_aspect_ratio_error():
    with pytest.raises(ValueError, match=r"10 x 2010 pixels .* aspect ratio 201\.0"):
        processor.smart_resize(10, 2010, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    # Exactly 200 is allowed.
    processor.smart_resize(10, 2000, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def test_smart_resize_matches_hf_on_many_sizes():
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    rng = np.random.default_rng(1)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 3000, (300, 2))]
    sizes += [(28 * k + 14, 28 * j + 14) for k in range(6) for j in range(6)]  # exact halves
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in ((MIN_PIXELS, MAX_PIXELS), (262144, 4194304)):
            ours = processor.smart_resize(h, w, min_pixels=lo, max_pixels=hi)
            assert ours == pil.smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


# ---------------------------------------------------------------------------------------------
# preprocess_image
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_image_processor():
    # The PIL backend needs neither torch nor torchvision (QWEN2_5_VL.md 6.5).
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return pil.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize("size", list(SIZES))
def test_preprocess_image_matches_hf_pil(hf_image_processor, size):
    image = PIL.Image.fromarray(_random_image(*size, seed=size[0]))
    patches, grid = processor.preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ref = hf_image_processor(images=[image], return_tensors="np")
    assert grid == SIZES[size]
    np.testing.assert_array_equal(np.asarray(ref["image_grid_thw"]), [grid])
    assert patches.shape == (grid[1] * grid[2], 1176) and patches.dtype == np.float32
    np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels", [1, 4])
def test_preprocess_grey_and_rgba_match_hf(hf_image_processor, channels):
    array = _random_image(90, 60, seed=3, channels=channels)
    image = PIL.Image.fromarray(array)  # mode L or RGBA
    patches, grid = processor.preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    ref = hf_image_processor(images=[image], return_tensors="np")
    np.testing.assert_allclose(patches, ref["pixel_values"], atol=1e-5, rtol=0)
    # The same pixels given as an array.
    from_array, _ = processor.preprocess_image(array, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(from_array, patches)


def test_preprocess_layout():
    # A constant-per-channel image: each row must hold channel c in its (c, t, py, px) block.
    array = np.zeros((56, 56, 3), np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = 0, 128, 255
    patches, grid = processor.preprocess_image(
        array, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, mean=(0, 0, 0), std=(1, 1, 1)
    )
    assert grid == (1, 4, 4) and patches.shape == (16, 1176)
    blocks = patches.reshape(16, 3, 2 * 14 * 14)
    np.testing.assert_allclose(blocks[:, 0], 0.0)
    np.testing.assert_allclose(blocks[:, 1], 128 / 255, rtol=1e-6)
    np.testing.assert_allclose(blocks[:, 2], 1.0, rtol=1e-6)
    # Position encoding of the layout: row r of a vertical ramp image holds the pixels of patch
    # (hpos, wpos) from positions.vision_rotary_positions, duplicated along time.
    ramp = np.zeros((56, 56, 3), np.uint8)
    ramp[..., 0] = (np.arange(56) * 4)[:, None]  # row index
    ramp[..., 1] = (np.arange(56) * 4)[None, :]  # column index
    patches, grid = processor.preprocess_image(
        ramp, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, mean=(0, 0, 0), std=(1, 1, 1)
    )
    rows = patches.reshape(16, 3, 2, 14, 14)
    np.testing.assert_array_equal(rows[:, :, 0], rows[:, :, 1])
    hw = positions.vision_rotary_positions(np.array([grid]))
    top_left_y = np.rint(rows[:, 0, 0, 0, 0] * 255 / 4).astype(int)
    top_left_x = np.rint(rows[:, 1, 0, 0, 0] * 255 / 4).astype(int)
    np.testing.assert_array_equal(top_left_y, hw[:, 0] * 14)
    np.testing.assert_array_equal(top_left_x, hw[:, 1] * 14)


def test_preprocess_errors(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read image .*missing\.png"):
        processor.preprocess_image(
            str(tmp_path / "missing.png"), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
        )
    with pytest.raises(ValueError, match="cannot read image <bytes>"):
        processor.preprocess_image(b"not an image", min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    broken = tmp_path / "broken.png"
    buf = io.BytesIO()
    PIL.Image.fromarray(_random_image(64, 64)).save(buf, format="PNG")
    broken.write_bytes(buf.getvalue()[:200])
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        processor.preprocess_image(str(broken), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    with pytest.raises(ValueError, match="uint8"):
        processor.preprocess_image(
            np.zeros((8, 8, 3), np.float32), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
        )
    with pytest.raises(
        ValueError, match=r"40 x 50 = 2000 pixels .* \[min_pixels=3136, max_pixels="
    ):
        processor.preprocess_image(
            _random_image(40, 50), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, strict=True
        )
    with pytest.raises(ValueError, match=r"600 x 400 = 240000 pixels .* max_pixels=200704\]"):
        processor.preprocess_image(
            _random_image(600, 400), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, strict=True
        )
    # Not strict: the same images are resized.
    _, grid = processor.preprocess_image(
        _random_image(40, 50), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    assert grid == (1, 4, 6)  # upscaled: 56 x 84


def test_preprocess_from_path_and_bytes(tmp_path):
    array = _random_image(90, 60, seed=5)
    path = tmp_path / "x.png"
    PIL.Image.fromarray(array).save(path)
    a, ga = processor.preprocess_image(path, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    b, gb = processor.preprocess_image(
        path.read_bytes(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    c, gc = processor.preprocess_image(array, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    assert ga == gb == gc == (1, 6, 4)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)


# ---------------------------------------------------------------------------------------------
# Placeholders and prompt
# ---------------------------------------------------------------------------------------------


def test_expand_image_placeholders():
    ids = [1, 9, 7, 2, 9, 7, 3]
    out = processor.expand_image_placeholders(ids, [(1, 16, 20), (1, 6, 4)], image_token_id=7)
    assert len(out) == 5 + 80 + 6
    assert out[:3] == [1, 9] + [7] and out[2:82] == [7] * 80
    assert out[82:85] == [2, 9, 7] and out[84:90] == [7] * 6 and out[90] == 3
    assert processor.expand_image_placeholders([1, 2], np.zeros((0, 3)), image_token_id=7) == [1, 2]


def test_placeholder_count_mismatch():
    with pytest.raises(
        ValueError, match="more or fewer images than placeholders: .* 2 image placeholder.* 1 image"
    ):
        processor.expand_image_placeholders([7, 1, 7], [(1, 4, 4)], image_token_id=7)
    with pytest.raises(ValueError, match=r"has 0 image placeholder\(s\) .* but 1 image"):
        processor.expand_image_placeholders([1, 2], [(1, 4, 4)], image_token_id=7)


def test_build_prompt():
    text = processor.build_prompt("  What is x?\n", 1)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is x? "
        "You FIRST think about the reasoning process as an internal monologue and then provide "
        "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
        "The final answer MUST BE put in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = processor.build_prompt("Hi", 0, suffix=None)
    assert plain == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    two = processor.build_prompt("A", 2, system=None, suffix="")
    assert two == (
        "<|im_start|>user\n" + processor.IMAGE_BLOCK * 2 + "A<|im_end|>\n<|im_start|>assistant\n"
    )
    marked = processor.build_prompt("Compare <image> and <image>.", 2, suffix=None)
    assert (
        "user\nCompare " + processor.IMAGE_BLOCK + " and " + processor.IMAGE_BLOCK + ".<|im_end|>"
        in marked
    )
    with pytest.raises(ValueError, match="2 <image> marker.* 1 image"):
        processor.build_prompt("<image><image>", 1)


# ---------------------------------------------------------------------------------------------
# encode_batch
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _batch_inputs():
    images = [
        [_random_image(230, 270, seed=1), _random_image(90, 60, seed=2)],
        [_random_image(130, 400, seed=3)],
        [],
    ]
    prompts = [
        processor.build_prompt("Compare <image> with <image>.", 2),
        processor.build_prompt("How many?", 1),
        processor.build_prompt("What is 2 + 2?", 0),
    ]
    return prompts, images


def test_encode_batch(tokenizer):
    ids = special_ids(tokenizer)
    prompts, images = _batch_inputs()
    out = processor.encode_batch(
        prompts, images, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    b, length = out["input_ids"].shape
    lengths = [len(tokenizer.encode(p, add_special_tokens=False)) for p in prompts]
    real = [lengths[0] - 2 + 80 + 6, lengths[1] - 1 + 70, lengths[2]]
    assert b == 3 and length == -(-max(real) // 8) * 8
    assert out["input_ids"].dtype == np.int32
    np.testing.assert_array_equal(out["attention_mask"].sum(1), real)
    for r in range(3):  # left padding
        assert (out["attention_mask"][r, length - real[r] :] == 1).all()
        assert (out["input_ids"][r, : length - real[r]] == ids.pad).all()
        row = out["input_ids"][r, length - real[r] :].tolist()
        assert tokenizer.decode(row).startswith("<|im_start|>system")
    assert (out["mm_token_type_ids"].sum(1) == [86, 70, 0]).all()
    np.testing.assert_array_equal(
        out["mm_token_type_ids"], (out["input_ids"] == ids.image_pad).astype(np.int32)
    )
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 16, 20], [1, 6, 4], [1, 10, 28]])
    assert out["image_grid_thw"].dtype == np.int32
    expected = np.concatenate(
        [
            processor.preprocess_image(im, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)[0]
            for row in images
            for im in row
        ]
    )
    np.testing.assert_array_equal(out["pixel_values"], expected)
    pos, delta = positions.rope_index(
        out["input_ids"],
        out["attention_mask"],
        out["image_grid_thw"],
        image_token_id=ids.image_pad,
        vision_start_token_id=ids.vision_start,
    )
    np.testing.assert_array_equal(out["position_ids"], pos)
    np.testing.assert_array_equal(out["rope_deltas"], delta)
    assert delta[2] == 0
    # Feature rows: image tokens numbered row-major across the batch.
    mask = out["mm_token_type_ids"] == 1
    np.testing.assert_array_equal(out["image_feature_index"][mask], np.arange(156))
    assert (out["image_feature_index"][~mask] == 0).all()
    vision = out["vision"]
    assert isinstance(vision, positions.VisionMeta)
    assert vision.num_tokens == 156 and (vision.segment_ids > 0).sum() == 624


def test_encode_batch_buckets(tokenizer):
    prompts, images = _batch_inputs()
    out = processor.encode_batch(
        prompts,
        images,
        tokenizer,
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        length_buckets=[64, 512, 256],
        num_windows=16,
    )
    assert out["input_ids"].shape == (3, 256)
    assert out["pixel_values"].shape == (624, 1176)
    segments = out["vision"].segment_ids
    assert segments.shape == (16 * 64,) and (segments > 0).sum() == 624
    with pytest.raises(ValueError, match=r"prompt of \d+ tokens .* largest length bucket 128"):
        processor.encode_batch(
            prompts,
            images,
            tokenizer,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            length_buckets=[64, 128],
        )
    with pytest.raises(ValueError, match="num_windows=2 is less than the 15 attention windows"):
        processor.encode_batch(
            prompts,
            images,
            tokenizer,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
            num_windows=2,
        )


def test_encode_batch_image_count_error(tokenizer):
    prompt = processor.build_prompt("Look.", 1)
    with pytest.raises(ValueError, match="batch row 1: more or fewer images than placeholders"):
        processor.encode_batch(
            [prompt, prompt],
            [[_random_image(56, 56)], []],
            tokenizer,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
        )


def test_encode_batch_text_only(tokenizer):
    out = processor.encode_batch(
        ["hello", "a longer prompt"], None, tokenizer, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    assert out["pixel_values"].shape == (0, 1176) and out["image_grid_thw"].shape == (0, 3)
    assert out["rope_deltas"].tolist() == [0, 0]
    assert out["vision"].num_tokens == 0


def test_image_settings_from_checkpoint_directory(hf_image_processor, tmp_path):
    hf_image_processor.save_pretrained(tmp_path)
    settings = processor.load_image_settings(tmp_path)
    assert settings.min_pixels == MIN_PIXELS and settings.max_pixels == MAX_PIXELS
    assert settings.patch_size == 14 and settings.merge_size == 2
    assert settings.mean == pytest.approx(processor.IMAGE_MEAN)
    image = _random_image(130, 400)
    ours, grid = processor.preprocess_image(image, **settings.kwargs())
    ref = hf_image_processor(images=[image], return_tensors="np")
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)
    with pytest.raises(FileNotFoundError, match="No preprocessor_config.json or processor_config"):
        processor.load_image_settings(tmp_path / "missing")


@pytest.mark.parametrize(
    "question, images",
    [
        ("What is x?", 0),
        ("Count the shapes.", 2),
        ("Compare <image> with <image>: which is larger?", 2),
        ("<image>Read the chart.", 1),
    ],
)
def test_hub_chat_template_renders_build_prompt(tokenizer, question, images):
    """The hub's Qwen2.5-VL chat template, applied by transformers to `chat_messages`, gives
    `build_prompt`'s text: a checkpoint with that template prompts as before."""
    import copy

    templated = copy.copy(tokenizer)
    templated.chat_template = processor.QWEN2_5_VL_CHAT_TEMPLATE
    got = processor.chat_prompt(templated, question, images)
    assert got == processor.build_prompt(question, images)
    assert processor.chat_prompt(tokenizer, question, images) == got  # no template: built in


def test_a_checkpoint_chat_template_is_used(tokenizer):
    """A checkpoint's own template (another system prompt) decides the prompt."""
    import copy

    custom = copy.copy(tokenizer)
    custom.chat_template = processor.QWEN2_5_VL_CHAT_TEMPLATE.replace(
        "You are a helpful assistant.", "Think step by step."
    )
    text = processor.chat_prompt(custom, "<image>Why?", 1, suffix=None)
    assert text == (
        "<|im_start|>system\nThink step by step.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Why?<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="2 <image> marker"):
        processor.chat_prompt(custom, "<image> and <image>", 1)
