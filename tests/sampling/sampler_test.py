"""Tests of the rollout sampler: parity with transformers and with the learner, sampling
statistics, stopping, sharding and entropy-triggered branching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ares_jax.models.qwen2_5_vl import config, params
from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.ops.entropy import token_logprobs_and_entropy
from ares_jax.sampling import (
    INACTIVE,
    LENGTH,
    STOP,
    BranchingParams,
    SamplingParams,
    generate,
)
from ares_jax.sampling import logits as L


@pytest.fixture(scope="module")
def tiny():
    return params.init_model(config.preset("tiny"), seed=1)


def _text_prompts(b=2, length=6, pad=2, seed=0):
    ids = np.random.default_rng(seed).integers(0, 500, (b, length)).astype(np.int32)
    mask = np.ones((b, length), bool)
    mask[1, :pad] = False  # left padding
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 0)
    return ModelInputs(ids, mask, np.broadcast_to(pos[None], (3, b, length)).astype(np.int32))


def _test_images(seed=0):
    """Three random images of 90x60, 56x112 and 112x84: (patches, grids) per image."""
    from ares_jax.models.qwen2_5_vl.processor import preprocess_image

    rng = np.random.default_rng(seed)
    return zip(
        *[
            preprocess_image(
                rng.integers(0, 256, (h, w, 3), dtype=np.uint8), min_pixels=3136, max_pixels=50176
            )
            for h, w in [(90, 60), (56, 112), (112, 84)]
        ],
        strict=True,
    )


def _image_prompts(cfg):
    """Two left-padded prompts with one and two images (the tiny preset's token ids)."""
    pix, grids = _test_images()
    n = [int(np.prod(g)) // 4 for g in grids]
    vs, img, ve = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    row0 = [10, 11, vs] + [img] * n[0] + [ve, 12, 13]
    row1 = [14, vs] + [img] * n[1] + [ve, vs] + [img] * n[2] + [ve, 15]
    length = max(len(row0), len(row1))
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), bool)
    for b, row in enumerate((row0, row1)):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, True
    return model_inputs.from_hf(cfg, ids, mask, np.concatenate(pix), np.asarray(grids))


def _response_hidden(model, inputs: ModelInputs, out, rows_per_prompt):
    """Teacher-forced final hidden states [N, T, D] that predict each generated token: one forward
    over prompt + response per row, images included."""
    rep = lambda x: np.repeat(np.asarray(x), rows_per_prompt, axis=0)  # noqa: E731
    prompt_ids, prompt_mask = rep(inputs.input_ids), rep(inputs.attention_mask)
    t = out.tokens.shape[1]
    prompt_pos = np.repeat(np.asarray(inputs.position_ids), rows_per_prompt, axis=1)
    next_pos = np.max(np.where(prompt_mask[None], prompt_pos, -1), axis=(0, 2)) + 1
    response_pos = next_pos[:, None] + np.arange(t)[None, :]
    pos = np.concatenate([prompt_pos, np.broadcast_to(response_pos, (3,) + response_pos.shape)], 2)
    index = None
    if inputs.image_index is not None:  # every row of a prompt reads that prompt's features
        index = np.concatenate([rep(inputs.image_index), np.full(out.tokens.shape, -1)], 1)
    full = ModelInputs(
        np.concatenate([prompt_ids, out.tokens], 1),
        np.concatenate([prompt_mask, out.mask], 1),
        pos.astype(np.int32),
        None if index is None else index.astype(np.int32),
        inputs.vision,
    )
    hidden = model.hidden_states(jax.tree.map(jnp.asarray, full))
    p = prompt_ids.shape[1]
    return hidden[:, p - 1 : -1]


def _recompute(model, inputs: ModelInputs, out, rows_per_prompt, temperature=1.0):
    """The learner's teacher-forced log-probs and entropies of the generated tokens."""
    hidden = _response_hidden(model, inputs, out, rows_per_prompt)
    return token_logprobs_and_entropy(
        hidden, model.unembed(), jnp.asarray(out.tokens), temperature=temperature
    )


def test_logprobs_and_entropies_equal_learner_recomputation(tiny):
    inputs = _text_prompts()
    sp = SamplingParams(n=3, max_new_tokens=10, temperature=1.0, top_p=0.9, stop_token_ids=(5,))
    out = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    logp, ent = _recompute(tiny, inputs, out, 3)
    m = out.mask
    np.testing.assert_allclose(np.asarray(logp)[m], out.logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[m], out.entropy[m], atol=1e-5)
    # Under top-p the sampled distribution is narrower: its log-probs are never lower.
    assert (out.sampling_logp[m] >= out.logp[m] - 1e-6).all()


