"""The model's attention implementations (`model.attention`) against XLA's dense-mask attention.

Every `ops.attention` kernel the model can be set to (the Pallas ones run interpreted on CPU) must
give the hidden states, and the parameter gradients, of `jax.nn.dot_product_attention` with the
dense mask, for packed rows of several sequences and for prompts with images (the vision tower's
full attention goes through the same kernel). Under a mesh the Pallas kernels must run per shard
(`shard_map`), also when the KV heads are split differently from the query heads.
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from ares_jax import batching as B
from ares_jax.models.qwen2_5_vl import config, params, text, tokenizer
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.parallel import mesh as M
from configs import common

CFG = config.preset("tiny")


def _png(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _packed_text():
    """Two rows: three sequences and padding; one sequence and trailing padding."""
    b, t = 2, 160
    seg = np.zeros((b, t), np.int32)
    seg[0, :50], seg[0, 50:130], seg[0, 135:150] = 1, 2, 3
    seg[1, :150] = 1
    pos = np.zeros((3, b, t), np.int32)
    for r in range(b):
        for s in np.unique(seg[r][seg[r] > 0]):
            at = np.flatnonzero(seg[r] == s)
            pos[:, r, at] = np.arange(len(at))
    ids = np.random.default_rng(0).integers(10, CFG.text.vocab_size, (b, t)).astype(np.int32)
    return ModelInputs(*(jnp.asarray(x) for x in (ids, seg, pos)), None, None), seg > 0


def encode(questions, images):
    """Sampler inputs of `questions` with their images (lists of PNG bytes), rows of 128."""
    prompts = B.encode_prompts(
        questions,
        images,
        tokenizer.build_tokenizer(),
        CFG,
        template="Think, then answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=3136 * 8,
        length_buckets=(128, 256),
    )
    return jax.tree.map(jnp.asarray, B.sampler_inputs(prompts, CFG))


def _with_images():
    inputs = encode(
        ["Count the dots.", "How many squares?"],
        [[_png(84, 56, 1), _png(56, 56, 2)], [_png(112, 168, 3)]],
    )
    return inputs, np.asarray(inputs.attention_mask)


def _cotangent(inputs):
    """Random weights at real positions; 0 at padding, whose output the implementations define
    differently (XLA's attention attends earlier keys, `ops.attention` outputs 0)."""
    shape = (*inputs.input_ids.shape, CFG.text.hidden_size)
    real = (inputs.attention_mask != 0)[..., None]
    return jax.random.normal(jax.random.PRNGKey(1), shape) * real


def _forward_and_grads(impl, inputs, mesh=None):
    """Hidden states and the gradient of sum(hidden * cot) for every parameter, float32; with
    `mesh`, parameters sharded on it and the step run under it (asserting a `shard_map`)."""
    model = params.init_model(CFG, seed=3, attention_impl=impl, mesh=mesh)
    graphdef, state = nnx.split(model)
    cot = _cotangent(inputs)

    def loss(state):
        h = nnx.merge(graphdef, state).hidden_states(inputs)
        return jnp.sum(h * cot), h

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    if mesh is None:
        (_, h), grads = fn(state)
    else:
        with jax.set_mesh(mesh):
            assert "shard_map" in str(jax.make_jaxpr(fn)(state))
            (_, h), grads = fn(state)
    return np.asarray(h), [np.asarray(g) for g in jax.tree.leaves(grads)]


def _assert_equal(got, want, real):
    (h, grads), (want_h, want_grads) = got, want
    np.testing.assert_allclose(h[real], want_h[real], atol=2e-5)
    scale = max(float(np.abs(g).max()) for g in want_grads)
    assert scale > 0
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * scale)


@pytest.fixture(scope="module")
def references():
    return {
        "packed": _forward_and_grads("xla", _packed_text()[0]),
        "images": _forward_and_grads("xla", _with_images()[0]),
    }


# 'auto' is 'blockwise' on CPU (below); the interpreted Pallas kernels are slow, so the image
# case (the vision tower's full attention through the kernel) runs for Splash only.
@pytest.mark.parametrize(
    "case,impl",
    [
        ("packed", "blockwise"),
        ("packed", "splash"),
        ("packed", "pallas_gpu"),
        ("images", "auto"),
        ("images", "splash"),
    ],
)
def test_kernel_equals_the_dense_mask(references, case, impl):
    inputs, real = _packed_text() if case == "packed" else _with_images()
    _assert_equal(_forward_and_grads(impl, inputs), references[case], real)


def test_auto_is_the_blockwise_path_on_cpu():
    inputs, _ = _packed_text()
    model = params.init_model(CFG, seed=3, attention_impl="auto")
    jaxpr = str(jax.make_jaxpr(lambda x: model.hidden_states(x))(inputs))
    assert "pallas_call" not in jaxpr and "dot_product_attention" not in jaxpr
    assert "while" in jaxpr  # the blockwise loops


def test_unknown_implementation_names_the_choices():
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*splash"):
        params.init_model(CFG, seed=3, attention_impl="flash")
    assert common.MODEL_ATTENTION == text.IMPLEMENTATIONS


@pytest.mark.parametrize("shape", [(2, 1, 2), (1, 2, 4)], ids=["kv-split", "kv-replicated"])
def test_pallas_kernel_runs_per_shard_under_a_mesh(references, shape):
    """fsdp x tensor: rows over the data axes, heads over tensor; with tensor=4 the tiny model's
    2 KV heads are replicated while its 4 query heads are split."""
    devices = jax.devices()[: int(np.prod(shape))]
    mesh = M.make_mesh(dict(zip(M.AXES, shape, strict=True)), devices=devices)
    inputs, real = _packed_text()
    _assert_equal(_forward_and_grads("splash", inputs, mesh), references["packed"], real)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)])
def test_cache_step_attention_equals_dot_product_attention(dtype, tol):
    """A decode step's attention (one query per row over a dense cache, grouped-query heads)
    equals `jax.nn.dot_product_attention` with the same mask: rows with masked slots, a row with
    one valid key, and a row with none (finite, as XLA's masking gives it). The cache is laid out
    [B, K, S, hd] (`model.KV_AXES`)."""
    b, s, h, kv, d = 4, 37, 4, 2, 16
    r = np.random.default_rng(0)
    q, k, v = (
        jnp.asarray(r.standard_normal(shape), dtype)
        for shape in ((b, 1, h, d), (b, s, kv, d), (b, s, kv, d))
    )
    mask = r.random((b, 1, s)) < 0.7
    mask[1] = False
    mask[1, 0, 5] = True  # one valid key
    mask[2] = False  # none
    mask = jnp.asarray(mask)
    want = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])
    got = text.cache_step_attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask)
    assert got.shape == want.shape and got.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(got.astype(jnp.float32))))
    np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )
    np.testing.assert_allclose(
        np.asarray(got[1], np.float32),
        np.asarray(v[1, 5][None].repeat(2, 1), np.float32),
        atol=tol,
    )
    # `text.attention` over a cache in the [B, S, K, hd] layout (prefills without a kernel)
    routed = text.attention(q, k, v, mask, implementation="auto")
    np.testing.assert_allclose(
        np.asarray(routed, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol
    )
