"""The AEPO learner on the tiny model: batch assembly, sampler/learner agreement, exact
accumulation, over-fitting a fixed batch, a frozen vision tower."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest

from ares_jax import batching as B
from ares_jax.aepo import learner as Lr
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.ops import kl as K
from ares_jax.ops import policy_loss as PL
from ares_jax.sampling import SamplingParams, generate

G = 4  # rollouts per prompt
T = 8  # new tokens


def _png(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup():
    cfg = config.preset("tiny")
    model = params.init_model(cfg, seed=2)
    tok = tokenizer.build_tokenizer()
    prompts = B.encode_prompts(
        ["How many squares?", "What is 2 + 3?", "Count the dots."],
        [[_png(56, 84, 0)], [], [_png(84, 56, 1), _png(56, 56, 2)]],
        tok,
        cfg,
        template="Think, then answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=3136 * 4,
        length_buckets=(64, 128),
    )
    out = generate(
        model,
        inputs=B.sampler_inputs(prompts, cfg),
        sampling=SamplingParams(n=G, max_new_tokens=T, stop_token_ids=(5, 6, 7)),
        key=jax.random.PRNGKey(0),
    )
    n = out.tokens.shape[0]
    rng = np.random.default_rng(0)
    rows = B.Rows(
        prompt=out.prompt_index,
        tokens=out.tokens,
        mask=out.mask,
        advantages=rng.normal(size=n).astype(np.float32),
        bucket=rng.integers(0, 3, n).astype(np.int32),
        correct=rng.random(n) < 0.5,
        soft_cost=rng.random(n).astype(np.float32),
        window_mask=out.mask & (rng.random(out.mask.shape) < 0.3),
    )
    return cfg, model, prompts, out, rows


def _settings(prompts, **kw):
    return Lr.LearnerSettings(prompt_len=prompts.ids.shape[1], chunk_size=4, **kw)


def _batch(cfg, prompts, rows, mb):
    num_micro = -(-len(rows.prompt) // mb)
    windows = B.windows_needed(prompts, rows, mb, cfg)
    lb = B.learner_batch(
        prompts, rows, cfg, micro_batch_size=mb, num_micro=num_micro, num_windows=windows + 1
    )
    return jax.tree.map(jnp.asarray, lb)


def test_learner_logprobs_equal_sampler(setup):
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, mb=5)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)
    logp, ent = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))(
        g, trainable, frozen, lb.inputs, lb.tokens, s
    )
    n = out.tokens.shape[0]
    logp = np.asarray(logp).reshape(-1, T)[:n]
    ent = np.asarray(ent).reshape(-1, T)[:n]
    np.testing.assert_allclose(logp[out.mask], out.logp[out.mask], atol=1e-5)
    np.testing.assert_allclose(ent[out.mask], out.entropy[out.mask], atol=1e-5)


def _step(model, lb, denom, s, *, freeze_vision=False, lr=1e-2, opt=None):
    g, trainable, frozen = Lr.split_params(model, freeze_vision=freeze_vision)
    if opt is None:
        opt = Lr.make_optimizer(lr=lr, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8, grad_clip=1e9)
    state = Lr.TrainState(
        trainable, opt.init(trainable), K.init_beta_states(), jnp.ones(3), jnp.zeros((), jnp.int32)
    )
    step = jax.jit(Lr.train_step, static_argnames=("optimizer", "s"), static_argnums=0)
    return g, state, frozen, (lambda st, b: step(g, st, frozen, b, denom, optimizer=opt, s=s))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_accumulation_is_exact(setup, agg):
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts, agg=agg, kl_controller="fixed")
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=agg)
    results = []
    for mb in (12, 4):  # one micro-batch vs three
        lb = _batch(cfg, prompts, rows, mb)
        lb = lb._replace(old_logp=lb.old_logp - 0.1, ref_logp=lb.ref_logp - 0.2)
        # Plain SGD: the parameter change is minus lr times the gradient (lr large enough that
        # the change stands well above the float32 rounding of the parameters).
        _, state, _, step = _step(model, lb, denom, s, opt=optax.sgd(1e3))
        new, metrics = step(state, lb)
        grads = jax.tree.map(lambda a, b: (b - a) / 1e3, new.trainable, state.trainable)
        results.append((grads, metrics))
    (a, ma), (b, mb_) = results
    assert float(ma["train/loss"]) == pytest.approx(float(mb_["train/loss"]), rel=1e-5)
    assert float(ma["train/grad_norm"]) == pytest.approx(float(mb_["train/grad_norm"]), rel=1e-4)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-3, atol=1e-5 * scale)


def test_overfits_a_fixed_batch_and_kl_grows_from_zero(setup):
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, 6)
    g, trainable, frozen = Lr.split_params(model, freeze_vision=False)
    logp, _ = Lr.logprob_pass(g, trainable, frozen, lb.inputs, lb.tokens, s)
    lb = lb._replace(old_logp=logp, ref_logp=logp)  # on-policy, reference = initial policy
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    _, state, _, step = _step(model, lb, denom, s, lr=3e-3)
    losses, kls = [], []
    for _ in range(8):
        state, metrics = step(state, lb)
        losses.append(float(metrics["train/pg_loss"]))
        kls.append(float(metrics["kl/ref_mean"]))
    # The surrogate -A * ratio falls as the policy moves towards positive-advantage tokens;
    # the KL to the reference starts at 0 and grows.
    assert losses[-1] < losses[0] - 0.05
    assert kls[0] == pytest.approx(0.0, abs=1e-6) and kls[-1] > 1e-4
    assert int(state.step) == 8 and float(metrics["train/skipped"]) == 0.0


def test_frozen_vision_tower_does_not_change(setup):
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, 6)
    lb = lb._replace(old_logp=lb.old_logp - 0.5)
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    g, state, frozen, step = _step(model, lb, denom, s, freeze_vision=True)
    assert "visual" not in state.trainable
    new, _ = step(state, lb)
    merged = Lr.merge(g, new.trainable, frozen)
    np.testing.assert_array_equal(
        np.asarray(merged.visual.blocks.qkv[...]), np.asarray(model.visual.blocks.qkv[...])
    )
    assert not np.array_equal(
        np.asarray(merged.language_model.layers.gate[...]),
        np.asarray(model.language_model.layers.gate[...]),
    )


def test_non_finite_step_is_skipped(setup):
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, 6)
    lb = lb._replace(advantages=lb.advantages.at[0, 0].set(jnp.nan))
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    _, state, _, step = _step(model, lb, denom, s)
    new, metrics = step(state, lb)
    assert float(metrics["train/skipped"]) == 1.0
    for x, y in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(metrics["train/nonfinite_params"]) == 0.0  # the loss, not the parameters


def test_step_that_would_overflow_a_parameter_is_refused(setup):
    # A finite loss and gradient, but a step so large that parameters overflow float32 (two
    # scalings of 1e30: each finite, their product not): before, it was applied and the next
    # rollout's entropies were NaN; now it is refused and reported.
    cfg, model, prompts, out, rows = setup
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, 6)
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    huge = optax.chain(optax.scale(-1e30), optax.scale(1e30))
    _, state, _, step = _step(model, lb, denom, s, opt=huge)
    new, metrics = step(state, lb)
    assert np.isfinite(float(metrics["train/loss"])) and float(metrics["train/grad_norm"]) > 0
    assert float(metrics["train/skipped"]) == 1.0
    assert float(metrics["train/nonfinite_params"]) == 1.0
    for x, y in zip(jax.tree.leaves(new.trainable), jax.tree.leaves(state.trainable), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # A sane step on the same batch is applied.
    _, state, _, step = _step(model, lb, denom, s, opt=optax.sgd(1e-3))
    new, metrics = step(state, lb)
    assert float(metrics["train/skipped"]) == 0.0
    assert float(metrics["train/nonfinite_params"]) == 0.0


def test_blockwise_attention_equals_the_dense_mask(setup):
    # The learner's full forward through ops.attention (segment ids, no [T, T] scores) against
    # today's masked XLA attention: log-probs, entropies and one step's parameter change, on
    # left-padded prompts with images.
    cfg, model, prompts, out, rows = setup
    blockwise = params.init_model(cfg, seed=2, attention_impl="blockwise")
    s = _settings(prompts)
    lb = _batch(cfg, prompts, rows, 6)
    lb = lb._replace(old_logp=lb.old_logp - 0.1, ref_logp=lb.ref_logp - 0.2)
    denom = PL.loss_denominator(jnp.asarray(rows.mask), agg=s.agg)
    results = []
    for m in (model, blockwise):
        g, trainable, frozen = Lr.split_params(m, freeze_vision=False)
        logp, ent = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))(
            g, trainable, frozen, lb.inputs, lb.tokens, s
        )
        _, state, _, step = _step(m, lb, denom, s, opt=optax.sgd(1e3))
        new, metrics = step(state, lb)
        delta = jax.tree.map(lambda a, b: (a - b) / 1e3, new.trainable, state.trainable)
        results.append((np.asarray(logp), np.asarray(ent), delta, metrics))
    (lp_a, en_a, d_a, m_a), (lp_b, en_b, d_b, m_b) = results
    mask = np.asarray(lb.mask)
    np.testing.assert_allclose(lp_b[mask], lp_a[mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(en_b[mask], en_a[mask], rtol=1e-5, atol=1e-5)
    assert float(m_b["train/loss"]) == pytest.approx(float(m_a["train/loss"]), rel=1e-5)
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(d_a))
    assert scale > 0
    for x, y in zip(jax.tree.leaves(d_a), jax.tree.leaves(d_b), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-3, atol=1e-4 * scale)


def test_micro_batches_with_different_largest_images_stack():
    # One micro-batch holds a small image, the other a large one: each frame layout used to be its
    # own micro-batch's largest, and stacking them raised in np.stack.
    cfg = config.preset("tiny")
    tok = tokenizer.build_tokenizer()
    prompts = B.encode_prompts(
        ["Small?", "Large?"],
        [[_png(28, 28, 0)], [_png(168, 224, 1)]],
        tok,
        cfg,
        template="Answer in \\boxed{}.",
        min_pixels=784,
        max_pixels=168 * 224,
        length_buckets=(128,),
    )
    rows = B.Rows(
        prompt=np.array([0, 1]),
        tokens=np.ones((2, 4), np.int32),
        mask=np.ones((2, 4), bool),
        advantages=np.zeros(2, np.float32),
        bucket=np.zeros(2, np.int32),
        correct=np.ones(2, bool),
        soft_cost=np.zeros(2, np.float32),
        window_mask=np.zeros((2, 4), bool),
    )
    per_micro = [B.windows_of(prompts, [p], cfg) for p in (0, 1)]
    assert per_micro[0] < per_micro[1]
    windows = B.windows_needed(prompts, rows, 1, cfg)
    lb = B.learner_batch(prompts, rows, cfg, micro_batch_size=1, num_micro=2, num_windows=windows)
    assert lb.inputs.vision is not None and lb.inputs.input_ids.shape[0] == 2
    # The small image's micro-batch computes the same features as it does alone.
    model = params.init_model(cfg, seed=0)
    alone = B.learner_batch(
        prompts,
        rows.select(np.array([0])),
        cfg,
        micro_batch_size=1,
        num_micro=1,
        num_windows=windows,
    )
    first = jax.tree.map(lambda x: jnp.asarray(x[0]), lb.inputs)
    own = jax.tree.map(lambda x: jnp.asarray(x[0]), alone.inputs)
    np.testing.assert_allclose(
        np.asarray(model.image_features(first.vision))[: int((own.image_index >= 0).sum())],
        np.asarray(model.image_features(own.vision))[: int((own.image_index >= 0).sum())],
        rtol=1e-5,
        atol=1e-5,
    )


# ---------------------------------------------------------------------------------------------
# Precision: the head's unembedding and the reference's copy in the compute dtype.


class _FixedHidden:
    """A model whose final hidden states are given: `response_logprobs` through it runs only the
    head (a compilation of seconds), with the model's own unembedding."""

    def __init__(self, model, hidden):
        self.model, self.hidden = model, hidden

    def hidden_states(self, inputs):
        return self.hidden

    def unembed(self):
        return self.model.unembed()


