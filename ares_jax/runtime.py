"""What every training stage does the same way: mesh and model, state placement, resume.

`aepo/train.py` and `adacs/train.py` read top to bottom; the plumbing they share lives here so
that it exists once: building the policy from `config.model` (a checkpoint directory or a
preset's random init) with its tokenizer, placing a fresh train state on the mesh, the resume
order of STYLE.md rule 12, and the static-shape helpers of the learner's batches.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax import checkpoint as ckpt
from ares_jax import metrics as mt
from ares_jax.aepo import batch as B
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import params as model_params
from ares_jax.models.qwen2_5_vl import tokenizer as tok
from ares_jax.parallel import multihost
from ares_jax.parallel.mesh import make_mesh

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Policy(NamedTuple):
    mesh: jax.sharding.Mesh
    model: Any  # Qwen2_5_VL
    tokenizer: Any


def load_policy(c, *, path: str | None = None) -> Policy:
    """The mesh, the model of `c.model` (from `path` or `c.model.path`, else the preset's random
    init seeded by `c.seed`) placed on it, and its tokenizer."""
    mesh = make_mesh(dict(c.mesh.shape))
    kwargs = dict(
        dtype=DTYPES[c.model.dtype],
        param_dtype=DTYPES[c.model.param_dtype],
        scan_layers=c.model.scan_layers,
        remat=c.model.remat,
        attention_impl=c.model.attention,
    )
    rules = tuple(tuple(r) for r in c.mesh.rules) or None
    path = path or c.model.path
    if path:
        model = model_params.from_pretrained(path, mesh=mesh, rules=rules, **kwargs)
        return Policy(mesh, model, tok.load_tokenizer(path))
    cfg = model_config.preset(c.model.preset)
    model = model_params.init_model(cfg, seed=c.seed, mesh=mesh, rules=rules, **kwargs)
    return Policy(mesh, model, tok.build_tokenizer())


def place_state(state, mesh):
    """Every leaf in a buffer of its own and on the mesh, as a jitted step returns it.

    Initial states may share one zeros buffer between fields, which a donating step cannot take
    twice, and leaves created outside jit sit on one device: either would cost a second
    compilation of the step. With several processes a leaf on one device exists once per process,
    which neither a step over the whole mesh nor an Orbax save accepts; here it becomes one
    replicated global array (its value is the same on every process).
    """
    replicated = multihost.replicated(mesh)
    seen: set[int] = set()

    def place(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            pointers = {s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
            if not pointers & seen:
                seen.update(pointers)
                return x
            # A new buffer on every device, with the same sharding (on device: with several
            # processes the value is not all here).
            x = jax.jit(jnp.copy, out_shardings=sharding)(x)
        else:
            x = multihost.put(np.array(x), replicated)
        seen.update(s.data.unsafe_buffer_pointer() for s in x.addressable_shards)
        return x

    return jax.tree.map(place, state)


def restore_or_start(
    workdir: Path, c, checkpointer: ckpt.Checkpointer, writer: mt.MetricWriter, target: dict
) -> tuple[dict, dict, int]:
    """The resume order: a checkpoint in the workdir, then `config.checkpoint.resume`, else the
    start. Returns (state, extra, step); metric rows after the restored step are dropped."""
    source = ckpt.resolve_init(workdir / "checkpoints", resume=c.checkpoint.resume)
    if source.kind not in ("workdir", "resume"):
        writer.truncate_after(-1)
        log.info(
            "%s: starting from %s.", c.stage, c.model.path or f"random init ({c.model.preset})"
        )
        return target, {}, 0
    reader = (
        checkpointer
        if source.kind == "workdir"
        else ckpt.Checkpointer(source.path, every_steps=1, keep=1, read_only=True)
    )
    restored = reader.restore(target)
    log.info(
        "%s: resumed from %s checkpoint at step %d (%s).",
        c.stage,
        source.kind,
        restored.step,
        source.path,
    )
    writer.truncate_after(restored.step)
    return restored.state, restored.extra, restored.step


def bucket_up(n: int, buckets) -> int:
    """The smallest bucket holding n (the largest if none does)."""
    fitting = [b for b in sorted(buckets) if b >= n]
    return fitting[0] if fitting else max(buckets)


def pow2(n: int) -> int:
    """The power of two at or above n (a bucket that changes rarely)."""
    return 1 << max(0, int(n) - 1).bit_length()


def left_pad_prompts(prompts: B.Prompts, length: int) -> B.Prompts:
    """Prompts left-padded to `length` tokens (the learner's static prompt length)."""
    pad = length - prompts.ids.shape[1]
    if pad <= 0:
        return prompts
    return dataclasses.replace(
        prompts,
        ids=np.pad(prompts.ids, ((0, 0), (pad, 0))),
        mask=np.pad(prompts.mask, ((0, 0), (pad, 0))),
        positions=np.pad(prompts.positions, ((0, 0), (0, 0), (pad, 0))),
    )
