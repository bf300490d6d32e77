"""WE-MATH testmini: multiple-choice visual math, scored by its four-dimensional strict score.

Layouts read (`LAYOUTS`), the same rows either way:
  - the authors' JSON array: `testmini.json` of the Hugging Face dataset `We-Math/We-Math` (its
    images in `testmini.zip`, unpacked next to it) or `data/testmini.json` of the GitHub
    repository `We-Math/We-Math` (images in `data/2steps/image/`, `data/3steps/image/`);
    `image_path` is a path such as "2steps/image/1-1.png" relative to the JSON file's directory
    (or to its `testmini/` subdirectory, where a zip unpacks into one);
  - parquet (or JSONL) rows with the same columns, `image_path` an HF Image struct
    {"bytes", "path"} (the hub's parquet export of `We-Math/We-Math`).
Columns: "ID" (the composite problem, e.g. "2steps_165"), "key" (the row's place in it:
"2steps_1", "2steps_2", "2steps_multi", "3steps_1" ... "3steps_multi"), "question", "option"
(one string, "A. 200.96;B. 3215.36;C. 6280;D. 32; E. No correct answer"), "answer" (a letter),
"image_path", and "split", "knowledge concept", "question number", "knowledge concept
description" (not used). testmini: 1740 rows, 360 two-step problems (two one-step sub-problems
and the two-step problem each) and 165 three-step problems (three and one), 525 in all.

Prompt: the question, then the options one a line ("A. 200.96", "B. 3215.36", ...), the image
first. The authors' prompt asks for "<Thought process>: ... <Answer>: ..." and VLMEvalKit's
lists the options the same way as here under "Options:"; both answer-format instructions are
left out (the evaluation appends ARES's own). The option string is split at its labels: a
capital letter and a period at the start or after ";" or a space, followed by option text. The
release has artefacts that this undoes: a ";" put before a capital letter and a period inside
an option ("around point ;O.;B. ..." is option A "... around point O." then option B), labels
without a ";" before them ("A. 45° B. 60° ;C. 120°"), and one row whose labels skip a letter
("A. ...;B. ...;C. No.; F. No correct answer"): options are relettered by position (that F is
shown as D; the gold letter moves with it).

Answers: all multiple choice (kind CHOICE, gold the letter, choices the option texts; most
rows have a last option "No correct answer").

Metric (`score`): the strict score of the authors' `evaluation/four_dimensional_metrics.py`
(GitHub We-Math/We-Math; the same code is VLMEvalKit's `vlmeval/dataset/utils/wemath.py`). A
composite problem (`Item.group`, the "ID") is judged from its one-step sub-problems
(`Item.role` "one-step 1" ... "one-step 3") and its multi-step problem ("two-step" or
"three-step"):
  - Insufficient Knowledge (IK): some one-step sub-problem wrong, the multi-step problem wrong;
  - Inadequate Generalization (IG): every one-step sub-problem right, the multi-step wrong;
  - Complete Mastery (CM): strict: every one-step right and the multi-step right; loose: at
    least one one-step right and the multi-step right;
  - Rote Memorization (RM): strict: some one-step wrong and the multi-step right; loose: every
    one-step wrong and the multi-step right.
IK and IG are the same in both settings. Over N composite problems (two- and three-step
together), score = (N - 0.5 IG - RM - IK) / N, which is (CM + 0.5 IG) / N; "Score (Strict)" is
the paper's and the leaderboard's WeMath number. The official code divides by a fixed N = 525
(testmini); here N is the number of complete composite problems graded (525 on testmini), and a
problem missing any of its rows is left out. With several samples per item, the score of each
sample index is averaged (`dimensions` gives the counts and the official rates too).
`Item.difficulty` is "one-step", "two-step" or "three-step" (the authors' S1/S2/S3 accuracies).
"""

from __future__ import annotations

import collections
import math
import os
import re
from collections.abc import Sequence

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items
from ares_jax.suite.items import CHOICE, LETTERS, Item
from ares_jax.suite.metrics import Graded

LAYOUTS = (
    "the WE-MATH testmini release: the JSON array testmini.json (Hugging Face We-Math/We-Math, "
    "images unpacked from testmini.zip beside it; or data/testmini.json of the GitHub repository "
    "We-Math/We-Math with its 2steps/ and 3steps/ image folders), or parquet/JSONL rows with the "
    "same columns (ID, key, question, option, answer, image_path as a relative path or an HF "
    "Image struct)"
)