def test_statistics_with_images_and_temperature(tiny):
    inputs = _image_prompts(tiny.cfg)
    sp = SamplingParams(n=2, max_new_tokens=8, temperature=0.7, top_k=40)
    out = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(1))
    logp, ent = _recompute(tiny, inputs, out, 2, temperature=0.7)
    m = out.mask
    np.testing.assert_allclose(np.asarray(logp)[m], out.logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[m], out.entropy[m], atol=1e-5)


def test_blockwise_prefill_equals_the_dense_cache_mask(tiny):
    """With the blockwise attention the prefill attends over the prompt's own keys with its mask
    as segment ids (no [B, T, cache] mask): same hidden states, same greedy rollout."""
    blockwise = params.init_model(tiny.cfg, seed=1, attention_impl="blockwise")
    tiny = params.init_model(tiny.cfg, seed=1, attention_impl="xla")  # the dense cache mask
    inputs = jax.tree.map(jnp.asarray, _image_prompts(tiny.cfg))
    cache_len = inputs.input_ids.shape[1] + 8
    got, _ = blockwise.prefill(inputs, blockwise.init_cache(2, cache_len))
    want, _ = tiny.prefill(inputs, tiny.init_cache(2, cache_len))
    real = np.asarray(inputs.attention_mask)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
    cache = blockwise.init_cache(2, cache_len)
    mask = f"bool[2,{inputs.input_ids.shape[1]},{cache_len}]"  # the dense path's key mask
    assert mask in str(jax.make_jaxpr(tiny.prefill)(inputs, cache))
    assert mask not in str(jax.make_jaxpr(blockwise.prefill)(inputs, cache))
    sp = SamplingParams(n=1, max_new_tokens=6, temperature=0.0)
    a = generate(blockwise, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    b = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logp[a.mask], b.logp[b.mask], atol=1e-5)


def test_same_key_same_tokens_other_key_other_tokens(tiny):
    inputs = _text_prompts()
    sp = SamplingParams(n=4, max_new_tokens=8, temperature=1.0, top_k=50)
    a = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(3))
    b = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(3))
    c = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    # The n samples of one prompt differ from each other (one prefill, independent draws).
    assert len({tuple(r) for r in a.tokens[:4]}) > 1


def test_stop_tokens_end_rows_and_finished_rows_do_not_change(tiny):
    inputs = _text_prompts()
    probe = generate(
        tiny,
        inputs=inputs,
        sampling=SamplingParams(n=4, max_new_tokens=12),
        key=jax.random.PRNGKey(5),
    )
    stop = int(probe.tokens[0, 3])  # a token that the first row emits at position 3
    sp = SamplingParams(n=4, max_new_tokens=12, stop_token_ids=(stop,), pad_token_id=7)
    out = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(5))
    assert out.lengths[0] <= 4 and out.stop_reason[0] == STOP
    for r in range(out.tokens.shape[0]):
        n = out.lengths[r]
        hits = np.flatnonzero(out.tokens[r, :n] == stop)
        if out.stop_reason[r] == STOP:
            assert hits.tolist() == [n - 1]  # ends exactly at its first stop token
        else:
            assert out.stop_reason[r] == LENGTH and n == 12 and hits.size == 0
        assert (out.tokens[r, n:] == 7).all()
        assert (out.logp[r, n:] == 0).all() and (out.entropy[r, n:] == 0).all()
        np.testing.assert_array_equal(out.mask[r], np.arange(12) < n)
        # Up to its end a row equals the run without stop tokens: stopping others changes nothing.
        np.testing.assert_array_equal(out.tokens[r, :n], probe.tokens[r, :n])


@pytest.mark.parametrize("top_k,top_p", [(0, 0.7), (5, 1.0), (6, 0.8), (0, 1.0)])
def test_truncated_sampling_frequencies(top_k, top_p):
    """20000 draws from fixed logits: frequencies within 0.02 total variation of the truncated
    distribution (the statistical noise is about 0.01), and never outside it."""
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(1, 12)) * 1.5, jnp.float32)
    draws = 20000
    zt = L.sampling_logits(jnp.repeat(z, draws, 0), temperature=0.9, top_k=top_k, top_p=top_p)
    tokens, _ = L.sample(jax.random.PRNGKey(0), zt, greedy=False)
    freq = np.bincount(np.asarray(tokens), minlength=12) / draws
    # Reference truncation in float64: top-k first, then top-p over the renormalised top-k set
    # (the order of transformers' logits warpers and of vLLM).
    p = np.exp(np.asarray(z[0], np.float64) / 0.9)
    p /= p.sum()
    order = np.argsort(-p)
    if top_k:
        p[order[top_k:]] = 0.0
        p /= p.sum()
    keep = np.zeros(12, bool)
    mass = 0.0
    for i in order:
        if p[i] == 0.0 or mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    q /= q.sum()
    assert (freq[~keep] == 0).all()
    assert 0.5 * np.abs(freq - q).sum() < 0.02


