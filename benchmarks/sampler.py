r"""Rollout throughput: `ares_jax.sampling.generate` against transformers' `generate`.

Same model config, random weights, B prompts of P random tokens, T new tokens, sampling at
temperature 1 with no early stop (no stop tokens on our side; min_new_tokens = T on the peer's),
so both produce exactly B * T tokens. Ours includes the prefill and the exact full-vocabulary
entropy of every position; transformers computes neither entropy nor log-probs.

  python -m benchmarks.sampler --preset=cpu              # the 'small' model on this CPU
  python -m benchmarks.sampler --preset=gpu              # 3B shape, bf16, 64 x 512 + 512 new
  python -m benchmarks.sampler --preset=cpu --record     # also append to RESULTS.md

RL lengths (`--preset=cpu_rl`, `--preset=gpu_rl`): n samples of each prompt at the paper's
top_p=0.99, stopped by an end token whose logit bias gives each step the same chance of ending,
calibrated on the prompts' first-step logits so that the median response has `median` tokens
(geometric lengths, capped at `new`). Printed side by side, in one run: useful tokens/s (tokens of
the responses, up to their end) of the continuous-batching engine over paged pages
(`EngineParams`, `slots` rows at once), of the static loop run as the rollout runs it (calls of
`slots` rows, each until its longest row ends), and of transformers' `generate` in calls of
`slots` rows with the same bias, top-p and end token; the share of the bandwidth floor of the
useful tokens; and how many rows the two JAX paths generated identically (they draw with the
same keys; paged and dense attention differ by float rounding, which can flip a token).

The bandwidth floor: a decode step must read the text weights (embedding rows aside, the LM head
included) and the KV cache written so far; at the bandwidth measured on this device by a large
elementwise copy, that many bytes take `floor` seconds per step. The share of the floor is
floor * T / (our decode time).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import params, text
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.sampling import SamplingParams, generate
from ares_jax.sampling.engine import EngineParams
from benchmarks import report

PRESETS = {
    "cpu": dict(model="small", batch=8, prompt=64, new=64, dtype="float32"),
    "gpu": dict(model="3b", batch=64, prompt=512, new=512, dtype="bfloat16"),
    # RL lengths: `batch` prompts x n samples, geometric lengths of median `median`, cap `new`.
    "cpu_rl": dict(
        model="small",
        batch=32,
        n=4,
        prompt=64,
        new=1024,
        median=80,
        slots=32,
        page=64,
        dtype="float32",
    ),
    "gpu_rl": dict(
        model="3b",
        batch=16,
        n=4,
        prompt=512,
        new=4096,
        median=800,
        slots=32,
        page=128,
        dtype="bfloat16",
    ),
}

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_MODEL = flags.DEFINE_string("model", None, "Model preset (tiny, small, 3b, 7b).")
_BATCH = flags.DEFINE_integer("batch", None, "B prompts (one sample each).")
_PROMPT = flags.DEFINE_integer("prompt", None, "P prompt tokens.")
_NEW = flags.DEFINE_integer("new", None, "T new tokens.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute and param dtype.")
_ATTN = flags.DEFINE_enum(
    "attention", "auto", list(text.IMPLEMENTATIONS), "model.attention (the model's attention_impl)."
)
_ITERS = flags.DEFINE_integer("iters", 2, "Timed runs after one warm-up.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the transformers peer when torch is installed.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")


def _bandwidth() -> float:
    """Bytes per second of a large elementwise copy (read + write) on the default device."""
    n = 64 * 2**20 if jax.devices()[0].platform == "cpu" else 1024 * 2**20
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: x * 1.0001)
    jax.block_until_ready(f(x))
    start = time.perf_counter()
    for _ in range(5):
        y = f(x)
    jax.block_until_ready(y)
    return 2 * 4 * n * 5 / (time.perf_counter() - start)


def _floor_bytes(cfg, dtype_bytes, batch, prompt, new) -> float:
    """Average bytes one decode step reads: text weights plus the mean KV cache."""
    t = cfg.text
    per_layer = t.hidden_size * (
        t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        + 3 * t.intermediate_size
    )
    weights = (t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size) * dtype_bytes
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes
    mean_len = prompt + new / 2
    return weights + batch * mean_len * kv_per_token


def _prompts(cfg, batch, prompt):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, min(cfg.text.vocab_size, 500), (batch, prompt)).astype(np.int32)
    pos = np.broadcast_to(np.arange(prompt, dtype=np.int32)[None, None], (3, batch, prompt))
    return ModelInputs(ids, np.ones((batch, prompt), bool), pos)


def ours(cfg, p, dtype, iters):
    model = params.init_model(cfg, param_dtype=dtype, dtype=dtype, attention_impl=_ATTN.value)
    graphdef, state = nnx.split(model)
    inputs = _prompts(cfg, p["batch"], p["prompt"])
    sp = SamplingParams(n=1, max_new_tokens=p["new"], temperature=1.0)
    # One full run to compile, then timed runs; a second timing with one new token separates
    # the prefill from the decode loop.
    runs = {}
    for new in (1, p["new"]):
        spn = SamplingParams(n=1, max_new_tokens=new, temperature=1.0)
        generate(graphdef, state, inputs=inputs, sampling=spn, key=jax.random.PRNGKey(0))
        start = time.perf_counter()
        for i in range(iters):
            out = generate(graphdef, state, inputs=inputs, sampling=spn, key=jax.random.PRNGKey(i))
        runs[new] = (time.perf_counter() - start) / iters
    assert out.mask.all() and sp.max_new_tokens == out.tokens.shape[1]
    return runs[p["new"]], runs[1]


def peer(cfg, p, iters):
    import torch
    import transformers

    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(dtype=p["dtype"]))
    hf_cfg._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype)
    model.eval()
    inputs = _prompts(cfg, p["batch"], p["prompt"])
    ids = torch.tensor(np.asarray(inputs.input_ids, np.int64), device=device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        do_sample=True,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=p["new"],
        min_new_tokens=p["new"],
        pad_token_id=0,
    )

    def run():
        with torch.no_grad():
            out = model.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    run()
    start = time.perf_counter()
    for _ in range(iters):
        out = run()
    assert out.shape[1] == p["prompt"] + p["new"]
    return (time.perf_counter() - start) / iters, f"transformers {transformers.__version__}"


END_TOKEN = 3


def _end_bias(model, inputs, median: int) -> float:
    """The end token's logit bias that ends a step with chance 1 - 2**(-1/median), on average
    over the prompts' first-step distributions (bisection)."""
    z = np.asarray(model(jax.tree.map(jnp.asarray, inputs))[:, -1], np.float64)
    z = z - z.max(-1, keepdims=True)
    target = 1.0 - 2.0 ** (-1.0 / median)

    def chance(b):
        e = np.exp(z)
        e_end = e[:, END_TOKEN] * np.exp(b)
        return float(np.mean(e_end / (e.sum(-1) - e[:, END_TOKEN] + e_end)))

    lo, hi = -30.0, 60.0
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chance(mid) < target else (lo, mid)
    return (lo + hi) / 2


