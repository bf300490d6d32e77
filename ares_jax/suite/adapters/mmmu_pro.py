"""MMMU-Pro: MMMU questions filtered, augmented to ten options, and shown as screenshots.

Layouts read (Hugging Face `MMMU/MMMU_Pro`, split "test", the setting told from the columns):
  - "standard (10 options)" (`standard (10 options)/test-0000x-of-00002.parquet`): id, question
    (with `<image 1>`..`<image 7>` placeholders), options (a string holding a Python list of up
    to ten options, which may hold placeholders), explanation, image_1..image_7 (HF Image
    structs, null when absent), img_type, answer (a letter), topic_difficulty, subject. A file
    whose path names "4 options" is read as the "standard (4 options)" config, same columns.
  - "vision" (`vision/test-0000x-of-0000y.parquet`): id, image (an HF Image struct: a
    screenshot or photo holding the question and its options), options (a list, or a list
    string), answer (a letter), subject.
A directory that holds no data file itself is read as a snapshot: its
`standard (10 options)/*.parquet` and `vision/*.parquet`.

Prompt (the CoT prompts of `MMMU-Benchmark/MMMU` `mmmu-pro/prompts.yaml` and
`mmmu-pro/infer/infer_gpt.py`, without their "Answer: $LETTER" format line and "Think step by
step", which ARES's own instruction replaces):
  - standard: "{question}\\n{A. option ...}", options one a line; each `<image k>` placeholder
    (question and options) becomes an `<image>` marker with image_k in the order they appear,
    repeats included, as the official `replace_images_tokens`; unreferenced images first
    (`mmmu.interleave`);
  - vision: "<image>\\nWrite out the multiple-choice question in the image and then solve it."
    (the official script sends the text, then the image; here the image comes first, as in every
    other prompt of the suite).

Answer kind: CHOICE, gold = the letter, choices = the options (also for vision, where the
options are not in the prompt but let a response that states an option's text be graded).
Difficulty: topic_difficulty (standard; the vision config has none).
Ids: "<setting>/<id>" ("standard10/", "standard4/", "vision/"), since the settings share ids;
Item.group is the setting's name.

Metric (`score`): accuracy per setting; with several settings loaded, their mean. MMMU-Pro's
overall score is the mean of "standard (10 options)" and "vision" accuracy (the MMMU-Pro paper
and leaderboard), so loading both configs gives that number. The ARES paper does not say which
setting its MMMU-Pro column is; its Qwen2.5-VL rows (31.6 / 38.3) equal the MMMU-Pro numbers of
the Qwen2.5-VL technical report, which we could not tie to a setting and assume to be the
overall score: the paper's number is compared with the mean of the two configs (load the
snapshot directory, or both configs' files). The official scorer (`mmmu-pro/evaluate.py`) parses
"Answer: X" and falls back to a random letter; here the boxed answer is graded and nothing is
guessed.
"""

from __future__ import annotations

import collections
import glob
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ares_jax.data import records
from ares_jax.data.records import DataError
from ares_jax.suite import items, metrics
from ares_jax.suite.adapters import mmmu
from ares_jax.suite.items import CHOICE, Item

LAYOUTS = (
    "MMMU/MMMU_Pro parquet: the 'standard (10 options)' config (id, question with `<image k>` "
    "placeholders, options list string, image_1..image_7 HF Image structs, answer letter, "
    "topic_difficulty) and/or the 'vision' config (id, image, options, answer); a file, glob, or "
    "snapshot directory (its 'standard (10 options)/' and 'vision/' parquet files)."
)

STANDARD_10, STANDARD_4, VISION = "standard (10 options)", "standard (4 options)", "vision"
_ID_PREFIX = {STANDARD_10: "standard10", STANDARD_4: "standard4", VISION: "vision"}
VISION_PROMPT = "Write out the multiple-choice question in the image and then solve it."
_FOUR = re.compile(r"4[\s_-]*options", re.IGNORECASE)


def load(path: str | os.PathLike, name: str = "mmmu_pro") -> list[Item]:
    """MMMU-Pro's items from parquet files of either config (module docstring).

    Raises:
      DataError: a file in another layout, or a bad row, naming it.
    """
    root = items.root_of(path)
    out: list[Item] = []
    seen: set[str] = set()
    for file in records.expand_paths(_data_files(path)):
        standard = STANDARD_4 if _FOUR.search(file) else STANDARD_10
        for where, row in items.rows(file):
            item = _item(row, where, root, name, standard)
            if item.id in seen:
                raise DataError(f"{where}: id {item.id!r} appears twice in the data")
            seen.add(item.id)
            out.append(item)
    return out


def score(graded: Sequence[metrics.Graded]) -> float:
    """Accuracy per setting (Item.group), averaged over the settings present: MMMU-Pro's
    overall score when both the standard (10 options) and the vision configs are loaded."""
    if not graded:
        return float("nan")
    by_setting: dict[str, list[metrics.Graded]] = collections.defaultdict(list)
    for g in graded:
        by_setting[g.item.group].append(g)
    return float(np.mean([metrics.accuracy(v) for v in by_setting.values()]))


def _data_files(path: str | os.PathLike) -> str | list[str]:
    path = os.fspath(path)
    if os.path.isdir(path) and not mmmu.has_data_files(path):
        nested = [
            f
            for config in (STANDARD_10, VISION)
            for f in sorted(glob.glob(os.path.join(glob.escape(path), config, "*.parquet")))
        ]
        if nested:
            return nested
    return path


def _item(row: Mapping[str, Any], where: str, root: str, name: str, standard: str) -> Item:
    # The vision config has one `image` column and no image_1..image_7.
    if "image" in row and "image_1" not in row:
        setting, columns = VISION, ("id", "image", "options", "answer")
    else:
        setting, columns = standard, ("id", "question", "options", "answer")
    mmmu.check_layout(row, where, columns, LAYOUTS)
    options = mmmu.parse_list(row["options"], where, "options")
    if not options:
        raise DataError(f"{where}: no options", reason=records.BAD_FIELD)
    answer = str(row["answer"] or "").strip().upper()
    if setting == VISION:
        prompt = records.IMAGE_MARKER + "\n" + VISION_PROMPT
        images: tuple[bytes, ...] = (items.image(row["image"], root, f"{where}, image"),)
        difficulty = ""
    else:
        text = str(row["question"]) + "\n" + items.options_text(options)
        prompt, images = mmmu.interleave(text, row, root, where)
        difficulty = str(row.get("topic_difficulty") or "")
    return mmmu.make_item(
        where,
        benchmark=name,
        id=f"{_ID_PREFIX[setting]}/{row['id']}",
        question=prompt,
        answer=answer,
        kind=CHOICE,
        images=images,
        choices=tuple(options),
        group=setting,
        difficulty=difficulty,
    )
