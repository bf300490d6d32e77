"""Qwen2.5-VL configuration: parsed from a checkpoint's config.json, or a named preset.

Hub checkpoints store a flat legacy config (text fields at the top level, `rope_scaling` with
`type: mrope`); transformers 5 writes a nested one (`text_config`, `vision_config`,
`rope_parameters`). `from_hf_dict` reads both; `to_hf_dict` writes the nested layout, which both
transformers 4.5x and 5.x load. Class defaults of transformers are never used (QWEN2_5_VL.md 1.3):
every value comes from the file or from a preset here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision tower (QWEN2_5_VL.md 1.2)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 2048
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Features of one flattened patch row: channels x temporal x patch x patch (1176)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen2 text decoder (QWEN2_5_VL.md 1.1, 3.3)."""

    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    max_position_embeddings: int = 128000

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLConfig:  # noqa: N801 - the model's name
    """The whole model: vision tower, text decoder and the special token ids."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    tie_word_embeddings: bool = True

    def __post_init__(self):
        v, t = self.vision, self.text
        problems = []
        if t.hidden_size % t.num_attention_heads:
            problems.append("text hidden_size must be divisible by num_attention_heads")
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append("num_attention_heads must be divisible by num_key_value_heads")
        if sum(t.mrope_section) * 2 != t.head_dim:
            problems.append(
                f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if v.hidden_size % v.num_heads or v.head_dim % 4:
            problems.append("vision head_dim must be an integer divisible by 4")
        if v.out_hidden_size != t.hidden_size:
            problems.append(
                f"vision out_hidden_size {v.out_hidden_size} must equal text hidden_size "
                f"{t.hidden_size}"
            )
        if any(not 0 <= i < v.depth for i in v.fullatt_block_indexes):
            problems.append(f"fullatt_block_indexes {v.fullatt_block_indexes} outside the depth")
        for name in ("image_token_id", "vision_start_token_id", "vision_end_token_id"):
            if not 0 <= getattr(self, name) < t.vocab_size:
                problems.append(f"{name}={getattr(self, name)} is outside the vocabulary")
        if problems:
            raise ValueError("Invalid Qwen2.5-VL config: " + "; ".join(problems) + ".")

    # ------------------------------------------------------------------------------------------
    # Hugging Face config.json
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], *, source: str = "config.json") -> Qwen2_5_VLConfig:
        """Parses a Hugging Face Qwen2.5-VL config dict, flat (hub) or nested (transformers 5)."""
        model_type = d.get("model_type")
        if model_type != "qwen2_5_vl":
            raise ValueError(
                f"{source}: model_type is {model_type!r}; only 'qwen2_5_vl' checkpoints are "
                "supported."
            )
        text = dict(d.get("text_config") or {})
        # Flat layout: text keys at the top level; nested values win where both exist.
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "rope_theta",
            "max_position_embeddings",
            "rope_scaling",
            "rope_parameters",
            "tie_word_embeddings",
        ):
            if key in d and key not in text:
                text[key] = d[key]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        missing = [k for k in required if k not in text]
        if missing:
            raise ValueError(f"{source}: missing text config keys {missing}.")
        heads = text.get("num_attention_heads")
        text_cfg = TextConfig(
            vocab_size=int(text["vocab_size"]),
            hidden_size=int(text["hidden_size"]),
            intermediate_size=int(text["intermediate_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            num_attention_heads=int(heads),
            num_key_value_heads=int(text.get("num_key_value_heads") or heads),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))),
            mrope_section=tuple(int(x) for x in rope.get("mrope_section", (16, 24, 24))),
            max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        )
        vis = dict(d.get("vision_config") or {})
        vision_rope = vis.get("rope_parameters") or {}
        vision_cfg = VisionConfig(
            depth=int(vis.get("depth", 32)),
            hidden_size=int(vis.get("hidden_size", 1280)),
            intermediate_size=int(vis.get("intermediate_size", 3420)),
            num_heads=int(vis.get("num_heads", 16)),
            in_channels=int(vis.get("in_channels", vis.get("in_chans", 3))),
            patch_size=int(vis.get("patch_size", vis.get("spatial_patch_size", 14))),
            temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
            window_size=int(vis.get("window_size", 112)),
            out_hidden_size=int(vis.get("out_hidden_size", text_cfg.hidden_size)),
            fullatt_block_indexes=tuple(int(i) for i in vis.get("fullatt_block_indexes", ())),
            tokens_per_second=int(vis.get("tokens_per_second", 2)),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
        )
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = text.get("tie_word_embeddings", False)
        return cls(
            vision=vision_cfg,
            text=text_cfg,
            image_token_id=int(d.get("image_token_id", 151655)),
            video_token_id=int(d.get("video_token_id", 151656)),
            vision_start_token_id=int(d.get("vision_start_token_id", 151652)),
            vision_end_token_id=int(d.get("vision_end_token_id", 151653)),
            bos_token_id=_token_id(d, text, "bos_token_id", 151643),
            eos_token_id=_token_id(d, text, "eos_token_id", 151645),
            pad_token_id=_token_id(d, text, "pad_token_id", 151643),
            tie_word_embeddings=bool(tie),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2_5_VLConfig:
        """Reads `config.json` from a checkpoint directory (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"No config.json in checkpoint directory {path}.")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno}).") from e
        return cls.from_hf_dict(data, source=str(file))

    def to_hf_dict(self, *, dtype: str = "bfloat16") -> dict[str, Any]:
        """The nested config.json that transformers 5 writes (also read by 4.5x)."""
        t, v = self.text, self.vision
        text = dict(
            model_type="qwen2_5_vl_text",
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            hidden_act="silu",
            rms_norm_eps=t.rms_norm_eps,
            max_position_embeddings=t.max_position_embeddings,
            use_sliding_window=False,
            attention_dropout=0.0,
            rope_parameters=dict(
                rope_type="default", rope_theta=t.rope_theta, mrope_section=list(t.mrope_section)
            ),
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            dtype=dtype,
        )
        vision = dict(
            model_type="qwen2_5_vl_vision",
            depth=v.depth,
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_heads=v.num_heads,
            in_channels=v.in_channels,
            patch_size=v.patch_size,
            temporal_patch_size=v.temporal_patch_size,
            spatial_merge_size=v.spatial_merge_size,
            window_size=v.window_size,
            out_hidden_size=v.out_hidden_size,
            fullatt_block_indexes=list(v.fullatt_block_indexes),
            tokens_per_second=v.tokens_per_second,
            hidden_act="silu",
        )
        return dict(
            architectures=["Qwen2_5_VLForConditionalGeneration"],
            model_type="qwen2_5_vl",
            text_config=text,
            vision_config=vision,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id,
            tie_word_embeddings=self.tie_word_embeddings,
            dtype=dtype,
        )


