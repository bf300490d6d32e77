"""Tests for ares_jax/models/qwen2_5_vl/tokenizer.py (the in-code Qwen2.5-style tokenizer)."""

import json

import numpy as np
import pytest

from ares_jax.models.qwen2_5_vl import processor
from ares_jax.models.qwen2_5_vl import tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.build_tokenizer()


TEXTS = [
    "Hello world! The answer is 42.",
    "  leading and trailing spaces \t\n\n  ",
    "中文测试：你好，世界。日本語のテキスト、한국어",
    "emoji 🎉👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "mixed \u00e9\u0301 e\u0301 (not NFC) \x00 \x7f control",
    "<think>\nWait, 3 * 4 = 12.\n</think>\nThe answer is \\boxed{12}.",
    processor.build_prompt("What is in <image>?", 1),
]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok):
    rng = np.random.default_rng(0)
    ranges = [(0x20, 0x7F), (0x0, 0x20), (0xA0, 0x800), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    for _ in range(50):
        chars = []
        for lo, hi in (ranges[i] for i in rng.integers(0, len(ranges), 40)):
            chars.append(chr(int(rng.integers(lo, hi))))
        text = "".join(chars)
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_special_ids(tok):
    ids = tokenizer_lib.special_ids(tok)
    n = len(tokenizer_lib._learned_bpe()[1])
    # The 22 specials follow the BPE vocabulary in the official order.
    assert [tok.convert_tokens_to_ids(t) for t in tokenizer_lib.QWEN_SPECIAL_TOKENS] == list(
        range(n, n + 22)
    )
    assert ids.endoftext == n and ids.im_start == n + 1 and ids.im_end == n + 2
    assert ids.vision_start == n + 9 and ids.vision_end == n + 10
    assert ids.image_pad == n + 12 and ids.video_pad == n + 13
    assert ids.pad == ids.endoftext == tok.pad_token_id
    assert tok.eos_token_id == ids.im_end and tok.bos_token is None
    assert tokenizer_lib.special_ids() == ids  # without building the transformers object
    assert tokenizer_lib.vocab_size() == len(tok) == n + 22 + 3
    # Specials are single tokens inside text and skipped on request.
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>"
    enc = tok.encode(chat, add_special_tokens=False)
    assert enc[0] == ids.im_start and enc[-1] == ids.im_end
    assert enc.count(ids.image_pad) == 1
    assert tok.decode(enc, skip_special_tokens=True) == "user\nhi"


def test_reasoning_tokens_compact(tok):
    think, end_think, boxed = (tok.convert_tokens_to_ids(t) for t in tokenizer_lib.REASONING_TOKENS)
    assert tok.encode("<think>", add_special_tokens=False) == [think]
    assert tok.encode("</think>", add_special_tokens=False) == [end_think]
    assert tok.encode("\\boxed{", add_special_tokens=False) == [boxed]
    ids = tok.encode("<think>x</think>\\boxed{7}", add_special_tokens=False)
    assert ids[0] == think and end_think in ids and boxed in ids and len(ids) <= 6
    # Not special: kept by skip_special_tokens (the reward parses them).
    assert tok.decode(ids, skip_special_tokens=True) == "<think>x</think>\\boxed{7}"
    # Learned merges make common words single tokens.
    assert len(tok.encode(" the answer is", add_special_tokens=False)) <= 3


def test_deterministic_and_extra_tokens(tok):
    again = tokenizer_lib.build_tokenizer()
    assert again.get_vocab() == tok.get_vocab()
    extra = tokenizer_lib.build_tokenizer(extra_tokens=["<answer>", "</answer>"])
    assert len(extra) == len(tok) + 2
    assert extra.convert_tokens_to_ids("<answer>") == len(tok)
    assert extra.encode("<answer>", add_special_tokens=False) == [len(tok)]
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer_lib.build_tokenizer(extra_tokens=["<|im_end|>"])


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert tokenizer_lib.special_ids(loaded) == tokenizer_lib.special_ids(tok)
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert auto.encode(TEXTS[-1], add_special_tokens=False) == tok.encode(
        TEXTS[-1], add_special_tokens=False
    )


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer files in .*empty"):
        (tmp_path / "empty").mkdir()
        tokenizer_lib.load_tokenizer(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere.* does not exist"):
        tokenizer_lib.load_tokenizer(tmp_path / "nowhere")


def test_special_ids_when_unk_is_endoftext():
    """transformers gives a Qwen2 tokenizer whose config leaves unk_token out `<|endoftext|>`
    as unk: the special ids are still found."""
    tok = tokenizer_lib.build_tokenizer()
    want = tokenizer_lib.special_ids(tok)
    tok.unk_token = "<|endoftext|>"
    assert tok.unk_token_id == want.endoftext
    assert tokenizer_lib.special_ids(tok) == want
