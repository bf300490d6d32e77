"""Tests of ares_jax.ops.paged_attention: the implementations against each other and against a
NumPy float64 softmax over contiguous per-row keys and values; the cache writes; the "xla" loop's
trip count.

The Pallas kernels run in the Pallas interpreter on CPU, at shapes they accept.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax.ops import paged_attention as pa
from ares_jax.ops.paged_attention import paged_attention, write_decode, write_prompt

# Rows: empty, one token, exactly one page, a partial third page, the full table, two pages and a
# bit. Row 5 shares its first page with row 3 (a shared prompt prefix).
LENGTHS = (0, 1, 4, 9, 24, 13)
K, H, DH, PS, M, NUM_PAGES = 2, 8, 32, 4, 6, 24


def _scenario(
    seed, lengths=LENGTHS, k=K, h=H, dh=DH, ps=PS, m=M, num_pages=NUM_PAGES, reserve=False
):
    """Pages filled from contiguous per-row keys and values through a shuffled page table.

    Returns (q [B, H, Dh], k_pages, v_pages [K, P, ps, Dh], lengths [B], page_table [B, M], all
    float32 NumPy; contiguous keys, values [B, M*ps, K, Dh]). Pages no row fills hold random
    values; table entries past a row's filled pages hold junk, out of range included, unless
    `reserve`, which gives every row M pages of its own (room to decode into).
    """
    rng = np.random.default_rng(seed)
    b = len(lengths)
    filled = [math.ceil(n / ps) for n in lengths]
    order = iter(rng.permutation(num_pages))
    table = rng.integers(-3, num_pages + 5, size=(b, m)).astype(np.int32)
    for row, n in enumerate(filled):
        for col in range(m if reserve else n):
            table[row, col] = next(order)
    keys = rng.normal(size=(b, m * ps, k, dh)).astype(np.float32)
    values = rng.normal(size=(b, m * ps, k, dh)).astype(np.float32)
    if b > 5:
        table[5, 0] = table[3, 0]
        keys[5, :ps], values[5, :ps] = keys[3, :ps], values[3, :ps]
    k_pages = rng.normal(size=(k, num_pages, ps, dh)).astype(np.float32)
    v_pages = rng.normal(size=(k, num_pages, ps, dh)).astype(np.float32)
    for row, n in enumerate(lengths):
        for j in range(n):
            k_pages[:, table[row, j // ps], j % ps] = keys[row, j]
            v_pages[:, table[row, j // ps], j % ps] = values[row, j]
    q = rng.normal(size=(b, h, dh)).astype(np.float32)
    return q, k_pages, v_pages, np.asarray(lengths, np.int32), table, keys, values


def _reference(q, keys, values, lengths):
    """Textbook softmax attention in float64 over each row's first lengths[b] keys."""
    b, h, dh = q.shape
    group = h // keys.shape[2]
    out = np.zeros((b, h, dh))
    for row, n in enumerate(lengths):
        if n == 0:
            continue
        kk = np.repeat(keys[row, :n].astype(np.float64), group, axis=1)  # [n, H, Dh]
        vv = np.repeat(values[row, :n].astype(np.float64), group, axis=1)
        logits = np.einsum("hd,nhd->hn", q[row].astype(np.float64), kk) / math.sqrt(dh)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[row] = np.einsum("hn,nhd->hd", p / p.sum(-1, keepdims=True), vv)
    return out


# Jitted once per shape and option set, so that tests sharing shapes share the compilation.
_attend = jax.jit(paged_attention, static_argnames=("impl", "pages_per_block", "interpret"))


def _run(q, k_pages, v_pages, lengths, table, dtype=jnp.float32, fn=_attend, **kwargs):
    args = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)]
    args += [jnp.asarray(lengths), jnp.asarray(table)]
    return np.asarray(fn(*args, **kwargs).astype(jnp.float32))


def test_dense_matches_float64_reference():
    q, kp, vp, lengths, table, keys, values = _scenario(0)
    got = _run(q, kp, vp, lengths, table, impl="dense")
    np.testing.assert_allclose(got, _reference(q, keys, values, lengths), rtol=1e-5, atol=1e-5)
    assert np.all(got[0] == 0), "a row of length 0 outputs 0"


