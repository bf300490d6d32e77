"""Length-targeted curation of the AdaCS cold-start data (METHOD.md 3.2).

Each problem has a pass rate p (METHOD.md 3.1: K = 8 samples of the pass-rate model, so p lies in
{0, 1/8, ..., 1}, 9 brackets) and one or more teacher traces. Per data source,

    L(0) = median token length of the traces of the problems at p = 0 (hardest),
    L(1) = median token length of the traces of the problems at p = 1 (easiest),
    L_target(p) = (1 - p) L(0) + p L(1),

and `curate` keeps, for each problem, the teacher trace closest to its target, then samples
problems uniformly across the pass-rate brackets. The vanilla switch (the paper's ARES-CS-Vanilla
ablation) keeps everything but the length matching.

Choices where the paper is silent (METHOD.md 3.2 and 10 item 2), each documented where it is made:

- Length: tokens of the whole trace text (think block and conclusion), counted by the caller's
  tokenizer without special tokens (`token_length_fn`). `whitespace_length` (words) stands in for
  a tokenizer in tests only.
- Usable traces: with `require_correct` (default) only traces whose last `\\boxed{}` answer equals
  the gold answer (`rewards.answers.is_correct`, math-verify) count, for the medians and the choice;
  otherwise every non-empty trace.
- Brackets: bracket b = floor(p K + 1/2) with K = num_brackets - 1, so a pass rate from another
  sample count falls in the nearest bracket. A problem's target uses its own p, not its bracket's.
- Anchors (`length_anchors`): medians over all usable teacher traces of the problems in bracket 0
  (L(0)) and bracket K (L(1)) of the source, each trace counted once (a problem with more usable
  traces weighs more); an even count takes the mean of the two middle values (numpy). The
  pass-rate model's own samples are not used: they are not in the data.
- Anchor fallback: a source without a usable trace in bracket 0 takes L(0) from its nearest
  bracket above that has one (L(1): nearest below bracket K); a source without any usable trace
  takes the pooled anchors of all sources (same rule). `Anchors.note` says which; never raises.
- Proximate: |length - target| <= tolerance * target (relative; default 0.25); None = no limit.
  The closest trace wins; ties go to the shorter, then to the earlier trace.
- Eligible: a known pass rate and a usable trace within tolerance. The same in vanilla mode.
- Sampling: pooled over sources by default (`per_source=False`): in each bracket, `per_bracket`
  eligible problems drawn uniformly without replacement; None = the smallest eligible count over
  the non-empty brackets, so each non-empty bracket gives the same count; a bracket with fewer
  eligible problems than the quota gives all of them. `per_source=True` applies the quota per
  (source, bracket), None resolved per source. Each group draws from its own generator, seeded by
  (seed, source, bracket), so one bracket's draw does not depend on the others.
- Vanilla: the same eligibility and the same problem draw; only the kept trace differs: a uniformly
  random usable trace (a separate seeded stream, in input order). Both data sets hold the same
  problems: the controlled comparison the ablation intends.
- Output: the selected problems in input order, each with `traces=(chosen,)`.

Host-side NumPy only; deterministic given the seed.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ares_jax.data.records import Example
from ares_jax.rewards.answers import score_responses

log = logging.getLogger(__name__)

NUM_BRACKETS = 9  # K = 8 samples per problem (METHOD.md 3.1)
ALL_SOURCES = "*"  # the key of pooled bracket rows and of a pooled quota

# Why a problem was not selected (`ProblemRecord.reason`).
NO_PASS_RATE = "no_pass_rate"
NO_TRACE = "no_trace"
NO_USABLE_TRACE = "no_correct_trace"
OUT_OF_TOLERANCE = "no_trace_within_tolerance"
NOT_SAMPLED = "not_sampled"

LengthFn = Callable[[str], int]
CorrectFn = Callable[[str, str], bool]


@dataclasses.dataclass(frozen=True)
class CurationSettings:
    """How `curate` picks traces and problems (defaults are ours; METHOD.md 10 item 2).

    Attributes:
      num_brackets: pass-rate brackets, K + 1 for K samples per problem (9 for K = 8); a pass rate
        p falls in bracket floor(p K + 1/2).
      tolerance: a trace is proximate if |length - target| <= tolerance * target; None = any
        usable trace is proximate.
      per_bracket: problems kept per bracket; None = as many as the smallest non-empty bracket
        (of eligible problems) allows, i.e. uniform across brackets.
      per_source: quotas per (source, bracket) instead of per bracket pooled over sources.
      require_correct: only traces whose boxed answer is correct count (`answers.is_correct`).
      vanilla: the ARES-CS-Vanilla ablation: same eligibility and problem sampling, but the kept
        trace is a uniformly random usable one, ignoring lengths.
      seed: seeds the problem sampling and the vanilla trace choice.
    """

    num_brackets: int = NUM_BRACKETS
    tolerance: float | None = 0.25
    per_bracket: int | None = None
    per_source: bool = False
    require_correct: bool = True
    vanilla: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.num_brackets < 2:
            raise ValueError(f"num_brackets must be at least 2, got {self.num_brackets}")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 or None, got {self.tolerance}")
        if self.per_bracket is not None and self.per_bracket < 0:
            raise ValueError(f"per_bracket must be >= 0 or None, got {self.per_bracket}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


@dataclasses.dataclass(frozen=True)
class Anchors:
    """L(0) and L(1) of one source, in tokens, and where they came from.

    Attributes:
      l0: median length at pass rate 0 (or its fallback); nan when no source has a usable trace.
      l1: median length at pass rate 1 (or its fallback); nan likewise.
      l0_bracket: the bracket whose traces gave l0 (0 unless a fallback); None when nan.
      l1_bracket: the bracket whose traces gave l1 (K unless a fallback); None when nan.
      l0_traces: how many traces l0 is the median of.
      l1_traces: how many traces l1 is the median of.
      pooled: taken over all sources, because this source has no usable trace.
      note: "" when both come from brackets 0 and K of the source itself; else the fallback.
    """

    l0: float
    l1: float
    l0_bracket: int | None
    l1_bracket: int | None
    l0_traces: int
    l1_traces: int
    pooled: bool = False
    note: str = ""

    @property
    def fallback(self) -> bool:
        return bool(self.note)


@dataclasses.dataclass(frozen=True)
class ProblemRecord:
    """What curation did with one problem (one JSONL row of the report).

    Attributes:
      id, source, pass_rate: from the problem.
      bracket: floor(pass_rate K + 1/2); None without a pass rate.
      target: L_target(pass_rate) of the source, tokens; None when unknown.
      num_traces: teacher traces of the problem.
      num_usable: of which usable (correct when require_correct).
      closest_length: length of the usable trace closest to the target, tokens; None if none.
      trace_index: index into the problem's traces of the kept trace (eligible problems only).
      chosen_length: length of the kept trace, tokens (eligible problems only).
      eligible: a usable trace lies within tolerance.
      selected: drawn into the curated set.
      reason: "" when selected, else one of NO_PASS_RATE, NO_TRACE, NO_USABLE_TRACE,
        OUT_OF_TOLERANCE, NOT_SAMPLED.
    """

    id: str
    source: str
    pass_rate: float | None
    bracket: int | None
    target: float | None
    num_traces: int
    num_usable: int
    closest_length: int | None
    trace_index: int | None
    chosen_length: int | None
    eligible: bool
    selected: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class BracketStats:
    """One pass-rate bracket of one source (or of all, `source == ALL_SOURCES`).

    Attributes:
      source: the data source, or ALL_SOURCES for the pooled row.
      bracket: 0..K.
      pass_rate: bracket / K.
      problems: problems whose pass rate falls in the bracket.
      eligible: of which eligible.
      selected: of which selected.
      median_length: median length of the kept traces of the selected problems, tokens; nan if
        none was selected.
      target: L_target(pass_rate) of the source, tokens; pooled: the mean over the bracket's
        problems of their source's L_target(pass_rate) (each source once if the bracket is
        empty; exactly the source's value when all are from one source).
    """

    source: str
    bracket: int
    pass_rate: float
    problems: int
    eligible: int
    selected: int
    median_length: float
    target: float


@dataclasses.dataclass(frozen=True)
class CurationResult:
    """The curated set and how it was made.

    Attributes:
      selected: the selected problems, input order, each with `traces=(kept trace,)`.
      records: one per input problem, input order.
      brackets: per bracket, pooled over sources (num_brackets rows).
      by_source: per source (sorted), num_brackets rows each.
      anchors: per source, L(0) and L(1).
      quota: the per-bracket count used: {ALL_SOURCES: n} pooled, else {source: n}.
      settings: the settings used.
    """

    selected: list[Example]
    records: list[ProblemRecord]
    brackets: list[BracketStats]
    by_source: dict[str, list[BracketStats]]
    anchors: dict[str, Anchors]
    quota: dict[str, int]
    settings: CurationSettings

    @property
    def sources(self) -> list[str]:
        return sorted(self.by_source)

    def reasons(self) -> dict[str, int]:
        """Problems per reason ("" = selected)."""
        return dict(collections.Counter(r.reason for r in self.records))


# ---------------------------------------------------------------------------------------------
# Lengths, brackets, anchors, targets
# ---------------------------------------------------------------------------------------------


def whitespace_length(text: str) -> int:
    """Words separated by whitespace: a tokenizer stand-in for tests, not for real data."""
    return len(text.split())


def token_length_fn(tokenizer: Any) -> LengthFn:
    """A str -> token count function from a transformers tokenizer or a callable str -> int.

    A tokenizer (anything with `encode`) counts `encode(text, add_special_tokens=False)`.
    """
    if hasattr(tokenizer, "encode"):
        return lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    if callable(tokenizer):
        return tokenizer
    raise TypeError(
        f"length_fn must be a callable str -> int or a tokenizer, got {type(tokenizer).__name__}"
    )


def token_lengths(texts: Sequence[str], length_fn: LengthFn | Any, batch: int = 1024) -> list[int]:
    """Token counts of texts; a transformers tokenizer is called on batches of `batch` texts."""
    if hasattr(length_fn, "encode") and callable(length_fn):
        out: list[int] = []
        for start in range(0, len(texts), batch):
            ids = length_fn(list(texts[start : start + batch]), add_special_tokens=False)
            out += [len(x) for x in ids["input_ids"]]
        return out
    length_of = token_length_fn(length_fn)
    return [int(length_of(t)) for t in texts]


def bracket_of(pass_rate: float, num_brackets: int = NUM_BRACKETS) -> int:
    """The bracket of a pass rate in [0, 1]: floor(p K + 1/2), K = num_brackets - 1."""
    return int(math.floor(pass_rate * (num_brackets - 1) + 0.5))


def target_length(p: float, l0: float, l1: float) -> float:
    """L_target(p) = (1 - p) L(0) + p L(1), tokens (METHOD.md 3.2)."""
    return (1.0 - p) * l0 + p * l1


def length_anchors(
    problems: Sequence[Example],
    lengths: Sequence[Sequence[int]],
    *,
    num_brackets: int = NUM_BRACKETS,
) -> dict[str, Anchors]:
    """Per source, L(0) and L(1): medians of the usable trace lengths at pass rates 0 and 1.

    Args:
      problems: the problems; those without a pass rate are ignored.
      lengths: per problem, the token lengths of its usable traces (the correct ones when
        correctness is required; `curate` passes these), empty if none.
      num_brackets: K + 1.

    Returns:
      {source: Anchors} for each source with a pass-rate problem, sorted by source. Fallbacks
      (module docstring) are named in `Anchors.note`.
    """
    if len(lengths) != len(problems):
        raise ValueError(f"{len(lengths)} length lists for {len(problems)} problems")
    k = num_brackets - 1
    own: dict[str, dict[int, list[int]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    pooled: dict[int, list[int]] = collections.defaultdict(list)
    for ex, lens in zip(problems, lengths, strict=True):
        if ex.pass_rate is None:
            continue
        b = bracket_of(ex.pass_rate, num_brackets)
        own[ex.source][b].extend(int(n) for n in lens)
        pooled[b].extend(int(n) for n in lens)
    pooled_anchors = _anchors_of(pooled, k)
    out = {}
    for source in sorted(own):
        anchors = _anchors_of(own[source], k)
        if anchors is None:
            if pooled_anchors is None:
                anchors = Anchors(
                    math.nan, math.nan, None, None, 0, 0, True, "no usable trace in any source"
                )
            else:
                note = "source has no usable trace: pooled over all sources"
                if pooled_anchors.note:
                    note += "; " + pooled_anchors.note
                anchors = dataclasses.replace(pooled_anchors, pooled=True, note=note)
        out[source] = anchors
    return out


def _anchors_of(by_bracket: Mapping[int, list[int]], k: int) -> Anchors | None:
    filled = sorted(b for b, lens in by_bracket.items() if lens)
    if not filled:
        return None
    b0, b1 = filled[0], filled[-1]
    notes = []
    if b0 != 0:
        notes.append(f"L(0) from bracket {b0} (p={b0 / k:g}): no usable trace at p=0")
    if b1 != k:
        notes.append(f"L(1) from bracket {b1} (p={b1 / k:g}): no usable trace at p=1")
    return Anchors(
        l0=float(np.median(by_bracket[b0])),
        l1=float(np.median(by_bracket[b1])),
        l0_bracket=b0,
        l1_bracket=b1,
        l0_traces=len(by_bracket[b0]),
        l1_traces=len(by_bracket[b1]),
        note="; ".join(notes),
    )


# ---------------------------------------------------------------------------------------------
# Curation
# ---------------------------------------------------------------------------------------------


def curate(
    problems: Sequence[Example],
    settings: CurationSettings = CurationSettings(),
    *,
    length_fn: LengthFn | Any | None = None,
    correct_fn: CorrectFn | None = None,
    workers: int = 0,
) -> CurationResult:
    """Keeps per problem the usable trace closest to its target; samples uniformly per bracket.

    Args:
      problems: problems with `pass_rate`, `source`, `answer` and candidate `traces`.
      settings: see `CurationSettings`.
      length_fn: the project's tokenizer (transformers) or a callable str -> token count; None
        counts whitespace-separated words (tests only; a warning is logged).
      correct_fn: (trace, gold) -> bool, used when `settings.require_correct`; None grades with
        `answers.score_responses` (`is_correct`, math-verify, about 7 ms a trace).
      workers: processes `score_responses` spreads the grading over (0: this process).

    Returns:
      The selected problems with their kept trace, per-problem records, per-bracket statistics
      and the anchors (module docstring for every choice).

    Raises:
      ValueError: a pass rate outside [0, 1] (naming the problem).
    """
    if length_fn is None:
        log.warning("curate: no tokenizer given, counting words (whitespace_length)")
        length_fn = whitespace_length
    s = settings
    k = s.num_brackets - 1

    # Usable traces (correct ones when required) and their token lengths, in batches.
    candidates: list[tuple[int, int]] = []  # (problem, trace) of the problems with a pass rate
    for i, ex in enumerate(problems):
        if ex.pass_rate is None:
            continue
        if not 0.0 <= ex.pass_rate <= 1.0:
            raise ValueError(f"problem {ex.id}: pass rate {ex.pass_rate} is outside [0, 1]")
        candidates += [(i, j) for j, t in enumerate(ex.traces) if t]
    if s.require_correct:
        texts = [problems[i].traces[j] for i, j in candidates]
        golds = [problems[i].answer for i, _ in candidates]
        if correct_fn is None:
            ok = score_responses(texts, golds, workers=workers).correct.tolist()
        else:
            ok = [bool(correct_fn(t, g)) for t, g in zip(texts, golds, strict=True)]
        candidates = [c for c, good in zip(candidates, ok, strict=True) if good]
    usable: list[list[int]] = [[] for _ in problems]  # per problem: indices into its traces
    lengths: list[list[int]] = [[] for _ in problems]  # per problem: their token lengths
    counts = token_lengths([problems[i].traces[j] for i, j in candidates], length_fn)
    for (i, j), n in zip(candidates, counts, strict=True):
        usable[i].append(j)
        lengths[i].append(n)
    anchors = length_anchors(problems, lengths, num_brackets=s.num_brackets)

    # Per problem: target, closest trace, eligibility.
    rows: list[dict[str, Any]] = []
    for ex, idx, lens in zip(problems, usable, lengths, strict=True):
        row: dict[str, Any] = dict(
            id=ex.id,
            source=ex.source,
            pass_rate=ex.pass_rate,
            bracket=None,
            target=None,
            num_traces=len(ex.traces),
            num_usable=len(idx),
            closest_length=None,
            trace_index=None,
            chosen_length=None,
            eligible=False,
            selected=False,
            reason="",
        )
        rows.append(row)
        if ex.pass_rate is None:
            row["reason"] = NO_PASS_RATE
            continue
        row["bracket"] = bracket_of(ex.pass_rate, s.num_brackets)
        a = anchors[ex.source]
        target = target_length(ex.pass_rate, a.l0, a.l1)
        row["target"] = None if math.isnan(target) else target
        if not ex.traces:
            row["reason"] = NO_TRACE
            continue
        if not idx:
            row["reason"] = NO_USABLE_TRACE
            continue
        lens_n = np.asarray(lens, dtype=np.float64)
        dist = np.abs(lens_n - target)
        best = int(np.lexsort((lens_n, dist))[0])  # closest, then shorter, then earlier
        row["closest_length"] = lens[best]
        if s.tolerance is not None and dist[best] > s.tolerance * target:
            row["reason"] = OUT_OF_TOLERANCE
            continue
        row["eligible"] = True
        row["trace_index"], row["chosen_length"] = idx[best], lens[best]

    # Vanilla: a uniformly random usable trace, one seeded stream in input order.
    if s.vanilla:
        trace_rng = np.random.default_rng([s.seed, 1])
        for row, idx, lens in zip(rows, usable, lengths, strict=True):
            if row["eligible"]:
                pick = int(trace_rng.integers(len(idx)))
                row["trace_index"], row["chosen_length"] = idx[pick], lens[pick]

    # Uniform sampling across brackets (pooled over sources unless per_source).
    groups: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for i, row in enumerate(rows):
        if row["eligible"]:
            key = row["source"] if s.per_source else ALL_SOURCES
            groups[(key, row["bracket"])].append(i)
    quota_keys = sorted(anchors) if s.per_source else [ALL_SOURCES]
    quota = {}
    for key in quota_keys:
        counts = [len(m) for (g, _), m in groups.items() if g == key]
        quota[key] = s.per_bracket if s.per_bracket is not None else min(counts, default=0)
    for (key, b), members in sorted(groups.items()):
        rng = np.random.default_rng([s.seed, 0, zlib.crc32(key.encode("utf-8")), b])
        take = min(quota[key], len(members))
        for j in np.sort(rng.choice(len(members), size=take, replace=False)):
            rows[members[j]]["selected"] = True
    for row in rows:
        if row["eligible"] and not row["selected"]:
            row["reason"] = NOT_SAMPLED

    records = [ProblemRecord(**row) for row in rows]
    selected = [
        dataclasses.replace(ex, traces=(ex.traces[r.trace_index],))
        for ex, r in zip(problems, records, strict=True)
        if r.selected
    ]
    of_source: dict[str, list[ProblemRecord]] = collections.defaultdict(list)
    for r in records:
        of_source[r.source].append(r)
    by_source = {src: _bracket_stats(of_source[src], src, k, anchors) for src in anchors}
    result = CurationResult(
        selected=selected,
        records=records,
        brackets=_bracket_stats(records, ALL_SOURCES, k, anchors),
        by_source=by_source,
        anchors=anchors,
        quota=quota,
        settings=s,
    )
    log.info(
        "curate: %d of %d problems selected (%s); quota %s",
        len(selected),
        len(records),
        ", ".join(f"{why or 'selected'}={n}" for why, n in sorted(result.reasons().items())),
        quota,
    )
    for src, a in anchors.items():
        if a.note:
            log.warning("curate: source %r anchors: %s", src, a.note)
    return result


def _bracket_stats(
    records: Sequence[ProblemRecord], source: str, k: int, anchors: Mapping[str, Anchors]
) -> list[BracketStats]:
    in_bracket: dict[int | None, list[ProblemRecord]] = collections.defaultdict(list)
    for r in records:
        in_bracket[r.bracket].append(r)
    out = []
    for b in range(k + 1):
        p = b / k
        members = in_bracket[b]
        chosen = [r.chosen_length for r in members if r.selected]
        if source != ALL_SOURCES:
            a = anchors[source]
            target = target_length(p, a.l0, a.l1)
        else:
            weights = collections.Counter(r.source for r in members)
            if not weights:  # an empty bracket: each source once
                weights = collections.Counter(list(anchors))
            targets = {src: target_length(p, anchors[src].l0, anchors[src].l1) for src in weights}
            if len(targets) == 1:
                target = next(iter(targets.values()))
            elif targets:
                total = sum(weights.values())
                target = sum(weights[src] * t for src, t in targets.items()) / total
            else:
                target = math.nan
        out.append(
            BracketStats(
                source=source,
                bracket=b,
                pass_rate=p,
                problems=len(members),
                eligible=sum(r.eligible for r in members),
                selected=len(chosen),
                median_length=float(np.median(chosen)) if chosen else math.nan,
                target=float(target),
            )
        )
    return out
