r"""The whole ARES pipeline on the embedded synthetic task: warm-up, AdaCS, AEPO, evaluation.

Each stage is the real one, with its own config (the nested `warmup`, `adacs` and `aepo` blocks
are configs/adacs.py and configs/aepo.py); the pipeline only chains their checkpoints:
  1. warm-up: configs/adacs.py with curation off, a short fine-tune of the randomly initialised
     small model on the teacher's traces, which gives the base model;
  2. AdaCS from the base: pass rates of the base model, length-targeted curation, fine-tuning;
  3. AEPO from the AdaCS model;
  4. the base, AdaCS and AEPO models on held-out problems: accuracy and mean response length per
     difficulty level (the layout of the paper's Table 4), and plots of the AEPO run.

  python -m ares_jax.main --config=configs/pipeline.py --workdir=/tmp/ares_pipeline
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
    c.warmup = adacs.get_config(sub).copy_and_resolve_references()
    c.warmup.curation.enabled = False
    c.warmup.sft.max_steps = 4 if sub else 60
    c.warmup.sft.epochs = 8
    c.warmup.eval.max_examples = 4 if sub else 32
    c.warmup.seed = 1  # problems of the warm-up differ from AdaCS's
    c.adacs = adacs.get_config(sub).copy_and_resolve_references()
    c.aepo = aepo.get_config(sub).copy_and_resolve_references()
    c.eval = dict(
        test_size=8 if sub else 128,  # held-out problems of the synthetic test split
        temperature=0.0,  # greedy
        max_response_len=c.aepo.eval.max_response_len,
    )
    return c.lock()


def validate(c: ml_collections.ConfigDict) -> None:
    """Each stage's own validation; keys are reported with their block (warmup., adacs., aepo.)."""
    for name, module in (("warmup", adacs), ("adacs", adacs), ("aepo", aepo)):
        try:
            module.validate(c[name])
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
