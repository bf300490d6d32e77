"""Pass-rate estimation: rates equal a hand check, resume after a kill, sharding, data set."""

import json
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx

from ares_jax.adacs import pass_rate as pr
from ares_jax.batching import encode_prompts, sampler_inputs
from ares_jax.data import records, synthetic
from ares_jax.data.records import Example
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.rewards import answers
from ares_jax.sampling import SamplingParams, generate
from ares_jax.sampling.sampler import STOP, GenerateOutput

TEMPLATE = "Answer in \\boxed{}."
K = 8


@pytest.fixture(scope="module")
def tiny():
    cfg = config.preset("tiny")
    graphdef, state = nnx.split(params.init_model(cfg, seed=0))
    return graphdef, state, cfg, tokenizer.build_tokenizer()


def _settings(cfg, **over):
    kw = dict(
        samples=K,
        sampling=SamplingParams(
            n=1, max_new_tokens=4, temperature=1.0, top_p=1.0, pad_token_id=cfg.pad_token_id
        ),
        template=TEMPLATE,
        min_pixels=3136,
        max_pixels=12544,
        prompt_len_buckets=(256,),
        batch_size=2,
        key=jax.random.PRNGKey(7),
        shard_index=0,
        shard_count=1,
    )
    kw.update(over)
    return kw


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------
# A fake sampler with known answers: problem i gets (i % 9) correct samples out of 8
# ---------------------------------------------------------------------------------------------


def _fake_problems(n):
    return [
        Example(
            id=f"p{i}",
            question=f"Question number {i}: compute {i} + 1.",
            answer=str(i + 1),
            source="even" if i % 2 == 0 else "odd",
        )
        for i in range(n)
    ]


def _fake_response(i, j):
    return f"<think>add one</think> \\boxed{{{i + 1}}}" if j < i % 9 else "\\boxed{wrong}"


class FakeGenerate:
    """Reads each prompt's problem number from its text; records what each call generated."""

    def __init__(self, tok, cfg):
        self.tok, self.cfg = tok, cfg
        self.calls: list[list[int]] = []
        self.keys = []

    def __call__(self, graphdef, params, *, inputs, sampling, key, mesh=None, cache_len=None):
        del graphdef, params, mesh, cache_len
        eos = tokenizer.special_ids(self.tok).endoftext
        rows, which = [], []
        for ids, mask in zip(
            np.asarray(inputs.input_ids), np.asarray(inputs.attention_mask), strict=True
        ):
            text = self.tok.decode(ids[mask.astype(bool)])
            i = int(re.search(r"Question number (\d+):", text).group(1))
            which.append(i)
            for j in range(sampling.n):
                rows.append(self.tok.encode(_fake_response(i, j), add_special_tokens=False) + [eos])
        self.calls.append(list(dict.fromkeys(which)))  # padding copies counted once
        self.keys.append(np.asarray(key))
        t = sampling.max_new_tokens
        assert max(map(len, rows)) <= t
        n = len(rows)
        tokens = np.full((n, t), sampling.pad_token_id, np.int32)
        for r, toks in enumerate(rows):
            tokens[r, : len(toks)] = toks
        lengths = np.array([len(r) for r in rows], np.int32)
        zeros = np.zeros((n, t), np.float32)
        return GenerateOutput(
            tokens=tokens,
            logp=zeros,
            sampling_logp=zeros,
            entropy=zeros,
            argmax_tokens=tokens,
            topk_entropy_tail=zeros,
            topk_entropy_raw=zeros,
            mask=np.arange(t)[None] < lengths[:, None],
            lengths=lengths,
            stop_reason=np.full((n,), STOP, np.int32),
            prompt_index=np.repeat(np.arange(len(which)), sampling.n).astype(np.int32),
            active=np.ones((n,), bool),
            parent=np.full((n,), -1, np.int32),
            fork_step=np.full((n,), -1, np.int32),
        )

    @property
    def generated(self) -> list[int]:
        return [i for call in self.calls for i in call]


def _fake_run(tiny, problems, out, fake=None, **over):
    graphdef, state, cfg, tok = tiny
    fake = FakeGenerate(tok, cfg) if fake is None else fake
    kw = _settings(cfg, **over)
    kw["sampling"] = SamplingParams(
        n=1, max_new_tokens=32, temperature=1.0, pad_token_id=cfg.pad_token_id
    )
    result = pr.estimate_pass_rates(
        graphdef, state, problems, tok, cfg, out_path=out, generate_fn=fake, **kw
    )
    return result, fake


