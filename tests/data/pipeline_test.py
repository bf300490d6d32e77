"""Example sources and PromptStream: resume, sharding, epochs (ares_jax/data/pipeline.py)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from ares_jax.data import pipeline, records, synthetic
from ares_jax.data.pipeline import FilesSpec, PromptStream, SyntheticSpec, TfdsSpec
from ares_jax.data.records import Example
from ares_jax.data.tfds_builder import build_tfds

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ids(examples):
    return [ex.id for ex in examples]


def text_source(n):
    return [Example(f"e{i}", f"q{i}", str(i)) for i in range(n)]


def test_resume_continues_exactly():
    source = pipeline.example_source(SyntheticSpec(n=9, seed=1))
    stream = PromptStream(source, seed=5, shard_index=0, shard_count=1)
    first = stream.next_batch(7)
    state = json.loads(json.dumps(stream.get_state()))
    a = stream.next_batch(5)  # crosses into epoch 1

    resumed = PromptStream(source, seed=5, shard_index=0, shard_count=1)
    resumed.set_state(state)
    b = resumed.next_batch(5)
    assert a == b
    assert [ex.images for ex in a] == [ex.images for ex in b]
    assert len(first) == 7 and stream.position == 12 and stream.epoch == 1

    fresh = PromptStream(source, seed=5, shard_index=0, shard_count=1)
    assert ids(fresh.next_batch(12)) == ids(first + a)


def test_resume_in_another_process():
    stream = PromptStream(text_source(10), seed=2, shard_index=1, shard_count=3)
    stream.next_batch(4)
    state = json.dumps(stream.get_state())
    expected = ids(stream.next_batch(6))
    script = textwrap.dedent(
        f"""
        import json
        from ares_jax.data.pipeline import PromptStream
        from ares_jax.data.records import Example
        source = [Example(f"e{{i}}", f"q{{i}}", str(i)) for i in range(10)]
        stream = PromptStream(source, seed=2, shard_index=1, shard_count=3)
        stream.set_state({state!r})
        print(" ".join(ex.id for ex in stream.next_batch(6)))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == expected


