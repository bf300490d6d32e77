"""The embedded synthetic task: count the shapes in a picture, or the empty cells around them.

Each picture is a 4 x 4 grid of cells (28 x 28 pixels each, one merged Qwen2.5-VL vision token per
cell); n of the cells hold a shape (circle, square or triangle in red, green or blue). A problem
asks one of two questions:

    "How many shapes are in the image?"                        (answer n)
    "How many cells of the 4 x 4 grid are empty?"              (answer 16 - n: count, then subtract)

Difficulty d in 1..5 sets how many shapes there are, `NUM_SHAPES[d]` (1-3, 4-6, 7-9, 10-12 and
13-15): the more shapes, the finer the count the model must make and the longer the teacher counts
aloud. Answers are integers, checked in `\\boxed{}` form. A step-by-step teacher writes three
correct traces per problem in the think/boxed format, `TRACE_STYLES` = terse (the count), normal
(counting aloud) and verbose (counting aloud row by row, the numbering running on from row to
row), whose lengths grow with the number of shapes and hence with difficulty; `wrong_trace=True`
appends a fourth, incorrect one (one shape too many) that answer checking rejects.

`checks=True` adds a fourth correct style, `CHECK_STYLE` = checked: a quick count aloud, then the
reasoning turns at trigger words of the entropy reward's vocabulary ("So 12? Let me check row by
row: 1, 2, 3 in row 1, then 4, 5 in row 2, then none in row 3, then 6, ..., 13 in row 4. So there
are 13 shapes, not 12."). Each "then" comes just before a row's count: a re-check holds up to six
trigger positions where the other styles hold at most two (whether their windows are high-entropy
is the model's; measured in the README's ablation, they mostly are not). The quick count misses
one shape in a share of the problems that grows with difficulty (`MISCOUNT_SHARE`: none on
levels 1-2, a quarter on 3, half on 4-5), and the row-by-row check corrects it: re-checking pays
on hard problems and is wasted on easy ones, the room the difficulty-aware entropy shaping of
AEPO needs (configs/ablation.py).

Why this task: a model trained from random weights in minutes on a CPU learns to read a global
quantity of the picture (how much of it is covered), while selecting objects by colour or position
from the question (a two-hop lookup) takes it far longer than the embedded default's budget; the
task is sized to what such a model learns, and its difficulty is the precision of the count.

Everything is a function of (seed, split, index): problem i is drawn from its own generator, so
`SyntheticExamples` is a random-access source and a longer set extends a shorter one. Splits are
disjoint by construction: a problem belongs to the split given by a hash of its content (train 8/10
of the hash space, val and test 1/10 each) and a generator redraws until it lands in its split.
Images are 112 x 112 PNG by default, drawn without anti-aliasing so the bytes are the same on every
run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Sequence

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ares_jax.data.records import Example

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
GRID = 4
CELLS = GRID * GRID
IMAGE_SIZE = 28 * GRID  # one merged vision token (2 x 2 patches of 14 pixels) per cell
BACKGROUND = (255, 255, 255)
TRACE_STYLES: tuple[str, ...] = ("terse", "normal", "verbose")
CHECK_STYLE = "checked"  # with checks=True, after TRACE_STYLES
CHECK_PHRASE = "Let me check"  # where the checked style turns to its re-count
SPLITS: tuple[str, ...] = ("train", "val", "test")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3, 4, 5)
QUESTIONS: tuple[str, ...] = ("shapes", "empty")

# difficulty -> (min shapes, max shapes).
NUM_SHAPES = {1: (1, 3), 2: (4, 6), 3: (7, 9), 4: (10, 12), 5: (13, 15)}
# difficulty -> share of problems whose quick count (checked style) misses one shape.
MISCOUNT_SHARE = {1: 0.0, 2: 0.0, 3: 0.25, 4: 0.5, 5: 0.5}
# Share of the 10 content-hash buckets owned by each split.
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class Shape:
    row: int  # 0-based, top to bottom
    col: int  # 0-based, left to right
    color: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    split: str
    difficulty: int
    shapes: tuple[Shape, ...]
    asks: str  # one of QUESTIONS

    @property
    def answer(self) -> int:
        return answer_for(len(self.shapes), self.asks)

    @property
    def question(self) -> str:
        if self.asks == "shapes":
            return "How many shapes are in the image?"
        return f"How many cells of the {GRID} x {GRID} grid are empty?"


def answer_for(num_shapes: int, asks: str) -> int:
    """The answer when the picture holds `num_shapes` shapes."""
    return num_shapes if asks == "shapes" else CELLS - num_shapes


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _draw(rng: np.random.Generator, difficulty: int) -> tuple[tuple[Shape, ...], str]:
    lo, hi = NUM_SHAPES[difficulty]
    n = int(rng.integers(lo, hi + 1))
    cells = sorted(int(c) for c in rng.choice(CELLS, size=n, replace=False))
    colors = list(COLORS)
    shapes = tuple(
        Shape(c // GRID, c % GRID, colors[rng.integers(len(colors))], KINDS[rng.integers(3)])
        for c in cells
    )
    return shapes, QUESTIONS[rng.integers(len(QUESTIONS))]


def _content_bucket(difficulty: int, shapes: tuple[Shape, ...], asks: str) -> int:
    key = repr((difficulty, shapes, asks)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 10


def make_problem(index: int, *, seed: int, split: str = "train", difficulty: int) -> Problem:
    """Problem `index` of (seed, split); a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if difficulty not in NUM_SHAPES:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed} and {index}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, difficulty])
    while True:
        shapes, asks = _draw(rng, difficulty)
        if _content_bucket(difficulty, shapes, asks) in _SPLIT_BUCKETS[split]:
            return Problem(f"synthetic-{split}-s{seed}-{index}", split, difficulty, shapes, asks)


