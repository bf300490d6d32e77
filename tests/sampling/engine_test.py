"""The continuous-batching engine over a paged KV cache equals the static loop row for row."""

import jax
import numpy as np
import pytest
from flax import nnx

from ares_jax.models.qwen2_5_vl import config, params
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.sampling import BranchingParams, SamplingParams, generate
from ares_jax.sampling.engine import EngineParams, generate_paged
from tests.sampling.sampler_test import _image_prompts, _recompute, _test_images


@pytest.fixture(scope="module")
def tiny():
    return params.init_model(config.preset("tiny"), seed=1)


def _ragged_prompts(b=5, length=11, seed=0):
    """b left-padded text prompts of lengths 3 .. length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 500, (b, length)).astype(np.int32)
    real = rng.integers(3, length + 1, b)
    real[0] = length
    mask = np.arange(length)[None, :] >= (length - real)[:, None]
    pos = np.where(mask, np.cumsum(mask, 1) - 1, 0)
    return ModelInputs(ids, mask, np.broadcast_to(pos[None], (3, b, length)).astype(np.int32))


def _assert_same(got, want, atol=1e-5):
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.stop_reason, want.stop_reason)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.prompt_index, want.prompt_index)
    for name in ("logp", "sampling_logp", "entropy"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=atol, err_msg=name)
    np.testing.assert_array_equal(got.argmax_tokens, want.argmax_tokens)


def _stop_token(tiny, inputs, sp):
    """A token the static loop emits early in several rows, so rows stop at ragged lengths."""
    probe = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(7))
    values, counts = np.unique(probe.tokens[:, 1:6], return_counts=True)
    return int(values[np.argmax(counts)])


def test_refilled_slots_and_shared_prompt_pages_equal_the_static_loop(tiny):
    """More rows than slots (slots are refilled), pages of 4 tokens (prompts and responses cross
    pages; a prompt's full pages are shared by its samples), rows stopping at ragged lengths."""
    inputs = _ragged_prompts()
    base = SamplingParams(n=3, max_new_tokens=14, temperature=1.0, top_p=0.9)
    stop = _stop_token(tiny, inputs, base)
    sp = SamplingParams(n=3, max_new_tokens=14, temperature=1.0, top_p=0.9, stop_token_ids=(stop,))
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(7))
    assert len(set(want.lengths.tolist())) > 2  # ragged
    graphdef, state = nnx.split(tiny)
    ep = EngineParams(slots=6, page_size=4, chunk_steps=3, prefill_prompts=2)
    got = generate_paged(
        graphdef, state, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(7), engine=ep
    )
    _assert_same(got, want)
    # The learner's teacher-forced recomputation gives the engine's statistics.
    logp, ent = _recompute(tiny, inputs, got, 3)
    m = got.mask
    np.testing.assert_allclose(np.asarray(logp)[m], got.logp[m], atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent)[m], got.entropy[m], atol=1e-5)


def test_a_small_pool_preempts_rows_and_regenerates_the_same_tokens(tiny):
    inputs = _ragged_prompts(b=4)
    sp = SamplingParams(n=2, max_new_tokens=12, temperature=1.0, top_k=50)
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(3))
    graphdef, state = nnx.split(tiny)
    # 4 slots of up to 23 tokens need 24 pages of 4; 12 pages force evictions.
    ep = EngineParams(slots=4, page_size=4, num_pages=12, chunk_steps=4, prefill_prompts=1)
    got = generate_paged(
        graphdef, state, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(3), engine=ep
    )
    _assert_same(got, want)


