"""Decode attention over a paged KV cache, and the writes that fill the cache.

The sampler keeps keys and values in fixed-size pages shared by all rows, in the layout of JAX's
Pallas paged-attention kernels for TPU and GPU:

- k_pages, v_pages [K, P, ps, Dh] per layer: K KV heads, P pages in the pool (here P counts pages,
  not vision patches), ps tokens per page, Dh head dim.
- page_table [B, M] int32: row b's pages in order; M pages at most per row.
- lengths [B] int32: row b's keys are its positions 0 .. lengths[b]-1, position j stored at page
  page_table[b, j // ps], slot j % ps. Entries of page_table past a row's filled pages
  (column >= ceil(lengths[b] / ps)) may hold anything and never affect a result. Lengths are taken
  as at most M * ps (larger values are clamped).

`paged_attention(q, k_pages, v_pages, lengths, page_table)` attends one query per row, q [B, H, Dh]
(grouped-query: query head h reads KV head h // (H // K)), with scale Dh**-0.5, softmax in float32
and the output [B, H, Dh] in q's dtype; a row of length 0 outputs 0. Implementations (`impl`):

- "xla": plain XLA whose cost follows the filled pages, not the pool or M. A `lax.while_loop` over
  blocks of `pages_per_block` pages runs ceil(max(lengths) / (pages_per_block * ps)) trips (computed
  on device); each trip gathers the block's pages of every row through the page table
  (`jnp.take` on the page axis), masks positions >= lengths[b] and updates an online softmax
  (running max, sum and accumulator in float32). Masking is by select on the logits and on the
  values, so whatever the unfilled pages and slots hold (stale data, NaN) never reaches the result.
- "dense": gathers all M pages of every row and masks; the reference for tests.
- "pallas_tpu": `jax.experimental.pallas.ops.tpu.paged_attention.paged_attention` (Mosaic). Same
  layout and arguments (q, k_pages, v_pages, lengths, page_indices); it applies no scale, so q is
  scaled here (in float32, cast back). Needs M to be a multiple of its `pages_per_compute_block`
  (the page table is padded here to a multiple of `pages_per_block`), and pages [ps, Dh] that tile
  Mosaic's VMEM layout: the rule used here is Dh % 128 == 0 and ps % 16 == 0 (what JAX's own
  kernel tests cover: Dh 128/256, ps 16/32/64). It reads K/V through bfloat16 inside the kernel,
  so float32 results carry bfloat16 error. Called with its defaults megacore_mode=None (safe on
  every TPU generation) and inline_seq_dim=True (which also zeroes empty rows); lengths and the
  page table are prefetched to SMEM, so B * M int32 must fit there. JAX's kernel test for it is
  disabled upstream citing data races; the TPU interpreter's race detector finds none at our test
  shapes (tests/ops/paged_attention_test.py).
  The newer `ops/tpu/ragged_paged_attention` (the vLLM-TPU kernel) is not used: it takes the cache
  as one array [P, ps, 2K, Dh] with K and V interleaved per head, so our [K, P, ps, Dh] pair would
  have to be restacked (a copy of the whole pool) every step, and it serves ragged multi-token
  queries (mixed prefill and decode, `cu_q_lens`, `num_seqs`), which one-token decode does not need.
- "pallas_gpu": `jax.experimental.pallas.ops.gpu.paged_attention.paged_attention` (Triton). Note
  its argument order (q, k_pages, v_pages, block_tables, lengths); it applies no scale either. It
  splits each row's M pages into `k_splits` partitions (M % k_splits == 0, partitions a multiple
  of the compute block; the page table is padded here to a multiple of k_splits * pages_per_block
  columns with k_splits = min(16, ceil(M / pages_per_block))) and pads the query heads of a KV
  group to 16.
  Triton needs every loaded block to have a power-of-2 size and dot operands of at least 16, so it
  needs Dh a power of 2 >= 16, ps and pages_per_block powers of 2 with ps * pages_per_block >= 16.
- "auto": the platform's kernel, the platform being that of the mesh set by `jax.set_mesh`, else
  the default backend (`ares_jax.ops.attention._platform`): TPU -> "pallas_tpu", GPU ->
  "pallas_gpu", else "xla". Where the shapes miss that kernel's needs above, "auto" runs "xla".
  Forcing a kernel whose needs are not met raises a ValueError naming them.

Both Pallas kernels read whole compute blocks of pages, so before calling them the page table's
entries past each row's filled pages are pointed at the row's own first page (page 0 for an empty
row) and every entry is clipped into [0, P): a kernel never reads outside the pool or beyond the
row's own filled pages. Neither kernel masks the values (and the TPU one masks logits by adding a
large negative number), so slots past lengths[b] inside the row's last filled page must hold finite
numbers (they do once written or zero-initialised); "xla" has no such need. `interpret` runs the
Pallas kernels in the Pallas interpreter (default: when the platform compiled for, as "auto" reads
it, is CPU; so compiling for a TPU topology from a CPU host lowers the real kernel), the only way
they run on CPU.

The writes: `write_decode` puts one new token per row at positions[b]; `write_prompt` puts a
left-padded prefill's keys and values at positions start .. start + lengths[b] - 1. Both are
`.at[].set` scatters with `mode="drop"`; rows or tokens that write nothing aim at page P (out of
range), so they update the pages in place when the caller donates them.

Under a mesh (`Partition`): the rows of a batch and the pages of the pool are split over the same
mesh axes, and each shard's page table holds indices into its own part of the pool, so a row's
pages always live with the row. `paged_attention`, `write_decode` and `write_prompt` then run per
shard under `jax.shard_map` (the Pallas kernels cannot be partitioned by XLA, and a gather through
a page table over a split pool would otherwise be an all-gather of the pool): no collective.

Dimension letters as in STYLE.md: B rows, H query heads, K KV heads, G = H // K, Dh head dim,
T prefill tokens; P pages in the pool, ps page size, M pages per row, bp pages per block.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ares_jax.ops.attention import _platform

IMPLS = ("auto", "xla", "dense", "pallas_tpu", "pallas_gpu")
_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Partition:
    """How the mesh set by `jax.set_mesh` splits a paged cache (module docstring).

    rows: mesh axes splitting the batch rows and, with them, the pool's pages: shard s holds rows
      s*B/S .. and pages s*P/S .., and its page-table entries index its own pages (0 .. P/S - 1).
    heads: mesh axes splitting the KV heads (and the query heads with them, in groups).
    """

    rows: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()

    def spec(self, *dims: str | None) -> PartitionSpec:
        """A PartitionSpec from dimension roles: "rows", "heads" or None (whole)."""
        axes = {"rows": self.rows, "heads": self.heads, None: ()}
        return PartitionSpec(*[_axes_entry(axes[d]) for d in dims])

    def specs(self, dims_tree):
        """`spec` of every leaf of a tree whose leaves are tuples of dimension roles."""
        return jax.tree.map(lambda d: self.spec(*d), dims_tree, is_leaf=is_dims)


def is_dims(x) -> bool:
    """Whether `x` is a tuple of dimension roles (a leaf of a `Partition.specs` tree)."""
    return isinstance(x, tuple) and all(d in ("rows", "heads", None) for d in x)


def _axes_entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def per_shard(fn, partition: Partition | None, in_dims, out_dims):
    """`fn` run on each shard under `jax.shard_map` over the current mesh (`Partition.spec` roles
    per argument and output, as tuples of dims or trees of them), or `fn` itself without a mesh
    or a partition. Every mesh axis is manual: arguments not split over an axis are whole there."""
    mesh = jax.sharding.get_abstract_mesh()
    if partition is None or mesh.empty:
        return fn
    return jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=partition.specs(in_dims),
        out_specs=partition.specs(out_dims),
        check_vma=False,
    )


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    lengths: jax.Array,
    page_table: jax.Array,
    *,
    impl: str = "auto",
    pages_per_block: int = 8,
    interpret: bool | None = None,
    partition: Partition | None = None,
) -> jax.Array:
    """One decode query per row attending its paged keys; see the module docstring.

    Args:
      q: [B, H, Dh] queries, one per row.
      k_pages, v_pages: [K, P, ps, Dh] the layer's key and value pages, K dividing H.
      lengths: [B] int, keys per row (positions 0 .. lengths[b]-1); 0 gives an output of 0.
      page_table: [B, M] int, row b's pages in position order; entries past its filled pages
        are never read for results.
      impl: one of IMPLS; "auto" picks by platform and falls back to "xla" (module docstring).
      pages_per_block: pages per block of the "xla" loop and compute block of the kernels.
      interpret: run the Pallas kernels in the interpreter; None means when the platform
        compiled for is CPU.
      partition: under a mesh, how rows, pages and heads are split (`Partition`); each shard
        then attends its own rows over its own pages. None: XLA partitions the call as it is.

    Returns:
      [B, H, Dh] in q's dtype.
    """
    if partition is not None:
        fn = functools.partial(
            paged_attention, impl=impl, pages_per_block=pages_per_block, interpret=interpret
        )
        pages = ("heads", "rows", None, None)
        return per_shard(
            fn,
            partition,
            (("rows", "heads", None), pages, pages, ("rows",), ("rows", None)),
            ("rows", "heads", None),
        )(q, k_pages, v_pages, lengths, page_table)
    q, k_pages, v_pages, lengths, page_table = (
        jnp.asarray(x) for x in (q, k_pages, v_pages, lengths, page_table)
    )
    b, h, dh = q.shape
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [K, P, ps, Dh]; got {k_pages.shape}, {v_pages.shape}"
        )
    k, _, ps, dh_k = k_pages.shape
    if dh_k != dh or h % k:
        raise ValueError(
            f"q must be [B, H, Dh] with the pages' Dh and H a multiple of K; got q {q.shape}, "
            f"k_pages {k_pages.shape}"
        )
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [B] = ({b},), got {lengths.shape}")
    if page_table.ndim != 2 or page_table.shape[0] != b:
        raise ValueError(f"page_table must be [B, M] with B = {b}, got {page_table.shape}")
    if impl not in IMPLS:
        raise ValueError(f"unknown paged attention impl {impl!r}; known: {sorted(IMPLS)}")
    if pages_per_block < 1:
        raise ValueError(f"pages_per_block must be positive, got {pages_per_block}")
    if interpret is None:
        interpret = _platform() == "cpu"
    m = page_table.shape[1]
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, m * ps)
    page_table = page_table.astype(jnp.int32)

    if impl == "auto":
        impl = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}.get(_platform(), "xla")
        if _kernel_unmet(impl, dh, ps, pages_per_block):
            impl = "xla"
    elif unmet := _kernel_unmet(impl, dh, ps, pages_per_block):
        raise ValueError(f"impl={impl!r} cannot run these shapes: {unmet}")
    if impl == "dense":
        return _dense(q, k_pages, v_pages, lengths, page_table)
    if impl == "xla":
        return _xla(q, k_pages, v_pages, lengths, page_table, min(pages_per_block, m))
    if impl == "pallas_tpu":
        return _pallas_tpu(q, k_pages, v_pages, lengths, page_table, pages_per_block, interpret)
    return _pallas_gpu(q, k_pages, v_pages, lengths, page_table, pages_per_block, interpret)


def write_decode(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    page_table: jax.Array,
    positions: jax.Array,
    valid: jax.Array,
    partition: Partition | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Writes one new token's key and value per row into the pages.

    Args:
      k_pages, v_pages: [K, P, ps, Dh] pages; donate them to update in place.
      k_new, v_new: [B, K, Dh] the new token's key and value per row.
      page_table: [B, M] int, row b's pages in position order.
      positions: [B] int, where each row's token goes: page page_table[b, positions[b] // ps],
        slot positions[b] % ps.
      valid: [B] bool; rows with False write nothing, nor do positions outside 0 .. M*ps-1 or
        table entries outside [0, P). Two valid rows must not aim at the same slot (which one wins
        is unspecified).
      partition: under a mesh, each shard writes its rows into its own pages (`Partition`).

    Returns:
      (k_pages, v_pages) with the new tokens written, same shapes and dtypes.
    """
    if partition is not None:
        pages, rows = ("heads", "rows", None, None), ("rows",)
        return per_shard(
            write_decode,
            partition,
            (pages, pages, ("rows", "heads", None), ("rows", "heads", None), ("rows", None))
            + (rows, rows),
            (pages, pages),
        )(k_pages, v_pages, k_new, v_new, page_table, positions, valid)
    k_pages, v_pages, page_table = (jnp.asarray(x) for x in (k_pages, v_pages, page_table))
    b = page_table.shape[0]
    if k_new.shape != v_new.shape or k_new.shape != (b, k_pages.shape[0], k_pages.shape[3]):
        raise ValueError(
            f"k_new and v_new must be [B, K, Dh] = {(b, k_pages.shape[0], k_pages.shape[3])}; "
            f"got {k_new.shape}, {v_new.shape}"
        )
    if positions.shape != (b,) or valid.shape != (b,):
        raise ValueError(
            f"positions and valid must be [B] = ({b},); got {positions.shape}, {valid.shape}"
        )
    page, slot = _page_slot(page_table, positions[:, None], valid[:, None], k_pages.shape)
    page, slot = page[:, 0], slot[:, 0]  # [B]
    head = _heads(k_pages.shape[0], page.ndim)
    k_pages = k_pages.at[head, page, slot].set(
        jnp.swapaxes(k_new, 0, 1).astype(k_pages.dtype), mode="drop"
    )
    v_pages = v_pages.at[head, page, slot].set(
        jnp.swapaxes(v_new, 0, 1).astype(v_pages.dtype), mode="drop"
    )
    return k_pages, v_pages


