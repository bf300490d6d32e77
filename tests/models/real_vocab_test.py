"""The real 151,665-token Qwen2.5-VL tokenizer (tests/real_vocab.py) against independent references:
tiktoken on the same ranks, official ids quoted from the hub tokenizer, and the project's own
prompt builder and loader."""

import random
import unicodedata

import numpy as np
import PIL.Image
import pytest

from ares_jax.models.qwen2_5_vl import processor
from ares_jax.models.qwen2_5_vl import tokenizer as tokenizer_lib
from tests import real_vocab

# The Qwen2 pre-tokenizer regex, written out here rather than imported, so tiktoken splits by the
# published pattern and not by the project's copy of it.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

TEXTS = [
    "Hello world",
    "Hello world! The answer is 42.",
    "12345678901234 3.14159 -0.5e10 1,000,000 ٣٤٥ ①②",
    "  leading and trailing spaces \t\n\n  ",
    "a\r\n\r\nb\n\n\n   \n\tc\r\rd \x0b\x0c e\u00a0\u2003f",
    "don't I'LL we've THEY'RE it's 'quoted'",
    "中文测试：你好，世界。日本語のテキスト、한국어 русский текст Ελληνικά עברית العربية",
    "emoji 🎉👍🏽 👨‍👩‍👧 and flags 🇫🇷",
    "e\u0301 A\u030a \u212b (not NFC) \x00 \x7f control",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "<think>\nWait, 3 * 4 = 12.\n</think>\nThe answer is \\boxed{12}.",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>\n<tool_call>x",
    "ĠÑĤÐ²ÑĬÑĢ",
    processor.build_prompt("What is in <image>? Options: (A) 2 (B) 4", 1),
]


def _random_texts(n: int = 60, length: int = 80) -> list[str]:
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0x0, 0x20), (0xA0, 0x7FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF)]
    return ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length)) for _ in range(n)]


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory):
    return real_vocab.build_real_tokenizer(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def tok(real_dir):
    return tokenizer_lib.load_tokenizer(real_dir)


@pytest.fixture(scope="module")
def tiktoken_encoding():
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding(
        "qwen2_5_vl",
        pat_str=QWEN2_PATTERN,
        mergeable_ranks=real_vocab.read_ranks(real_vocab.ranks_file()),
        special_tokens=REAL_IDS,
    )


def test_vocabulary_size_and_special_ids(tok):
    assert type(tok).__name__ == "Qwen2Tokenizer"  # the class a hub checkpoint loads as
    vocab = tok.get_vocab()
    assert len(tok) == len(vocab) == real_vocab.VOCAB_SIZE == 151665
    assert sorted(vocab.values()) == list(range(151665))
    assert max(vocab.values()) < real_vocab.EMBED_ROWS == 151936
    assert {t: tok.convert_tokens_to_ids(t) for t in REAL_IDS} == REAL_IDS
    assert tokenizer_lib.QWEN_SPECIAL_TOKENS == tuple(REAL_IDS)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None and tok.unk_token is None
    assert tokenizer_lib.special_ids(tok) == tokenizer_lib.SpecialIds(
        image_pad=151655,
        vision_start=151652,
        vision_end=151653,
        im_start=151644,
        im_end=151645,
        endoftext=151643,
        pad=151643,
        video_pad=151656,
    )
    # Every BPE id decodes to a distinct token string (the whole 151643-row table is usable).
    tokens = tok.convert_ids_to_tokens(list(range(real_vocab.BPE_SIZE)))
    assert len(set(tokens)) == real_vocab.BPE_SIZE and None not in tokens


def test_special_tokens_are_single_ids_and_skipped_like_the_checkpoint(tok):
    ids = tok.encode(
        "<|im_start|>Hello<|image_pad|><tool_call><|file_sep|>", add_special_tokens=False
    )
    assert ids == [151644, 9707, 151655, 151657, 151664]
    # 151643..151656 are special; <tool_call> ... <|file_sep|> are plain added tokens.
    assert tok.decode(ids, skip_special_tokens=True) == "Hello<tool_call><|file_sep|>"


def test_known_ids_of_the_official_qwen2_tokenizer(tok):
    # Ids as printed by the hub's Qwen2/Qwen2.5 tokenizer (not derived from the packaged file).
    known = {
        "Hello world": [9707, 1879],
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n": (
            [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
        ),
        "<|im_start|>user\n": [151644, 872, 198],
        "<|im_start|>assistant\n": [151644, 77091, 198],
    }
    for text, ids in known.items():
        assert tok.encode(text, add_special_tokens=False) == ids, text


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken(tok, tiktoken_encoding, text):
    nfc = unicodedata.normalize("NFC", text)  # the Qwen2 tokenizer.json normaliser
    expected = tiktoken_encoding.encode(nfc, allowed_special="all")
    assert tok.encode(text, add_special_tokens=False) == expected
    assert tok.decode(expected) == tiktoken_encoding.decode(expected) == nfc


def test_matches_tiktoken_on_random_unicode(tok, tiktoken_encoding):
    texts = [unicodedata.normalize("NFC", t) for t in _random_texts()]
    got = tok(texts, add_special_tokens=False)["input_ids"]
    assert got == tiktoken_encoding.encode_batch(texts, allowed_special=set())
    assert tok.batch_decode(got) == texts


def test_loaded_directory_equals_its_tokenizer_json(tok, real_dir):
    # load_tokenizer goes through transformers' Qwen2Tokenizer, which rebuilds the pipeline from
    # its class; the saved tokenizer.json holds the pipeline built from the ranks. Same ids.
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(real_dir / "tokenizer.json"))
    texts = TEXTS + _random_texts(20)
    assert [e.ids for e in raw.encode_batch(texts, add_special_tokens=False)] == tok(
        texts, add_special_tokens=False
    )["input_ids"]
    assert (real_dir / "chat_template.jinja").read_text() == processor.QWEN2_5_VL_CHAT_TEMPLATE


