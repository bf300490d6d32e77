"""Batched generation on device: shared-prefix groups, exact entropies, optional branching.

`generate` runs two jitted functions. The first prefills each prompt once (vision tower
included) and repeats its KV cache to the prompt's rows. The second is a `lax.while_loop` over
decode steps, on the donated cache, that stops early once every row has finished: no host round
trip per token. Shapes are static: prompts are padded to a length bucket by the caller and
`max_new_tokens` is fixed.

Rows. Prompt b owns rows b*R .. b*R+R-1, where R = n + branching.budget. The first n rows are
its samples; the other `budget` rows start inactive and are only filled by branching.

Per generated position the sampler records:
  * the token;
  * its log-prob and the entropy of the model's full distribution at the rollout temperature
    (what the learner recomputes; see logits.py);
  * its log-prob under the truncated distribution actually sampled from.
It also records why each row stopped.

Branching ("when to explore", METHOD.md 4.3; the paper leaves the rule open, the released code
has none; off by default). After a row writes position s, its window entropy is the mean entropy
of its last w generated positions, s-w+1 .. s. A row may fork when all of these hold:
  * the window entropy is >= tau, the HWE threshold passed in as `branch_threshold`;
  * the row is active and has not stopped;
  * s + 1 < max_new_tokens;
  * it has not forked, or been forked, in the last `cooldown` steps;
  * its prompt still has an inactive spare row.
Each step, each prompt forks at most once: its eligible row with the highest window entropy is
copied into its first inactive spare row. The copy takes the KV cache and every recorded position
0..s, so the branch shares its parent's prefix exactly. From position s+1 on the two rows sample
independently: the branch explores another continuation right after the uncertain segment. A
branch can fork again. At most `budget` branches per prompt; they join the prompt's group, and
unused spare rows come back with `active` False.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl.model import KVCache, ModelInputs
from ares_jax.parallel import multihost
from ares_jax.parallel import rules as R
from ares_jax.sampling import logits as L

STOP, LENGTH, INACTIVE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class BranchingParams:
    """Entropy-triggered forking (module docstring). Off unless `enabled` and `budget` > 0."""

    enabled: bool = False
    budget: int = 0  # spare rows per prompt that forks may fill
    window: int = 4  # w: positions averaged into the window entropy
    cooldown: int = 4  # steps a row waits after a fork before it may fork again

    def __post_init__(self):
        if self.budget < 0 or self.window < 1 or self.cooldown < 0:
            raise ValueError(
                f"BranchingParams: budget >= 0, window >= 1 and cooldown >= 0 required, got "
                f"budget={self.budget}, window={self.window}, cooldown={self.cooldown}."
            )

    @property
    def spare_rows(self) -> int:
        return self.budget if self.enabled else 0


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. Hashable: it is a static argument of the jitted loop."""

    n: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # e.g. ((image_token_id, -100.0),)
    vocab_limit: int | None = None  # ids >= this are never sampled (padded embedding rows)
    # > 0: also estimate each position's entropy from its top-k log-probs, as the released code
    # does from its inference engine (ops.entropy.topk_entropy; METHOD.md 2.1).
    topk_entropy: int = 0
    branching: BranchingParams = BranchingParams()

    def __post_init__(self):
        problems = []
        if self.n < 1:
            problems.append(f"n={self.n} must be >= 1")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0")
        if self.topk_entropy < 0:
            problems.append(f"topk_entropy={self.topk_entropy} must be >= 0")
        if problems:
            raise ValueError("SamplingParams: " + "; ".join(problems) + ".")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def rows_per_prompt(self) -> int:
        return self.n + self.branching.spare_rows