@pytest.mark.parametrize("size, count", [(10, 2), (11, 2), (11, 3)])
def test_shards_are_disjoint_and_cover_each_epoch(size, count):
    source = text_source(size)
    for epoch in range(3):
        seen = []
        for index in range(count):
            stream = PromptStream(source, seed=9, shard_index=index, shard_count=count)
            per_epoch = stream.epoch_size
            assert per_epoch in (size // count, size // count + 1)
            stream.next_batch(epoch * per_epoch)
            seen.append(ids(stream.next_batch(per_epoch)))
        flat = [i for shard in seen for i in shard]
        assert len(flat) == len(set(flat)) == size
        assert set(flat) == {f"e{i}" for i in range(size)}


def test_each_epoch_is_a_new_permutation():
    stream = PromptStream(text_source(20), seed=0, shard_index=0, shard_count=1)
    epochs = [ids(stream.next_batch(20)) for _ in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    other_seed = PromptStream(text_source(20), seed=1, shard_index=0, shard_count=1)
    assert ids(other_seed.next_batch(20)) != epochs[0]


def test_no_shuffle_and_epoch_limit():
    stream = PromptStream(
        text_source(5), seed=0, shuffle=False, num_epochs=2, shard_index=1, shard_count=2
    )
    assert ids(stream.next_batch(3)) == ["e1", "e3", "e1"]
    assert ids(stream.next_batch(3)) == ["e3"]
    assert stream.next_batch(3) == []
    with pytest.raises(StopIteration):
        next(stream)
    assert ids(list(PromptStream(text_source(3), seed=0, shuffle=False, num_epochs=1))) == [
        "e0",
        "e1",
        "e2",
    ]


def test_default_shard_is_this_process():
    stream = PromptStream(text_source(4), seed=0)
    state = stream.get_state()
    assert (state["shard_index"], state["shard_count"]) == (0, 1)


def test_set_state_rejects_another_stream():
    state = PromptStream(text_source(8), seed=1, shard_index=0, shard_count=2).get_state()
    with pytest.raises(ValueError, match="seed=1.*seed=2"):
        PromptStream(text_source(8), seed=2, shard_index=0, shard_count=2).set_state(state)
    with pytest.raises(ValueError, match="source_size=8.*source_size=9"):
        PromptStream(text_source(9), seed=1, shard_index=0, shard_count=2).set_state(state)
    with pytest.raises(ValueError, match="shard_index"):
        PromptStream(text_source(8), seed=1, shard_index=1, shard_count=2).set_state(state)


@pytest.mark.parametrize("size, shards, k", [(12, 2, 4), (12, 3, 6), (8, 4, 4)])
def test_interleaved_shards_give_the_one_process_batches(size, shards, k):
    """What next_global_batch builds from the processes' shares (one stream per shard here)
    equals the batches of one stream over the whole data set, across epochs too."""
    whole = PromptStream(text_source(size), seed=3, shard_index=0, shard_count=1)
    parts = [
        PromptStream(text_source(size), seed=3, shard_index=h, shard_count=shards)
        for h in range(shards)
    ]
    for _ in range(3 * size // k):
        batch = pipeline.interleave([p.next_batch(k // shards) for p in parts])
        assert ids(batch) == ids(whole.next_batch(k))


def test_global_batch_and_state_with_one_process():
    stream = PromptStream(text_source(6), seed=0)
    twin = PromptStream(text_source(6), seed=0)
    assert ids(stream.next_global_batch(4)) == ids(twin.next_batch(4))
    states = stream.get_global_state()
    assert states == [stream.get_state()]
    for saved in (states, states[0]):  # a list of one, or a one-process checkpoint's dict
        resumed = PromptStream(text_source(6), seed=0)
        resumed.set_global_state(saved)
        assert resumed.position == 4
    with pytest.raises(ValueError, match="saved by 2 process.*this run has 1"):
        PromptStream(text_source(6), seed=0).set_global_state(states * 2)
    shard = PromptStream(text_source(6), seed=0, shard_index=1, shard_count=2)
    with pytest.raises(ValueError, match="one shard per process; this stream is shard 1 of 2"):
        shard.next_global_batch(2)


def test_stream_argument_errors():
    with pytest.raises(ValueError, match="empty"):
        PromptStream([], seed=0)
    with pytest.raises(ValueError, match="leave a shard empty"):
        PromptStream(text_source(2), seed=0, shard_index=0, shard_count=3)
    with pytest.raises(ValueError, match="seed"):
        PromptStream(text_source(2), seed=-1)


def test_example_source_kinds(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "answer": "1"}\n{"question": "q2"}\n')
    source = pipeline.example_source({"kind": "files", "paths": str(path), "on_error": "skip"})
    assert len(source) == 1 and source[0].answer == "1"
    assert source.read_stats.skipped == {"missing_answer": 1}
    with pytest.raises(records.DataError, match=r"d\.jsonl, line 2"):
        pipeline.example_source(FilesSpec(paths=(str(path),)))

    synth = pipeline.example_source(
        {"kind": "synthetic", "n": 4, "seed": 3, "split": "val", "difficulties": [5]}
    )
    assert synth[0] == synthetic.make_examples(4, seed=3, split="val", difficulties=(5,))[0]

    build = build_tfds("src", synthetic.make_examples(5, seed=0), tmp_path / "tfds")
    from_dir = pipeline.example_source(FilesSpec(paths=(build.path,)))
    shard = f"{build.path}/ares_examples-train.array_record-00000-of-00001"
    from_shard = pipeline.example_source(FilesSpec(paths=(shard,)))
    by_name = pipeline.example_source(TfdsSpec(path="src", data_dir=str(tmp_path / "tfds")))
    assert from_dir[4] == from_shard[4] == by_name[4] == synthetic.make_examples(5, seed=0)[4]
    stream = PromptStream(from_dir, seed=0, num_epochs=1)
    assert sorted(ids(stream.next_batch(10))) == sorted(ids(synthetic.make_examples(5, seed=0)))


def test_source_spec_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown key.*nn.*data kind 'synthetic'"):
        pipeline.source_spec({"kind": "synthetic", "nn": 3})
    with pytest.raises(ValueError, match="data kind must be one of files, synthetic, tfds"):
        pipeline.source_spec({"kind": "csv"})
    spec = pipeline.source_spec({"kind": "files", "paths": ["a", "b"], "columns": {"id": "key"}})
    assert spec == FilesSpec(paths=("a", "b"), columns=(("id", "key"),))


def test_an_empty_data_set_fails_at_read_naming_the_file(tmp_path):
    """Before, an empty file gave an empty source and a bare "the data source is empty" later."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(records.DataError, match=r"data file .*empty\.jsonl is empty"):
        pipeline.example_source({"kind": "files", "paths": str(empty), "on_error": "skip"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(
        records.DataError,
        match=r"no usable example in .*bad\.jsonl: all 1 row\(s\) were skipped "
        r"\(missing_answer: 1\)",
    ):
        pipeline.example_source({"kind": "files", "paths": str(bad), "on_error": "skip"})


def test_files_spec_image_root_and_absolute_paths(tmp_path):
    import PIL.Image

    (tmp_path / "pics").mkdir()
    PIL.Image.new("RGB", (4, 4)).save(tmp_path / "pics" / "a.png")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "d.jsonl"
    rows = [{"question": "q", "answer": "1", "images": [p]} for p in ("a.png", "../pics/a.png")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"kind": "files", "paths": str(path), "on_error": "skip"}
    with pytest.raises(records.DataError, match="no usable example"):  # a.png: missing, ..: out
        pipeline.example_source(spec)
    rooted = pipeline.example_source({**spec, "image_root": str(tmp_path / "pics")})
    assert len(rooted) == 2 and rooted.read_stats.skipped == {}  # both are pics/a.png
    anywhere = pipeline.example_source({**spec, "allow_absolute_image_paths": True})
    assert len(anywhere) == 1 and anywhere.read_stats.skipped == {"missing_image": 1}


def _grouped(n, *, epochs=None, window=3, k=4, seed=7):
    stream = PromptStream(text_source(n), seed=3, num_epochs=epochs)
    # Example i's "length" is i: the grouping must put neighbours in value together.
    return pipeline.LengthGroupedBatches(
        stream, batch_size=k, window_batches=window, length=lambda e: int(e.answer), seed=seed
    )


def test_length_grouped_batches_sort_each_window_and_keep_the_stream():
    grouped = _grouped(24, epochs=1)
    plain = PromptStream(text_source(24), seed=3, num_epochs=1)
    batches = [grouped.next_global_batch(4) for _ in range(6)]
    assert grouped.next_global_batch(4) == []
    for w in range(2):  # each window of 3 batches: the stream's 12 examples, sorted, cut in 4s
        drawn = sorted(int(e.answer) for e in plain.next_batch(12))
        got = [[int(e.answer) for e in b] for b in batches[3 * w : 3 * w + 3]]
        assert sorted(got) == [drawn[0:4], drawn[4:8], drawn[8:12]]
        assert all(b == sorted(b) for b in got)
    # The batch order within a window is shuffled, not by length, for some seed.
    orders = set()
    for seed in range(6):
        g = _grouped(24, epochs=1, seed=seed)
        firsts = [int(g.next_global_batch(4)[0].answer) for _ in range(3)]
        orders.add(tuple(np.argsort(firsts)))
    assert len(orders) > 1


def test_length_grouped_batches_partial_batch_last_and_epochs():
    grouped = _grouped(10, epochs=1)  # one window of 10: batches of 4, 4, then the 2 left
    sizes = [len(grouped.next_global_batch(4)) for _ in range(3)]
    assert sizes == [4, 4, 2] and grouped.next_global_batch(4) == []
    endless = _grouped(10, window=2)
    seen = [endless.next_global_batch(4) for _ in range(5)]  # 20 examples: two epochs
    assert sorted(e.id for b in seen for e in b) == sorted(ids(text_source(10)) * 2)
    assert endless.epoch == 2


def test_length_grouped_batches_resume_exactly():
    grouped = _grouped(30, window=3)
    for _ in range(4):  # into the second window
        grouped.next_global_batch(4)
    state = json.loads(json.dumps(grouped.get_global_state()))
    assert state["taken"] == 1
    expected = [ids(grouped.next_global_batch(4)) for _ in range(6)]
    resumed = _grouped(30, window=3)
    resumed.set_global_state(state)
    assert [ids(resumed.next_global_batch(4)) for _ in range(6)] == expected
    # At a window's end the state is the stream's position, nothing taken.
    at_end = _grouped(30, window=3)
    for _ in range(3):
        at_end.next_global_batch(4)
    assert at_end.get_global_state()["taken"] == 0
    with pytest.raises(ValueError, match="window_batches=3, this run has window_batches=2"):
        _grouped(30, window=2).set_global_state(state)
    with pytest.raises(ValueError, match="saved without length-grouped batches"):
        _grouped(30).set_global_state(PromptStream(text_source(30), seed=3).get_global_state())
    with pytest.raises(ValueError, match="groups batches of 4, not 8"):
        _grouped(30).next_global_batch(8)
