"""Benchmark adapters: released layouts -> `suite.items.Item` (registry.py lists them)."""
