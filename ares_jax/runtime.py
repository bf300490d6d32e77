"""What every training stage does the same way: mesh and model, state placement, resume.

`aepo/train.py` and `adacs/train.py` read top to bottom; the plumbing they share lives here so
that it exists once: the run's hold on its workdir (`stage_run`: an exclusive lock, the
preemption handler, the resources closed on any exit, the completion marker), building the
policy from `config.model` (a checkpoint directory or a preset's random init) with its
tokenizer, placing a fresh train state on the mesh, the resume order of STYLE.md rule 12, and the
static-shape helpers of the learner's batches.

The workdir contract:
  .lock          held (flock, exclusive) by the run's process 0 while the stage runs; the kernel
                 releases it when the process ends, however it ends, so a lock left by a dead
                 run is never in the way. It names the holder (pid, host, start time).
  complete.json  written after the stage's last step and its export, removed when a stage starts:
                 a stage counts as finished only when it holds this file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax import batching as B
from ares_jax import checkpoint as ckpt
from ares_jax import metrics as mt
from ares_jax.data import prompts
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import hub_files
from ares_jax.models.qwen2_5_vl import params as model_params
from ares_jax.models.qwen2_5_vl import tokenizer as tok
from ares_jax.models.qwen2_5_vl.processor import ImageSettings
from ares_jax.parallel import multihost
from ares_jax.parallel.mesh import make_mesh

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

LOCK_FILE = ".lock"
COMPLETE_FILE = "complete.json"


class WorkdirError(RuntimeError):
    """The workdir cannot be used: not writable, or held by another run (one sentence)."""


# ---------------------------------------------------------------------------------------------
# The stage's hold on its workdir.


def _unwritable(workdir: Path, e: OSError) -> WorkdirError:
    return WorkdirError(
        f"cannot write to the workdir {workdir}: {e.strerror or e}; choose a writable --workdir."
    )


def _acquire(workdir: Path) -> int:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise _unwritable(workdir, e) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with open(workdir / LOCK_FILE) as f:
            holder = f.read().strip() or "unknown process"
        os.close(fd)
        raise WorkdirError(
            f"the workdir {workdir} is in use by another run ({holder}); wait for it to end, "
            "stop it, or choose another --workdir."
        ) from None
    except OSError as e:  # a file system without flock (some network mounts)
        log.warning("Cannot lock %s (%s); a second run there would not be refused.", workdir, e)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = f"pid {os.getpid()} on {socket.gethostname()}, started {started}"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (holder + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise _unwritable(workdir, e) from None
    return fd


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir`'s exclusive lock (process 0 takes it; every process learns the outcome).

    Raises:
      WorkdirError: the workdir cannot be created or written, or another live run holds it.
    """
    workdir = Path(workdir)
    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = _acquire(workdir)
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not int(ok) and error is None:
            error = WorkdirError(f"process 0 could not take the workdir {workdir}; see its log.")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays, naming the last holder


