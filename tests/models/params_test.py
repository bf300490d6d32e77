"""Sharded random initialisation, abstract shapes of the real models, presets."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from ares_jax.models.qwen2_5_vl import config, params


def _count(model) -> int:
    _, state = nnx.split(model)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("name,expected", [("3b", 3.755e9), ("7b", 8.292e9)])
def test_abstract_real_shapes_allocate_nothing(name, expected):
    model = params.abstract_model(config.preset(name))
    leaf = model.language_model.layers.q.get_value()
    assert isinstance(leaf, jax.ShapeDtypeStruct)
    assert _count(model) == pytest.approx(expected, rel=1e-3)  # QWEN2_5_VL.md 1.1


def test_sharded_init_equals_single_device():
    cfg = config.preset("tiny")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    sharded = params.init_model(cfg, mesh=mesh, seed=3)
    single = params.init_model(cfg, seed=3)
    gate = sharded.language_model.layers.gate[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    for a, b in zip(
        jax.tree.leaves(nnx.split(sharded)[1]), jax.tree.leaves(nnx.split(single)[1]), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_presets_and_unknown_name():
    tiny, small = config.preset("tiny"), config.preset("small")
    assert tiny.text.vocab_size >= 554 and small.tie_word_embeddings
    assert _count(params.abstract_model(small)) < 10_000_000
    with pytest.raises(ValueError, match="Unknown model preset 'huge'"):
        config.preset("huge")


def test_invalid_config_names_the_problem():
    with pytest.raises(ValueError, match="mrope_section"):
        config.Qwen2_5_VLConfig(text=config.TextConfig(mrope_section=(8, 8, 8)))
