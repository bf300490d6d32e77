"""Helpers shared by the config files: the preset argument parser and declarative validation.

`parse_arg` reads the text after the colon of `--config=configs/aepo.py:ARG` (big_vision's
`configs/common.py:parse_arg`). `validate` checks a ConfigDict against a schema of dotted keys, so
that a bad enum switch or an out-of-range number stops the run at start-up with one sentence that
names the key (ARCHITECTURE.md "Configs and the command line").

This module imports nothing from `ares_jax` and nothing heavier than ml_collections.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable, Mapping

import ml_collections
from ml_collections import config_dict

# ---------------------------------------------------------------------------------------------
# The preset argument.

_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


def _parse_value(key: str, text: str, default, arg: str):
    """Parses `text` to the type of `default`; raises ValueError naming key and value."""
    kind = type(default)
    try:
        if kind is bool:
            low = text.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        names = {bool: "a bool (true/false)", int: "an integer", float: "a number"}
        raise ValueError(
            f"config argument {arg!r}: {key}={text!r} is not {names[kind]}, as {key} must be."
        ) from None
    return text  # str (or a None default: kept as text)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Turns a preset argument such as `paper_7b` or `preset=paper_7b,steps=3` into typed fields.

    Each keyword of `defaults` is a field; its default's type (bool, int, float, str) is the type
    the text is parsed to. Items are separated by commas. A bare first item (`paper_7b`) sets the
    first field; a bare item naming a bool field (`runlocal`) sets it to True.

    Args:
      arg: the text after the colon, or None / "" for all defaults.
      **defaults: the fields, in order, with their default values.

    Returns:
      An (unlocked) ConfigDict with one entry per field.

    Raises:
      ValueError: for an unknown key (the sentence lists the known ones), a value that does not
        parse to its field's type, a key given twice, or a bare item that is neither first nor the
        name of a bool field.
    """
    fields = dict(defaults)
    out = ml_collections.ConfigDict(fields)
    if not arg:
        return out
    names = list(fields)
    known = ", ".join(names) if names else "(none)"
    seen: set[str] = set()
    for i, item in enumerate(arg.split(",")):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, text = (s.strip() for s in item.split("=", 1))
        elif item in fields and isinstance(fields[item], bool):
            key, text = item, "true"
        elif i == 0 and names:
            key, text = names[0], item
        else:
            raise ValueError(
                f"config argument {arg!r}: bare item {item!r} is not allowed here; "
                f"write key=value with a key among: {known}."
            )
        if key not in fields:
            raise ValueError(f"config argument {arg!r}: unknown key {key!r}; known keys: {known}.")
        if key in seen:
            raise ValueError(f"config argument {arg!r}: key {key!r} is given twice.")
        seen.add(key)
        out[key] = _parse_value(key, text, fields[key], arg)
    return out


# ---------------------------------------------------------------------------------------------
# Validation. A check is a function value -> None (fine) or the end of a sentence saying what is
# wrong ("must be one of 0, 1"). `validate` prefixes it with the dotted key and the value.

Check = Callable[[object], "str | None"]


def get_path(config, dotted: str):
    """Returns `config.a.b.c` for `dotted` = "a.b.c"; KeyError naming the first missing part."""
    node = config
    for i, part in enumerate(dotted.split(".")):
        if not hasattr(node, "keys") or part not in node:
            raise KeyError(f"config has no key {'.'.join(dotted.split('.')[: i + 1])!r}")
        node = node[part]
    return node


def has_path(config, dotted: str) -> bool:
    """True if `dotted` names an entry of `config`."""
    try:
        get_path(config, dotted)
    except KeyError:
        return False
    return True


# `model.attention`: the model's attention implementations (ares_jax/models/qwen2_5_vl/text.py
# IMPLEMENTATIONS, which tests/configs check this against; kept here so configs import no jax).
MODEL_ATTENTION = ("auto", "blockwise", "splash", "pallas_gpu", "dense", "xla", "cudnn")
# `model.remat`: the layer stacks' remat policies (ares_jax/models/qwen2_5_vl/layers.py
# REMAT_POLICIES, checked likewise); True and False are the old switch ('full' and 'none').
MODEL_REMAT = ("none", "full", "attention", "dots", "offload", True, False)


