r"""The whole ARES pipeline on the embedded synthetic task: warm-up, AdaCS, AEPO, evaluation.

Each stage is the real one, with its own config (the nested `warmup`, `adacs` and `aepo` blocks
are configs/adacs.py and configs/aepo.py); the pipeline only chains their checkpoints:
  1. warm-up: configs/adacs.py with curation off, a short fine-tune of the randomly initialised
     small model on the teacher's traces, which gives the base model;
  2. AdaCS from the base: pass rates of the base model, length-targeted curation, fine-tuning;
  3. AEPO from the AdaCS model;
  4. the base, AdaCS and AEPO models on held-out problems: accuracy and mean response length per
     difficulty level (the layout of the paper's Table 4), and plots of the AEPO run.

It is the default of configs/aepo.py (its presets '' and 'pipeline_smoke' return this config):
  python -m ares_jax.main --config=configs/aepo.py --workdir=/tmp/ares     # ~5.5 min, 2 cores
  python -m ares_jax.main --config=configs/pipeline.py:smoke --workdir=/tmp/pipeline_smoke
"""

from __future__ import annotations

import ml_collections

from configs import adacs, aepo, common

PRESETS = ("", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, preset="")
    if args.preset not in PRESETS:
        raise ValueError(f"configs/pipeline.py: unknown preset {args.preset!r}; known: 'smoke'.")
    sub = "smoke" if args.preset == "smoke" else ""
    c = ml_collections.ConfigDict()
    c.stage = "pipeline"
    c.seed = 0
    # The stage configs as they are (not copy_and_resolve_references, which drops the types of
    # their unset placeholders): --config.aepo.data.image_mean=... works as for a stage run.
    c.warmup = adacs.get_config(sub)
    c.adacs = adacs.get_config(sub)
    c.aepo = aepo.stage_config(sub)
    c.eval = dict(
        test_size=8 if sub else 400,  # held-out problems of the synthetic test split
        temperature=0.0,  # greedy
        max_response_len=c.aepo.eval.max_response_len,
    )
    if sub:
        c.warmup.curation.enabled = False
        c.warmup.sft.max_steps = 4
        c.warmup.sft.epochs = 8
        c.warmup.eval.max_examples = 4
        c.warmup.seed = 1
    else:
        _embedded(c)
    return c.lock()


# The embedded model's instruction. The released format prompt (configs/aepo.PROMPT_SUFFIX) is 64
# tokens of the embedded tokenizer, half of every prompt, and tells a model trained from random
# weights no more than these 15: it learns the format from the teacher's traces either way.
EMBEDDED_PROMPT_SUFFIX = "Think in <think> </think>, then answer in \\boxed{}."


def _embedded(c: ml_collections.ConfigDict) -> None:
    """Sizes for one 2-core CPU in minutes. Prompts (the chat format, 16 image tokens, the question
    and `EMBEDDED_PROMPT_SUFFIX`) are 76 or 91 tokens, one bucket of 96; the longest teacher
    trace is 154 tokens and its EOS, so training rows, pass-rate samples and rollouts get 160
    (no trace is cut); evaluation keeps 192, room for a model that runs on."""
    for block in (c.warmup, c.adacs, c.aepo):
        block.data.update(
            max_prompt_len=96, prompt_len_buckets=(96,), prompt_template=EMBEDDED_PROMPT_SUFFIX
        )
    # 1. Warm-up: the random small model learns the format and to count from the teacher's traces
    # (one correct trace per problem, drawn at random). The vision tower keeps its random weights
    # in every stage before AEPO: trained from scratch in the warm-up, its output collapses to one
    # vector for every cell, and the count can no longer be read.
    w = c.warmup
    w.seed = 1  # problems of the warm-up differ from AdaCS's
    w.curation.enabled = False
    w.data.synthetic_train_size = 3520
    w.checkpoint.every_steps = 100
    w.sft.update(
        epochs=1, max_steps=220, global_batch=16, micro_batch_size=16, lr=2e-3, warmup_steps=20
    )
    w.eval.max_examples = 16
    # 2. AdaCS: pass rates of the base model (4 samples per problem), length-targeted curation,
    # fine-tuning.
    a = c.adacs
    a.data.synthetic_train_size = 256
    a.pass_rate.update(samples=4, batch_size=64, max_new_tokens=160)
    # Each problem keeps its teacher trace closest to its target length, in every bracket.
    a.curation.update(tolerance=0.0, per_bracket=256)
    a.sft.update(epochs=4, max_steps=100, global_batch=16, micro_batch_size=16, lr=1e-3)
    a.eval.max_examples = 16
    # 3. AEPO from the AdaCS model; the random vision tower stays frozen here too.
    r = c.aepo
    r.model.freeze_vision = True
    # At temperature 1.0 the small model's samples are right about half as often as its greedy
    # answers, and RL sharpens the samples without moving the greedy answers the evaluation
    # measures; at 0.7 the rollouts stay near the greedy policy (measured on the task's previous
    # version: 20 iterations at 1.0 left held-out accuracy unchanged, at 0.7 it rose 3 points).
    r.rollout.update(max_response_len=160, length_buckets=(96, 160), temperature=0.7)
    # An iteration's 128 rollouts fit in one decode batch: the paged engine has no row to refill,
    # and the static loop's dense attention is cheaper on a CPU (measured at the ablation's
    # sizes: 1.7x the tokens/s, benchmarks/RESULTS.md).
    r.rollout.engine = "static"
    # One rollout batch per iteration: groups the online filter drops are not refilled, which
    # halves the sampling time per iteration and buys more iterations in the budget.
    r.filter.max_tries = 1
    # 20 iterations: from this AdaCS model (98.5% held-out, measured) 40 ended no higher (98.2%
    # after either), and the warm-up cannot be shortened instead (160 of its 220 steps: base
    # 24.5%, AdaCS 24.2%; benchmarks/RESULTS.md).
    r.train.update(
        steps=20,
        prompts_per_step=16,  # one update per iteration, on all its kept groups
        old_logp_source="sampler",  # on-policy single update: the learner's pass is redundant
    )
    r.optim.update(lr=2e-5)
    r.eval.update(every_steps=0, max_examples=32, max_response_len=192)
    c.eval.max_response_len = 192
    for block in (c.warmup, c.adacs):
        block.sft.update(max_response_len=160, length_buckets=(96, 160))
        block.eval.max_response_len = 192


def validate(c: ml_collections.ConfigDict) -> None:
    """Each stage's own validation; keys are reported with their block (warmup., adacs., aepo.)."""
    for name, module in (("warmup", adacs), ("adacs", adacs), ("aepo", aepo)):
        try:
            module.validate(c[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
