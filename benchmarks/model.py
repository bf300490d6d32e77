r"""Qwen2.5-VL learner step and vision tower: ares_jax against Hugging Face transformers.

Two measurements, each on the same config, the same machine, random weights:

  * text forward + backward as the RL learner does it: hidden states of B x T tokens, the
    target log-prob and the full-vocabulary entropy of every position, d(sum logp + sum H) with
    respect to every parameter. Ours: the Flax model and the chunked `token_logprobs_and_entropy`.
    Peer: `Qwen2_5_VLForConditionalGeneration` (SDPA attention), float32 log_softmax over its
    logits, autograd.
  * the vision tower forward on N square images (ours: the packed window layout; peer:
    `model.model.get_image_features`).

  python -m benchmarks.model --preset=cpu               # the 'small' model on this CPU
  python -m benchmarks.model --preset=gpu               # the 3B shape in bf16: B=8 T=2048,
                                                        # 16 images of 448x448
  python -m benchmarks.model --preset=cpu --record      # also append to RESULTS.md

Memory: XLA's compiled memory analysis for ours (arguments + outputs + temporaries, the bytes the
step needs), the device's peak bytes in use where the backend reports it, and
torch.cuda.max_memory_allocated for the peer. Floor: 6 N T FLOPs for the text step (N
parameters of the text model, T tokens), plus 4 x 2 T D V for the head.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import params, text
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.ops.entropy import token_logprobs_and_entropy
from benchmarks import report

PRESETS = {
    "cpu": dict(
        model="small",
        batch=2,
        seq=256,
        images=4,
        image_size=224,
        dtype="float32",
        chunk=128,
        remat=False,
    ),
    "gpu": dict(
        model="3b",
        batch=8,
        seq=2048,
        images=16,
        image_size=448,
        dtype="bfloat16",
        chunk=256,
        remat=True,
    ),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_MODEL = flags.DEFINE_string("model", None, "Model preset (tiny, small, 3b, 7b).")
_BATCH = flags.DEFINE_integer("batch", None, "B.")
_SEQ = flags.DEFINE_integer("seq", None, "T.")
_IMAGES = flags.DEFINE_integer("images", None, "Images for the vision tower.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Side of the square images, pixels.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and param dtype.")
_CHUNK = flags.DEFINE_integer("chunk", None, "Sequence chunk of the log-prob kernel.")
_REMAT = flags.DEFINE_bool("remat", None, "Rematerialise each layer in the backward pass.")
_ATTN = flags.DEFINE_enum(
    "attention", "auto", list(text.IMPLEMENTATIONS), "model.attention (the model's attention_impl)."
)
_ITERS = flags.DEFINE_integer("iters", 3, "Timed iterations after one warm-up.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the transformers peer when torch is installed.")
_SKIP_VISION = flags.DEFINE_bool("skip_vision", False, "Only the text step.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")


_timed = report.timed


def _device_peak():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def ours_text(cfg, batch, seq, dtype, chunk, remat, attention, iters):
    model = params.init_model(
        cfg, param_dtype=dtype, dtype=dtype, remat=remat, attention_impl=attention
    )
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.text.vocab_size, (batch, seq)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32)[None, None], (3, batch, seq))
    inputs = ModelInputs(ids, jnp.ones((batch, seq), bool), pos)
    targets = jnp.roll(ids, -1, axis=1)

    def loss(state):
        m = nnx.merge(graphdef, state)
        hidden = m.hidden_states(inputs)
        logp, ent = token_logprobs_and_entropy(hidden, m.unembed(), targets, chunk_size=chunk)
        return jnp.sum(logp) + jnp.sum(ent)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(state).compile()
    mem = compiled.memory_analysis()
    seconds = _timed(compiled, state, iters=iters)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    return dict(seconds=seconds, xla=total, temp=mem.temp_size_in_bytes, peak=_device_peak())


def _images(n, size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def _pixels(cfg, n, size):
    from ares_jax.models.qwen2_5_vl.processor import preprocess_image

    pix, grids = zip(
        *[
            preprocess_image(im, min_pixels=size * size, max_pixels=size * size)
            for im in _images(n, size)
        ],
        strict=True,
    )
    return np.concatenate(pix), np.asarray(grids)


def ours_vision(cfg, n, size, dtype, attention, iters):
    model = params.init_model(cfg, param_dtype=dtype, dtype=dtype, attention_impl=attention)
    graphdef, state = nnx.split(model)
    pixels, grids = _pixels(cfg, n, size)
    tokens = int(np.prod(grids, axis=1).sum()) // 4
    row = [cfg.vision_start_token_id] + [cfg.image_token_id] * tokens + [cfg.vision_end_token_id]
    ids = np.asarray([row])
    inp = model_inputs.from_hf(cfg, ids, None, pixels, grids)
    vision = jax.tree.map(jnp.asarray, inp.vision)
    fn = jax.jit(lambda s, v: nnx.merge(graphdef, s).image_features(v))
    seconds = _timed(fn, state, vision, iters=iters)
    return dict(seconds=seconds, peak=_device_peak())


# ---------------------------------------------------------------------------------------------
# The transformers peer
# ---------------------------------------------------------------------------------------------


_hf_model = report.hf_model
_sync = report.torch_sync


def peer_text(cfg, batch, seq, dtype, remat, iters):
    import torch

    model, device = _hf_model(cfg, dtype)
    model.train()
    if remat:
        model.gradient_checkpointing_enable()
    rng = np.random.default_rng(0)
    ids = torch.tensor(rng.integers(0, cfg.text.vocab_size, (batch, seq)), device=device)
    targets = torch.roll(ids, -1, dims=1)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        log_p = torch.log_softmax(logits, dim=-1)
        logp = log_p.gather(-1, targets[..., None])[..., 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        (logp.sum() + ent.sum()).backward()

    step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return dict(seconds=(time.perf_counter() - start) / iters, peak=peak, device=device)


def peer_vision(cfg, n, size, dtype, iters):
    import torch

    model, device = _hf_model(cfg, dtype)
    model.eval()
    pixels, grids = _pixels(cfg, n, size)
    pv = torch.tensor(pixels, device=device, dtype=model.dtype)
    g = torch.tensor(grids, device=device)

    def step():
        with torch.no_grad():
            return model.model.get_image_features(pv, g)

    step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return dict(seconds=(time.perf_counter() - start) / iters)


# ---------------------------------------------------------------------------------------------


def main(argv):
    del argv
    p = dict(PRESETS[_PRESET.value])
    overrides = dict(
        model=_MODEL,
        batch=_BATCH,
        seq=_SEQ,
        images=_IMAGES,
        image_size=_IMAGE_SIZE,
        dtype=_DTYPE,
        chunk=_CHUNK,
        remat=_REMAT,
    )
    for key, flag in overrides.items():
        if flag.value is not None:
            p[key] = flag.value
    cfg = model_config.preset(p["model"])
    dtype = jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
    b, t, iters = p["batch"], p["seq"], _ITERS.value
    tokens = b * t
    t_cfg = cfg.text
    heads = 2 * t_cfg.num_attention_heads + 2 * t_cfg.num_key_value_heads  # q, o, k, v
    n_text = (
        t_cfg.num_hidden_layers
        * t_cfg.hidden_size
        * (t_cfg.head_dim * heads + 3 * t_cfg.intermediate_size)
    )
    flops = 6 * n_text * tokens + 4 * 2 * tokens * t_cfg.hidden_size * t_cfg.vocab_size
    lines = [
        f"model {p['model']} ({p['dtype']}), text B={b} T={t}, remat={p['remat']}, "
        f"attention={_ATTN.value}; {report.card()}; jax {jax.__version__}",
        "",
        "| work | implementation | time | throughput | TFLOP/s | memory |",
        "|---|---|---|---|---|---|",
    ]
    ours = ours_text(cfg, b, t, dtype, p["chunk"], p["remat"], _ATTN.value, iters)
    lines.append(
        f"| text fwd+bwd, logp+entropy | ares_jax | {ours['seconds'] * 1e3:.0f} ms | "
        f"{tokens / ours['seconds']:,.0f} tok/s | {flops / ours['seconds'] / 1e12:.2f} | "
        f"XLA {report.gib(ours['xla'])} (temp {report.gib(ours['temp'])}), "
        f"device peak {report.gib(ours['peak'])} |"
    )
    peer = None
    if _TORCH.value:
        try:
            import torch  # noqa: F401
        except ImportError:
            peer = None
        else:
            peer = peer_text(cfg, b, t, p["dtype"], p["remat"], iters)
            lines.append(
                f"| text fwd+bwd, logp+entropy | transformers ({peer['device']}) | "
                f"{peer['seconds'] * 1e3:.0f} ms | {tokens / peer['seconds']:,.0f} tok/s | "
                f"{flops / peer['seconds'] / 1e12:.2f} | peak {report.gib(peer['peak'])} |"
            )
    if not _SKIP_VISION.value:
        n, size = p["images"], p["image_size"]
        ov = ours_vision(cfg, n, size, dtype, _ATTN.value, iters)
        lines.append(
            f"| vision fwd, {n} x {size}px | ares_jax | {ov['seconds'] * 1e3:.0f} ms | "
            f"{n / ov['seconds']:.1f} img/s | | |"
        )
        if peer is not None:
            pv = peer_vision(cfg, n, size, p["dtype"], iters)
            lines.append(
                f"| vision fwd, {n} x {size}px | transformers | {pv['seconds'] * 1e3:.0f} ms | "
                f"{n / pv['seconds']:.1f} img/s | | |"
            )
            lines.append("")
            lines.append(
                f"ares_jax / transformers time: text {ours['seconds'] / peer['seconds']:.2f}x, "
                f"vision {ov['seconds'] / pv['seconds']:.2f}x"
            )
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        print(f"appended to {report.record('model', _PRESET.value, text)}")


if __name__ == "__main__":
    app.run(main)
