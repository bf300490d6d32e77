"""Entry point: python -m ares_jax.main --config=configs/aepo.py[:PRESET] --workdir=DIR.

Parses the config (ml_collections config_flags, locked), initialises multi-process JAX, validates
the config with the config file's own `validate(config)`, prints it, and runs its stage's
`ares_jax.<stage>.train.run(config, workdir)`. A user error (bad key, value, preset or path) ends
the run with one sentence on stderr and exit code 2, before anything is written; so do a workdir
that cannot be written or that another run holds, bad data, and a run stopped by non-finite values
(its last checkpoint is complete). On SIGTERM the stage saves its step and the process exits with
code 143 (`checkpoint.PREEMPTED_EXIT_CODE`, 128 + SIGTERM): requeue on it, the restart resumes.

XLA's persistent compilation cache is on for these runs (`compilation_cache`): a program compiled
once (by an earlier run, or by an earlier stage of this one: the pipeline's stages and the
ablation's runs compile the same shapes) is read back from disk instead of compiled again. It lives
in $ARES_JAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/ares_jax/xla (~/.cache/ares_jax/xla), at
most 4 GiB (least recently used entries go first); ARES_JAX_COMPILATION_CACHE=off turns it off,
and a cache directory set through JAX's own JAX_COMPILATION_CACHE_DIR is used as it is.

A run that seems stuck (a multi-host job waiting in a collective shows no error): `kill -USR2 PID`
prints the Python stack of every thread of that process to stderr, and the run goes on.
"""

from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import json
import logging as std_logging
import os
import re
import signal
import sys

import yaml
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file[:preset], e.g. configs/aepo.py:smoke.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory: checkpoints, metrics, config.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Validate and print the config, run nothing.")
flags.mark_flag_as_required("config")

STAGES = {
    "aepo": "ares_jax.aepo.train",
    "adacs": "ares_jax.adacs.train",
    "pipeline": "ares_jax.pipeline",
    "ablation": "ares_jax.ablation",
}


STACK_DUMP_SIGNAL = signal.SIGUSR2
CACHE_ENV = "ARES_JAX_COMPILATION_CACHE"  # a directory, or "off"
CACHE_MAX_BYTES = 4 << 30
# Programs that compile faster than this are not written to the cache (JAX's default is 1 s; the
# embedded model's programs mostly compile in less, and reading one back takes milliseconds).
CACHE_MIN_COMPILE_S = 0.2


def compilation_cache() -> str | None:
    """Turns on XLA's persistent compilation cache (module docstring); returns its directory, or
    None where it is off."""
    import jax

    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "false", "no", "none"):
        return None
    if jax.config.jax_compilation_cache_dir:  # set through JAX's own configuration
        return jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = setting or os.path.join(base, "ares_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
    return path


def dump_stacks_on_signal() -> None:
    """STACK_DUMP_SIGNAL prints the Python stack of every thread to stderr; the process goes on.
    Fatal errors (a segfault in native code) print them too."""
    faulthandler.enable()
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True, chain=False)


