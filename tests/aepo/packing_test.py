"""Packed learner batches: sequences laid end to end with segment ids compute what the padded
layout computes (log-probs, entropies, the loss and its gradient), on the tiny model with
images of different sizes; both with a fixed number of sequences per packed row ('fixed') and
with micro-batches of a token budget ('budget', `batching.pack_plan`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ares_jax import batching as B
from ares_jax.aepo import learner as Lr
from ares_jax.models.qwen2_5_vl import params
from ares_jax.ops import kl as K
from ares_jax.ops import policy_loss as PL
from tests.aepo.learner_test import G, _settings, setup  # noqa: F401 - the module fixture

MB = 4


def _budget(prompts, rows, pack_rows=2):
    """A token budget one token short of what the fixed shares of MB / pack_rows sequences
    need; its plan, and the static layout."""
    lengths = B.sequence_lengths(prompts, rows)
    pack_tokens = B.pack_length_needed(prompts, rows, MB, pack_rows) - 1
    plan = B.pack_plan(lengths, pack_rows=pack_rows, pack_tokens=pack_tokens, max_sequences=MB)
    return pack_tokens, plan, B.micro_bucket(plan.num_micro), B.slot_bucket(plan.slots)


def _budget_batch(cfg, prompts, rows, pack_rows=2):
    """The learner batch of `_budget`'s plan, and that layout."""
    layout = _budget(prompts, rows, pack_rows)
    pack_tokens, plan, micros, slots = layout
    lb = B.learner_batch(
        prompts,
        rows,
        cfg,
        micro_batch_size=MB,
        num_micro=micros,
        plan=plan,
        slots=slots,
        pack_len=pack_tokens,
    )
    return lb, layout


def _batches(cfg, prompts, rows, pack_rows, layout="fixed"):
    num_micro = -(-len(rows.prompt) // MB)
    padded = B.learner_batch(prompts, rows, cfg, micro_batch_size=MB, num_micro=num_micro)
    if layout == "fixed":
        packed = B.learner_batch(
            prompts, rows, cfg, micro_batch_size=MB, num_micro=num_micro, pack_rows=pack_rows
        )
        return padded, packed, np.arange(num_micro * MB)
    packed, (pack_tokens, plan, micros, slots) = _budget_batch(cfg, prompts, rows, pack_rows)
    return padded, packed, plan.index(micros, slots).reshape(-1)


def _by_row(x, order, n):
    """[M, mb, T] entries of a packed batch back in row order, [n, T]."""
    x = np.asarray(x).reshape(len(order), -1)
    out = np.zeros((n, x.shape[1]), x.dtype)
    out[order[order >= 0]] = x[order >= 0]
    return out


@pytest.mark.parametrize("pack_rows", [1, 2])
def test_packed_layout(setup, pack_rows):  # noqa: F811
    cfg, _, prompts, _, rows = setup
    padded, packed, _ = _batches(cfg, prompts, rows, pack_rows)
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


@pytest.mark.parametrize(
    "attention,layout", [("xla", "fixed"), ("blockwise", "fixed"), ("blockwise", "budget")]
)
def test_packed_logprobs_equal_padded(setup, attention, layout):  # noqa: F811
    cfg, model, prompts, out, rows = setup
    model = params.init_model(cfg, seed=2, attention_impl=attention)
    s = _settings(prompts)
    padded, packed, order = _batches(cfg, prompts, rows, pack_rows=2, layout=layout)
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
        jnp.asarray(packed.row_valid),
    )
    n = out.tokens.shape[0]
    mask = np.asarray(padded.mask).reshape(-1, out.tokens.shape[1])[:n]
    assert mask.sum() == out.mask.sum() == packed.mask.sum()
    for w, x in zip(want, got, strict=True):
        w = np.asarray(w).reshape(-1, out.tokens.shape[1])[:n]
        np.testing.assert_allclose(_by_row(x, order, n)[mask], w[mask], atol=1e-5)
    # And both equal the sampler's.
    logp = _by_row(got[0], order, n)
    np.testing.assert_allclose(logp[out.mask], out.logp[out.mask], atol=1e-5)