@pytest.mark.parametrize("pages_per_block", [1, 2, 4, 8])
def test_xla_matches_dense_float32(pages_per_block):
    q, kp, vp, lengths, table, *_ = _scenario(1)
    want = _run(q, kp, vp, lengths, table, impl="dense")
    got = _run(q, kp, vp, lengths, table, impl="xla", pages_per_block=pages_per_block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[0] == 0)


def test_xla_matches_dense_bfloat16():
    q, kp, vp, lengths, table, keys, values = _scenario(2)
    want = _run(q, kp, vp, lengths, table, jnp.bfloat16, impl="dense")
    got = _run(q, kp, vp, lengths, table, jnp.bfloat16, impl="xla", pages_per_block=2)
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    # And against float64 over the bfloat16-rounded inputs.
    rounded = [np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, keys, values)]
    np.testing.assert_allclose(got, _reference(*rounded, lengths), rtol=3e-2, atol=3e-2)


def _count_trips(monkeypatch):
    """Counts the iterations of every `lax.while_loop` run from now on, as executed."""
    trips = []
    original = jax.lax.while_loop

    def counting(cond, body, init):
        def counted(carry):
            jax.debug.callback(lambda: trips.append(1))
            return body(carry)

        return original(cond, counted, init)

    monkeypatch.setattr(jax.lax, "while_loop", counting)
    return trips


@pytest.mark.parametrize("lengths", [(0, 0, 0), (9, 2, 16), (1, 64, 1)])
def test_xla_work_follows_the_filled_pages(lengths, monkeypatch):
    """As many loop trips as the longest row's blocks; pages past them (NaN here) never read."""
    m, bp = 16, 2
    q, kp, vp, lens, table, keys, values = _scenario(3, lengths=lengths, m=m, num_pages=48)
    blocks = math.ceil(max(lengths) / (bp * PS))
    # Everything past the longest row's blocks, in the pool and the table, is NaN or junk.
    used = {int(p) for row in table for p in row[: blocks * bp] if 0 <= p < 48}
    poisoned = [p for p in range(48) if p not in used]
    kp_nan, vp_nan = kp.copy(), vp.copy()
    kp_nan[:, poisoned], vp_nan[:, poisoned] = np.nan, np.nan
    trips = _count_trips(monkeypatch)
    got = _run(q, kp_nan, vp_nan, lens, table, fn=paged_attention, impl="xla", pages_per_block=bp)
    assert len(trips) == blocks
    assert np.all(np.isfinite(got))
    clean = _run(q, kp, vp, lens, table, impl="xla", pages_per_block=bp)
    np.testing.assert_array_equal(got, clean)
    np.testing.assert_allclose(got, _reference(q, keys, values, lens), rtol=1e-5, atol=1e-5)


