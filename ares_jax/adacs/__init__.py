"""AdaCS, stage 1 of ARES: the difficulty-aware cold start (METHOD.md 3)."""
