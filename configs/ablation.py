r"""What ARES's entropy shaping adds, measured: the ablation of ares_jax/ablation.py.

The embedded pipeline's warm-up and AdaCS (configs/pipeline.py), on the synthetic task with its
checked traces (data.synthetic_checks: a quick count, then "So 12? Let me check row by row: 1, 2 in
row 1, then ...", which corrects the quick count where it missed a shape, more often the harder
the problem), AdaCS keeping a random correct trace per problem (curation.vanilla); then,
from that one AdaCS model, AEPO once per arm and seed; then every model on the same held-out
problems, and a report per difficulty level with the spread over seeds.

  python -m ares_jax.main --config=configs/ablation.py --workdir=/tmp/ablation   # ~15 min, 2 cores
  python -m ares_jax.main --config=configs/ablation.py:smoke --workdir=/tmp/ablation_smoke
  python -m ares_jax.main --config=configs/ablation.py --workdir=DIR \
      --config.arms='("aepo", "accuracy_only", "fixed_kl")' --config.seeds='(0, 1, 2, 3)'

Keys: `arms` (ares_jax.ablation.ARMS: aepo, accuracy_only, fixed_kl), `seeds`, and the pipeline's
blocks `warmup.`, `adacs.`, `aepo.` (the AEPO config every arm starts from) and `eval.`.
"""

from __future__ import annotations

import ml_collections

from configs import common, pipeline

PRESETS = ("", "smoke")
ARM_NAMES = ("aepo", "accuracy_only", "fixed_kl")  # ares_jax.ablation.ARMS, without importing jax


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, preset="")
    if args.preset not in PRESETS:
        raise ValueError(f"configs/ablation.py: unknown preset {args.preset!r}; known: 'smoke'.")
    smoke = args.preset == "smoke"
    c = pipeline.get_config("smoke" if smoke else "")
    with c.unlocked():
        c.stage = "ablation"
        c.arms = ("aepo", "accuracy_only")
        c.seeds = (0, 1) if smoke else (0, 1, 2)
        for block in (c.warmup, c.adacs):
            block.data.synthetic_checks = True
        # The cold start keeps a uniformly random correct trace per problem (the paper's
        # ARES-CS-Vanilla), not the one nearest its length target: the AdaCS model then re-checks
        # on every level (47-72% of its answers, measured), so how often it re-checks per level
        # is left to the RL arms, and the difference between them is what each one learned.
        # Length-targeted curation picks middle-length traces, which drops the long re-checks of
        # the hard problems and keeps those of the easy ones (measured: no re-check on levels
        # 3-5 after it).
        c.adacs.curation.vanilla = True
        # HWE windows by the paper's Algorithm 1: every complete window whose mean entropy reaches
        # tau, no trigger vocabulary. With the released code's rule (a trigger word followed by
        # a high window) the count stayed at 0.0-0.3 per response on this task (measured: the
        # four tokens after a trigger word are predictable for a model that has read the
        # picture, and the window mean dilutes the one uncertain token), so the shaped reward
        # was a function of correctness alone and the two arms learned the same.
        c.aepo.entropy.hwe_count = "paper_window"
        if smoke:
            # The tiny model answers nothing right: every accuracy-only group has reward 0, and
            # the online filter would drop them all.
            c.aepo.filter.enabled = False
        else:
            _sizes(c)
    return c.lock()


def _sizes(c: ml_collections.ConfigDict) -> None:
    """Six AEPO runs and the shared stages on 2 cores, with the pipeline's prompts (one bucket of
    96 tokens) and rollout loop. The checked traces run to 190 tokens (15 shapes, an empty-cell
    question), so responses get 224; 300 held-out problems (60 per level)."""
    for block in (c.warmup, c.adacs):
        block.sft.update(max_response_len=224, length_buckets=(112, 224))
        block.eval.max_response_len = 224
    c.adacs.pass_rate.max_new_tokens = 224
    r = c.aepo
    r.rollout.update(max_response_len=224, length_buckets=(112, 224), prompts_per_iter=8)
    # 20 updates of 8 prompts x 8 rollouts: more updates in the budget than 16-prompt batches.
    r.train.update(steps=20, prompts_per_step=8)
    r.eval.max_response_len = 224
    c.eval.update(test_size=300, max_response_len=224)


def _arms(value) -> None:
    if not isinstance(value, tuple | list) or not value:
        raise ValueError(f"must be a non-empty list of arms ({', '.join(ARM_NAMES)}).")
    unknown = [a for a in value if a not in ARM_NAMES]
    if unknown or len(set(value)) != len(value):
        raise ValueError(
            f"has unknown or repeated arms {list(value)}; known: {', '.join(ARM_NAMES)}."
        )


def _seeds(value) -> None:
    if (
        not isinstance(value, tuple | list)
        or not value
        or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in value)
        or len(set(value)) != len(value)
    ):
        raise ValueError(f"must be distinct non-negative integers, got {value!r}.")


def validate(c: ml_collections.ConfigDict) -> None:
    """The pipeline's validation of each block, then the arms and seeds."""
    pipeline.validate(c)
    for key, check in (("arms", _arms), ("seeds", _seeds)):
        try:
            check(c[key])
        except ValueError as e:
            raise ValueError(f"config.{key} {e}") from None
