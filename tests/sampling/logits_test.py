"""Tests of the next-token truncation and sampling: top-p from candidates equals the full sort,
the sort runs only when needed, and per-row keys make a row's draw independent of its batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.sampling import logits as L

V = 151_936  # the Qwen2 vocabulary


def _full_sort_reference(z, *, temperature, top_k=0, top_p=1.0, bias=None):
    """`sampling_logits` before the candidate prefilter: top-p always sorts the whole row."""
    if bias is not None:
        z = z + bias
    t = temperature if temperature > 0 else 1.0
    z = z / t if t != 1.0 else z
    neg = jnp.asarray(-jnp.inf, jnp.float32)
    if top_k and top_k < z.shape[-1]:
        kth = jax.lax.top_k(z, top_k)[0][:, -1:]
        z = jnp.where(z >= kth, z, neg)
    if top_p < 1.0:
        desc = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the first token always has mass_before 0
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        z = jnp.where(z >= cutoff, z, neg)
    return z


_STATIC = ("temperature", "top_k", "top_p", "top_p_candidates")
_new = jax.jit(L.sampling_logits, static_argnames=_STATIC)
_old = jax.jit(_full_sort_reference, static_argnames=_STATIC[:3])


def _peaked(rows, seed):
    """Like a trained LM: a normal background and a dozen large logits holding > 99.9% mass."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(rows, V)).astype(np.float32)
    for r in range(rows):
        z[r, rng.choice(V, 12, replace=False)] += rng.uniform(14, 26, 12).astype(np.float32)
    return z


def _flat(rows, seed):
    """A nucleus of tens of thousands of tokens: far past the candidates."""
    return np.random.default_rng(seed).normal(size=(rows, V)).astype(np.float32)


def _assert_same(z, **kw):
    z = jnp.asarray(z)
    old = np.asarray(_old(z, **{k: v for k, v in kw.items() if k != "top_p_candidates"}))
    new = np.asarray(_new(z, **kw))
    np.testing.assert_array_equal(new, old)
    return new


def _sentinel_fallback(monkeypatch):
    """The full-sort fallback replaced by one that keeps nothing (cutoff +inf): a row it decides
    comes out all -inf, so a row left finite was decided by its candidates alone. (The sort runs
    at all only when some row is not decided: test_top_p_fallback_sits_under_cond.)"""
    monkeypatch.setattr(L, "_sorted_cutoff", lambda z, top_p: jnp.full((z.shape[0], 1), jnp.inf))
    # A new function to trace: jit's trace cache would return `_new`'s traces of sampling_logits.
    return jax.jit(lambda z, **kw: L.sampling_logits(z, **kw), static_argnames=_STATIC)


@pytest.mark.parametrize("top_p", [0.9, 0.99, 0.999])
def test_top_p_equals_full_sort_peaked_flat_mixed(top_p, monkeypatch):
    peaked, flat = _peaked(4, seed=1), _flat(4, seed=2)
    kept = _assert_same(peaked, temperature=1.0, top_p=top_p)
    assert 1 <= np.isfinite(kept).sum(-1).max() <= 12
    kept = _assert_same(flat, temperature=1.0, top_p=top_p)
    assert np.isfinite(kept).sum(-1).min() > 10_000
    mixed = np.stack([peaked[0], flat[0], peaked[1], flat[1]])
    kept = _assert_same(mixed, temperature=1.0, top_p=top_p)
    np.testing.assert_array_equal(
        np.isfinite(kept[0]), np.isfinite(_new(peaked[:1], temperature=1.0, top_p=top_p)[0])
    )
    # Which rows the candidates decide: every peaked row, no flat row.
    sentinel = _sentinel_fallback(monkeypatch)
    decided = np.isfinite(np.asarray(sentinel(mixed, temperature=1.0, top_p=top_p))).any(-1)
    np.testing.assert_array_equal(decided, [True, False, True, False])
    np.testing.assert_array_equal(
        np.asarray(sentinel(peaked, temperature=1.0, top_p=top_p)),
        _new(peaked, temperature=1.0, top_p=top_p),
    )


def _primitives(eqns):
    """Names of the primitives in jaxpr equations, nested ones (jit, cond branches) included."""
    names = set()
    for eqn in eqns:
        names.add(eqn.primitive.name)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    names |= _primitives(sub.eqns)
    return names


