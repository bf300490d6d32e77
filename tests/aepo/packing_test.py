"""Packed learner batches: sequences laid end to end with segment ids compute what the padded
layout computes (log-probs, entropies, the loss and its gradient), on the tiny model with
images of different sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import batching as B
from ares_jax.aepo import learner as Lr
from ares_jax.models.qwen2_5_vl import params
from ares_jax.ops import kl as K
from ares_jax.ops import policy_loss as PL
from tests.aepo.learner_test import G, _settings, setup  # noqa: F401 - the module fixture

MB = 4


def _batches(cfg, prompts, rows, pack_rows):
    num_micro = -(-len(rows.prompt) // MB)
    padded = B.learner_batch(prompts, rows, cfg, micro_batch_size=MB, num_micro=num_micro)
    packed = B.learner_batch(
        prompts, rows, cfg, micro_batch_size=MB, num_micro=num_micro, pack_rows=pack_rows
    )
    return padded, packed


@pytest.mark.parametrize("pack_rows", [1, 2])
def test_packed_layout(setup, pack_rows):  # noqa: F811
    cfg, _, prompts, _, rows = setup
    padded, packed = _batches(cfg, prompts, rows, pack_rows)
    inp, pk = packed.inputs, packed.packing
    m, r, length = inp.input_ids.shape
    assert r == pack_rows and length == B.pack_bucket(
        B.pack_length_needed(prompts, rows, MB, pack_rows)
    )
    # Every real token once; prompts lose their padding, responses theirs.
    real = B.sequence_lengths(prompts, rows).sum()
    assert (inp.attention_mask > 0).sum() == real < padded.inputs.input_ids.size
    for k in range(m):
        for i in range(MB):
            row = k * MB + i
            if row >= len(rows.prompt):
                continue
            p, n_resp = rows.prompt[row], int(rows.mask[row].sum())
            share, seg = i // (MB // pack_rows), i % (MB // pack_rows) + 1
            where = np.flatnonzero(inp.attention_mask[k, share] == seg)
            want = np.concatenate([prompts.ids[p][prompts.mask[p]], rows.tokens[row, :n_resp]])
            np.testing.assert_array_equal(inp.input_ids[k, share, where], want)
            # Positions: the prompt's own, then the response's from its next position.
            n_prompt = int(prompts.mask[p].sum())
            np.testing.assert_array_equal(
                inp.position_ids[k][:, share][:, where[:n_prompt]],
                prompts.positions[:, p][:, prompts.mask[p]],
            )
            np.testing.assert_array_equal(
                inp.position_ids[k, 0, share, where[n_prompt:]],
                prompts.next_pos[p] + np.arange(n_resp),
            )
            # The position that predicts response token t holds its target and precedes it.
            flat = pk.index[k, i, :n_resp]
            np.testing.assert_array_equal(
                pk.targets[k].reshape(-1)[flat], rows.tokens[row, :n_resp]
            )
            np.testing.assert_array_equal(
                inp.input_ids[k].reshape(-1)[flat + 1], rows.tokens[row, :n_resp]
            )


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
def test_packed_logprobs_equal_padded(setup, attention):  # noqa: F811
    cfg, model, prompts, out, rows = setup
    model = params.init_model(cfg, seed=2, attention_impl=attention)
    s = _settings(prompts)
    padded, packed = _batches(cfg, prompts, rows, pack_rows=2)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)
    fn = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))
    want = fn(g, trainable, frozen, *jax.tree.map(jnp.asarray, (padded.inputs, padded.tokens)), s)
    got = fn(
        g,
        trainable,
        frozen,
        *jax.tree.map(jnp.asarray, (packed.inputs, packed.tokens)),
        s,
        jax.tree.map(jnp.asarray, packed.packing),
    )
    mask = np.asarray(padded.mask)
    assert mask.sum() == out.mask.sum()
    for w, x in zip(want, got, strict=True):
        np.testing.assert_allclose(np.asarray(x)[mask], np.asarray(w)[mask], atol=1e-5)
    # And both equal the sampler's.
    n = out.tokens.shape[0]
    logp = np.asarray(got[0]).reshape(-1, out.tokens.shape[1])[:n]
    np.testing.assert_allclose(logp[out.mask], out.logp[out.mask], atol=1e-5)


@pytest.mark.parametrize("controller", ["code", "paper"])
def test_packed_loss_and_gradients_equal_padded(setup, controller):  # noqa: F811
    cfg, model, prompts, _, rows = setup
    s = _settings(prompts, kl_controller=controller)
    padded, packed = _batches(cfg, prompts, rows, pack_rows=2)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)

    def loss_and_grad(lb):
        lb = jax.tree.map(jnp.asarray, lb)
        lb = lb._replace(old_logp=lb.old_logp - 0.1, ref_logp=lb.ref_logp - 0.2)
        beta = K.init_beta_states()

        def total(tr):
            def body(carry, mb):
                loss, (_, beta, kl_sum, _) = Lr._loss(tr, frozen, g, mb, carry[1], jnp.ones(3), s)
                return (carry[0] + loss, beta), kl_sum

            (loss, beta_out), kl_sums = jax.lax.scan(body, (0.0, beta), lb)
            return loss, (beta_out, kl_sums)

        return jax.jit(jax.value_and_grad(total, has_aux=True))(trainable)

    (l_pad, (b_pad, kl_pad)), g_pad = loss_and_grad(padded)
    (l_pack, (b_pack, kl_pack)), g_pack = loss_and_grad(packed)
    denom = float(PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg))
    assert float(l_pack) / denom == pytest.approx(float(l_pad) / denom, rel=1e-5, abs=1e-7)
    np.testing.assert_allclose(np.asarray(kl_pack), np.asarray(kl_pad), rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(b_pack), jax.tree.leaves(b_pad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g_pad))
    assert scale > 0
    for a, b in zip(jax.tree.leaves(g_pack), jax.tree.leaves(g_pad), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


def test_packing_errors(setup):  # noqa: F811
    cfg, _, prompts, _, rows = setup
    with pytest.raises(ValueError, match="pack_rows=3 must divide the micro-batch of 4 rows"):
        B.learner_batch(prompts, rows, cfg, micro_batch_size=MB, num_micro=3, pack_rows=3)
    with pytest.raises(ValueError, match="pack length 16"):
        B.learner_batch(
            prompts, rows, cfg, micro_batch_size=MB, num_micro=3, pack_rows=1, pack_len=16
        )
    assert G * 3 == len(rows.prompt)
