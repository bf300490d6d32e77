"""Training checkpoints around Orbax, the resume order, and the SIGTERM contract.

Layout: `<directory>/<step>/{state,extra}`, one Orbax `CheckpointManager` step per save.
`state` is any pytree of jax / numpy arrays and Python scalars (parameters, optax states, typed
PRNG keys from `jax.random.key`, which Orbax 0.12 saves natively, as do raw uint32 keys and int
step counters), written with `StandardSave`; `extra` is a JSON document (data-iterator position,
controller states as lists, tau, ...). JSON turns tuples into lists and dict keys into strings;
numpy scalars and arrays are converted to Python numbers and lists on save; anything else that
is not JSON (bytes, say) is refused on save, naming the key.

Resume order (STYLE.md rule 12; the stage `run` owns it, `resolve_init` logs the decision):
  1. the latest readable checkpoint in the workdir (`<workdir>/checkpoints`);
  2. `config.resume`: a checkpoint directory of another run (full state);
  3. `config.init_from`: weights only (e.g. a Hugging Face checkpoint);
  4. random init.

Preemption contract: each stage installs `preemption_handler()` for its whole run (the pipeline
too, around its stages). On SIGTERM the handler only sets a flag (it neither logs nor exits; a
previous Python handler is chained, the default action is not, since it would kill the process).
The training loop calls `save_or_stop` once per step, at the same step on every process (with
several processes `preempted()` is a collective that ORs the flag across them): when the flag is
set it saves the step (forced), waits for the write, and raises `Preempted`. Nothing after it in
the stage runs (no evaluation, no export, no completion marker); `ares_jax.main` turns it into
exit code `PREEMPTED_EXIT_CODE` (143 = 128 + SIGTERM, what a process killed by SIGTERM reports),
which a scheduler requeues on; the restart resumes from that checkpoint. A forced save of a step
that is already saved is a no-op.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

log = logging.getLogger(__name__)


class Restored(NamedTuple):
    """What `Checkpointer.restore` returns.

    Attributes:
      state: the state pytree, arrays with the target's shardings and dtypes.
      extra: the JSON dict saved beside it.
      step: the step that was restored (older than the latest if that one was unreadable).
    """

    state: Any
    extra: dict[str, Any]
    step: int


def _to_json(value: Any, key: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _to_json(v, f"{key}/{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(
        f"Checkpoint extra {key!r} is a {type(value).__name__}, which is not JSON; "
        "convert it (e.g. bytes.decode()) before saving."
    )


class Checkpointer:
    """Saves and restores the training state in `directory`, keeping the last `keep` steps.

    Args:
      directory: where the step folders go (created if missing; local path or gs://).
      every_steps: `save` writes when step % every_steps == 0 (or when forced).
      keep: how many of the most recent checkpoints to keep; older ones are deleted.
      async_save: write in a background thread. `save` returns once the arrays have been copied
        to host memory, so the caller may donate or overwrite the state right away; call `wait()`
        before reading the files or exiting (`close()` waits too).
      read_only: only restore (e.g. `config.resume`, another run's directory): nothing is
        created, cleaned up, renamed or saved there.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        every_steps: int,
        keep: int,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if every_steps < 1:
            raise ValueError(f"checkpoint every_steps must be >= 1, got {every_steps}.")
        if keep < 1:
            raise ValueError(f"checkpoint keep must be >= 1, got {keep}.")
        self.directory = epath.Path(directory)
        self.every_steps = every_steps
        self.read_only = read_only
        if read_only and not self.directory.exists():
            raise FileNotFoundError(f"Checkpoint directory {self.directory} does not exist.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            cleanup_tmp_directories=not read_only,  # half-written saves of a killed run
            enable_async_checkpointing=async_save,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(
        self, step: int, state: Any, extra: dict[str, Any] | None = None, *, force: bool = False
    ) -> bool:
        """Saves `state` and `extra` as step `step` if due (or forced); True if a save started.

        A step that is already saved is skipped (False), forced or not.
        """
        if self.read_only:
            raise ValueError(f"Checkpointer for {self.directory} is read-only.")
        if not force and step % self.every_steps != 0:
            return False
        if step in self._manager.all_steps():
            return False
        extra_json = _to_json(dict(extra or {}), "extra")
        json.dumps(extra_json)  # fail here, not in the background thread
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), extra=ocp.args.JsonSave(extra_json)
        )
        with jax.transfer_guard("allow"):
            saved = self._manager.save(step, args=args, force=True)
        if saved:
            log.info("Saving checkpoint step %d to %s", step, self.directory)
        return bool(saved)

    def latest_step(self) -> int | None:
        """The newest saved step, None if there is none (not checked for readability)."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """The saved steps, oldest first."""
        return sorted(self._manager.all_steps())

    def restore(self, target_state: Any, step: int | None = None) -> Restored:
        """Restores a checkpoint onto the structure, shardings and dtypes of `target_state`.

        Args:
          target_state: a pytree like the saved state whose array leaves are jax.Arrays or
            jax.ShapeDtypeStruct (with `sharding`; one without lands on the first device),
            numpy arrays (restored as numpy) or Python scalars. Typed PRNG keys may be given as
            key arrays or as ShapeDtypeStruct with the key dtype (`jax.eval_shape` gives that).
          step: the step to restore; None means the latest readable one: when the latest fails
            to read (a truncated or missing file), a warning names it, the next older one is
            tried, and each unreadable step folder is renamed `<step>.corrupt` (unless read-only)
            so that the run can save that step again. An explicit `step` gets no fallback.

        Returns:
          Restored(state, extra, step).

        Raises:
          FileNotFoundError: no checkpoint in the directory, or `step` is not saved.
          RuntimeError: no saved step could be read (the cause is chained).
        """
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(
                    f"No checkpoint step {step} in {self.directory} (saved: {steps})."
                )
            candidates = [step]
        else:
            candidates = steps[::-1]
        if not candidates:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state), extra=ocp.args.JsonRestore()
        )
        unreadable: list[int] = []
        error: BaseException | None = None
        for s in candidates:
            try:
                with jax.transfer_guard("allow"):
                    restored = self._manager.restore(s, args=args)
            except Exception as e:  # Orbax / TensorStore raise many types for a damaged file
                error = e
                unreadable.append(s)
                log.warning(
                    "Checkpoint step %d in %s is unreadable (%s: %s)%s",
                    s,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:300],
                    "; falling back to the previous one." if step is None else ".",
                )
                continue
            if unreadable and not self.read_only:
                self._set_aside(unreadable)
            return Restored(state=restored.state, extra=dict(restored.extra or {}), step=s)
        raise RuntimeError(
            f"No readable checkpoint in {self.directory}: tried steps {unreadable}."
        ) from error

    def _set_aside(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.corrupt"
                if dst.exists():
                    dst.rmtree()
                src.rename(dst)
                log.warning("Moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ares_jax.checkpoint.set_aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until every pending asynchronous save has been written."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()  # on any exit: the last save started is complete on disk


# --------------------------------------------------------------------------------------------
# Resume order.


class InitSource(NamedTuple):
    """Where the training state comes from (see the module docstring for the order).

    Attributes:
      kind: "workdir" | "resume" | "init_from" | "random".
      path: the checkpoint directory or weights path; None for "random".
      step: the latest saved step for "workdir", else None.
    """

    kind: str
    path: str | None
    step: int | None


def _latest_step_in(directory: str | os.PathLike) -> int | None:
    path = epath.Path(directory)
    if not path.exists():
        return None
    # A read-only manager only to read the latest step; Orbax warns that it is read-only.
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        manager = ocp.CheckpointManager(
            path, options=ocp.CheckpointManagerOptions(read_only=True, create=False)
        )
        try:
            return manager.latest_step()
        finally:
            manager.close()
    finally:
        absl_logging.set_verbosity(verbosity)


def resolve_init(
    workdir_ckpt_dir: str | os.PathLike,
    resume: str | None = None,
    init_from: str | None = None,
) -> InitSource:
    """Picks the source of the initial state: workdir checkpoint, then `config.resume`, then
    `config.init_from`, then random init, and logs the choice in one line.

    Args:
      workdir_ckpt_dir: this run's checkpoint directory (`Checkpointer.directory`).
      resume: `config.resume`, a checkpoint directory of another run (full state), or None/"".
      init_from: `config.init_from`, a weights path (parameters only), or None/"".

    Raises:
      FileNotFoundError: `resume` or `init_from` is set, used, and does not exist.
    """
    step = _latest_step_in(workdir_ckpt_dir)
    if step is not None:
        log.info("Initialising from workdir checkpoint step %d (%s)", step, workdir_ckpt_dir)
        return InitSource("workdir", str(workdir_ckpt_dir), step)
    for kind, path in (("resume", resume), ("init_from", init_from)):
        if path:
            if not epath.Path(path).exists():
                raise FileNotFoundError(f"config.{kind} = {path!r} does not exist.")
            log.info("Initialising from config.%s: %s", kind, path)
            return InitSource(kind, str(path), None)
    log.info(
        "Starting from the stage's initial weights (no checkpoint in %s, no resume, no init_from)",
        workdir_ckpt_dir,
    )
    return InitSource("random", None, None)


# --------------------------------------------------------------------------------------------
# Preemption (SIGTERM).

_PREEMPTED = threading.Event()

# The exit code of a run stopped by SIGTERM after saving: 128 + SIGTERM, as a process killed by
# the signal reports it, so a scheduler requeues both the same way.
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(Exception):  # noqa: N818 - an event, not an error of the program
    """A stage stopped on SIGTERM after saving its checkpoint; the run is to be restarted.

    Attributes:
      stage: the stage's name ("AEPO", "AdaCS", ...).
      step: the saved step, None when the stop came between steps (e.g. between stages).
      directory: where the checkpoint is.
    """

    def __init__(self, stage: str, step: int | None = None, directory: str | None = None):
        self.stage, self.step, self.directory = stage, step, directory
        where = f" at step {step}, checkpoint saved in {directory}" if step is not None else ""
        super().__init__(f"{stage} preempted (SIGTERM){where}; restart to resume.")


def install_preemption_handler(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """Makes `signum` (SIGTERM) set the flag read by `preempted()`. Call from the main thread.

    A previous Python-level handler is called after setting the flag; the default action
    (terminate) and SIG_IGN are not chained. Returns a function that reinstalls the previous
    handler. The flag stays set: a stop is reported by `Preempted`, which `save_or_stop` raises
    (and which clears the flag, so that a later run in the same process starts afresh).
    """
    previous = signal.getsignal(signum)

    def handler(sig, frame):
        _PREEMPTED.set()  # no logging here: the handler may interrupt a logging call
        if callable(previous):
            previous(sig, frame)

    signal.signal(signum, handler)

    def uninstall() -> None:
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)

    return uninstall


@contextlib.contextmanager
def preemption_handler(signum: int = signal.SIGTERM) -> Iterator[None]:
    """`install_preemption_handler` for the duration of a `with` block (main thread only; in
    another thread, where Python cannot install signal handlers, it does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    uninstall = install_preemption_handler(signum)
    try:
        yield
    finally:
        uninstall()


def preempted_here() -> bool:
    """True once a handled SIGTERM arrived on this process (no collective)."""
    return _PREEMPTED.is_set()


def preempted() -> bool:
    """True once a handled SIGTERM arrived on this process, or, with several processes, on any
    of them (then this is a collective: every process must call it at the same step)."""
    flag = _PREEMPTED.is_set()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
        flag = bool(np.any(flags))
    return flag


def clear_preemption() -> None:
    """Forgets a SIGTERM (`Preempted` does this when it is raised)."""
    _PREEMPTED.clear()


def stop_preempted(stage: str, step: int | None = None, directory: str | None = None) -> None:
    """Raises `Preempted` (and clears the flag) when `preempted()`; a collective with several
    processes, like `preempted()`."""
    if preempted():
        _PREEMPTED.clear()
        raise Preempted(stage, step, directory)


def save_or_stop(
    checkpointer: Checkpointer,
    step: int,
    state: Any,
    extra: dict[str, Any] | None = None,
    *,
    force: bool = False,
    stage: str,
) -> None:
    """The end of a training step: saves it if due (or `force`), and on SIGTERM saves it in any
    case, waits until it is written and raises `Preempted`. Call it at the same step on every
    process."""
    stop = preempted()
    checkpointer.save(step, state, extra, force=force or stop)
    if stop:
        checkpointer.wait()
        log.warning("%s: preempted at step %d; checkpoint saved, stopping.", stage, step)
        _PREEMPTED.clear()
        raise Preempted(stage, step, str(checkpointer.directory))
