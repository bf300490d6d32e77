"""Supervised fine-tuning of AdaCS: next-token loss on response tokens, exact accumulation.

The batches are `aepo.learner.LearnerBatch`es (prompt + response rows, images, static shapes;
built by `batching.learner_batch`), so SFT and RL share one batch layout and one log-prob
kernel. The loss of a mini-batch is the mean negative log-likelihood over its response tokens,
summed over micro-batches in a `lax.scan` and divided by the mini-batch's token count. The
gradient is therefore exact whatever the micro-batch split.

"Adaptive KL-guided fine-tuning" is named by the paper without a definition (METHOD.md 3.3,
10.1). Our interpretation is off by default (kl_coef 0). With it on, each token adds
kl_coef * w_b * k3(logp, ref_logp), where ref_logp is the frozen initial model's log-prob of the
same teacher token and w_b is the weight of the problem's pass-rate bracket b, so the fine-tuned
model is held closer to the base on the brackets the weights pick. k3 is the low-variance
estimator of the KL policy loss (ops/kl.py). On teacher tokens it is a penalty on the log-ratio,
not an unbiased KL estimate, and is documented as such.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from ares_jax.aepo.learner import (
    LearnerBatch,
    TrainState,
    apply_if_finite,
    merge,
    response_logprobs,
)
from ares_jax.ops import kl as K


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    prompt_len: int
    temperature: float = 1.0  # the distribution trained is softmax(z / temperature); keep 1
    chunk_size: int | None = None
    vocab_chunk_size: int | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"


def _loss(trainable, frozen, graphdef, mb: LearnerBatch, kl_weight, s: SFTSettings):
    """(sum of token NLL (+ weighted KL), (nll_sum, kl_sum, tokens)); kl_weight [mb] per row."""
    model = merge(graphdef, trainable, frozen)
    logp, _ = response_logprobs(model, mb.inputs, mb.tokens, s, mb.packing)
    mask = mb.mask & mb.row_valid[:, None]
    nll = jnp.sum(jnp.where(mask, -logp, 0.0))
    kl = jnp.zeros(())
    if s.kl_coef > 0:
        kld = K.kl_divergence(logp, mb.ref_logp, s.kl_estimator)
        kl = jnp.sum(jnp.where(mask, kld * kl_weight[:, None], 0.0))
    return nll + s.kl_coef * kl, (nll, kl, jnp.sum(mask).astype(jnp.float32))


def sft_step(graphdef, state: TrainState, frozen, batch: LearnerBatch, kl_weight, *, optimizer, s):
    """One optimizer step over M micro-batches; returns (state, metrics)."""
    grad_fn = jax.grad(_loss, has_aux=True)

    def body(carry, xs):
        acc, sums = carry
        mb, w = xs
        grads, aux = grad_fn(state.trainable, frozen, graphdef, mb, w, s)
        return (jax.tree.map(jnp.add, acc, grads), jax.tree.map(jnp.add, sums, aux)), None

    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    sums0 = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (acc, (nll, kl, tokens)), _ = jax.lax.scan(body, (zeros, sums0), (batch, kl_weight))
    tokens = jnp.maximum(tokens, 1.0)
    grads = jax.tree.map(lambda g: g / tokens, acc)
    loss = (nll + s.kl_coef * kl) / tokens
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trainable, opt_state, applied, params_ok = apply_if_finite(
        optimizer, grads, state.trainable, state.opt_state, finite
    )
    metrics = {
        "train/loss": loss,
        "train/nll": nll / tokens,
        "train/kl": kl / tokens,
        "train/grad_norm": grad_norm,
        "train/tokens": tokens,
        "train/skipped": (~applied).astype(jnp.float32),
        "train/nonfinite_params": (~params_ok).astype(jnp.float32),
    }
    return state._replace(trainable=trainable, opt_state=opt_state, step=state.step + 1), metrics
