"""The embedded synthetic task (ares_jax/data/synthetic.py)."""

import collections
import io
import re

import numpy as np
import PIL.Image
import pytest

from ares_jax.data import synthetic


def test_same_seed_same_bytes_and_prefix_property():
    a = synthetic.make_examples(15, seed=7)
    b = synthetic.make_examples(15, seed=7)
    assert a == b
    assert [ex.images[0] for ex in a] == [ex.images[0] for ex in b]
    assert synthetic.make_examples(6, seed=7) == a[:6]
    c = synthetic.make_examples(15, seed=8)
    assert sum(x.images[0] != y.images[0] for x, y in zip(a, c, strict=True)) >= 12
    source = synthetic.SyntheticExamples(15, seed=7)
    assert source[9] == a[9] and source[-1] == a[-1]
    with pytest.raises(IndexError):
        source[15]


def test_difficulty_distribution():
    examples = synthetic.make_examples(50, seed=0)
    assert collections.Counter(ex.difficulty for ex in examples) == {d: 10 for d in range(1, 6)}
    examples = synthetic.make_examples(9, seed=0, difficulties=(2, 4))
    assert [ex.difficulty for ex in examples] == [2, 4] * 4 + [2]
    with pytest.raises(ValueError, match="subset of 1..5"):
        synthetic.make_examples(3, seed=0, difficulties=(0, 6))


