"""Parity of the Flax Qwen2.5-VL with transformers' PyTorch implementation (QWEN2_5_VL.md 6).

Tiny random configs with every weight perturbed, three images of different shapes (merged grids
that are not multiples of the window, one smaller than a window) across two left-padded rows,
loaded through transformers' save_pretrained and our from_pretrained.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import params, positions
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.models.qwen2_5_vl.processor import preprocess_image
from tests.hf_tiny import IMG, MIN_PIXELS
from tests.hf_tiny import hf_batch as _batch
from tests.hf_tiny import hf_model as _hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.requires_torch


def _hf_logits(model, batch):
    model.model.rope_deltas = None
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.tensor((batch["input_ids"] == IMG).astype(np.int64)),
        )
    return out.logits.float().numpy()


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    hf = _hf_model(tie=request.param)
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(path)
    ours = params.from_pretrained(path, dtype=jnp.float32)
    return hf, ours, path


def test_logits_match(pair):
    hf, ours, _ = pair
    batch = _batch()
    ref = _hf_logits(hf, batch)
    got = np.asarray(ours(**batch))
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], ref[valid], atol=1e-4, rtol=1e-4)
    assert (got[valid].argmax(-1) == ref[valid].argmax(-1)).all()


def test_image_features_match(pair):
    hf, ours, _ = pair
    batch = _batch()
    with torch.no_grad():
        ref = hf.model.get_image_features(
            torch.tensor(batch["pixel_values"]), torch.tensor(batch["image_grid_thw"])
        ).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, list | tuple) else ref
    inp = model_inputs.from_hf(ours.cfg, **batch)
    got = np.asarray(ours.image_features(jax.tree.map(jnp.asarray, inp.vision)))
    assert got.shape[0] >= ref.shape[0]  # the image tokens' features first, then padding slots
    np.testing.assert_allclose(got[: ref.shape[0]], ref.numpy(), atol=1e-5, rtol=1e-4)


def test_image_features_of_one_large_and_many_tiny_images_match(pair):
    """The packed layout: one large image among tiny ones costs its own windows only (no frame
    padded to the largest), and the features equal transformers' for every image."""
    hf, ours, _ = pair
    rng = np.random.default_rng(1)
    sizes = [(28, 28), (900, 1600), (40, 30), (28, 56), (56, 28), (30, 40)]
    pix, grids = zip(
        *[
            preprocess_image(
                rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8),
                min_pixels=MIN_PIXELS,
                max_pixels=28 * 28 * 1280,
            )
            for h, w in sizes
        ],
        strict=True,
    )
    pixels, grid = np.concatenate(pix).astype(np.float32), np.asarray(grids, np.int64)
    with torch.no_grad():
        ref = hf.model.get_image_features(torch.tensor(pixels), torch.tensor(grid)).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, list | tuple) else ref
    meta = positions.vision_metadata(grid)
    windows = positions.num_windows(grid)
    big = positions.num_windows(grid[1:2])
    assert windows < 2 * big  # padded to the largest frame it would be 6 * big
    assert meta.source.shape == (64 * windows,)
    vision = model_inputs.vision_inputs(pixels, meta)
    got = np.asarray(ours.image_features(jax.tree.map(jnp.asarray, vision)))
    np.testing.assert_allclose(got[: ref.shape[0]], ref.numpy(), atol=1e-4, rtol=1e-4)


def test_scan_and_unrolled_layers_agree(pair):
    _, ours, path = pair
    batch = _batch()
    unrolled = params.from_pretrained(path, dtype=jnp.float32, scan_layers=False, remat=True)
    np.testing.assert_allclose(
        np.asarray(unrolled(**batch)), np.asarray(ours(**batch)), atol=1e-5, rtol=1e-5
    )


def test_padded_patch_bucket_gives_same_logits(pair):
    _, ours, _ = pair
    batch = _batch()
    inp = model_inputs.from_hf(ours.cfg, **batch)
    windows = inp.vision.segment_ids.shape[0] // 64
    padded = model_inputs.from_hf(ours.cfg, **batch, num_windows=windows + 5)
    assert padded.vision.pixels.shape[0] > inp.vision.pixels.shape[0]
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(ours(padded))[valid], np.asarray(ours(inp))[valid], atol=1e-5, rtol=1e-5
    )


