"""What every benchmark prints and records: the card, sizes, and its entry in RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from pathlib import Path

import jax


def card() -> str:
    """The device the numbers come from: the accelerator's kind, or the CPU and its cores."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"CPU {platform.machine()}, {os.cpu_count()} cores"
    return f"{jax.device_count()} x {getattr(dev, 'device_kind', dev.platform)}"


def gib(x) -> str:
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def record(name: str, preset: str, text: str) -> Path:
    """Appends a result table to benchmarks/RESULTS.md with the date, git commit and command."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    entry = (
        f"\n## {name}, {datetime.date.today()}, git {commit}\n\n"
        f"Command: `python -m benchmarks.{name} --preset={preset}`\n\n{text}\n"
    )
    path = Path(__file__).with_name("RESULTS.md")
    with path.open("a") as f:
        f.write(entry)
    return path


def hf_model(cfg, dtype: str):
    """(transformers Qwen2_5_VLForConditionalGeneration with SDPA attention, random weights, on
    the GPU when torch sees one, else the CPU; its device name) for a project model config."""
    import torch
    import transformers

    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(dtype=dtype))
    hf_cfg._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(
            hf_cfg, dtype=torch_dtype
        )
    return model, device


def torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, *args, iters: int) -> float:
    """Seconds per call of `fn(*args)` over `iters` calls, after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters
