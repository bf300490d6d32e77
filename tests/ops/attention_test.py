"""Tests of ares_jax.ops.attention: every implementation against the dense reference.

"splash" and "pallas_gpu" run in the Pallas interpreter on CPU; "cudnn" and the compiled kernels
run only on their hardware (markers gpu / tpu, skipped elsewhere by conftest.py).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops.attention import attention, prefix_attention

B, S, H, K, DH = 2, 200, 4, 2, 32
# Row 0: three segments of unequal length, padding in the middle and at the end.
# Row 1: two segments and trailing padding. S = 200 is no multiple of any block used below.
SEGMENTS = np.array(
    [
        [1] * 70 + [2] * 50 + [0] * 10 + [3] * 40 + [0] * 30,
        [5] * 23 + [9] * 157 + [0] * 20,
    ],
    np.int32,
)
# What each implementation is called with on CPU: small "xla" blocks so that S spans several
# blocks of unequal query and key length.
CPU_IMPLS = {
    "xla": dict(impl="xla", block_q=64, block_kv=32),
    "splash": dict(impl="splash", interpret=True, block_q=128),
    "pallas_gpu": dict(impl="pallas_gpu", interpret=True),
}


def _inputs(seed, dtype=jnp.float32, b=B, s=S, h=H, k=K, dh=DH):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, s, h, dh)), dtype)
    kk = jnp.asarray(rng.normal(size=(b, s, k, dh)), dtype)
    v = jnp.asarray(rng.normal(size=(b, s, k, dh)), dtype)
    cot = jnp.asarray(rng.normal(size=(b, s, h, dh)), jnp.float32)
    return q, kk, v, cot


def _value_and_grads(fn, q, k, v, cot):
    """Output and d(sum(out * cot))/d(q, k, v), all as float32 NumPy."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * cot), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *grads)]


def _assert_close(got, want, tol, what):
    """Max abs error relative to the largest reference magnitude."""
    assert np.all(np.isfinite(got)), what
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def _check_against_dense(kwargs, segments, causal, dtype, tol, seed=0):
    q, k, v, cot = _inputs(seed, dtype, b=segments.shape[0], s=segments.shape[1])
    seg = jnp.asarray(segments)
    got = _value_and_grads(
        functools.partial(attention, segment_ids=seg, causal=causal, **kwargs), q, k, v, cot
    )
    # The reference sees the same (possibly bfloat16-rounded) values in float32.
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _value_and_grads(
        functools.partial(attention, segment_ids=seg, causal=causal, impl="dense"), *f32, cot
    )
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        _assert_close(g, w, tol, f"{kwargs['impl']} causal={causal} {name}")
    padding = segments == 0
    assert np.all(got[0][padding] == 0), "padding queries must output exactly 0"
    assert np.all(got[1][padding] == 0), "padding queries must get zero gradient"
    # Padding keys are never attended, so their k and v get zero gradient.
    assert np.all(got[2][padding] == 0) and np.all(got[3][padding] == 0)
    return got


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", sorted(CPU_IMPLS))
def test_matches_dense_float32(name, causal):
    _check_against_dense(CPU_IMPLS[name], SEGMENTS, causal, jnp.float32, tol=1e-5)


@pytest.mark.parametrize("name", sorted(CPU_IMPLS))
def test_all_padding_row_is_zero_not_nan(name):
    segments = SEGMENTS.copy()
    segments[1] = 0
    got = _check_against_dense(CPU_IMPLS[name], segments, True, jnp.float32, tol=1e-5)
    for x in got:
        assert np.all(x[1] == 0)


@pytest.mark.parametrize("name", ["xla", "splash"])
def test_bfloat16_against_float32_dense(name):
    _check_against_dense(CPU_IMPLS[name], SEGMENTS, True, jnp.bfloat16, tol=2e-2)


def test_dense_matches_plain_softmax_per_segment():
    """The reference itself: each segment alone through a textbook causal softmax in NumPy."""
    q, k, v, _ = _inputs(1)
    out = np.asarray(
        attention(q, k, v, segment_ids=jnp.asarray(SEGMENTS), causal=True, impl="dense")
    )
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)
    for row in range(B):
        for seg_id in set(SEGMENTS[row]) - {0}:
            idx = np.flatnonzero(SEGMENTS[row] == seg_id)
            logits = np.einsum("qhd,shd->hqs", q[row, idx], k[row, idx]) * DH**-0.5
            logits = np.where(np.tril(np.ones((len(idx),) * 2, bool)), logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            want = np.einsum("hqs,shd->qhd", p, v[row, idx])
            np.testing.assert_allclose(out[row, idx], want, rtol=1e-5, atol=1e-5)
        assert np.all(out[row, SEGMENTS[row] == 0] == 0)


def test_auto_is_xla_on_cpu_and_unknown_impl_raises():
    q, k, v, _ = _inputs(2, s=40)
    seg = jnp.asarray(SEGMENTS[:, :40])
    auto = attention(q, k, v, segment_ids=seg, causal=True)
    xla = attention(q, k, v, segment_ids=seg, causal=True, impl="xla")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(xla))
    with pytest.raises(ValueError, match="known"):
        attention(q, k, v, segment_ids=seg, causal=True, impl="flash")


def test_cudnn_refuses_packed_rows():
    q, k, v, _ = _inputs(3, dtype=jnp.bfloat16, s=40)
    with pytest.raises(ValueError, match="one segment per row"):
        attention(q, k, v, segment_ids=jnp.asarray(SEGMENTS[:, :40]), causal=True, impl="cudnn")


def test_xla_sharded_over_batch_and_heads_matches_single_device():
    q, k, v, cot = _inputs(4)
    seg = jnp.asarray(SEGMENTS)
    fn = functools.partial(attention, segment_ids=seg, causal=True, impl="xla", block_q=64)
    want = _value_and_grads(fn, q, k, v, cot)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    heads = NamedSharding(mesh, P("data", None, "model", None))
    q, k, v, cot = (jax.device_put(x, heads) for x in (q, k, v, cot))
    got = _value_and_grads(fn, q, k, v, cot)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _temp_bytes(impl, s=8192, h=2, dh=64):
    """Temp memory of the compiled forward+backward at B=1."""
    spec = jax.ShapeDtypeStruct((1, s, h, dh), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def loss(q, k, v, seg):
        return jnp.sum(attention(q, k, v, segment_ids=seg, causal=True, impl=impl))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(spec, spec, spec, seg).compile().memory_analysis().temp_size_in_bytes


def test_xla_never_holds_seq_by_seq_scores():
    one_scores = 8192 * 8192 * 4  # one [S, S] float32 array: 256 MiB
    xla, dense = _temp_bytes("xla"), _temp_bytes("dense")
    mib = lambda n: f"{n / 2**20:.1f} MiB"
    print(f"temp memory at S=8192, H=2, Dh=64: xla {mib(xla)}, dense {mib(dense)}")
    assert xla < one_scores // 4
    assert dense > one_scores


def test_xla_inside_a_differentiated_layer_scan_holds_no_block_pair_buffers():
    """As the decoder runs it: in a `lax.scan` over layers (with remat), differentiated. With
    scans for its block loops, JAX hoisted a [nq, nk, ..., bq, bk] mask and score buffer per
    block pair out of them, which is the [S, S] scores again."""
    s, h, dh = 4096, 2, 64
    spec = jax.ShapeDtypeStruct((1, s, h * dh), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, s), jnp.int32)

    def loss(x, seg):
        def layer(x, w):
            q = (x * w).reshape(1, s, h, dh)
            return attention(q, q, q, segment_ids=seg, causal=True, impl="xla").reshape(x.shape)

        x, _ = jax.lax.scan(lambda x, w: (jax.checkpoint(layer)(x, w), None), x, jnp.ones(3))
        return jnp.sum(x)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(spec, seg))
    nq = nk = s // 512
    assert not re.findall(rf"\[{nq},{nk}(,\d+){{3,}}\]", jaxpr)  # [nq, nk, B] tables only
    temp = jax.jit(jax.grad(loss)).lower(spec, seg).compile().memory_analysis().temp_size_in_bytes
    scores = s * s * h * 4  # one layer's [H, S, S] float32 scores: 128 MiB
    print(f"temp of 3 scanned layers at S={s}: {temp / 2**20:.1f} MiB")
    assert temp < scores // 4