def _rows(inputs: ModelInputs, lo: int, hi: int) -> ModelInputs:
    """Prompts lo .. hi-1 of text-only `inputs`."""
    return ModelInputs(
        inputs.input_ids[lo:hi], inputs.attention_mask[lo:hi], inputs.position_ids[:, lo:hi]
    )


def _static(graphdef, state, inputs, sp, key, slots, cache_len):
    """Today's rollout: calls of `slots` rows (whole prompts), each until its longest row ends."""
    per = max(1, slots // sp.n)
    b = inputs.input_ids.shape[0]
    outs = []
    for first in range(0, b, per):
        part = _rows(inputs, first, first + per)
        outs.append(
            generate(
                graphdef,
                state,
                inputs=part,
                sampling=sp,
                key=key,
                cache_len=cache_len,
                first_prompt=first,
            )
        )
    return outs


def _hf_rl(cfg, p, sp, bias, inputs):
    """transformers' generate in calls of `slots` rows: (seconds, useful tokens, name)."""
    import torch
    import transformers

    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf_dict(dtype=p["dtype"]))
    hf_cfg._attn_implementation = "sdpa"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if p["dtype"] == "bfloat16" else torch.float32
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(hf_cfg, dtype=dtype)
    model.eval()
    ids = torch.tensor(np.asarray(inputs.input_ids, np.int64), device=device)
    per = max(1, p["slots"] // sp.n)
    kwargs = dict(
        do_sample=True,
        temperature=1.0,
        top_p=sp.top_p,
        top_k=0,
        max_new_tokens=sp.max_new_tokens,
        num_return_sequences=sp.n,
        eos_token_id=END_TOKEN,
        pad_token_id=0,
        sequence_bias={(END_TOKEN,): bias},
    )
    useful = 0
    with torch.no_grad():
        model.generate(ids[:per], attention_mask=torch.ones_like(ids[:per]), **kwargs)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for first in range(0, ids.shape[0], per):
            part = ids[first : first + per]
            out = model.generate(part, attention_mask=torch.ones_like(part), **kwargs)
            new = out[:, part.shape[1] :].cpu().numpy()
            ended = new == END_TOKEN
            useful += int(np.where(ended.any(1), ended.argmax(1) + 1, new.shape[1]).sum())
        if device == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start, useful, f"transformers {transformers.__version__}"


def _rl_floor(cfg, dtype_bytes, lengths, prompt, slots, bandwidth) -> float:
    """Seconds the useful tokens take at the bandwidth floor: the weights read once per step of
    `slots` rows, and each token's keys and values read once per later step of its row."""
    t = cfg.text
    per_layer = t.hidden_size * (
        t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        + 3 * t.intermediate_size
    )
    weights = (t.num_hidden_layers * per_layer + t.hidden_size * t.vocab_size) * dtype_bytes
    kv_per_token = t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * dtype_bytes
    steps = np.ceil(lengths.sum() / slots)
    kv_reads = float(np.sum(lengths * prompt + lengths * (lengths - 1) / 2))
    return (steps * weights + kv_reads * kv_per_token) / bandwidth


def rl(p):
    cfg = model_config.preset(p["model"])
    dtype = jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
    model = params.init_model(cfg, param_dtype=dtype, dtype=dtype, attention_impl=_ATTN.value)
    graphdef, state = nnx.split(model)
    inputs = _prompts(cfg, p["batch"], p["prompt"])
    bias = _end_bias(model, inputs, p["median"])
    sp = SamplingParams(
        n=p["n"],
        max_new_tokens=p["new"],
        temperature=1.0,
        top_p=0.99,
        stop_token_ids=(END_TOKEN,),
        logit_bias=((END_TOKEN, bias),),
    )
    ep = EngineParams(slots=p["slots"], page_size=p["page"], chunk_steps=32, prefill_prompts=4)
    key = jax.random.PRNGKey(0)
    cache_len = p["prompt"] + p["new"]
    per = max(1, p["slots"] // sp.n)
    # Compile both on a part of the prompts (the same shapes), then time one full run each.
    head = _rows(inputs, 0, per)
    _static(graphdef, state, head, sp, key, p["slots"], cache_len)
    generate(graphdef, state, inputs=head, sampling=sp, key=key, engine=ep)
    start = time.perf_counter()
    static = _static(graphdef, state, inputs, sp, key, p["slots"], cache_len)
    static_s = time.perf_counter() - start
    start = time.perf_counter()
    paged = generate(graphdef, state, inputs=inputs, sampling=sp, key=key, engine=ep)
    paged_s = time.perf_counter() - start
    static_len = np.concatenate([o.lengths for o in static])
    static_tokens = np.concatenate([o.tokens for o in static])
    row_steps = sum(o.lengths.size * o.lengths.max() for o in static)
    same = int(np.sum(np.all(static_tokens == paged.tokens, axis=1)))
    useful_static, useful_paged = int(static_len.sum()), int(paged.lengths.sum())
    bandwidth = _bandwidth()
    floor = _rl_floor(
        cfg, 2 if p["dtype"] == "bfloat16" else 4, paged.lengths, p["prompt"], p["slots"], bandwidth
    )
    lengths = paged.lengths
    lines = [
        f"model {p['model']} ({p['dtype']}), {p['batch']} prompts x {p['n']} samples, prompt "
        f"{p['prompt']} tokens, responses up to {p['new']}, top_p 0.99, end-token bias {bias:.2f} "
        f"(median {p['median']} intended); {p['slots']} rows at once; {report.card()}; "
        f"jax {jax.__version__}",
        "",
        f"response lengths: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
        f"p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, at the cap "
        f"{int(np.sum(lengths >= p['new']))}; the static loop's useful row-steps: "
        f"{useful_static / row_steps:.0%}",
        "",
        "| implementation | time | useful tokens | useful tokens/s | share of the floor |",
        "|---|---|---|---|---|",
        f"| ares_jax engine (paged, continuous batching, page {p['page']}) | {paged_s:.2f} s | "
        f"{useful_paged:,} | {useful_paged / paged_s:,.0f} | {floor / paged_s:.1%} |",
        f"| ares_jax static loop (calls of {p['slots']} rows) | {static_s:.2f} s | "
        f"{useful_static:,} | {useful_static / static_s:,.0f} | {floor / static_s:.1%} |",
    ]
    if _TORCH.value:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            hf_s, hf_useful, name = _hf_rl(cfg, p, sp, bias, inputs)
            lines.append(
                f"| {name} generate (calls of {p['slots']} rows) | {hf_s:.2f} s | {hf_useful:,} | "
                f"{hf_useful / hf_s:,.0f} | |"
            )
    ratio = (useful_paged / paged_s) / (useful_static / static_s)
    lines += [
        "",
        f"engine / static loop: {ratio:.2f}x useful tokens/s; rows identical in both: {same} of "
        f"{lengths.size}; measured bandwidth {bandwidth / 1e9:.1f} GB/s",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    p = dict(PRESETS[_PRESET.value])
    for key, flag in dict(
        model=_MODEL, batch=_BATCH, prompt=_PROMPT, new=_NEW, dtype=_DTYPE
    ).items():
        if flag.value is not None:
            p[key] = flag.value
    if "median" in p:
        text = rl(p)
        print(text)
        if _RECORD.value:
            print(f"appended to {report.record('sampler', _PRESET.value, text)}")
        return
    for key, flag in dict(
        model=_MODEL, batch=_BATCH, prompt=_PROMPT, new=_NEW, dtype=_DTYPE
    ).items():
        if flag.value is not None:
            p[key] = flag.value
    cfg = model_config.preset(p["model"])
    dtype = jnp.bfloat16 if p["dtype"] == "bfloat16" else jnp.float32
    tokens = p["batch"] * p["new"]
    total, prefill = ours(cfg, p, dtype, _ITERS.value)
    decode = max(total - prefill, 1e-9)
    bandwidth = _bandwidth()
    floor_step = (
        _floor_bytes(
            cfg,
            2 if p["dtype"] == "bfloat16" else 4,
            **{k: p[k] for k in ("batch", "prompt", "new")},
        )
        / bandwidth
    )
    lines = [
        f"model {p['model']} ({p['dtype']}), {p['batch']} prompts x {p['prompt']} tokens, "
        f"{p['new']} new tokens, sampling; {report.card()}; jax {jax.__version__}",
        "",
        "| implementation | total time | new tokens/s | decode ms/step |",
        "|---|---|---|---|",
        f"| ares_jax (exact entropy per token) | {total:.2f} s | {tokens / total:,.0f} | "
        f"{decode / (p['new'] - 1) * 1e3:.2f} |",
    ]
    ratio = None
    if _TORCH.value:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            hf_time, name = peer(cfg, p, _ITERS.value)
            lines.append(f"| {name} generate | {hf_time:.2f} s | {tokens / hf_time:,.0f} | |")
            ratio = hf_time / total
    lines += [
        "",
        f"measured bandwidth {bandwidth / 1e9:.1f} GB/s; floor {floor_step * 1e3:.2f} ms per "
        f"decode step; ares_jax decode at {floor_step * (p['new'] - 1) / decode:.0%} of the floor",
    ]
    if ratio is not None:
        lines.append(f"ares_jax throughput / transformers: {ratio:.2f}x")
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        print(f"appended to {report.record('sampler', _PRESET.value, text)}")


if __name__ == "__main__":
    app.run(main)