class GenerateOutput(NamedTuple):
    """Generated rows (N = prompts x rows_per_prompt, T = max_new_tokens)."""

    tokens: np.ndarray  # [N, T] int32, pad_token_id after the end
    logp: np.ndarray  # [N, T] float32: log-prob under softmax(z / T), 0 past the end
    sampling_logp: np.ndarray  # [N, T] float32: log-prob under the truncated distribution
    entropy: np.ndarray  # [N, T] float32 nats: entropy of softmax(z / T), 0 past the end
    argmax_tokens: np.ndarray  # [N, T] int32: the most likely token at each position
    topk_entropy_tail: np.ndarray  # [N, T] top-k estimate with the tail bucket (0 if off)
    topk_entropy_raw: np.ndarray  # [N, T] top-k estimate without it (0 if off)
    mask: np.ndarray  # [N, T] bool: generated positions
    lengths: np.ndarray  # [N] int32 generated tokens, the stop token included
    stop_reason: np.ndarray  # [N] int32: STOP, LENGTH or INACTIVE (an unused spare row)
    prompt_index: np.ndarray  # [N] int32
    active: np.ndarray  # [N] bool: False for spare rows no branch filled
    parent: np.ndarray  # [N] int32: row a branch was forked from, -1 otherwise
    fork_step: np.ndarray  # [N] int32: last position shared with the parent, -1 otherwise


class _Loop(NamedTuple):
    step: jax.Array  # int32: the position being generated
    cache: KVCache
    tokens: jax.Array
    logp: jax.Array
    slogp: jax.Array
    entropy: jax.Array
    argmax: jax.Array
    topk_tail: jax.Array
    topk_raw: jax.Array
    done: jax.Array  # [N] bool: stopped, or not active
    reason: jax.Array
    lengths: jax.Array
    active: jax.Array
    parent: jax.Array
    fork_step: jax.Array
    last_fork: jax.Array
    keys: jax.Array  # [N] row keys (`row_keys`)


# ---------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------


def logit_bias(sp: SamplingParams, vocab: int) -> jax.Array | None:
    """[V] additive bias of the sampled distribution (logit_bias, vocab_limit), or None."""
    if not sp.logit_bias and (sp.vocab_limit is None or sp.vocab_limit >= vocab):
        return None
    bias = np.zeros((vocab,), np.float32)
    for token, value in sp.logit_bias:
        bias[token] += value
    if sp.vocab_limit is not None:
        bias[sp.vocab_limit :] = -np.inf
    return jnp.asarray(bias)


def _repeat_rows(x: jax.Array, r: int) -> jax.Array:
    return jnp.repeat(x, r, axis=0)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _prefill(graphdef, params, inputs: ModelInputs, sp: SamplingParams, cache_len: int):
    """Prefill each prompt once, then repeat its cache and last hidden state to its rows."""
    model = nnx.merge(graphdef, params)
    b = inputs.input_ids.shape[0]
    cache = model.init_cache(b, cache_len)
    hidden, cache = model.prefill(inputs, cache)
    r = sp.rows_per_prompt
    cache = KVCache(
        k=tuple(_repeat_rows(k, r) for k in cache.k),
        v=tuple(_repeat_rows(v, r) for v in cache.v),
        valid=_repeat_rows(cache.valid, r),
        index=cache.index,
        next_pos=_repeat_rows(cache.next_pos, r),
    )
    return cache, _repeat_rows(hidden[:, -1], r)


class Draw(NamedTuple):
    """One sampled position per row and its statistics (all [N])."""

    tokens: jax.Array
    logp: jax.Array  # under softmax(z / T), the learner's distribution
    slogp: jax.Array  # under the truncated distribution sampled from
    entropy: jax.Array
    argmax: jax.Array
    topk_tail: jax.Array
    topk_raw: jax.Array


def row_keys(key: jax.Array, prompt: jax.Array, sample: jax.Array) -> jax.Array:
    """[N] base keys of rows (prompt, sample): a row's draws depend on nothing else.

    The key of position s is `fold_in(row key, s)` (`draw`), so a row's tokens are the same
    whichever batch, slot or step it runs in: the static loop and the continuous-batching engine
    (engine.py) sample the same tokens from the same logits.
    """
    fold = lambda p, s: jax.random.fold_in(jax.random.fold_in(key, p), s)  # noqa: E731
    return jax.vmap(fold)(prompt, sample)


