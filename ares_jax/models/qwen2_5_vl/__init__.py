"""Qwen2.5-VL in Flax NNX: the policy and reference model of ARES.

    from ares_jax.models.qwen2_5_vl import from_pretrained
    model = from_pretrained("/ckpt/Qwen2.5-VL-7B-Instruct", dtype=jnp.bfloat16, mesh=mesh)
    logits = model(input_ids=..., attention_mask=..., pixel_values=..., image_grid_thw=...)

Exports are resolved lazily, so the host-side modules (processor, positions, tokenizer) import
without jax or flax.
"""

import importlib

_EXPORTS = {
    "from_pretrained": "params",
    "save_pretrained": "params",
    "init_model": "params",
    "abstract_model": "params",
    "Qwen2_5_VL": "model",
    "ModelInputs": "model",
    "VisionInputs": "model",
    "KVCache": "model",
    "Qwen2_5_VLConfig": "config",
    "preset": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
