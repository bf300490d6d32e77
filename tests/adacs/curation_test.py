"""Tests of ares_jax/adacs/curation.py on constructed data with hand-computed numbers.

Lengths are whitespace words (`whitespace_length`): `_trace(n, answer)` has exactly n words.
"""

import collections
import math

import numpy as np
import pytest

from ares_jax.adacs import curation
from ares_jax.adacs.curation import CurationSettings, curate
from ares_jax.data.records import Example

GOLD = "7"


def _trace(n: int, answer: str = GOLD) -> str:
    return "w " * (n - 1) + "\\boxed{" + answer + "}"


def _wrong(n: int) -> str:
    return _trace(n, "9")


def _ex(id_, p, traces, source="a"):
    return Example(id=id_, question="q", answer=GOLD, source=source, traces=traces, pass_rate=p)


def _hand_problems() -> list[Example]:
    """Source "a". Correct lengths at p=0: 100, 140 | 130 | 160 -> L(0) = median = 135
    (with the wrong ones, 300, 400, 130, it would be 140). At p=1: 40, 50 | 70 -> L(1) = 50
    (with the wrong 10: 45). Target(p) = 135 - 85 p; tolerance 0.25 * target."""
    return [
        _ex("a0", 0.0, [_trace(100), _trace(140), _wrong(300)]),  # T=135: 140 (idx 1)
        _ex("a1", 0.0, [_trace(130), _wrong(400)]),  # 130 (idx 0)
        _ex("a10", 0.0, [_trace(160), _wrong(130)]),  # wrong 130 is closer; 160 (25 <= 33.75)
        _ex("a2", 1.0, [_trace(40), _trace(50)]),  # T=50: 50 (idx 1)
        _ex("a3", 1.0, [_trace(70), _wrong(10)]),  # 70: 20 > 12.5, out of tolerance
        _ex("a4", 0.5, [_wrong(90), _trace(85), _trace(101)]),  # T=92.5: 85 (7.5) over 101 (8.5)
        _ex("a5", 0.5, [_trace(60)]),  # 32.5 > 23.125: out of tolerance
        _ex("a6", 0.5, [_trace(100), _trace(85)]),  # tie at 7.5: the shorter, 85 (idx 1)
        _ex("a7", None, [_trace(90)]),  # no pass rate
        _ex("a8", 3 / 8, [_wrong(100)]),  # only wrong traces
        _ex("a9", 0.25, []),  # no trace
    ]


def _curate(problems, **kw):
    return curate(problems, CurationSettings(**kw), length_fn=curation.whitespace_length)


def _by_id(result):
    return {r.id: r for r in result.records}


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_bracket_and_target():
    assert [curation.bracket_of(i / 8) for i in range(9)] == list(range(9))
    assert curation.bracket_of(1 / 16) == 1  # halfway rounds up
    assert curation.bracket_of(0.3) == 2  # 2.4
    assert curation.bracket_of(0.55) == 4  # 4.4
    assert curation.bracket_of(0.5, num_brackets=5) == 2
    assert curation.target_length(0.0, 135, 50) == 135
    assert curation.target_length(1.0, 135, 50) == 50
    assert curation.target_length(0.5, 135, 50) == 92.5
    assert curation.target_length(3 / 8, 135, 50) == 103.125


def test_length_anchors_medians_over_given_lengths():
    problems = [
        _ex("x", 0.0, ["t"]),
        _ex("y", 0.0, ["t"]),
        _ex("z", 1.0, ["t"]),
        _ex("u", 0.5, ["t"]),
        _ex("v", None, ["t"]),
        _ex("b", 0.0, ["t"], source="b"),
        _ex("c", 1.0, ["t"], source="b"),
    ]
    lengths = [[10, 30], [20, 100], [5, 7], [999], [999], [8], [2, 4]]
    anchors = curation.length_anchors(problems, lengths)
    assert list(anchors) == ["a", "b"]
    a = anchors["a"]
    # p=0: 10, 30, 20, 100 -> (20 + 30) / 2; p=1: 5, 7 -> 6
    assert (a.l0, a.l1, a.l0_traces, a.l1_traces) == (25.0, 6.0, 4, 2)
    assert (a.l0_bracket, a.l1_bracket, a.pooled, a.note) == (0, 8, False, "")
    assert (anchors["b"].l0, anchors["b"].l1) == (8.0, 3.0)
    with pytest.raises(ValueError, match="length lists"):
        curation.length_anchors(problems, lengths[:-1])


def test_token_length_fn():
    class FakeTokenizer:
        def encode(self, text, add_special_tokens=True):
            assert add_special_tokens is False
            return list(text)

    assert curation.token_length_fn(FakeTokenizer())("abcd") == 4
    assert curation.token_length_fn(len)("abc") == 3
    with pytest.raises(TypeError):
        curation.token_length_fn(3)


