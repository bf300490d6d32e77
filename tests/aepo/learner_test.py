"""The AEPO learner on the tiny model: batch assembly, sampler/learner agreement, exact
accumulation, over-fitting a fixed batch, a frozen vision tower."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest

from ares_jax.aepo import batch as B
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
    frames = B.frames_needed(prompts, rows, mb)
    lb = B.learner_batch(
        prompts, rows, cfg, micro_batch_size=mb, num_micro=num_micro, num_frames=frames + 1
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
    per_micro = [B.windows_needed(prompts, [p], cfg) for p in (0, 1)]
    assert per_micro[0] < per_micro[1]
    frames = B.frames_needed(prompts, rows, 1)
    lb = B.learner_batch(prompts, rows, cfg, micro_batch_size=1, num_micro=2, num_frames=frames)
    assert lb.inputs.vision is not None and lb.inputs.input_ids.shape[0] == 2
    # The small image's micro-batch computes the same features as it does alone.
    model = params.init_model(cfg, seed=0)
    alone = B.learner_batch(
        prompts,
        rows.select(np.array([0])),
        cfg,
        micro_batch_size=1,
        num_micro=1,
        num_frames=frames,
    )
    first = jax.tree.map(lambda x: jnp.asarray(x[0]), lb.inputs)
    own = jax.tree.map(lambda x: jnp.asarray(x[0]), alone.inputs)
    np.testing.assert_allclose(
        np.asarray(model.image_features(first.vision))[: int((own.image_index >= 0).sum())],
        np.asarray(model.image_features(own.vision))[: int((own.image_index >= 0).sum())],
        rtol=1e-5,
        atol=1e-5,
    )
