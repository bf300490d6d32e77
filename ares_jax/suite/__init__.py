"""The paper's evaluation suite: benchmark adapters, grading by answer kind, the benchmarks'
metrics, resumable evaluation and the report in the layout of the paper's tables.

  items.py     Item (one problem as graded) and the readers adapters use
  grading.py   answer extraction (ARES's last box, with a documented fallback) and comparison
  metrics.py   accuracy / avg@k, DynaMath's worst case
  registry.py  the benchmarks, their adapters and the paper's numbers
  adapters/    one module per benchmark (released layouts -> Items)
  run.py       evaluation of a model on benchmarks, resumable; the report
"""
