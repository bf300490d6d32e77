"""Continuous batching over a paged KV cache: the rollout engine for RL lengths.

The static loop (sampler.py) decodes a fixed batch until its longest row ends, over a dense cache
of prompt + max_new_tokens slots per row. At RL lengths (a few hundred to 16k tokens per
response) most of its row-steps compute padding, and every step attends over every slot. This
engine keeps `slots` rows decoding at once and refills a slot as soon as its row stops:

  * **Queue.** Rows are (prompt, sample) pairs. A prompt's n samples are admitted together: the
    prompt is prefilled once (`Qwen2_5_VL.prompt_kv`, the prompt attending to itself through the
    model's attention kernel, or chunk by chunk with `prefill_chunk`, each chunk attending to
    the chunks before it) and its keys and values are written into pages.
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
  * **Shards.** On a mesh, the slots and the pool are split over the mesh axes of the batch
    rule (`plan`: as many as divide the slots and leave each shard the n slots of a prompt):
    shard s owns slots s*b .. and its own pool, free stack and counts, and its page tables
    index its own pages. The host places each admitted prompt in one shard (the one with the
    most free pages among those with room); page bookkeeping, page writes and paged attention
    run per shard under `shard_map` (`ops.paged_attention.Partition`), the model's dense layers
    as XLA partitions them on the rollout's laid-out weights (`sampling/layout.py`). No page
    crosses devices, and the compiled decode chunk holds no all-gather (tests/sampling/
    engine_test.py on 8 CPU devices, tests/sampling/layout_test.py compiled for a v5p-8).
  * **Images.** With `images_of`, each admission runs the vision tower on its own prompts'
    images; otherwise the features of all prompts are computed once up front.

Every row's draws depend on its key and its logits only, so the engine's tokens, log-probs and
entropies equal the static loop's for the same key (to float rounding of paged vs dense
attention); tests/sampling/engine_test.py checks it. Output: `sampler.GenerateOutput`, rows in
prompt order, as `sampler.generate` returns them.

Branching (entropy-triggered forks, `sampler._branch`'s rule). A prompt's R = n + budget rows
are admitted, and preempted, together, so that they run in step; its spare rows take slots
inactive. Before each decode step the rows that generated position s fork as the static loop
forks them after drawing s: a branch takes its parent's generated positions and state, shares
its parent's full pages (reference counts) and gets a copy of its partial page, and then draws
with its own key. A prompt's unused spare slots are freed when none of its rows is running.
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
from ares_jax.parallel import rules as R
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
    # Prompt tokens per prefill chunk (`Qwen2_5_VL.prompt_kv(chunk=)`), 0 = the whole prompt at
    # once. Chunks bound the prefill's activations by the chunk, not the prompt length.
    prefill_chunk: int = 0

    def __post_init__(self):
        for name in ("slots", "page_size", "chunk_steps", "prefill_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineParams: {name}={getattr(self, name)} must be >= 1.")
        for name in ("num_pages", "prefill_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"EngineParams: {name}={getattr(self, name)} must be >= 0.")

    def max_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        """Page-table width: the pages of the longest row."""
        return math.ceil((prompt_len + max_new_tokens) / self.page_size)

    def pool_pages(self, prompt_len: int, max_new_tokens: int) -> int:
        return self.num_pages or self.slots * self.max_pages(prompt_len, max_new_tokens)


class _State(NamedTuple):
    """The device state of the engine, donated through every call.

    Under a mesh the slots and the pool are split into S shards over the batch axes (`_Plan`):
    the per-slot fields are [S*b] (shard s holds slots s*b ..), the pool's fields [S*P] and
    `n_free` [S]; table entries index pages within their shard. Without a mesh S = 1.
    """

    k_pages: tuple  # L x [K, S*P, ps, hd]
    v_pages: tuple
    refs: jax.Array  # [S*P] int32: slots holding each page
    free: jax.Array  # [S*P] int32: per shard, free[:n_free] are its free pages
    n_free: jax.Array  # [S] int32
    table: jax.Array  # [S*b, max_pages] int32, pages local to the slot's shard
    row: jax.Array  # [S*b] int32: output row (prompt * R + j), -1 for a free slot
    keys: jax.Array  # [S*b] row keys
    length: jax.Array  # [S*b] int32: tokens in the cache
    gen: jax.Array  # [S*b] int32: positions generated
    next_pos: jax.Array  # [S*b] int32: M-RoPE position of the next token
    last: jax.Array  # [S*b] int32: the token fed at the next step
    done: jax.Array  # [S*b] bool
    reason: jax.Array  # [S*b] int32
    active: jax.Array  # [S*b] bool: False for a spare row no branch has filled yet
    parent: jax.Array  # [S*b] int32: output row a branch was forked from, -1 otherwise
    fork_step: jax.Array  # [S*b] int32: last position shared with the parent, -1 otherwise
    last_fork: jax.Array  # [S*b] int32: position of the row's last fork (cooldown)
    out: S.Draw  # each field [S*b, T]: the slot's generated positions


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The engine's static shapes: S shards of b slots and P pages each (hashable)."""

    ep: EngineParams
    partition: paged.Partition | None  # None without a mesh
    shards: int  # S
    slots: int  # b, slots per shard
    pages: int  # P, pages per shard
    width: int  # page-table columns

    @property
    def rows(self) -> tuple[str, ...]:
        return self.partition.rows if self.partition is not None else ()