def is_complete(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The completion record of the stage run in `workdir`, None if it did not finish."""
    path = Path(workdir) / COMPLETE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def mark_complete(workdir: str | os.PathLike, stage: str, step: int) -> None:
    """Records that the stage reached its last step and exported (process 0 writes)."""
    if jax.process_index() != 0:
        return
    path = Path(workdir) / COMPLETE_FILE
    record = {
        "stage": stage,
        "step": int(step),
        "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    log.info("%s: complete (%s).", stage, path)


@contextlib.contextmanager
def stage_run(workdir: str | os.PathLike, stage: str) -> Iterator[contextlib.ExitStack]:
    """A stage's hold on its workdir, from before the model loads to its last line.

    Installs the SIGTERM handler, takes the workdir's lock (a second run there, or a workdir that
    cannot be written, fails at once with `WorkdirError`), and forgets an earlier completion (the
    stage is unfinished until `mark_complete`). Yields an ExitStack: what the stage
    enters into it (the checkpointer, the metric writer) is closed on any exit, exception or
    preemption included, so the last checkpoint started is complete on disk.
    """
    workdir = Path(workdir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(ckpt.preemption_handler())  # first: the lock file means it is on
        stack.enter_context(lock_workdir(workdir))
        if jax.process_index() == 0:
            (workdir / COMPLETE_FILE).unlink(missing_ok=True)
        yield stack


class Policy(NamedTuple):
    mesh: jax.sharding.Mesh
    model: Any  # Qwen2_5_VL
    tokenizer: Any


def check_finite(
    guard: mt.NonFiniteGuard, step: int, values, checkpointer: ckpt.Checkpointer
) -> bool:
    """`guard.check(step, values)`, whose stop also names the last checkpoint to resume from."""
    try:
        return guard.check(step, values)
    except mt.NonFiniteError as e:
        checkpointer.wait()
        last = checkpointer.latest_step()
        where = f"step {last} in {checkpointer.directory}" if last else "none was saved"
        raise mt.NonFiniteError(f"{e} The last checkpoint: {where}.") from None


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
        tokenizer = tok.load_tokenizer(path)
        log.info(
            "%s: prompts with %s.",
            path,
            "its chat template"
            if getattr(tokenizer, "chat_template", None)
            else "the built-in Qwen2.5-VL chat format (the checkpoint has no chat template)",
        )
        return Policy(mesh, model, tokenizer)
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


def run_image_settings(c) -> ImageSettings:
    """The image settings the stage preprocesses with: the pixel limits of `c.data`, its
    normalisation (`data.image_mean`, `data.image_std`) where set, the rest (patch sizes,
    normalisation) from `c.model.path`'s image processor, else the hub's."""
    source = hub_files.read_image_settings(c.model.path) if c.model.get("path") else None
    base = source or hub_files.default_image_settings()
    mean, std = c.data.get("image_mean"), c.data.get("image_std")
    return base._replace(
        min_pixels=c.data.min_pixels,
        max_pixels=c.data.max_pixels,
        mean=base.mean if mean is None else tuple(float(x) for x in mean),
        std=base.std if std is None else tuple(float(x) for x in std),
    )


def image_kwargs(c) -> dict[str, Any]:
    """`run_image_settings(c)` as the keyword arguments the stages' encoders take (min_pixels,
    max_pixels, image_mean, image_std)."""
    s = run_image_settings(c)
    return dict(
        min_pixels=s.min_pixels, max_pixels=s.max_pixels, image_mean=s.mean, image_std=s.std
    )


def export_policy(c, policy, export: str | os.PathLike, tokenizer, *, stage: str) -> None:
    """Writes the stage's final policy as a Hugging Face checkpoint directory that transformers
    loads with its processor and generation config: weights in the dtype of `c.model.path`'s
    checkpoint (else `c.model.param_dtype`), the tokenizer, and `hub_files.write_export_files`
    (the run's image settings, the source's generation config and chat template). Every process
    calls it (gathering the weights is a collective); process 0 writes."""
    source = c.model.path or None
    dtype = hub_files.source_dtype(source) if source else None
    dtype = dtype if dtype in model_params.SAVE_DTYPES else c.model.param_dtype
    model_params.save_pretrained(policy, export, dtype=dtype)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(export)
        hub_files.write_export_files(
            export, settings=run_image_settings(c), source=source, tokenizer=tokenizer
        )
        log.info("%s: policy exported to %s (%s)", stage, export, dtype)


def prompt_settings(c, cfg) -> prompts.PromptSettings:
    """How the stage's prompts are measured when its data is read (`c.data`, the model's `cfg`)."""
    d = c.data
    return prompts.PromptSettings(
        template=d.prompt_template,
        min_pixels=d.min_pixels,
        max_pixels=d.max_pixels,
        max_len=max(d.prompt_len_buckets),
        patch_size=cfg.vision.patch_size,
        merge_size=cfg.vision.spatial_merge_size,
        image_token_id=cfg.image_token_id,
    )


def bucket_up(n: int, buckets) -> int:
    """The smallest bucket holding n (the largest if none does)."""
    fitting = [b for b in sorted(buckets) if b >= n]
    return fitting[0] if fitting else max(buckets)


pow2 = B.pow2  # the power of two at or above n (a bucket that changes rarely)


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
