"""Hugging Face checkpoints in and out: the name table, `from_pretrained`, `save_pretrained`.

Names follow the checkpoint files (QWEN2_5_VL.md 4): `visual.*`, `model.*`, `lm_head.weight`;
transformers 5 in-memory names (`model.visual.*`, `model.language_model.*`) are accepted too.
Torch linears store (out, in); ours store (in, out) split per head where useful, so each entry of
the table says how a tensor is reshaped; `{i}` marks per-layer tensors, stacked on a leading axis.

Loading never holds a checkpoint twice: each safetensors shard is memory-mapped, one parameter
(all its layers) is assembled on the host at a time, cast, and placed with
`jax.make_array_from_callback` directly on its final sharding, so every device only receives its
own slice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ares_jax.models.qwen2_5_vl import safetensors_io
from ares_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ares_jax.models.qwen2_5_vl.model import Qwen2_5_VL
from ares_jax.parallel import multihost
from ares_jax.parallel import rules as R

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: our path, the checkpoint name and how the tensor is laid out.

    kind: "copy" (same layout), "linear" (torch (out, in) -> ours (in..., out...), the first
    `in_dims` of our dims forming torch's in axis), "bias" (flattened on the torch side) or
    "conv" (the patch-embedding Conv3d kernel as a matmul).
    """

    ours: tuple[str, ...]
    hf: str
    kind: str = "copy"
    in_dims: int = 1

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf


def _table(cfg: Qwen2_5_VLConfig) -> list[Entry]:
    v, lm = ("visual",), ("language_model",)
    vb, lb = v + ("blocks",), lm + ("layers",)
    entries = [
        Entry(v + ("patch_embed",), "visual.patch_embed.proj.weight", "conv"),
        Entry(vb + ("norm1",), "visual.blocks.{i}.norm1.weight"),
        Entry(vb + ("norm2",), "visual.blocks.{i}.norm2.weight"),
        Entry(vb + ("qkv",), "visual.blocks.{i}.attn.qkv.weight", "linear"),
        Entry(vb + ("qkv_bias",), "visual.blocks.{i}.attn.qkv.bias", "bias"),
        Entry(vb + ("proj",), "visual.blocks.{i}.attn.proj.weight", "linear", 2),
        Entry(vb + ("proj_bias",), "visual.blocks.{i}.attn.proj.bias"),
        Entry(vb + ("gate",), "visual.blocks.{i}.mlp.gate_proj.weight", "linear"),
        Entry(vb + ("gate_bias",), "visual.blocks.{i}.mlp.gate_proj.bias"),
        Entry(vb + ("up",), "visual.blocks.{i}.mlp.up_proj.weight", "linear"),
        Entry(vb + ("up_bias",), "visual.blocks.{i}.mlp.up_proj.bias"),
        Entry(vb + ("down",), "visual.blocks.{i}.mlp.down_proj.weight", "linear"),
        Entry(vb + ("down_bias",), "visual.blocks.{i}.mlp.down_proj.bias"),
        Entry(v + ("merger_norm",), "visual.merger.ln_q.weight"),
        Entry(v + ("merger_fc1",), "visual.merger.mlp.0.weight", "linear"),
        Entry(v + ("merger_fc1_bias",), "visual.merger.mlp.0.bias"),
        Entry(v + ("merger_fc2",), "visual.merger.mlp.2.weight", "linear"),
        Entry(v + ("merger_fc2_bias",), "visual.merger.mlp.2.bias"),
        Entry(lm + ("embed",), "model.embed_tokens.weight"),
        Entry(lb + ("input_norm",), "model.layers.{i}.input_layernorm.weight"),
        Entry(lb + ("q",), "model.layers.{i}.self_attn.q_proj.weight", "linear"),
        Entry(lb + ("q_bias",), "model.layers.{i}.self_attn.q_proj.bias", "bias"),
        Entry(lb + ("k",), "model.layers.{i}.self_attn.k_proj.weight", "linear"),
        Entry(lb + ("k_bias",), "model.layers.{i}.self_attn.k_proj.bias", "bias"),
        Entry(lb + ("v",), "model.layers.{i}.self_attn.v_proj.weight", "linear"),
        Entry(lb + ("v_bias",), "model.layers.{i}.self_attn.v_proj.bias", "bias"),
        Entry(lb + ("o",), "model.layers.{i}.self_attn.o_proj.weight", "linear", 2),
        Entry(lb + ("post_norm",), "model.layers.{i}.post_attention_layernorm.weight"),
        Entry(lb + ("gate",), "model.layers.{i}.mlp.gate_proj.weight", "linear"),
        Entry(lb + ("up",), "model.layers.{i}.mlp.up_proj.weight", "linear"),
        Entry(lb + ("down",), "model.layers.{i}.mlp.down_proj.weight", "linear"),
        Entry(lm + ("norm",), "model.norm.weight"),
    ]
    if not cfg.tie_word_embeddings:
        entries.append(Entry(("lm_head",), "lm_head.weight", "linear"))
    return entries


