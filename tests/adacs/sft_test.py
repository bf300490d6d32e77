"""AdaCS fine-tuning on the tiny model: the loss falls, a frozen vision tower stays put, the KL
term starts at zero and the loss is exact under any micro-batch split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ares_jax import batching as B
from ares_jax.adacs import sft
from ares_jax.aepo import learner as Lr
from ares_jax.data import synthetic
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.ops import kl as K


@pytest.fixture(scope="module")
def setup():
    cfg = config.preset("tiny")
    tok = tokenizer.build_tokenizer()
    examples = synthetic.make_examples(8, seed=0)
    prompts = B.encode_prompts(
        [e.question for e in examples],
        [e.images for e in examples],
        tok,
        cfg,
        template="Answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=12544,
        length_buckets=(256,),
    )
    ids = tok([e.traces[0] for e in examples], add_special_tokens=False)["input_ids"]
    t = 64
    tokens = np.zeros((8, t), np.int32)
    mask = np.zeros((8, t), bool)
    for i, row in enumerate(ids):
        row = (row + [cfg.eos_token_id])[:t]
        tokens[i, : len(row)], mask[i, : len(row)] = row, True
    rows = B.Rows(
        prompt=np.arange(8),
        tokens=tokens,
        mask=mask,
        advantages=np.zeros(8, np.float32),
        bucket=np.zeros(8, np.int32),
        correct=np.ones(8, bool),
        soft_cost=np.zeros(8, np.float32),
        window_mask=np.zeros_like(mask),
    )
    return cfg, prompts, rows


def _batch(cfg, prompts, rows, mb):
    return jax.tree.map(
        jnp.asarray, B.learner_batch(prompts, rows, cfg, micro_batch_size=mb, num_micro=8 // mb)
    )


def _state(model, opt, freeze):
    g, trainable, frozen = Lr.split_params(model, freeze_vision=freeze)
    state = Lr.TrainState(
        trainable,
        opt.init(trainable),
        K.init_beta_states(),
        K.init_kappa(),
        jnp.zeros((), jnp.int32),
    )
    return g, state, frozen


def _step():
    return jax.jit(sft.sft_step, static_argnums=0, static_argnames=("optimizer", "s"))


def test_loss_falls_and_frozen_vision_stays(setup):
    cfg, prompts, rows = setup
    model = params.init_model(cfg, seed=0)
    lb = _batch(cfg, prompts, rows, 4)
    s = sft.SFTSettings(prompt_len=prompts.ids.shape[1], chunk_size=32)
    opt = optax.adam(3e-3)
    g, state, frozen = _state(model, opt, freeze=True)
    step = _step()
    w = jnp.zeros((2, 4))
    losses = []
    for _ in range(10):
        state, m = step(g, state, frozen, lb, w, optimizer=opt, s=s)
        losses.append(float(m["train/loss"]))
    assert losses[-1] < 0.7 * losses[0]
    assert float(m["train/tokens"]) == rows.mask.sum()
    merged = Lr.merge(g, state.trainable, frozen)
    np.testing.assert_array_equal(
        np.asarray(merged.visual.patch_embed[...]), np.asarray(model.visual.patch_embed[...])
    )


def test_kl_term_and_exact_accumulation(setup):
    cfg, prompts, rows = setup
    model = params.init_model(cfg, seed=1)
    s = sft.SFTSettings(prompt_len=prompts.ids.shape[1], chunk_size=32, kl_coef=0.5)
    out = []
    for mb in (8, 2):
        lb = _batch(cfg, prompts, rows, mb)
        g, state, frozen = _state(model, optax.sgd(0.0), freeze=False)
        ref, _ = Lr.logprob_pass(g, state.trainable, frozen, lb.inputs, lb.tokens, s)
        lb = lb._replace(ref_logp=ref)  # the reference is the model itself: KL 0
        w = jnp.ones((8 // mb, mb))
        _, m = _step()(g, state, frozen, lb, w, optimizer=optax.sgd(0.0), s=s)
        out.append({k: float(v) for k, v in m.items()})
    assert out[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)
    assert out[0]["train/loss"] == pytest.approx(out[1]["train/loss"], rel=1e-5)
    assert out[0]["train/grad_norm"] == pytest.approx(out[1]["train/grad_norm"], rel=1e-4)