def render(problem: Problem, *, size: int = IMAGE_SIZE) -> bytes:
    """PNG bytes of the problem's picture: size x size pixels, 4 x 4 cells."""
    if size % GRID or size < 8 * GRID:
        raise ValueError(f"image size must be a multiple of {GRID} and at least {8 * GRID}")
    cell = size // GRID
    pad = max(2, cell // 7)
    image = PIL.Image.new("RGB", (size, size), BACKGROUND)
    draw = PIL.ImageDraw.Draw(image)
    for s in problem.shapes:
        x0, y0 = s.col * cell + pad, s.row * cell + pad
        x1, y1 = (s.col + 1) * cell - pad - 1, (s.row + 1) * cell - pad - 1
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Teacher traces
# ---------------------------------------------------------------------------------------------


def _aloud(first: int, last: int) -> str:
    return ", ".join(str(k) for k in range(first, last + 1))


def _shapes(n: int) -> str:
    return "1 shape" if n == 1 else f"{n} shapes"


def _there_are(n: int) -> str:
    return f"there {'is' if n == 1 else 'are'} {_shapes(n)}"


def _empty(n: int, *, verbose: bool) -> str:
    subtract = f"{CELLS} - {n} = {CELLS - n} cells are empty."
    return f"The grid has {GRID} x {GRID} = {CELLS} cells, so {subtract}" if verbose else subtract


def _by_rows(per_row: Sequence[int]) -> str:
    """Counting aloud row by row, the numbering running on: 'Row 1: 1, 2. Row 2: none. ...'."""
    parts, done = [], 0
    for r, k in enumerate(per_row):
        parts.append(f"Row {r + 1}: {_aloud(done + 1, done + k) if k else 'none'}.")
        done += k
    return " ".join(parts)


def _rechecked_rows(per_row: Sequence[int]) -> str:
    """The checked style's re-count, each row after the first turning at "then", the point where
    the row's count is decided: '1, 2 in row 1, then none in row 2, then 3, 4 in row 3, ...'."""
    parts, done = [], 0
    for r, k in enumerate(per_row):
        seen = _aloud(done + 1, done + k) if k else "none"
        parts.append(f"{'then ' if r else ''}{seen} in row {r + 1}")
        done += k
    return ", ".join(parts) + "."


def _trace(style: str, per_row: Sequence[int], asks: str, *, quick: int | None = None) -> str:
    """The reasoning of `style` for a picture the teacher sees with per_row[r] shapes in row r;
    `quick` is the checked style's first count (default: right)."""
    n = sum(per_row)
    if style == CHECK_STYLE:
        quick = n if quick is None else quick
        verdict = f"So {_there_are(n)}" + ("." if quick == n else f", not {quick}.")
        parts = [
            f"I count the shapes: {_aloud(1, quick)}. So {quick}? {CHECK_PHRASE} row by row:",
            _rechecked_rows(per_row),
            verdict,
        ]
        if asks == "empty":
            parts.append(_empty(n, verbose=False))
        return " ".join(parts)
    if style == "terse":
        return (
            f"{_shapes(n)}." if asks == "shapes" else f"{_shapes(n)}, {CELLS} - {n} = {CELLS - n}."
        )
    if style == "normal":
        parts = [f"I count the shapes: {_aloud(1, n)}. {_there_are(n).capitalize()}."]
    else:
        parts = [f"Let me count the shapes row by row. {_by_rows(per_row)} So {_there_are(n)}."]
    if asks == "empty":
        parts.append(_empty(n, verbose=style == "verbose"))
    return " ".join(parts)


def shapes_per_row(problem: Problem) -> tuple[int, ...]:
    counts = [0] * GRID
    for shape in problem.shapes:
        counts[shape.row] += 1
    return tuple(counts)


def rechecks(response: str) -> bool:
    """Whether a response re-checks its count the checked style's way."""
    return CHECK_PHRASE in response


def quick_count(problem: Problem) -> int:
    """The checked style's first count: one shape short in `MISCOUNT_SHARE[difficulty]` of the
    problems (chosen by a hash of the problem's content, so the same on every run), else right."""
    n = len(problem.shapes)
    key = repr(("quick", problem.difficulty, problem.shapes, problem.asks)).encode()
    u = int.from_bytes(hashlib.sha256(key).digest()[:8], "little") / 2.0**64
    return n - 1 if n > 1 and u < MISCOUNT_SHARE[problem.difficulty] else n


def _format(reasoning: str, answer: int) -> str:
    return f"<think> {reasoning} </think> The answer is \\boxed{{{answer}}}."


def teacher_traces(
    problem: Problem, *, wrong_trace: bool = False, checks: bool = False
) -> tuple[str, ...]:
    """Correct traces in `TRACE_STYLES` order, then the checked style if `checks`, plus one wrong
    trace if asked (last): the normal style after counting one shape too many (at most 15 shapes
    are drawn, so 16 stays a count)."""
    per_row, asks = shapes_per_row(problem), problem.asks
    n = sum(per_row)
    traces = [_format(_trace(style, per_row, asks), problem.answer) for style in TRACE_STYLES]
    if checks:
        quick = quick_count(problem)
        traces.append(_format(_trace(CHECK_STYLE, per_row, asks, quick=quick), problem.answer))
    if wrong_trace:  # the normal style only reads the total
        over = (*per_row[:-1], per_row[-1] + 1)
        traces.append(_format(_trace("normal", over, asks), answer_for(n + 1, asks)))
    return tuple(traces)


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def to_example(
    problem: Problem,
    *,
    image_size: int = IMAGE_SIZE,
    wrong_trace: bool = False,
    checks: bool = False,
) -> Example:
    return Example(
        id=problem.id,
        question=problem.question,
        answer=str(problem.answer),
        images=(render(problem, size=image_size),),
        source="synthetic",
        traces=teacher_traces(problem, wrong_trace=wrong_trace, checks=checks),
        difficulty=problem.difficulty,
    )


class SyntheticExamples:
    """Random-access source of synthetic Examples; item i is generated on demand.

    Difficulties cycle through `difficulties` (item i has `difficulties[i % len]`), so every
    level gets the same share.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int,
        split: str = "train",
        difficulties: Sequence[int] = DIFFICULTIES,
        image_size: int = IMAGE_SIZE,
        wrong_trace: bool = False,
        checks: bool = False,
    ):
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if not difficulties or any(d not in NUM_SHAPES for d in difficulties):
            raise ValueError(f"difficulties must be a non-empty subset of 1..5, got {difficulties}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.seed, self.split = n, seed, split
        self.difficulties = tuple(int(d) for d in difficulties)
        self.image_size, self.wrong_trace, self.checks = image_size, wrong_trace, checks

    def __len__(self) -> int:
        return self.n

    def problem(self, index: int) -> Problem:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} synthetic examples")
        difficulty = self.difficulties[index % len(self.difficulties)]
        return make_problem(index, seed=self.seed, split=self.split, difficulty=difficulty)

    def __getitem__(self, index: int) -> Example:
        index = int(index)
        if index < 0:
            index += self.n
        return to_example(
            self.problem(index),
            image_size=self.image_size,
            wrong_trace=self.wrong_trace,
            checks=self.checks,
        )

    def __repr__(self) -> str:
        return (
            f"SyntheticExamples(n={self.n}, seed={self.seed}, split={self.split!r}, "
            f"difficulties={self.difficulties})"
        )


def make_problems(
    n: int, *, seed: int, split: str = "train", difficulties: Sequence[int] = DIFFICULTIES
) -> list[Problem]:
    source = SyntheticExamples(n, seed=seed, split=split, difficulties=difficulties)
    return [source.problem(i) for i in range(n)]


def make_examples(
    n: int,
    *,
    seed: int,
    split: str = "train",
    difficulties: Sequence[int] = DIFFICULTIES,
    image_size: int = IMAGE_SIZE,
    wrong_trace: bool = False,
    checks: bool = False,
) -> list[Example]:
    """n synthetic Examples of (seed, split), difficulties cycling through `difficulties`."""
    source = SyntheticExamples(
        n,
        seed=seed,
        split=split,
        difficulties=difficulties,
        image_size=image_size,
        wrong_trace=wrong_trace,
        checks=checks,
    )
    return [source[i] for i in range(n)]
