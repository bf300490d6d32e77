"""The rollout sampler: batched generation with exact per-token entropies (sampler.py)."""

from ares_jax.sampling.sampler import (
    INACTIVE,
    LENGTH,
    STOP,
    BranchingParams,
    GenerateOutput,
    SamplingParams,
    generate,
)

__all__ = [
    "INACTIVE",
    "LENGTH",
    "STOP",
    "BranchingParams",
    "GenerateOutput",
    "SamplingParams",
    "generate",
]