def _num_layers(entry: Entry, cfg: Qwen2_5_VLConfig) -> int:
    return cfg.vision.depth if entry.ours[0] == "visual" else cfg.text.num_hidden_layers


def to_ours(entry: Entry, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One checkpoint tensor (one layer) -> our layout of `shape`."""
    if entry.kind == "linear":
        return x.T.reshape(shape)
    if entry.kind == "conv":
        return x.reshape(x.shape[0], -1).T.reshape(shape)
    return x.reshape(shape)


def to_hf(entry: Entry, y: np.ndarray, cfg: Qwen2_5_VLConfig) -> np.ndarray:
    """Our tensor (one layer) -> the checkpoint layout."""
    if entry.kind == "linear":
        n_in = math.prod(y.shape[: entry.in_dims])
        return y.reshape(n_in, -1).T
    if entry.kind == "conv":
        v = cfg.vision
        return y.T.reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
    if entry.kind == "bias":
        return y.reshape(-1)
    return y


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------


def _normalise_name(name: str) -> str:
    """transformers 5 in-memory names -> the names in checkpoint files."""
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual.") :]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model.") :]
    return name


class _Checkpoint:
    """All tensors of a checkpoint directory, by (normalised) name, memory-mapped."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"No model.safetensors or model.safetensors.index.json in {path}."
            )
        self.tensors: dict[str, tuple[safetensors_io.SafetensorsFile, str]] = {}
        for name in files:
            file = path / name
            if not file.is_file():
                raise FileNotFoundError(f"Checkpoint shard {file} named in {index} is missing.")
            st = safetensors_io.SafetensorsFile(file)
            for key in st.names():
                self.tensors[_normalise_name(key)] = (st, key)

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(name)
        st, key = self.tensors[name]
        return st.get(key)


def _leaf_axes(path: tuple, variable: nnx.Variable) -> tuple:
    axes = tuple(variable.get_metadata().get("logical_axes", ()))
    if len(path) > 1 and path[1] in ("layers", "blocks"):
        axes = (R.LAYERS,) + axes
    return axes


def param_shardings(abstract_state: nnx.State, mesh, rules=None) -> dict[tuple, object]:
    """NamedSharding of every parameter (by flat path) from its logical axes."""
    out = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        axes = _leaf_axes(tuple(str(p) for p in path), variable)
        out[path] = R.logical_sharding(mesh, axes, rules, shape=variable.get_value().shape)
    return out


def abstract_model(cfg: Qwen2_5_VLConfig, **model_kwargs) -> Qwen2_5_VL:
    """The model with ShapeDtypeStructs in place of arrays (nothing allocated)."""
    return nnx.eval_shape(lambda: Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), **model_kwargs))