def test_cached_decode_matches_recompute_and_hf(pair):
    hf, ours, _ = pair
    batch = _batch()
    b, t = batch["input_ids"].shape
    inp = jax.tree.map(jnp.asarray, model_inputs.from_hf(ours.cfg, **batch))
    cache = ours.init_cache(b, t + 4)
    _, cache = ours.prefill(inp, cache)
    new = np.array([17, 33])
    hidden, cache = ours.decode_step(jnp.asarray(new, jnp.int32), cache)
    step_logits = np.asarray(ours.logits(hidden))
    # Full recompute over the extended sequence.
    ext = dict(batch)
    ext["input_ids"] = np.concatenate([batch["input_ids"], new[:, None]], axis=1)
    ext["attention_mask"] = np.concatenate([batch["attention_mask"], np.ones((b, 1), np.int64)], 1)
    full = np.asarray(ours(**ext))[:, -1]
    np.testing.assert_allclose(step_logits, full, atol=1e-4, rtol=1e-4)
    # transformers' cached step, with explicit 3-axis positions (QWEN2_5_VL.md 7).
    hf.model.rope_deltas = None
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(batch["input_ids"]),
            attention_mask=torch.tensor(batch["attention_mask"]),
            pixel_values=torch.tensor(batch["pixel_values"]),
            image_grid_thw=torch.tensor(batch["image_grid_thw"]),
            mm_token_type_ids=torch.tensor((batch["input_ids"] == IMG).astype(np.int64)),
            use_cache=True,
        )
        pos = torch.tensor(np.asarray(cache.next_pos) - 1)[None, :, None].expand(3, b, 1)
        step = hf(
            input_ids=torch.tensor(new[:, None]),
            attention_mask=torch.tensor(ext["attention_mask"]),
            cache=out.past_key_values,
            position_ids=pos,
            use_cache=True,
        )
    np.testing.assert_allclose(step_logits, step.logits[:, -1].numpy(), atol=1e-4, rtol=1e-4)


def test_bf16_agrees_loosely(pair):
    hf, _, path = pair
    batch = _batch()
    ref = _hf_logits(hf, batch)
    ours16 = params.from_pretrained(path, dtype=jnp.bfloat16)
    got = np.asarray(ours16(**batch))
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(got[valid] - ref[valid]).max() < 5e-2
    assert (got[valid].argmax(-1) == ref[valid].argmax(-1)).mean() > 0.95


def test_export_then_transformers_load(pair, tmp_path):
    hf, ours, _ = pair
    batch = _batch()
    params.save_pretrained(ours, tmp_path, dtype="float32", max_shard_bytes=200_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded export exercised
    reloaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        _hf_logits(reloaded, batch)[valid], _hf_logits(hf, batch)[valid], atol=1e-5, rtol=1e-5
    )


def test_sharded_load_equals_single_device(pair):
    _, ours, path = pair
    batch = _batch()
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ("data", "fsdp", "tensor"))
    sharded = params.from_pretrained(path, dtype=jnp.float32, mesh=mesh)
    leaf = sharded.language_model.layers.gate[...]
    assert len(leaf.sharding.device_set) == 8
    assert leaf.addressable_shards[0].data.size < leaf.size  # really split, not replicated
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda m, x: m(x))(sharded, model_inputs.from_hf(ours.cfg, **batch))),
        np.asarray(ours(**batch)),
        atol=1e-5,
        rtol=1e-5,
    )


def test_flat_legacy_config_is_read(pair, tmp_path):
    _, ours, path = pair
    nested = json.loads((path / "config.json").read_text())
    flat = {k: v for k, v in nested.items() if k != "text_config"}
    text = nested["text_config"]
    flat.update({k: v for k, v in text.items() if k not in ("rope_parameters", "model_type")})
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    flat["rope_theta"] = text["rope_parameters"]["rope_theta"]
    cfg = type(ours.cfg).from_hf_dict(flat)
    assert cfg == ours.cfg


def test_bad_checkpoints_fail_clearly(pair, tmp_path):
    _, ours, path = pair
    with pytest.raises(FileNotFoundError, match="does not exist"):
        params.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="No config.json"):
        params.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="only 'qwen2_5_vl'"):
        params.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        params.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        params.from_pretrained(tmp_path)
    batch = _batch()
    batch["image_grid_thw"] = batch["image_grid_thw"][:2]
    with pytest.raises(ValueError, match="more or fewer images than placeholders"):
        ours(**batch)


def test_functional_entry_points_are_pure(pair):
    from flax import nnx

    from ares_jax.models.qwen2_5_vl import model as M

    _, ours, _ = pair
    graphdef, state = nnx.split(ours)
    inp = jax.tree.map(jnp.asarray, model_inputs.from_hf(ours.cfg, **_batch()))
    fwd = jax.jit(M.forward, static_argnums=0)
    a = fwd(graphdef, state, inp)
    doubled = jax.tree.map(lambda x: x * 1.0, state)
    b = fwd(graphdef, doubled, inp)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(inp, ModelInputs)


def test_bf16_checkpoint_round_trip(pair, tmp_path):
    hf, ours, _ = pair
    params.save_pretrained(ours, tmp_path, dtype="bfloat16")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    back = params.from_pretrained(tmp_path, dtype=jnp.float32)  # reads BF16 tensors
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path, attn_implementation="eager", dtype=torch.float32
    ).eval()
    batch = _batch()
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(back(**batch))[valid], _hf_logits(ref, batch)[valid], atol=1e-4, rtol=1e-4
    )
