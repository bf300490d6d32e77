"""Self-attention over packed rows with segment ids, never holding [S, S] scores in memory.

One function, `attention(q, k, v, *, segment_ids, causal, impl="auto")`, for the learner's packed
batches (several prompt+response sequences per row) and the vision tower (images and windows as
segments), over the kernels each backend maintains; and `prefix_attention` for the chunks of a
chunked prefill (end of this docstring).

Semantics
- q [B, S, H, Dh]; k, v [B, S, K, Dh] with K dividing H (grouped-query attention: query head h
  reads KV head h // (H // K)). Output [B, S, H, Dh] in q's dtype. Logits, softmax and the
  log-sum-exp are float32 whatever the input dtype; the default scale is Dh**-0.5.
- segment_ids [B, S] int: query i attends to key j only if both carry the same id. Id 0 marks
  padding: padding keys are never attended and padding queries output 0 with zero gradient. A
  segment need not be contiguous for the mask, but with `causal` the rule is "key index <= query
  index", which is position order within a segment only when each segment is contiguous (as in a
  packed row). A query with no key to attend to (a padding query; an all-padding row) yields 0,
  never NaN, forward and backward.
- Self-attention only: q and k/v have the same length (no KV cache; decode needs its own kernel;
  a prefill chunk, `prefix_attention`).

Implementations (`impl`); "auto" picks by the platform compiled for (the devices of the mesh set
by `jax.set_mesh`, else `jax.default_backend()`):
- "dense": einsum, mask, softmax. The reference for tests and tiny shapes; holds [B, H, S, S].
- "xla" (auto on CPU and any other backend): flash-attention-2 in plain JAX. A loop over query
  blocks with an inner loop over key blocks and a running max and sum; a custom VJP saves only the
  output and the per-query log-sum-exp and recomputes block scores in the backward pass. Blocks
  with no query/key pair that may attend (the causal upper triangle, disjoint segments, padding)
  are skipped under `lax.cond`. Any mask above; S is padded internally to a block multiple.
- "splash" (auto on TPU): `jax.experimental.pallas.ops.tpu.splash_attention`, vmapped over B,
  with its SegmentIds and a static CausalMask or FullMask; GQA natively (its MHA kernel maps query
  head h to KV head h // (H // K)). Any mask above. Splash applies no scale, so q is scaled (in
  float32, cast back) before the call. S is padded to a multiple of the block (itself a multiple
  of 128). Static skipping of causal blocks only; segment skipping is per element.
  `interpret=True` runs it on CPU through the Pallas interpreter (tests). Its block grid's
  tables ([query blocks, key blocks] int32, three of them) are prefetched into the core's 1 MiB
  of SMEM, so a sequence of more than `SPLASH_MAX_BLOCKS` blocks per side (65,536 positions at
  512-blocks: the vision tower's full attention over every image of a large prefill batch)
  cannot compile; it runs the "xla" path instead.
- "pallas_gpu": `jax.experimental.pallas.ops.gpu.attention.mha` (Triton), which takes one
  [B, S] segment-id array for both q and kv, has no GQA (k/v heads are repeated here; their
  gradients are summed back by autodiff) and pads Dh to a power of two internally. Any mask above;
  S is padded to a multiple of 128. `interpret=True` runs it on CPU (tests).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`. This jax exposes only per-row
  `query_seq_lengths`/`key_value_seq_lengths` (right padding), `is_causal` and a dense bias/mask
  (which would be [S, S] again); no segment ids. So it expresses exactly one segment per row
  starting at index 0, followed by padding, and it needs bfloat16/float16 inputs and Dh a multiple
  of 8 up to 128 (256 on Hopper and later). Forced with segment ids that are concrete and not of
  that form, it raises; with traced segment ids it takes the nonzero count of each row as its
  length. Under "auto" on GPU: cudnn when the static conditions hold and the segment ids are of
  that form (decided in Python when they are concrete, else by `lax.cond` on device, both kernels
  compiled), else "pallas_gpu".

On CPU "splash" and "pallas_gpu" always run in the Pallas interpreter (the only way they
run there), so a model forced to a kernel still runs, slowly, in CPU tests.

Sharding. XLA partitions "xla", "dense" and "cudnn" itself. The Pallas kernels are opaque custom
calls that XLA would run on gathered, replicated inputs, so under a mesh (`jax.set_mesh`) the
caller passes `partition=(q_spec, kv_spec)`, the PartitionSpecs of q and of k/v (rows over the
data axes, heads over the tensor axis; never the sequence axis, which attention reads whole), and
the kernel runs per shard under `jax.shard_map`: each device attends its own rows and heads, with
no collective. When k/v heads are split differently from q's (2 KV heads replicated over a
4-way tensor axis), k and v are first repeated to one head per query head, so each shard's local
query head h still reads its own KV head.

Chunked prefill. `prefix_attention(q, k, v, *, q_start, kv_mask)` is the other shape: a chunk of
C queries at positions q_start .. q_start + C - 1 of a longer key buffer [B, T] (the keys of the
chunks before it and its own), causally and only to keys marked valid; plain XLA, forward only
(its docstring).

Dimension letters as in STYLE.md: B rows, S positions, H query heads, K KV heads, G = H // K,
Dh head dim; bq, bk query and key block lengths; nq, nk block counts; C queries of a chunk, T keys
of its buffer.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "dense", "xla", "splash", "pallas_gpu", "cudnn")
_F32 = jnp.float32


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array,
    causal: bool,
    impl: str = "auto",
    scale: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    interpret: bool = False,
    partition: tuple | None = None,
) -> jax.Array:
    """Masked multi-head self-attention; see the module docstring for the semantics.

    Args:
      q: [B, S, H, Dh] queries.
      k, v: [B, S, K, Dh] keys and values, K dividing H; same dtype as q.
      segment_ids: [B, S] int; 0 is padding, equal nonzero ids attend to each other.
      causal: also require key index <= query index.
      impl: one of IMPLS; "auto" picks by backend.
      scale: logit scale, Dh**-0.5 when None.
      block_q, block_kv: block lengths of "xla" and "splash" ("splash" uses block_q for every
        block and rounds it to a multiple of 128); ignored by the others. None: `BLOCK`, or
        `CPU_BLOCK` for "xla" compiled for a CPU.
      interpret: run "splash" / "pallas_gpu" in the Pallas interpreter (always on CPU).
      partition: (q_spec, kv_spec) PartitionSpecs of q and k/v under the current mesh; the Pallas
        kernels then run per shard under `shard_map` (module docstring). Ignored without a mesh
        and by the implementations XLA partitions itself.

    Returns:
      [B, S, H, Dh] in q's dtype; exactly 0 at padding queries.
    """
    b, s, h, dh = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, s) or k.shape[3] != dh or h % k.shape[2]:
        raise ValueError(
            f"attention expects q [B, S, H, Dh] and k, v [B, S, K, Dh] with K dividing H; got "
            f"q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if segment_ids.shape != (b, s):
        raise ValueError(f"segment_ids must be [B, S] = {(b, s)}, got {segment_ids.shape}")
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; known: {sorted(IMPLS)}")
    scale = dh**-0.5 if scale is None else float(scale)
    segment_ids = segment_ids.astype(jnp.int32)
    platform = _platform()
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "gpu"}.get(platform, "xla")
    interpret = bool(interpret) or platform == "cpu"
    default = default_block(impl, platform)
    block_q = default if block_q is None else block_q
    block_kv = default if block_kv is None else block_kv
    if impl == "splash" and _splash_blocks(s, block_q) > SPLASH_MAX_BLOCKS:
        impl = "xla"  # its block tables would not fit SMEM (module docstring)
    if impl == "dense":
        return _dense(q, k, v, segment_ids, causal, scale)
    if impl == "xla":
        return _xla(q, k, v, segment_ids, causal, scale, block_q, block_kv)
    if impl == "splash":
        kernel = functools.partial(
            _splash, causal=causal, scale=scale, block=block_q, interpret=interpret
        )
        return _per_shard(kernel, q, k, v, segment_ids, partition)
    if impl == "pallas_gpu":
        kernel = functools.partial(_pallas_gpu, causal=causal, scale=scale, interpret=interpret)
        return _per_shard(kernel, q, k, v, segment_ids, partition)
    if impl == "cudnn":
        if not _cudnn_shape_ok(q):
            raise ValueError(
                f"cudnn attention needs bfloat16/float16 and Dh % 8 == 0 within its limit; got "
                f"{q.dtype}, Dh={dh}"
            )
        if _is_concrete(segment_ids) and not bool(_one_segment_per_row(segment_ids)):
            raise ValueError(
                "cudnn attention expresses only one segment per row starting at index 0 followed "
                "by padding (id 0); use impl='pallas_gpu' or 'auto' for packed rows"
            )
        return _cudnn(q, k, v, segment_ids, causal, scale)
    # "auto" on GPU.
    kernel = functools.partial(_pallas_gpu, causal=causal, scale=scale, interpret=interpret)
    pallas = functools.partial(_per_shard, kernel, partition=partition)
    if not _cudnn_shape_ok(q):
        return pallas(q, k, v, segment_ids)
    cudnn = functools.partial(_cudnn, causal=causal, scale=scale)
    ok = _one_segment_per_row(segment_ids)
    if _is_concrete(ok):
        return (cudnn if bool(ok) else pallas)(q, k, v, segment_ids)
    return jax.lax.cond(ok, cudnn, pallas, q, k, v, segment_ids)


# Block lengths of "xla" and "splash" when the caller gives none. On a CPU the "xla" path takes
# 64: a [B, K, G, 64, 64] block's scores stay in a core's cache, and the causal triangle and the
# padding skip more of the work. A small model's training step (16 rows of 256 tokens, real
# lengths) took 456 ms at 64, 478 at 128 and 598 at 512 (one block); 4 rows of 1,024 took 678,
# 751 and 1,027 ms (benchmarks/RESULTS.md).
BLOCK = 512
CPU_BLOCK = 64


def default_block(impl: str, platform: str) -> int:
    """The block length `attention` (impl resolved) and `prefix_attention` ("xla") take when
    given none, compiled for `platform`."""
    return CPU_BLOCK if impl == "xla" and platform == "cpu" else BLOCK


def _platform() -> str:
    """The platform compiled for: that of the mesh set by `jax.set_mesh` (the planner compiles
    for TPU topologies from a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _per_shard(kernel, q, k, v, segment_ids, partition):
    """Runs a Pallas kernel on each device's rows and heads under `shard_map` (module docstring);
    directly without a mesh or without `partition`."""
    mesh = jax.sharding.get_abstract_mesh()
    if partition is None or mesh.empty:
        return kernel(q, k, v, segment_ids)
    q_spec, kv_spec = (tuple(s) + (None,) * (4 - len(s)) for s in partition)
    if q_spec[1] is not None or q_spec[3] is not None:
        raise ValueError(
            f"attention: q's PartitionSpec {q_spec} splits the sequence or head_dim axis; the "
            "kernels need them whole"
        )
    if kv_spec != q_spec:  # KV heads split otherwise: one KV head per query head, split as q's
        g = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        kv_spec = q_spec
    specs = jax.sharding.PartitionSpec(*q_spec)
    rows = jax.sharding.PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        kernel, mesh=mesh, in_specs=(specs, specs, specs, rows), out_specs=specs, check_vma=False
    )(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------
# Masks and padding shared by the implementations.
# ---------------------------------------------------------------------------------------------


def _allowed(seg_q, seg_k, pos_q, pos_k, causal):
    """[B, Tq] and [B, Tk] ids, [Tq] and [Tk] indices -> [B, Tq, Tk] bool, True where q sees k."""
    ok = (seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q != 0)[:, :, None]
    if causal:
        ok &= pos_q[:, None] >= pos_k[None, :]
    return ok


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_seq(x, s_pad):
    """Zero-pad axis 1 (positions) to s_pad; padded segment ids are 0, i.e. padding."""
    pad = s_pad - x.shape[1]
    return x if pad == 0 else jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _zero_padding(out, segment_ids):
    return jnp.where((segment_ids != 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


def _grouped(q, n_kv):
    """[B, S, H, Dh] -> [B, S, K, G, Dh]: the G query heads that share each KV head."""
    b, s, h, dh = q.shape
    return q.reshape(b, s, n_kv, h // n_kv, dh)


# ---------------------------------------------------------------------------------------------
# "dense": the reference.
# ---------------------------------------------------------------------------------------------


def _dense(q, k, v, segment_ids, causal, scale):
    b, s, h, dh = q.shape
    pos = jnp.arange(s)
    logits = jnp.einsum(
        "bqkgd,bskd->bkgqs", _grouped(q, k.shape[2]), k, preferred_element_type=_F32
    )  # [B, K, G, S, S]
    ok = _allowed(segment_ids, segment_ids, pos, pos, causal)[:, None, None]
    logits = jnp.where(ok, logits.astype(_F32) * scale, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.where(ok, jnp.exp(logits - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgqs,bskd->bqkgd", p, v.astype(_F32))
    return out.reshape(b, s, h, dh).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# "xla": blockwise online softmax with a flash-attention-2 backward pass.
# ---------------------------------------------------------------------------------------------


def _xla(q, k, v, segment_ids, causal, scale, block_q, block_kv):
    b, s, h, dh = q.shape
    bq = min(block_q, _round_up(s, 8))
    bk = min(block_kv, _round_up(s, 8))
    s_pad = _round_up(s, math.lcm(bq, bk))
    q, k, v, seg = (_pad_seq(x, s_pad) for x in (q, k, v, segment_ids))
    out = _flash(q, k, v, seg, causal, scale, bq, bk)
    return out[:, :s]


def _blocks(x, n):
    """[B, S, ...] -> [n, B, S / n, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], n, x.shape[1] // n, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """[n, B, S / n, ...] -> [B, S, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _active(seg_q, seg_k, bq, bk, causal):
    """[nq, B, bq] and [nk, B, bk] ids -> [nq, nk] bool: may any query of block i see block j?

    Compares the ranges of nonzero ids of the two blocks (a necessary condition for an equal
    pair), plus the causal triangle.
    """
    big = jnp.iinfo(jnp.int32).max

    def ranges(seg):
        lo = jnp.min(jnp.where(seg != 0, seg, big), axis=-1)  # [n, B]
        hi = jnp.max(jnp.where(seg != 0, seg, 0), axis=-1)
        return lo, hi

    (qlo, qhi), (klo, khi) = ranges(seg_q), ranges(seg_k)
    overlap = jnp.maximum(qlo[:, None], klo[None]) <= jnp.minimum(qhi[:, None], khi[None])
    active = jnp.any(overlap, axis=-1)  # [nq, nk]
    if causal:
        last_q = np.arange(seg_q.shape[0])[:, None] * bq + bq - 1  # last query index of block i
        active &= jnp.asarray(np.arange(seg_k.shape[0])[None, :] * bk <= last_q)
    return active


def _block_scores(q_i, k_j, seg_q, seg_k, i, j, bq, bk, causal, scale):
    """Masked float32 logits of one block pair: [B, K, G, bq, bk], -inf where not attended."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, k_j, preferred_element_type=_F32) * scale
    ok = _allowed(seg_q, seg_k, i * bq + jnp.arange(bq), j * bk + jnp.arange(bk), causal)
    return jnp.where(ok[:, None, None], s, -jnp.inf)


def _while_loop(n: int | jax.Array, body, init):
    """`body(i, carry)` for i in 0..n-1, as a `lax.while_loop`, never a scan (n may be traced).

    The block loops run inside the custom VJP, so nothing differentiates them. As scans
    (`fori_loop` with static bounds) they are still partially evaluated when the attention sits
    in a differentiated `lax.scan` (the decoder's layer scan): JAX then hoists the per-block
    masks and score buffers of every (query block, key block) pair out of the loops, [nq, nk,
    ..., bq, bk] arrays that are the whole [S, S] score matrix again (25 GiB per row at S=20480).
    A while loop is opaque to that. `tests/ops/attention_test.py` checks the jaxpr.
    """

    def step(carry):
        i, c = carry
        return i + 1, body(i, c)

    return jax.lax.while_loop(lambda c: c[0] < n, step, (jnp.asarray(0, jnp.int32), init))[1]


def _flash_forward(q, k, v, seg, causal, scale, bq, bk):
    """Padded inputs -> out [B, S, H, Dh] in q's dtype, lse [nq, B, K, G, bq] float32.

    lse is 0 for queries that attend to nothing (their output is 0).
    """
    b, s, h, dh = q.shape
    n_kv = k.shape[2]
    nq, nk = s // bq, s // bk
    q_blk = _blocks(_grouped(q, n_kv), nq)  # [nq, B, bq, K, G, Dh]
    k_blk, v_blk = _blocks(k, nk), _blocks(v, nk)  # [nk, B, bk, K, Dh]
    seg_q, seg_k = _blocks(seg, nq), _blocks(seg, nk)
    active = _active(seg_q, seg_k, bq, bk, causal)
    g = h // n_kv

    def q_block(xs):
        q_i, sq_i, i = xs

        def kv_step(j, carry):
            def update(carry):
                m, total, acc = carry
                sc = _block_scores(q_i, k_blk[j], sq_i, seg_k[j], i, j, bq, bk, causal, scale)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.exp(sc - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                total = alpha * total + jnp.sum(p, axis=-1)
                pv = jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(v.dtype), v_blk[j], preferred_element_type=_F32
                )
                return m_new, total, alpha[..., None] * acc + pv

            return jax.lax.cond(active[i, j], update, lambda c: c, carry)

        init = (
            jnp.full((b, n_kv, g, bq), -jnp.inf, _F32),
            jnp.zeros((b, n_kv, g, bq), _F32),
            jnp.zeros((b, n_kv, g, bq, dh), _F32),
        )
        m, total, acc = _while_loop(nk, kv_step, init)
        seen = total > 0
        total = jnp.where(seen, total, 1.0)
        out = jnp.where(seen[..., None], acc / total[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(total), 0.0)
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse  # [B, bq, K, G, Dh]

    out, lse = jax.lax.map(q_block, (q_blk, seg_q, jnp.arange(nq)))
    return _unblocks(out).reshape(b, s, h, dh), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, seg, causal, scale, bq, bk):
    return _flash_forward(q, k, v, seg, causal, scale, bq, bk)[0]


def _flash_fwd(q, k, v, seg, causal, scale, bq, bk):
    out, lse = _flash_forward(q, k, v, seg, causal, scale, bq, bk)
    # Named so that a remat policy can keep them (model.remat='attention', models/.../layers.py)
    # and the backward pass of a checkpointed layer does not rerun this forward.
    from jax.ad_checkpoint import checkpoint_name as name

    out, lse = name(out, "attention_out"), name(lse, "attention_lse")
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, scale, bq, bk, res, d_out):
    """Flash-attention-2 backward: per key block, loop over query blocks; dq accumulates."""
    q, k, v, seg, out, lse = res
    b, s, h, dh = q.shape
    n_kv = k.shape[2]
    nq, nk = s // bq, s // bk
    q_blk = _blocks(_grouped(q, n_kv), nq)  # [nq, B, bq, K, G, Dh]
    do_blk = _blocks(_grouped(d_out.astype(q.dtype), n_kv), nq)
    delta = jnp.sum(out.astype(_F32) * d_out.astype(_F32), axis=-1)  # [B, S, H]
    delta_blk = jnp.moveaxis(_blocks(_grouped(delta[..., None], n_kv)[..., 0], nq), 2, -1)
    # delta_blk: [nq, B, K, G, bq], laid out like lse.
    seg_q, seg_k = _blocks(seg, nq), _blocks(seg, nk)
    active = _active(seg_q, seg_k, bq, bk, causal)

    def kv_block(dq, xs):
        k_j, v_j, sk_j, j = xs

        def q_step(i, carry):
            def update(carry):
                dq, dk, dv = carry
                q_i, do_i = q_blk[i], do_blk[i]
                sc = _block_scores(q_i, k_j, seg_q[i], sk_j, i, j, bq, bk, causal, scale)
                p = jnp.exp(sc - lse[i][..., None])  # [B, K, G, bq, bk]; 0 where masked
                dv = dv + jnp.einsum(
                    "bkgqs,bqkgd->bskd", p.astype(do_i.dtype), do_i, preferred_element_type=_F32
                )
                dp = jnp.einsum("bqkgd,bskd->bkgqs", do_i, v_j, preferred_element_type=_F32)
                ds = (p * (dp - delta_blk[i][..., None]) * scale).astype(q.dtype)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, q_i, preferred_element_type=_F32)
                dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, k_j, preferred_element_type=_F32)
                return dq.at[i].add(dq_i), dk, dv

            return jax.lax.cond(active[i, j], update, lambda c: c, carry)

        zeros = jnp.zeros((b, bk, n_kv, dh), _F32)
        dq, dk, dv = _while_loop(nq, q_step, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq0 = jnp.zeros(q_blk.shape, _F32)
    xs = (_blocks(k, nk), _blocks(v, nk), seg_k, jnp.arange(nk))
    dq, (dk, dv) = jax.lax.scan(kv_block, dq0, xs)
    dq = _unblocks(dq).reshape(b, s, h, dh).astype(q.dtype)
    return dq, _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------------
# Chunked prefill: a chunk of queries against the keys of every chunk so far.
# ---------------------------------------------------------------------------------------------


def prefix_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_start: int | jax.Array,
    kv_mask: jax.Array,
    scale: float | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Causal attention of a chunk of queries to a prefix of keys (chunked prefill).

    Query i sits at key position q_start + i and attends to key j iff j <= q_start + i and
    kv_mask[b, j]. The keys are read in blocks of `block_kv` with an online softmax (running max
    and sum, float32), so at most [B, H, C, block_kv] scores exist at once, never [C, T]. Key
    blocks past the chunk are skipped, not masked: the blocks run in a `lax.while_loop` whose trip
    count is ceil((q_start + C) / block_kv) (dynamic when q_start is traced), so a chunk near the
    start of the buffer reads few blocks. When block_kv does not divide T the last block is read
    at T - block_kv (`dynamic_slice` clamps) and its keys already read by the block before are
    masked, so T needs no padding. Forward only: reverse-mode autodiff does not go through the
    while loop (prefills need no gradient). Plain XLA ops, so it jits and partitions under a mesh
    like the "xla" path of `attention` (rows and heads split; T is read whole).

    Args:
      q: [B, C, H, Dh] queries, already rotated.
      k, v: [B, T, K, Dh] keys (rotated) and values, K dividing H (query head h reads KV head
        h // (H // K)); same dtype as q. Keys at or past q_start + C are never attended; they
        may hold anything finite (the zeros of a buffer not yet written).
      q_start: int or int32 scalar (may be traced): the key position of query 0;
        0 <= q_start and q_start + C <= T.
      kv_mask: [B, T] bool, True at keys that may be attended (real tokens), False at padding.
      scale: logit scale, Dh**-0.5 when None.
      block_kv: key block length; clipped to T. None: `default_block` (64 compiled for a CPU,
        else 512).

    Returns:
      [B, C, H, Dh] in q's dtype; exactly 0 for a query with no key to attend (a left-padding
      query before its row's first real token; an all-padding row).
    """
    b, c, h, dh = q.shape
    t, n_kv = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh or h % n_kv or t < c:
        raise ValueError(
            f"prefix_attention expects q [B, C, H, Dh] and k, v [B, T, K, Dh] with T >= C and K "
            f"dividing H; got q {q.shape}, k {k.shape}, v {v.shape}"
        )
    if kv_mask.shape != (b, t):
        raise ValueError(f"kv_mask must be [B, T] = {(b, t)}, got {kv_mask.shape}")
    if block_kv is None:
        block_kv = default_block("xla", _platform())
    if block_kv < 1:
        raise ValueError(f"block_kv must be positive, got {block_kv}")
    if isinstance(q_start, int) and not 0 <= q_start <= t - c:
        raise ValueError(f"prefix_attention: q_start {q_start} must be in [0, T - C = {t - c}]")
    scale = dh**-0.5 if scale is None else float(scale)
    bk = min(block_kv, t)
    q_start = jnp.asarray(q_start, jnp.int32)
    q_pos = q_start + jnp.arange(c)  # [C]
    kv_mask = kv_mask.astype(bool)
    q_g = _grouped(q, n_kv)  # [B, C, K, G, Dh]
    g = h // n_kv

    def kv_step(j, carry):
        m, total, acc = carry
        start = jnp.minimum(j * bk, t - bk)  # the last block ends at T
        k_j, v_j, ok_j = (
            jax.lax.dynamic_slice_in_dim(x, start, bk, axis=1) for x in (k, v, kv_mask)
        )
        k_pos = start + jnp.arange(bk)  # [bk]
        ok = (k_pos[None, :] <= q_pos[:, None]) & (k_pos >= j * bk)[None, :]  # [C, bk]
        ok = ok[None] & ok_j[:, None, :]  # [B, C, bk]
        sc = jnp.einsum("bqkgd,bskd->bkgqs", q_g, k_j, preferred_element_type=_F32) * scale
        sc = jnp.where(ok[:, None, None], sc, -jnp.inf)  # [B, K, G, C, bk]
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(sc - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        total = alpha * total + jnp.sum(p, axis=-1)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), v_j, preferred_element_type=_F32)
        return m_new, total, alpha[..., None] * acc + pv

    init = (
        jnp.full((b, n_kv, g, c), -jnp.inf, _F32),
        jnp.zeros((b, n_kv, g, c), _F32),
        jnp.zeros((b, n_kv, g, c, dh), _F32),
    )
    n_blocks = jnp.minimum(-(-t // bk), (q_start + c + bk - 1) // bk)
    _, total, acc = _while_loop(n_blocks, kv_step, init)
    seen = total > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, total, 1.0)[..., None], 0.0)
    return jnp.moveaxis(out, 3, 1).reshape(b, c, h, dh).astype(q.dtype)


# ---------------------------------------------------------------------------------------------
# "splash": the TPU Pallas kernel.
# ---------------------------------------------------------------------------------------------


def _splash_kernel(s: int, h: int, causal: bool, block: int, interpret: bool):
    """Built at each trace: its mask-info arrays become constants of the traced function. (Built
    once and cached, they would have to be concrete, and making them concrete under a mesh of
    devices that exist only to be compiled for, as the planner's TPU topologies, fails.) The
    mask's block structure itself is computed in NumPy and cached by splash."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    kind = sa.CausalMask if causal else sa.FullMask
    mask = sa.MultiHeadMask([kind((s, s)) for _ in range(h)])
    sizes = sa.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    return sa.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )


# The most query (and key) blocks of one Splash call: 128 x 128 int32 is 64 KiB per block
# table, three tables well inside the 1 MiB of SMEM a TPU core prefetches them to.
SPLASH_MAX_BLOCKS = 128


def _splash_block(s: int, block: int) -> int:
    return min(_round_up(block, 128), _round_up(s, 128))


def _splash_blocks(s: int, block: int) -> int:
    """Query (= key) blocks of a Splash call over s positions."""
    return _round_up(s, _splash_block(s, block)) // _splash_block(s, block)


def _splash(q, k, v, segment_ids, causal, scale, block, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, s, h, dh = q.shape
    block = _splash_block(s, block)
    s_pad = _round_up(s, block)
    kernel = _splash_kernel(s_pad, h, bool(causal), block, bool(interpret))
    q = (q.astype(_F32) * scale).astype(q.dtype)
    q, k, v, seg = (_pad_seq(x, s_pad) for x in (q, k, v, segment_ids))
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, S, N, Dh] -> [B, N, S, Dh]

    def one_row(q, k, v, seg):
        return kernel(q, k, v, sa.SegmentIds(q=seg, kv=seg))

    out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), seg)
    return _zero_padding(heads_first(out)[:, :s], segment_ids)


# ---------------------------------------------------------------------------------------------
# "pallas_gpu" and "cudnn": the GPU kernels.
# ---------------------------------------------------------------------------------------------


def _pallas_gpu(q, k, v, segment_ids, causal, scale, interpret):
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, s, h, dh = q.shape
    g = h // k.shape[2]
    s_pad = _round_up(s, 128)  # its default blocks: 128 forward, 32 backward
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    q, k, v, seg = (_pad_seq(x, s_pad) for x in (q, k, v, segment_ids))
    # Padding queries attend to padding keys there (0 == 0), so no row is empty; zeroed below.
    out = gpu_attention.mha(
        q, k, v, seg, sm_scale=scale, causal=bool(causal), interpret=bool(interpret)
    )
    return _zero_padding(out[:, :s], segment_ids)


def _cudnn(q, k, v, segment_ids, causal, scale):
    lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=bool(causal),
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return _zero_padding(out, segment_ids)


def _cudnn_shape_ok(q) -> bool:
    dh = q.shape[-1]
    if q.dtype not in (jnp.bfloat16, jnp.float16) or dh % 8:
        return False
    if dh <= 128:
        return True
    cc = getattr(jax.devices()[0], "compute_capability", "0.0")
    return dh <= 256 and tuple(int(x) for x in str(cc).split(".")[:2]) >= (9, 0)


def _one_segment_per_row(segment_ids):
    """True if every row is one nonzero id from index 0, then only padding (cuDNN's mask)."""
    n = jnp.sum(segment_ids != 0, axis=1, keepdims=True)
    first = segment_ids[:, :1]
    expected = jnp.where(jnp.arange(segment_ids.shape[1]) < n, first, 0)
    return jnp.all(segment_ids == expected) & jnp.all(n > 0)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)