def _die(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_module(spec: str):
    """Imports the config file of `spec` ("path[:arg]") as a module of its own."""
    loader_spec = importlib.util.spec_from_file_location("_ares_config", spec.split(":", 1)[0])
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def _unknown_key(argv: list[str]) -> str | None:
    """Names the first --config.KEY override whose KEY the config lacks."""
    spec = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")][-1]
    config = _config_module(spec).get_config(*spec.split(":", 1)[1:])
    for arg in argv:
        parts = m.group(1).split(".") if (m := re.match(r"--config\.([\w.]+)", arg)) else []
        node = config
        for i, part in enumerate(parts):
            if not hasattr(node, "keys") or part not in node:
                known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
                where = ".".join(["config", *parts[:i]])
                key = ".".join(parts[: i + 1])
                return f"unknown config key {key!r} in {arg}; keys under {where}: {known}."
            node = node[part]
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with config errors turned into one sentence (no traceback)."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # forces a lazily reported load failure
    except Exception as e:  # noqa: BLE001 - every failure here is a user error
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [repr(e)]
        message = re.sub(r"^\w+(Error|Exception): ", "", lines[-1])  # the cause's own sentence
        if isinstance(e, AttributeError | KeyError):  # an unknown --config.KEY
            try:
                message = _unknown_key(argv) or message
            except Exception:  # noqa: BLE001 - keep the raw message
                pass
        _die(message)
    return rest


def _files_when_given(config) -> str | None:
    """Data files given on the command line with data.source left as the preset has it
    ('synthetic') mean data.source='files'. Returns the line to log, or None."""
    data = config.get("data")
    given = config_flags.get_override_values(flags.FLAGS["config"])
    if (
        not data
        or "source" not in data
        or data.source != "synthetic"
        or "data.source" in given
        or not any(f"data.{k}" in given for k in ("train_files", "val_files"))
    ):
        return None
    data.source = "files"
    return "data.source='files': data files were given on the command line."


def _images_from_checkpoint(config, module) -> list[str]:
    """With `model.path`, the image settings the config leaves to the checkpoint come from its
    image processor (either layout, `hub_files.read_image_settings`): data.min_pixels and
    data.max_pixels where neither the preset nor the command line set them (still the config
    file's CPU default, `_base()`), data.image_mean and data.image_std where None. The pipeline
    and ablation configs do it for each of their stage blocks; a later stage without a model.path
    of its own starts from the warm-up's export, so the warm-up's checkpoint settles its
    settings too.
    Returns the lines to log (one per block)."""
    if config.get("stage") in ("pipeline", "ablation"):
        from configs import adacs, aepo

        first = config.warmup.model.get("path") if "warmup" in config else None
        bases = {"warmup": adacs._base, "adacs": adacs._base, "aepo": aepo._base}
        blocks = [(f"{n}.", config[n], base, first) for n, base in bases.items() if n in config]
    else:
        blocks = [("", config, getattr(module, "_base", None), None)]
    given = config_flags.get_override_values(flags.FLAGS["config"])
    return [line for block in blocks if (line := _block_images(*block, given))]


def _block_images(prefix: str, config, base, fallback: str | None, given) -> str | None:
    model, data = config.get("model"), config.get("data")
    path = (model.get("path") if model else None) or fallback
    if not path or not data or base is None or "min_pixels" not in data:
        return None
    from ares_jax.models.qwen2_5_vl import hub_files

    found = hub_files.read_image_settings(path)
    if found is None:
        norm = "" if data.get("image_mean") is not None else ", the hub's normalisation"
        return (
            f"{path} has no image processor: images resized within {prefix}data.min_pixels="
            f"{data.min_pixels}, {prefix}data.max_pixels={data.max_pixels} as configured{norm}."
        )
    defaults = base().data
    taken = []
    for key in ("min_pixels", "max_pixels"):
        if f"{prefix}data.{key}" not in given and data[key] == defaults[key]:
            data[key] = getattr(found, key)
            taken.append(f"{prefix}data.{key}")
    for key, attr in (("image_mean", "mean"), ("image_std", "std")):
        if key in data and data[key] is None:
            data[key] = tuple(getattr(found, attr))
            taken.append(f"{prefix}data.{key}")
    source = f"{', '.join(taken)} from {path}'s image processor" if taken else "as set"
    return (
        f"Images resized within {prefix}data.min_pixels={data.min_pixels}, "
        f"{prefix}data.max_pixels={data.max_pixels}, normalised with mean "
        f"{tuple(data.get('image_mean') or found.mean)}, std "
        f"{tuple(data.get('image_std') or found.std)} ({source})."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        _die(f"unexpected arguments {argv[1:]}; options are --config, --workdir, --config.KEY=V.")
    from ares_jax.parallel import distributed  # jax only after flags: before any backend use

    dump_stacks_on_signal()
    distributed.maybe_initialize()
    cache = compilation_cache()
    config, workdir, path = _CONFIG.value, _WORKDIR.value, flags.FLAGS["config"].config_filename
    module = _config_module(path)
    validate = getattr(module, "validate", None)
    try:
        for line in (_files_when_given(config), *_images_from_checkpoint(config, module)):
            if line:
                logging.info("%s", line)
        if validate is None:
            logging.warning("%s defines no validate(config); the config is not checked.", path)
        else:
            validate(config)
    except (ValueError, FileNotFoundError) as e:
        _die(str(e))
    stage = config.get("stage")
    if stage not in STAGES:
        _die(f"config.stage={stage!r} is not one of {', '.join(map(repr, STAGES))}.")

    import jax

    if jax.process_index() == 0:
        text = yaml.safe_dump(json.loads(config.to_json()), sort_keys=True, width=100)
        where = workdir or "none given; --workdir=DIR sets where they go"
        print(f"# config ({path}):\n{text}# workdir (config.json, metrics, checkpoints): {where}")
        off = f"{CACHE_ENV}=off turns it off"
        print(f"# compilation cache: {cache}; {off}" if cache else "# compilation cache: off")
    name = STAGES[stage]
    try:
        module = None if _DRY_RUN.value else importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name not in (name, name.rsplit(".", 1)[0]):  # the stage lacks a dependency
            _die(f"{name} needs the module {e.name!r}, which is not installed.")
        module = None
    target = f"{name}.run(config, workdir={workdir!r})"
    if module is None:
        why = "--dry_run" if _DRY_RUN.value else f"{name} does not exist yet"
        print(f"# stage {stage!r}: would run {target}; not run ({why}).")
    elif workdir is None:
        _die(f"--workdir is required to run stage {stage!r}.")
    else:
        print(f"# stage {stage!r}: running {target}.")
        # The project's own progress lines at INFO; libraries (orbax, tfds) only warn.
        logging.set_verbosity(logging.WARNING)
        std_logging.getLogger("ares_jax").setLevel(std_logging.INFO)
        from ares_jax.checkpoint import PREEMPTED_EXIT_CODE, Preempted
        from ares_jax.data.records import DataError
        from ares_jax.metrics import NonFiniteError
        from ares_jax.runtime import WorkdirError

        try:
            module.run(config, workdir)
        except Preempted as e:  # saved; the scheduler requeues on the code, the restart resumes
            print(f"preempted: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (DataError, FileNotFoundError, NonFiniteError, WorkdirError) as e:  # one sentence
            _die(str(e))


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