def from_pretrained(
    path: str | Path,
    *,
    dtype=jnp.bfloat16,
    param_dtype=None,
    mesh=None,
    rules=None,
    scan_layers: bool = True,
    remat: str | bool = False,
    attention_impl: str | None = "auto",
) -> Qwen2_5_VL:
    """Loads a Hugging Face Qwen2.5-VL checkpoint directory (config.json + safetensors).

    Args:
      path: directory with config.json and model.safetensors[.index.json] (flat hub or nested
        transformers-5 config; bf16, f16 or f32 tensors).
      dtype: compute dtype of activations.
      param_dtype: dtype the parameters are stored in (default: `dtype`).
      mesh: place each parameter on this mesh by its logical axes (default: one device).
      rules: logical-axis rule overrides (`ares_jax.parallel.rules`).
      scan_layers: run the layers under `lax.scan`.
      remat: what each layer keeps for the backward pass, the rest recomputed: a policy of
        `layers.REMAT_POLICIES` ('none', 'full', 'attention', 'dots', 'offload'); True/False
        mean 'full'/'none'.
      attention_impl: 'auto' (full forwards and prefills through `ops.attention` with the
        backend's kernel: Splash on TPU, cuDNN/Pallas on GPU, blockwise XLA on CPU; no [T, T]
        scores or masks, forward or backward), a kernel forced ('blockwise', 'splash',
        'pallas_gpu', 'dense'), or `jax.nn.dot_product_attention` with a dense mask ('xla',
        'cudnn'); see `text.IMPLEMENTATIONS`. Decode steps use XLA's attention (cuDNN's with
        'cudnn').

    Returns:
      The model, parameters filled from the checkpoint.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint directory {path} does not exist.")
    cfg = Qwen2_5_VLConfig.from_file(path)
    param_dtype = dtype if param_dtype is None else param_dtype
    kwargs = dict(
        param_dtype=param_dtype,
        dtype=dtype,
        scan_layers=scan_layers,
        remat=remat,
        attention_impl=attention_impl,
    )
    abstract = abstract_model(cfg, **kwargs)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, rules) if mesh is not None else {}
    ckpt = _Checkpoint(path)
    flat_abstract = dict(nnx.to_flat_state(abstract_state))
    used: set[str] = set()
    values = {}
    for entry in _table(cfg):
        target = flat_abstract.pop(entry.ours)
        shape, np_dtype = target.get_value().shape, np.dtype(target.get_value().dtype)
        host = _assemble(entry, ckpt, cfg, shape, np_dtype, used, path)
        sharding = shardings.get(entry.ours)
        if sharding is None:
            values[entry.ours] = jnp.asarray(host)
        else:
            values[entry.ours] = jax.make_array_from_callback(
                shape, sharding, lambda idx, host=host: host[idx]
            )
        del host
    if flat_abstract:
        raise ValueError(f"{path}: no checkpoint entry fills {sorted(flat_abstract)}.")
    unused = sorted(set(ckpt.tensors) - used)
    if unused:
        log.warning("%s: %d checkpoint tensors were not used: %s", path, len(unused), unused[:8])
    state = nnx.from_flat_state(
        [(k, v.replace(values[k])) for k, v in nnx.to_flat_state(abstract_state)]
    )
    return nnx.merge(graphdef, state)


def _assemble(entry, ckpt, cfg, shape, np_dtype, used, path) -> np.ndarray:
    """The host array of one parameter in our layout (all layers stacked), cast to np_dtype."""

    def load(name, layer_shape):
        try:
            x = ckpt.get(name)
        except KeyError:
            raise ValueError(f"{path}: checkpoint has no tensor {name!r}.") from None
        used.add(name)
        y = to_ours(entry, np.asarray(x), layer_shape)
        return y.astype(np_dtype)

    if not entry.per_layer:
        return load(entry.hf, shape)
    out = np.empty(shape, np_dtype)
    for i in range(_num_layers(entry, cfg)):
        out[i] = load(entry.hf.format(i=i), shape[1:])
    return out


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------

# The dtypes `save_pretrained` writes, by their config.json names.
SAVE_DTYPES: Mapping[str, np.dtype] = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
}


def save_pretrained(
    model: Qwen2_5_VL,
    path: str | Path,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 4 * 2**30,
    progress: Callable[[str], None] | None = None,
    write: bool | None = None,
) -> None:
    """Writes a checkpoint directory that transformers loads back (config.json + safetensors).

    Parameters are gathered to the host one at a time; shards of at most `max_shard_bytes`
    are written with an index file when more than one is needed. With several processes every
    process must call this (gathering a parameter sharded over other processes' devices is a
    collective) and only the writing process writes.

    Args:
      write: write the files; None means on process 0 only.
    """
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"save_pretrained: dtype must be one of {sorted(SAVE_DTYPES)}.")
    np_dtype = SAVE_DTYPES[dtype]
    cfg = model.cfg
    path = Path(path)
    write = jax.process_index() == 0 if write is None else write
    if write:
        path.mkdir(parents=True, exist_ok=True)
    _, state = nnx.split(model)
    flat = dict(nnx.to_flat_state(state))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for entry in _table(cfg):
        y = multihost.fetch(flat[entry.ours].get_value()).astype(np_dtype)
        if not write:
            continue
        layers = (
            [(entry.hf, y)]
            if not entry.per_layer
            else [(entry.hf.format(i=i), y[i]) for i in range(y.shape[0])]
        )
        for name, layer in layers:
            tensor = np.ascontiguousarray(to_hf(entry, layer, cfg))
            if size + tensor.nbytes > max_shard_bytes and shards[-1]:
                shards.append({})
                size = 0
            shards[-1][name] = tensor
            size += tensor.nbytes
        if progress:
            progress(entry.hf)
    if not write:
        return
    if len(shards) == 1:
        safetensors_io.write(path / "model.safetensors", shards[0])
    else:
        weight_map = {}
        total = 0
        for n, shard in enumerate(shards):
            fname = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            safetensors_io.write(path / fname, shard)
            for name, t in shard.items():
                weight_map[name] = fname
                total += t.nbytes
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    (path / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype=dtype), indent=2))


# ---------------------------------------------------------------------------------------------
# Random initialisation, already sharded
# ---------------------------------------------------------------------------------------------


def init_model(
    cfg: Qwen2_5_VLConfig, *, seed: int = 0, mesh=None, rules=None, **model_kwargs
) -> Qwen2_5_VL:
    """A randomly initialised model whose parameters are created directly on their shardings.

    The shapes come from `nnx.eval_shape` (nothing allocated); the initialiser is jitted with
    `out_shardings`, so a large model never exists on one device.
    """
    graphdef, abstract_state = nnx.split(abstract_model(cfg, **model_kwargs))

    def make():
        return nnx.split(Qwen2_5_VL(cfg, rngs=nnx.Rngs(seed), **model_kwargs))[1]

    if mesh is None:
        return nnx.merge(graphdef, jax.jit(make)())
    shardings = param_shardings(abstract_state, mesh, rules)
    out = nnx.from_flat_state(
        [(k, v.replace(shardings[k])) for k, v in nnx.to_flat_state(abstract_state)]
    )
    return nnx.merge(graphdef, jax.jit(make, out_shardings=out)())