@pytest.mark.parametrize(
    "question, num_images",
    [
        ("What is the value of x in the figure?", 1),
        ("  Compare <image> and <image>: which has more circles? ", 2),
        ("中文问题：图中有几个三角形？\n\n", 1),
        ("No picture here, 12 + 30 = ?", 0),
    ],
)
def test_chat_template_equals_build_prompt(tok, question, num_images):
    text = processor.build_prompt(question, num_images)
    via_template = tok.apply_chat_template(
        processor.chat_messages(question, num_images), tokenize=False, add_generation_prompt=True
    )
    assert via_template == processor.chat_prompt(tok, question, num_images) == text
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.encode(via_template, add_special_tokens=False) == ids
    assert ids.count(151655) == num_images and ids[-3:] == [151644, 77091, 198]


def test_encode_batch_with_real_ids(tok):
    prompts = [processor.build_prompt("How many dots?", 1), processor.build_prompt("Hi", 0)]
    image = PIL.Image.fromarray(np.full((60, 90, 3), 128, np.uint8))
    batch = processor.encode_batch(
        prompts, [[image], []], tok, min_pixels=3136, max_pixels=28 * 28 * 64
    )
    n_image = processor.tokens_per_image(batch["image_grid_thw"][0])
    ids = batch["input_ids"]
    assert int((ids == 151655).sum()) == n_image == int(batch["mm_token_type_ids"].sum())
    assert int((ids[1] == 151643).sum()) == int((batch["attention_mask"][1] == 0).sum()) > 0
    assert ids.max() == 151655 and ids.max() < real_vocab.EMBED_ROWS


def test_build_is_cached(real_dir, tmp_path_factory):
    before = (real_dir / "tokenizer.json").stat().st_mtime_ns
    assert real_vocab.build_real_tokenizer(tmp_path_factory.getbasetemp()) == real_dir
    assert (real_dir / "tokenizer.json").stat().st_mtime_ns == before