def test_curate_with_a_batched_tokenizer_and_a_given_grader():
    class FakeTokenizer:  # transformers-like: encode, and batched __call__
        def encode(self, text, add_special_tokens=True):
            raise AssertionError("curate should call the tokenizer on batches")

        def __call__(self, texts, add_special_tokens=True):
            assert isinstance(texts, list) and add_special_tokens is False
            return {"input_ids": [list(t) for t in texts]}

    problems = [_ex("c0", 0.0, ["aaaa", "bb"]), _ex("c1", 1.0, ["c", "dddd"])]
    result = curate(
        problems,
        CurationSettings(tolerance=None),
        length_fn=FakeTokenizer(),
        correct_fn=lambda trace, gold: trace != "bb",  # characters; "bb" counts as wrong
    )
    a = result.anchors["a"]
    assert (a.l0, a.l1) == (4.0, 2.5)  # 4 | median(1, 4)
    assert [ex.traces for ex in result.selected] == [("aaaa",), ("c",)]  # c1: T=2.5, tie -> 1
    assert curation.token_lengths(["ab", "c"], FakeTokenizer(), batch=1) == [2, 1]
    assert curation.token_lengths(["a b", "c"], curation.whitespace_length) == [2, 1]


def test_settings_validation():
    for bad in (
        dict(num_brackets=1),
        dict(tolerance=-0.1),
        dict(per_bracket=-1),
        dict(seed=-1),
    ):
        with pytest.raises(ValueError):
            CurationSettings(**bad)


# ---------------------------------------------------------------------------------------------
# curate on the hand-computed set
# ---------------------------------------------------------------------------------------------


def test_anchors_are_medians_of_correct_traces():
    result = _curate(_hand_problems())
    a = result.anchors["a"]
    assert (a.l0, a.l1) == (135.0, 50.0)
    assert (a.l0_traces, a.l1_traces) == (4, 3)
    assert not a.fallback


def test_targets_choices_and_reasons_by_hand():
    result = _curate(_hand_problems(), per_bracket=3)  # 3 >= every bracket: all eligible kept
    r = _by_id(result)
    expected = {  # id: (bracket, target, trace_index, chosen_length, closest, reason)
        "a0": (0, 135.0, 1, 140, 140, ""),
        "a1": (0, 135.0, 0, 130, 130, ""),
        "a10": (0, 135.0, 0, 160, 160, ""),
        "a2": (8, 50.0, 1, 50, 50, ""),
        "a3": (8, 50.0, None, None, 70, curation.OUT_OF_TOLERANCE),
        "a4": (4, 92.5, 1, 85, 85, ""),
        "a5": (4, 92.5, None, None, 60, curation.OUT_OF_TOLERANCE),
        "a6": (4, 92.5, 1, 85, 85, ""),
        "a7": (None, None, None, None, None, curation.NO_PASS_RATE),
        "a8": (3, 103.125, None, None, None, curation.NO_USABLE_TRACE),
        "a9": (2, 113.75, None, None, None, curation.NO_TRACE),
    }
    for id_, (bracket, target, index, chosen, closest, reason) in expected.items():
        got = r[id_]
        assert (
            got.bracket,
            got.target,
            got.trace_index,
            got.chosen_length,
            got.closest_length,
            got.reason,
        ) == (bracket, target, index, chosen, closest, reason), id_
        assert got.selected == (reason == "")
        assert got.eligible == (reason == "")
    assert (r["a0"].num_traces, r["a0"].num_usable) == (3, 2)

    # The selected examples carry exactly the chosen trace, everything else unchanged.
    selected = {ex.id: ex for ex in result.selected}
    assert [ex.id for ex in result.selected] == ["a0", "a1", "a10", "a2", "a4", "a6"]
    assert selected["a0"].traces == (_trace(140),)
    assert selected["a10"].traces == (_trace(160),)
    assert selected["a4"].traces == (_trace(85),)
    assert (selected["a4"].pass_rate, selected["a4"].answer, selected["a4"].source) == (
        0.5,
        GOLD,
        "a",
    )

    rows = {b.bracket: b for b in result.brackets}
    # bracket: (problems, eligible, selected, median kept length, target)
    table = {
        0: (3, 3, 3, 140.0, 135.0),
        2: (1, 0, 0, math.nan, 113.75),
        3: (1, 0, 0, math.nan, 103.125),
        4: (3, 2, 2, 85.0, 92.5),
        8: (2, 1, 1, 50.0, 50.0),
    }
    for b in range(9):
        got = rows[b]
        want = table.get(b, (0, 0, 0, math.nan, 135 - 85 * b / 8))
        assert (got.problems, got.eligible, got.selected) == want[:3], b
        np.testing.assert_equal([got.median_length, got.target], want[3:])
        assert got.pass_rate == b / 8
    assert result.by_source["a"] == [
        curation.BracketStats(**{**vars(b), "source": "a"}) for b in result.brackets
    ]
    assert result.quota == {curation.ALL_SOURCES: 3}


