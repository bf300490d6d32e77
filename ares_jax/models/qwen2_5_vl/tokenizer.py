"""A small Qwen2.5-style tokenizer built entirely in code (no files, no hub).

It is the tokenizer of the project's embedded small model: a byte-level BPE with the Qwen2
pre-tokenizer regex, 256 byte tokens, a few hundred merges learned deterministically from a
built-in English/maths/chat text, then the 22 Qwen2.5 special tokens in the official order
(QWEN2_5_VL.md 1.1, 2.2), then `<think>`, `</think>` and `\\boxed{` as ordinary added tokens
(the METHOD.md 4.1 output format) and any caller extras.

Byte-level BPE without a normaliser is lossless: `decode(encode(s)) == s` for every UTF-8 string.
Special token ids differ from the real Qwen2.5 vocabulary (151643...), so code must always read
them from the tokenizer (`special_ids`), never hard-code them.

Only `transformers` and `tokenizers` are imported, and lazily.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, NamedTuple

# The 22 Qwen2.5 special tokens, in vocabulary order (official ids 151643..151664).
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# Ordinary (non-special) added tokens so the METHOD.md 4.1 answer format encodes compactly.
REASONING_TOKENS: tuple[str, ...] = ("<think>", "</think>", "\\boxed{")

# The Qwen2 pre-tokenizer pattern (tokenizer.json of Qwen2/Qwen2.5): single digits, letters with
# one optional leading non-letter, punctuation runs, newlines and whitespace runs.
QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MAX_MERGES = 1024
MIN_PAIR_COUNT = 2

# Built-in text the merges are learned from. Changing it changes every token id of the embedded
# model's vocabulary, so treat it as frozen.
_MERGE_TEXT = r"""
<|im_start|>system
You are a helpful assistant.<|im_end|>
<|im_start|>user
What is the value of x in the figure? You FIRST think about the reasoning process as an internal
monologue and then provide the final answer. The reasoning process MUST BE enclosed within
<think> </think> tags. The final answer MUST BE put in \boxed{}.<|im_end|>
<|im_start|>assistant
<think>
Let me think about this step by step. The image shows a triangle with two angles given. The sum of
the angles of a triangle is 180 degrees, so the third angle is 180 - 60 - 50 = 70 degrees.
Wait, let me check the figure again. The angle at the top is marked x, and the angle at the left is
marked 60. So x = 70. However, maybe the question asks for the exterior angle. Hmm, no, it asks
for the value of x. Therefore the answer is 70.
</think>
The answer is \boxed{70}.<|im_end|>
The number of apples in the basket is 12. If we take away 5 apples, then 7 apples are left.
First, we count the red squares and the blue circles in the picture. There are 3 red squares and
4 blue circles, so there are 7 shapes in total. Next, we compute the area of the rectangle: the
width is 8 and the height is 5, so the area is 8 * 5 = 40. Then the perimeter is 2 * (8 + 5) = 26.
But wait, we should verify the result. Since the width is 8 and the height is 5, the area is
indeed 40. Thus the final answer is 40. Alternatively, we could solve the equation 2x + 3 = 11,
which gives 2x = 8 and x = 4. Let us suppose that the function f(x) = x^2 - 4x + 4 has a root.
Because f(x) = (x - 2)^2, the only root is x = 2. Now consider the probability that a fair coin
lands heads twice in a row: it is 1/2 * 1/2 = 1/4. Actually, I need to reconsider the question.
Perhaps the question asks for the number of triangles in the image. Let me recount: there are
three small triangles and one large triangle, so there are four triangles in total. Hence the
answer is 4. So the correct answer is (B). Is this right? Yes, because the sum matches the total.
Note that the chart shows the sales of each year: in 2019 the sales were 120, in 2020 they were
150, and in 2021 they were 180. The increase from 2019 to 2021 is 180 - 120 = 60, which is 50% of
the sales in 2019. The mean of the numbers 3, 5, 7 and 9 is (3 + 5 + 7 + 9) / 4 = 24 / 4 = 6.
The length of the hypotenuse is \sqrt{3^2 + 4^2} = \sqrt{25} = 5. The ratio is \frac{1}{2}.
In the diagram, the line AB is parallel to the line CD, and the angle ABC equals the angle BCD.
The radius of the circle is 3, so its circumference is 2 \pi r = 6 \pi and its area is 9 \pi.
Options: (A) 2 (B) 4 (C) 6 (D) 8. Choose the correct option and explain your reasoning.
I think the answer should be 6, but let me double check by another method. Try x = 1: the left
side is 5 and the right side is 5, so it works. Next, try x = 2: the left side is 7 and the right
side is 9, so it does not work. Hence x = 1 is the solution. We are done.
"""


class SpecialIds(NamedTuple):
    """Token ids the processor, the sampler and the rewards need (read from a tokenizer)."""

    image_pad: int
    vision_start: int
    vision_end: int
    im_start: int
    im_end: int
    endoftext: int
    pad: int
    video_pad: int


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / tokenizers ByteLevel byte -> printable character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _pre_tokenizer() -> Any:
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


@functools.cache
def _learned_bpe() -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """Learns merges from `_MERGE_TEXT`; returns (merges, vocab in id order).

    Plain BPE: repeatedly merge the most frequent adjacent pair (ties: lexicographically smallest
    pair), stopping after MAX_MERGES or when no pair occurs MIN_PAIR_COUNT times. Special tokens
    are cut out of the text first, so they never shape the merges.
    """
    text = _MERGE_TEXT
    for token in QWEN_SPECIAL_TOKENS + REASONING_TOKENS:
        text = text.replace(token, " ")
    pieces = [p for p, _ in _pre_tokenizer().pre_tokenize_str(text)]
    words: dict[tuple[str, ...], int] = collections.Counter(tuple(p) for p in pieces)

    vocab = [_bytes_to_unicode()[b] for b in range(256)]
    known = set(vocab)
    merges: list[tuple[str, str]] = []
    for _ in range(MAX_MERGES):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if count < MIN_PAIR_COUNT:
            break
        merges.append(best)
        joined = best[0] + best[1]
        if joined not in known:
            known.add(joined)
            vocab.append(joined)
        new_words: dict[tuple[str, ...], int] = {}
        for word, c in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(joined)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + c
        words = new_words
    return tuple(merges), tuple(vocab)


def _extras(extra_tokens: tuple[str, ...] | list[str]) -> list[str]:
    extras = list(dict.fromkeys(REASONING_TOKENS + tuple(extra_tokens)))
    vocab = _learned_bpe()[1]
    clashes = [t for t in extras if t in QWEN_SPECIAL_TOKENS or t in vocab or not t]
    if clashes:
        raise ValueError(
            f"extra_tokens {clashes} are empty or already in the vocabulary (byte, merged or "
            "Qwen2.5 special tokens)"
        )
    return extras


def build_tokenizer(extra_tokens: tuple[str, ...] | list[str] = ()) -> Any:
    """Builds the embedded model's tokenizer in code.

    Id layout: 0..255 byte tokens (in byte order), then learned merges, then the 22 Qwen2.5
    special tokens in official order (special, skipped by `skip_special_tokens`), then
    `<think>`, `</think>`, `\\boxed{` and `extra_tokens` as ordinary added tokens.

    Args:
      extra_tokens: more ordinary added tokens, appended after the reasoning tokens in order.

    Returns:
      A `transformers.PreTrainedTokenizerFast` with pad `<|endoftext|>`, eos `<|im_end|>`, no bos
      and no unk; `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip offline.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    merges, vocab = _learned_bpe()
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=list(merges),
        dropout=None,
        unk_token=None,
        fuse_unk=False,
        byte_fallback=False,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
            for t in QWEN_SPECIAL_TOKENS
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False)
            for t in _extras(extra_tokens)
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
        padding_side="left",
    )


def vocab_size(extra_tokens: tuple[str, ...] | list[str] = ()) -> int:
    """`len(build_tokenizer(extra_tokens))`, without building the transformers object."""
    return len(_learned_bpe()[1]) + len(QWEN_SPECIAL_TOKENS) + len(_extras(extra_tokens))


def special_ids(tokenizer: Any = None) -> SpecialIds:
    """Special token ids of `tokenizer` (ours or a real Qwen2.5 one); None: of `build_tokenizer()`.

    `pad` is the tokenizer's pad id, falling back to `<|endoftext|>` (as Qwen2.5 does).
    """
    if tokenizer is None:
        first = len(_learned_bpe()[1])
        ids = {t: first + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
        return SpecialIds(
            image_pad=ids["<|image_pad|>"],
            vision_start=ids["<|vision_start|>"],
            vision_end=ids["<|vision_end|>"],
            im_start=ids["<|im_start|>"],
            im_end=ids["<|im_end|>"],
            endoftext=ids["<|endoftext|>"],
            pad=ids["<|endoftext|>"],
            video_pad=ids["<|video_pad|>"],
        )

    # Membership, not "not the unk id": a Qwen2 tokenizer whose config leaves unk_token out gets
    # `<|endoftext|>` as its unk token from transformers.
    vocab = tokenizer.get_vocab()

    def lookup(token: str) -> int:
        if token not in vocab:
            raise ValueError(f"tokenizer has no token {token!r}; is it a Qwen2.5 tokenizer?")
        return int(vocab[token])

    endoftext = lookup("<|endoftext|>")
    pad = tokenizer.pad_token_id
    return SpecialIds(
        image_pad=lookup("<|image_pad|>"),
        vision_start=lookup("<|vision_start|>"),
        vision_end=lookup("<|vision_end|>"),
        im_start=lookup("<|im_start|>"),
        im_end=lookup("<|im_end|>"),
        endoftext=endoftext,
        pad=endoftext if pad is None else int(pad),
        video_pad=lookup("<|video_pad|>"),
    )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """Loads a tokenizer directory offline (`AutoTokenizer.from_pretrained(local_files_only=True)`).

    Raises:
      FileNotFoundError: naming the directory, when it does not exist or holds no tokenizer files.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    if not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer files in {path!r} (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
