"""The requirement pins that guard against known-unsafe releases hold, here and in the file."""

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements() -> dict[str, Requirement]:
    out = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[req.name.lower()] = req
    return out


def test_pyarrow_excludes_the_release_that_runs_code_from_parquet_files():
    # pyarrow 14.0.0 deserialises untrusted parquet metadata into arbitrary code
    # (CVE-2023-47248); data files come from users and the Hub.
    spec = _requirements()["pyarrow"].specifier
    assert Version("14.0.0") not in spec and Version("14.0.1") in spec
    assert Version(metadata.version("pyarrow")) in spec
