r"""XLA temporaries of `evaluate`'s vision tower and prefill on one large image among small ones.

The batch `python -m ares_jax.evaluate` builds with its default flags (16 problems per generate
call, prompt bucket 4096, 32768 new tokens, min/max pixels 262144/4194304) when one problem
carries a 1600x900 image, fourteen others small images and one none. Compiled for this
machine's CPU with a preset's shapes ('small', the embedded default, or '3b'; bfloat16 weights and
activations; nothing is allocated: abstract parameters), it prints:
  * the patch rows of the packed vision layout against the rows the per-frame layout needed
    (every frame padded to the largest frame's windows);
  * `memory_analysis()` of the vision tower alone and of the sampler's prefill (vision tower +
    text prompt forward into the KV cache), temporaries and arguments.

  python -m benchmarks.vision_memory
  python -m benchmarks.vision_memory --preset=3b
  python -m benchmarks.vision_memory --record     # also append to RESULTS.md
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ares_jax import batching as B
from ares_jax.evaluate import PAPER_EVAL
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import params, positions
from ares_jax.models.qwen2_5_vl.processor import preprocess_image
from ares_jax.sampling import SamplingParams
from ares_jax.sampling import sampler as S
from benchmarks import report

_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")
_PRESET = flags.DEFINE_string(
    "preset", "small", "Model preset whose shapes are compiled ('small': the embedded default)."
)
_ATTENTION = flags.DEFINE_string("attention", None, "model attention_impl (default: the model's).")

MIN_PIXELS, MAX_PIXELS = 262144, 4194304  # evaluate's defaults
PROMPT_LEN, BATCH = 4096, 16  # evaluate's defaults
SMALL = [(240, 320), (200, 200), (300, 180), (160, 240), (224, 224), (256, 192), (120, 400)]
SIZES = [(900, 1600)] + SMALL * 2  # one large image, 14 small ones; the last problem text only


def _sds(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _prompts(cfg):
    """B prompts of PROMPT_LEN tokens (left-padded), one image each (the last one text only)."""
    rng = np.random.default_rng(0)
    patches, grids = [], []
    for h, w in SIZES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pix, grid = preprocess_image(image, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        patches.append(pix.astype(np.float32))
        grids.append(np.asarray(grid, np.int32).reshape(1, 3))
    patches.append(np.zeros((0, cfg.vision.patch_dim), np.float32))
    grids.append(np.zeros((0, 3), np.int32))
    ids = np.full((BATCH, PROMPT_LEN), cfg.pad_token_id, np.int32)
    mask = np.zeros((BATCH, PROMPT_LEN), bool)
    for b, g in enumerate(grids):
        n_img = int(np.prod(g, 1).sum()) // cfg.vision.spatial_merge_size**2
        row = [11] * 40 + (
            [cfg.vision_start_token_id] + [cfg.image_token_id] * n_img if n_img else []
        )
        row = row + [12] * 60
        ids[b, -len(row) :], mask[b, -len(row) :] = row, True
    pos = np.broadcast_to(np.where(mask, np.cumsum(mask, 1) - 1, 0), (3, BATCH, PROMPT_LEN))
    next_pos = pos.max(axis=(0, 2)) + 1
    return B.Prompts(ids, mask, pos.astype(np.int32), next_pos.astype(np.int32), patches, grids)


def main(argv):
    del argv
    cfg = model_config.preset(_PRESET.value)
    v = cfg.vision
    prompts = _prompts(cfg)
    inputs = B.sampler_inputs(prompts, cfg)
    grid = np.concatenate(prompts.grids)
    win = v.window_size // v.spatial_merge_size // v.patch_size
    per_frame = [
        -(-(h // v.spatial_merge_size) // win) * -(-(w // v.spatial_merge_size) // win)
        for _, h, w in grid.tolist()
    ]
    window_rows = win * win * v.spatial_merge_size**2
    frame_rows = len(per_frame) * max(per_frame) * window_rows
    packed_rows = inputs.vision.pixels.shape[0]
    real_rows = int(np.prod(grid, 1).sum())

    kwargs = {} if _ATTENTION.value is None else {"attention_impl": _ATTENTION.value}
    model = params.abstract_model(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, **kwargs)
    graphdef, state = nnx.split(model)

    def vision(state, vis):
        return nnx.merge(graphdef, state).image_features(vis)

    tower = jax.jit(vision).lower(state, _sds(inputs.vision)).compile().memory_analysis()
    d = PAPER_EVAL  # evaluate's default decoding: 32768 new tokens
    sp = SamplingParams(n=d.n, max_new_tokens=d.max_new_tokens, temperature=d.temperature)
    prefill = (
        S._prefill.lower(graphdef, state, _sds(inputs), sp, PROMPT_LEN + sp.max_new_tokens)
        .compile()
        .memory_analysis()
    )
    lines = [
        f"images: {len(SIZES)} (one 1600x900, {len(SIZES) - 1} of 120x400 to 320x240), "
        f"{real_rows} patch rows; model shapes: {_PRESET.value}, bfloat16",
        f"vision layout rows: packed {packed_rows} (windows {positions.num_windows(grid)} -> "
        f"{packed_rows // window_rows} bucket); per frame padded to the largest {frame_rows} "
        f"({frame_rows / packed_rows:.1f}x)",
        "",
        "| compiled (CPU) | arguments GiB | temporaries GiB |",
        "|---|---:|---:|",
        f"| vision tower | {tower.argument_size_in_bytes / 2**30:.2f} | "
        f"{tower.temp_size_in_bytes / 2**30:.2f} |",
        f"| prefill (B={BATCH}, prompt {PROMPT_LEN}, cache {PROMPT_LEN + sp.max_new_tokens}, "
        f"attention {model.attention_impl}) | {prefill.argument_size_in_bytes / 2**30:.2f} | "
        f"{prefill.temp_size_in_bytes / 2**30:.2f} |",
    ]
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        report.record("vision_memory", _PRESET.value, text)


if __name__ == "__main__":
    app.run(main)