def test_top_p_fallback_sits_under_cond():
    """The sort appears only inside one branch of a `cond`, never at the top level of the step."""
    jaxpr = jax.make_jaxpr(lambda z: L.sampling_logits(z, temperature=1.0, top_p=0.9))(
        jnp.zeros((2, 1000), jnp.float32)
    ).jaxpr
    top = [e.primitive.name for e in jaxpr.eqns]
    assert "sort" not in top and "top_k" in top and top.count("cond") == 1
    cond = next(e for e in jaxpr.eqns if e.primitive.name == "cond")
    branches = cond.params["branches"]
    assert sorted("sort" in _primitives(b.jaxpr.eqns) for b in branches) == [False, True]
    assert "sort" not in _primitives([e for e in jaxpr.eqns if e is not cond])


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU's top-k lowering")
@pytest.mark.parametrize("top_k,sorts", [(0, 1), (50, 0), (1000, 1)])
def test_top_p_compiles_to_partial_top_k(top_k, sorts):
    """The candidates stay a partial top-k once compiled (a simplifier rewrite once turned them
    into a second full sort); the only full sort left is the fallback's, under the conditional."""
    fn = jax.jit(lambda z: L.sampling_logits(z, temperature=1.0, top_k=top_k, top_p=0.9))
    hlo = fn.lower(jnp.zeros((2, 5000), jnp.float32)).compile().as_text()
    assert hlo.count('custom_call_target="TopK"') == 1
    assert hlo.count(" sort(") == sorts and hlo.count(" conditional(") == sorts


