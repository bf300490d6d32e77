"""Tests for ares_jax/rewards/triggers.py (METHOD.md 2.4)."""

import hashlib
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ares_jax.rewards import triggers


def ref_normalize(s):
    """Independent transcription: strip, drop leading '▁'/'Ġ' runs, strip, lowercase."""
    return re.sub(r"^[\u2581\u0120]+", "", s.strip()).strip().lower()


# ---------------------------------------------------------------------------------------------
# normalize_token and word lists


@pytest.mark.parametrize(
    "raw, word",
    [
        ("\u0120Wait", "wait"),
        ("\u2581However", "however"),
        ("\u0120\u0120hmm", "hmm"),
        ("\u2581\u2581So", "so"),
        ("  But \n", "but"),
        ("\u2581", ""),
        ("wait\u2581", "wait\u2581"),  # only leading markers are markers
        ("THEREFORE", "therefore"),
    ],
)
def test_normalize_token(raw, word):
    assert triggers.normalize_token(raw) == word == ref_normalize(raw)


def test_default_word_list():
    words = triggers.load_trigger_words()
    assert 150 <= len(words) <= 200
    for w in words:
        assert w == w.lower() and w.strip() == w and w.isalpha(), w
    assert {"wait", "hmm", "but", "however", "therefore", "thus", "maybe", "perhaps"} <= words
    assert {"alternatively", "suppose", "assume", "recall", "reconsider", "verify"} <= words
    assert not any(len(w) == 1 for w in words)  # no option letters
    assert {"true", "false", "a", "b", "c", "d"}.isdisjoint(words)


# sha256 of the shipped copy of data/crucial_token_final_version.json (shawn0728/ARES, commit
# 146620e), taken from the reference copy when it was added: the copy must stay byte-identical.
RELEASED_SHA256 = "f52880d315a3c2ec5afea01be6879ac922d4dbac18c7dfc3072cc7497a6546c3"


def test_released_word_list():
    path = triggers.RELEASED_TRIGGER_WORDS
    assert path.name == "released_trigger_words.json" and path.is_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == RELEASED_SHA256
    words = triggers.load_trigger_words("released")
    assert len(words) == 174
    assert words == frozenset(json.loads(path.read_text(encoding="utf-8")))  # already normalised
    assert {"wait", "conject"} <= words
    assert {"verify", "check"}.isdisjoint(words)
    assert triggers.load_trigger_words(path) == words == triggers.load_trigger_words(str(path))
    assert words != triggers.load_trigger_words()  # None stays the project's own list
    # The licence and the notice ship beside it.
    licence = path.with_name("LICENSE.released_trigger_words").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    notice = path.with_name("released_trigger_words.NOTICE.md").read_text(encoding="utf-8")
    assert "shawn0728/ARES" in notice and "146620e" in notice
    assert "data/crucial_token_final_version.json" in notice


def test_released_name_before_paths(tmp_path, monkeypatch):
    # A file named "released" in the working directory does not shadow the name; "./released"
    # reads the file.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "released").write_text("hmm\n", encoding="utf-8")
    assert len(triggers.load_trigger_words("released")) == 174
    assert triggers.load_trigger_words("./released") == frozenset({"hmm"})
    assert triggers.load_trigger_words(tmp_path / "released") == frozenset({"hmm"})


def test_load_user_files(tmp_path):
    txt = tmp_path / "words.txt"
    txt.write_text("# header\nWait\n\n  hmm  # inline comment\nwait\n", encoding="utf-8")
    assert triggers.load_trigger_words(txt) == frozenset({"wait", "hmm"})
    js = tmp_path / "words.json"
    js.write_text(json.dumps(["Therefore", "\u2581thus"]), encoding="utf-8")
    assert triggers.load_trigger_words(str(js)) == frozenset({"therefore", "thus"})


