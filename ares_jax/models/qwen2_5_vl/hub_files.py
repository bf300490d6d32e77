"""The side files of a Hugging Face checkpoint directory: image processor, generation, dtype.

A Qwen2.5-VL directory comes in two layouts:
  * the hub's: `preprocessor_config.json` holds the image processor's settings at top level;
  * transformers 5 `save_pretrained`: `processor_config.json` holds them under "image_processor"
    (beside "video_processor" and the processor's own keys), and there may be no
    preprocessor_config.json.
`read_image_settings` reads either (the JSON itself, no transformers import), and
`write_export_files` writes what a transformers user loads: preprocessor_config.json in the
hub's layout with the settings the run used (so evaluating the export preprocesses images as
training did), generation_config.json (the source's, else one from the tokenizer's special
tokens) and the source's chat template files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ares_jax.models.qwen2_5_vl.processor import (
    HUB_MAX_PIXELS,
    HUB_MIN_PIXELS,
    IMAGE_MEAN,
    IMAGE_STD,
    ImageSettings,
)

PREPROCESSOR = "preprocessor_config.json"
PROCESSOR = "processor_config.json"
GENERATION = "generation_config.json"
# Chat template files transformers reads beside the tokenizer (copied from the source).
CHAT_TEMPLATES = ("chat_template.jinja", "chat_template.json")


def _json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}.")
    return data


def image_processor_dict(directory: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The image processor's settings of a checkpoint directory and the file they came from:
    preprocessor_config.json, else processor_config.json's "image_processor"; None if neither
    file exists."""
    d = Path(directory)
    if (d / PREPROCESSOR).is_file():
        return _json(d / PREPROCESSOR), d / PREPROCESSOR
    if (d / PROCESSOR).is_file():
        data = _json(d / PROCESSOR)
        if not isinstance(data.get("image_processor"), dict):
            raise ValueError(
                f'{d / PROCESSOR}: has no "image_processor" object (keys: {sorted(data)}).'
            )
        return data["image_processor"], d / PROCESSOR
    return None


def read_image_settings(directory: str | os.PathLike[str]) -> ImageSettings | None:
    """`ImageSettings` from either layout (module docstring); None without a processor file.

    Pixel limits are `min_pixels`/`max_pixels`, else `size.shortest_edge`/`size.longest_edge`
    (both layouts write both in transformers 5); patch, temporal patch and merge sizes and the
    normalisation default to the hub's Qwen2.5-VL values when absent.

    Raises:
      ValueError: naming the file and key, when a value is missing or malformed.
    """
    found = image_processor_dict(directory)
    if found is None:
        return None
    proc, path = found
    size = proc.get("size") or {}

    def number(key, value):
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: {key} must be a positive number, got {value!r}.")
        return int(value)

    min_pixels = proc.get("min_pixels", size.get("shortest_edge"))
    max_pixels = proc.get("max_pixels", size.get("longest_edge"))
    if min_pixels is None or max_pixels is None:
        raise ValueError(
            f"{path}: gives no pixel limits (min_pixels/max_pixels or size.shortest_edge/"
            "size.longest_edge)."
        )
    mean, std = proc.get("image_mean", IMAGE_MEAN), proc.get("image_std", IMAGE_STD)
    for key, value in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(value, list | tuple) and len(value) == 3):
            raise ValueError(f"{path}: {key} must be 3 numbers, got {value!r}.")
    settings = ImageSettings(
        min_pixels=number("min_pixels", min_pixels),
        max_pixels=number("max_pixels", max_pixels),
        patch_size=number("patch_size", proc.get("patch_size", 14)),
        temporal_patch_size=number("temporal_patch_size", proc.get("temporal_patch_size", 2)),
        merge_size=number("merge_size", proc.get("merge_size", 2)),
        mean=tuple(float(x) for x in mean),
        std=tuple(float(x) for x in std),
    )
    if settings.min_pixels > settings.max_pixels:
        raise ValueError(
            f"{path}: min_pixels {settings.min_pixels} > max_pixels {settings.max_pixels}."
        )
    return settings


def source_dtype(directory: str | os.PathLike[str]) -> str | None:
    """The dtype a checkpoint's config.json records ("dtype" in transformers 5, "torch_dtype"
    before; top level or in text_config), or None."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    cfg = _json(path)
    for holder in (cfg, cfg.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if isinstance(holder.get(key), str):
                return holder[key]
    return None


def generation_stops(directory: str | os.PathLike[str]) -> tuple[int, ...]:
    """The token ids generation stops at by the checkpoint's generation_config.json
    (`eos_token_id`, an id or a list); () without the file or the key.

    Raises:
      ValueError: naming the file, when eos_token_id is neither an id nor a list of ids.
    """
    path = Path(directory) / GENERATION
    if not path.is_file():
        return ()
    eos = _json(path).get("eos_token_id")
    if eos is None:
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of ids, got {eos!r}.")
    return tuple(ids)


def hub_preprocessor_config(settings: ImageSettings) -> dict[str, Any]:
    """preprocessor_config.json in the hub's layout for `settings`."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(settings.mean),
        "image_std": list(settings.std),
        "min_pixels": settings.min_pixels,
        "max_pixels": settings.max_pixels,
        "size": {"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
        "patch_size": settings.patch_size,
        "temporal_patch_size": settings.temporal_patch_size,
        "merge_size": settings.merge_size,
    }


def default_image_settings(min_pixels: int = HUB_MIN_PIXELS, max_pixels: int = HUB_MAX_PIXELS):
    """The hub's Qwen2.5-VL image processor with the given pixel limits."""
    return ImageSettings(min_pixels, max_pixels, 14, 2, 2, IMAGE_MEAN, IMAGE_STD)


def write_export_files(
    export: str | os.PathLike[str],
    *,
    settings: ImageSettings,
    source: str | os.PathLike[str] | None = None,
    tokenizer=None,
) -> list[str]:
    """Writes the side files of an exported checkpoint (module docstring); returns their names.

    Args:
      export: the export directory (weights and config.json already written or to come).
      settings: the image settings the run preprocessed with (written as preprocessor_config.json,
        so `AutoImageProcessor` and `evaluate --model=EXPORT` use them).
      source: the checkpoint the run started from: its generation_config.json and chat template
        files are copied.
      tokenizer: its eos/pad/bos ids make the generation config when the source has none.
    """
    out = Path(export)
    out.mkdir(parents=True, exist_ok=True)
    written = [PREPROCESSOR]
    with open(out / PREPROCESSOR, "w") as f:
        json.dump(hub_preprocessor_config(settings), f, indent=2)
    src = Path(source) if source else None
    if src is not None and (src / GENERATION).is_file():
        shutil.copyfile(src / GENERATION, out / GENERATION)
        written.append(GENERATION)
    elif tokenizer is not None:
        gen: dict[str, Any] = {"do_sample": True}
        eos = [
            i
            for i in (
                tokenizer.convert_tokens_to_ids("<|im_end|>")
                if "<|im_end|>" in tokenizer.get_vocab()
                else None,
                tokenizer.eos_token_id,
            )
            if i is not None
        ]
        if eos:
            gen["eos_token_id"] = list(dict.fromkeys(eos))
        if tokenizer.pad_token_id is not None:
            gen["pad_token_id"] = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            gen["bos_token_id"] = tokenizer.bos_token_id
        with open(out / GENERATION, "w") as f:
            json.dump(gen, f, indent=2)
        written.append(GENERATION)
    if src is not None:
        for name in CHAT_TEMPLATES:
            if (src / name).is_file() and not (out / name).exists():
                shutil.copyfile(src / name, out / name)
                written.append(name)
    return written