def one_of(*allowed) -> Check:
    """The value must be one of `allowed` (compared with ==, types must match for bools)."""

    def check(value):
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return "must be one of " + ", ".join(repr(a) for a in allowed)

    check.allowed = allowed  # tests enumerate enum switches through this attribute
    return check


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def in_range(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """The value must be a number in [lo, hi] (or open at the marked ends); None = unbounded."""
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    span = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"

    def check(value):
        if not _is_number(value):
            return f"must be a number in {span}"
        if lo is not None and (value <= lo if lo_open else value < lo):
            return f"must be in {span}"
        if hi is not None and (value >= hi if hi_open else value > hi):
            return f"must be in {span}"
        return None

    return check


def positive() -> Check:
    """The value must be a number > 0."""
    return in_range(0, None, lo_open=True)


def non_negative() -> Check:
    """The value must be a number >= 0."""
    return in_range(0, None)


def optional(check: Check) -> Check:
    """None is allowed; anything else must pass `check`."""

    def wrapped(value):
        return None if value is None else check(value)

    if hasattr(check, "allowed"):
        wrapped.allowed = check.allowed
    return wrapped


def per_bucket(check: Check, n: int = 3) -> Check:
    """The value must be a tuple/list of `n` entries (easy, medium, hard), each passing `check`."""

    def wrapped(value):
        if not isinstance(value, tuple | list) or len(value) != n:
            return f"must be a tuple of {n} values (easy, medium, hard)"
        for name, v in zip(("easy", "medium", "hard"), value, strict=False):
            problem = check(v)
            if problem:
                return f"has {name} entry {v!r} that {problem}"
        return None

    return wrapped


def rgb(check: Check) -> Check:
    """The value must be a tuple/list of 3 numbers (red, green, blue), each passing `check`."""

    def wrapped(value):
        if not isinstance(value, tuple | list) or len(value) != 3:
            return "must be a tuple of 3 numbers (red, green, blue)"
        for name, v in zip(("red", "green", "blue"), value, strict=True):
            problem = check(v)
            if problem:
                return f"has {name} entry {v!r} that {problem}"
        return None

    return wrapped


def ascending_ints(minimum: int = 1) -> Check:
    """The value must be a non-empty, strictly increasing tuple of integers >= minimum."""

    def check(value):
        ok = (
            isinstance(value, tuple | list)
            and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and all(a < b for a, b in zip(value, value[1:], strict=False))
            and value[0] >= minimum
        )
        if ok:
            return None
        return f"must be a non-empty, strictly increasing tuple of integers >= {minimum}"

    return check


def is_type(*types: type) -> Check:
    """The value must be an instance of one of `types` (bool is not an int here)."""

    def check(value):
        if isinstance(value, bool) and bool not in types:
            return "must be " + " or ".join(t.__name__ for t in types)
        if isinstance(value, types):
            return None
        return "must be " + " or ".join(t.__name__ for t in types)

    return check


def validate(config, schema: Mapping[str, Check | Iterable[Check]]) -> None:
    """Checks every dotted key of `schema` in `config`.

    Raises:
      KeyError: if the schema names a key the config lacks (a bug in the config file).
      ValueError: one sentence naming the first offending key, its value and the rule.
    """
    for key, checks in schema.items():
        value = get_path(config, key)
        for check in checks if isinstance(checks, tuple | list) else (checks,):
            problem = check(value)
            if problem:
                raise ValueError(f"config.{key}={value!r} {problem}.")


def fail(key: str, message: str) -> None:
    """Raises the ValueError of a cross-field rule, naming `key`."""
    raise ValueError(f"config.{key}: {message}")


def _is_remote(path: str) -> bool:
    return "://" in path


def check_path(config, key: str, *, required: bool, why: str = "") -> None:
    """Checks that the local path at `key` exists (remote `scheme://` paths are not checked).

    A missing value raises when `required`; `why` completes the sentence ("for model.preset='7b'").
    """
    value = get_path(config, key)
    if value is None:
        if required:
            fail(key, f"is required{' ' + why if why else ''}; set --config.{key}=PATH.")
        return
    if not isinstance(value, str):
        fail(key, f"must be a path string, got {value!r}.")
    if not _is_remote(value) and not os.path.exists(value):
        fail(key, f"path {value!r} does not exist.")


# `data.columns`: the fields of ares_jax/data/records.py COLUMNS (tests/configs checks the two
# agree; kept here so configs import nothing from ares_jax), and the data file types it reads.
DATA_FIELDS = (
    "question",
    "answer",
    "images",
    "id",
    "traces",
    "source",
    "pass_rate",
    "difficulty",
    "messages",
)
DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


def data_columns() -> dict:
    """The `data.columns` block: one str entry per field of DATA_FIELDS, None = the defaults."""
    return {field: config_dict.placeholder(str) for field in DATA_FIELDS}


def check_columns(config, key: str = "data.columns") -> None:
    """The field -> column mapping at `key` names known fields, each a column name or None."""
    value = get_path(config, key)
    if value is None:
        return
    if not hasattr(value, "items"):
        fail(
            key,
            f"must map field names to column names, e.g. {{'question': 'problem'}}; got {value!r}.",
        )
    for field, column in value.items():
        if field not in DATA_FIELDS:
            fail(
                key,
                f"unknown field {field!r}; known fields: {', '.join(DATA_FIELDS)} (write "
                f"--config.{key}.FIELD=COLUMN).",
            )
        if column is not None and (not isinstance(column, str) or not column):
            fail(f"{key}.{field}", f"must be a column name (a non-empty string), got {column!r}.")


def split_files(value) -> list[str]:
    """Returns the entries of a file-list field: a list/tuple, or a comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    return [str(v) for v in value]


def check_files(config, key: str, *, required: bool, why: str = "") -> None:
    """Checks a file-list field: each local entry must name data (ares_jax/data/records.py
    `expand_paths`): a file, a directory holding a DATA_EXTENSIONS file (or a tfds build's
    dataset_info.json), or a glob that matches a file (`**` spans directories)."""
    value = get_path(config, key)
    files = split_files(value) if isinstance(value, str | list | tuple) or value is None else None
    if files is None:
        fail(key, f"must be a path, a comma-separated string of paths, or a list; got {value!r}.")
    if not files:
        if required:
            fail(key, f"is required{' ' + why if why else ''}; set --config.{key}=PATH[,PATH...].")
        return
    for pattern in files:
        if _is_remote(pattern):
            continue
        if os.path.isdir(pattern):
            names = os.listdir(pattern)
            data = [n for n in names if os.path.splitext(n)[1].lower() in DATA_EXTENSIONS]
            if not any(not n.startswith(".") for n in data):
                fail(
                    key,
                    f"directory {pattern!r} holds no {', '.join(DATA_EXTENSIONS)} file "
                    f"(subdirectories are not searched; use a glob such as "
                    f"{os.path.join(pattern, '**', '*.parquet')!r}).",
                )
        elif not any(os.path.isfile(p) for p in glob.glob(pattern, recursive=True)):
            fail(key, f"no file matches {pattern!r}.")
