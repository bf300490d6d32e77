"""Example sources and the prompt stream: grain, per-host sharding, a resumable position.

    source = example_source(SyntheticSpec(n=2000, seed=0))          # or FilesSpec / TfdsSpec
    stream = PromptStream(source, seed=0)                          # this host's shard, endless
    batch = stream.next_batch(64)                                  # list[Example]
    state = stream.get_state()                                     # JSON; part of the checkpoint
    stream.set_state(state)                                        # continues exactly there

The stream is `grain.MapDataset.source(source).shuffle(seed)[shard_index::shard_count]
.repeat(num_epochs)`: every epoch is a fresh permutation of the whole data set (grain reseeds
the shuffle with seed + epoch), identical on all hosts, and host h takes positions h, h + S,
h + 2S, ... of it. So within an epoch the hosts' shards are disjoint and cover the data set;
when the size is not a multiple of S the first (size mod S) hosts get one example more per epoch.
The position is one integer (the next index into that dataset), so resuming is exact and costs
nothing, in this process or another.

Several processes (multi-host): the stages call `next_global_batch(k)`, which every process
calls at the same step. Each process reads k / S examples from its own shard (only its share of
the files and images is read and decoded there) and the processes exchange them, so every process
holds the same global batch, in the order one process reading the whole data set would see it
(global row j*S + h is row j of shard h) as long as the data set size is a multiple of S. The
host side of a step then runs on the same data everywhere, and the batch goes onto the mesh with
`ares_jax.parallel.multihost.put`. Each process checkpoints its own position (the stages save
the list of all of them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import jax

from ares_jax.data import records, synthetic
from ares_jax.data.records import Example, ReadStats
from ares_jax.parallel import multihost

STATE_VERSION = 1


class ExampleSource(Protocol):
    """Random-access Examples: what grain's `MapDataset.source` takes."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


# ---------------------------------------------------------------------------------------------
# Source specs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """The embedded synthetic task (synthetic.py): n problems of (seed, split)."""

    n: int
    seed: int = 0
    split: str = "train"
    difficulties: tuple[int, ...] = synthetic.DIFFICULTIES
    image_size: int = 112
    wrong_trace: bool = False


@dataclasses.dataclass(frozen=True)
class FilesSpec:
    """Local data files: JSONL / JSON / parquet (records.py), read into memory.

    Each path is a file, a directory (its data files) or a glob (`records.expand_paths`). A
    single directory holding a tfds build (dataset_info.json), or `.array_record` shard files of
    one, are read through `TfdsExamples` instead (split taken from the shard names).

    `columns` takes (field, column) pairs or a mapping (a dict, or the config's `data.columns`
    ConfigDict, whose None entries keep the default lookup); it is stored as sorted pairs, and
    an unknown field is a ValueError naming the known ones (`records.column_overrides`).
    """

    paths: tuple[str, ...]
    on_error: str = "raise"
    columns: tuple[tuple[str, str], ...] = ()  # (field, column) overrides, see records.COLUMNS
    image_root: str | None = None  # image files must lie in it (default: each file's directory)
    check_images: bool = True
    allow_absolute_image_paths: bool = False  # True: image files may lie anywhere

    def __post_init__(self):
        columns = self.columns
        if not isinstance(columns, Mapping):
            columns = dict(columns or ())
        object.__setattr__(
            self, "columns", tuple(sorted(records.column_overrides(columns).items()))
        )


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """An ArrayRecord build of tfds_builder.py: a build directory, or a name with `data_dir`."""

    path: str
    split: str = "train"
    data_dir: str | None = None


SourceSpec = SyntheticSpec | FilesSpec | TfdsSpec
_SPEC_KINDS: dict[str, type] = {"synthetic": SyntheticSpec, "files": FilesSpec, "tfds": TfdsSpec}