def test_load_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        triggers.load_trigger_words(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: contains no trigger words"):
        triggers.load_trigger_words(empty)
    spaced = tmp_path / "spaced.txt"
    spaced.write_text("wait\nlet us\n", encoding="utf-8")
    with pytest.raises(ValueError, match="spaced.txt:2: trigger word 'let us' contains whitespace"):
        triggers.load_trigger_words(spaced)
    marker = tmp_path / "marker.txt"
    marker.write_text("wait\n\u0120\n", encoding="utf-8")
    with pytest.raises(ValueError, match="marker.txt:2: empty trigger word"):
        triggers.load_trigger_words(marker)
    bad = tmp_path / "bad.json"
    bad.write_text('["wait", 3]', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: entry 1 is 3, not a string"):
        triggers.load_trigger_words(bad)
    notlist = tmp_path / "obj.json"
    notlist.write_text('{"wait": 1}', encoding="utf-8")
    with pytest.raises(ValueError, match="obj.json: must hold a JSON list of strings"):
        triggers.load_trigger_words(notlist)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n"wait",\n', encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json:3: not valid JSON"):
        triggers.load_trigger_words(broken)
    empty_json = tmp_path / "empty.json"
    empty_json.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.json: contains no trigger words"):
        triggers.load_trigger_words(empty_json)


# ---------------------------------------------------------------------------------------------
# trigger_table

WORDS = frozenset({"wait", "however", "so", "hmm", "but"})


def test_table_from_token_list_with_markers():
    tokens = [
        "\u2581Wait",
        "\u0120However",
        "\u0120\u0120hmm",
        "waiting",
        "\u0120",
        "7",
        " but ",
        "x",
    ]
    table = triggers.trigger_table(tokens, WORDS, vocab_size=12)
    assert table.dtype == np.bool_ and table.shape == (12,)
    expected = [ref_normalize(t) in WORDS for t in tokens] + [False] * 4
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_array_equal(table[:5], [True, True, True, False, False])
    np.testing.assert_array_equal(triggers.trigger_table(np.array(tokens), WORDS), expected[:8])


def test_table_errors():
    with pytest.raises(ValueError, match="vocab_size=2 must be an integer >= the tokenizer's 3"):
        triggers.trigger_table(["a", "b", "c"], WORDS, vocab_size=2)
    with pytest.raises(TypeError, match="tokenizer_or_tokens\\[1\\] is 5"):
        triggers.trigger_table(["a", 5], WORDS)
    with pytest.raises(TypeError, match="words must be a collection of strings"):
        triggers.trigger_table(["a"], "wait")
    with pytest.raises(TypeError, match="tokenizer_or_tokens must be a sequence of token strings"):
        triggers.trigger_table(object(), WORDS)


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    """A small byte-level BPE tokenizer (GPT-2/Qwen style) trained in process, no downloads."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    corpus = ["Wait, however we think so. Therefore x = 5. But maybe wait, hmm."] * 40
    corpus += ["Hmm, so the café is naïve. Waiting... however"] * 20
    tok.train_from_iterator(corpus, trainer)
    return tok


def test_table_from_transformers_tokenizer(byte_level_tokenizer):
    hf = PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer)
    words = triggers.load_trigger_words()
    table = triggers.trigger_table(hf, words, vocab_size=len(hf) + 64)
    assert table.shape == (len(hf) + 64,) and not table[len(hf) :].any()
    # Reference: the released code's per-id decode, normalised independently.
    expected = [ref_normalize(hf.decode([i])) in words for i in range(len(hf))]
    np.testing.assert_array_equal(table[: len(hf)], expected)
    # Byte-level pieces with the space marker are decoded: "Ġwait" and "ĠWait" are triggers.
    for piece in ("\u0120wait", "\u0120Wait", "\u0120however", "Wait"):
        assert table[hf.convert_tokens_to_ids(piece)], piece
    assert table.sum() >= 6
    # A raw tokenizers.Tokenizer gives the same table.
    np.testing.assert_array_equal(
        triggers.trigger_table(byte_level_tokenizer, words), table[: len(hf)]
    )


def test_table_from_slow_decode_object():
    class Slow:  # anything with decode([id]) and __len__, decoded id by id
        pieces = ["\u2581Wait", "\u2581the", "\u2581however", "<s>"]

        def __len__(self):
            return len(self.pieces)

        def decode(self, ids):
            return self.pieces[ids[0]].replace("\u2581", " ")

    np.testing.assert_array_equal(triggers.trigger_table(Slow(), WORDS), [1, 0, 1, 0])


# ---------------------------------------------------------------------------------------------
# trigger_mask


def _mask_inputs(seed=0, rows=16, cols=24, vocab=50):
    rng = np.random.default_rng(seed)
    table = rng.random(vocab) < 0.3
    ids = rng.integers(-2, vocab + 3, size=(rows, cols)).astype(np.int32)  # some out of range
    return ids, table


def test_trigger_mask_matches_numpy():
    ids, table = _mask_inputs()
    got = np.asarray(triggers.trigger_mask(jnp.asarray(ids), table))
    expected = np.zeros(ids.shape, bool)
    for (r, c), i in np.ndenumerate(ids):
        expected[r, c] = 0 <= i < table.shape[0] and table[i]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.bool_


def test_trigger_mask_jit_and_sharded():
    ids, table = _mask_inputs(seed=1)
    eager = triggers.trigger_mask(jnp.asarray(ids), jnp.asarray(table))
    fn = jax.jit(triggers.trigger_mask)
    np.testing.assert_array_equal(fn(jnp.asarray(ids), jnp.asarray(table)), eager)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = fn(jax.device_put(ids, NamedSharding(mesh, P("data", None))), jnp.asarray(table))
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(sharded, eager)


def test_trigger_mask_errors():
    ids, table = _mask_inputs()
    with pytest.raises(ValueError, match="token_ids must have rank 2"):
        triggers.trigger_mask(jnp.asarray(ids[0]), table)
    with pytest.raises(TypeError, match="token_ids must be an integer array"):
        triggers.trigger_mask(jnp.asarray(ids, jnp.float32), table)
    with pytest.raises(TypeError, match="table must be a bool array"):
        triggers.trigger_mask(jnp.asarray(ids), table.astype(np.int32))
    with pytest.raises(ValueError, match="table must have rank 1"):
        triggers.trigger_mask(jnp.asarray(ids), table[None])