def plan(ep: EngineParams, sp: S.SamplingParams, prompt_len: int, kv_heads: int, mesh=None):
    """How the engine splits `ep` over `mesh`: slots and pages over the mesh axes the batch rule
    maps to, as many of them (in order) as divide the slots and leave each shard at least the
    rows of one prompt (n, plus the branching budget); KV heads over those of the `kv_heads`
    rule that divide them."""
    partition, shards = None, 1
    if mesh is not None:
        spec = R.logical_to_spec((R.BATCH, R.KV_HEADS), shape=(ep.slots, kv_heads), mesh=mesh)
        tup = lambda a: () if a is None else (a,) if isinstance(a, str) else tuple(a)  # noqa: E731
        rows = []
        for axis in tup(spec[0]):
            if ep.slots // (shards * mesh.shape[axis]) < sp.rows_per_prompt:
                break
            rows.append(axis)
            shards *= mesh.shape[axis]
        partition = paged.Partition(rows=tuple(rows), heads=tup(spec[1]))
    pages = -(-ep.pool_pages(prompt_len, sp.max_new_tokens) // shards)
    width = ep.max_pages(prompt_len, sp.max_new_tokens)
    return _Plan(ep, partition, shards, ep.slots // shards, pages, width)


_NEVER = -(10**6)  # last_fork of a row that never forked
_PAGES = ("heads", "rows", None, None)
_ROWS = ("rows",)
_ROWS2 = ("rows", None)


def _state_dims(num_layers: int) -> _State:
    """`per_shard` roles of every state field."""
    return _State(
        k_pages=(_PAGES,) * num_layers,
        v_pages=(_PAGES,) * num_layers,
        refs=_ROWS,
        free=_ROWS,
        n_free=_ROWS,
        table=_ROWS2,
        row=_ROWS,
        keys=_ROWS2,
        length=_ROWS,
        gen=_ROWS,
        next_pos=_ROWS,
        last=_ROWS,
        done=_ROWS,
        reason=_ROWS,
        active=_ROWS,
        parent=_ROWS,
        fork_step=_ROWS,
        last_fork=_ROWS,
        out=S.Draw(*[_ROWS2] * len(S.Draw._fields)),
    )


def _local(fn, pl: _Plan, in_dims, out_dims):
    return paged.per_shard(fn, pl.partition, in_dims, out_dims)


def _constrain(state: _State, pl: _Plan) -> _State:
    """The state's fields in their shardings (a donated state comes back as it went in)."""
    if pl.partition is None or jax.sharding.get_abstract_mesh().empty:
        return state
    specs = pl.partition.specs(_state_dims(len(state.k_pages)))
    return jax.tree.map(jax.lax.with_sharding_constraint, state, specs)


def _fills(sp: S.SamplingParams) -> S.Draw:
    pad = sp.pad_token_id
    return S.Draw(pad, 0.0, 0.0, 0.0, pad, 0.0, 0.0)


def _live(state: _State) -> jax.Array:
    return (state.row >= 0) & state.active & ~state.done


# ---------------------------------------------------------------------------------------------
# Jitted pieces. Functions named `_local_*` see one shard: b slots, P pages, n_free [1].
# ---------------------------------------------------------------------------------------------


def _abstract_state(graphdef, params, pl: _Plan, sp: S.SamplingParams) -> _State:
    """The engine's state as `jax.ShapeDtypeStruct`s (global shapes; no shardings)."""
    return jax.eval_shape(lambda p: _zeros(graphdef, p, pl, sp), params)


def _zeros(graphdef, params, pl: _Plan, sp: S.SamplingParams) -> _State:
    model = nnx.merge(graphdef, params)
    b, t, n = pl.shards * pl.slots, sp.max_new_tokens, pl.shards * pl.pages
    k_pages, v_pages = model.init_pages(n, pl.ep.page_size)
    key_shape = jax.eval_shape(lambda: jax.random.PRNGKey(0)).shape
    out = S.Draw(
        *[jnp.full((b, t), f, jnp.int32 if isinstance(f, int) else jnp.float32) for f in _fills(sp)]
    )
    return _State(
        k_pages=k_pages,
        v_pages=v_pages,
        refs=jnp.zeros((n,), jnp.int32),
        free=jnp.tile(jnp.arange(pl.pages, dtype=jnp.int32)[::-1], pl.shards),
        n_free=jnp.full((pl.shards,), pl.pages, jnp.int32),
        table=jnp.zeros((b, pl.width), jnp.int32),
        row=jnp.full((b,), -1, jnp.int32),
        keys=jnp.zeros((b, *key_shape), jnp.uint32),
        length=jnp.zeros((b,), jnp.int32),
        gen=jnp.zeros((b,), jnp.int32),
        next_pos=jnp.zeros((b,), jnp.int32),
        last=jnp.zeros((b,), jnp.int32),
        done=jnp.zeros((b,), bool),
        reason=jnp.full((b,), S.LENGTH, jnp.int32),
        active=jnp.zeros((b,), bool),
        parent=jnp.full((b,), -1, jnp.int32),
        fork_step=jnp.full((b,), -1, jnp.int32),
        last_fork=jnp.full((b,), _NEVER, jnp.int32),
        out=out,
    )


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init(graphdef, params, pl: _Plan, sp: S.SamplingParams) -> _State:
    return _constrain(_zeros(graphdef, params, pl, sp), pl)


@functools.partial(jax.jit, static_argnums=(0,))
def _image_features(graphdef, params, vision):
    return nnx.merge(graphdef, params).image_features(vision)


def _take_pages(free: jax.Array, n_free: jax.Array, offset: jax.Array) -> jax.Array:
    """The page `offset` positions down from the top of a shard's free stack (the caller takes
    pages 0 .. k-1 with k <= n_free, then lowers n_free by k)."""
    return jnp.take(free, jnp.clip(n_free[0] - 1 - offset, 0, free.shape[0] - 1))


class _Requests(NamedTuple):
    """Rows to admit, S*A of them (A = prefill_prompts * R per shard, R = rows_per_prompt);
    entries with slot == b are unused. Shard s's requests are entries s*A .. and refer to its own
    prompts and slots."""

    prompt_local: jax.Array  # [S*A] int32: which of the shard's prefilled prompts
    prompt: jax.Array  # [S*A] int32: the prompt's index in the caller's numbering (its key)
    sample: jax.Array  # [S*A] int32
    slot: jax.Array  # [S*A] int32: the slot within the shard
    row: jax.Array  # [S*A] int32: the output row


def _local_place(state: _State, ks, vs, hidden_last, plen, req: _Requests, ps: int, n: int):
    """A shard's prompts into pages: the full pages of each admitted prompt once, the last
    partial page per sample row (spare rows, `sample` >= n, get none until a branch fills them).
    Returns (state, hidden of each request's prompt [A, D], row lengths)."""
    b = state.row.shape[0]
    n_prompts = plen.shape[0]
    slot = jnp.where(req.slot < b, req.slot, b)
    valid = (req.slot < b) & (req.sample < n)  # [A]: rows that start now
    rows_of = jnp.zeros((n_prompts,), jnp.int32).at[req.prompt_local].add(valid.astype(jnp.int32))
    nfull = plen // ps
    partial = (plen % ps) > 0
    shared_need = jnp.where(rows_of > 0, nfull, 0)
    shared_off = jnp.cumsum(shared_need) - shared_need
    total_shared = jnp.sum(shared_need)
    private = valid & partial[req.prompt_local]
    private_off = total_shared + jnp.cumsum(private) - private
    total = total_shared + jnp.sum(private)
    width = state.table.shape[1]
    j = jnp.arange(width)
    shared = _take_pages(state.free, state.n_free, shared_off[:, None] + j[None, :])  # [Pp, W]
    row_nfull = nfull[req.prompt_local]
    table = jnp.where(
        j[None, :] < row_nfull[:, None],
        shared[req.prompt_local],
        jnp.where(
            (j[None, :] == row_nfull[:, None]) & private[:, None],
            _take_pages(state.free, state.n_free, private_off)[:, None],
            0,
        ),
    )  # [A, W]
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
    table = jnp.where(valid[:, None], table, 0)
    state = state._replace(
        k_pages=tuple(k_pages),
        v_pages=tuple(v_pages),
        refs=refs,
        n_free=state.n_free - total,
        table=state.table.at[slot].set(table, mode="drop"),
        length=state.length.at[slot].set(row_len, mode="drop"),
    )
    return state, hidden_last[req.prompt_local], row_len


def _local_start(
    state: _State, req: _Requests, keys, d: S.Draw, next_pos, fills, stop_ids, t: int, n: int
):
    """A shard's admitted rows start in their slots with their first drawn token; spare rows
    (`sample` >= n) take their slots inactive, for branches to fill."""
    b = state.row.shape[0]
    start = req.sample < n
    stopped = jnp.isin(d.tokens, stop_ids) & start
    at_end = (t <= 1) & ~stopped
    slot = jnp.where(req.slot < b, req.slot, b)
    put = lambda x, v: x.at[slot].set(v, mode="drop")  # noqa: E731
    out = S.Draw(
        *[
            buf.at[slot]
            .set(jnp.full(buf.shape[1:], f, buf.dtype), mode="drop")
            .at[slot, 0]
            .set(jnp.where(start, x, f).astype(buf.dtype), mode="drop")
            for buf, f, x in zip(state.out, fills, d, strict=True)
        ]
    )
    reason = jnp.where(stopped, S.STOP, jnp.where(start, S.LENGTH, S.INACTIVE))
    return state._replace(
        row=put(state.row, req.row),
        keys=put(state.keys, keys),
        gen=put(state.gen, start.astype(jnp.int32)),
        next_pos=put(state.next_pos, next_pos[req.prompt_local] + 1),
        last=put(state.last, d.tokens),
        done=put(state.done, stopped | at_end),
        reason=put(state.reason, reason),
        active=put(state.active, start),
        parent=put(state.parent, jnp.full_like(req.slot, -1)),
        fork_step=put(state.fork_step, jnp.full_like(req.slot, -1)),
        last_fork=put(state.last_fork, jnp.full_like(req.slot, _NEVER)),
        out=out,
    )


@functools.partial(jax.jit, static_argnums=(0, 6, 7), donate_argnums=(2,))
def _admit(
    graphdef,
    params,
    state: _State,
    inputs: ModelInputs,
    features,
    req: _Requests,
    sp: S.SamplingParams,
    pl: _Plan,
    key,
) -> _State:
    """Prefills the prompts of `inputs` [S*pp, T] (shard s's are rows s*pp ..) and starts the
    requested rows in their slots."""
    model = nnx.merge(graphdef, params)
    layers = model.cfg.text.num_hidden_layers
    hidden, ks, vs = model.prompt_kv(inputs, features, chunk=pl.ep.prefill_chunk or None)
    plen = jnp.sum(inputs.attention_mask, axis=1).astype(jnp.int32)  # [S*pp]
    last_pos = jnp.max(jnp.where(inputs.attention_mask, inputs.position_ids, -1), axis=(0, 2))
    kv = ("rows", None, "heads", None)
    req_dims = _Requests(*[_ROWS] * len(_Requests._fields))
    dims = _state_dims(layers)
    state, h_rows, _ = _local(
        functools.partial(_local_place, ps=pl.ep.page_size, n=sp.n),
        pl,
        (dims, (kv,) * layers, (kv,) * layers, _ROWS2, _ROWS, req_dims),
        (dims, _ROWS2, _ROWS),
    )(state, ks, vs, hidden[:, -1], plen, req)
    # Position 0 of every row, from its prompt's last hidden state.
    keys = S.row_keys(key, req.prompt, req.sample)
    d = S.draw(
        model,
        h_rows,
        keys,
        jnp.zeros_like(req.slot),
        sp,
        S.logit_bias(sp, model.cfg.text.vocab_size),
    )
    start = functools.partial(
        _local_start,
        fills=_fills(sp),
        stop_ids=jnp.asarray(sp.stop_token_ids, jnp.int32),
        t=sp.max_new_tokens,
        n=sp.n,
    )
    draw_dims = S.Draw(*[_ROWS] * len(S.Draw._fields))
    state = _local(start, pl, (dims, req_dims, _ROWS2, draw_dims, _ROWS), dims)(
        state, req, keys, d, last_pos
    )
    return _constrain(state, pl)


def _page_need(state: _State, ps: int) -> jax.Array:
    """[S*b] bool: live rows whose next token starts a new page."""
    return _live(state) & (state.length % ps == 0)


def _branching(sp: S.SamplingParams) -> bool:
    return sp.branching.enabled and sp.branching.budget > 0


def _fork_choice(state: _State, sp: S.SamplingParams, tau) -> tuple[jax.Array, jax.Array]:
    """The forks of a shard's rows at the position each row generated last (`sampler._branch`'s
    rule; a prompt's rows run in step, all in one shard). Returns (is_child [b]: the spare slot a
    branch fills, src [b]: the slot it copies)."""
    bp, r = sp.branching, sp.rows_per_prompt
    s = state.gen - 1  # the position each row generated last
    cols = jnp.maximum(s[:, None] - jnp.arange(bp.window)[None, :], 0)
    window = jnp.mean(jnp.take_along_axis(state.out.entropy, cols, axis=1), axis=1)
    eligible = (
        _live(state)
        & (s + 1 >= bp.window)
        & (s + 1 < sp.max_new_tokens)
        & (s - state.last_fork >= bp.cooldown)
        & (window >= tau)
    )
    held = state.row >= 0
    same = held[:, None] & held[None, :] & (state.row[:, None] // r == state.row[None, :] // r)
    local = state.row % r
    before = local[None, :] < local[:, None]  # [i, j]: j comes before i in its prompt
    # The parent: the prompt's eligible row with the highest window entropy (the first on ties).
    beaten = (
        same
        & eligible[None, :]
        & ((window[None, :] > window[:, None]) | ((window[None, :] == window[:, None]) & before))
    )
    parent = eligible & ~jnp.any(beaten, axis=1)
    # The child: the prompt's first spare row, when the prompt has a parent.
    spare = held & ~state.active
    first_spare = spare & ~jnp.any(same & spare[None, :] & before, axis=1)
    parents_of = same & parent[None, :]  # [j, i]: i is the parent in j's prompt
    is_child = first_spare & jnp.any(parents_of, axis=1)
    return is_child, jnp.argmax(parents_of, axis=1)


def _local_need(state: _State, tau, ps: int, sp: S.SamplingParams) -> jax.Array:
    """[1] pages a shard's next step takes: one per live row starting a page, one per fork (the
    copy of its parent's partial page, or its first page of its own)."""
    need = jnp.sum(_page_need(state, ps))
    if _branching(sp):
        need += jnp.sum(_fork_choice(state, sp, tau)[0])
    return need[None].astype(jnp.int32)


def _local_fork(state: _State, tau, ps: int, sp: S.SamplingParams) -> _State:
    """A shard's forks (`_fork_choice`): each child takes its parent's generated positions and
    state, shares its full pages and gets a copy of its partial page; it keeps its own key."""
    is_child, src = _fork_choice(state, sp, tau)

    def fork(state: _State) -> _State:
        b, width = state.table.shape
        pool = state.refs.shape[0]
        take = lambda x: jnp.take(x, src, axis=0)  # noqa: E731
        length = take(state.length)
        full = length // ps
        partial = is_child & (length % ps > 0)
        offset = jnp.cumsum(partial) - partial
        new = _take_pages(state.free, state.n_free, offset)
        j = jnp.arange(width)[None, :]
        parent_table = take(state.table)
        table = jnp.where(
            j < full[:, None], parent_table, jnp.where(j == full[:, None], new[:, None], 0)
        )
        shared = is_child[:, None] & (j < full[:, None])
        refs = state.refs.at[jnp.where(shared, parent_table, pool)].add(1, mode="drop")
        refs = refs.at[jnp.where(partial, new, pool)].set(1, mode="drop")
        old = jnp.take_along_axis(parent_table, jnp.minimum(full, width - 1)[:, None], 1)[:, 0]
        dst = jnp.where(partial, new, pool)
        copy = lambda pages: pages.at[:, dst].set(pages[:, old], mode="drop")  # noqa: E731
        s = state.gen - 1
        pick = lambda new, old: jnp.where(  # noqa: E731
            is_child.reshape((b,) + (1,) * (old.ndim - 1)), new, old
        )
        is_parent = jnp.zeros((b,), bool).at[jnp.where(is_child, src, b)].set(True, mode="drop")
        return state._replace(
            k_pages=tuple(copy(p) for p in state.k_pages),
            v_pages=tuple(copy(p) for p in state.v_pages),
            refs=refs,
            n_free=state.n_free - jnp.sum(partial),
            table=pick(table, state.table),
            length=pick(length, state.length),
            gen=pick(take(state.gen), state.gen),
            next_pos=pick(take(state.next_pos), state.next_pos),
            last=pick(take(state.last), state.last),
            done=pick(False, state.done),
            reason=pick(S.LENGTH, state.reason),
            active=state.active | is_child,
            parent=pick(take(state.row), state.parent),
            fork_step=pick(take(s), state.fork_step),
            last_fork=jnp.where(is_child, take(s), jnp.where(is_parent, s, state.last_fork)),
            out=S.Draw(*[pick(take(x), x) for x in state.out]),
        )

    return jax.lax.cond(jnp.any(is_child), fork, lambda x: x, state)


def _local_allocate(state: _State, ps: int) -> _State:
    """A page from the shard's free stack for each live row starting a new page."""
    need = _page_need(state, ps)
    offset = jnp.cumsum(need) - need
    page = _take_pages(state.free, state.n_free, offset)
    rows = jnp.arange(state.row.shape[0])
    col = jnp.where(need, state.length // ps, state.table.shape[1])
    return state._replace(
        table=state.table.at[rows, col].set(page, mode="drop"),
        refs=state.refs.at[jnp.where(need, page, state.refs.shape[0])].set(1, mode="drop"),
        n_free=state.n_free - jnp.sum(need),
    )


def _local_advance(state: _State, d: S.Draw, stop_ids, t: int) -> _State:
    """A shard's rows after one decode step that drew `d`."""
    live = _live(state)
    rows = jnp.arange(state.row.shape[0])
    gcol = jnp.where(live, state.gen, t)
    out = S.Draw(
        *[buf.at[rows, gcol].set(x, mode="drop") for buf, x in zip(state.out, d, strict=True)]
    )
    stopped = jnp.isin(d.tokens, stop_ids) & live
    at_end = (state.gen + 1 >= t) & live & ~stopped
    step = live.astype(jnp.int32)
    return state._replace(
        length=state.length + step,
        gen=state.gen + step,
        next_pos=state.next_pos + step,
        last=jnp.where(live, d.tokens, state.last),
        done=state.done | stopped | at_end,
        reason=jnp.where(stopped, S.STOP, jnp.where(at_end, S.LENGTH, state.reason)),
        out=out,
    )


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=(2,))
def _decode_chunk(graphdef, params, state: _State, sp: S.SamplingParams, pl: _Plan, tau=np.inf):
    """Up to `chunk_steps` decode steps for every live slot, each after the forks of the position
    generated last (with branching, `tau` its threshold); leaves early when every row has
    stopped or a shard's pool cannot give the step its pages (`_local_need`)."""
    model = nnx.merge(graphdef, params)
    bias = S.logit_bias(sp, model.cfg.text.vocab_size)
    ps, t = pl.ep.page_size, sp.max_new_tokens
    stop_ids = jnp.asarray(sp.stop_token_ids, jnp.int32)
    tau = jnp.asarray(tau, jnp.float32)
    dims = _state_dims(model.cfg.text.num_hidden_layers)
    draw_dims = S.Draw(*[_ROWS] * len(S.Draw._fields))
    allocate = _local(functools.partial(_local_allocate, ps=ps), pl, (dims,), dims)
    advance = _local(
        functools.partial(_local_advance, stop_ids=stop_ids, t=t), pl, (dims, draw_dims), dims
    )
    need = _local(functools.partial(_local_need, ps=ps, sp=sp), pl, (dims, ()), _ROWS)
    fork = _local(functools.partial(_local_fork, ps=ps, sp=sp), pl, (dims, ()), dims)

    def cond(carry):
        i, state = carry
        return (
            (i < pl.ep.chunk_steps)
            & jnp.any(_live(state))
            & jnp.all(need(state, tau) <= state.n_free)
        )

    def body(carry):
        i, state = carry
        if _branching(sp):
            state = fork(state, tau)
        state = allocate(state)
        hidden, k_pages, v_pages = model.paged_decode_step(
            state.last,
            state.next_pos,
            state.k_pages,
            state.v_pages,
            state.table,
            state.length,
            _live(state),
            pl.partition,
        )
        d = S.draw(model, hidden, state.keys, state.gen, sp, bias)
        state = advance(state._replace(k_pages=k_pages, v_pages=v_pages), d)
        return i + 1, _constrain(state, pl)

    _, state = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state))
    return _constrain(state, pl)


def _local_release(state: _State, release: jax.Array, ps: int) -> _State:
    """Frees the shard's slots where `release` [b] is True and the pages only they held."""
    pool = state.refs.shape[0]
    held = jnp.arange(state.table.shape[1])[None, :] < ((state.length + ps - 1) // ps)[:, None]
    drop = release[:, None] & held
    refs = state.refs.at[jnp.where(drop, state.table, pool)].add(-1, mode="drop")
    emptied = (state.refs > 0) & (refs == 0)
    pos = state.n_free[0] + jnp.cumsum(emptied) - emptied
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


def _local_collect(state: _State, slots: jax.Array, release: jax.Array, ps: int):
    take = lambda x: jnp.take(x, slots, axis=0)  # noqa: E731
    out = (
        S.Draw(*[take(x) for x in state.out]),
        take(state.gen),
        take(state.reason),
        take(state.parent),
        take(state.fork_step),
    )
    return _local_release(state, release, ps), out


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def _collect(state: _State, slots: jax.Array, release: jax.Array, pl: _Plan):
    """Each shard's outputs of its `slots` [S*k] (finished rows, indices within the shard), then
    those and the `release` [S*b] slots freed.

    Returns (state, (outputs [S*k, T] per field, lengths, stop reasons, parents, fork steps,
    free pages [S])): one fetch for the host.
    """
    dims = _state_dims(len(state.k_pages))
    out_dims = (S.Draw(*[_ROWS2] * len(S.Draw._fields)), _ROWS, _ROWS, _ROWS, _ROWS)
    state, out = _local(
        functools.partial(_local_collect, ps=pl.ep.page_size),
        pl,
        (dims, _ROWS, _ROWS),
        (dims, out_dims),
    )(state, slots, release)
    return _constrain(state, pl), (*out, state.n_free)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _summary(state: _State, sp: S.SamplingParams, pl: _Plan, tau):
    """What the host reads between chunks: per slot its row, whether it has stopped, whether it
    is active, positions generated; per shard the pages the next step takes and those free."""
    dims = _state_dims(len(state.k_pages))
    need = _local(functools.partial(_local_need, ps=pl.ep.page_size, sp=sp), pl, (dims, ()), _ROWS)
    return state.row, state.done, state.active, state.gen, need(state, tau), state.n_free


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
    images_of=None,
    branch_threshold: float | None = None,
) -> S.GenerateOutput:
    """`sampler.generate` by continuous batching over a paged cache (module docstring).

    Args:
      graphdef, params: the model (`nnx.split`).
      inputs: B prompts, left-padded to one length, with their images (NumPy or device arrays).
      sampling: `SamplingParams`.
      key: a PRNG key: row (prompt b, sample j) draws with `sampler.row_keys(key, b, j)`, as the
        static loop does, so both give the same tokens for the same key.
      engine: `EngineParams`.
      first_prompt: the index of the first prompt in the caller's numbering (`sampler.generate`).
      mesh: run under this mesh (`jax.set_mesh`): slots and page pools split over the batch
        axes (`plan`), the prompts of each admission prefilled where their rows decode.
      images_of: for prompts with images, a function of a list of prompt indices returning
        (image_index [len, T], VisionInputs) of those prompts alone (`batching.sampler_inputs`
        of the subset): each admission then runs the vision tower on its own prompts' images,
        and no feature of a prompt waiting in the queue is held on device. Without it, the
        features of all of `inputs.vision` are computed once up front.
      branch_threshold: tau of the branching rule (required when branching is enabled).

    Returns:
      GenerateOutput of NumPy arrays, B * rows_per_prompt rows, prompt by prompt.
    """
    args = (graphdef, params, inputs, sampling, key, engine, first_prompt, mesh, images_of)
    if mesh is not None:
        with jax.set_mesh(mesh):
            return _run(*args, branch_threshold)
    return _run(*args, branch_threshold)


def _run(graphdef, params, inputs, sampling, key, engine, first_prompt, mesh, images_of, tau):
    sp, ep = sampling, engine
    branching, r = _branching(sp), sp.rows_per_prompt
    if branching and tau is None:
        raise ValueError("generate_paged: branching is enabled but branch_threshold (tau) is None.")
    if ep.slots < r:
        raise ValueError(
            f"generate_paged: slots={ep.slots} < {r} rows per prompt (n plus the branching "
            "budget): a prompt's rows start together."
        )
    inputs = jax.tree.map(np.asarray, inputs)
    n_prompts, prompt_len = inputs.input_ids.shape
    cfg = nnx.merge(graphdef, params).cfg.text
    pl = plan(ep, sp, prompt_len, cfg.num_key_value_heads, mesh)
    if mesh is None:
        place = lambda x, dims=None: jnp.asarray(x)  # noqa: E731
    else:  # per-shard arrays split over the batch axes; the rest whole on every device

        def place(x, dims=()):
            spec = pl.partition.spec(*dims, *[None] * (np.ndim(x) - len(dims)))
            return multihost.put(x, jax.sharding.NamedSharding(mesh, spec))

    t, n, ps = sp.max_new_tokens, sp.n, ep.page_size
    ns, b, pool = pl.shards, pl.slots, pl.pages
    plen = inputs.attention_mask.sum(1).astype(np.int64)
    need_pages = plen // ps + n * (plen % ps > 0)
    if (need_pages + n > pool).any():
        worst = int(np.argmax(need_pages))
        raise ValueError(
            f"generate_paged: prompt {worst} ({plen[worst]} tokens, n={n}) needs "
            f"{need_pages[worst] + n} pages of {ps} tokens to start; a shard's pool holds {pool} "
            f"(EngineParams.num_pages over {ns} shards)."
        )
    features = None
    if inputs.vision is not None and images_of is None:
        features = _image_features(graphdef, params, jax.tree.map(place, inputs.vision))
    state = _init(graphdef, params, pl, sp)
    key = place(np.asarray(key))
    tau = place(np.float32(np.inf if tau is None else tau))

    n_rows = n_prompts * r
    host = S.Draw(
        *[
            np.full((n_rows, t), f, np.int32 if isinstance(f, int) else np.float32)
            for f in _fills(sp)
        ]
    )
    lengths = np.zeros((n_rows,), np.int32)
    sample_row = np.arange(n_rows) % r < n
    reason = np.where(sample_row, S.LENGTH, S.INACTIVE).astype(np.int32)
    active = sample_row.copy()
    parent = np.full((n_rows,), -1, np.int32)
    fork_step = np.full((n_rows,), -1, np.int32)
    # Queue entries: (prompt, its rows to start). With branching a prompt's rows, spare ones
    # included, always start (and are preempted) together, so that they run in step.
    queue = collections.deque((p, list(range(r))) for p in range(n_prompts))
    preempted = 0
    while True:
        row, done, act, gen, need, n_free = multihost.fetch(_summary(state, sp, pl, tau))
        n_free = n_free.astype(np.int64)
        held = row >= 0
        ended = held & act & done
        live = held & act & ~done
        release = ended.copy()
        if branching:  # spare slots of prompts with no live row left: no branch can come
            prompt_of = np.where(held, row // r, -1)
            release |= held & ~act & ~np.isin(prompt_of, prompt_of[live])
        # A shard whose pool cannot give the next step its pages, and that has no finished row
        # to free, evicts its live row with the fewest generated tokens (with branching, that
        # row's prompt).
        for s in np.flatnonzero((need > n_free) & ~ended.reshape(ns, b).any(1)):
            local = np.flatnonzero(live.reshape(ns, b)[s])
            victim = s * b + int(local[np.argmin(gen.reshape(ns, b)[s][local])])
            p, j = divmod(int(row[victim]), r)
            if branching:
                evict = held & (row // r == p)
                queue.appendleft((p, list(range(r))))
            else:
                evict = np.arange(ns * b) == victim
                queue.appendleft((p, [j]))
            release |= evict
            live &= ~evict
            preempted += 1
            if not live.reshape(ns, b)[s].any():
                raise RuntimeError(
                    f"generate_paged: prompt {p}'s rows alone outgrow a shard's pool of {pool} "
                    f"pages of {ps} tokens (prompt {plen[p]} + up to {t} tokens per row); raise "
                    f"EngineParams.num_pages (split over {ns} shards)."
                )
        if release.any():
            counts = ended.reshape(ns, b).sum(1)
            k = _bucket(int(counts.max()), b) if counts.max() else 1
            idx = np.zeros((ns, k), np.int32)
            for s in range(ns):
                idx[s, : counts[s]] = np.flatnonzero(ended.reshape(ns, b)[s])
            state, got = _collect(
                state, place(idx.reshape(-1), ("rows",)), place(release, ("rows",)), pl
            )
            out, g, why, par, fst, n_free = multihost.fetch(got)
            n_free = n_free.astype(np.int64)
            for s in np.flatnonzero(counts):
                rows = row[s * b + idx[s, : counts[s]]]
                src = s * k + np.arange(counts[s])
                for dst, o in zip(host, out, strict=True):
                    dst[rows] = o[src]
                lengths[rows], reason[rows] = g[src], why[src]
                parent[rows], fork_step[rows], active[rows] = par[src], fst[src], True
            row = np.where(release, -1, row)
        # Admission: whole queue entries, in order, each into the shard with the most free pages
        # among those whose slots and pages (one page of growth per running row kept in reserve)
        # allow; at most prefill_prompts per shard and call.
        free_slots = [list(np.flatnonzero(row.reshape(ns, b)[s] < 0)) for s in range(ns)]
        running = live.reshape(ns, b).sum(1)
        chosen = [[] for _ in range(ns)]
        while queue:
            p, samples = queue[0]
            starting = sum(j < n for j in samples)
            pages = int(plen[p] // ps + starting * (plen[p] % ps > 0))
            fits = [
                s
                for s in range(ns)
                if len(chosen[s]) < ep.prefill_prompts
                and len(samples) <= len(free_slots[s])
                and pages + running[s] + starting <= n_free[s]
            ]
            if not fits:
                break
            s = max(fits, key=lambda s: n_free[s])
            queue.popleft()
            chosen[s].append((p, samples, [free_slots[s].pop(0) for _ in samples]))
            n_free[s] -= pages
            running[s] += starting
        if any(chosen):
            state = _admit_prompts(
                graphdef,
                params,
                state,
                inputs,
                features,
                images_of,
                chosen,
                sp,
                pl,
                key,
                first_prompt,
                place,
            )
        elif not running.any():
            if not queue:
                break
            raise RuntimeError(
                f"generate_paged: {len(queue)} prompts wait but none fits an empty pool of "
                f"{pool} pages (EngineParams.num_pages over {ns} shards)."
            )
        state = _decode_chunk(graphdef, params, state, sp, pl, tau)
    if preempted:
        log.info(
            "generate_paged: %d rows preempted and regenerated (pools of %d pages)", preempted, pool
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
        prompt_index=np.repeat(np.arange(n_prompts), r).astype(np.int32),
        active=active,
        parent=parent,
        fork_step=fork_step,
    )


def _admit_prompts(
    graphdef, params, state, inputs, features, images_of, chosen, sp, pl, key, first, place
):
    """One `_admit` call for `chosen[s]` [(prompt, samples, slots)] per shard, padded to static
    sizes (prefill_prompts prompts and prefill_prompts * R requests per shard)."""
    pp, r, b, ns = pl.ep.prefill_prompts, sp.rows_per_prompt, pl.slots, pl.shards
    any_prompt = next(c for c in chosen if c)[0][0]
    which = []
    a = pp * r
    local = np.zeros((ns * a,), np.int32)
    prompt = np.zeros((ns * a,), np.int32)
    sample = np.zeros((ns * a,), np.int32)
    slot = np.full((ns * a,), b, np.int32)
    row = np.zeros((ns * a,), np.int32)
    for s in range(ns):
        which += [p for p, _, _ in chosen[s]] + [any_prompt] * (pp - len(chosen[s]))
        i = s * a
        for q, (p, samples, slots) in enumerate(chosen[s]):
            for j, slot_ in zip(samples, slots, strict=True):
                local[i], prompt[i], sample[i], slot[i] = q, first + p, j, slot_
                row[i] = p * r + j
                i += 1
    index = None if inputs.image_index is None else inputs.image_index[which]
    vision = None
    if images_of is not None and inputs.image_index is not None:
        index, vision = images_of(which)
        vision = jax.tree.map(place, vision)  # the admitted prompts' images, whole everywhere
    sub = ModelInputs(
        input_ids=place(inputs.input_ids[which], ("rows",)),
        attention_mask=place(inputs.attention_mask[which], ("rows",)),
        position_ids=place(inputs.position_ids[:, which], (None, "rows")),
        image_index=None if index is None else place(index, ("rows",)),
        vision=vision,
    )
    req = _Requests(*[place(x, ("rows",)) for x in (local, prompt, sample, slot, row)])
    return _admit(graphdef, params, state, sub, features, req, sp, pl, key)