def _hidden(model, lb, trainable=None):
    """Final hidden states of the first micro-batch (`trainable` replaces the model's)."""
    g, own, frozen = Lr.split_params(model, freeze_vision=False)
    trainable = own if trainable is None else trainable
    inputs = jax.tree.map(lambda x: x[0], lb.inputs)
    return jax.jit(lambda tr: Lr.merge(g, tr, frozen).hidden_states(inputs))(trainable)


def _head_run(model, hidden, lb, s, trainable=None, grad=False):
    """Log-probs and entropies [mb, T] of the first micro-batch through `response_logprobs` from
    the given hidden states, and with `grad` the gradient, through the head, of the masked sum of
    log-probs and entropies with respect to the trainable parameters, as a model."""
    g, own, frozen = Lr.split_params(model, freeze_vision=False)
    trainable = own if trainable is None else trainable
    inputs, tokens, mask = jax.tree.map(lambda x: x[0], (lb.inputs, lb.tokens, lb.mask))

    def objective(tr):
        head = _FixedHidden(Lr.merge(g, tr, frozen), hidden)
        logp, ent = Lr.response_logprobs(head, inputs, tokens, s)
        return jnp.sum(jnp.where(mask, logp + ent, 0.0)), (logp, ent)

    if not grad:
        _, (logp, ent) = jax.jit(objective)(trainable)
        return np.asarray(logp), np.asarray(ent)
    grads, (logp, ent) = jax.jit(jax.grad(objective, has_aux=True))(trainable)
    return np.asarray(logp), np.asarray(ent), Lr.merge(g, grads, frozen)