def _token_id(top: dict, text: dict, key: str, default: int) -> int:
    """A special token id from the top level or the text config (a list gives its first)."""
    value = top.get(key)
    if value is None:
        value = text.get(key)
    if value is None:
        return default
    return int(value[0] if isinstance(value, list | tuple) else value)


# ---------------------------------------------------------------------------------------------
# Presets. `tiny` and `small` use the project's in-code tokenizer (tokenizer.py), whose special
# ids they carry; `3b` and `7b` are the published shapes with the Qwen vocabulary.
# ---------------------------------------------------------------------------------------------


def _preset_3b() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision=VisionConfig(out_hidden_size=2048),
        text=TextConfig(),
        tie_word_embeddings=True,
    )


def _preset_7b() -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision=VisionConfig(out_hidden_size=3584),
        text=TextConfig(
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
        ),
        tie_word_embeddings=False,
    )


def _with_project_tokenizer(vision: VisionConfig, text: TextConfig, tie: bool) -> Qwen2_5_VLConfig:
    from ares_jax.models.qwen2_5_vl import tokenizer as tok  # numpy/tokenizers only

    ids = tok.special_ids()
    return Qwen2_5_VLConfig(
        vision=vision,
        text=text,
        image_token_id=ids.image_pad,
        video_token_id=ids.video_pad,
        vision_start_token_id=ids.vision_start,
        vision_end_token_id=ids.vision_end,
        bos_token_id=ids.endoftext,
        eos_token_id=ids.im_end,
        pad_token_id=ids.pad,
        tie_word_embeddings=tie,
    )


def _preset_tiny() -> Qwen2_5_VLConfig:
    from ares_jax.models.qwen2_5_vl import tokenizer as tok

    vocab = -(-tok.vocab_size() // 64) * 64
    return _with_project_tokenizer(
        VisionConfig(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            fullatt_block_indexes=(1,),
        ),
        TextConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(2, 3, 3),
            max_position_embeddings=4096,
        ),
        tie=False,
    )


def _preset_small() -> Qwen2_5_VLConfig:
    from ares_jax.models.qwen2_5_vl import tokenizer as tok

    vocab = -(-tok.vocab_size() // 64) * 64
    return _with_project_tokenizer(
        VisionConfig(
            depth=4,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            out_hidden_size=128,
            fullatt_block_indexes=(1, 3),
        ),
        TextConfig(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            mrope_section=(4, 6, 6),
            max_position_embeddings=8192,
        ),
        tie=True,
    )


PRESETS = {"tiny": _preset_tiny, "small": _preset_small, "3b": _preset_3b, "7b": _preset_7b}


def preset(name: str) -> Qwen2_5_VLConfig:
    """A named configuration: 'tiny' (tests), 'small' (embedded default), '3b', '7b'."""
    if name not in PRESETS:
        raise ValueError(f"Unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}.")
    return PRESETS[name]()