STEPS = {2: "two-step", 3: "three-step"}  # Item.role of a multi-step problem, by its steps
ONE_STEP = "one-step"  # Item.role of sub-problem k is f"{ONE_STEP} {k}"

_KEY = re.compile(r"^([23])steps_(\d+|multi)$")
_FIRST_LABEL = re.compile(r"\s*A\s*[.．]")
_ARTEFACT = re.compile(r";(?=[A-Z][.．])")


def _label(letters: str) -> re.Pattern:
    """An option label among `letters`: the letter and a period, at the start or after ";" or
    whitespace, followed by option text (the release's ";X." artefacts are followed by ";")."""
    return re.compile(r"(?:^|(?<=[;\s]))([" + letters + r"])\s*[.．](?=\s*[^;\s])")


def parse_options(text: str) -> list[tuple[str, str]]:
    """(letter, text) of the options of an "option" string (module docstring), in order; [] if
    it does not start with an "A." label."""
    text = text.strip()
    m = _FIRST_LABEL.match(text)
    if not m:
        return []
    labels = [("A", m.start(), m.end())]
    while (rest := LETTERS[LETTERS.index(labels[-1][0]) + 1 :]) and (
        # The next letter where there is one, else any later one (a release row skips C..E).
        m := _label(rest[0]).search(text, labels[-1][2]) or _label(rest).search(text, labels[-1][2])
    ):
        labels.append((m.group(1), m.start(), m.end()))
    options = []
    for i, (letter, _, end) in enumerate(labels):
        stop = labels[i + 1][1] if i + 1 < len(labels) else len(text)
        options.append((letter, _ARTEFACT.sub("", text[end:stop]).strip().rstrip(";").strip()))
    return options


def _image(value, root: str, where: str) -> bytes:
    if isinstance(value, str) and not value.startswith("data:"):
        # A zip of the images may unpack into a folder named after the split.
        for base in (root, os.path.join(root, "testmini")):
            if os.path.isfile(os.path.join(base, value)):
                return items.image(value, base, where)
        raise DataError(
            f"{where}: image {value!r} is not under {root} (unpack the release's images so that "
            f"{os.path.join(root, value)} exists)",
            reason=records.MISSING_IMAGE,
        )
    return items.image(value, root, where)


def _item(row: dict, root: str, where: str, name: str) -> Item:
    composite = str(items.field(row, ["ID", "id"], where)).strip()
    key = str(items.field(row, ["key"], where)).strip()
    m = _KEY.match(key)
    if not m or not composite:
        raise DataError(
            f"{where}: key {key!r} is not one of 2steps_1, 2steps_2, 2steps_multi, 3steps_1 ... "
            "3steps_multi (expected the WE-MATH testmini columns ID and key)"
        )
    steps, part = int(m.group(1)), m.group(2)
    if part == "multi":
        role = difficulty = STEPS[steps]
    elif 1 <= int(part) <= steps:
        role, difficulty = f"{ONE_STEP} {int(part)}", ONE_STEP
    else:
        raise DataError(f"{where}: key {key!r}: a {steps}-step problem has no sub-problem {part}")
    option = str(items.field(row, ["option"], where))
    options = parse_options(option)
    gold = str(items.field(row, ["answer"], where)).strip().upper()
    letters = [letter for letter, _ in options]
    if len(options) < 2 or gold not in letters:
        raise DataError(f"{where}: answer {gold!r} is not a label of the options {option!r}")
    choices = tuple(t for _, t in options)
    question = str(items.field(row, ["question"], where)).strip()
    return Item(
        benchmark=name,
        id=f"{composite}/{part}",
        question=items.with_images(question + "\n" + items.options_text(choices), 1),
        answer=LETTERS[letters.index(gold)],  # relettered by position (module docstring)
        kind=CHOICE,
        images=(_image(items.field(row, ["image_path", "image"], where), root, where),),
        choices=choices,
        group=composite,
        role=role,
        difficulty=difficulty,
        origin=where,
    )