def test_uniform_quota_is_the_smallest_nonempty_bracket():
    result = _curate(_hand_problems())  # eligible per bracket: 3, 2, 1 -> 1 each
    assert result.quota == {curation.ALL_SOURCES: 1}
    counts = {b.bracket: b.selected for b in result.brackets if b.eligible}
    assert counts == {0: 1, 4: 1, 8: 1}
    reasons = result.reasons()
    assert reasons[""] == 3 and reasons[curation.NOT_SAMPLED] == 3
    assert _by_id(result)["a2"].selected  # the only eligible problem at p = 1


def test_incorrect_traces_never_chosen():
    result = _curate(_hand_problems(), per_bracket=10)
    for ex in result.selected:
        assert ex.traces[0].endswith("\\boxed{7}")
    # Without the correctness filter the closer wrong traces win and count in the medians.
    loose = _curate(_hand_problems(), per_bracket=10, require_correct=False)
    a = loose.anchors["a"]
    assert (a.l0, a.l1) == (140.0, 45.0)  # 100,130,130,140,160,300,400 | 10,40,50,70
    r = _by_id(loose)
    assert (r["a10"].trace_index, r["a10"].chosen_length) == (1, 130)  # the wrong one, dist 10
    assert r["a8"].eligible and r["a8"].chosen_length == 100  # T = 140 - 95 * 3/8 = 104.375


def test_tolerance_excludes_and_none_disables():
    tight = _curate(_hand_problems(), per_bracket=10, tolerance=0.05)  # T=135: |d| <= 6.75
    r = _by_id(tight)
    assert r["a0"].eligible and r["a1"].eligible and not r["a10"].eligible
    assert r["a10"].reason == curation.OUT_OF_TOLERANCE
    assert r["a4"].eligible is False  # 7.5 > 4.625
    none = _curate(_hand_problems(), per_bracket=10, tolerance=None)
    r = _by_id(none)
    assert r["a3"].eligible and r["a5"].eligible
    assert (r["a3"].chosen_length, r["a5"].chosen_length) == (70, 60)


# ---------------------------------------------------------------------------------------------
# Sampling, vanilla, determinism on a larger random pool
# ---------------------------------------------------------------------------------------------


def _pool(seed=0, n=400, sources=("geo", "text")):
    rng = np.random.default_rng(seed)
    problems = []
    for src, l0, l1 in zip(sources, (300, 900), (60, 200), strict=False):
        for i in range(n):
            p = int(rng.integers(0, 9)) / 8
            t = (1 - p) * l0 + p * l1
            traces = [
                _trace(max(2, int(rng.normal(t, 0.3 * t))), GOLD if rng.random() < 0.8 else "9")
                for _ in range(int(rng.integers(1, 5)))
            ]
            problems.append(_ex(f"{src}{i}", p, traces, source=src))
    return problems


def test_uniform_sampling_equal_counts_per_bracket():
    problems = _pool()
    result = _curate(problems)
    eligible = [b.eligible for b in result.brackets]
    quota = min(e for e in eligible if e)
    assert result.quota == {curation.ALL_SOURCES: quota}
    assert [b.selected for b in result.brackets] == [quota] * 9
    assert len(result.selected) == 9 * quota
    brackets = collections.Counter(curation.bracket_of(ex.pass_rate) for ex in result.selected)
    assert set(brackets.values()) == {quota}

    capped = _curate(problems, per_bracket=40)
    assert [b.selected for b in capped.brackets] == [min(40, e) for e in eligible]

    per_source = _curate(problems, per_source=True)
    for src, rows in per_source.by_source.items():
        q = min(b.eligible for b in rows if b.eligible)
        assert per_source.quota[src] == q
        assert [b.selected for b in rows] == [q] * 9


def test_vanilla_changes_only_the_trace():
    problems = _pool()
    for kw in (dict(), dict(per_bracket=25), dict(per_source=True)):
        matched = _curate(problems, seed=3, **kw)
        vanilla = _curate(problems, seed=3, vanilla=True, **kw)
        assert [ex.id for ex in vanilla.selected] == [ex.id for ex in matched.selected]
        assert vanilla.quota == matched.quota
        for a, b in zip(matched.brackets, vanilla.brackets, strict=True):
            assert (a.problems, a.eligible, a.selected) == (b.problems, b.eligible, b.selected)
        for a, b in zip(matched.records, vanilla.records, strict=True):
            assert (a.eligible, a.selected, a.reason, a.target) == (
                b.eligible,
                b.selected,
                b.reason,
                b.target,
            )
        assert vanilla.anchors == matched.anchors
        changed = sum(
            a.traces != b.traces for a, b in zip(matched.selected, vanilla.selected, strict=True)
        )
        assert changed > 0
        for ex in vanilla.selected:  # still a correct trace of the problem
            assert ex.traces[0].endswith("\\boxed{7}")
    # The matched choice is the closest correct trace; vanilla's is any correct one.
    by_id = {ex.id: ex for ex in problems}
    for r in vanilla.records:
        if r.selected:
            assert by_id[r.id].traces[r.trace_index].endswith("\\boxed{7}")