def draw(model, hidden, keys, positions, sp: SamplingParams, bias) -> Draw:
    """Samples one position per row from its last hidden state [N, D].

    keys: [N] row keys (`row_keys`); positions: [N] int32, the generated position each row samples.
    """
    z = model.logits(R.constrain(hidden, (R.BATCH, R.EMBED)))  # [N, V] float32
    step_keys = jax.vmap(jax.random.fold_in)(keys, positions)
    zs = L.sampling_logits(z, temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, bias=bias)
    tokens, slogp = L.sample(step_keys, zs, greedy=sp.greedy)  # a key per row
    logp, entropy = L.token_stats(z, tokens, sp.temperature)
    argmax = L.argmax(z)
    topk_tail = topk_raw = jnp.zeros_like(entropy)
    if sp.topk_entropy:
        topk_tail, topk_raw = L.topk_entropies(z, sp.topk_entropy, sp.temperature, tokens=tokens)
    return Draw(tokens, logp, slogp, entropy, argmax, topk_tail, topk_raw)


def _sample_step(model, hidden, state: _Loop, sp: SamplingParams, bias):
    """Samples position `state.step` for every row from its last hidden state [N, D]."""
    s = state.step
    d = draw(model, hidden, state.keys, jnp.full(hidden.shape[:1], s, jnp.int32), sp, bias)
    live = ~state.done
    put = lambda buf, x, fill: buf.at[:, s].set(jnp.where(live, x, fill))  # noqa: E731
    stopped = jnp.isin(d.tokens, jnp.asarray(sp.stop_token_ids, jnp.int32)) & live
    at_end = (s + 1 >= sp.max_new_tokens) & live & ~stopped
    reason = jnp.where(stopped, STOP, jnp.where(at_end, LENGTH, state.reason))
    return state._replace(
        tokens=put(state.tokens, d.tokens, sp.pad_token_id),
        logp=put(state.logp, d.logp, 0.0),
        slogp=put(state.slogp, d.slogp, 0.0),
        entropy=put(state.entropy, d.entropy, 0.0),
        argmax=put(state.argmax, d.argmax, sp.pad_token_id),
        topk_tail=put(state.topk_tail, d.topk_tail, 0.0),
        topk_raw=put(state.topk_raw, d.topk_raw, 0.0),
        lengths=state.lengths + live.astype(jnp.int32),
        done=state.done | stopped | at_end,
        reason=reason,
    )