def test_known_responses_give_exact_rates(tiny, tmp_path):
    _, _, cfg, tok = tiny
    problems = _fake_problems(9)  # 0/8 .. 8/8: all 9 brackets; 9 = 2 batches of 4 + 1 padded
    result, fake = _fake_run(tiny, problems, tmp_path / "out", batch_size=4)
    assert result.rates == {f"p{i}": i / 8 for i in range(9)}
    assert result.rates["p3"] == 3 / 8
    assert result.num_correct == {f"p{i}": i for i in range(9)}
    assert (result.computed, result.resumed, result.generate_calls) == (9, 0, 3)
    assert fake.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8]]
    # each batch is keyed by its ids only
    for call_key, ids in zip(
        fake.keys,
        [[f"p{i}" for i in range(4)], [f"p{i}" for i in range(4, 8)], ["p8"]],
        strict=True,
    ):
        np.testing.assert_array_equal(call_key, pr.batch_key(jax.random.PRNGKey(7), ids))
    eos = 1
    want_lengths = {
        f"p{i}": [
            len(tok.encode(_fake_response(i, j), add_special_tokens=False)) + eos for j in range(K)
        ]
        for i in range(9)
    }
    lines = _lines(result.path)
    assert [row["id"] for row in lines] == [f"p{i}" for i in range(9)]
    for row in lines:
        assert row["lengths"] == want_lengths[row["id"]]
        assert row["mean_length"] == pytest.approx(np.mean(want_lengths[row["id"]]))
        assert row["samples"] == K and row["num_truncated"] == 0
        assert row["source"] == ("even" if int(row["id"][1:]) % 2 == 0 else "odd")
        assert row["correct"] == [j < int(row["id"][1:]) % 9 for j in range(K)]
        assert "responses" not in row
    assert result.tokens_generated == sum(map(sum, want_lengths.values()))
    assert pr.merge_pass_rates(tmp_path / "out") == result.rates


# ---------------------------------------------------------------------------------------------
# The real sampler on the tiny model
# ---------------------------------------------------------------------------------------------


def test_tiny_model_rates_equal_hand_check(tiny, tmp_path):
    graphdef, state, cfg, tok = tiny
    problems = synthetic.make_examples(5, seed=3, split="val")
    kw = _settings(cfg)
    result = pr.estimate_pass_rates(
        graphdef, state, problems, tok, cfg, out_path=tmp_path / "out", keep_responses=True, **kw
    )
    assert sorted(result.rates) == sorted(e.id for e in problems)
    by_id = {row["id"]: row for row in _lines(result.path)}
    # the same samples, by hand: same batches, same keys, the plain sampler and answers.is_correct
    sp = SamplingParams(
        n=K, max_new_tokens=4, temperature=1.0, top_p=1.0, pad_token_id=cfg.pad_token_id
    )
    hand = {}
    for batch in pr.shard_batches(problems, 2, 0, 1):
        chunk = batch + [batch[-1]] * (2 - len(batch))
        prompts = encode_prompts(
            [e.question for e in chunk],
            [e.images for e in chunk],
            tok,
            cfg,
            template=TEMPLATE,
            min_pixels=3136,
            max_pixels=12544,
            length_buckets=(256,),
        )
        out = generate(
            graphdef,
            state,
            inputs=sampler_inputs(prompts, cfg),
            sampling=sp,
            key=pr.batch_key(jax.random.PRNGKey(7), [e.id for e in batch]),
            cache_len=256 + 4,
        )
        for p, e in enumerate(batch):
            rows = np.flatnonzero(out.prompt_index == p)
            texts = [
                tok.decode(out.tokens[r, : out.lengths[r]], skip_special_tokens=True) for r in rows
            ]
            hand[e.id] = (texts, [int(out.lengths[r]) for r in rows], e.answer)
    for e in problems:
        texts, lengths, gold = hand[e.id]
        row = by_id[e.id]
        assert row["responses"] == texts
        assert row["lengths"] == lengths
        correct = sum(answers.is_correct(t, gold) for t in texts)
        assert row["num_correct"] == correct
        assert result.rates[e.id] == correct / K
        assert result.num_correct[e.id] == correct
        assert row["num_truncated"] == K  # no stop tokens: every sample hits the limit
    assert result.tokens_generated == 5 * K * 4


