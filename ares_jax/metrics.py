"""Metrics on the host: JSON lines, TensorBoard, a progress line, and the non-finite guard.

Contract (STYLE.md rule 12): process 0 writes into the workdir
  config.json     the run's config (`write_config`), rewritten at every start;
  metrics.jsonl   one row per logged step: {"step": int, "<name>": value, ...}, keys sorted;
  tb/             TensorBoard scalars (tensorboardX), one event file per start.
Names are slash paths by area (`train/loss`, `rollout/entropy_mean`, `kl/beta/hard`,
`time/step_s`). Values are written as JSON numbers (Python floats; the step is an int); NaN,
+inf and -inf, which JSON cannot hold, are written as the strings "nan", "inf" and "-inf", so
every line is strict JSON; `read_metrics` turns them back into floats.

Resuming: the files are appended to. After restoring checkpoint step S the loop calls
`truncate_after(S)`, which drops the JSONL rows of steps > S (they will be computed again) and
makes the next TensorBoard event file purge its events of those steps (`purge_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np

log = logging.getLogger(__name__)

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _scalar(name: str, value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"Metric {name!r} must be a scalar, got shape {array.shape}.")
    return float(array.reshape(()))


def _json_value(x: float) -> float | str:
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file, with "nan"/"inf"/"-inf" turned back into floats; a line
    cut by a crash is skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            rows.append(
                {k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
            )
    return rows


class MetricWriter:
    """Writes config.json, metrics.jsonl and TensorBoard scalars into `workdir` (process 0).

    Args:
      workdir: the run directory (created if missing).
      tensorboard: also write TensorBoard event files under workdir/tb.
      enabled: write anything at all; None means `jax.process_index() == 0`. A disabled writer
        accepts every call and writes nothing.

    Per step, either pass a dict to `write(step, metrics)` or collect values with
    `measure(name, value)` and then call `write(step)`; both may be combined.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, tensorboard: bool = True, enabled: bool | None = None
    ):
        self.workdir = os.fspath(workdir)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._tensorboard = tensorboard
        self._tb = None
        self._purge_step: int | None = None
        self._pending: dict[str, float] = {}
        self._file: TextIO | None = None
        if self.enabled:
            os.makedirs(self.workdir, exist_ok=True)

    def write_config(self, config: Any) -> None:
        """Writes workdir/config.json from a dict or an ml_collections ConfigDict (anything with
        `to_dict()`); values JSON cannot hold are written as their str()."""
        if not self.enabled:
            return
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        tmp = os.path.join(self.workdir, "config.json.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(self.workdir, "config.json"))

    def measure(self, name: str, value: Any) -> None:
        """Adds one scalar to the row the next `write` emits."""
        if self.enabled:
            self._pending[name] = _scalar(name, value)

    def write(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Writes one row for `step`: the measured values plus `metrics` (host scalars: Python or
        numpy numbers, 0-d or size-1 arrays; call `jax.device_get` on device values first)."""
        if not self.enabled:  # values may be device arrays this process cannot read
            return
        row = dict(self._pending)
        self._pending.clear()
        for name, value in (metrics or {}).items():
            row[name] = _scalar(name, value)
        if "step" in row:
            raise ValueError("'step' is reserved for the step number; rename that metric.")
        line = {"step": int(step), **{k: _json_value(v) for k, v in row.items()}}
        if self._file is not None and not self._still_there():
            log.warning(
                "%s was removed during the run; writing a new one from step %d on (the rows "
                "before are lost unless the old file was moved, not deleted).",
                self.path,
                step,
            )
            self._file.close()
            self._file = None
        if self._file is None:
            self._file = self._open_for_append()
        self._file.write(json.dumps(line, sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()
        if self._tensorboard:
            tb = self._tb_writer()
            for name, value in row.items():
                tb.add_scalar(name, value, global_step=int(step))
            tb.flush()

    def _still_there(self) -> bool:
        """Whether the open file is still the one at `self.path` (not removed or replaced)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(self._file.fileno())
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _open_for_append(self) -> TextIO:
        cut = False  # a crash may have left half a line; start on a fresh one
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                cut = f.read(1) != b"\n"
        file = open(self.path, "a")  # kept open across steps
        if cut:
            file.write("\n")
        return file

    def _tb_writer(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.workdir, "tb"), purge_step=self._purge_step)
        return self._tb

    def truncate_after(self, step: int) -> int:
        """Drops the metrics.jsonl rows with step > `step` (rewriting the file atomically) and
        hides TensorBoard events of those steps; returns how many rows were dropped. Call it on
        resume, before the first `write`."""
        if not self.enabled:
            return 0
        self._close_files()
        self._purge_step = step + 1
        if not os.path.exists(self.path):
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row_step = json.loads(line)["step"]
                except (ValueError, KeyError, TypeError):  # a line cut by a crash
                    dropped += 1
                    continue
                if row_step > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        if dropped:
            log.info("Dropped %d metric rows after step %d from %s", dropped, step, self.path)
        return dropped

    def _close_files(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        """Flushes and closes the files (the writer reopens them if written to again)."""
        self._close_files()

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class Progress:
    """A progress line on the terminal: tqdm when installed, else a plain `\\r` line.

    Args:
      total: the number of steps.
      desc: the label in front of the line.
      enabled: None means on when `file` is a TTY and this is process 0; True forces it on.
      file: the stream (default sys.stderr).
      initial: the step the bar starts at (after a resume).
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str = "",
        enabled: bool | None = None,
        file: TextIO | None = None,
        initial: int = 0,
    ):
        self._file = sys.stderr if file is None else file
        if enabled is None:
            isatty = getattr(self._file, "isatty", lambda: False)
            enabled = bool(isatty()) and jax.process_index() == 0
        self.enabled = enabled
        self.total, self.desc, self.n = total, desc, initial
        self._bar = None
        self._start = time.monotonic()
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        if tqdm is not None:
            self._bar = tqdm(
                total=total, desc=desc, initial=initial, file=self._file, dynamic_ncols=True
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps; `postfix` values (numbers or strings) are shown after the bar."""
        self.n += n
        if not self.enabled:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(n)
            return
        rate = self.n / max(time.monotonic() - self._start, 1e-9)
        extra = " ".join(f"{k}={v}" for k, v in shown.items())
        self._file.write(f"\r{self.desc} {self.n}/{self.total} ({rate:.2f} it/s) {extra}")
        self._file.flush()

    def close(self) -> None:
        """Ends the line."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._file.write("\n")
            self._file.flush()
        self.enabled = False


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss, gradient norm or other checked value."""


class NonFiniteGuard:
    """Stops the run after more than `max_in_a_row` consecutive non-finite steps.

    The update step itself skips a non-finite update (e.g. `optax.apply_if_finite` or a
    `jnp.where` on the gradient norm); this guard only counts, logs and stops.

    Args:
      max_in_a_row: how many non-finite steps in a row are tolerated (0: stop at the first).
    """

    def __init__(self, max_in_a_row: int):
        if max_in_a_row < 0:
            raise ValueError(f"max_in_a_row must be >= 0, got {max_in_a_row}.")
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self._first_step: int | None = None
        self._keys: set[str] = set()

    def check(self, step: int, values: Mapping[str, Any]) -> bool:
        """True if every value (host scalars or arrays, all elements) is finite.

        Otherwise logs a warning naming the keys and, when this makes more than `max_in_a_row`
        non-finite steps in a row, raises NonFiniteError naming the step range and the keys.
        A finite step resets the count.
        """
        bad = sorted(k for k, v in values.items() if not np.all(np.isfinite(np.asarray(v))))
        if not bad:
            self.in_a_row, self._first_step = 0, None
            self._keys.clear()
            return True
        if self._first_step is None:
            self._first_step = step
        self.in_a_row += 1
        self._keys.update(bad)
        log.warning(
            "Step %d: non-finite %s (%d in a row, limit %d)",
            step,
            ", ".join(bad),
            self.in_a_row,
            self.max_in_a_row,
        )
        if self.in_a_row > self.max_in_a_row:
            steps = (
                f"step {step}" if self._first_step == step else f"steps {self._first_step}-{step}"
            )
            raise NonFiniteError(
                f"Non-finite values at {steps} ({self.in_a_row} in a row, more than the "
                f"{self.max_in_a_row} allowed): {', '.join(sorted(self._keys))}."
            )
        return False