def _branch(state: _Loop, sp: SamplingParams, tau) -> _Loop:
    """Forks at most one row per prompt into a spare row (module docstring)."""
    bp = sp.branching
    r = sp.rows_per_prompt
    n_rows, t = state.tokens.shape
    s = state.step
    cols = s - jnp.arange(bp.window)
    window = jnp.mean(jnp.take(state.entropy, jnp.maximum(cols, 0), axis=1), axis=1)
    eligible = (
        state.active
        & ~state.done
        & (s + 1 >= bp.window)
        & (s + 1 < sp.max_new_tokens)
        & (s - state.last_fork >= bp.cooldown)
        & (window >= tau)
    )
    score = jnp.where(eligible, window, -jnp.inf).reshape(-1, r)
    parent_local = jnp.argmax(score, axis=1)  # [B]
    spare = ~state.active.reshape(-1, r)
    child_local = jnp.argmax(spare, axis=1)
    fork = jnp.any(eligible.reshape(-1, r), axis=1) & jnp.any(spare, axis=1)  # [B]
    base = jnp.arange(fork.shape[0]) * r
    parent_row, child_row = base + parent_local, base + child_local
    src = jnp.arange(n_rows)
    src = src.at[jnp.where(fork, child_row, n_rows)].set(parent_row, mode="drop")
    is_child = (
        jnp.zeros((n_rows,), bool).at[jnp.where(fork, child_row, n_rows)].set(True, mode="drop")
    )
    is_parent = (
        jnp.zeros((n_rows,), bool).at[jnp.where(fork, parent_row, n_rows)].set(True, mode="drop")
    )

    def copy(state: _Loop) -> _Loop:
        take = lambda x: jnp.take(x, src, axis=0)  # noqa: E731
        cache = state.cache
        return state._replace(
            cache=KVCache(
                k=tuple(take(k) for k in cache.k),
                v=tuple(take(v) for v in cache.v),
                valid=take(cache.valid),
                index=cache.index,
                next_pos=take(cache.next_pos),
            ),
            tokens=take(state.tokens),
            logp=take(state.logp),
            slogp=take(state.slogp),
            entropy=take(state.entropy),
            argmax=take(state.argmax),
            topk_tail=take(state.topk_tail),
            topk_raw=take(state.topk_raw),
            lengths=take(state.lengths),
            done=jnp.where(is_child, False, state.done),
            reason=jnp.where(is_child, LENGTH, state.reason),
            active=state.active | is_child,
            parent=jnp.where(is_child, src, state.parent),
            fork_step=jnp.where(is_child, s, state.fork_step),
            last_fork=jnp.where(is_child | is_parent, s, state.last_fork),
        )

    return jax.lax.cond(jnp.any(fork), copy, lambda x: x, state)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def _decode(graphdef, params, cache: KVCache, hidden, sp: SamplingParams, key, tau, first_prompt=0):
    """Samples position 0 from the prefill's hidden state, then loops over decode steps."""
    model = nnx.merge(graphdef, params)
    bias = logit_bias(sp, model.cfg.text.vocab_size)
    n_rows, t = hidden.shape[0], sp.max_new_tokens
    r = sp.rows_per_prompt
    active = jnp.tile(jnp.arange(r) < sp.n, n_rows // r)
    zeros_f = jnp.zeros((n_rows, t), jnp.float32)
    state = _Loop(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        tokens=jnp.full((n_rows, t), sp.pad_token_id, jnp.int32),
        logp=zeros_f,
        slogp=zeros_f,
        entropy=zeros_f,
        argmax=jnp.full((n_rows, t), sp.pad_token_id, jnp.int32),
        topk_tail=zeros_f,
        topk_raw=zeros_f,
        done=~active,
        reason=jnp.where(active, LENGTH, INACTIVE).astype(jnp.int32),
        lengths=jnp.zeros((n_rows,), jnp.int32),
        active=active,
        parent=jnp.full((n_rows,), -1, jnp.int32),
        fork_step=jnp.full((n_rows,), -1, jnp.int32),
        last_fork=jnp.full((n_rows,), -(10**6), jnp.int32),
        keys=row_keys(key, first_prompt + jnp.arange(n_rows) // r, jnp.arange(n_rows) % r),
    )
    branching = sp.branching.enabled and sp.branching.budget > 0

    def after_sampling(state):
        if branching:
            state = _branch(state, sp, tau)
        return state._replace(step=state.step + 1)

    state = after_sampling(_sample_step(model, hidden, state, sp, bias))

    def cond(state):
        return (state.step < t) & jnp.any(~state.done)

    def body(state):
        prev = jnp.take(state.tokens, state.step - 1, axis=1)
        prev = jnp.where(state.done, sp.pad_token_id, prev)
        h, cache = model.decode_step(prev, state.cache)
        state = _sample_step(model, h, state._replace(cache=cache), sp, bias)
        return after_sampling(state)

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------------------------------------
# Host entry point
# ---------------------------------------------------------------------------------------------


def generate(
    model_or_graphdef,
    params=None,
    *,
    inputs: ModelInputs,
    sampling: SamplingParams,
    key: jax.Array,
    branch_threshold: float | jax.Array | None = None,
    mesh=None,
    cache_len: int | None = None,
    engine=None,
    first_prompt: int = 0,
    images_of=None,
) -> GenerateOutput:
    """Samples `sampling.n` continuations of each prompt (plus branches, if enabled).

    Args:
      model_or_graphdef: a `Qwen2_5_VL` model, or its graphdef with `params`.
      params: the parameters, when a graphdef is given (the policy's, on their mesh).
      inputs: B prompts, left-padded to one length (`ModelInputs`, NumPy or device arrays),
        with their images.
      sampling: `SamplingParams`.
      key: a PRNG key. Row j of prompt b draws position s with
        `fold_in(row_keys(key, first_prompt + b, j), s)`: the same key gives the same tokens,
        whichever batch or engine a row runs in.
      branch_threshold: tau of the branching rule (required when branching is enabled).
      mesh: shard the rows over this mesh (batch axes of `ares_jax.parallel.rules`). With
        several processes the mesh spans them all, every process passes the same `inputs` and
        `key`, and every process gets the whole output.
      cache_len: KV cache slots (default: prompt length + max_new_tokens). Passing the largest
        prompt bucket + max_new_tokens keeps the decode loop's shapes, and so its compilation,
        the same for every prompt bucket; only the prefill compiles per bucket.
      first_prompt: the index of the first prompt in the caller's numbering (the key of its rows):
        a batch generated in several calls gives the tokens of one call.
      engine: `engine.EngineParams`: generate by continuous batching over a paged KV cache
        (engine.py) instead of this static loop; the same tokens, and the same forks, for the
        same key.
      images_of: with `engine`, the images of a subset of the prompts (`engine.generate_paged`):
        each admission encodes its own prompts' images only.

    Returns:
      GenerateOutput of NumPy arrays, B * rows_per_prompt rows, prompt by prompt.
    """
    if params is None:
        graphdef, params = nnx.split(model_or_graphdef)
    else:
        graphdef = model_or_graphdef
    branching = sampling.branching.enabled and sampling.branching.budget > 0
    if branching and branch_threshold is None:
        raise ValueError("generate: branching is enabled but branch_threshold (tau) is None.")
    if engine is not None:
        from ares_jax.sampling.engine import generate_paged

        return generate_paged(
            graphdef,
            params,
            inputs=inputs,
            sampling=sampling,
            key=key,
            engine=engine,
            mesh=mesh,
            first_prompt=first_prompt,
            images_of=images_of,
            branch_threshold=branch_threshold,
        )
    tau = jnp.asarray(np.inf if branch_threshold is None else branch_threshold, jnp.float32)
    b, prompt_len = np.shape(inputs.input_ids)
    needed = prompt_len + sampling.max_new_tokens
    if cache_len is None:
        cache_len = needed
    elif cache_len < needed:
        raise ValueError(f"generate: cache_len={cache_len} < prompt length + max_new_tokens.")
    if mesh is None:
        inputs = jax.tree.map(jnp.asarray, inputs)
    else:  # host inputs, the same on every process, become global arrays (rows over `batch`)
        axes = model_inputs.logical_axes(inputs)
        inputs, key, tau = multihost.put(
            (inputs, key, tau),
            (R.tree_shardings(mesh, axes, inputs), *[multihost.replicated(mesh)] * 2),
        )
    context = jax.set_mesh(mesh) if mesh is not None else _null_context()
    with context:
        cache, hidden = _prefill(graphdef, params, inputs, sampling, cache_len)
        first = jnp.asarray(first_prompt, jnp.int32)
        state = _decode(graphdef, params, cache, hidden, sampling, key, tau, first)
    # Rows may live on other processes' devices: every process fetches the whole batch.
    tokens, logp, slogp, entropy, lengths, reason = multihost.fetch(
        (state.tokens, state.logp, state.slogp, state.entropy, state.lengths, state.reason)
    )
    active, parent, fork_step, argmax, topk_tail, topk_raw = multihost.fetch(
        (
            state.active,
            state.parent,
            state.fork_step,
            state.argmax,
            state.topk_tail,
            state.topk_raw,
        )
    )
    t = sampling.max_new_tokens
    mask = np.arange(t)[None, :] < lengths[:, None]
    return GenerateOutput(
        tokens=tokens,
        logp=logp,
        sampling_logp=slogp,
        entropy=entropy,
        argmax_tokens=argmax,
        topk_entropy_tail=topk_tail,
        topk_entropy_raw=topk_raw,
        mask=mask,
        lengths=lengths,
        stop_reason=reason,
        prompt_index=np.repeat(np.arange(b), sampling.rows_per_prompt).astype(np.int32),
        active=active,
        parent=parent,
        fork_step=fork_step,
    )


class _null_context:  # noqa: N801
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
