"""Token log-probabilities and entropies from hidden states, and window entropy.

The learner needs, for every response position, the log-probability of the target token and the
exact entropy of the full next-token distribution (METHOD.md 2.1). Computing them from the logits
[B, T, V] at once is the memory peak of RL on large vocabularies (V = 151936 for Qwen2.5-VL: 46 GiB
of float32 logits at B=16, T=4096). `token_logprobs_and_entropy` projects the hidden states through
the unembedding one chunk of positions at a time (optionally also one chunk of the vocabulary at a
time, with a streaming log-sum-exp) and, under a custom VJP, keeps only three float32 numbers per
position for the backward pass, where each chunk's logits are recomputed once. Peak memory is one
chunk's logits; the FLOPs are four vocabulary matmuls where the dense autodiff version does three.

Notation: B rows, T positions, D model width, V vocabulary, C positions per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.ops import checks

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------------
# Chunk statistics shared by the forward and backward passes.
# ---------------------------------------------------------------------------------------------


def _vocab_blocks(unembed: jax.Array, vocab_chunk: int) -> jax.Array:
    """[D, V] -> [nV, D, vocab_chunk], zero-padded at the end of the vocabulary."""
    d, v = unembed.shape
    n_blocks = -(-v // vocab_chunk)
    pad = n_blocks * vocab_chunk - v
    if pad:
        unembed = jnp.pad(unembed, ((0, 0), (0, pad)))
    return unembed.reshape(d, n_blocks, vocab_chunk).transpose(1, 0, 2)


def _block_logits(h_c: jax.Array, w_blk: jax.Array, temperature: float) -> jax.Array:
    """[B, C, D] x [D, Vc] -> float32 logits [B, C, Vc] divided by the temperature."""
    z = jnp.einsum("bcd,dv->bcv", h_c, w_blk, preferred_element_type=_F32)
    return z / temperature if temperature != 1.0 else z


def _chunk_forward(h_c, y_c, w_blocks, vocab_size, temperature):
    """Streaming statistics of one chunk of positions over all vocabulary blocks.

    Returns float32 [B, C] each: log-sum-exp, entropy, target logit.
    """
    n_blocks, _, vc = w_blocks.shape
    b, c = y_c.shape

    def body(carry, inputs):
        m, s, sz, tz = carry
        blk, w_blk = inputs
        z = _block_logits(h_c, w_blk, temperature)  # [B, C, Vc]
        ids = blk * vc + jnp.arange(vc)
        real = ids < vocab_size
        z = jnp.where(real, z, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(z, axis=-1))
        scale = jnp.exp(m - m_new)
        e = jnp.exp(z - m_new[..., None])
        s = s * scale + jnp.sum(e, axis=-1)
        sz = sz * scale + jnp.sum(jnp.where(real, e * z, 0.0), axis=-1)
        tz = tz + jnp.sum(jnp.where(ids == y_c[..., None], z, 0.0), axis=-1)
        return (m_new, s, sz, tz), None

    init = (
        jnp.full((b, c), -jnp.inf, _F32),
        jnp.zeros((b, c), _F32),
        jnp.zeros((b, c), _F32),
        jnp.zeros((b, c), _F32),
    )
    (m, s, sz, tz), _ = jax.lax.scan(body, init, (jnp.arange(n_blocks), w_blocks))
    lse = m + jnp.log(s)
    entropy = lse - sz / s  # H = logsumexp(z) - E_p[z]
    return lse, entropy, tz


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """[B, T, ...] with T = nC * chunk -> [nC, B, chunk, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _from_chunks(x: jax.Array) -> jax.Array:
    """[nC, B, chunk, ...] -> [B, nC * chunk, ...]."""
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * c, *x.shape[3:])


# ---------------------------------------------------------------------------------------------
# The chunked kernel under a custom VJP.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked(hidden, unembed, targets, temperature, chunk, vocab_chunk):
    (logp, entropy), _ = _chunked_fwd(hidden, unembed, targets, temperature, chunk, vocab_chunk)
    return logp, entropy


def _chunked_fwd(hidden, unembed, targets, temperature, chunk, vocab_chunk):
    w_blocks = _vocab_blocks(unembed, vocab_chunk)
    vocab_size = unembed.shape[1]

    def body(_, xs):
        h_c, y_c = xs
        return None, _chunk_forward(h_c, y_c, w_blocks, vocab_size, temperature)

    _, (lse, entropy, tz) = jax.lax.scan(
        body, None, (_to_chunks(hidden, chunk), _to_chunks(targets, chunk))
    )
    lse, entropy, tz = _from_chunks(lse), _from_chunks(entropy), _from_chunks(tz)
    logp = tz - lse
    return (logp, entropy), (hidden, unembed, targets, lse, entropy)