def test_vanilla_choice_is_uniform_among_correct_traces():
    problems = [_ex(f"p{i}", 0.0, [_trace(100), _trace(120), _wrong(100)]) for i in range(600)]
    result = _curate(problems, vanilla=True, tolerance=None)
    picks = collections.Counter(r.trace_index for r in result.records)
    assert set(picks) == {0, 1}
    assert 240 < picks[0] < 360


def test_deterministic_by_seed():
    problems = _pool()
    a = _curate(problems, seed=5)
    b = _curate(problems, seed=5)
    assert a.records == b.records and a.selected == b.selected
    others = [_curate(problems, seed=s) for s in (6, 7)]
    assert any([r.id for r in o.selected] != [r.id for r in a.selected] for o in others)
    va = _curate(problems, seed=5, vanilla=True)
    vb = _curate(problems, seed=5, vanilla=True)
    assert va.selected == vb.selected


# ---------------------------------------------------------------------------------------------
# Fallbacks
# ---------------------------------------------------------------------------------------------


def test_fallback_to_nearest_bracket_when_a_source_lacks_p0_or_p1():
    problems = _hand_problems() + [
        _ex("b0", 0.25, [_trace(200), _trace(220)], source="b"),
        _ex("b1", 0.25, [_trace(260), _wrong(50)], source="b"),
        _ex("b2", 0.75, [_trace(100), _trace(120)], source="b"),
        _ex("b3", 0.5, [_trace(150)], source="b"),
    ]
    result = _curate(problems, per_bracket=10)
    b = result.anchors["b"]
    # bracket 2: 200, 220, 260 -> 220; bracket 6: 100, 120 -> 110
    assert (b.l0, b.l1, b.l0_bracket, b.l1_bracket) == (220.0, 110.0, 2, 6)
    assert (b.l0_traces, b.l1_traces, b.pooled) == (3, 2, False)
    assert "L(0) from bracket 2" in b.note and "L(1) from bracket 6" in b.note
    assert b.fallback
    r = _by_id(result)
    assert r["b3"].target == 165.0  # (220 + 110) / 2; 150 is 15 away, within 41.25
    assert r["b0"].target == 192.5 and r["b0"].chosen_length == 200
    assert result.anchors["a"].note == ""  # the other source is untouched
    # Per source rows and pooled rows both exist.
    assert set(result.by_source) == {"a", "b"}
    assert result.by_source["b"][2].problems == 2
    # Pooled target: the mean over the bracket's problems of their source's target at the
    # bracket's p (bracket 4: a4, a5, a6 at 92.5 and b3 at 165); an empty bracket: each source
    # once (bracket 1: a 124.375, b 0.875 * 220 + 0.125 * 110 = 206.25).
    assert result.brackets[4].target == (3 * 92.5 + 165) / 4
    assert result.brackets[1].target == (124.375 + 206.25) / 2


def test_fallback_to_pooled_when_a_source_has_no_usable_trace():
    problems = _hand_problems() + [
        _ex("c0", 0.0, [_wrong(70)], source="c"),
        _ex("c1", 0.5, [_wrong(90)], source="c"),
    ]
    result = _curate(problems)
    c = result.anchors["c"]
    assert (c.l0, c.l1, c.pooled) == (135.0, 50.0, True)  # all sources' usable traces: only "a"
    assert "pooled" in c.note
    r = _by_id(result)
    assert r["c1"].target == 92.5 and r["c1"].reason == curation.NO_USABLE_TRACE


def test_no_usable_trace_anywhere_does_not_crash():
    problems = [_ex("w0", 0.0, [_wrong(10)]), _ex("w1", 1.0, [_wrong(20)]), _ex("w2", None, [])]
    result = _curate(problems)
    a = result.anchors["a"]
    assert math.isnan(a.l0) and math.isnan(a.l1) and a.note
    assert result.selected == []
    assert [r.reason for r in result.records] == [
        curation.NO_USABLE_TRACE,
        curation.NO_USABLE_TRACE,
        curation.NO_PASS_RATE,
    ]
    assert result.quota == {curation.ALL_SOURCES: 0}
    assert curate([], CurationSettings(), length_fn=len).selected == []


def test_bad_pass_rate_names_the_problem():
    with pytest.raises(ValueError, match="bad"):
        _curate([_ex("bad", 1.5, [_trace(3)])])
