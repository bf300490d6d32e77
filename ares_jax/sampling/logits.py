"""Next-token distributions: exact statistics, truncation and sampling (pure, jittable).

Two distributions exist at every decode step (METHOD.md 2.1, 4.1):
  * the model's distribution at the rollout temperature, softmax(z / T) over the full vocabulary.
    Its entropy is what ARES measures, and the log-prob of the sampled token under it is what the
    learner recomputes (`ops.entropy.token_logprobs_and_entropy`): the sampler reports both, so
    the sampler and the learner agree to float rounding;
  * the distribution actually sampled from: the same logits with the logit bias (the released
    code biases the image token by -100), ids past the tokenizer's vocabulary removed, then top-k
    and top-p truncation. Its log-prob of the sampled token is reported too (`sampling_logp`).
Temperature 0 means greedy decoding; the statistics are then those of temperature 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def token_stats(z: jax.Array, tokens: jax.Array, temperature: float):
    """Log-prob of `tokens` and entropy of softmax(z / T), T = temperature (1 if greedy).

    Args:
      z: [N, V] float32 logits.
      tokens: [N] int.

    Returns:
      (logp [N], entropy [N]) float32, nats.
    """
    t = temperature if temperature > 0 else 1.0
    zt = z / t if t != 1.0 else z
    lse = jax.nn.logsumexp(zt, axis=-1)
    p = jnp.exp(zt - lse[:, None])
    entropy = lse - jnp.sum(p * zt, axis=-1)
    logp = jnp.take_along_axis(zt, tokens[:, None], axis=-1)[:, 0] - lse
    return logp, entropy


def sampling_logits(
    z: jax.Array,
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    bias: jax.Array | None = None,
    top_p_candidates: int = 256,
) -> jax.Array:
    """Logits of the distribution sampled from: biased, tempered, top-k and top-p truncated.

    Top-p never sorts the vocabulary when the `top_p_candidates` most likely tokens decide the
    cutoff (`_top_p_cutoff`); the kept set is the full sort's (`_sorted_cutoff`) up to one
    float32 rounding documented there.

    Args:
      z: [N, V] float32 logits.
      temperature: > 0 (greedy callers take the arg-max of the result at temperature 1).
      top_k: keep the k largest logits (ties at the k-th kept); 0 = off.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (nucleus), measured after top-k (renormalised over the top-k set, the order of
        transformers' logits warpers and of vLLM); 1 = off. At least one token is always kept,
        and every token tied with the least likely kept one.
      bias: [V] float32 added to the logits before the temperature (-inf removes a token).
      top_p_candidates: K, how many of the most likely tokens top-p looks at first; the full
        sort runs only on steps where some row's nucleus reaches past them (K >= V: always).

    Returns:
      [N, V] float32, -inf outside the kept set.
    """
    if bias is not None:
        z = z + bias
    t = temperature if temperature > 0 else 1.0
    z = z / t if t != 1.0 else z
    neg = jnp.asarray(-jnp.inf, _F32)
    top = None
    if top_k and top_k < z.shape[-1]:
        top = _top_values(z, top_k)  # [N, top_k], descending
        z = jnp.where(z >= top[:, -1:], z, neg)
    if top_p < 1.0:
        z = jnp.where(z >= _top_p_cutoff(z, top_p, top, top_p_candidates), z, neg)
    return z


def _top_values(z: jax.Array, k: int) -> jax.Array:
    """The k largest values of each row, [N, k] descending.

    XLA lowers top-k as a sort of the whole row and then matches "sort, slice [0, k)" back into a
    partial top-k; slicing the result again (its first or last column) lets the simplifier fold
    those slices into the sort, which then stays a full sort (seen on CPU: 3 s instead of 0.04 s
    on [64, 151936]). The barrier keeps the top-k whole.
    """
    return jax.lax.optimization_barrier(jax.lax.top_k(z, k)[0])


def _sorted_cutoff(z: jax.Array, top_p: float) -> jax.Array:
    """The nucleus rule on the fully sorted row: [N, V] logits -> [N, 1] least kept logit."""
    desc = -jnp.sort(-z, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p  # the first token always has mass_before 0
    return jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)


def _top_p_cutoff(z: jax.Array, top_p: float, top: jax.Array | None, k: int) -> jax.Array:
    """`_sorted_cutoff` from the k most likely tokens, sorting the row only when they fall short.

    The candidates are the first k entries of the sorted row, so their probabilities and running
    mass are those `_sorted_cutoff` computes (exp(z - max) / sum, then a cumulative sum whose first
    k entries XLA rounds alike for k or V entries; checked on CPU) except for the normaliser: it is
    summed over the row in vocabulary order here and in sorted order there. The two float32 sums
    differ by rounding (up to about 5e-7 relative, measured), so a kept set decided by the
    candidates can differ from the full sort's only where a candidate's mass before it lies within
    that rounding of top_p. A row is decided by its candidates when the last one's mass before it,
    less its probability once more as a margin, reaches top_p: the mass before any later token is
    at least that (the running mass only grows, later tokens are no more likely), so the cutoff
    lies among the candidates. Rows not decided take `_sorted_cutoff` itself, bit for bit,
    computed (under `lax.cond`) only on steps with such a row; each row's result depends on its
    logits alone. (A fallback from the vocabulary-order normaliser would agree with the candidates
    by construction but not with the full sort: deep in a flat row thousands of tokens share one
    float32 step of the running mass, and it changed the cutoff of most flat rows at top_p 0.999.)

    Args:
      z: [N, V] float32 logits, top-k truncated if `top` is given.
      top_p: in (0, 1).
      top: [N, top_k] float32, the top-k values in descending order, or None (top-k off).
      k: the number of candidates.

    Returns:
      [N, 1] float32, the least kept logit (keep z >= it).
    """
    v = z.shape[-1]
    if top is not None and top.shape[-1] <= k:
        # The candidates are the top-k set; past them the sorted row holds only ties with the last
        # candidate or -inf, whose mass before is at least the last candidate's. If the last
        # candidate is kept, so is the whole top-k set, which is what its cutoff keeps.
        cand = top
    elif k >= v:
        return _sorted_cutoff(z, top_p)
    else:
        cand = top[:, :k] if top is not None else _top_values(z, k)  # [N, K], descending
    m = cand[:, :1]
    probs = jnp.exp(cand - m) / jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True)
    mass = jnp.cumsum(probs, axis=-1)
    keep = mass - probs < top_p
    cutoff = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1, keepdims=True)
    if cand is top:
        return cutoff
    decided = mass[:, -1:] - 2 * probs[:, -1:] >= top_p  # [N, 1]
    return jax.lax.cond(
        jnp.all(decided),
        lambda: cutoff,
        lambda: jnp.where(decided, cutoff, _sorted_cutoff(z, top_p)),
    )


def argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32, to the index: the first maximum, or the first NaN.

    Plain reductions (the maximum, then the least index holding it) instead of XLA's
    variadic (value, index) reduction, which XLA's CPU backend does not vectorise: a decode step
    takes one per row over the vocabulary (benchmarks/RESULTS.md).
    """
    n = x.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    first = lambda hit: jnp.min(jnp.where(hit, index, n), axis=-1)  # noqa: E731
    first_nan = first(jnp.isnan(x))  # XLA's maximum may skip NaNs: look for them on their own
    return jnp.where(first_nan < n, first_nan, first(x == jnp.max(x, axis=-1, keepdims=True)))


def sample(key: jax.Array, z: jax.Array, *, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from logits z [N, V]; returns (tokens [N] int32, logp [N]).

    Args:
      key: one PRNG key for the batch (raw uint32 [2] or typed []), or one key per row (raw uint32
        [N, 2] or typed [N]): row i is then drawn with key[i] alone, so its token depends only on
        its key and its logits, never on the batch it ran in. Unused when greedy.
      z: [N, V] float32 logits (-inf = never drawn).
      greedy: take the arg-max instead of drawing.

    Returns:
      (tokens [N] int32, logp [N] float32 log-prob of each token under softmax(z)).
    """
    # `jax.random.categorical`'s draw, Gumbel noise and its arg-max, to the token (tests), with
    # `argmax`'s reductions.
    if greedy:
        tokens = argmax(z)
    elif key.ndim == (1 if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else 2):
        noise = jax.vmap(lambda k: jax.random.gumbel(k, z.shape[-1:], z.dtype))(key)
        tokens = argmax(noise + z)
    else:
        tokens = argmax(jax.random.gumbel(key, z.shape, z.dtype) + z)
    logp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logp


def topk_entropies(
    z: jax.Array, k: int, temperature: float, *, tokens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The released code's entropy estimates from the log-probs vLLM returns for `logprobs=k`.

    The returned set is the top-k log-probs of softmax(z / T) (T = temperature, 1 if greedy) plus
    the sampled token's log-prob when its id is not among the top-k ids
    (`ops.entropy.topk_and_sampled_logprobs`, which documents ties at the k-th value), so each
    estimate sums over k or k + 1 tokens.

    Args:
      z: [N, V] float32 logits.
      k: number of top log-probs, a Python int in [1, V].
      temperature: the rollout temperature (0 = greedy, statistics at temperature 1).
      tokens: [N] int, the ids sampled at this step, in [0, V).

    Returns:
      (tail-corrected, raw truncated), each [N] float32 in nats (`ops.entropy.topk_entropy`).
    """
    from ares_jax.ops.entropy import topk_and_sampled_logprobs, topk_entropy

    t = temperature if temperature > 0 else 1.0
    zt = z / t if t != 1.0 else z
    logprobs = zt - jax.nn.logsumexp(zt, axis=-1, keepdims=True)
    top, sampled, outside = topk_and_sampled_logprobs(logprobs, tokens, k)
    return (
        topk_entropy(top, tail=True, extra_logprob=sampled, extra_valid=outside),
        topk_entropy(top, tail=False, extra_logprob=sampled, extra_valid=outside),
    )