def write_prompt(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    page_table: jax.Array,
    lengths: jax.Array,
    start: int | jax.Array = 0,
    partition: Partition | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Writes a left-padded prefill's keys and values into the pages.

    Args:
      k_pages, v_pages: [K, P, ps, Dh] pages; donate them to update in place.
      k, v: [B, T, K, Dh] the prefill's keys and values; row b's real tokens are its last
        lengths[b] positions of T (left padding before them).
      page_table: [B, M] int, row b's pages in position order.
      lengths: [B] int, real tokens per row, 0 .. T.
      start: int or [B] int, the position of each row's first real token (0 for a fresh prompt).
      partition: under a mesh, each shard writes its rows into its own pages (`Partition`).

    Returns:
      (k_pages, v_pages) with token T - lengths[b] + i of row b at position start + i, for
      i < lengths[b]; padding tokens, positions outside 0 .. M*ps-1 and table entries outside
      [0, P) write nothing.
    """
    if partition is not None:
        pages, rows = ("heads", "rows", None, None), ("rows",)
        kv = ("rows", None, "heads", None)
        start = jnp.broadcast_to(jnp.asarray(start, jnp.int32), lengths.shape)
        return per_shard(
            write_prompt,
            partition,
            (pages, pages, kv, kv, ("rows", None), rows, rows),
            (pages, pages),
        )(k_pages, v_pages, k, v, page_table, lengths, start)
    k_pages, v_pages, page_table = (jnp.asarray(x) for x in (k_pages, v_pages, page_table))
    b, t = k.shape[:2]
    if k.shape != v.shape or k.shape != (b, t, k_pages.shape[0], k_pages.shape[3]):
        raise ValueError(
            f"k and v must be [B, T, K, Dh] with the pages' K, Dh = "
            f"{(k_pages.shape[0], k_pages.shape[3])}; got {k.shape}, {v.shape}"
        )
    if page_table.shape[0] != b or lengths.shape != (b,):
        raise ValueError(
            f"page_table must be [B, M] and lengths [B] with B = {b}; got {page_table.shape}, "
            f"{lengths.shape}"
        )
    offset = jnp.arange(t)[None, :] - (t - lengths[:, None])  # [B, T], >= 0 on real tokens
    positions = jnp.broadcast_to(jnp.asarray(start), (b,))[:, None] + offset
    page, slot = _page_slot(page_table, positions, offset >= 0, k_pages.shape)  # [B, T]
    head = _heads(k_pages.shape[0], page.ndim)
    k_pages = k_pages.at[head, page, slot].set(  # values [K, B, T, Dh]
        jnp.moveaxis(k, 2, 0).astype(k_pages.dtype), mode="drop"
    )
    v_pages = v_pages.at[head, page, slot].set(
        jnp.moveaxis(v, 2, 0).astype(v_pages.dtype), mode="drop"
    )
    return k_pages, v_pages


def _heads(k: int, ndim: int) -> jax.Array:
    """[K, 1, ...] head indices for a write `pages.at[head, page, slot]` with page and slot of
    `ndim` dims. The head is an index of the scatter, not a window dimension: its only window
    dimension is then Dh, the minor one, and TPU scatters into the pages in the [K, P, ps, Dh]
    layout the Pallas kernel reads. (With `pages.at[:, page, slot]`, K is a window dimension
    and TPU lays the pages out page-major for the scatter, then copies every layer's pool back
    for the kernel, on every decode step: tests/sampling/layout_test.py counts them.)"""
    return jnp.arange(k, dtype=jnp.int32).reshape((k,) + (1,) * ndim)


def _page_slot(page_table, positions, valid, pages_shape):
    """Page and slot of each position, [B, n] each; the page is P (out of range, so the scatter
    drops it) where the write is invalid, the position lies outside the row's M pages or the
    table's entry outside the pool."""
    _, num_pages, ps, _ = pages_shape
    positions = positions.astype(jnp.int32)
    valid = valid & (positions >= 0) & (positions < page_table.shape[1] * ps)
    column = jnp.clip(positions // ps, 0, page_table.shape[1] - 1)
    page = jnp.take_along_axis(page_table.astype(jnp.int32), column, axis=1)
    # A negative page would wrap around in the scatter; out of the pool, it writes nothing.
    valid = valid & (page >= 0) & (page < num_pages)
    return jnp.where(valid, page, num_pages), positions % ps


def _kernel_unmet(impl: str, dh: int, ps: int, pages_per_block: int) -> str:
    """Why a Pallas kernel cannot take these shapes (module docstring), or "" if it can."""
    if impl == "pallas_tpu":
        if dh % 128 or ps % 16:
            return f"Mosaic needs head dim % 128 == 0 and page size % 16 == 0; got {dh}, {ps}"
    if impl == "pallas_gpu":
        pow2 = lambda n: n > 0 and n & (n - 1) == 0
        if not (pow2(dh) and dh >= 16 and pow2(ps) and pow2(pages_per_block)):
            return (
                f"Triton needs head dim a power of 2 >= 16 and page size and pages_per_block "
                f"powers of 2; got {dh}, {ps}, {pages_per_block}"
            )
        if ps * pages_per_block < 16:
            return f"Triton needs page size * pages_per_block >= 16; got {ps} * {pages_per_block}"
    return ""


def _dense(q, k_pages, v_pages, lengths, page_table):
    """All M pages of every row gathered, masked, softmaxed: the reference."""
    b, h, dh = q.shape
    k, _, ps, _ = k_pages.shape
    m = page_table.shape[1]
    q_bkgd = q.reshape(b, k, h // k, dh)
    keys = jnp.take(k_pages, page_table, axis=1, mode="clip").reshape(k, b, m * ps, dh)
    values = jnp.take(v_pages, page_table, axis=1, mode="clip").reshape(k, b, m * ps, dh)
    mask = jnp.arange(m * ps)[None, :] < lengths[:, None]  # [B, M*ps]
    logits = jnp.einsum("bkgd,kbtd->bkgt", q_bkgd, keys, preferred_element_type=_F32) * dh**-0.5
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jnp.where(mask[:, None, None], jax.nn.softmax(logits, axis=-1), 0.0)  # 0 if empty
    values = jnp.where(mask[None, :, :, None], values.astype(_F32), 0.0)
    out = jnp.einsum("bkgt,kbtd->bkgd", probs, values)
    return out.reshape(b, h, dh).astype(q.dtype)


def _xla(q, k_pages, v_pages, lengths, page_table, bp):
    """Online softmax over blocks of bp pages, as many blocks as the longest row fills."""
    b, h, dh = q.shape
    k, _, ps, _ = k_pages.shape
    m = page_table.shape[1]
    g, bk = h // k, bp * ps
    num_blocks = -(-m // bp)
    page_table = jnp.pad(page_table, ((0, 0), (0, num_blocks * bp - m)))  # [B, num_blocks*bp]
    q_bkgd = q.reshape(b, k, g, dh)
    trips = (jnp.max(lengths) + bk - 1) // bk

    def body(carry):
        i, run_max, run_sum, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(page_table, i * bp, bp, axis=1)  # [B, bp]
        keys = jnp.take(k_pages, pages, axis=1, mode="clip").reshape(k, b, bk, dh)
        values = jnp.take(v_pages, pages, axis=1, mode="clip").reshape(k, b, bk, dh)
        mask = i * bk + jnp.arange(bk)[None, :] < lengths[:, None]  # [B, bk]
        logits = jnp.einsum("bkgd,kbtd->bkgt", q_bkgd, keys, preferred_element_type=_F32)
        logits = jnp.where(mask[:, None, None], logits * dh**-0.5, -jnp.inf)
        new_max = jnp.maximum(run_max, logits.max(axis=-1))  # [B, K, G]
        # -inf while a row has seen no key: shift by 0 so that exp gives 0, not NaN.
        shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
        probs = jnp.exp(logits - shift[..., None])
        correction = jnp.exp(run_max - shift)
        values = jnp.where(mask[None, :, :, None], values.astype(_F32), 0.0)
        acc = correction[..., None] * acc + jnp.einsum("bkgt,kbtd->bkgd", probs, values)
        run_sum = correction * run_sum + probs.sum(axis=-1)
        return i + 1, new_max, run_sum, acc

    init = (
        jnp.int32(0),
        jnp.full((b, k, g), -jnp.inf, _F32),
        jnp.zeros((b, k, g), _F32),
        jnp.zeros((b, k, g, dh), _F32),
    )
    _, _, run_sum, acc = jax.lax.while_loop(lambda c: c[0] < trips, body, init)
    out = jnp.where(run_sum[..., None] > 0, acc / jnp.maximum(run_sum, 1e-30)[..., None], 0.0)
    return out.reshape(b, h, dh).astype(q.dtype)


def _kernel_page_table(page_table, lengths, ps, num_pages, columns):
    """The page table the Pallas kernels read ([B, columns], padded): entries past each row's
    filled pages point at the row's first page (page 0 for an empty row), all within [0, P)."""
    page_table = jnp.clip(page_table, 0, num_pages - 1)
    filled = (lengths + ps - 1) // ps  # [B]
    first = jnp.where(filled > 0, page_table[:, 0], 0)
    page_table = jnp.pad(page_table, ((0, 0), (0, columns - page_table.shape[1])))
    column = jnp.arange(columns)[None, :]
    return jnp.where(column < filled[:, None], page_table, first[:, None])


def _scaled(q):
    """q * Dh**-0.5 in float32, back in q's dtype: the kernels apply no scale."""
    return (q.astype(_F32) * q.shape[-1] ** -0.5).astype(q.dtype)


def _pallas_tpu(q, k_pages, v_pages, lengths, page_table, bp, interpret):
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention as kernel

    _, num_pages, ps, _ = k_pages.shape
    bp = min(bp, page_table.shape[1])
    columns = -(-page_table.shape[1] // bp) * bp
    table = _kernel_page_table(page_table, lengths, ps, num_pages, columns)
    call = functools.partial(
        kernel, _scaled(q), k_pages, v_pages, lengths, table, pages_per_compute_block=bp
    )
    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = call()
    else:
        out = call()
    # Its inline-sequence kernel zeroes empty rows already; this keeps the contract explicit.
    return jnp.where(lengths[:, None, None] > 0, out, 0).astype(q.dtype)


def _pallas_gpu(q, k_pages, v_pages, lengths, page_table, bp, interpret):
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention as kernel

    _, num_pages, ps, _ = k_pages.shape
    m = page_table.shape[1]
    k_splits = min(16, -(-m // bp))
    columns = -(-m // (k_splits * bp)) * k_splits * bp  # each split a whole number of blocks
    table = _kernel_page_table(page_table, lengths, ps, num_pages, columns)
    out = kernel(
        _scaled(q),
        k_pages,
        v_pages,
        table,
        lengths,
        pages_per_compute_block=bp,
        k_splits=k_splits,
        interpret=bool(interpret),
    )
    # Empty rows come out as 0 / eps = 0 from its final merge; kept explicit here.
    return jnp.where(lengths[:, None, None] > 0, out, 0).astype(q.dtype)
