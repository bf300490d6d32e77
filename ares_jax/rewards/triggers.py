"""Reasoning-trigger vocabulary V_sem and the per-token trigger mask (METHOD.md 2.4).

The HWE count (METHOD.md 2.5) only looks at positions whose token is a reasoning trigger ("wait",
"however", "therefore", ...). Matching follows the released code: decode a single token id, strip
leading SentencePiece / byte-level space markers ("▁", "Ġ"), strip whitespace, lowercase, and test
exact membership in the word list. Instead of decoding at every step we build, once on the host, a
boolean table `is_trigger[V]` over the vocabulary (`trigger_table`) and gather it on device with the
token ids (`trigger_mask`).

Which ids to gather is the caller's choice (METHOD.md 2.4, section 11 `trigger_token`): the sampled
ids (default; what the paper means by "o_t in V_sem") or the arg-max ids of the step's distribution
(what the released code decodes; they differ exactly at the uncertain positions).

Two word lists ship beside this module:
  * `trigger_words.txt`, the project's own (195 words), the default (`load_trigger_words()`);
  * `released_trigger_words.json`, the authors' released list (174 words; it includes "wait" and
    the stem "conject" but not "verify" or "check"), `load_trigger_words("released")`. It is a copy,
    unchanged, of data/crucial_token_final_version.json from the public repository
    shawn0728/ARES at commit 146620e, under the Apache License 2.0
    (`LICENSE.released_trigger_words`, `released_trigger_words.NOTICE.md`).
`load_trigger_words(path)` reads any other list from a file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks

DEFAULT_TRIGGER_WORDS = Path(__file__).with_name("trigger_words.txt")
RELEASED_TRIGGER_WORDS = Path(__file__).with_name("released_trigger_words.json")
# Names `load_trigger_words` (and config key entropy.trigger_words) accepts instead of a path.
TRIGGER_WORD_LISTS = {"released": RELEASED_TRIGGER_WORDS}
_MARKERS = "\u2581\u0120"  # "▁" (SentencePiece space), "Ġ" (byte-level BPE space)


def normalize_token(s: str) -> str:
    """Token string -> comparable word: strip leading "▁"/"Ġ" markers (repeated) and whitespace,
    then lowercase (METHOD.md 2.4). normalize_token("ĠWait") == normalize_token("▁wait") == "wait".
    """
    return s.strip().lstrip(_MARKERS).strip().lower()


def _word(entry: str, where: str) -> str:
    word = normalize_token(entry)
    if not word:
        raise ValueError(f"{where}: empty trigger word {entry!r}.")
    if any(ch.isspace() for ch in word):
        raise ValueError(
            f"{where}: trigger word {entry!r} contains whitespace; a trigger is a single token."
        )
    return word


def load_trigger_words(path: str | Path | None = None) -> frozenset[str]:
    """Reads a trigger vocabulary.

    Args:
      path: None for the project's default (`trigger_words.txt`); the string "released" for the
        authors' released list (`RELEASED_TRIGGER_WORDS`, 174 words; names in
        `TRIGGER_WORD_LISTS` are looked up before paths, so a file of that name is read as
        "./released"); a `.json` file holding a list of strings; or any other file as text, one
        word per line, blank lines ignored and '#' starting a comment. Words are normalised like
        tokens (`normalize_token`).

    Returns:
      The set of lowercase trigger words.

    Raises:
      FileNotFoundError naming the file; ValueError naming the file and line (text) or entry
      (JSON) of bad content, or an empty vocabulary.
    """
    if path is None:
        path = DEFAULT_TRIGGER_WORDS
    elif isinstance(path, str) and path in TRIGGER_WORD_LISTS:
        path = TRIGGER_WORD_LISTS[path]
    else:
        path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_trigger_words: trigger word file {str(path)!r} not found.")
    text = path.read_text(encoding="utf-8")
    words = set()
    if path.suffix.lower() == ".json":
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg}).") from e
        if not isinstance(entries, list):
            raise ValueError(
                f"{path}: must hold a JSON list of strings, got {type(entries).__name__}."
            )
        for i, entry in enumerate(entries):
            if not isinstance(entry, str):
                raise ValueError(f"{path}: entry {i} is {entry!r}, not a string.")
            words.add(_word(entry, f"{path}: entry {i}"))
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                words.add(_word(entry, f"{path}:{lineno}"))
    if not words:
        raise ValueError(f"{path}: contains no trigger words.")
    return frozenset(words)


def _decoded_vocab(tokenizer) -> list[str]:
    """The text of each single token id, like the released code's `tokenizer.decode([i])`.

    Fast tokenizers are decoded in one Rust `decode_batch` call (byte-level BPE pieces come back as
    text, "Ġwait" -> " wait"); other objects with `decode` and `__len__` one id at a time.
    """
    import tokenizers  # local: only needed on this host-side path

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(tokenizer, tokenizers.Tokenizer):
        backend, size = tokenizer, tokenizer.get_vocab_size(with_added_tokens=True)
    elif isinstance(backend, tokenizers.Tokenizer):
        size = len(tokenizer)
    elif callable(getattr(tokenizer, "decode", None)) and hasattr(tokenizer, "__len__"):
        return [tokenizer.decode([i]) for i in range(len(tokenizer))]
    else:
        raise TypeError(
            "trigger_table: tokenizer_or_tokens must be a sequence of token strings, a "
            f"tokenizers.Tokenizer or a transformers tokenizer, got {type(tokenizer).__name__}."
        )
    return backend.decode_batch([[i] for i in range(size)], skip_special_tokens=False)


def trigger_table(
    tokenizer_or_tokens, words: Iterable[str], *, vocab_size: int | None = None
) -> np.ndarray:
    """Host-side table is_trigger[id] over the vocabulary (METHOD.md 2.4, 11).

    Args:
      tokenizer_or_tokens: a sequence of token strings indexed by id (raw vocabulary pieces such
        as "Ġwait" / "▁wait" are only normalised, not byte-decoded), or a tokenizer (transformers or
        tokenizers) whose ids are decoded one by one (byte-level BPE decoded properly).
      words: trigger words (`load_trigger_words()`); normalised before matching.
      vocab_size: V, rows of the table; may exceed the tokenizer's length (padded embedding rows,
        as in Qwen2.5-VL); the extra rows are False. Default: the tokenizer's length.

    Returns:
      [V] bool NumPy array, True where the id's normalised text is a trigger word.
    """
    fn = "trigger_table"
    if isinstance(words, str):
        raise TypeError(f"{fn}: words must be a collection of strings, not one string.")
    word_set = set()
    for w in words:
        if not isinstance(w, str):
            raise TypeError(f"{fn}: words must hold strings, got {w!r}.")
        word_set.add(normalize_token(w))
    if isinstance(tokenizer_or_tokens, np.ndarray):
        tokenizer_or_tokens = tokenizer_or_tokens.tolist()
    if isinstance(tokenizer_or_tokens, Sequence) and not isinstance(tokenizer_or_tokens, str):
        tokens = tokenizer_or_tokens
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TypeError(f"{fn}: tokenizer_or_tokens[{i}] is {t!r}, not a string.")
    else:
        tokens = _decoded_vocab(tokenizer_or_tokens)
    size = len(tokens) if vocab_size is None else vocab_size
    if not isinstance(size, int | np.integer) or size < len(tokens):
        raise ValueError(
            f"{fn}: vocab_size={vocab_size!r} must be an integer >= the tokenizer's {len(tokens)} "
            "tokens."
        )
    table = np.zeros(size, dtype=bool)
    table[: len(tokens)] = np.fromiter(
        (normalize_token(t) in word_set for t in tokens), dtype=bool, count=len(tokens)
    )
    return table


def trigger_mask(token_ids: jax.Array, table: jax.Array) -> jax.Array:
    """Which response positions hold a trigger token: a gather of `table` (jit-compatible).

    Args:
      token_ids: [B, T] int; sampled ids (default) or arg-max ids (released code), see module doc.
        Ids outside [0, V), e.g. a -1 padding id, give False.
      table: [V] bool from `trigger_table` (NumPy or device array).

    Returns:
      [B, T] bool.
    """
    fn = "trigger_mask"
    checks.check_rank(token_ids, 2, "token_ids", fn)
    checks.check_integer(token_ids, "token_ids", fn)
    checks.check_rank(table, 1, "table", fn)
    checks.check_bool(table, "table", fn)
    table = jnp.asarray(table)
    vocab = table.shape[0]
    inside = (token_ids >= 0) & (token_ids < vocab)
    return inside & table[jnp.clip(token_ids, 0, vocab - 1)]
