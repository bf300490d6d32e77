"""`Qwen2_5_VL.prompt_kv` in chunks equals the whole-prompt prefill.

The paged engine prefills each admission with `prompt_kv`; with `chunk` the decoder runs over
chunks of the prompt (`ops.attention.prefix_attention`), which must give the same hidden states
and per-layer keys and values at every real token, for left-padded prompts with and without
images, chunks made only of padding and a last chunk that overlaps the one before.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from ares_jax.models.qwen2_5_vl import params
from tests.models.attention_impl_test import CFG, _png, encode


@pytest.fixture(scope="module")
def inputs():
    """Three prompts of different real lengths in one row bucket of 128: two images, text only,
    one image."""
    return encode(
        ["Count the dots.", "What is 12 times 7?", "How many squares?"],
        [[_png(84, 56, 1), _png(56, 56, 2)], [], [_png(112, 168, 3)]],
    )


@pytest.fixture(scope="module")
def state():
    """One set of random parameters, shared by the attention implementations below."""
    return nnx.split(params.init_model(CFG, seed=3))[1]


def _graphdef(impl="auto"):
    return nnx.split(params.abstract_model(CFG, attention_impl=impl))[0]


def _prompt_kv(graphdef, state, inputs, features, chunk):
    def fn(state, inputs, features):
        return nnx.merge(graphdef, state).prompt_kv(inputs, features, chunk=chunk)

    return jax.tree.map(np.asarray, jax.jit(fn)(state, inputs, features))


CHUNKS = (16, 48, 100)


@pytest.fixture(scope="module")
def features(inputs, state):
    return jax.jit(lambda s, v: nnx.merge(_graphdef(), s).image_features(v))(state, inputs.vision)


@pytest.fixture(scope="module")
def chunked(inputs, state, features):
    """prompt_kv per chunk length; the chunked path is the same whatever `attention_impl`."""
    return {c: _prompt_kv(_graphdef(), state, inputs, features, c) for c in CHUNKS}


@pytest.mark.parametrize("impl", ["auto", "xla"])  # ops.attention's blockwise path; dense mask
def test_chunked_equals_whole_prompt_at_real_tokens(inputs, state, features, chunked, impl):
    real = np.asarray(inputs.attention_mask, bool)
    t = real.shape[1]
    lengths = real.sum(1)
    assert t == 128 and len(set(lengths.tolist())) == 3
    want_h, want_k, want_v = _prompt_kv(_graphdef(impl), state, inputs, features, None)
    # 16: 8 chunks, the first three padding in every row. 48 and 100 do not divide T, so the
    # last chunk starts at T - chunk and overlaps the one before; 48's first is padding too.
    assert t - lengths.max() >= 48
    for chunk, (h, ks, vs) in chunked.items():
        assert all(np.all(np.isfinite(x)) for x in (h, *ks, *vs))
        np.testing.assert_allclose(h[real], want_h[real], rtol=1e-5, atol=1e-5, err_msg=chunk)
        for i in range(CFG.text.num_hidden_layers):
            for name, got, want in (("k", ks[i], want_k[i]), ("v", vs[i], want_v[i])):
                np.testing.assert_allclose(
                    got[real], want[real], rtol=1e-5, atol=1e-5, err_msg=f"{chunk} {name}{i}"
                )


def test_compiled_program_does_not_grow_with_the_number_of_chunks(inputs, state):
    graphdef = _graphdef()

    def jaxpr(chunk):
        fn = lambda state: nnx.merge(graphdef, state).prompt_kv(inputs, chunk=chunk)  # noqa: E731
        return str(jax.make_jaxpr(fn)(state))

    assert jaxpr(8).count("dot_general") == jaxpr(32).count("dot_general")
    # A chunk of at least the prompt runs it whole.
    assert jaxpr(128) == jaxpr(None) != jaxpr(64)


def test_bad_chunk_raises(inputs, state):
    with pytest.raises(ValueError, match="chunk"):
        nnx.merge(_graphdef(), state).prompt_kv(inputs, chunk=0)
