"""ARES in JAX: difficulty-aware token-level entropy shaping for multimodal reasoning."""
