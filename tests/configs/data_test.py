"""The data keys of configs/adacs.py and configs/aepo.py: `data.columns` set from the command line,
directories and globs as data paths, and the errors that name the key (configs/common.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from ares_jax.data import pipeline, records
from configs import adacs, aepo, common
from tests.data.virl39k import write_virl39k

ROOT = Path(__file__).resolve().parents[2]


def parse(config_file: str, *overrides: str):
    """The config as `python -m ares_jax.main --config=FILE OVERRIDES...` parses it."""
    argv = ["prog", f"--config={config_file}", *overrides]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_data_fields_are_the_readers_fields():
    assert common.DATA_FIELDS == tuple(records.COLUMNS)
    assert common.DATA_EXTENSIONS == records._EXTENSIONS
    for module in (adacs, aepo):
        columns = module.get_config("smoke").data.columns
        assert dict(columns) == dict.fromkeys(records.COLUMNS)


@pytest.mark.parametrize("module, preset", [(adacs, "smoke"), (aepo, "stage")])
def test_columns_from_the_command_line_both_ways(tmp_path, module, preset):
    directory = tmp_path / "virl39k"
    write_virl39k(directory)
    spec = f"configs/{module.__name__.split('.')[-1]}.py:{preset}"
    common_args = (
        "--config.data.source=files",
        f"--config.data.train_files={directory}",
        f"--config.data.val_files={directory}",
    )
    one = parse(spec, *common_args, "--config.data.columns.pass_rate=PassRate_32BTrained")
    many = parse(
        spec,
        *common_args,
        '--config.data.columns={"pass_rate": "PassRate_32BTrained", "id": "qid"}',
    )
    for c in (one, many):
        module.validate(c)  # a directory passes the path check
        source = pipeline.example_source(
            pipeline.FilesSpec(paths=(c.data.train_files,), columns=c.data.columns)
        )
        assert [source[i].pass_rate for i in range(len(source))] == [0.75, 0.5, None]
    assert many.data.columns.to_dict() == {"pass_rate": "PassRate_32BTrained", "id": "qid"}


def test_unknown_field_in_columns_names_the_key_and_the_fields():
    c = parse("configs/adacs.py:smoke", '--config.data.columns={"prompt": "problem"}')
    with pytest.raises(ValueError) as e:
        adacs.validate(c)
    message = str(e.value)
    assert message.startswith("config.data.columns: unknown field 'prompt'; known fields:")
    assert "question, answer, images, id, traces, source, pass_rate" in message
    c = parse("configs/aepo.py:stage", "--config.data.columns.question=")
    with pytest.raises(ValueError, match=r"config\.data\.columns\.question: must be a column"):
        aepo.validate(c)


def test_main_accepts_a_directory_and_names_an_unknown_field(tmp_path):
    directory = tmp_path / "virl39k"
    write_virl39k(directory, traces=True)
    base = [
        sys.executable,
        "-m",
        "ares_jax.main",
        "--config=configs/adacs.py:smoke",
        f"--workdir={tmp_path / 'work'}",
        "--dry_run",
        "--config.data.source=files",
        f"--config.data.train_files={directory}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    run = dict(cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    ok = subprocess.run([*base, "--config.data.columns.pass_rate=PassRate_7BBase"], **run)
    assert ok.returncode == 0, ok.stderr
    assert "pass_rate: PassRate_7BBase" in ok.stdout
    bad = subprocess.run([*base, "--config.data.columns.prompt=problem"], **run)
    assert bad.returncode == 2
    assert "unknown config key 'data.columns.prompt'" in bad.stderr
    assert "answer, difficulty, id, images, messages, pass_rate, question" in bad.stderr


def test_check_files_directories_and_globs(tmp_path):
    c = adacs.get_config("smoke")
    c.data.source = "files"
    directory = tmp_path / "virl39k"
    write_virl39k(directory)
    for value in (str(directory), str(directory / "*.parquet"), str(tmp_path / "**" / "*.parquet")):
        c.data.train_files = value
        adacs.validate(c)
    c.data.train_files = str(directory / "images")  # holds PNG and JPEG files only
    with pytest.raises(ValueError, match=r"config\.data\.train_files: directory .* holds no"):
        adacs.validate(c)
    c.data.train_files = f"{directory},{tmp_path / 'nothing-*.parquet'}"
    pattern = re.escape(str(tmp_path / "nothing-*.parquet"))
    with pytest.raises(
        ValueError, match=rf"config\.data\.train_files: no file matches '{pattern}'"
    ):
        adacs.validate(c)


def test_aepo_reads_files_with_the_configured_columns(tmp_path):
    """AEPO's data source (`aepo.train._source`) maps columns by `data.columns`: the 32B rate
    instead of the default 7B-first choice, ids from `qid`."""
    from ares_jax.aepo import train as aepo_train

    directory = tmp_path / "virl39k"
    write_virl39k(directory)
    c = parse(
        "configs/aepo.py:stage",
        "--config.data.source=files",
        f"--config.data.train_files={directory}",
        '--config.data.columns={"pass_rate": "PassRate_32BTrained", "id": "qid"}',
    )
    source = aepo_train._source(c, "train")
    rows = [source[i] for i in range(len(source))]
    assert [r.pass_rate for r in rows] == [0.75, 0.5, None]
    c = parse(
        "configs/aepo.py:stage",
        "--config.data.source=files",
        f"--config.data.train_files={directory}",
    )
    default = aepo_train._source(c, "train")
    assert [default[i].pass_rate for i in range(len(default))] == [0.25, 0.5, 1.0]
