"""Checkpoint side files: the image processor in both layouts, the dtype, and the export's files
loading back in transformers."""

import json
import os

import numpy as np
import pytest

from ares_jax.models.qwen2_5_vl import hub_files, processor
from ares_jax.models.qwen2_5_vl.tokenizer import build_tokenizer
from tests.models.processor_test import MAX_PIXELS, MIN_PIXELS, _random_image


@pytest.fixture(scope="module")
def pil_processor():
    # The PIL backend needs neither torch nor torchvision (QWEN2_5_VL.md 6.5).
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    return pil.Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _write(path, data):
    path.write_text(json.dumps(data))


def test_both_layouts_give_the_same_settings(pil_processor, tmp_path):
    hub, t5 = tmp_path / "hub", tmp_path / "t5"
    pil_processor.save_pretrained(hub)  # preprocessor_config.json, settings at top level
    t5.mkdir()
    # transformers 5 `save_pretrained` of the processor: one processor_config.json, the image
    # processor nested, no preprocessor_config.json.
    _write(
        t5 / "processor_config.json",
        {
            "processor_class": "Qwen2_5_VLProcessor",
            "image_processor": json.loads((hub / "preprocessor_config.json").read_text()),
            "video_processor": {"video_processor_type": "Qwen2VLVideoProcessor"},
        },
    )
    a, b = processor.load_image_settings(hub), processor.load_image_settings(t5)
    assert a == b
    assert (a.min_pixels, a.max_pixels, a.patch_size, a.merge_size) == (
        MIN_PIXELS,
        MAX_PIXELS,
        14,
        2,
    )
    assert a.std == pytest.approx(processor.IMAGE_STD)


def test_pixel_limits_from_size_and_errors_name_the_file(tmp_path):
    _write(
        tmp_path / "preprocessor_config.json",
        {"size": {"shortest_edge": 1000, "longest_edge": 5000}},
    )
    s = hub_files.read_image_settings(tmp_path)
    assert (s.min_pixels, s.max_pixels, s.temporal_patch_size) == (1000, 5000, 2)
    _write(tmp_path / "preprocessor_config.json", {"min_pixels": 1000})
    with pytest.raises(ValueError, match="preprocessor_config.json: gives no pixel limits"):
        hub_files.read_image_settings(tmp_path)
    _write(tmp_path / "preprocessor_config.json", {"min_pixels": 9, "max_pixels": 4, "x": 1})
    with pytest.raises(ValueError, match="min_pixels 9 > max_pixels 4"):
        hub_files.read_image_settings(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    _write(tmp_path / "processor_config.json", {"processor_class": "X"})
    with pytest.raises(ValueError, match='processor_config.json: has no "image_processor"'):
        hub_files.read_image_settings(tmp_path)
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json: not valid JSON"):
        hub_files.read_image_settings(tmp_path)
    assert hub_files.read_image_settings(tmp_path / "nothing") is None


def test_source_dtype_in_both_spellings(tmp_path):
    _write(tmp_path / "config.json", {"torch_dtype": "bfloat16"})
    assert hub_files.source_dtype(tmp_path) == "bfloat16"
    _write(tmp_path / "config.json", {"text_config": {"dtype": "float16"}})
    assert hub_files.source_dtype(tmp_path) == "float16"
    _write(tmp_path / "config.json", {})
    assert hub_files.source_dtype(tmp_path) is None


def test_export_files_load_in_transformers(tmp_path):
    """The export's image processor is the run's settings (what `AutoImageProcessor` and our
    evaluation read back, pixel for pixel); the source's generation config and chat template
    are carried over; without a source the generation config comes from the tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    source, export = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    _write(source / "generation_config.json", {"top_p": 0.001, "eos_token_id": [7, 8]})
    (source / "chat_template.jinja").write_text("{{ messages }}")
    run = hub_files.default_image_settings(min_pixels=3136, max_pixels=28 * 28 * 64)
    written = hub_files.write_export_files(export, settings=run, source=source)
    assert sorted(written) == [
        "chat_template.jinja",
        "generation_config.json",
        "preprocessor_config.json",
    ]
    assert processor.load_image_settings(export) == run
    auto = transformers.AutoImageProcessor.from_pretrained(export, local_files_only=True)
    assert (auto.size["shortest_edge"], auto.size["longest_edge"]) == (3136, 28 * 28 * 64)
    # Pixels against the PIL backend (what AutoImageProcessor gives without torchvision; the
    # torchvision backend resizes differently, by up to 0.015 after normalisation).
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    hf = pil.Qwen2VLImageProcessorPil.from_pretrained(export, local_files_only=True)
    image = _random_image(130, 400)
    ours, grid = processor.preprocess_image(image, **run.kwargs())
    ref = hf(images=[image], return_tensors="np")
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(grid)[None], ref["image_grid_thw"])
    gen = transformers.GenerationConfig.from_pretrained(export, local_files_only=True)
    assert gen.top_p == 0.001 and gen.eos_token_id == [7, 8]

    tokenizer = build_tokenizer()
    bare = tmp_path / "bare"
    hub_files.write_export_files(bare, settings=run, tokenizer=tokenizer)
    gen = transformers.GenerationConfig.from_pretrained(bare, local_files_only=True)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in gen.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id


def test_export_loads_with_auto_processor(tmp_path):
    """`AutoProcessor` on an export. transformers 5 builds the Qwen2.5-VL video processor through
    torchvision, so this runs where torchvision is installed; skipped otherwise, unless
    ARES_TEST_TORCHVISION=1 (CI's last step, `.ci/run`, with torch 2.14.1 and torchvision 0.29.1
    layered over the environment) makes a missing torchvision a failure."""
    if os.environ.get("ARES_TEST_TORCHVISION") == "1":
        import torchvision  # noqa: F401
    else:
        pytest.importorskip("torchvision", reason="AutoProcessor for Qwen2.5-VL needs torchvision")
    transformers = pytest.importorskip("transformers")
    from tests.own_model_and_data_test import _checkpoint

    export = _checkpoint(tmp_path / "export")
    proc = transformers.AutoProcessor.from_pretrained(export, local_files_only=True)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor"
    assert (
        proc.image_processor.size["shortest_edge"],
        proc.image_processor.size["longest_edge"],
    ) == (
        2352,
        12544,
    )
    text = proc.apply_chat_template(
        processor.chat_messages("<image>What?", 1, suffix=None), add_generation_prompt=True
    )
    assert text == processor.build_prompt("<image>What?", 1, suffix=None)
    out = proc(text=[text], images=[_random_image(60, 90)], return_tensors="np")
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]


def test_generation_stops_from_generation_config(tmp_path):
    from ares_jax import evaluate as ev
    from ares_jax.models.qwen2_5_vl import config

    assert hub_files.generation_stops(tmp_path) == ()
    _write(tmp_path / "generation_config.json", {"eos_token_id": [151645, 151643, 7]})
    assert hub_files.generation_stops(tmp_path) == (151645, 151643, 7)
    _write(tmp_path / "generation_config.json", {"eos_token_id": 9})
    assert hub_files.generation_stops(tmp_path) == (9,)
    tokenizer, cfg = build_tokenizer(), config.preset("tiny")
    sampling = ev.policy_sampling(
        cfg,
        tokenizer,
        max_new_tokens=4,
        temperature=0.0,
        stops=hub_files.generation_stops(tmp_path),
    )
    assert 9 in sampling.stop_token_ids and cfg.eos_token_id in sampling.stop_token_ids
    _write(tmp_path / "generation_config.json", {"eos_token_id": "</s>"})
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be"):
        hub_files.generation_stops(tmp_path)