def test_tiny_model_resume_equals_uninterrupted(tiny, tmp_path):
    graphdef, state, cfg, tok = tiny
    problems = synthetic.make_examples(6, seed=4, split="val")
    kw = _settings(cfg)
    full = pr.estimate_pass_rates(
        graphdef, state, problems, tok, cfg, out_path=tmp_path / "a", keep_responses=True, **kw
    )

    class Kill(Exception):
        pass

    def die(n, **_):
        raise Kill

    with pytest.raises(Kill):
        pr.estimate_pass_rates(
            graphdef,
            state,
            problems,
            tok,
            cfg,
            out_path=tmp_path / "b",
            keep_responses=True,
            progress=die,
            **kw,
        )
    assert len(_lines(pr.shard_file(tmp_path / "b", 0, 1))) == 2
    resumed = pr.estimate_pass_rates(
        graphdef, state, problems, tok, cfg, out_path=tmp_path / "b", keep_responses=True, **kw
    )
    assert (resumed.resumed, resumed.computed, resumed.generate_calls) == (2, 4, 2)
    assert _lines(resumed.path) == _lines(full.path)  # same samples, same lengths, same rates
    assert resumed.rates == full.rates


# ---------------------------------------------------------------------------------------------
# Resume and sharding with the fake sampler (counted generate calls)
# ---------------------------------------------------------------------------------------------


def test_kill_after_first_batch_resumes_without_redoing_or_losing(tiny, tmp_path):
    problems = _fake_problems(6)
    reference, _ = _fake_run(tiny, problems, tmp_path / "ref")

    class Progress:
        def __init__(self):
            self.n = 0

        def update(self, n, **postfix):
            self.n += n
            raise KeyboardInterrupt  # killed right after the first batch was written

    progress = Progress()
    first = FakeGenerate(tiny[3], tiny[2])
    with pytest.raises(KeyboardInterrupt):
        _fake_run(tiny, problems, tmp_path / "out", fake=first, progress=progress)
    assert first.generated == [0, 1] and progress.n == 2
    second_result, second = _fake_run(tiny, problems, tmp_path / "out")
    assert second.generated == [2, 3, 4, 5]  # nothing twice, nothing lost
    assert (second_result.resumed, second_result.computed) == (2, 4)
    ids = [row["id"] for row in _lines(second_result.path)]
    assert sorted(ids) == sorted(e.id for e in problems) and len(ids) == len(set(ids))
    assert second_result.rates == reference.rates
    assert pr.merge_pass_rates(tmp_path / "out") == reference.rates
    # a third run has nothing to do
    third_result, third = _fake_run(tiny, problems, tmp_path / "out")
    assert third.calls == [] and third_result.rates == reference.rates