def _chunked_bwd(temperature, chunk, vocab_chunk, residuals, cotangents):
    hidden, unembed, targets, lse, entropy = residuals
    g_logp, g_ent = cotangents
    vocab_size = unembed.shape[1]
    w_blocks = _vocab_blocks(unembed, vocab_chunk)  # [nV, D, Vc]
    n_blocks, _, vc = w_blocks.shape
    compute_dtype = hidden.dtype

    def seq_body(dw_acc, xs):
        h_c, y_c, lse_c, ent_c, gl_c, ge_c = xs

        def vocab_body(dh, inputs):
            blk, w_blk = inputs
            z = _block_logits(h_c, w_blk, temperature)  # [B, C, Vc] float32
            ids = blk * vc + jnp.arange(vc)
            log_p = z - lse_c[..., None]
            p = jnp.where(ids < vocab_size, jnp.exp(log_p), 0.0)
            # d logp_y / dz = onehot(y) - p ; dH / dz = -p * (log p + H).
            dz = -p * (gl_c[..., None] + ge_c[..., None] * (log_p + ent_c[..., None]))
            dz = dz + jnp.where(ids == y_c[..., None], gl_c[..., None], 0.0)
            if temperature != 1.0:
                dz = dz / temperature
            dz = dz.astype(compute_dtype)
            dh = dh + jnp.einsum("bcv,dv->bcd", dz, w_blk, preferred_element_type=_F32)
            dw_blk = jnp.einsum("bcd,bcv->dv", h_c, dz, preferred_element_type=_F32)
            return dh, dw_blk

        dh0 = jnp.zeros(h_c.shape, _F32)
        dh, dw = jax.lax.scan(vocab_body, dh0, (jnp.arange(n_blocks), w_blocks))
        return dw_acc + dw, dh.astype(hidden.dtype)

    xs = tuple(_to_chunks(a, chunk) for a in (hidden, targets, lse, entropy, g_logp, g_ent))
    dw0 = jnp.zeros(w_blocks.shape, _F32)
    dw, dh = jax.lax.scan(seq_body, dw0, xs)
    d_model = unembed.shape[0]
    dw = dw.transpose(1, 0, 2).reshape(d_model, n_blocks * vc)[:, :vocab_size]
    return _from_chunks(dh), dw.astype(unembed.dtype), None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _check_logprob_inputs(fn, hidden, unembed, targets, temperature):
    checks.check_rank(hidden, 3, "hidden", fn)
    checks.check_rank(unembed, 2, "unembed", fn)
    checks.check_rank(targets, 2, "targets", fn)
    checks.check_floating(hidden, "hidden", fn)
    checks.check_floating(unembed, "unembed", fn)
    checks.check_integer(targets, "targets", fn)
    if hidden.shape[2] != unembed.shape[0]:
        raise ValueError(
            f"{fn}: hidden has width {hidden.shape[2]} but unembed has {unembed.shape[0]} rows; "
            "unembed must be [D, V]."
        )
    if hidden.shape[:2] != targets.shape:
        raise ValueError(
            f"{fn}: targets has shape {targets.shape} but hidden has [B, T] = {hidden.shape[:2]}."
        )
    if not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"{fn}: temperature must be a Python number > 0, got {temperature!r}.")