def test_greedy_and_bias(tiny):
    inputs = _text_prompts()
    greedy = SamplingParams(n=2, max_new_tokens=6, temperature=0.0)
    out = generate(tiny, inputs=inputs, sampling=greedy, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(out.tokens[0], out.tokens[1])  # greedy rows agree
    banned = int(out.tokens[0, 0])
    biased = SamplingParams(
        n=2, max_new_tokens=6, temperature=0.0, logit_bias=((banned, -1e9),), vocab_limit=554
    )
    out2 = generate(tiny, inputs=inputs, sampling=biased, key=jax.random.PRNGKey(0))
    assert banned not in out2.tokens and out2.tokens.max() < 554


def test_sharded_greedy_equals_single_device(tiny):
    cfg = config.preset("tiny")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = params.init_model(cfg, seed=1, mesh=mesh)
    inputs = _text_prompts(b=4)
    sp = SamplingParams(n=2, max_new_tokens=8, temperature=0.0)
    single = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    multi = generate(sharded, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0), mesh=mesh)
    np.testing.assert_array_equal(single.tokens, multi.tokens)
    np.testing.assert_allclose(single.entropy, multi.entropy, atol=1e-5)


def test_branching_rule_budget_and_shared_prefix(tiny):
    inputs = _text_prompts()
    bp = BranchingParams(enabled=True, budget=3, window=3, cooldown=2)
    sp = SamplingParams(n=2, max_new_tokens=14, branching=bp)
    base = generate(
        tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(2), branch_threshold=1e9
    )
    assert not base.active.reshape(2, 5)[:, 2:].any()  # tau out of reach: no fork
    assert (base.stop_reason.reshape(2, 5)[:, 2:] == INACTIVE).all()
    entropies = base.entropy[base.mask]
    tau = float(np.quantile(entropies, 0.6))
    out = generate(
        tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(2), branch_threshold=tau
    )
    rows = out.active.reshape(2, 5)
    assert rows[:, :2].all()
    forks = 0
    for r in np.flatnonzero(out.parent >= 0):
        forks += 1
        p, s = out.parent[r], out.fork_step[r]
        assert out.prompt_index[p] == out.prompt_index[r]  # joins its prompt's group
        assert out.active[r] and s >= bp.window - 1
        # Shares its parent's prefix exactly, tokens and statistics.
        np.testing.assert_array_equal(out.tokens[r, : s + 1], out.tokens[p, : s + 1])
        np.testing.assert_array_equal(out.entropy[r, : s + 1], out.entropy[p, : s + 1])
        # Forked only where the window entropy crossed the threshold.
        assert out.entropy[r, s - bp.window + 1 : s + 1].mean() >= tau - 1e-6
    assert forks > 0
    assert (out.active.reshape(2, 5).sum(1) <= 2 + bp.budget).all()
    # A branch is a real continuation: the learner recomputes its statistics from its tokens.
    logp, ent = _recompute(tiny, inputs, out, 5)
    m = out.mask
    np.testing.assert_allclose(np.asarray(logp)[m], out.logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[m], out.entropy[m], atol=1e-5)


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="top_p=0.0 must be in"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n=0 must be >= 1"):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="budget >= 0"):
        BranchingParams(enabled=True, budget=-1)


def test_branching_needs_a_threshold(tiny):
    sp = SamplingParams(branching=BranchingParams(enabled=True, budget=1))
    with pytest.raises(ValueError, match="branch_threshold"):
        generate(tiny, inputs=_text_prompts(), sampling=sp, key=jax.random.PRNGKey(0))


