"""Host-side data: Examples and their readers, ArrayRecord builds, prompt streams, synthetic task.

    from ares_jax.data import PromptStream, SyntheticSpec, example_source
    stream = PromptStream(example_source(SyntheticSpec(n=1000, seed=0)), seed=0)

Nothing here is jitted; `ops/`, `models/` and `sampling/` never import this package. Exports
are resolved lazily, so `records` and `synthetic` import without grain, jax or tfds.
"""

import importlib

_EXPORTS = {
    "Example": "records",
    "ReadStats": "records",
    "DataError": "records",
    "COLUMNS": "records",
    "iter_examples": "records",
    "read_examples": "records",
    "read_many": "records",
    "write_jsonl": "records",
    "build_tfds": "tfds_builder",
    "TfdsBuild": "tfds_builder",
    "TfdsExamples": "tfds_builder",
    "ExampleSource": "pipeline",
    "SyntheticSpec": "pipeline",
    "FilesSpec": "pipeline",
    "TfdsSpec": "pipeline",
    "source_spec": "pipeline",
    "example_source": "pipeline",
    "PromptStream": "pipeline",
    "SyntheticExamples": "synthetic",
    "make_examples": "synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
