"""Tests for ares_jax/parallel/rules.py on the 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ares_jax.parallel import make_mesh, rules


@pytest.fixture(scope="module")
def mesh222():
    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def test_every_logical_name_has_a_rule():
    assert set(rules.LOGICAL_NAMES) == set(rules.DEFAULT_RULES)
    for name in ("batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
                 "layers", "patches", "vision_embed"):  # fmt: skip
        assert name in rules.DEFAULT_RULES


@pytest.mark.parametrize(
    "axes, spec",
    [
        # Parameters.
        (("embed", "mlp"), P("fsdp", "tensor")),
        (("mlp", "embed"), P("tensor", "fsdp")),
        (("vocab", "embed"), P("tensor", "fsdp")),
        (("embed", "heads", "head_dim"), P("fsdp", "tensor", None)),
        (("layers", "embed", "kv_heads", "head_dim"), P(None, "fsdp", "tensor", None)),
        (("patch_in", "vision_embed"), P(None, "fsdp")),
        # Activations: batch takes data and fsdp, so embed stays whole.
        (("batch", "length", "embed"), P(("data", "fsdp"), None, None)),
        (("batch", "length", "heads", "head_dim"), P(("data", "fsdp"), None, "tensor", None)),
        (("batch", "length", "vocab"), P(("data", "fsdp"), None, "tensor")),
        (("batch", "kv_length", "kv_heads", "head_dim"), P(("data", "fsdp"), None, "tensor", None)),
        (("patches", "vision_embed"), P(("data", "fsdp"), None)),
        ((None, "mlp"), P(None, "tensor")),
    ],
)
def test_default_specs(axes, spec):
    assert rules.logical_to_spec(axes) == spec


def test_overrides_merge_over_defaults():
    over = {"embed": None, "vocab": ("fsdp", "tensor")}
    assert rules.logical_to_spec(("vocab", "embed"), over) == P(("fsdp", "tensor"), None)
    assert rules.logical_to_spec(("embed", "mlp"), over) == P(None, "tensor")  # mlp kept
    pairs = (("batch", "data"), ("kv_heads", None))
    assert rules.logical_to_spec(("batch", "length", "kv_heads"), pairs) == P("data", None, None)
    assert rules.DEFAULT_RULES["embed"] == "fsdp"  # defaults untouched


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match=r"unknown logical axis name 'embd'; known names: batch"):
        rules.logical_to_spec(("embd", "mlp"))
    with pytest.raises(ValueError, match=r"unknown logical axis name 'expert'"):
        rules.merge_rules({"expert": "tensor"})
    with pytest.raises(TypeError, match=r"rule for 'embed'"):
        rules.merge_rules({"embed": 3})


def test_unknown_mesh_axis_is_an_error(mesh222):
    with pytest.raises(ValueError, match=r"mesh axis 'expert'"):
        rules.logical_to_spec(("embed",), {"embed": "expert"}, mesh=mesh222)


def test_rank_mismatch_is_an_error(mesh222):
    with pytest.raises(ValueError, match=r"name 2 dimensions but the shape \(4,\)"):
        rules.logical_to_spec(("embed", "mlp"), shape=(4,), mesh=mesh222)


def test_non_divisible_dimensions_fall_back():
    m = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    # 2 KV heads over tensor=4: replicated; 8 query heads: split.
    assert rules.logical_to_spec(("embed", "kv_heads", "head_dim"), shape=(64, 2, 16), mesh=m) == P(
        "fsdp", None, None
    )
    assert rules.logical_to_spec(("embed", "heads", "head_dim"), shape=(64, 8, 16), mesh=m) == P(
        "fsdp", "tensor", None
    )
    # A batch of 3 over data=1, fsdp=2: data (size 1) kept, fsdp dropped.
    assert rules.logical_to_spec(("batch", "length"), shape=(3, 5), mesh=m) == P("data", None)
    m2 = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    # Batch 4 over data=2, fsdp=4: the longest dividing prefix is data alone.
    assert rules.logical_to_spec(("batch",), shape=(4,), mesh=m2) == P("data")
    assert rules.logical_to_spec(("batch",), shape=(16,), mesh=m2) == P(("data", "fsdp"))
    s = rules.logical_sharding(m, ("embed", "kv_heads", "head_dim"), shape=(64, 2, 16))
    x = jax.device_put(jnp.zeros((64, 2, 16)), s)
    assert x.sharding.spec == P("fsdp", None, None)


def test_sharded_matmul_matches_unsharded(mesh222):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 6, 16), dtype=np.float32)  # [B, T, D]
    w = rng.standard_normal((16, 32), dtype=np.float32)  # [D, F]
    expected = np.einsum("btd,df->btf", x, w)

    xs = jax.device_put(x, rules.logical_sharding(mesh222, ("batch", "length", "embed")))
    ws = jax.device_put(w, rules.logical_sharding(mesh222, ("embed", "mlp")))
    assert xs.sharding.spec == P(("data", "fsdp"), None, None)
    assert ws.sharding.spec == P("fsdp", "tensor")

    @jax.jit
    def f(x, w):
        y = jnp.einsum("btd,df->btf", x, w)
        return rules.constrain(y, ("batch", "length", "mlp"))

    with jax.set_mesh(mesh222):
        y = f(xs, ws)
    assert y.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5, atol=1e-5)

    # Explicit mesh argument, outside any mesh context.
    g = jax.jit(lambda x, w: rules.constrain(x @ w, ("batch", "length", "mlp"), mesh=mesh222))
    y2 = g(xs, ws)
    assert y2.sharding.spec == P(("data", "fsdp"), None, "tensor")
    np.testing.assert_allclose(np.asarray(y2), expected, rtol=1e-5, atol=1e-5)


def test_constrain_without_mesh_is_identity():
    x = jnp.arange(6.0).reshape(2, 3)
    assert rules.constrain(x, ("batch", "embed")) is x
    y = jax.jit(lambda x: rules.constrain(x * 2, ("batch", "embed")))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


def test_constrain_falls_back_for_odd_shapes(mesh222):
    @jax.jit
    def f(x):
        return rules.constrain(x + 1, ("batch", "kv_heads"))

    with jax.set_mesh(mesh222):
        y = f(jnp.ones((3, 3)))  # neither 3 rows nor 3 heads divide: replicated
    assert y.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(y), 2 * np.ones((3, 3)))


def test_tree_shardings(mesh222):
    shapes = {"w": jax.ShapeDtypeStruct((16, 32), jnp.float32),
              "b": jax.ShapeDtypeStruct((3,), jnp.float32)}  # fmt: skip
    axes = {"w": ("embed", "mlp"), "b": ("mlp",)}
    out = rules.tree_shardings(mesh222, axes, shapes)
    assert out["w"].spec == P("fsdp", "tensor") and out["b"].spec == P(None)