def source_spec(config: Mapping[str, Any]) -> SourceSpec:
    """A spec from a plain mapping with a `kind` key (what a config file holds).

    Raises:
      ValueError: unknown kind or key, naming the known ones.
    """
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in _SPEC_KINDS:
        raise ValueError(f"data kind must be one of {', '.join(sorted(_SPEC_KINDS))}, got {kind!r}")
    cls = _SPEC_KINDS[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(unknown)} for data kind {kind!r}; known: "
            f"{', '.join(sorted(names))}"
        )
    if "paths" in config:
        paths = config["paths"]
        config["paths"] = (paths,) if isinstance(paths, str) else tuple(paths)
    if "difficulties" in config:
        config["difficulties"] = tuple(int(d) for d in config["difficulties"])
    return cls(**config)


class InMemoryExamples(Sequence):
    """A list of Examples with the statistics of the read that produced it."""

    def __init__(self, examples: Sequence[Example], stats: ReadStats | None = None):
        self._examples = list(examples)
        self.read_stats = stats

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index):
        return self._examples[index]


def example_source(spec: SourceSpec | Mapping[str, Any]) -> ExampleSource:
    """The random-access source of Examples that `spec` names.

    Sources read from files carry `read_stats` (records.ReadStats); data errors raise
    records.DataError naming the file and line.
    """
    if isinstance(spec, Mapping):
        spec = source_spec(spec)
    if isinstance(spec, SyntheticSpec):
        return synthetic.SyntheticExamples(
            spec.n,
            seed=spec.seed,
            split=spec.split,
            difficulties=spec.difficulties,
            image_size=spec.image_size,
            wrong_trace=spec.wrong_trace,
        )
    if isinstance(spec, TfdsSpec):
        from ares_jax.data import tfds_builder  # tfds is imported only when used

        return tfds_builder.TfdsExamples(spec.path, split=spec.split, data_dir=spec.data_dir)
    if isinstance(spec, FilesSpec):
        build = _tfds_build_of(spec.paths)
        if build is not None:
            from ares_jax.data import tfds_builder

            return tfds_builder.TfdsExamples(build[0], split=build[1])
        examples, stats = records.read_many(
            list(spec.paths),
            on_error=spec.on_error,
            columns=dict(spec.columns) or None,
            image_root=spec.image_root,
            check_images=spec.check_images,
            allow_absolute_image_paths=spec.allow_absolute_image_paths,
        )
        return InMemoryExamples(examples, stats)
    raise TypeError(f"unsupported data spec {type(spec).__name__}")


def _tfds_build_of(paths: Sequence[str]) -> tuple[str, str] | None:
    """(build directory, split) when `paths` name a tfds build or its array_record shards."""
    if len(paths) == 1 and os.path.isfile(os.path.join(paths[0], "dataset_info.json")):
        return paths[0], "train"
    if not paths or not all(".array_record" in os.path.basename(p) for p in paths):
        return None
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    splits = {os.path.basename(p).split(".array_record")[0].rpartition("-")[2] for p in paths}
    if len(dirs) != 1 or len(splits) != 1:
        raise records.DataError(
            f"array_record files must be shards of one split of one build: {', '.join(paths)}"
        )
    return dirs.pop(), splits.pop()


# ---------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------


def interleave(parts: Sequence[Sequence[Example]]) -> list[Example]:
    """One batch from the shards' batches: row j of shard h goes to position j*S + h (S = the
    number of shards; a shorter part, at the end of an epoch-limited stream, is skipped over)."""
    longest = max((len(p) for p in parts), default=0)
    return [p[j] for j in range(longest) for p in parts if j < len(p)]