@pytest.mark.parametrize(
    "ep",
    [
        EngineParams(slots=8, page_size=4, chunk_steps=3, prefill_prompts=2),
        # Two prompts of 4 rows share a pool of 24 pages; each can grow to 18: whole prompts
        # (samples and branches) are preempted and regenerated.
        EngineParams(slots=8, page_size=4, num_pages=24, chunk_steps=2, prefill_prompts=1),
    ],
    ids=["refill", "preempt"],
)
def test_branches_equal_the_static_loop(tiny, ep, caplog):
    """Entropy-triggered forks in the engine: the same branches (parents, fork steps, spare
    rows left inactive) and the same tokens and statistics as the static loop. A branch shares
    its parent's full pages and copies its partial one."""
    inputs = _ragged_prompts(b=4)
    bp = BranchingParams(enabled=True, budget=2, window=2, cooldown=2)
    # A low temperature spreads the tiny model's entropies, so that no window entropy lies
    # within float rounding of tau (checked below): both loops take the same forks.
    sp = SamplingParams(n=2, max_new_tokens=12, temperature=0.05, branching=bp)
    key = jax.random.PRNGKey(5)
    base = generate(tiny, inputs=inputs, sampling=sp, key=key, branch_threshold=1e9)
    tau = float(np.quantile(base.entropy[base.mask], 0.7))
    want = generate(tiny, inputs=inputs, sampling=sp, key=key, branch_threshold=tau)
    window = (want.entropy[:, 1:] + want.entropy[:, :-1]) / 2
    assert np.abs(window[want.mask[:, 1:]] - tau).min() > 1e-3
    forks = want.parent >= 0
    assert 3 <= forks.sum() and (~want.active).any()  # forks, and unused spare rows
    assert len(set(want.fork_step[forks] % ep.page_size)) > 1  # forks within and at page ends
    graphdef, state = nnx.split(tiny)
    with caplog.at_level("INFO", logger="ares_jax.sampling.engine"):
        got = generate_paged(
            graphdef, state, inputs=inputs, sampling=sp, key=key, engine=ep, branch_threshold=tau
        )
    _assert_same(got, want, atol=1e-4)  # z / 0.05 scales the logits' rounding by 20
    for name in ("active", "parent", "fork_step"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    assert ("preempted" in caplog.text) == (ep.num_pages > 0)
    logp, ent = _recompute(tiny, inputs, got, 4, temperature=sp.temperature)
    m = got.mask
    np.testing.assert_allclose(np.asarray(logp)[m], got.logp[m], atol=1e-4)
    np.testing.assert_allclose(np.asarray(ent)[m], got.entropy[m], atol=1e-4)


def test_a_prompt_outgrowing_the_pool_is_named(tiny):
    """A prompt whose rows alone outgrow the pool stops with the fix, not a livelock."""
    inputs = _ragged_prompts(b=1)  # 11 tokens: 3 pages of 4 to start, 6 at 12 new tokens
    sp = SamplingParams(n=1, max_new_tokens=12, temperature=1.0)
    graphdef, state = nnx.split(tiny)
    ep = EngineParams(slots=2, page_size=4, num_pages=5, chunk_steps=4)
    with pytest.raises(RuntimeError, match="outgrow a shard's pool of 5 pages.*num_pages"):
        generate_paged(
            graphdef, state, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0), engine=ep
        )


def test_images_and_temperature(tiny):
    inputs = _image_prompts(tiny.cfg)
    sp = SamplingParams(n=2, max_new_tokens=9, temperature=0.7, top_k=40)
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(1))
    graphdef, state = nnx.split(tiny)
    ep = EngineParams(slots=2, page_size=8, chunk_steps=4, prefill_prompts=1)
    got = generate_paged(
        graphdef, state, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(1), engine=ep
    )
    _assert_same(got, want)


def test_images_encoded_per_admission(tiny):
    """`images_of`: each admission runs the vision tower on its own prompts' images (prompts of
    one, two and no images, one prompt per admission, padded admissions repeating a prompt)."""
    from ares_jax.models.qwen2_5_vl import inputs as model_inputs

    cfg = tiny.cfg
    pix, grids = _test_images(seed=3)
    n = [int(np.prod(g)) // 4 for g in grids]
    vs, img, ve = cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id
    rows = [
        [10, 11, vs] + [img] * n[0] + [ve, 12, 13],
        [14, vs] + [img] * n[1] + [ve, vs] + [img] * n[2] + [ve, 15],
        [16, 17, 18, 19],
    ]
    images = [[0], [1, 2], []]
    length = max(map(len, rows))
    ids = np.zeros((3, length), np.int32)
    mask = np.zeros((3, length), bool)
    for b, row in enumerate(rows):
        ids[b, length - len(row) :], mask[b, length - len(row) :] = row, True

    def build(which):
        used = [i for b in which for i in images[b]]
        if not used:
            return model_inputs.from_hf(cfg, ids[which], mask[which])
        return model_inputs.from_hf(
            cfg,
            ids[which],
            mask[which],
            np.concatenate([pix[i] for i in used]),
            np.asarray([grids[i] for i in used]),
        )

    inputs = build([0, 1, 2])
    sp = SamplingParams(n=2, max_new_tokens=9, temperature=0.7, top_k=40)
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(1))
    graphdef, state = nnx.split(tiny)
    calls = []

    def images_of(which):
        calls.append(list(which))
        sub = build(which)
        return sub.image_index, sub.vision

    ep = EngineParams(slots=2, page_size=8, chunk_steps=4, prefill_prompts=1)
    got = generate_paged(
        graphdef,
        state,
        inputs=inputs,
        sampling=sp,
        key=jax.random.PRNGKey(1),
        engine=ep,
        images_of=images_of,
    )
    _assert_same(got, want)
    assert calls == [[0], [1], [2]]


def test_prompts_prefilled_in_chunks(tiny):
    """`prefill_chunk`: prompts with images, 26 positions (one of 12 real tokens after 14 of
    padding), prefilled 4 at a time (7 chunks: all-padding chunks, the last one overlapping the
    one before): the tokens and statistics of the static loop."""
    inputs = _image_prompts(tiny.cfg)
    assert inputs.input_ids.shape[1] == 26
    sp = SamplingParams(n=2, max_new_tokens=6, temperature=0.7, top_k=40)
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(4))
    graphdef, state = nnx.split(tiny)
    ep = EngineParams(slots=4, page_size=4, chunk_steps=3, prefill_prompts=1, prefill_chunk=4)
    got = generate_paged(
        graphdef, state, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(4), engine=ep
    )
    _assert_same(got, want)


