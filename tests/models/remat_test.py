"""Remat policies of the layer stacks (`model.remat`, models/qwen2_5_vl/layers.py): every policy
gives the loss and gradients of no checkpoint, and 'attention' keeps the blockwise attention's
residuals so that the backward pass does not rerun its forward (plain checkpoint does)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ares_jax.models.qwen2_5_vl import config, params
from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import model as M
from ares_jax.models.qwen2_5_vl.layers import REMAT_POLICIES, checkpoint_policy, remat_policy
from ares_jax.models.qwen2_5_vl.processor import preprocess_image

CFG = config.preset("tiny")


def _batch(with_image: bool) -> M.ModelInputs:
    """Two left-padded rows; with an image (6 image tokens) in the first."""
    rng = np.random.default_rng(0)
    text = lambda n: list(rng.integers(3, 500, size=n))  # noqa: E731
    kw = {}
    if with_image:
        pix, grid = preprocess_image(
            rng.integers(0, 256, size=(90, 60, 3), dtype=np.uint8),
            min_pixels=3136,
            max_pixels=28 * 28 * 256,
        )
        n_img = int(np.prod(grid)) // 4
        row0 = text(5) + [CFG.vision_start_token_id] + [CFG.image_token_id] * n_img
        row0 += [CFG.vision_end_token_id] + text(9)
        kw = dict(pixel_values=pix.astype(np.float32), image_grid_thw=np.asarray([grid]))
    else:
        row0 = text(24)
    row1 = text(len(row0) - 7)
    ids = np.zeros((2, len(row0)), np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = row0, 1
    ids[1, 7:], mask[1, 7:] = row1, 1
    return jax.tree.map(jnp.asarray, model_inputs.from_hf(CFG, ids, mask, **kw))


def _loss_and_grads(remat, inputs, *, scan=True):
    model = params.init_model(CFG, seed=0, scan_layers=scan, remat=remat)
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = M.forward(graphdef, state, inputs)[:, :-1]
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = inputs.input_ids[:, 1:]
        picked = jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        return -jnp.sum(jnp.where(inputs.attention_mask[:, 1:], picked, 0.0))

    return jax.jit(jax.value_and_grad(loss))(state)


# Every policy on text; with an image (the vision tower's layers take the policy too) the full
# recompute and the host offload, the two whose code paths differ most from no checkpointing
# (the other policies' image runs added two minutes to the suite).
@pytest.mark.parametrize(
    "with_image, policies",
    [(False, REMAT_POLICIES[1:]), (True, ("full", "offload"))],
    ids=["text", "image"],
)
def test_every_policy_matches_no_checkpoint(with_image, policies):
    inputs = _batch(with_image)
    ref_loss, ref_grads = _loss_and_grads("none", inputs)
    for policy in policies:
        loss, grads = _loss_and_grads(policy, inputs)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=policy)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
        ):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"{policy} {path}")


def test_unrolled_layers_take_the_policy_too():
    inputs = _batch(True)
    ref_loss, ref_grads = _loss_and_grads("none", inputs, scan=False)
    loss, grads = _loss_and_grads("attention", inputs, scan=False)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _attention_runs(remat, impl) -> int:
    """Attention loops or kernels in the text decoder's gradient: the blockwise path runs one
    while loop per forward (over key blocks) and one per backward (over query blocks); Splash one
    Pallas call per forward and two per backward (in one count: its dq and dkv kernels)."""
    model = params.init_model(CFG, seed=0, remat=remat, attention_impl=impl)
    graphdef, state = nnx.split(model)
    inputs = _batch(False)
    loss = lambda s: jnp.sum(M.hidden_states(graphdef, s, inputs))  # noqa: E731
    marker = "while[" if impl == "blockwise" else "pallas_call["
    return str(jax.make_jaxpr(jax.grad(loss))(state)).count(marker)


@pytest.mark.parametrize("impl", ["blockwise", "splash"])
def test_attention_policy_does_not_rerun_the_attention_forward(impl):
    runs = {p: _attention_runs(p, impl) for p in ("none", "full", "attention", "offload")}
    assert runs["full"] > runs["none"], runs  # plain checkpoint reruns the attention forward
    assert runs["attention"] == runs["offload"] == runs["none"], runs


def test_bools_are_the_old_switch_and_unknown_names_fail():
    assert remat_policy(True) == "full" and remat_policy(False) == "none"
    assert checkpoint_policy("full") is None
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        remat_policy("some")
