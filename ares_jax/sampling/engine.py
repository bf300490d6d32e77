"""Continuous batching over a paged KV cache: the rollout engine for RL lengths.

The static loop (sampler.py) decodes a fixed batch until its longest row ends, over a dense cache
of prompt + max_new_tokens slots per row. At RL lengths (a few hundred to 16k tokens per
response) most of its row-steps compute padding, and every step attends over every slot. This
engine keeps `slots` rows decoding at once and refills a slot as soon as its row stops:

  * **Queue.** Rows are (prompt, sample) pairs. A prompt's n samples are admitted together: the
    prompt is prefilled once (`Qwen2_5_VL.prompt_kv`, the prompt attending to itself through the
    model's attention kernel) and its keys and values are written into pages.
  * **Pages.** Keys and values live in a pool of fixed-size pages (`page_size` tokens; per layer
    [K, pages, page_size, hd]), with a page table per slot. A prompt's full pages are shared by
    its samples (reference counts); the page holding the prompt's last tokens is copied to each
    sample, which goes on writing there. Decoding takes a page from the free stack when a row
    crosses a page boundary; a finished row returns the pages nobody else holds.
  * **Attention over filled pages only** (`ops.paged_attention`: Pallas kernels on TPU and GPU,
    an XLA loop over blocks of pages up to the longest row on CPU).
  * **Chunks.** The device runs `chunk_steps` decode steps per call (`lax.while_loop` on a
    donated state, leaving early when every row has stopped or a page is missing); between
    chunks the host reads the slots' state, collects finished rows (their outputs come back and
    their slots and pages are freed in one call) and admits waiting prompts: at most two host
    round trips per chunk, none per token.
  * **Preemption.** When a row needs a page and the pool is empty, the row with the fewest
    generated tokens is evicted and queued again from its prompt. Its draws are keyed by (prompt,
    sample, position) (`sampler.row_keys`), so it regenerates the same tokens (up to float
    rounding of a different batch).

Every row's draws depend on its key and its logits only, so the engine's tokens, log-probs and
entropies equal the static loop's for the same key (to float rounding of paged vs dense
attention); tests/sampling/engine_test.py checks it. Output: `sampler.GenerateOutput`, rows in
prompt order, as `sampler.generate` returns them. Branching (entropy-triggered forks) runs in the
static loop only (`generate` picks it when branching is enabled).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.ops import paged_attention as paged
from ares_jax.parallel import multihost
from ares_jax.sampling import sampler as S

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineParams:
    """Sizes of the engine. Hashable: a static argument of its jitted pieces."""

    slots: int = 64  # rows decoded at once
    page_size: int = 64  # tokens per KV page
    # Pages in the pool; 0 = enough for every slot at prompt + max_new_tokens (never preempts).
    # Fewer pages bound the cache's memory; rows are then preempted when the pool runs dry.
    num_pages: int = 0
    chunk_steps: int = 32  # decode steps per device call (one host round trip each)
    prefill_prompts: int = 4  # prompts prefilled per admission call

    def __post_init__(self):
        for name in ("slots", "page_size", "chunk_steps", "prefill_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineParams: {name}={getattr(self, name)} must be >= 1.")
        if self.num_pages < 0:
            raise ValueError(f"EngineParams: num_pages={self.num_pages} must be >= 0.")

    def max_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        """Page-table width: the pages of the longest row."""
        return math.ceil((prompt_len + max_new_tokens) / self.page_size)

    def pool_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        return self.num_pages or self.slots * self.max_pages(prompt_len, max_new_tokens)


class _State(NamedTuple):
    """The device state of the engine, donated through every call (B slots, P pages)."""

    k_pages: tuple  # L x [K, P, ps, hd]
    v_pages: tuple
    refs: jax.Array  # [P] int32: slots holding each page
    free: jax.Array  # [P] int32: free[:n_free] are the free pages
    n_free: jax.Array  # int32
    table: jax.Array  # [B, max_pages] int32
    row: jax.Array  # [B] int32: output row (prompt * n + sample), -1 for a free slot
    keys: jax.Array  # [B] row keys
    length: jax.Array  # [B] int32: tokens in the cache
    gen: jax.Array  # [B] int32: positions generated
    next_pos: jax.Array  # [B] int32: M-RoPE position of the next token
    last: jax.Array  # [B] int32: the token fed at the next step
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] int32
    out: S.Draw  # each field [B, T]: the slot's generated positions


def _fills(sp: S.SamplingParams) -> S.Draw:
    pad = sp.pad_token_id
    return S.Draw(pad, 0.0, 0.0, 0.0, pad, 0.0, 0.0)


def _live(state: _State) -> jax.Array:
    return (state.row >= 0) & ~state.done


# ---------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def _init(graphdef, params, ep: EngineParams, prompt_len: int, sp: S.SamplingParams) -> _State:
    model = nnx.merge(graphdef, params)
    b, t = ep.slots, sp.max_new_tokens
    pages = ep.pool_pages(prompt_len, t)
    k_pages, v_pages = model.init_pages(pages, ep.page_size)
    key_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
    fills = _fills(sp)
    out = S.Draw(
        *[jnp.full((b, t), f, jnp.int32 if isinstance(f, int) else jnp.float32) for f in fills]
    )
    return _State(
        k_pages=k_pages,
        v_pages=v_pages,
        refs=jnp.zeros((pages,), jnp.int32),
        free=jnp.arange(pages, dtype=jnp.int32)[::-1],
        n_free=jnp.asarray(pages, jnp.int32),
        table=jnp.zeros((b, ep.max_pages(prompt_len, t)), jnp.int32),
        row=jnp.full((b,), -1, jnp.int32),
        keys=jnp.zeros((b, *key_shape), jnp.uint32),
        length=jnp.zeros((b,), jnp.int32),
        gen=jnp.zeros((b,), jnp.int32),
        next_pos=jnp.zeros((b,), jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        reason=jnp.full((b,), S.LENGTH, jnp.int32),
        out=out,
    )


@functools.partial(jax.jit, static_argnums=(0,))
def _image_features(graphdef, params, vision):
    return nnx.merge(graphdef, params).image_features(vision)


def _take_pages(state: _State, offset: jax.Array) -> jax.Array:
    """The page `offset` positions down from the top of the free stack (the caller takes pages
    0 .. k-1 with k <= n_free, then lowers n_free by k)."""
    return jnp.take(state.free, jnp.clip(state.n_free - 1 - offset, 0, state.free.shape[0] - 1))


class _Requests(NamedTuple):
    """Rows to admit, A = prefill_prompts * n of them; entries with slot == B are unused."""

    prompt_local: jax.Array  # [A] int32: which of the prefilled prompts
    prompt: jax.Array  # [A] int32: the prompt's index in the caller's numbering (its key)
    sample: jax.Array  # [A] int32
    slot: jax.Array  # [A] int32
    row: jax.Array  # [A] int32: the output row


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _admit(
    graphdef,
    params,
    state: _State,
    inputs: ModelInputs,
    features,
    req: _Requests,
    sp: S.SamplingParams,
    ep: EngineParams,
    key,
) -> _State:
    """Prefills the prompts of `inputs` [Pp, T] and starts the requested rows in their slots."""
    model = nnx.merge(graphdef, params)
    b, ps = ep.slots, ep.page_size
    n_prompts = inputs.input_ids.shape[0]
    hidden, ks, vs = model.prompt_kv(inputs, features)
    plen = jnp.sum(inputs.attention_mask, axis=1).astype(jnp.int32)  # [Pp]
    valid = req.slot < b  # [A]
    rows_of = jnp.zeros((n_prompts,), jnp.int32).at[req.prompt_local].add(valid.astype(jnp.int32))
    nfull = plen // ps
    partial = (plen % ps) > 0
    # Pages: the full pages of each admitted prompt once, the last partial page per row.
    shared_need = jnp.where(rows_of > 0, nfull, 0)
    shared_off = jnp.cumsum(shared_need) - shared_need
    total_shared = jnp.sum(shared_need)
    private = valid & partial[req.prompt_local]
    private_off = total_shared + jnp.cumsum(private) - private
    total = total_shared + jnp.sum(private)
    width = state.table.shape[1]
    j = jnp.arange(width)
    shared = _take_pages(state, shared_off[:, None] + j[None, :])  # [Pp, width]
    row_nfull = nfull[req.prompt_local]
    table = jnp.where(
        j[None, :] < row_nfull[:, None],
        shared[req.prompt_local],
        jnp.where(
            (j[None, :] == row_nfull[:, None]) & private[:, None],
            _take_pages(state, private_off)[:, None],
            0,
        ),
    )  # [A, width]
    pool = state.refs.shape[0]
    shared_ok = (j[None, :] < shared_need[:, None]).reshape(-1)
    refs = state.refs.at[jnp.where(shared_ok, shared.reshape(-1), pool)].add(
        jnp.repeat(rows_of, width), mode="drop"
    )
    refs = refs.at[jnp.where(private, table[jnp.arange(table.shape[0]), row_nfull], pool)].add(
        1, mode="drop"
    )
    # Keys and values of every prompt token, written through each row's table (a shared page is
    # written once per row with the same values).
    row_len = jnp.where(valid, plen[req.prompt_local], 0)
    k_pages, v_pages = [], []
    for kp, vp, k, v in zip(state.k_pages, state.v_pages, ks, vs, strict=True):
        kp, vp = paged.write_prompt(
            kp, vp, k[req.prompt_local], v[req.prompt_local], table, row_len
        )
        k_pages.append(kp)
        v_pages.append(vp)
    # Position 0 of every row, from the prompt's last hidden state.
    keys = S.row_keys(key, req.prompt, req.sample)
    d = S.draw(
        model,
        hidden[req.prompt_local, -1],
        keys,
        jnp.zeros_like(req.slot),
        sp,
        S.logit_bias(sp, model.cfg.text.vocab_size),
    )
    stopped = jnp.isin(d.tokens, jnp.asarray(sp.stop_token_ids, jnp.int32))
    at_end = (sp.max_new_tokens <= 1) & ~stopped
    last_pos = jnp.max(jnp.where(inputs.attention_mask, inputs.position_ids, -1), axis=(0, 2))
    slot = jnp.where(valid, req.slot, b)
    put = lambda x, v: x.at[slot].set(v, mode="drop")  # noqa: E731
    out = S.Draw(
        *[
            buf.at[slot]
            .set(jnp.full(buf.shape[1:], f, buf.dtype), mode="drop")
            .at[slot, 0]
            .set(x, mode="drop")
            for buf, f, x in zip(state.out, _fills(sp), d, strict=True)
        ]
    )
    return state._replace(
        k_pages=tuple(k_pages),
        v_pages=tuple(v_pages),
        refs=refs,
        n_free=state.n_free - total,
        table=put(state.table, table),
        row=put(state.row, req.row),
        keys=put(state.keys, keys),
        length=put(state.length, row_len),
        gen=put(state.gen, jnp.ones_like(row_len)),
        next_pos=put(state.next_pos, last_pos[req.prompt_local] + 1),
        last=put(state.last, d.tokens),
        done=put(state.done, stopped | at_end),
        reason=put(state.reason, jnp.where(stopped, S.STOP, S.LENGTH)),
        out=out,
    )


def _page_need(state: _State, ps: int) -> jax.Array:
    """[B] bool: live rows whose next token starts a new page."""
    return _live(state) & (state.length % ps == 0)


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=(2,))
def _decode_chunk(graphdef, params, state: _State, sp: S.SamplingParams, ep: EngineParams):
    """Up to `chunk_steps` decode steps for every live slot."""
    model = nnx.merge(graphdef, params)
    bias = S.logit_bias(sp, model.cfg.text.vocab_size)
    ps, t = ep.page_size, sp.max_new_tokens
    stop_ids = jnp.asarray(sp.stop_token_ids, jnp.int32)

    def cond(carry):
        i, state = carry
        need = jnp.sum(_page_need(state, ps))
        return (i < ep.chunk_steps) & jnp.any(_live(state)) & (need <= state.n_free)

    def body(carry):
        i, state = carry
        live = _live(state)
        need = _page_need(state, ps)
        offset = jnp.cumsum(need) - need
        page = _take_pages(state, offset)
        rows = jnp.arange(state.row.shape[0])
        col = jnp.where(need, state.length // ps, state.table.shape[1])
        table = state.table.at[rows, col].set(page, mode="drop")
        refs = state.refs.at[jnp.where(need, page, state.refs.shape[0])].set(1, mode="drop")
        hidden, k_pages, v_pages = model.paged_decode_step(
            state.last, state.next_pos, state.k_pages, state.v_pages, table, state.length, live
        )
        d = S.draw(model, hidden, state.keys, state.gen, sp, bias)
        gcol = jnp.where(live, state.gen, t)
        out = S.Draw(
            *[buf.at[rows, gcol].set(x, mode="drop") for buf, x in zip(state.out, d, strict=True)]
        )
        stopped = jnp.isin(d.tokens, stop_ids) & live
        at_end = (state.gen + 1 >= t) & live & ~stopped
        step = live.astype(jnp.int32)
        state = state._replace(
            k_pages=k_pages,
            v_pages=v_pages,
            refs=refs,
            n_free=state.n_free - jnp.sum(need),
            table=table,
            length=state.length + step,
            gen=state.gen + step,
            next_pos=state.next_pos + step,
            last=jnp.where(live, d.tokens, state.last),
            done=state.done | stopped | at_end,
            reason=jnp.where(stopped, S.STOP, jnp.where(at_end, S.LENGTH, state.reason)),
            out=out,
        )
        return i + 1, state

    _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return state


def _release(state: _State, release: jax.Array, ps: int) -> _State:
    """Frees the slots where `release` [B] is True and the pages only they held."""
    pool = state.refs.shape[0]
    held = jnp.arange(state.table.shape[1])[None, :] < ((state.length + ps - 1) // ps)[:, None]
    drop = release[:, None] & held
    refs = state.refs.at[jnp.where(drop, state.table, pool)].add(-1, mode="drop")
    emptied = (state.refs > 0) & (refs == 0)
    pos = state.n_free + jnp.cumsum(emptied) - emptied
    free = state.free.at[jnp.where(emptied, pos, pool)].set(
        jnp.arange(pool, dtype=jnp.int32), mode="drop"
    )
    return state._replace(
        refs=refs,
        free=free,
        n_free=state.n_free + jnp.sum(emptied),
        row=jnp.where(release, -1, state.row),
        length=jnp.where(release, 0, state.length),
        done=jnp.where(release, False, state.done),
    )


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _collect(state: _State, slots: jax.Array, release: jax.Array, ps: int):
    """The outputs of `slots` (finished rows), then those and the `release` [B] slots freed.

    Returns (state, outputs [len(slots), T] per field, lengths, stop reasons, free pages): one
    fetch for the host.
    """
    take = lambda x: jnp.take(x, slots, axis=0)  # noqa: E731
    out = S.Draw(*[take(x) for x in state.out]), take(state.gen), take(state.reason)
    state = _release(state, release, ps)
    return state, (*out, state.n_free)


@jax.jit
def _summary(state: _State):
    return state.row, state.done, state.gen, state.length, state.n_free


# ---------------------------------------------------------------------------------------------
# Host loop
# ---------------------------------------------------------------------------------------------


def _bucket(n: int, slots: int) -> int:
    """Rows fetched for n finished slots: a power of two from 8 up to `slots` (few compilations)."""
    return min(slots, max(8, 1 << max(0, (n - 1).bit_length())))


def generate_paged(
    graphdef,
    params,
    *,
    inputs: ModelInputs,
    sampling: S.SamplingParams,
    key: jax.Array,
    engine: EngineParams = EngineParams(),
    mesh=None,
    first_prompt: int = 0,
) -> S.GenerateOutput:
    """`sampler.generate` by continuous batching over a paged cache (module docstring).

    Args:
      graphdef, params: the model (`nnx.split`).
      inputs: B prompts, left-padded to one length, with their images (NumPy or device arrays).
      sampling: `SamplingParams` without branching.
      key: a PRNG key: row (prompt b, sample j) draws with `sampler.row_keys(key, b, j)`, as the
        static loop does, so both give the same tokens for the same key.
      engine: `EngineParams`.
      first_prompt: the index of the first prompt in the caller's numbering (`sampler.generate`).
      mesh: run under this mesh (`jax.set_mesh`); the engine's state is laid out by XLA.

    Returns:
      GenerateOutput of NumPy arrays, B * n rows, prompt by prompt.
    """
    if mesh is not None:
        with jax.set_mesh(mesh):
            return _run(graphdef, params, inputs, sampling, key, engine, first_prompt, mesh)
    return _run(graphdef, params, inputs, sampling, key, engine, first_prompt, None)


def _run(graphdef, params, inputs, sampling, key, engine, first_prompt, mesh):
    if mesh is None:
        place = jnp.asarray
    else:  # the engine's state and inputs whole on every device; XLA lays out the work
        replicated = multihost.replicated(mesh)
        place = lambda x: multihost.put(x, replicated)  # noqa: E731
    sp, ep = sampling, engine
    if sp.branching.enabled and sp.branching.budget > 0:
        raise ValueError("generate_paged: branching runs in the static loop (sampler.generate).")
    if ep.slots < sp.n:
        raise ValueError(
            f"generate_paged: slots={ep.slots} < n={sp.n}: a prompt's samples start together."
        )
    inputs = jax.tree.map(np.asarray, inputs)
    n_prompts, prompt_len = inputs.input_ids.shape
    t, n, ps, b = sp.max_new_tokens, sp.n, ep.page_size, ep.slots
    plen = inputs.attention_mask.sum(1).astype(np.int64)
    pool = ep.pool_pages(prompt_len, t)
    need_pages = plen // ps + n * (plen % ps > 0)
    if (need_pages + n > pool).any():
        worst = int(np.argmax(need_pages))
        raise ValueError(
            f"generate_paged: prompt {worst} ({plen[worst]} tokens, n={n}) needs "
            f"{need_pages[worst] + n} pages of {ps} tokens to start; the pool holds {pool} "
            "(EngineParams.num_pages)."
        )
    features = None
    if inputs.vision is not None:
        features = _image_features(graphdef, params, jax.tree.map(place, inputs.vision))
    state = _init(graphdef, params, ep, prompt_len, sp)
    if mesh is not None:
        state = place(state)
    key = place(np.asarray(key))

    fills = _fills(sp)
    host = S.Draw(
        *[
            np.full((n_prompts * n, t), f, np.int32 if isinstance(f, int) else np.float32)
            for f in fills
        ]
    )
    lengths = np.zeros((n_prompts * n,), np.int32)
    reason = np.full((n_prompts * n,), S.LENGTH, np.int32)
    queue = collections.deque((p, list(range(n))) for p in range(n_prompts))
    pp = ep.prefill_prompts
    preempted = 0
    while True:
        row, done, gen, length, n_free = multihost.fetch(_summary(state))
        n_free = int(n_free)
        finished = np.flatnonzero((row >= 0) & done)
        if finished.size:
            idx = np.full((_bucket(finished.size, b),), finished[0], np.int32)
            idx[: finished.size] = finished
            state, got = _collect(state, place(idx), place((row >= 0) & done), ps)
            out, g, r, n_free = multihost.fetch(got)
            rows = row[finished]
            for dst, src in zip(host, out, strict=True):
                dst[rows] = src[: finished.size]
            lengths[rows], reason[rows] = g[: finished.size], r[: finished.size]
            row = np.where((row >= 0) & done, -1, row)
            n_free = int(n_free)
        live = (row >= 0) & ~done
        need = int(np.sum(live & (length % ps == 0)))
        if need > n_free and not finished.size:
            # The pool is dry: evict the live row with the fewest generated tokens.
            victim = int(np.flatnonzero(live)[np.argmin(np.where(live, gen, np.inf)[live])])
            p, j = divmod(int(row[victim]), n)
            queue.appendleft((p, [j]))
            release = np.zeros((b,), bool)
            release[victim] = True
            state, _ = _collect(
                state, place(np.zeros((_bucket(1, b),), np.int32)), place(release), ps
            )
            preempted += 1
            continue
        # Admission: whole queue entries while slots and pages (one page of growth per running
        # row kept in reserve) allow.
        free_slots = list(np.flatnonzero(row < 0))
        running = int(np.sum(live))
        chosen = []
        while queue and len(chosen) < pp:
            p, samples = queue[0]
            pages = int(plen[p] // ps + len(samples) * (plen[p] % ps > 0))
            reserve = running + len(samples)
            if len(samples) > len(free_slots) or pages + reserve > n_free:
                break
            queue.popleft()
            chosen.append((p, samples, [free_slots.pop(0) for _ in samples]))
            n_free -= pages
            running += len(samples)
        if chosen:
            state = _admit_prompts(
                graphdef, params, state, inputs, features, chosen, sp, ep, key, first_prompt, place
            )
        elif not running:
            if not queue:
                break
            raise RuntimeError(
                f"generate_paged: {len(queue)} prompts wait but none fits the empty pool of "
                f"{pool} pages (EngineParams.num_pages)."
            )
        state = _decode_chunk(graphdef, params, state, sp, ep)
    if preempted:
        log.info(
            "generate_paged: %d rows preempted and regenerated (pool of %d pages)", preempted, pool
        )
    mask = np.arange(t)[None, :] < lengths[:, None]
    return S.GenerateOutput(
        tokens=host.tokens,
        logp=host.logp,
        sampling_logp=host.slogp,
        entropy=host.entropy,
        argmax_tokens=host.argmax,
        topk_entropy_tail=host.topk_tail,
        topk_entropy_raw=host.topk_raw,
        mask=mask,
        lengths=lengths,
        stop_reason=reason,
        prompt_index=np.repeat(np.arange(n_prompts), n).astype(np.int32),
        active=np.ones((n_prompts * n,), bool),
        parent=np.full((n_prompts * n,), -1, np.int32),
        fork_step=np.full((n_prompts * n,), -1, np.int32),
    )


def _admit_prompts(
    graphdef, params, state, inputs, features, chosen, sp, ep, key, first_prompt, place
):
    """One `_admit` call for `chosen` [(prompt, samples, slots)], padded to static sizes."""
    pp, n, b = ep.prefill_prompts, sp.n, ep.slots
    which = [p for p, _, _ in chosen] + [chosen[0][0]] * (pp - len(chosen))
    sub = ModelInputs(
        input_ids=inputs.input_ids[which],
        attention_mask=inputs.attention_mask[which],
        position_ids=inputs.position_ids[:, which],
        image_index=None if inputs.image_index is None else inputs.image_index[which],
    )
    local = np.zeros((pp * n,), np.int32)
    prompt = np.zeros((pp * n,), np.int32)
    sample = np.zeros((pp * n,), np.int32)
    slot = np.full((pp * n,), b, np.int32)
    row = np.zeros((pp * n,), np.int32)
    i = 0
    for q, (p, samples, slots) in enumerate(chosen):
        for j, s in zip(samples, slots, strict=True):
            local[i], prompt[i], sample[i], slot[i] = q, first_prompt + p, j, s
            row[i] = p * n + j
            i += 1
    req = _Requests(*map(place, (local, prompt, sample, slot, row)))
    sub = jax.tree.map(place, sub)
    return _admit(graphdef, params, state, sub, features, req, sp, ep, key)
