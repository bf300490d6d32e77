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
) -> jax.Array:
    """Logits of the distribution sampled from: biased, tempered, top-k and top-p truncated.

    Args:
      z: [N, V] float32 logits.
      temperature: > 0 (greedy callers take the arg-max of the result at temperature 1).
      top_k: keep the k largest logits (ties at the k-th kept); 0 = off.
      top_p: keep the smallest set of most likely tokens whose probability reaches top_p
        (nucleus), measured after top-k (renormalised over the top-k set, the order of
        transformers' logits warpers and of vLLM); 1 = off. At least one token is always kept.
      bias: [V] float32 added to the logits before the temperature (-inf removes a token).

    Returns:
      [N, V] float32, -inf outside the kept set.
    """
    if bias is not None:
        z = z + bias
    t = temperature if temperature > 0 else 1.0
    z = z / t if t != 1.0 else z
    neg = jnp.asarray(-jnp.inf, _F32)
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


def sample(key: jax.Array, z: jax.Array, *, greedy: bool) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from logits z [N, V]; returns (tokens [N] int32, logp [N])."""
    if greedy:
        tokens = jnp.argmax(z, axis=-1).astype(jnp.int32)
    else:
        tokens = jax.random.categorical(key, z, axis=-1).astype(jnp.int32)
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