# ---------------------------------------------------------------------------------------------
# Hardware-only: the compiled kernels.
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_cudnn_right_padded_rows_on_gpu(causal):
    segments = np.array([[1] * 180 + [0] * 20, [4] * 200], np.int32)
    _check_against_dense(dict(impl="cudnn"), segments, causal, jnp.bfloat16, tol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_pallas_gpu_and_auto_on_gpu(causal):
    _check_against_dense(dict(impl="pallas_gpu"), SEGMENTS, causal, jnp.bfloat16, tol=2e-2)
    _check_against_dense(dict(impl="auto"), SEGMENTS, causal, jnp.bfloat16, tol=2e-2)


@pytest.mark.tpu
@pytest.mark.parametrize("causal", [True, False])
def test_splash_on_tpu(causal):
    _check_against_dense(dict(impl="splash"), SEGMENTS, causal, jnp.bfloat16, tol=2e-2)


def test_splash_over_more_blocks_than_smem_holds_runs_the_xla_path(monkeypatch):
    """Splash's block tables live in SMEM; a longer sequence (the vision tower's full attention
    over a large prefill batch) takes the blockwise XLA path, with the same result."""
    from ares_jax.ops import attention as A

    q, k, v, _ = _inputs(5)
    seg = jnp.asarray(SEGMENTS)

    def fn(q):  # traces are cached by function object: the second trace takes a new one
        return attention(q, k, v, segment_ids=seg, causal=True, **CPU_IMPLS["splash"])

    assert "pallas_call" in str(jax.make_jaxpr(fn)(q))  # S = 200: 2 blocks of 128
    monkeypatch.setattr(A, "SPLASH_MAX_BLOCKS", 1)
    fn = functools.partial(fn)
    assert "pallas_call" not in str(jax.make_jaxpr(fn)(q))
    want = attention(q, k, v, segment_ids=seg, causal=True, impl="dense")
    np.testing.assert_allclose(np.asarray(fn(q)), np.asarray(want), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# prefix_attention: a prefill chunk against the keys of the chunks so far.
# ---------------------------------------------------------------------------------------------

T, C = 130, 40
# Row 0: left padding over the first chunk and more; row 1: real from 3 with a hole of padding;
# row 2: all padding.
KV_MASK = np.zeros((3, T), bool)
KV_MASK[0, 50:] = True
KV_MASK[1, 3:] = True
KV_MASK[1, 60:70] = False


def _prefix_inputs(seed, b=3, t=T, c=C, h=H, k=K, dh=DH):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, c, h, dh)).astype(np.float32)
    kk = rng.normal(size=(b, t, k, dh)).astype(np.float32)
    v = rng.normal(size=(b, t, k, dh)).astype(np.float32)
    return q, kk, v