def _files(path: str | os.PathLike) -> list[str]:
    """The data files of `path`; of a directory, those with the ID and key columns when some
    have them (the GitHub data/ folder also holds knowledge_structure_nodes.json)."""
    files = records.expand_paths(path)
    if os.path.isdir(path) and len(files) > 1:
        ours = [f for f in files if {"ID", "key"} <= set(records.file_columns(f))]
        return ours or files
    return files


def load(path: str | os.PathLike, name: str = "wemath") -> list[Item]:
    """The items of WE-MATH rows in a file, directory or glob (module docstring).

    Raises:
      DataError: a file in another layout, a bad row, a missing image, or a (ID, key) twice.
    """
    root = items.root_of(path)
    out: list[Item] = []
    seen: dict[str, str] = {}
    for where, row in items.rows(_files(path)):
        item = _item(row, root, where, name)
        if item.id in seen:
            raise DataError(f"{where}: ID and key {item.id} already at {seen[item.id]}")
        seen[item.id] = where
        out.append(item)
    if not out:
        raise DataError(f"{os.fspath(path)}: no WE-MATH rows ({LAYOUTS})")
    return out


def _steps(role: str) -> int | None:
    return next((n for n, r in STEPS.items() if r == role), None)


def dimensions(graded: Sequence[Graded]) -> dict[str, float]:
    """The four-dimensional metrics (module docstring), averaged over sample indices.

    Returns:
      N (complete composite problems), the counts IK, IG, CM_strict, RM_strict, CM_loose,
      RM_loose, the official rates (IK, IG and CM over N; RM over CM + RM of its setting) and
      score_strict, score_loose, as fractions; {} when no composite problem is complete.

    Raises:
      ValueError: an item without a WE-MATH group and role, or one role twice in a group for
        one sample.
    """
    per_sample: dict[int, dict[str, dict[str, bool]]] = collections.defaultdict(dict)
    for g in graded:
        role, group = g.item.role, g.item.group
        if not group or not (role in STEPS.values() or role.startswith(ONE_STEP + " ")):
            raise ValueError(f"{g.item.id}: not a WE-MATH item (group {group!r}, role {role!r})")
        roles = per_sample[g.sample].setdefault(group, {})
        if role in roles:
            raise ValueError(f"{g.item.id}: role {role!r} of {group} twice in sample {g.sample}")
        roles[role] = bool(g.correct)
    totals: collections.Counter = collections.Counter()
    samples = 0
    for groups in per_sample.values():
        counts: collections.Counter = collections.Counter()
        for roles in groups.values():
            steps = [n for n in map(_steps, roles) if n]
            if len(steps) != 1 or len(roles) != steps[0] + 1:
                continue  # incomplete: the official merge would leave it undecided
            subs = [roles.get(f"{ONE_STEP} {k}") for k in range(1, steps[0] + 1)]
            if None in subs:
                continue
            multi = roles[STEPS[steps[0]]]
            counts["N"] += 1
            if not multi:
                counts["IG" if all(subs) else "IK"] += 1
            else:
                counts["CM_strict" if all(subs) else "RM_strict"] += 1
                counts["CM_loose" if any(subs) else "RM_loose"] += 1
        if counts["N"]:
            samples += 1
            n = counts["N"]
            for setting in ("strict", "loose"):
                cm, rm = counts[f"CM_{setting}"], counts[f"RM_{setting}"]
                counts[f"score_{setting}"] = (cm + 0.5 * counts["IG"]) / n
                counts[f"CM_{setting}_rate"] = cm / n
                counts[f"RM_{setting}_rate"] = rm / (cm + rm) if cm + rm else math.nan
            counts["IK_rate"], counts["IG_rate"] = counts["IK"] / n, counts["IG"] / n
            totals.update({k: v for k, v in counts.items()})
    if not samples:
        return {}
    names = ["N", "IK", "IG", "CM_strict", "RM_strict", "CM_loose", "RM_loose", "IK_rate"]
    names += ["IG_rate", "CM_strict_rate", "RM_strict_rate", "CM_loose_rate", "RM_loose_rate"]
    return {k: float(totals[k]) / samples for k in names + ["score_strict", "score_loose"]}


def score(graded: Sequence[Graded]) -> float:
    """WE-MATH's strict score, (CM + 0.5 IG) / N over the complete composite problems, averaged
    over sample indices (module docstring); NaN when no composite problem is complete."""
    return dimensions(graded).get("score_strict", math.nan)


details = dimensions  # the report shows the four dimensions beside the strict score
