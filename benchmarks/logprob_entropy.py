r"""Learner head: target log-prob + full-vocabulary entropy, forward and backward.

Compares, on the same inputs and the same machine:
  * ours:  `token_logprobs_and_entropy` (sequence-chunked, optional vocabulary blocks, custom VJP);
  * dense: JAX log_softmax over the full [B, T, V] float32 logits with plain autodiff;
  * torch: the PyTorch way users of Hugging Face stacks compute it (logits = hidden @ W in float32,
    log_softmax, gather, entropy; autograd), when torch is installed.

Each variant computes d/d(hidden, unembed) of sum(logp) + sum(entropy). Memory for the JAX
variants is XLA's compiled memory analysis (temp buffers: what the computation needs on top of its
inputs and outputs); on a GPU the device's peak bytes in use is printed too, and torch reports
torch.cuda.max_memory_allocated.

  python -m benchmarks.logprob_entropy --preset=cpu            # small size, this CPU
  python -m benchmarks.logprob_entropy --preset=gpu            # B=8 T=2048 D=2048 V=151936 bf16
  python -m benchmarks.logprob_entropy --preset=cpu --record   # also append to RESULTS.md

Floor (count it before reading the numbers): dense does 3 vocabulary matmuls of 2*B*T*D*V FLOPs
each (forward logits, d hidden, d unembed); ours does 4 (the backward recomputes the logits).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from ares_jax.ops.entropy import dense_logprobs_and_entropy, token_logprobs_and_entropy
from benchmarks import report

PRESETS = {
    "cpu": dict(batch=2, seq=512, width=256, vocab=32768, dtype="float32", chunk=128, vchunk=0),
    "gpu": dict(batch=8, seq=2048, width=2048, vocab=151936, dtype="bfloat16", chunk=256, vchunk=0),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_BATCH = flags.DEFINE_integer("batch", None, "B (overrides the preset).")
_SEQ = flags.DEFINE_integer("seq", None, "T (overrides the preset).")
_WIDTH = flags.DEFINE_integer("width", None, "D (overrides the preset).")
_VOCAB = flags.DEFINE_integer("vocab", None, "V (overrides the preset).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Input dtype.")
_CHUNK = flags.DEFINE_integer("chunk", None, "Positions per chunk of our kernel.")
_VCHUNK = flags.DEFINE_integer("vchunk", None, "Vocabulary block of our kernel (0 = none).")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations (after one warm-up).")
_TORCH = flags.DEFINE_bool("torch", True, "Also run the PyTorch peer when torch is installed.")
_RECORD = flags.DEFINE_bool("record", False, "Append the result table to benchmarks/RESULTS.md.")


def _time(fn, *args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def _jax_variant(name, fn, h, w, y, iters):
    def loss(h, w):
        logp, ent = fn(h, w, y)
        return jnp.sum(logp) + jnp.sum(ent)

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    compiled = step.lower(h, w).compile()
    mem = compiled.memory_analysis()
    seconds = _time(compiled, h, w, iters=iters)
    peak = None
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        peak = stats["peak_bytes_in_use"]
    return dict(name=name, seconds=seconds, temp=mem.temp_size_in_bytes, peak=peak)


def _torch_variant(h, w, y, iters):
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if h.dtype == jnp.bfloat16 else torch.float32
    th = torch.from_numpy(np.array(h, np.float32)).to(device, dtype).requires_grad_()
    tw = torch.from_numpy(np.array(w, np.float32)).to(device, dtype).requires_grad_()
    ty = torch.from_numpy(np.array(y, np.int64)).to(device)

    def step():
        th.grad = tw.grad = None
        logits = (th @ tw).float()
        log_p = torch.log_softmax(logits, dim=-1)
        logp = log_p.gather(-1, ty[..., None])[..., 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        (logp.sum() + ent.sum()).backward()

    step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(name=f"torch {torch.__version__} ({device})", seconds=seconds, temp=None, peak=peak)


def main(argv):
    del argv
    cfg = dict(PRESETS[_PRESET.value])
    for key, flag in [
        ("batch", _BATCH),
        ("seq", _SEQ),
        ("width", _WIDTH),
        ("vocab", _VOCAB),
        ("dtype", _DTYPE),
        ("chunk", _CHUNK),
        ("vchunk", _VCHUNK),
    ]:
        if flag.value is not None:
            cfg[key] = flag.value
    b, t, d, v = cfg["batch"], cfg["seq"], cfg["width"], cfg["vocab"]
    dtype = jnp.bfloat16 if cfg["dtype"] == "bfloat16" else jnp.float32
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(b, t, d)), dtype)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    y = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    vchunk = cfg["vchunk"] or None

    def ours(h, w, y):
        return token_logprobs_and_entropy(h, w, y, chunk_size=cfg["chunk"], vocab_chunk_size=vchunk)

    rows = [
        _jax_variant(
            f"ours (chunk {cfg['chunk']}, vocab block {vchunk})", ours, h, w, y, _ITERS.value
        ),
        _jax_variant("dense JAX log_softmax", dense_logprobs_and_entropy, h, w, y, _ITERS.value),
    ]
    if _TORCH.value:
        peer = _torch_variant(h, w, y, _ITERS.value)
        if peer is not None:
            rows.append(peer)
    flops_dense = 3 * 2 * b * t * d * v
    header = f"B={b} T={t} D={d} V={v} {cfg['dtype']}; {report.card()}; jax {jax.__version__}"
    lines = [
        header,
        "",
        "| variant | time (ms) | tokens/s | TFLOP/s (dense-equivalent) | XLA temp | device peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['seconds'] * 1e3:.1f} | {b * t / r['seconds']:,.0f} | "
            f"{flops_dense / r['seconds'] / 1e12:.3f} | {report.gib(r['temp'])} | "
            f"{report.gib(r['peak'])} |"
        )
    ours_row, dense_row = rows[0], rows[1]
    lines.append("")
    lines.append(
        f"ours / dense: time {ours_row['seconds'] / dense_row['seconds']:.2f}x, "
        f"XLA temp memory {ours_row['temp'] / dense_row['temp']:.3f}x"
    )
    if len(rows) > 2:
        lines.append(f"ours / torch: time {ours_row['seconds'] / rows[2]['seconds']:.2f}x")
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        print(f"appended to {report.record('logprob_entropy', _PRESET.value, text)}")


if __name__ == "__main__":
    app.run(main)