def _prefix_reference(q, k, v, q_start, kv_mask):
    """Textbook softmax in float64 with the explicit [B, C, T] mask; 0 where nothing is seen."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    q_pos = q_start + np.arange(q.shape[1])
    ok = (np.arange(k.shape[1])[None, :] <= q_pos[:, None])[None] & kv_mask[:, None, :]
    logits = np.einsum("bqhd,bshd->bhqs", q, k) * q.shape[-1] ** -0.5
    logits = np.where(ok[:, None], logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.exp(logits - np.where(np.isfinite(m), m, 0.0))
    total = p.sum(-1, keepdims=True)
    p = p / np.where(total > 0, total, 1.0)
    return np.einsum("bhqs,bshd->bqhd", p, v), ok.any(-1)


@pytest.mark.parametrize("block_kv", [16, 48, 512])  # 48 divides neither T nor C; 512 > T
@pytest.mark.parametrize("q_start", [0, 37, 64, T - C])
def test_prefix_attention_matches_masked_softmax(q_start, block_kv):
    q, k, v = _prefix_inputs(q_start + block_kv)
    got = np.asarray(
        prefix_attention(
            jnp.asarray(q),
            jnp.asarray(k),
            jnp.asarray(v),
            q_start=q_start,
            kv_mask=jnp.asarray(KV_MASK),
            block_kv=block_kv,
        )
    )
    want, seen = _prefix_reference(q, k, v, q_start, KV_MASK)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[~seen] == 0), "queries with no key to attend must output exactly 0"
    assert np.all(got[2] == 0)  # the all-padding row
    if q_start == 0:
        assert not seen[0].any()  # row 0's chunk is all padding


def test_prefix_attention_jitted_with_traced_start_reads_no_block_past_the_chunk():
    """q_start traced (the chunk loop's index): one compilation for every start. Keys and values
    of the blocks past the chunk are NaN, so a block that were read and masked would give NaN."""
    q, k, v = _prefix_inputs(7)
    fn = jax.jit(functools.partial(prefix_attention, kv_mask=jnp.asarray(KV_MASK), block_kv=16))
    for q_start in (0, 45, T - C):
        end = -(-(q_start + C) // 16) * 16  # first position of the first block past the chunk
        k_nan, v_nan = k.copy(), v.copy()
        k_nan[:, end:], v_nan[:, end:] = np.nan, np.nan
        got = np.asarray(fn(q, k_nan, v_nan, q_start=jnp.int32(q_start)))
        want, _ = _prefix_reference(q, k, v, q_start, KV_MASK)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert fn._cache_size() == 1


def test_prefix_attention_sharded_over_batch_and_heads_matches_single_device():
    q, k, v = _prefix_inputs(8, b=4)
    mask = jnp.asarray(np.concatenate([KV_MASK, KV_MASK[:1]]))
    fn = jax.jit(functools.partial(prefix_attention, q_start=jnp.int32(50), block_kv=32))
    want = np.asarray(fn(q, k, v, kv_mask=mask))
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
    heads = NamedSharding(mesh, P("data", None, "model", None))
    q, k, v = (jax.device_put(x, heads) for x in (q, k, v))
    mask = jax.device_put(mask, NamedSharding(mesh, P("data", None)))
    np.testing.assert_allclose(np.asarray(fn(q, k, v, kv_mask=mask)), want, rtol=1e-6, atol=1e-6)


def test_prefix_attention_holds_chunk_by_block_scores_only():
    c, t, h, dh = 256, 16384, 2, 64
    q = jax.ShapeDtypeStruct((1, c, h, dh), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, h, dh), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    fn = jax.jit(functools.partial(prefix_attention, block_kv=512))
    compiled = fn.lower(q, kv, kv, q_start=jnp.int32(0), kv_mask=mask).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    scores = c * t * h * 4  # one [H, C, T] float32 score array: 32 MiB
    print(f"prefix_attention temp at C={c}, T={t}: {temp / 2**20:.1f} MiB")
    assert temp < scores // 8


def test_prefix_attention_rejects_bad_shapes():
    q, k, v = _prefix_inputs(9)
    mask = jnp.asarray(KV_MASK)
    with pytest.raises(ValueError, match="q_start"):
        prefix_attention(q, k, v, q_start=T - C + 1, kv_mask=mask)
    with pytest.raises(ValueError, match="K dividing H"):
        prefix_attention(q[:, :, :3], k, v, q_start=0, kv_mask=mask)
    with pytest.raises(ValueError, match="kv_mask"):
        prefix_attention(q, k, v, q_start=0, kv_mask=mask[:, 1:])


def test_default_blocks_by_platform():
    """The blockwise path takes 64-long blocks compiled for a CPU and 512 elsewhere; the kernels
    keep 512 everywhere (`default_block`)."""
    from ares_jax.ops import attention as A

    assert A.default_block("xla", "cpu") == A.CPU_BLOCK == 64
    assert A.default_block("xla", "tpu") == A.default_block("xla", "gpu") == A.BLOCK == 512
    assert A.default_block("splash", "cpu") == A.BLOCK
