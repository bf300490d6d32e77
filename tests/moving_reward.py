"""AEPO overrides under which an iteration of the random tiny model really moves its weights.

On the random tiny model every answer is wrong, and the default entropy reward is then the same for
every response of a group: zero advantages and a gradient of rounding noise, which any two runs
would "match". Counting every high-entropy window (tau at the median) and a low hard-bucket target
make the entropy reward differ within a group; the online filter is off, since such small rewards
can fall below its lower bound. No evaluation, so tau comes from the first batch and only the
iteration is compared. Seed 1: the first iteration's draws give HWE counts that differ within a
group (seed 0's happen not to: a gradient of exactly 0). Used by the tests that compare a sharded
or multi-process run with one device.
"""

MOVING_REWARD = (
    "--config.entropy.hwe_count=paper_window",
    "--config.entropy.percentile=50",
    "--config.reward.target_scale=(1.0,1.0,0.1)",
    "--config.filter.enabled=False",
    "--config.eval.every_steps=0",
    "--config.eval.val_before_train=False",
    "--config.entropy.threshold_init=first_batch",
    "--config.seed=1",
)