class PromptStream:
    """This host's endless (or `num_epochs`-long) stream of Examples with a resumable position.

    Args:
      source: random-access Examples (`example_source`); read lazily, one item per step.
      seed: shuffle seed in [0, 2**32); epoch e uses the permutation of seed + e.
      shuffle: False keeps the source order (still sharded and repeated).
      num_epochs: None repeats forever; otherwise the stream ends after that many passes.
      shard_index, shard_count: this host's shard; default `jax.process_index()` of
        `jax.process_count()`.
    """

    def __init__(
        self,
        source: ExampleSource,
        *,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
    ):
        shard_index = jax.process_index() if shard_index is None else int(shard_index)
        shard_count = jax.process_count() if shard_count is None else int(shard_count)
        size = len(source)
        if size == 0:
            raise ValueError("the data source is empty")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {seed}")
        if not 0 <= shard_index < shard_count:
            raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
        if shard_count > size:
            raise ValueError(f"{shard_count} shards of {size} examples would leave a shard empty")
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
        ds = grain.MapDataset.source(source)
        if shuffle:
            ds = ds.shuffle(seed=seed)
        ds = ds[shard_index::shard_count]
        self.epoch_size = len(ds)
        self._dataset = ds.repeat(num_epochs)
        self._length = len(self._dataset)  # sys.maxsize when endless
        self._next = 0
        self._identity = {
            "seed": int(seed),
            "shuffle": bool(shuffle),
            "num_epochs": num_epochs,
            "shard_index": shard_index,
            "shard_count": shard_count,
            "source_size": size,
        }

    @property
    def epoch(self) -> int:
        """The epoch of the next example (0-based)."""
        return self._next // self.epoch_size

    @property
    def position(self) -> int:
        """Examples taken so far by this host."""
        return self._next

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        if self._next >= self._length:
            raise StopIteration
        example = self._dataset[self._next]
        self._next += 1
        return example

    def next_batch(self, k: int) -> list[Example]:
        """The next k Examples; fewer (possibly none) only where an epoch-limited stream ends."""
        batch = []
        for _ in range(k):
            if self._next >= self._length:
                break
            batch.append(next(self))
        return batch

    def next_global_batch(self, k: int) -> list[Example]:
        """The next k Examples of the global batch, the same list on every process.

        With one shard this is `next_batch(k)`. With S shards, one per process, each process
        reads k / S Examples from its shard and the processes exchange them (a collective: every
        process calls this at the same point); global row j*S + h is row j of shard h (module
        docstring). An epoch-limited stream may return fewer at its end.

        Raises:
          ValueError: k is not a multiple of S, or the shards are not one per process.
        """
        index, count = self._identity["shard_index"], self._identity["shard_count"]
        if count == 1:
            return self.next_batch(k)
        if (index, count) != (jax.process_index(), jax.process_count()):
            raise ValueError(
                f"next_global_batch needs one shard per process; this stream is shard {index} of "
                f"{count} in process {jax.process_index()} of {jax.process_count()}."
            )
        if k % count:
            raise ValueError(
                f"a global batch of {k} examples does not split evenly over {count} processes; "
                f"use a multiple of {count}."
            )
        return interleave(multihost.allgather_objects(self.next_batch(k // count)))

    def get_state(self) -> dict[str, Any]:
        """The position as a JSON-serialisable dict (plus what it is valid for)."""
        return {"version": STATE_VERSION, "next_index": self._next, **self._identity}

    def get_global_state(self) -> list[dict[str, Any]]:
        """Every process's `get_state()`, in process order, on every process (a collective);
        what the stages checkpoint, since only process 0 writes the checkpoint's JSON part."""
        return multihost.allgather_objects(self.get_state())

    def set_global_state(self, states: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> None:
        """Continues from a `get_global_state()` result: this process takes its own entry. A
        single `get_state()` dict (a checkpoint of a one-process run) is accepted by one process.

        Raises:
          ValueError: the states were saved by another number of processes, or do not fit
            this stream (`set_state`).
        """
        if isinstance(states, Mapping):
            states = [states]
        if len(states) != jax.process_count():
            raise ValueError(
                f"the data position was saved by {len(states)} process(es) but this run has "
                f"{jax.process_count()}; resume with the same number of processes."
            )
        self.set_state(states[jax.process_index()])

    def set_state(self, state: Mapping[str, Any] | str) -> None:
        """Continues from a `get_state()` result (or its JSON text).

        Raises:
          ValueError: the state belongs to a stream with another seed, shard, order or data size.
        """
        if isinstance(state, str):
            state = json.loads(state)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')} != {STATE_VERSION}")
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"stream state was saved with {key}={state.get(key)!r}, this stream has "
                    f"{key}={value!r}"
                )
        next_index = int(state["next_index"])
        if not 0 <= next_index <= self._length:
            raise ValueError(f"stream state next_index {next_index} is out of range")
        self._next = next_index


class LengthGroupedBatches:
    """Batches of similar length from a `PromptStream`: less padding in the fine-tuning rows.

    Reads `window_batches` global batches at a time, sorts the window's examples by
    `length(example)`, cuts the sorted list into batches of `batch_size` and hands them out in an
    order shuffled by (seed, window position), so that long and short batches alternate within
    the window rather than coming in length order. The examples seen and the epochs are those of
    the stream; only which examples share a batch changes. A short window (the end of an
    epoch-limited stream) keeps its one partial batch for last.

    The state is the stream's state at the start of the current window and the number of batches
    taken from it; resuming refills that window (the same examples, the same grouping) and skips
    what was taken.
    """

    def __init__(
        self,
        stream: PromptStream,
        *,
        batch_size: int,
        window_batches: int,
        length: Any,
        seed: int,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if window_batches <= 0:
            raise ValueError(f"window_batches must be positive, got {window_batches}")
        self._stream = stream
        self._batch_size = int(batch_size)
        self._window_batches = int(window_batches)
        self._length = length
        self._seed = int(seed)
        self._window: list[list[Example]] = []
        self._taken = 0
        self._start_state: Any = None  # the stream's global state at the window's start
        self._start_position = 0

    @property
    def epoch(self) -> int:
        """The epoch of the next batch's first example in the stream (0-based)."""
        if not self._window or self._taken >= len(self._window):
            return self._stream.epoch
        per_host = self._batch_size // self._stream.get_state()["shard_count"]
        return (self._start_position + self._taken * per_host) // self._stream.epoch_size

    def _fill(self) -> None:
        self._start_state = self._stream.get_global_state()
        self._start_position = self._stream.position
        examples = self._stream.next_global_batch(self._batch_size * self._window_batches)
        lengths = [int(self._length(e)) for e in examples]
        order = sorted(range(len(examples)), key=lambda i: (lengths[i], i))
        k = self._batch_size
        batches = [[examples[i] for i in order[j : j + k]] for j in range(0, len(order), k)]
        full = [b for b in batches if len(b) == k]
        partial = [b for b in batches if len(b) < k]
        rng = random.Random(f"{self._seed}:{self._start_position}")
        rng.shuffle(full)
        self._window = full + partial
        self._taken = 0

    def next_global_batch(self, k: int) -> list[Example]:
        """The next batch of `batch_size` examples (fewer, or none, only at an epoch-limited
        stream's end); a collective where the stream's is."""
        if k != self._batch_size:
            raise ValueError(f"this stream groups batches of {self._batch_size}, not {k}")
        if self._taken >= len(self._window):
            self._fill()
            if not self._window:
                return []
        batch = self._window[self._taken]
        self._taken += 1
        return batch

    def get_global_state(self) -> dict[str, Any]:
        """JSON: the stream's state at the window's start, the batches taken, the grouping."""
        if self._taken >= len(self._window):  # nothing read yet, or the window used up
            start, taken = self._stream.get_global_state(), 0
        else:
            start, taken = self._start_state, self._taken
        return {
            "version": STATE_VERSION,
            "grouped_by_length": True,
            "batch_size": self._batch_size,
            "window_batches": self._window_batches,
            "seed": self._seed,
            "window_start": start,
            "taken": taken,
        }

    def set_global_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_global_state()` result.

        Raises:
          ValueError: the state was saved without length grouping or with another grouping.
        """
        if not isinstance(state, Mapping) or not state.get("grouped_by_length"):
            raise ValueError(
                "the data position was saved without length-grouped batches; resume with the "
                "grouping of that run (sft.length_group_batches=0)."
            )
        for key, value in (
            ("batch_size", self._batch_size),
            ("window_batches", self._window_batches),
            ("seed", self._seed),
        ):
            if state.get(key) != value:
                raise ValueError(
                    f"the data position was saved with length grouping {key}={state.get(key)!r}, "
                    f"this run has {key}={value!r}"
                )
        self._stream.set_global_state(state["window_start"])
        self._window, self._taken = [], 0
        taken = int(state["taken"])
        if taken:
            self._fill()
            if taken > len(self._window):
                raise ValueError(
                    f"the data position says {taken} batches of a window were taken, but the "
                    f"window holds {len(self._window)}"
                )
            self._taken = taken
