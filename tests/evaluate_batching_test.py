"""Evaluation batches sized by a KV cache token budget, and over-long prompts skipped or named."""

import dataclasses
import functools

import jax
import numpy as np
import pytest
from flax import nnx

from ares_jax import eval_batches as eb
from ares_jax import evaluate as ev
from ares_jax import evaluate_cli
from ares_jax.data import synthetic
from ares_jax.data.records import DataError
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.sampling import SamplingParams


def test_kv_bytes_per_position_of_qwen2_5_vl_sizes():
    """2 x layers x KV heads x head dim x dtype bytes: the numbers the --batch_tokens help gives."""
    seven_b, three_b = config.preset("7b"), config.preset("3b")
    assert eb.kv_bytes_per_position(seven_b, jax.numpy.bfloat16) == 57344
    assert eb.kv_bytes_per_position(three_b, jax.numpy.bfloat16) == 36864
    assert eb.kv_bytes_per_position(three_b, jax.numpy.float32) == 2 * 36864
    # The command line's default budget on a 7B model at the paper's lengths: 2 problems a call.
    budget = int(evaluate_cli.DEFAULT_KV_CACHE_GIB * 2**30) // 57344
    assert eb.problems_per_call(4096, max_new_tokens=32768, batch_tokens=budget) == 2


def test_problems_per_call_is_a_power_of_two_within_the_budget():
    kw = dict(max_new_tokens=768, batch_tokens=4096)
    assert eb.problems_per_call(256, **kw) == 4  # 4096 // 1024
    assert eb.problems_per_call(1024, **kw) == 2  # 4096 // 1792 = 2
    assert eb.problems_per_call(256, max_new_tokens=256, batch_tokens=4096) == 8
    assert eb.problems_per_call(100, max_new_tokens=0, batch_tokens=4096) == 32  # 40 -> 32
    assert eb.problems_per_call(256, rows_per_prompt=2, **kw) == 2  # n = 2 rows a problem
    assert eb.problems_per_call(8192, **kw) == 1  # over the budget: alone, still run
    assert eb.problems_per_call(256, batch_size=3, **kw) == 3  # the cap
    assert eb.problems_per_call(256, batch_size=64, **kw) == 4  # a cap never raises it
    assert eb.problems_per_call(256, max_new_tokens=768, batch_tokens=None, batch_size=5) == 5
    with pytest.raises(ValueError, match="batch_tokens, batch_size"):
        eb.problems_per_call(256, max_new_tokens=768, batch_tokens=None)


def test_plan_batches_the_longest_prompt_bounds_a_batch():
    # per call: 4 problems at bucket 256, 2 at 1024 (max_new_tokens 768, budget 4096)
    buckets = [256] * 5 + [1024] + [256] * 3 + [None] + [256] * 2
    plan = eb.plan_batches(buckets, max_new_tokens=768, batch_tokens=4096)
    got = [(b.start, b.size, b.rows, b.bucket) for b in plan]
    assert got == [
        (0, 4, 4, 256),
        (4, 2, 2, 1024),  # problem 5's long prompt bounds the batch it joins to 2
        (6, 3, 4, 256),  # cut by the left-out problem 9: padded to 4 rows
        (10, 2, 2, 256),  # the last batch: 2 rows, not 4
    ]
    for b in plan:  # every call within the budget
        assert b.rows * (b.bucket + 768) <= 4096
    capped = eb.plan_batches(buckets, max_new_tokens=768, batch_tokens=4096, batch_size=3)
    got = [(b.start, b.size, b.rows) for b in capped]
    assert got == [(0, 3, 3), (3, 2, 2), (5, 2, 2), (7, 2, 2), (10, 2, 2)]  # rows <= the cap
    assert eb.plan_batches([None, None], max_new_tokens=8, batch_tokens=100) == []


def test_cli_prompt_buckets():
    assert eb.cli_prompt_buckets(4096) == (256, 1024, 4096)
    assert eb.cli_prompt_buckets(128) == (128,)
    assert eb.cli_prompt_buckets(1024) == (256, 1024)
    assert eb.cli_prompt_buckets(1000) == (1000,)  # 250 < 256


def _problems():
    """7 problems: prompts of 68-83 tokens, two lengthened past 128 tokens, one past 256."""
    examples = synthetic.make_examples(6, seed=1, split="val")
    longer = " Count carefully, cell by cell." * 4  # 78 more tokens
    examples[1] = dataclasses.replace(examples[1], question=examples[1].question + longer)
    examples[4] = dataclasses.replace(examples[4], question=examples[4].question + longer)
    overlong = dataclasses.replace(
        examples[2], question=examples[2].question + longer * 4, origin="bench.jsonl, line 4"
    )
    return examples[:3] + [overlong] + examples[3:]


@functools.cache
def _tiny_model():
    cfg = config.preset("tiny")
    return (cfg, *nnx.split(params.init_model(cfg, seed=0)))  # building it takes seconds


def _evaluate(examples, **kw):
    cfg, graphdef, state = _tiny_model()
    return ev.evaluate(
        graphdef,
        state,
        examples,
        tokenizer.build_tokenizer(),
        cfg,
        sampling=SamplingParams(
            n=2, max_new_tokens=4, temperature=1.0, pad_token_id=cfg.pad_token_id
        ),
        template="Answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=12544,
        prompt_len_buckets=(128, 256),
        key=jax.random.PRNGKey(0),
        **kw,
    )


def test_small_budget_gives_the_samples_of_one_big_batch():
    """Rows are keyed by problem index (generate's first_prompt), so a budget that splits the
    problems into calls of 1 and 2 (prompt buckets 128 and 256) samples what one call does."""
    examples = _problems()
    whole = _evaluate(examples, batch_tokens=10**6)
    # 2 rows x (128 + 4) = 264 positions a problem at bucket 128, 520 at 256: 2 and 1 per call
    split = _evaluate(examples, batch_tokens=600)
    for r in (whole, split):
        assert r.metrics["eval/skipped_overlong"] == 1  # problem 3 (bench.jsonl, line 4)
        assert r.metrics["eval/count"] == 12  # the 6 others, 2 samples each
        assert r.entropy.shape == (12, 4)
    assert whole.metrics == split.metrics
    np.testing.assert_array_equal(whole.correct, split.correct)
    np.testing.assert_allclose(whole.entropy, split.entropy, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(whole.topk_entropy_raw, split.topk_entropy_raw, atol=1e-6)


def test_overlong_prompt_skipped_and_warned_by_default_named_under_strict(caplog):
    import logging

    examples = _problems()[2:5]
    with caplog.at_level(logging.WARNING):
        result = _evaluate(examples, batch_size=4)
    assert result.metrics["eval/skipped_overlong"] == 1
    assert result.metrics["eval/count"] == 4
    assert "skipped: bench.jsonl, line 4: the prompt has " in caplog.text
    with pytest.raises(DataError, match=r"^bench.jsonl, line 4: the prompt has \d+ tokens"):
        _evaluate(examples, batch_size=4, skip_overlong=False)
    with pytest.raises(DataError, match="none of the 1 prompts fits"):
        _evaluate(examples[1:2], batch_size=4)
