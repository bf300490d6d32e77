"""The embedded synthetic task: count coloured shapes in a picture and combine the counts.

Each problem draws 2 to 12 shapes (circle, square, triangle; red, green, blue) on a 4 x 4 grid of
cells and asks for a number built step by step from counts of the shapes, e.g.

    "Start with the number of red circles. Add the number of squares. Multiply the result by 2.
     What is the final number?"

Difficulty d in 1..5 sets the number of shapes and the number of steps (d steps, so d - 1
arithmetic operations); d = 1 simply asks "How many red circles are in the image?". Answers are
integers (possibly negative at d >= 3), checked in `\\boxed{}` form. A step-by-step teacher writes
three correct traces per problem in the think/boxed format, `TRACE_STYLES` = terse, normal,
verbose, whose lengths grow with the number of shapes and steps and hence with difficulty;
`wrong_trace=True` appends a fourth, incorrect one (one miscount) that answer checking rejects.

Everything is a function of (seed, split, index): problem i is drawn from its own generator, so
`SyntheticExamples` is a random-access source and a longer set extends a shorter one. Splits are
disjoint by construction: a problem belongs to the split given by a hash of its content (train 8/10
of the hash space, val and test 1/10 each) and a generator redraws until it lands in its split.
Images are 112 x 112 PNG by default (4 x 4 cells of 28 pixels, one merged Qwen2.5-VL vision token
per cell), drawn without anti-aliasing so the bytes are the same on every run.
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
BACKGROUND = (255, 255, 255)
TRACE_STYLES: tuple[str, ...] = ("terse", "normal", "verbose")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DIFFICULTIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# difficulty -> (min shapes, max shapes); steps = difficulty.
_NUM_SHAPES = {1: (2, 3), 2: (3, 5), 3: (5, 7), 4: (7, 9), 5: (9, 12)}
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
class Query:
    """A set of shapes: a colour, a kind, or both ("red shapes", "circles", "red circles")."""

    color: str | None
    kind: str | None

    def matches(self, shape: Shape) -> bool:
        return (self.color is None or shape.color == self.color) and (
            self.kind is None or shape.kind == self.kind
        )

    def phrase(self, n: int = 2) -> str:
        """'red circles'; singular when n == 1 ('red circle')."""
        noun = self.kind or "shape"
        noun = noun if n == 1 else f"{noun}s"
        return f"{self.color} {noun}" if self.color else noun


def _there_are(n: int, query: Query) -> str:
    return f"There is 1 {query.phrase(1)}" if n == 1 else f"There are {n} {query.phrase(n)}"


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: op "start" / "add" / "subtract" takes a Query, "multiply" an int factor."""

    op: str
    query: Query | None = None
    factor: int | None = None


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    split: str
    difficulty: int
    shapes: tuple[Shape, ...]
    steps: tuple[Step, ...]

    @property
    def answer(self) -> int:
        return evaluate(self.shapes, self.steps)

    @property
    def question(self) -> str:
        return question_text(self.steps)


def count(shapes: Sequence[Shape], query: Query) -> int:
    return sum(query.matches(s) for s in shapes)


def evaluate(shapes: Sequence[Shape], steps: Sequence[Step], *, miscount: int = -1) -> int:
    """The value of the steps; `miscount` = i adds one to the count of step i (a wrong trace)."""
    value = 0
    for i, step in enumerate(steps):
        if step.op == "multiply":
            value *= step.factor
            continue
        n = count(shapes, step.query) + (i == miscount)
        value = n if step.op == "start" else value + n if step.op == "add" else value - n
    return value