def test_xla_ignores_nan_in_unfilled_slots_and_pages():
    """Slots past a row's length in its last page and junk table entries may hold NaN."""
    q, kp, vp, lengths, table, keys, values = _scenario(4)
    kp, vp = kp.copy(), vp.copy()
    written = np.zeros(kp.shape[1:3], bool)
    for row, n in enumerate(lengths):
        for j in range(n):
            written[table[row, j // PS], j % PS] = True
    kp[:, ~written], vp[:, ~written] = np.nan, np.nan
    for impl in ("xla", "dense"):
        got = _run(q, kp, vp, lengths, table, impl=impl, pages_per_block=4)
        np.testing.assert_allclose(got, _reference(q, keys, values, lengths), rtol=1e-5, atol=1e-5)


def test_jit_inside_while_loop():
    """Decode steps in a `lax.while_loop` under jit: write a token, attend, grow the lengths."""
    q, kp, vp, lengths, table, keys, values = _scenario(5, lengths=(0, 3, 4, 8), m=4, reserve=True)
    steps = 5
    rng = np.random.default_rng(5)
    qs = rng.normal(size=(steps, *q.shape)).astype(np.float32)
    valid = np.array([True, True, False, True])
    new_k = rng.normal(size=(steps, 4, K, DH)).astype(np.float32)
    new_v = rng.normal(size=(steps, 4, K, DH)).astype(np.float32)

    @jax.jit
    def decode(kp, vp, lengths, qs, new_k, new_v):
        def body(carry):
            i, kp, vp, lengths, outs = carry
            kp, vp = write_decode(kp, vp, new_k[i], new_v[i], table, lengths, valid)
            lengths = lengths + valid
            out = paged_attention(qs[i], kp, vp, lengths, table, impl="xla", pages_per_block=2)
            return i + 1, kp, vp, lengths, outs.at[i].set(out)

        init = (0, kp, vp, lengths, jnp.zeros(qs.shape))
        return jax.lax.while_loop(lambda c: c[0] < steps, body, init)[-1]

    got = np.asarray(decode(*(jnp.asarray(x) for x in (kp, vp, lengths, qs, new_k, new_v))))
    lens = lengths.copy()
    for i in range(steps):
        for row in np.flatnonzero(valid):
            keys[row, lens[row]], values[row, lens[row]] = new_k[i, row], new_v[i, row]
        lens = lens + valid
        want = _reference(qs[i], keys, values, lens)
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-5, err_msg=f"step {i}")


def test_write_prompt_then_decode_round_trip():
    """A left-padded prefill in two chunks, then decode writes with some rows idle: the pool
    equals the one written position by position in NumPy, and attention over it the reference."""
    rng = np.random.default_rng(6)
    b, t, m, num_pages = 4, 7, 5, 24
    table = rng.permutation(num_pages)[: b * m].reshape(b, m).astype(np.int32)
    kp0 = rng.normal(size=(K, num_pages, PS, DH)).astype(np.float32)
    vp0 = rng.normal(size=(K, num_pages, PS, DH)).astype(np.float32)
    keys = np.zeros((b, m * PS, K, DH), np.float32)
    values = np.zeros_like(keys)
    want_k, want_v = kp0.copy(), vp0.copy()
    kp, vp = jnp.asarray(kp0), jnp.asarray(vp0)
    lens = np.zeros(b, np.int32)

    def put(row, pos, kk, vv):
        keys[row, pos], values[row, pos] = kk, vv
        want_k[:, table[row, pos // PS], pos % PS] = kk
        want_v[:, table[row, pos // PS], pos % PS] = vv

    for chunk_lengths in ((7, 0, 3, 4), (2, 0, 7, 0)):  # row 1 never prefills
        chunk_k = rng.normal(size=(b, t, K, DH)).astype(np.float32)
        chunk_v = rng.normal(size=(b, t, K, DH)).astype(np.float32)
        n = np.asarray(chunk_lengths, np.int32)
        kp, vp = jax.jit(write_prompt)(
            kp, vp, chunk_k, chunk_v, jnp.asarray(table), jnp.asarray(n), jnp.asarray(lens)
        )
        for row in range(b):
            for i in range(n[row]):
                put(row, lens[row] + i, chunk_k[row, t - n[row] + i], chunk_v[row, t - n[row] + i])
        lens = lens + n
    for valid in ((True, False, True, True), (False, True, True, False)):
        new_k = rng.normal(size=(b, K, DH)).astype(np.float32)
        new_v = rng.normal(size=(b, K, DH)).astype(np.float32)
        kp, vp = jax.jit(write_decode)(kp, vp, new_k, new_v, table, lens, np.asarray(valid))
        for row in np.flatnonzero(valid):
            put(row, lens[row], new_k[row], new_v[row])
        lens = lens + np.asarray(valid)
    np.testing.assert_array_equal(np.asarray(kp), want_k)
    np.testing.assert_array_equal(np.asarray(vp), want_v)
    q = rng.normal(size=(b, H, DH)).astype(np.float32)
    want = _reference(q, keys, values, lens)
    for impl in ("xla", "dense"):
        got = _run(q, kp, vp, lens, table, impl=impl, pages_per_block=2)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_writes_outside_the_table_are_dropped():
    """A decode position past the row's M pages, a negative one and a table entry outside the
    pool write nothing."""
    q, kp, vp, lengths, table, *_ = _scenario(7)
    new = np.ones((len(lengths), K, DH), np.float32)
    table = table.copy()
    table[2, 0], table[3, 1] = -1, NUM_PAGES
    positions = np.array([M * PS, -1, 0, PS, 0, 0], np.int32)
    valid = np.array([True, True, True, True, False, False])
    k2, v2 = write_decode(kp, vp, new, new, table, positions, valid)
    np.testing.assert_array_equal(np.asarray(k2), kp)
    np.testing.assert_array_equal(np.asarray(v2), vp)


def test_decode_write_updates_donated_pages_in_place():
    _, kp, vp, lengths, table, *_ = _scenario(8)
    new = np.ones((len(lengths), K, DH), np.float32)
    valid = np.ones(len(lengths), bool)
    write = jax.jit(write_decode, donate_argnums=(0, 1))
    args = (jnp.asarray(kp), jnp.asarray(vp), new, new, table, lengths % (M * PS), valid)
    hlo = write.lower(*args).compile().as_text()
    assert "input_output_alias" in hlo, "the pages must alias the outputs"
    k2, _ = write(*args)
    assert args[0].is_deleted() and k2.shape == kp.shape


# The kernels' shapes: TPU Mosaic wants Dh % 128 == 0 and ps % 16 == 0; Triton power-of-2 blocks.
KERNEL_SHAPES = dict(lengths=(0, 1, 16, 37), k=2, h=8, dh=128, ps=16, m=4, num_pages=16)


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_pallas_kernels_in_interpreter_match_xla(impl):
    q, kp, vp, lengths, table, keys, values = _scenario(9, **KERNEL_SHAPES)
    want = _run(q, kp, vp, lengths, table, impl="xla", pages_per_block=2)
    got = _run(q, kp, vp, lengths, table, impl=impl, pages_per_block=2, interpret=True)
    # The TPU kernel reads K/V through bfloat16.
    tol = 3e-2 if impl == "pallas_tpu" else 1e-5
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    assert np.all(got[0] == 0)


def test_pallas_tpu_interpreter_finds_no_race():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call
    from jax.experimental.pallas import tpu as pltpu

    shapes = dict(KERNEL_SHAPES, lengths=(0, 37), k=1, h=4)  # small: race detection is slow
    q, kp, vp, lengths, table, *_ = _scenario(10, **shapes)
    args = [jnp.asarray(x) for x in (q, kp, vp, lengths, table)]
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(detect_races=True)):
        # interpret=False: the kernel takes the interpret mode (with race detection) set here.
        out = paged_attention(*args, impl="pallas_tpu", pages_per_block=2, interpret=False)
        jax.block_until_ready(out)
    assert interpret_pallas_call.races is not None
    assert not interpret_pallas_call.races.races_found


@pytest.mark.parametrize("platform, kernel", [("tpu", "_pallas_tpu"), ("gpu", "_pallas_gpu")])
def test_auto_picks_the_platform_kernel_or_falls_back_to_xla(platform, kernel, monkeypatch):
    monkeypatch.setattr(pa, "_platform", lambda: platform)
    monkeypatch.setattr(pa, kernel, lambda *a: "kernel")
    q, kp, vp, lengths, table, *_ = _scenario(11, **KERNEL_SHAPES)
    args = [jnp.asarray(x) for x in (q, kp, vp, lengths, table)]
    assert paged_attention(*args, pages_per_block=2) == "kernel"
    # Dh = 96 suits neither kernel: "auto" runs "xla", forcing the kernel raises.
    q, kp, vp, lengths, table, *_ = _scenario(11, dh=96, ps=16, m=4, lengths=(3, 40))
    args = [jnp.asarray(x) for x in (q, kp, vp, lengths, table)]
    np.testing.assert_array_equal(
        np.asarray(paged_attention(*args)), np.asarray(paged_attention(*args, impl="xla"))
    )
    with pytest.raises(ValueError, match="head dim"):
        paged_attention(*args, impl=kernel[1:])


def test_auto_is_xla_on_cpu_and_bad_arguments_raise():
    q, kp, vp, lengths, table, *_ = _scenario(12)
    args = [jnp.asarray(x) for x in (q, kp, vp, lengths, table)]
    np.testing.assert_array_equal(_run(*args), _run(*args, impl="xla", pages_per_block=8))
    with pytest.raises(ValueError, match="impl"):
        paged_attention(*args, impl="flash")
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(*args[:3], args[3][:2], args[4])
    with pytest.raises(ValueError, match="page_table"):
        paged_attention(*args[:4], args[4][:2])
    with pytest.raises(ValueError, match="K"):
        paged_attention(args[0][:, :3], *args[1:])