@pytest.mark.requires_torch
def test_greedy_equals_transformers_generate_with_images(tmp_path):
    torch = pytest.importorskip("torch")
    from tests.hf_tiny import IMG, hf_batch, hf_model

    hf = hf_model(noise=0.3)  # larger weights: a greedy output that is not one repeated token
    hf.save_pretrained(tmp_path)
    ours = params.from_pretrained(tmp_path, dtype=jnp.float32)
    batch = hf_batch()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.tensor((batch["input_ids"] == IMG).astype(np.int64)),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=2,
            pad_token_id=0,
        )[:, batch["input_ids"].shape[1] :].numpy()
    sp = SamplingParams(n=1, max_new_tokens=12, temperature=0.0, stop_token_ids=(2,))
    out = generate(
        ours, inputs=model_inputs.from_hf(ours.cfg, **batch), sampling=sp, key=jax.random.PRNGKey(0)
    )
    assert len(set(ref[0].tolist())) > 3
    np.testing.assert_array_equal(out.tokens[:, : ref.shape[1]], ref)


def test_argmax_and_topk_entropy_outputs(tiny):
    inputs = _text_prompts()
    sp = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, topk_entropy=10)
    out = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    greedy = generate(
        tiny,
        inputs=inputs,
        sampling=SamplingParams(n=1, max_new_tokens=1, temperature=0.0),
        key=jax.random.PRNGKey(0),
    )
    assert (out.argmax_tokens[::2, 0] == greedy.tokens[:, 0]).all()  # same first-step logits
    m = out.mask
    # Top-10 estimates: the tail term only adds, and with 10 of ~600 tokens kept the raw
    # truncated sum is below the exact entropy.
    assert (out.topk_entropy_raw[m] <= out.topk_entropy_tail[m] + 1e-6).all()
    assert (out.topk_entropy_raw[m] < out.entropy[m]).all()
    assert (out.topk_entropy_raw[~m] == 0).all()


def _vllm_topk_reference(logp, token, k):
    """float64 NumPy: (raw, tail-corrected) estimates over the set vLLM returns for logprobs=k,
    built explicitly: the k most likely ids, plus the sampled id when it is not one of them."""
    ids = list(np.argsort(-logp, kind="stable")[:k])
    if token not in ids:
        ids.append(token)
    p = np.exp(logp[ids])
    raw = -(p * logp[ids]).sum()
    r = max(0.0, 1.0 - p.sum())
    return raw, raw - r * np.log(max(r, 1e-12))


def test_topk_entropies_add_the_sampled_token_outside_the_top_k():
    z = jnp.asarray(np.log([[0.4, 0.3, 0.2, 0.1]] * 3) + 1.5, jnp.float32)  # unnormalised logits
    tokens = jnp.asarray([3, 1, 2], jnp.int32)  # outside, inside, outside the top 2
    tail, raw = L.topk_entropies(z, 2, 1.0, tokens=tokens)
    logp = np.log([0.4, 0.3, 0.2, 0.1])
    ref = np.array([_vllm_topk_reference(logp, int(t), 2) for t in tokens])
    np.testing.assert_allclose(raw, ref[:, 0], rtol=1e-6)
    np.testing.assert_allclose(tail, ref[:, 1], rtol=1e-6)
    # Inside: the top-k-only value; outside: the sampled token's -p log p is added.
    top2 = -(0.4 * np.log(0.4) + 0.3 * np.log(0.3))
    np.testing.assert_allclose(raw, top2 - np.array([0.1, 0.0, 0.2]) * np.log([0.1, 1, 0.2]))
    # Temperature: the estimates are those of softmax(z / T); greedy (T = 0) is T = 1.
    np.testing.assert_allclose(L.topk_entropies(z * 0.5, 2, 0.5, tokens=tokens)[0], tail, rtol=1e-6)
    np.testing.assert_allclose(L.topk_entropies(z, 2, 0.0, tokens=tokens)[1], raw, rtol=1e-6)


def test_sampler_topk_entropy_includes_the_sampled_token(tiny):
    inputs = _text_prompts()
    k = 10
    sp = SamplingParams(n=3, max_new_tokens=8, temperature=1.0, topk_entropy=k)
    out = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(2))
    z = np.asarray(tiny.logits(_response_hidden(tiny, inputs, out, 3)), np.float64)
    top = z.max(-1, keepdims=True)
    logp = z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))
    m = out.mask
    ref = np.array(
        [_vllm_topk_reference(logp[r, c], out.tokens[r, c], k) for r, c in np.argwhere(m)]
    )
    np.testing.assert_allclose(out.topk_entropy_raw[m], ref[:, 0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.topk_entropy_tail[m], ref[:, 1], rtol=1e-4, atol=1e-5)
    # The run exercises both cases: sampled tokens inside and outside the top k.
    top_ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    outside = (top_ids != out.tokens[..., None]).all(-1)[m]
    assert 0 < outside.sum() < outside.size