def token_logprobs_and_entropy(
    hidden: jax.Array,
    unembed: jax.Array,
    targets: jax.Array,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Log-prob of each target token and the exact full-vocabulary entropy, chunked.

    With z = hidden @ unembed / temperature (float32 accumulation, whatever the input dtype),
    logp[b, t] = z[b, t, y] - logsumexp(z[b, t]) and entropy[b, t] = -sum_v p log p with
    p = softmax(z[b, t]) (METHOD.md 2.1). The logits of at most one chunk of `chunk_size`
    positions (times `vocab_chunk_size` entries of the vocabulary, if set) exist at once, in the
    forward and in the backward pass; the backward pass recomputes each chunk's logits once from
    the saved log-sum-exp and entropy.

    Args:
      hidden: [B, T, D] float (bfloat16 or float32): final hidden states after the last norm.
      unembed: [D, V] float: the output projection (the transposed embedding for tied heads).
      targets: [B, T] int: token whose log-prob is wanted at each position, in [0, V). Positions
        whose target is out of range (padding) get logp = -logsumexp and no target gradient; mask
        them downstream.
      temperature: Python float > 0; the sampling temperature the distribution is taken at.
      chunk_size: positions per chunk; None or >= T means one chunk. T is padded up to a multiple.
      vocab_chunk_size: vocabulary entries per block of the streaming log-sum-exp; None means the
        whole vocabulary in one block. Use it on small-memory chips when the vocabulary is not
        sharded over devices; with a vocabulary sharded over `tensor`, leave it None.

    Returns:
      (logp, entropy): float32 [B, T] each, log-prob in nats and entropy in nats. Differentiable
      with respect to `hidden` and `unembed`.
    """
    fn = "token_logprobs_and_entropy"
    _check_logprob_inputs(fn, hidden, unembed, targets, temperature)
    b, t, _ = hidden.shape
    chunk = t if chunk_size is None or chunk_size >= t else int(chunk_size)
    if chunk < 1:
        raise ValueError(f"{fn}: chunk_size must be >= 1, got {chunk_size!r}.")
    vocab = unembed.shape[1]
    vchunk = vocab if vocab_chunk_size is None else min(int(vocab_chunk_size), vocab)
    if vchunk < 1:
        raise ValueError(f"{fn}: vocab_chunk_size must be >= 1, got {vocab_chunk_size!r}.")
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    logp, entropy = _chunked(hidden, unembed, targets, float(temperature), chunk, vchunk)
    return logp[:, :t], entropy[:, :t]


def dense_logprobs_and_entropy(
    hidden: jax.Array, unembed: jax.Array, targets: jax.Array, *, temperature: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """The same quantities through the full [B, T, V] float32 logits and plain autodiff.

    The baseline that `token_logprobs_and_entropy` replaces: simple and exact, with a memory peak
    of several [B, T, V] float32 arrays in the backward pass. Kept for benchmarks and small
    vocabularies. Same arguments and returns as `token_logprobs_and_entropy`.
    """
    _check_logprob_inputs("dense_logprobs_and_entropy", hidden, unembed, targets, temperature)
    z = jnp.einsum("btd,dv->btv", hidden, unembed, preferred_element_type=_F32) / temperature
    log_p = jax.nn.log_softmax(z, axis=-1)
    logp = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    return logp, entropy


def topk_entropy(
    topk_logprobs: jax.Array,
    *,
    tail: bool = True,
    extra_logprob: jax.Array | None = None,
    extra_valid: jax.Array | None = None,
) -> jax.Array:
    """Entropy estimated from the log-probs an inference engine returns (the released estimators).

    The released code asks vLLM for `logprobs=10`. vLLM returns the top-10 log-probs of the step's
    distribution and, when the sampled token is not among those 10 ids, the sampled token's
    log-prob as an 11th entry; the released code sums over whatever set came back. Over that set
    it estimates H = -sum_k p_k log p_k (METHOD.md 2.1, "raw truncated", used for its threshold)
    and, with `tail`, adds the left-over mass r = max(0, 1 - sum_k p_k) as one extra outcome,
    -r log r with r clamped at 1e-12 inside the log ("tail-corrected", used for its counts). The
    exact entropy (`token_logprobs_and_entropy`) is the default; this reproduces
    `entropy.estimator='topk_tail'`. `topk_and_sampled_logprobs` builds the set vLLM returns.

    Args:
      topk_logprobs: [..., k] float, log-probs (nats) of the k most likely tokens (any order).
      tail: add the left-over-mass term.
      extra_logprob: optional [...] float, log-prob (nats) of one more returned token (the sampled
        one); used only where `extra_valid` is True, its value elsewhere is ignored (may be -inf
        or NaN). Give it together with `extra_valid`, or neither (top-k set only, as before).
      extra_valid: optional [...] bool, True where `extra_logprob` is part of the returned set,
        i.e. where the sampled token is outside the top-k ids.

    Returns:
      [...] float32 entropy estimate in nats.
    """
    fn = "topk_entropy"
    checks.check_floating(topk_logprobs, "topk_logprobs", fn)
    if (extra_logprob is None) != (extra_valid is None):
        raise ValueError(f"{fn}: give extra_logprob and extra_valid together, or neither.")
    lp = topk_logprobs.astype(_F32)
    p = jnp.exp(lp)
    h = -jnp.sum(p * lp, axis=-1)
    mass = jnp.sum(p, axis=-1)
    if extra_logprob is not None:
        checks.check_floating(extra_logprob, "extra_logprob", fn)
        checks.check_bool(extra_valid, "extra_valid", fn)
        checks.check_same_shape(fn, extra_logprob=extra_logprob, extra_valid=extra_valid)
        if np.shape(extra_logprob) != lp.shape[:-1]:
            raise ValueError(
                f"{fn}: extra_logprob has shape {np.shape(extra_logprob)} but topk_logprobs has "
                f"leading shape {lp.shape[:-1]}; they must match."
            )
        e = jnp.where(extra_valid, extra_logprob.astype(_F32), 0.0)
        pe = jnp.where(extra_valid, jnp.exp(e), 0.0)
        h = h - pe * e
        mass = mass + pe
    if tail:
        r = jnp.maximum(0.0, 1.0 - mass)
        h = h - jnp.where(r > 0, r * jnp.log(jnp.maximum(r, 1e-12)), 0.0)
    return h


def topk_and_sampled_logprobs(
    logprobs: jax.Array, tokens: jax.Array, k: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The log-probs vLLM returns for `logprobs=k`: the top k, plus the sampled token if outside.

    The sampled token counts as outside when its id is not among the k ids that `jax.lax.top_k`
    returns, as vLLM decides it from the ids of `torch.topk`. With a tie at the k-th value the
    choice depends on ids: `jax.lax.top_k` keeps the lower ids, so a sampled token tied with the
    k-th value but with a higher id is returned as the extra entry (the set then holds k + 1
    entries of which two share a value); vLLM breaks such ties by its own kernel's order.

    Args:
      logprobs: [..., V] float, normalised log-probs (nats) of the step's distribution.
      tokens: [...] int, the sampled ids, in [0, V).
      k: number of top log-probs, a Python int in [1, V].

    Returns:
      (topk_logprobs [..., k] float, sampled_logprob [...] float, outside [...] bool), the
      arguments `topk_entropy(topk_logprobs, extra_logprob=sampled_logprob, extra_valid=outside)`.
    """
    fn = "topk_and_sampled_logprobs"
    checks.check_floating(logprobs, "logprobs", fn)
    checks.check_integer(tokens, "tokens", fn)
    if np.shape(tokens) != np.shape(logprobs)[:-1]:
        raise ValueError(
            f"{fn}: tokens has shape {np.shape(tokens)} but logprobs has leading shape "
            f"{np.shape(logprobs)[:-1]}; they must match."
        )
    if not isinstance(k, int | np.integer) or not 1 <= k <= logprobs.shape[-1]:
        raise ValueError(f"{fn}: k must be an int in [1, {logprobs.shape[-1]}], got {k!r}.")
    tokens = jnp.asarray(tokens)
    top, ids = jax.lax.top_k(logprobs, int(k))
    sampled = jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]
    outside = ~jnp.any(ids == tokens[..., None], axis=-1)
    return top, sampled, outside


