r"""The learner's forward + backward at an RL length distribution: packed rows against padded
rows, and the transformers peer.

N sequences with prompt and response lengths drawn lognormal (the response median 800 tokens,
capped, as RL rollouts are: a long tail up to the response budget), text only. The step is what
the AEPO learner differentiates: the teacher-forced log-prob and the full-vocabulary entropy of
every response token, d(sum logp + sum H) over every parameter (`learner.response_logprobs`).

  * padded (today's layout before packing): each row its prompt left-padded to the prompt bucket
    and its response padded to the response bucket, [N, P + T];
  * packed (train.pack_tokens): the sequences end to end without padding in one row of
    `pack_bucket` tokens, segment ids for the attention, the head on the packed positions;
  * transformers: `Qwen2_5_VLForConditionalGeneration` (SDPA) on the padded rows, float32
    log_softmax over its logits, autograd; on `--peer_rows` of the sequences (the whole batch
    does not fit its [rows, T, V] logits and [rows, heads, T, T] scores at RL lengths).

Throughput counts real tokens (prompt + response, no padding) per second; memory is XLA's
compiled temporaries for ours and torch.cuda.max_memory_allocated for the peer on a GPU.

  python -m benchmarks.learner --preset=cpu            # the 'small' model, responses <= 4096
  python -m benchmarks.learner --preset=gpu            # the 3B shape in bf16, responses <= 16384
  python -m benchmarks.learner --preset=cpu --record   # also append to RESULTS.md
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ares_jax import batching as B
from ares_jax.aepo import learner as Lr
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import params
from benchmarks import report

PRESETS = {
    "cpu": dict(
        model="small", rows=16, prompt_median=256, prompt_cap=512, response_cap=4096,
        dtype="float32", remat=False, peer_rows=4,
    ),
    "gpu": dict(
        model="3b", rows=8, prompt_median=512, prompt_cap=4096, response_cap=16384,
        dtype="bfloat16", remat=True, peer_rows=2,
    ),
}  # fmt: skip

_PRESET = flags.DEFINE_enum("preset", "cpu", list(PRESETS), "Size preset.")
_ITERS = flags.DEFINE_integer("iters", 2, "Timed iterations after one warm-up.")
_TORCH = flags.DEFINE_bool("torch", True, "Run the transformers peer when torch is installed.")
_RECORD = flags.DEFINE_bool("record", False, "Append the table to benchmarks/RESULTS.md.")
RESPONSE_MEDIAN, SIGMA = 800, 1.0


def _lengths(rng, n, median, cap):
    return np.clip(np.round(rng.lognormal(np.log(median), SIGMA, n)), 16, cap).astype(int)


def _bucket(n, cap):
    """The response (or prompt) bucket the stages would pad to: powers of two up to the cap."""
    return min(max(B.pow2(n), 256), cap)


def _data(cfg, p):
    """Prompts (left-padded to their bucket) and rows of one response each."""
    rng = np.random.default_rng(0)
    n = p["rows"]
    plen = _lengths(rng, n, p["prompt_median"], p["prompt_cap"])
    rlen = _lengths(rng, n, RESPONSE_MEDIAN, p["response_cap"])
    pb, tb = _bucket(plen.max(), p["prompt_cap"]), _bucket(rlen.max(), p["response_cap"])
    ids = np.full((n, pb), cfg.pad_token_id, np.int32)
    mask = np.zeros((n, pb), bool)
    for i, k in enumerate(plen):
        ids[i, pb - k :] = rng.integers(10, cfg.text.vocab_size, k)
        mask[i, pb - k :] = True
    pos = np.broadcast_to(np.where(mask, np.cumsum(mask, 1) - 1, 0), (3, n, pb)).astype(np.int32)
    prompts = B.Prompts(ids, mask, pos, plen.astype(np.int32), [], [])
    tokens = rng.integers(10, cfg.text.vocab_size, (n, tb)).astype(np.int32)
    rmask = np.arange(tb)[None] < rlen[:, None]
    rows = B.Rows(
        prompt=np.arange(n),
        tokens=tokens,
        mask=rmask,
        advantages=np.zeros(n, np.float32),
        bucket=np.zeros(n, np.int32),
        correct=np.zeros(n, bool),
        soft_cost=np.zeros(n, np.float32),
        window_mask=np.zeros_like(rmask),
    )
    return prompts, rows, int(plen.sum() + rlen.sum())


_timed = report.timed


def compiled_step(cfg, p, prompts, rows, *, packed: bool, remat):
    """The learner's micro-batch forward + backward (log-probs and entropies of every response
    token, all parameters), compiled: (compiled, state, micro-batch)."""
    dtype = jnp.dtype(p["dtype"])
    model = params.init_model(cfg, param_dtype=dtype, dtype=dtype, remat=remat)
    graphdef, state = nnx.split(model)
    n = p["rows"]
    lb = B.learner_batch(
        prompts, rows, cfg, micro_batch_size=n, num_micro=1, pack_rows=1 if packed else None
    )
    lb = jax.tree.map(lambda x: jnp.asarray(x[0]), lb)  # the one micro-batch
    s = Lr.LearnerSettings(prompt_len=prompts.ids.shape[1], chunk_size=256)

    def loss(state, lb):
        m = nnx.merge(graphdef, state)
        logp, ent = Lr.response_logprobs(m, lb.inputs, lb.tokens, s, lb.packing)
        return jnp.sum(jnp.where(lb.mask, logp + ent, 0.0))

    return jax.jit(jax.value_and_grad(loss)).lower(state, lb).compile(), state, lb


def ours(cfg, p, prompts, rows, *, packed: bool, iters: int):
    compiled, state, lb = compiled_step(cfg, p, prompts, rows, packed=packed, remat=p["remat"])
    temp = compiled.memory_analysis().temp_size_in_bytes
    seconds = _timed(compiled, state, lb, iters=iters)
    return dict(seconds=seconds, temp=temp, tokens=int(lb.inputs.input_ids.size))


def peer(cfg, p, prompts, rows, iters):
    import torch

    model, device = report.hf_model(cfg, p["dtype"])
    k = p["peer_rows"]
    ids = np.concatenate([prompts.ids[:k], rows.tokens[:k]], 1)
    mask = np.concatenate([prompts.mask[:k], rows.mask[:k]], 1)
    ids_t = torch.tensor(ids, device=device, dtype=torch.long)
    mask_t = torch.tensor(mask.astype(np.int64), device=device)
    resp = torch.tensor(rows.mask[:k], device=device)
    targets = torch.tensor(rows.tokens[:k], device=device, dtype=torch.long)
    pb = prompts.ids.shape[1]

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids_t, attention_mask=mask_t).logits[:, pb - 1 : -1].float()
        log_p = torch.log_softmax(logits, dim=-1)
        logp = log_p.gather(-1, targets[..., None])[..., 0]
        ent = -(log_p.exp() * log_p).sum(-1)
        (torch.where(resp, logp + ent, 0.0).sum()).backward()

    step()
    report.torch_sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    report.torch_sync(device)
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    real = int(prompts.mask[:k].sum() + rows.mask[:k].sum())
    return dict(seconds=seconds, real=real, peak=peak, device=device, tokens=ids.size)


def main(argv):
    del argv
    p = PRESETS[_PRESET.value]
    cfg = model_config.preset(p["model"])
    prompts, rows, real = _data(cfg, p)
    n, pb, tb = p["rows"], prompts.ids.shape[1], rows.tokens.shape[1]
    lines = [
        f"{n} sequences, model {p['model']} ({p['dtype']}, remat {p['remat']}); prompts "
        f"lognormal median {p['prompt_median']} <= {p['prompt_cap']}, responses median "
        f"{RESPONSE_MEDIAN} <= {p['response_cap']} (sigma {SIGMA}); {real} real tokens; padded "
        f"to [{n}, {pb} + {tb}]",
        "",
        "| layout | implementation | tokens computed | real tokens/s | step (s) | XLA temp (GiB) "
        "| peak (GiB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    results = {}
    for name, packed in (("padded", False), ("packed", True)):
        r = ours(cfg, p, prompts, rows, packed=packed, iters=_ITERS.value)
        results[name] = r
        lines.append(
            f"| {name} | ares_jax | {r['tokens']} | {real / r['seconds']:.0f} | "
            f"{r['seconds']:.3f} | {report.gib(r['temp'])} | |"
        )
    if _TORCH.value:
        try:
            import torch  # noqa: F401
        except ImportError:
            lines.append("| padded | transformers | not run: torch is not installed | | | | |")
        else:
            r = peer(cfg, p, prompts, rows, _ITERS.value)
            results["peer"] = r
            peak = report.gib(r["peak"]) if r["peak"] else "n/a"
            lines.append(
                f"| padded, first {p['peer_rows']} rows | transformers ({r['device']}) | "
                f"{r['tokens']} | {r['real'] / r['seconds']:.0f} | {r['seconds']:.3f} | | "
                f"{peak} |"
            )
    speed = results["padded"]["seconds"] / results["packed"]["seconds"]
    lines.append("")
    lines.append(
        f"packed / padded: {speed:.2f}x real tokens/s, "
        f"{results['padded']['temp'] / max(results['packed']['temp'], 1):.2f}x less XLA temp"
    )
    if "peer" in results:
        ours_rate = real / results["packed"]["seconds"]
        peer_rate = results["peer"]["real"] / results["peer"]["seconds"]
        lines.append(f"packed / transformers: {ours_rate / peer_rate:.2f}x real tokens/s")
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        report.record("learner", _PRESET.value, text)


if __name__ == "__main__":
    app.run(main)