def question_text(steps: Sequence[Step]) -> str:
    if len(steps) == 1:
        return f"How many {steps[0].query.phrase()} are in the image?"
    sentences = []
    for step in steps:
        if step.op == "start":
            sentences.append(f"Start with the number of {step.query.phrase()}.")
        elif step.op == "add":
            sentences.append(f"Add the number of {step.query.phrase()}.")
        elif step.op == "subtract":
            sentences.append(f"Subtract the number of {step.query.phrase()}.")
        else:
            sentences.append(f"Multiply the result by {step.factor}.")
    return " ".join(sentences) + " What is the final number?"


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def _draw(rng: np.random.Generator, difficulty: int) -> tuple[tuple[Shape, ...], tuple[Step, ...]]:
    lo, hi = _NUM_SHAPES[difficulty]
    n = int(rng.integers(lo, hi + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=n, replace=False))
    colors, kinds = list(COLORS), list(KINDS)
    shapes = tuple(
        Shape(c // GRID, c % GRID, colors[rng.integers(3)], kinds[rng.integers(3)]) for c in cells
    )

    used: set[Query] = set()

    def query() -> Query:
        # Mostly about shapes that are there; sometimes a set that may be empty. A problem asks
        # about each set at most once (27 sets exist, at most 5 are asked).
        while True:
            if rng.random() < 0.8:
                s = shapes[rng.integers(len(shapes))]
                color, kind = s.color, s.kind
            else:
                color, kind = colors[rng.integers(3)], kinds[rng.integers(3)]
            form = rng.integers(3)  # 0: colour and kind, 1: colour only, 2: kind only
            q = Query(color if form != 2 else None, kind if form != 1 else None)
            if q not in used:
                used.add(q)
                return q

    steps = [Step("start", query())]
    for _ in range(1, difficulty):
        r = rng.random()
        if difficulty == 2 or r < 0.5:
            steps.append(Step("add", query()))
        elif r < 0.75:
            steps.append(Step("subtract", query()))
        else:
            steps.append(Step("multiply", factor=int(rng.integers(2, 4))))
    return shapes, tuple(steps)


def _content_bucket(difficulty: int, shapes: tuple[Shape, ...], steps: tuple[Step, ...]) -> int:
    key = repr((difficulty, shapes, steps)).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") % 10


def make_problem(index: int, *, seed: int, split: str = "train", difficulty: int) -> Problem:
    """Problem `index` of (seed, split); a pure function of its arguments."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if difficulty not in _NUM_SHAPES:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed} and {index}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, difficulty])
    while True:
        shapes, steps = _draw(rng, difficulty)
        if _content_bucket(difficulty, shapes, steps) in _SPLIT_BUCKETS[split]:
            return Problem(f"synthetic-{split}-s{seed}-{index}", split, difficulty, shapes, steps)


def render(problem: Problem, *, size: int = 112) -> bytes:
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


def _where(s: Shape) -> str:
    return f"row {s.row + 1}, column {s.col + 1}"


def _arith(value: int, step: Step, n: int) -> tuple[str, int]:
    if step.op == "add":
        return f"{value} + {n} = {value + n}", value + n
    if step.op == "subtract":
        return f"{value} - {n} = {value - n}", value - n
    return f"{value} * {step.factor} = {value * step.factor}", value * step.factor


def _counts(problem: Problem, miscount: int) -> list[int | None]:
    return [
        None if st.op == "multiply" else count(problem.shapes, st.query) + (i == miscount)
        for i, st in enumerate(problem.steps)
    ]


def _terse(problem: Problem, miscount: int = -1) -> list[str]:
    counts, parts, value = _counts(problem, miscount), [], 0
    for step, n in zip(problem.steps, counts, strict=True):
        if step.op != "multiply":
            parts.append(f"{step.query.phrase()}: {n}.")
    for step, n in zip(problem.steps, counts, strict=True):
        if step.op == "start":
            value = n
        else:
            text, value = _arith(value, step, n)
            parts.append(f"{text}.")
    return parts


def _normal(problem: Problem, miscount: int = -1) -> list[str]:
    counts, parts, value = _counts(problem, miscount), ["I count the shapes asked for."], 0
    for step, n in zip(problem.steps, counts, strict=True):
        if step.op == "start":
            value = n
            parts.append(f"{_there_are(n, step.query)}, so I start with {n}.")
        elif step.op == "multiply":
            text, value = _arith(value, step, n)
            parts.append(f"Multiplying by {step.factor}: {text}.")
        else:
            text, value = _arith(value, step, n)
            verb = "Adding" if step.op == "add" else "Subtracting"
            verb = f"{verb} {'it' if n == 1 else 'them'}"
            parts.append(f"{_there_are(n, step.query)}. {verb}: {text}.")
    parts.append(f"The final number is {value}.")
    return parts


def _verbose(problem: Problem, miscount: int = -1) -> list[str]:
    shapes = problem.shapes
    parts = [f"First I list every shape in the image. There are {len(shapes)} shapes."]
    for s in shapes:
        parts.append(f"At {_where(s)} there is a {s.color} {s.kind}.")
    counts, value = _counts(problem, miscount), 0
    for i, (step, n) in enumerate(zip(problem.steps, counts, strict=True)):
        if step.op == "multiply":
            parts.append(f"Step {i + 1}: I multiply the running value by {step.factor}.")
        else:
            hits = [s for s in shapes if step.query.matches(s)]
            where = "; ".join(f"the {s.color} {s.kind} at {_where(s)}" for s in hits)
            found = f"I find {where}." if hits else "I find none."
            parts.append(f"Step {i + 1}: I look for {step.query.phrase()}. {found} That is {n}.")
        if step.op == "start":
            value = n
            parts.append(f"So the running value starts at {n}.")
        else:
            text, value = _arith(value, step, n)
            parts.append(f"The running value becomes {text}.")
    parts.append(f"Checking again from the start, the final number is {value}.")
    return parts


def _format(parts: list[str], answer: int) -> str:
    return f"<think> {' '.join(parts)} </think> The answer is \\boxed{{{answer}}}."


def teacher_traces(problem: Problem, *, wrong_trace: bool = False) -> tuple[str, ...]:
    """Correct traces in `TRACE_STYLES` order, plus one wrong trace if asked (last)."""
    answer = problem.answer
    traces = [_format(style(problem), answer) for style in (_terse, _normal, _verbose)]
    if wrong_trace:
        # Counting one extra shape at the last counted step changes the answer: each count
        # enters the result with a non-zero coefficient (+-1 times the later factors).
        last = max(i for i, st in enumerate(problem.steps) if st.op != "multiply")
        wrong = evaluate(problem.shapes, problem.steps, miscount=last)
        traces.append(_format(_normal(problem, miscount=last), wrong))
    return tuple(traces)


# ---------------------------------------------------------------------------------------------
# Examples
# ---------------------------------------------------------------------------------------------


def to_example(problem: Problem, *, image_size: int = 112, wrong_trace: bool = False) -> Example:
    return Example(
        id=problem.id,
        question=problem.question,
        answer=str(problem.answer),
        images=(render(problem, size=image_size),),
        source="synthetic",
        traces=teacher_traces(problem, wrong_trace=wrong_trace),
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
        image_size: int = 112,
        wrong_trace: bool = False,
    ):
        if n < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        if not difficulties or any(d not in _NUM_SHAPES for d in difficulties):
            raise ValueError(f"difficulties must be a non-empty subset of 1..5, got {difficulties}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        self.n, self.seed, self.split = n, seed, split
        self.difficulties = tuple(int(d) for d in difficulties)
        self.image_size, self.wrong_trace = image_size, wrong_trace

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
            self.problem(index), image_size=self.image_size, wrong_trace=self.wrong_trace
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
    image_size: int = 112,
    wrong_trace: bool = False,
) -> list[Example]:
    """n synthetic Examples of (seed, split), difficulties cycling through `difficulties`."""
    source = SyntheticExamples(
        n,
        seed=seed,
        split=split,
        difficulties=difficulties,
        image_size=image_size,
        wrong_trace=wrong_trace,
    )
    return [source[i] for i in range(n)]
