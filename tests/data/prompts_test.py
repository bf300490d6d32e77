"""Prompt lengths and the start-up prompt check (ares_jax/data/prompts.py)."""

import io
import json

import numpy as np
import PIL.Image
import pytest

from ares_jax import batching as B
from ares_jax.data import pipeline, prompts, records
from ares_jax.data.records import DataError, Example
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import tokenizer as tok

TEMPLATE = "Think, then answer in \\boxed{}."


@pytest.fixture(scope="module")
def tokenizer():
    return tok.build_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return model_config.preset("tiny")


def image(size, mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    PIL.Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def settings(cfg, max_len=256, min_pixels=3136, max_pixels=12544, template=TEMPLATE):
    return prompts.PromptSettings(
        template=template,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_len=max_len,
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        image_token_id=cfg.image_token_id,
    )


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("min_pixels, max_pixels", [(3136, 12544), (3136, 28 * 28 * 64)])
def test_lengths_equal_the_real_encoding(tokenizer, cfg, min_pixels, max_pixels):
    examples = [
        Example("text", "What is 2 + 2?", "4"),
        Example("marker", "<image> How many squares?", "3", (image((8, 6)),)),
        Example("first", "  Images first, no marker.\n", "1", (image((300, 200)), image((70, 70)))),
        Example(
            "mixed",
            "Left <image>, right <image>: which is larger? ü ∑ 数学",
            "left",
            (image((1000, 10), "L"), image((64, 96), "RGBA", "PNG")),
        ),
        Example("jpeg", "<image>" + " long words" * 40, "2", (image((57, 113), fmt="JPEG"),)),
        Example("palette", "Colour?<image>", "red", (image((140, 28), "P"),)),
    ]
    s = settings(cfg, min_pixels=min_pixels, max_pixels=max_pixels)
    got = prompts.prompt_lengths(examples, tokenizer, s)
    encoded = B.encode_examples(
        examples,
        tokenizer,
        cfg,
        template=TEMPLATE,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        length_buckets=(4096,),
    )
    assert got == encoded.mask.sum(1).tolist()
    assert min(got) > 0


def test_overlong_prompts_are_dropped_and_counted_or_name_file_and_line(tmp_path, tokenizer, cfg):
    """Before, an over-long prompt passed the reader and stopped the first rollout that drew it
    ("prompt of N tokens ... exceeds the largest length bucket"), naming no file or line."""
    rows = [{"question": f"Short {i}?", "answer": "1"} for i in range(3)]
    rows.insert(1, {"question": "word " * 300, "answer": "1"})
    path = write_rows(tmp_path / "long.jsonl", rows)
    source = pipeline.example_source(pipeline.FilesSpec(paths=(path,)))
    s = settings(cfg)

    with pytest.raises(DataError, match=r"long\.jsonl, line 2: the prompt has \d+ tokens") as e:
        prompts.check_prompts(source, tokenizer, s, drop_overlong=False)
    assert e.value.reason == records.OVERLONG_PROMPT
    assert "data.drop_overlong_prompts" in str(e.value)

    kept, stats = prompts.check_prompts(source, tokenizer, s, drop_overlong=True)
    assert [ex.question for ex in kept] == ["Short 0?", "Short 1?", "Short 2?"]
    assert stats is source.read_stats and kept.read_stats is stats
    assert (stats.rows, stats.examples, stats.skipped) == (4, 3, {"overlong_prompt": 1})
    assert stats.first_errors[0].startswith(f"{path}, line 2: the prompt has ")
    # Every kept prompt really fits the largest bucket.
    B.encode_examples(
        list(kept),
        tokenizer,
        cfg,
        template=TEMPLATE,
        min_pixels=s.min_pixels,
        max_pixels=s.max_pixels,
        length_buckets=(s.max_len,),
    )


def test_all_prompts_fitting_keeps_the_source(tokenizer, cfg):
    source = [Example(str(i), f"q{i}", "1") for i in range(3)]
    kept, stats = prompts.check_prompts(source, tokenizer, settings(cfg), drop_overlong=False)
    assert kept is source
    assert (stats.rows, stats.examples, stats.skipped) == (3, 3, {})


def test_all_dropped_names_the_files_and_counts(tmp_path, tokenizer, cfg):
    path = write_rows(tmp_path / "all.jsonl", [{"question": "x " * 400, "answer": "1"}])
    source = pipeline.example_source(pipeline.FilesSpec(paths=(path,)))
    with pytest.raises(
        DataError, match=r"no usable example in .*all\.jsonl: .*\(overlong_prompt: 1\)"
    ):
        prompts.check_prompts(source, tokenizer, settings(cfg), drop_overlong=True)


def test_prompts_the_processor_refuses(tokenizer, cfg):
    """An aspect ratio over 200, markers that a template adds, an undecodable image: each would
    stop a rollout; here it raises naming the example, or is skipped and counted."""
    examples = [
        Example("thin", "q", "1", (image((2010, 10)),), origin="d.jsonl, line 1"),
        Example("ok", "q", "1", (image((20, 20)),), origin="d.jsonl, line 2"),
        Example("broken", "q", "1", (b"not an image",), origin="d.jsonl, line 3"),
    ]
    s = settings(cfg)
    with pytest.raises(DataError, match=r"d\.jsonl, line 1: .*aspect ratio 201") as e:
        prompts.check_prompts(examples, tokenizer, s, drop_overlong=True)
    assert e.value.reason == records.BAD_IMAGE_SIZE
    kept, stats = prompts.check_prompts(examples, tokenizer, s, drop_overlong=True, on_error="skip")
    assert [ex.id for ex in kept] == ["ok"]
    assert stats.skipped == {"bad_image_size": 1, "unreadable_image": 1}

    marked = settings(cfg, template="Look at <image>.")
    with pytest.raises(DataError, match=r"example 'ok': .*1 <image> marker.* 0 image") as e:
        prompts.check_prompts([Example("ok", "q", "1")], tokenizer, marked, drop_overlong=True)
    assert e.value.reason == records.MARKER_MISMATCH


def test_lengths_of_many_rows_come_in_batches(tokenizer, cfg):
    """Tens of thousands of rows: the tokenizer is called once per 1024 prompts."""
    calls = []

    def counting(texts, **kwargs):
        calls.append(len(texts))
        return tokenizer(texts, **kwargs)

    counting.convert_tokens_to_ids = tokenizer.convert_tokens_to_ids
    examples = [Example(str(i), f"What is {i} + {i}?", str(2 * i)) for i in range(2500)]
    lengths = prompts.prompt_lengths(examples, counting, settings(cfg))
    assert calls == [1024, 1024, 452]
    assert np.all(np.asarray(lengths) > 0)


def test_records_markers_are_the_processors():
    from ares_jax.models.qwen2_5_vl import processor as p

    assert (records.IMAGE_MARKER, records.IMAGE_PAD) == (p.IMAGE_MARKER, p.IMAGE_PAD)