def test_top_p_ties_at_cutoff_and_across_candidates():
    """Ties at the cutoff are all kept, including ties that straddle the K-th candidate."""
    z = np.full((3, 64), -30.0, np.float32)
    z[0, :6] = [5.0, 3.0, 3.0, 3.0, 3.0, 1.0]  # cutoff inside the tie
    z[1, :8] = [4.0, 4.0, 2.0, 2.0, 2.0, 2.0, 2.0, 0.0]  # the tie straddles K = 4
    z[2, 10:14] = 7.0  # all tied
    for k in (2, 4):
        for top_p in (0.5, 0.8, 0.95):
            _assert_same(z, temperature=1.0, top_p=top_p, top_p_candidates=k)
    kept = _new(jnp.asarray(z), temperature=1.0, top_p=0.8, top_p_candidates=4)
    np.testing.assert_array_equal(np.isfinite(kept[0, :6]), [1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(np.isfinite(kept[1, :8]), [1, 1, 1, 1, 1, 1, 1, 0])


def test_top_p_with_temperature_bias_and_minus_inf():
    z = np.concatenate([_peaked(2, seed=3), _flat(2, seed=4)])
    bias = np.zeros(V, np.float32)
    bias[-300:] = -np.inf  # ids past the tokenizer's vocabulary
    bias[np.argmax(z[0])] = -np.inf  # a biased-out peak
    bias[151_655] = -100.0  # the image token
    bias[np.argsort(z[2])[-3:]] += 5.0
    for top_p in (0.9, 0.99):
        kept = _assert_same(z, temperature=0.7, top_p=top_p, bias=jnp.asarray(bias))
        assert not np.isfinite(kept[:, -300:]).any()
    # Fewer finite tokens than candidates: the candidates end in -inf.
    few = np.full((2, V), -np.inf, np.float32)
    few[:, :100] = np.random.default_rng(5).normal(size=(2, 100)) * 3
    for top_p in (0.5, 0.999):
        _assert_same(few, temperature=1.3, top_p=top_p)


@pytest.mark.parametrize("top_k", [50, 1000])
def test_top_p_after_top_k(top_k):
    """top_k <= K: the candidates are the top-k set; top_k > K: prefilter within it."""
    z = np.concatenate([_peaked(2, seed=6), _flat(2, seed=7)])
    z[3, :40] = np.sort(z[3])[-60]  # 40 ties around the 50th value
    for top_p in (0.9, 0.999):
        _assert_same(z, temperature=0.9, top_k=top_k, top_p=top_p)


def test_top_p_small_vocabulary_uses_the_full_sort():
    z = np.random.default_rng(8).normal(size=(5, 12)).astype(np.float32)
    for top_p in (0.3, 0.7, 0.95):
        _assert_same(z, temperature=0.9, top_p=top_p)
        _assert_same(z, temperature=0.9, top_p=top_p, top_p_candidates=4)


@pytest.mark.parametrize("typed", [False, True])
def test_per_row_keys_independent_of_batch(typed):
    rng = np.random.default_rng(9)
    z = jnp.asarray(rng.normal(size=(8, 1000)) * 2, jnp.float32)
    keys = jax.random.split(jax.random.key(3) if typed else jax.random.PRNGKey(3), 8)
    assert keys.shape == ((8,) if typed else (8, 2))
    sample = jax.jit(L.sample, static_argnames="greedy")
    batch, logp = sample(keys, z, greedy=False)
    alone = [int(sample(keys[i : i + 1], z[i : i + 1], greedy=False)[0][0]) for i in range(8)]
    np.testing.assert_array_equal(batch, alone)
    # The same rows in another order, and beside other rows, keep their tokens.
    perm = np.asarray([3, 0, 7, 5, 1, 6, 2, 4])
    np.testing.assert_array_equal(sample(keys[perm], z[perm], greedy=False)[0], batch[perm])
    assert len(set(alone)) > 1  # the keys differ
    np.testing.assert_allclose(logp, jax.nn.log_softmax(z)[np.arange(8), batch], rtol=1e-6)


def test_single_key_unchanged():
    z = jnp.asarray(np.random.default_rng(10).normal(size=(16, 50)), jnp.float32)
    key = jax.random.PRNGKey(4)
    tokens, _ = L.sample(key, z, greedy=False)
    np.testing.assert_array_equal(tokens, jax.random.categorical(key, z, axis=-1))
    tokens, _ = L.sample(jax.random.key(4), z, greedy=False)
    np.testing.assert_array_equal(tokens, jax.random.categorical(jax.random.key(4), z, axis=-1))


def test_per_row_keys_frequencies():
    """20000 rows with independent keys: within 0.02 total variation of softmax(z)."""
    z = jnp.asarray(np.random.default_rng(11).normal(size=(1, 12)) * 1.5, jnp.float32)
    draws = 20_000
    keys = jax.random.split(jax.random.PRNGKey(5), draws)
    tokens, _ = L.sample(keys, jnp.repeat(z, draws, 0), greedy=False)
    freq = np.bincount(np.asarray(tokens), minlength=12) / draws
    p = np.asarray(jax.nn.softmax(z[0].astype(jnp.float32)), np.float64)
    assert 0.5 * np.abs(freq - p).sum() < 0.02


@pytest.mark.parametrize("typed", [False, True])
def test_per_row_draws_equal_jax_random_categorical(typed):
    """`sample`'s own Gumbel arg-max draws jax.random.categorical's token for every row's key,
    with -inf logits (never drawn) in the rows."""
    z = np.random.default_rng(12).normal(size=(2048, 576)) * 3
    z[:, :7] = -np.inf
    z[5] = -np.inf
    z[5, 300] = 0.0  # one token left
    z = jnp.asarray(z, jnp.float32)
    keys = jax.random.split(jax.random.key(6) if typed else jax.random.PRNGKey(6), 2048)
    tokens, _ = jax.jit(L.sample, static_argnames="greedy")(keys, z, greedy=False)
    want = jax.jit(jax.vmap(jax.random.categorical))(keys, z)
    np.testing.assert_array_equal(tokens, want)
    assert int(tokens[5]) == 300 and int(tokens.min()) >= 7


def test_argmax_equals_jnp_argmax_with_ties_infinities_and_nans():
    r = np.random.default_rng(13)
    x = r.integers(-3, 4, size=(512, 40)).astype(np.float32)  # many ties at the maximum
    x[0] = -np.inf  # all -inf: index 0
    x[1, 10] = np.inf
    x[1, 20] = np.inf  # the first +inf
    x[2, 15] = np.nan
    x[2, 30] = np.nan  # the first NaN, as jnp.argmax
    x[3, 39] = 100.0  # the last column
    x = jnp.asarray(x)
    got = jax.jit(L.argmax)(x)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, jnp.argmax(x, axis=-1))
    assert [int(i) for i in got[:4]] == [0, 10, 15, 39]