def test_head_in_compute_dtype(setup):
    """head_dtype='compute' casts the float32 unembedding to bfloat16 for the head: log-probs and
    entropies move by bfloat16 rounding only, the gradient still reaches the float32 master
    weight, and nothing changes where the parameters are already in the compute dtype. (The
    hidden states are computed once; the head runs through `response_logprobs`.)"""
    cfg, _, prompts, _, rows = setup
    lb = _batch(cfg, prompts, rows, 12)
    mask = np.asarray(lb.mask[0])
    head = {h: _settings(prompts, head_dtype=h) for h in Lr.HEAD_DTYPES}
    mixed = params.init_model(cfg, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    hidden = _hidden(mixed, lb)
    lp_p, en_p, g_p = _head_run(mixed, hidden, lb, head["param"], grad=True)
    lp_c, en_c, g_c = _head_run(mixed, hidden, lb, head["compute"], grad=True)
    dlp, den = np.abs(lp_c - lp_p)[mask], np.abs(en_c - en_p)[mask]
    assert dlp.max() > 0  # the cast happened
    # bfloat16 rounding of the weight (measured: 6.6e-4 max, 2.3e-4 mean on |logp| ~ 6.3; the
    # random model's near-uniform entropies move by 4e-6).
    assert dlp.max() < 4e-3 and dlp.mean() < 1e-3, (dlp.max(), dlp.mean())
    assert den.max() < 1e-3, den.max()
    w_p, w_c = np.asarray(g_p.lm_head[...]), np.asarray(g_c.lm_head[...])
    assert g_c.lm_head[...].dtype == jnp.float32 and np.all(np.isfinite(w_c))
    assert np.abs(w_p).max() > 0
    rel = np.linalg.norm(w_c - w_p) / np.linalg.norm(w_p)
    assert rel < 1e-2, rel  # measured 1.7e-3
    # Parameters already in the compute dtype: the same bits.
    model = params.init_model(cfg, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    hidden = _hidden(model, lb)
    (lp_a, en_a, g_a), (lp_b, en_b, g_b) = (
        _head_run(model, hidden, lb, head[h], grad=True) for h in head
    )
    np.testing.assert_array_equal(lp_b, lp_a)
    np.testing.assert_array_equal(en_b, en_a)
    np.testing.assert_array_equal(np.asarray(g_b.lm_head[...]), np.asarray(g_a.lm_head[...]))
    with pytest.raises(ValueError, match="head_dtype='float16' is not one of 'param', 'compute'"):
        _settings(prompts, head_dtype="float16")


def test_reference_in_compute_dtype(setup):
    """reference_dtype='compute' keeps a bfloat16 copy of the float32 trainable parameters; with
    the head in the compute dtype its log-probs are the policy's bit for bit (the model casts
    every weight to the compute dtype where it uses it), so the KL starts at exactly 0."""
    cfg, _, prompts, _, rows = setup
    lb = _batch(cfg, prompts, rows, 12)
    mask = np.asarray(lb.mask[0])
    model = params.init_model(cfg, seed=2, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    _, trainable, _ = Lr.split_params(model, freeze_vision=False)
    ref = Lr.reference_params(trainable, jnp.bfloat16, "compute")
    same = Lr.reference_params(trainable, jnp.bfloat16, "param")
    leaves, ref_leaves = jax.tree.leaves(trainable), jax.tree.leaves(ref)
    assert len(ref_leaves) == len(leaves) > 10
    for x, r, c in zip(leaves, ref_leaves, jax.tree.leaves(same), strict=True):
        assert x.dtype == jnp.float32 and r.dtype == jnp.bfloat16 and c.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(r), np.asarray(x.astype(jnp.bfloat16)))
        np.testing.assert_array_equal(np.asarray(c), np.asarray(x))
        # Fresh buffers: the update donates the trainable state.
        for copy in (r, c):
            assert copy.unsafe_buffer_pointer() != x.unsafe_buffer_pointer()
    ref_bytes = sum(x.nbytes for x in ref_leaves)
    assert 2 * ref_bytes == sum(x.nbytes for x in leaves)
    # Never wider than stored: bfloat16 parameters under float32 compute stay bfloat16.
    kept = Lr.reference_params(ref, jnp.float32, "compute")
    assert {x.dtype for x in jax.tree.leaves(kept)} == {jnp.dtype(jnp.bfloat16)}
    hidden, hidden_ref = _hidden(model, lb), _hidden(model, lb, trainable=ref)
    # The whole forward, vision tower included, is the policy's bit for bit.
    np.testing.assert_array_equal(np.asarray(hidden_ref), np.asarray(hidden))
    s = _settings(prompts, head_dtype="compute")
    lp, en = _head_run(model, hidden, lb, s)
    lp_ref, en_ref = _head_run(model, hidden_ref, lb, s, trainable=ref)
    np.testing.assert_array_equal(lp_ref, lp)
    np.testing.assert_array_equal(en_ref, en)
    kl = np.asarray(K.kl_divergence(jnp.asarray(lp), jnp.asarray(lp_ref), "k3"))
    assert np.all(kl[mask] == 0.0)
    # With the head kept in float32 the policy's head is float32, the reference's bfloat16: the
    # KL at the start is then bfloat16 rounding, not 0.
    s = _settings(prompts, head_dtype="param")
    lp, _ = _head_run(model, hidden, lb, s)
    lp_ref, _ = _head_run(model, hidden_ref, lb, s, trainable=ref)
    d = np.abs(lp_ref - lp)[mask]
    assert 0 < d.max() < 4e-3, d.max()  # measured 6.6e-4
    with pytest.raises(ValueError, match="reference_dtype='float16' is not one of"):
        Lr.reference_params(trainable, jnp.bfloat16, "float16")