# ---------------------------------------------------------------------------------------------
# Window entropy.
# ---------------------------------------------------------------------------------------------

WINDOW_OFFSETS = (0, 1)


def _shift_left(x: jax.Array, s: int, fill) -> jax.Array:
    """out[:, t] = x[:, t + s], with `fill` past the end."""
    if s == 0:
        return x
    t = x.shape[1]
    if s >= t:
        return jnp.full_like(x, fill)
    return jnp.concatenate([x[:, s:], jnp.full((x.shape[0], s), fill, x.dtype)], axis=1)


def check_entropy_inputs(fn: str, entropy: jax.Array, mask: jax.Array) -> None:
    """Rank, dtype, shape and finiteness checks for an entropy array and its response mask."""
    checks.check_rank(entropy, 2, "entropy", fn)
    checks.check_floating(entropy, "entropy", fn)
    checks.check_bool(mask, "mask", fn)
    checks.check_same_shape(fn, entropy=entropy, mask=mask)
    checks.assert_finite(entropy, "entropy", fn, where=mask)


def window_entropy(
    entropy: jax.Array, mask: jax.Array, *, window: int = 4, offset: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Mean token entropy over a forward window of `window` positions (METHOD.md 2.2).

    offset=1 (released code) averages positions t+1 .. t+w, the tokens after t; offset=0 (paper,
    App. D Eq. 4) averages t .. t+w-1. A window is valid only where position t and every position
    it averages are response tokens (mask True): near the end of a response, fewer than w tokens
    follow and the window is invalid (the released code skips such trigger positions).

    Args:
      entropy: [B, T] float, nats; values where mask is False are ignored.
      mask: [B, T] bool, True at response tokens.
      window: w >= 1, a Python int.
      offset: 0 (paper) or 1 (released code).

    Returns:
      (mean, valid): [B, T] float32 window mean (0 where invalid) and [B, T] bool validity.
    """
    fn = "window_entropy"
    check_entropy_inputs(fn, entropy, mask)
    if not isinstance(window, int | np.integer) or window < 1:
        raise ValueError(f"{fn}: window must be a Python int >= 1, got {window!r}.")
    checks.check_choice(offset, WINDOW_OFFSETS, "offset", fn)
    h = jnp.where(mask, entropy.astype(_F32), 0.0)
    total = jnp.zeros_like(h)
    count = jnp.zeros(h.shape, jnp.int32)
    for k in range(window):  # w is small and static: w shifted adds, exact and cheap.
        total = total + _shift_left(h, offset + k, 0.0)
        count = count + _shift_left(mask, offset + k, False).astype(jnp.int32)
    valid = mask & (count == window)
    return jnp.where(valid, total / window, 0.0), valid