def test_greedy_through_generate(tiny):
    inputs = _ragged_prompts(b=3)
    sp = SamplingParams(n=1, max_new_tokens=10, temperature=0.0)
    want = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0))
    got = generate(
        tiny,
        inputs=inputs,
        sampling=sp,
        key=jax.random.PRNGKey(0),
        engine=EngineParams(slots=2, page_size=4),
    )
    _assert_same(got, want)


def test_a_prompt_larger_than_the_pool_is_named():
    cfg = config.preset("tiny")
    model = params.init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    sp = SamplingParams(n=2, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 0 .* pool holds 2"):
        generate_paged(
            graphdef,
            state,
            inputs=_ragged_prompts(b=2),
            sampling=sp,
            key=jax.random.PRNGKey(0),
            engine=EngineParams(slots=2, page_size=4, num_pages=2),
        )


def _collectives(hlo: str) -> list[str]:
    ops = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")
    return [ln for ln in hlo.splitlines() if "=" in ln and any(f" {op}" in ln for op in ops)]


def test_on_a_mesh_each_shard_decodes_its_rows_over_its_own_pages(tiny):
    """8 devices, data x fsdp x tensor = 2 x 2 x 2, the rollout's laid-out weights: 8 slots in 4
    shards of 2 (one prompt each), KV heads over tensor, pools of 6 pages per shard, so rows
    refill and the shards' pools run dry (rows preempted and regenerated per shard). Equal to
    one device; the compiled decode chunk moves no page between devices."""
    from jax.sharding import Mesh

    from ares_jax.sampling import engine as E
    from ares_jax.sampling.layout import rollout_params

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state = nnx.split(params.init_model(config.preset("tiny"), seed=1, mesh=mesh))
    laid_out = rollout_params(graphdef, state, mesh)
    inputs = _ragged_prompts(b=6)
    sp = SamplingParams(n=2, max_new_tokens=8, temperature=1.0)
    ep = EngineParams(slots=8, page_size=4, num_pages=24, chunk_steps=4, prefill_prompts=2)
    pl = E.plan(ep, sp, inputs.input_ids.shape[1], tiny.cfg.text.num_key_value_heads, mesh)
    assert (pl.shards, pl.slots, pl.pages) == (4, 2, 6)
    assert pl.partition == E.paged.Partition(rows=("data", "fsdp"), heads=("tensor",))
    single = generate(tiny, inputs=inputs, sampling=sp, key=jax.random.PRNGKey(0), engine=ep)
    multi = generate_paged(
        graphdef,
        laid_out,
        inputs=inputs,
        sampling=sp,
        key=jax.random.PRNGKey(0),
        engine=ep,
        mesh=mesh,
    )
    _assert_same(multi, single)
    with jax.set_mesh(mesh):
        st = E._init(graphdef, laid_out, pl, sp)
        assert st.k_pages[0].sharding.spec == jax.sharding.PartitionSpec("tensor", ("data", "fsdp"))
        hlo = E._decode_chunk.lower(graphdef, laid_out, st, sp, pl).compile().as_text()
    k, p_all, ps, hd = st.k_pages[0].shape
    pages = [f"{k // 2},{p_all // 4},{ps},{hd}]", f"{k},{p_all},{ps},{hd}]"]
    moved = [ln for ln in _collectives(hlo) if any(shape in ln.split("=")[1] for shape in pages)]
    assert _collectives(hlo) and not moved  # tensor-parallel collectives only, no page


def test_branches_on_a_mesh_equal_one_device(tiny):
    """Forks per shard under `shard_map` (8 devices, 4 shards of 2 slots: one prompt's sample
    and its spare row each): the branches and tokens of one device."""
    from jax.sharding import Mesh

    from ares_jax.sampling.layout import rollout_params

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    graphdef, state = nnx.split(params.init_model(config.preset("tiny"), seed=1, mesh=mesh))
    inputs = _ragged_prompts(b=6)
    bp = BranchingParams(enabled=True, budget=1, window=2, cooldown=2)
    sp = SamplingParams(n=1, max_new_tokens=8, temperature=0.05, branching=bp)
    key = jax.random.PRNGKey(0)
    tau = 2.799  # 5 of 6 prompts fork, no window entropy within 0.03 of it
    ep = EngineParams(slots=8, page_size=4, chunk_steps=3, prefill_prompts=1)
    single = generate(tiny, inputs=inputs, sampling=sp, key=key, branch_threshold=tau)
    assert (single.parent >= 0).sum() == 5
    multi = generate_paged(
        graphdef,
        rollout_params(graphdef, state, mesh),
        inputs=inputs,
        sampling=sp,
        key=key,
        engine=ep,
        mesh=mesh,
        branch_threshold=tau,
    )
    _assert_same(multi, single, atol=1e-4)
    for name in ("active", "parent", "fork_step"):
        np.testing.assert_array_equal(getattr(multi, name), getattr(single, name), err_msg=name)
