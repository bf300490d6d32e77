"""A tiny random transformers Qwen2.5-VL and a batch of images, shared by the parity tests.

Every weight is perturbed (transformers' init leaves norms at 1 and biases at 0, which would hide
loader bugs); three images whose merged grids are not multiples of the window, one smaller than
a window, across two left-padded rows (QWEN2_5_VL.md 6).
"""

import numpy as np

from ares_jax.models.qwen2_5_vl.processor import preprocess_image

IMG, VID, VS, VE = 250, 251, 252, 253
MIN_PIXELS, MAX_PIXELS = 3136, 28 * 28 * 256


def hf_model(tie: bool = False, noise: float = 0.02):
    import torch
    import transformers

    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            max_position_embeddings=512,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
            window_size=112,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
        ),
        image_token_id=IMG,
        video_token_id=VID,
        vision_start_token_id=VS,
        vision_end_token_id=VE,
        tie_word_embeddings=tie,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF init leaves norms at 1 and biases at 0: perturb everything.
        for p in model.parameters():
            scale = 0.1 if p.ndim == 1 else noise
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def hf_batch():
    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        for h, w in [(230, 270), (90, 60), (130, 400)]
    ]
    pix, grids = zip(
        *[preprocess_image(im, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS) for im in images],
        strict=True,
    )
    tokens = [int(np.prod(g)) // 4 for g in grids]
    assert tokens == [80, 6, 70]

    def text(n):
        return list(rng.integers(3, 240, size=n))

    row0 = text(5) + [VS] + [IMG] * 80 + [VE] + text(7) + [VS] + [IMG] * 6 + [VE] + text(3)
    row1 = text(4) + [VS] + [IMG] * 70 + [VE] + text(6)
    length = len(row0)
    ids = np.zeros((2, length), np.int64)
    mask = np.zeros((2, length), np.int64)
    ids[0], mask[0] = row0, 1
    ids[1, length - len(row1) :], mask[1, length - len(row1) :] = row1, 1  # left padding
    return dict(
        input_ids=ids,
        attention_mask=mask,
        pixel_values=np.concatenate(pix).astype(np.float32),
        image_grid_thw=np.asarray(grids, np.int64),
    )