def test_answers_equal_a_count_of_the_drawn_pixels():
    """The answer from the picture alone: a cell holds a shape iff its centre is not background."""
    problems = synthetic.make_problems(100, seed=3)
    examples = synthetic.make_examples(100, seed=3)
    asked = collections.Counter()
    for problem, example in zip(problems, examples, strict=True):
        image = np.asarray(PIL.Image.open(io.BytesIO(example.images[0])).convert("RGB"))
        cell = image.shape[0] // synthetic.GRID
        centres = image[cell // 2 :: cell, cell // 2 :: cell]
        shapes = int(np.any(centres != synthetic.BACKGROUND, axis=-1).sum())
        if example.question == "How many shapes are in the image?":
            expected, asked["shapes"] = shapes, asked["shapes"] + 1
        else:
            assert example.question == "How many cells of the 4 x 4 grid are empty?"
            expected, asked["empty"] = 16 - shapes, asked["empty"] + 1
        assert example.answer == str(expected) == str(problem.answer)
        assert example.id == problem.id and example.question == problem.question
    assert min(asked.values()) >= 35  # both questions are asked


def test_sizes_grow_with_difficulty():
    problems = synthetic.make_problems(250, seed=1)
    by_level = collections.defaultdict(list)
    for p in problems:
        by_level[p.difficulty].append(len(p.shapes))
        cells = [(s.row, s.col) for s in p.shapes]
        assert len(set(cells)) == len(cells)
    bounds = {1: (1, 3), 2: (4, 6), 3: (7, 9), 4: (10, 12), 5: (13, 15)}
    for d, counts in by_level.items():
        assert bounds[d][0] <= min(counts) and max(counts) <= bounds[d][1]
        assert len(set(counts)) == 3  # every count of the range occurs


def test_image_shows_the_generated_objects():
    problems = synthetic.make_problems(20, seed=4)
    examples = synthetic.make_examples(20, seed=4)
    for problem, example in zip(problems, examples, strict=True):
        image = np.asarray(PIL.Image.open(io.BytesIO(example.images[0])).convert("RGB"))
        assert image.shape == (112, 112, 3)
        cell = 112 // synthetic.GRID
        occupied = {(s.row, s.col): s for s in problem.shapes}
        for row in range(synthetic.GRID):
            for col in range(synthetic.GRID):
                center = image[row * cell + cell // 2, col * cell + cell // 2]
                shape = occupied.get((row, col))
                expected = synthetic.COLORS[shape.color] if shape else synthetic.BACKGROUND
                assert tuple(center) == expected
        # Circles leave the cell corner region white, squares fill it.
        for s in problem.shapes:
            near_corner = image[s.row * cell + 5, s.col * cell + 5]
            is_colored = tuple(near_corner) == synthetic.COLORS[s.color]
            assert is_colored == (s.kind == "square")
    big = synthetic.make_examples(1, seed=4, image_size=224)[0]
    assert PIL.Image.open(io.BytesIO(big.images[0])).size == (224, 224)


def test_traces_are_correct_and_grow_with_difficulty():
    examples = synthetic.make_examples(150, seed=5)
    lengths = collections.defaultdict(list)
    for ex in examples:
        assert len(ex.traces) == len(synthetic.TRACE_STYLES) == 3
        for trace in ex.traces:
            assert re.fullmatch(r"<think> .+ </think> The answer is \\boxed\{(\d+)\}\.", trace)
            assert trace.endswith(f"\\boxed{{{ex.answer}}}.")
        terse, normal, verbose = (len(t) for t in ex.traces)
        assert terse < normal < verbose
        n = len(re.search(r"I count the shapes: ([\d, ]+)\.", ex.traces[1]).group(1).split(", "))
        assert str(n if "shapes are" in ex.question else 16 - n) == ex.answer
        lengths[ex.question, ex.difficulty].append([normal, verbose])
    for question in {q for q, _ in lengths}:  # per question, [level, style]
        means = np.array([np.mean(lengths[question, d], axis=0) for d in range(1, 6)])
        assert np.all(np.diff(means, axis=0) > 0), means


def test_verbose_trace_counts_each_row_of_the_picture():
    problem = next(
        p
        for p in synthetic.make_problems(50, seed=7)
        if 0 in synthetic.shapes_per_row(p) and len(p.shapes) > 4
    )
    rows = re.findall(r"Row (\d): ([\d, ]+|none)\.", synthetic.to_example(problem).traces[2])
    assert [int(r) for r, _ in rows] == [1, 2, 3, 4]
    numbers = [[] if seg == "none" else [int(x) for x in seg.split(", ")] for _, seg in rows]
    want = [sum(s.row == r for s in problem.shapes) for r in range(4)]
    assert [len(x) for x in numbers] == want
    assert sum(numbers, []) == list(range(1, len(problem.shapes) + 1))  # the count runs on
    assert synthetic.shapes_per_row(problem) == tuple(want)


def test_wrong_trace_is_last_and_wrong():
    for ex in synthetic.make_examples(30, seed=6, wrong_trace=True):
        assert len(ex.traces) == 4
        boxed = re.search(r"\\boxed\{(\d+)\}", ex.traces[-1]).group(1)
        assert boxed != ex.answer
        assert all(t.endswith(f"\\boxed{{{ex.answer}}}.") for t in ex.traces[:3])


def test_checked_trace_recounts_and_corrects_the_quick_count():
    """The checked style: a quick count, "So m?", the row-by-row count, and the total; where the
    quick count missed a shape the trace says so. Misses never happen on levels 1-2 and are
    about MISCOUNT_SHARE of the problems on levels 3-5."""
    problems = synthetic.make_problems(600, seed=11)
    misses = collections.Counter()
    for problem in problems:
        example = synthetic.to_example(problem, checks=True, wrong_trace=True)
        assert len(example.traces) == 5  # three styles, checked, then the wrong trace
        checked = example.traces[3]
        assert checked.endswith(f"\\boxed{{{example.answer}}}.")
        assert synthetic.rechecks(checked) and not any(
            synthetic.rechecks(t) for t in example.traces[:3]
        )
        n, quick = len(problem.shapes), synthetic.quick_count(problem)
        said = re.search(r"I count the shapes: ([\d, ]+)\. So (\d+)\? Let me check", checked)
        assert [int(x) for x in said.group(1).split(", ")] == list(range(1, quick + 1))
        assert int(said.group(2)) == quick
        recount = re.search(r"row by row: (.*?)\. So there", checked).group(1)
        rows = re.findall(r"(?:^|, then )([\d, ]+?|none) in row (\d)", recount)
        assert [int(r) for _, r in rows] == [1, 2, 3, 4]
        expected, done = [], 0
        for k in synthetic.shapes_per_row(problem):  # the numbering runs on from row to row
            expected.append(", ".join(str(i) for i in range(done + 1, done + k + 1)) or "none")
            done += k
        assert [seg for seg, _ in rows] == expected
        counted = [int(x) for seg, _ in rows if seg != "none" for x in seg.split(", ")]
        assert counted == list(range(1, n + 1))
        # every row after the first turns at "then", a trigger word of the entropy reward
        assert recount.count("then ") == synthetic.GRID - 1
        total = "1 shape" if n == 1 else f"{n} shapes"
        tail = "." if quick == n else f", not {quick}."
        assert f"So there {'is' if n == 1 else 'are'} {total}{tail}" in checked
        assert quick in (n, n - 1)
        misses[problem.difficulty] += quick != n
    per_level = len(problems) // 5
    assert misses[1] == misses[2] == 0
    for level in (3, 4, 5):
        share = misses[level] / per_level
        assert abs(share - synthetic.MISCOUNT_SHARE[level]) < 0.12, (level, share)
    # the same problem, the same quick count: a function of the content
    assert [synthetic.quick_count(p) for p in problems[:50]] == [
        synthetic.quick_count(p) for p in synthetic.make_problems(50, seed=11)
    ]


def test_checked_trace_is_off_by_default_and_longest_on_hard_problems():
    example = synthetic.make_examples(1, seed=3)[0]
    assert len(example.traces) == 3
    for ex in synthetic.make_examples(50, seed=3, difficulties=(4, 5), checks=True):
        assert max(ex.traces, key=len) == ex.traces[3]


def test_splits_are_disjoint():
    def content(p):
        return (p.difficulty, p.shapes, p.asks)

    sets = {
        split: {content(p) for p in synthetic.make_problems(300, seed=0, split=split)}
        for split in synthetic.SPLITS
    }
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    ids = [p.id for p in synthetic.make_problems(3, seed=0, split="val")]
    assert ids == ["synthetic-val-s0-0", "synthetic-val-s0-1", "synthetic-val-s0-2"]
    with pytest.raises(ValueError, match="split must be one of"):
        synthetic.make_examples(1, seed=0, split="dev")