@pytest.mark.parametrize(
    "controller,layout", [("code", "fixed"), ("paper", "fixed"), ("code", "budget")]
)
def test_packed_loss_and_gradients_equal_padded(setup, controller, layout):  # noqa: F811
    """Equal loss, KL sums and gradients. The code controller's states are equal when the
    micro-batches are (fixed); with a token budget it steps once per micro-batch of the plan
    (beta itself moves only every `interval` steps, so the loss reads the same beta)."""
    cfg, model, prompts, _, rows = setup
    s = _settings(prompts, kl_controller=controller)
    padded, packed, _ = _batches(cfg, prompts, rows, pack_rows=2, layout=layout)
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
    if layout == "budget":  # other micro-batches: the mini-batch's sums
        kl_pack, kl_pad = kl_pack.sum(0), kl_pad.sum(0)
    np.testing.assert_allclose(np.asarray(kl_pack), np.asarray(kl_pad), rtol=1e-5, atol=1e-7)
    if layout == "fixed":
        for a, b in zip(jax.tree.leaves(b_pack), jax.tree.leaves(b_pad), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_array_equal(np.asarray(b_pack.beta), np.asarray(b_pad.beta))
        steps = int(np.asarray(packed.row_valid).any(1).sum())
        assert int(b_pack.count[0]) == steps > int(b_pad.count[0])
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


def test_token_budget_fits_where_fixed_shares_do_not(setup):  # noqa: F811
    """Rows of unequal lengths (58 to 69 tokens): the fixed shares (two sequences per packed
    row of a 4-row micro-batch on 2 rows) overflow a row of `pack_tokens`; the token budget
    places every sequence once, no packed row over the budget, in more micro-batches."""
    cfg, _, prompts, _, rows = setup
    lengths = B.sequence_lengths(prompts, rows)
    lb, (pack_tokens, plan, micros, slots) = _budget_batch(cfg, prompts, rows)
    assert lengths.max() <= pack_tokens < B.pack_length_needed(prompts, rows, MB, 2)
    assert lengths.min() < lengths.max()
    with pytest.raises(ValueError, match="a share needs"):
        B.learner_batch(
            prompts, rows, cfg, micro_batch_size=MB, num_micro=3, pack_rows=2, pack_len=pack_tokens
        )
    fixed_micro = -(-len(lengths) // MB)
    assert plan.num_micro > fixed_micro and plan.pack_rows == 2
    placed = [i for micro in plan.shares for share in micro for i in share]
    assert sorted(placed) == list(range(len(lengths)))
    for micro in plan.shares:
        assert sum(len(share) for share in micro) <= MB
        for share in micro:
            assert lengths[list(share)].sum() <= pack_tokens
    assert plan.slots >= 2  # short sequences share a row: sequences per row are free
    assert B.pack_plan(lengths, pack_rows=2, pack_tokens=pack_tokens, max_sequences=MB) == plan

    inp, pk = lb.inputs, lb.packing
    assert inp.input_ids.shape == (micros, 2, pack_tokens)
    assert lb.tokens.shape == (micros, 2 * slots, rows.tokens.shape[1])
    assert (inp.attention_mask > 0).sum() == lengths.sum()
    order = plan.index(micros, slots)
    assert (np.asarray(lb.row_valid) == (order >= 0)).all()
    for m in range(micros):
        for e in np.flatnonzero(order[m] >= 0):
            row, d, j = order[m, e], e // slots, e % slots
            p, n_resp = rows.prompt[row], int(rows.mask[row].sum())
            where = np.flatnonzero(inp.attention_mask[m, d] == j + 1)
            want = np.concatenate([prompts.ids[p][prompts.mask[p]], rows.tokens[row, :n_resp]])
            np.testing.assert_array_equal(inp.input_ids[m, d, where], want)
            np.testing.assert_array_equal(lb.tokens[m, e], rows.tokens[row])
            assert lb.advantages[m, e] == rows.advantages[row]
            flat = pk.index[m, e, :n_resp]
            assert (flat // pack_tokens == d).all()  # the gather stays on the row's device
            np.testing.assert_array_equal(
                pk.targets[m].reshape(-1)[flat], rows.tokens[row, :n_resp]
            )
    with pytest.raises(ValueError, match="longer than a packed row of 10"):
        B.pack_plan(lengths, pack_rows=2, pack_tokens=10)


def test_pack_plan_bounds():
    lengths = np.array([90, 10, 10, 10, 60, 50, 40, 100, 5, 5])
    plan = B.pack_plan(lengths, pack_rows=2, pack_tokens=100, max_sequences=4)
    for micro in plan.shares:
        assert sum(map(len, micro)) <= 4
        assert all(lengths[list(share)].sum() <= 100 for share in micro)
    assert sorted(i for micro in plan.shares for s in micro for i in s) == list(range(10))
    # Without a bound on sequences, fewer micro-batches.
    free = B.pack_plan(lengths, pack_rows=2, pack_tokens=100)
    assert free.num_micro < plan.num_micro
    assert [B.micro_bucket(n) for n in (1, 3, 5, 9, 17)] == [1, 4, 8, 10, 20]
    assert [B.slot_bucket(n, 1) for n in (1, 3, 5)] == [1, 4, 8]
    assert B.slot_bucket(3, 6) == 6


def test_padding_micro_batches_cost_no_compute(setup, monkeypatch):  # noqa: F811
    """A micro-batch of padding only runs no forward, backward or controller step (the update
    and the log-prob pass count the model's calls), and the update equals the one without it."""
    cfg, model, prompts, _, rows = setup
    s = _settings(prompts)
    pack_tokens, plan, micros, slots = _budget(prompts, rows)
    calls = []
    real = Lr.response_logprobs

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return real(*args, **kwargs)

    monkeypatch.setattr(Lr, "response_logprobs", counted)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)
    opt = optax.sgd(1.0)
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    results = []
    for num_micro in (plan.num_micro, plan.num_micro + 2):
        lb = B.learner_batch(
            prompts,
            rows,
            cfg,
            micro_batch_size=MB,
            num_micro=num_micro,
            plan=plan,
            slots=slots,
            pack_len=pack_tokens,
        )
        lb = jax.tree.map(jnp.asarray, lb)
        assert int(lb.row_valid.any(1).sum()) == plan.num_micro
        calls.clear()
        logp, _ = Lr.logprob_pass(
            g, trainable, frozen, lb.inputs, lb.tokens, s, lb.packing, lb.row_valid
        )
        jax.effects_barrier()
        assert len(calls) == plan.num_micro
        assert not np.asarray(logp)[plan.num_micro :].any()
        lb = lb._replace(old_logp=logp - 0.1, ref_logp=logp - 0.2)
        state = Lr.TrainState(
            trainable, opt.init(trainable), K.init_beta_states(), jnp.ones(3), jnp.zeros((), int)
        )
        calls.clear()
        new, metrics = Lr.train_step(g, state, frozen, lb, denom, optimizer=opt, s=s)
        jax.effects_barrier()
        assert len(calls) == plan.num_micro
        assert int(new.beta.count[0]) == plan.num_micro
        results.append((new.trainable, metrics))
    (a, ma), (b, mb_) = results
    for k in ma:
        np.testing.assert_allclose(np.asarray(mb_[k]), np.asarray(ma[k]), rtol=1e-6, atol=1e-9)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The scan's body holds the model under a cond: skipped, not masked.
    jaxpr = jax.make_jaxpr(
        lambda tr, lb: Lr.train_step(
            g, state._replace(trainable=tr), frozen, lb, denom, optimizer=opt, s=s
        )
    )(trainable, lb)
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert any(e.primitive.name == "cond" for e in scan.params["jaxpr"].jaxpr.eqns)


def test_beta_cadence_per_packed_row(setup):  # noqa: F811
    """kl.beta_cadence with one rank per packed row: each rank's state steps once per
    micro-batch in which its row holds a sequence (rank_batch = slots); a cadence that does not
    divide the packed rows' slots is refused naming the config key."""
    cfg, model, prompts, _, rows = setup
    lb, (pack_tokens, plan, micros, slots) = _budget_batch(cfg, prompts, rows)
    lb = jax.tree.map(jnp.asarray, lb)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)

    def counts(s):
        beta = K.init_beta_states(ranks=s.beta_ranks)
        for m in range(micros):
            mb = Lr._micro(lb, m)
            _, (_, beta, _, _) = Lr._loss(trainable, frozen, g, mb, beta, jnp.ones(3), s)
        return np.asarray(beta.count)

    want = [sum(1 for micro in plan.shares if micro[d]) for d in range(2)]
    np.testing.assert_array_equal(counts(_settings(prompts, beta_ranks=2)), want)
    with pytest.raises(ValueError, match=r"kl.beta_cadence: ranks x micro_batch \(3 x 0\)"):
        counts(_settings(prompts, beta_ranks=3))