def test_partial_last_line_is_dropped_and_redone(tiny, tmp_path):
    problems = _fake_problems(6)
    reference, _ = _fake_run(tiny, problems, tmp_path / "out")
    path = reference.path
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    # crash mid-write of the last batch: p4's line made it, p5's only half
    with open(path, "wb") as f:
        f.write(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    result, fake = _fake_run(tiny, problems, tmp_path / "out")
    assert fake.calls == [[4, 5]]  # the torn batch, regenerated with its own key
    assert (result.resumed, result.computed) == (5, 1)
    after = _lines(path)
    assert [row["id"] for row in after] == [f"p{i}" for i in range(6)]
    assert after == [json.loads(line) for line in lines]
    assert result.rates == reference.rates

    # a whole batch lost (both lines) and a line without its newline
    with open(path, "wb") as f:
        f.write(b"".join(lines[:4]) + lines[4].rstrip(b"\n"))
    result, fake = _fake_run(tiny, problems, tmp_path / "out")
    assert fake.calls == [[4, 5]] and result.computed == 2
    assert _lines(path) == [json.loads(line) for line in lines]


def test_corrupt_line_before_good_lines_is_an_error(tiny, tmp_path):
    problems = _fake_problems(4)
    reference, _ = _fake_run(tiny, problems, tmp_path / "out")
    with open(reference.path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    lines[1] = b'{"id": "p1", "pass_ra\n'
    with open(reference.path, "wb") as f:
        f.write(b"".join(lines))
    with pytest.raises(records.DataError, match=r"line 2"):
        _fake_run(tiny, problems, tmp_path / "out")


def test_changed_settings_refuse_to_resume(tiny, tmp_path):
    problems = _fake_problems(4)
    _fake_run(tiny, problems, tmp_path / "out")
    with pytest.raises(ValueError, match="batch_size"):
        _fake_run(tiny, problems, tmp_path / "out", batch_size=3)
    with pytest.raises(ValueError, match="ids_sha256"):
        _fake_run(tiny, problems[:3], tmp_path / "out")


def test_two_shards_are_disjoint_and_merge_to_all(tiny, tmp_path):
    problems = _fake_problems(7)
    reference, _ = _fake_run(tiny, problems, tmp_path / "single")
    out = tmp_path / "sharded"
    r0, f0 = _fake_run(tiny, problems, out, shard_index=0, shard_count=2)
    r1, f1 = _fake_run(tiny, problems, out, shard_index=1, shard_count=2)
    assert f0.generated == [0, 2, 4, 6] and f1.generated == [1, 3, 5]
    assert set(r0.rates).isdisjoint(r1.rates)
    assert set(r0.rates) | set(r1.rates) == {e.id for e in problems}
    assert sorted(os.listdir(out)) == [
        "shard-00000-of-00002.jsonl",
        "shard-00000-of-00002.meta.json",
        "shard-00001-of-00002.jsonl",
        "shard-00001-of-00002.meta.json",
    ]
    assert pr.merge_pass_rates(out) == reference.rates
    # a run with another shard count in the same directory is refused by merge
    _fake_run(tiny, problems, out)
    with pytest.raises(ValueError, match="shard counts"):
        pr.merge_pass_rates(out)


def test_rejects_duplicate_ids_and_branching(tiny, tmp_path):
    problems = _fake_problems(3)
    with pytest.raises(ValueError, match="unique"):
        _fake_run(tiny, problems + problems[:1], tmp_path / "out")
    graphdef, state, cfg, tok = tiny
    kw = _settings(cfg)
    from ares_jax.sampling import BranchingParams

    kw["sampling"] = SamplingParams(
        pad_token_id=cfg.pad_token_id, branching=BranchingParams(enabled=True, budget=2)
    )
    with pytest.raises(ValueError, match="branching"):
        pr.estimate_pass_rates(graphdef, state, problems, tok, cfg, out_path=tmp_path / "b", **kw)


# ---------------------------------------------------------------------------------------------
# Output as a data set
# ---------------------------------------------------------------------------------------------


def test_attach_and_write_dataset_round_trip(tiny, tmp_path):
    problems = _fake_problems(5)
    result, _ = _fake_run(tiny, problems, tmp_path / "out")
    partial = {k: v for k, v in result.rates.items() if k != "p2"}
    attached = pr.attach_pass_rates(problems, partial)
    assert [e.pass_rate for e in attached] == [0.0, 1 / 8, None, 3 / 8, 4 / 8]
    assert attached[1].question == problems[1].question

    path = pr.write_pass_rate_dataset(problems, tmp_path / "out", tmp_path / "rated.jsonl")
    back, stats = records.read_examples(path)
    assert [e.id for e in back] == [e.id for e in problems]
    assert {e.id: e.pass_rate for e in back} == result.rates

    path = pr.write_pass_rate_dataset(problems, partial, tmp_path / "some.jsonl")
    back, _ = records.read_examples(path)
    assert [e.id for e in back] == ["p0", "p1", "p3", "p4"]
    # synthetic problems with images survive the round trip too
    images = synthetic.make_examples(2, seed=5)
    path = pr.write_pass_rate_dataset(images, {e.id: 0.25 for e in images}, tmp_path / "img.jsonl")
    back, _ = records.read_examples(path)
    assert back == [e.__class__(**{**e.__dict__, "pass_rate": 0.25}) for e in images]


def test_stop_ends_after_a_written_batch_and_a_second_call_resumes(tiny, tmp_path):
    # What SIGTERM does during the pass rates (stop=checkpoint.preempted_here in the stage).
    problems = _fake_problems(6)
    reference, _ = _fake_run(tiny, problems, tmp_path / "ref")
    first = FakeGenerate(tiny[3], tiny[2])
    result, _ = _fake_run(tiny, problems, tmp_path / "out", fake=first, stop=lambda: True)
    assert result.stopped and first.generated == [0, 1] and result.computed == 2
    second_result, second = _fake_run(tiny, problems, tmp_path / "out")
    assert not second_result.stopped and second.generated == [2, 3, 4, 5]
    assert second_result.rates == reference.rates
