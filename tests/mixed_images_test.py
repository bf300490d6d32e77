"""One large image among small ones: the sampler's vision inputs are packed (every image's own
patches and windows, no padding to the largest), and each prompt's output does not depend on
the other images of its batch."""

import io

import jax
import numpy as np
import PIL.Image

from ares_jax import batching
from ares_jax.models.qwen2_5_vl import config, params
from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
from ares_jax.sampling import SamplingParams, generate


def _png(h, w, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_large_image_costs_its_own_windows_only():
    model = params.init_model(config.preset("tiny"), seed=0)
    cfg = model.cfg
    tokenizer = build_tokenizer()
    sizes = [(28, 28), (56, 28), (224, 336), (28, 56)]  # one 12x larger than the rest together
    images = [[_png(h, w, i)] for i, (h, w) in enumerate(sizes)]
    questions = [f"What is in picture {i}?" for i in range(len(sizes))]
    encode = dict(
        template="Answer.", min_pixels=28 * 28, max_pixels=224 * 336, length_buckets=(160,)
    )
    prompts = batching.encode_prompts(questions, images, tokenizer, cfg, **encode)
    inputs = batching.sampler_inputs(prompts, cfg)
    grids = np.concatenate(prompts.grids)
    # Packed: the real patch rows are the images' own, summed; the layout holds the windows
    # they need, bucketed (at most twice), far below every image padded to the largest.
    patches = np.prod(grids, 1)
    rows = inputs.vision.pixels.shape[0]
    assert int((np.asarray(inputs.vision.segment_ids) > 0).sum()) == int(patches.sum())
    windows = batching.windows_of(prompts, range(len(sizes)), cfg)
    per_window = rows // batching.window_bucket(windows)
    assert rows == batching.window_bucket(windows) * per_window < 2 * windows * per_window
    assert rows < len(sizes) * patches.max()
    # Each prompt's rows are what it gives alone (the sampler keys rows by prompt index).
    sp = SamplingParams(n=2, max_new_tokens=6, temperature=1.0)
    key = jax.random.PRNGKey(0)
    together = generate(model, inputs=inputs, sampling=sp, key=key)
    for p in (0, 2):
        alone = batching.encode_prompts([questions[p]], [images[p]], tokenizer, cfg, **encode)
        out = generate(
            model,
            inputs=batching.sampler_inputs(alone, cfg),
            sampling=sp,
            key=key,
            first_prompt=p,
        )
        np.testing.assert_array_equal(out.tokens, together.tokens[2 * p : 2 * p + 2])
        np.testing.assert_allclose(out.logp, together.logp[2 * p : 2 * p + 2], atol=1e-5)
