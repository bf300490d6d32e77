r"""Precision of the learner: the log-prob head's unembedding and the reference's copy.

Measures what the two precision switches of configs/aepo.py change, to choose their defaults:
  * train.logprob_head_dtype: the unembedding [D, V] enters the log-prob head as stored
    ('param': float32 master weights, so 3 of the kernel's 4 vocabulary matmuls run in float32)
    or cast to the compute dtype ('compute', as the sampler's logits are);
  * model.reference_dtype: the KL reference's copy of the trainable parameters as stored
    ('param') or in the compute dtype ('compute').

Three tables:
  1. Numbers. A random model (bfloat16 compute, float32 parameters) samples responses; the
     learner recomputes their log-probs and entropies with each head and reference dtype. Columns
     are the largest and mean absolute differences on response tokens against the same model in
     float32 compute ("float32 truth") and against the sampler's own log-probs, the mean k3 KL of
     the policy to a reference at the initial parameters (0 by construction), and the relative
     error of the unembedding's gradient against the float32 truth's. The same at the 3B head's
     width and vocabulary (random hidden states and weights, logits of standard deviation 4).
  2. Bytes of the reference copy, for the 3B and 7B shapes: every trainable parameter (the paper
     presets train the vision tower too), whole and per device on an 8-way FSDP mesh, and of the
     unembedding alone.
  3. XLA's compiled temporaries (memory_analysis) of the head per device at the paper presets'
     sizes (4 rows of 2048 positions a device, chunk 256, bfloat16 hidden states, float32 stored
     unembedding; the 3B head is the transposed tied embedding), forward (log-prob pass) and
     forward + backward (update): on one device, and, where there are more, with FSDP over all
     of them as the learner shards it (the unembedding split on D, gathered for the head); and
     the head's time on this machine at a smaller size.

  python -m benchmarks.precision              # about four minutes on 2 CPU cores
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m benchmarks.precision  # + FSDP
  python -m benchmarks.precision --record     # also append to RESULTS.md

CPU caveat: XLA:CPU has no bfloat16 matrix unit, so the times and temporaries here show what the
cast costs on a CPU, not the speed-up an accelerator's bfloat16 matmuls give.
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
from ares_jax.models.qwen2_5_vl import config, params, tokenizer
from ares_jax.ops import kl as K
from ares_jax.ops.entropy import token_logprobs_and_entropy
from ares_jax.sampling import SamplingParams, generate
from benchmarks import report

_MODEL = flags.DEFINE_enum("model", "small", ["tiny", "small"], "Random model of table 1.")
_ROWS = flags.DEFINE_integer("rows", 4, "Rows per device in table 3 (paper: 32 / 8 devices).")
_SEQ = flags.DEFINE_integer("seq", 2048, "Response positions in table 3.")
_CHUNK = flags.DEFINE_integer("chunk", 256, "Positions per chunk (paper presets: 256).")
_DEVICES = flags.DEFINE_integer("devices", 8, "FSDP devices of table 2 (paper: 8 GPUs).")
_RECORD = flags.DEFINE_bool("record", False, "Append the tables to benchmarks/RESULTS.md.")

G, T_NEW = 4, 32  # rollouts per prompt, new tokens
BF16, F32 = jnp.bfloat16, jnp.float32
QUESTIONS = ["How many squares?", "What is 2 + 3?", "Count the dots.", "Name a prime."]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _model_rows(name: str) -> list[str]:
    """Table 1 on a random model: the learner's numbers for each head and reference dtype."""
    cfg = config.preset(name)
    truth_model = params.init_model(cfg, seed=0, dtype=F32, param_dtype=F32)
    model = params.init_model(cfg, seed=0, dtype=BF16, param_dtype=F32)  # same parameters
    tok = tokenizer.build_tokenizer()
    prompts = B.encode_prompts(
        QUESTIONS,
        [[] for _ in QUESTIONS],
        tok,
        cfg,
        template="Think, then answer in \\boxed{}.",
        min_pixels=3136,
        max_pixels=3136,
        length_buckets=(64,),
    )
    out = generate(
        model,
        inputs=B.sampler_inputs(prompts, cfg),
        sampling=SamplingParams(n=G, max_new_tokens=T_NEW, stop_token_ids=()),
        key=jax.random.PRNGKey(0),
    )
    n = out.tokens.shape[0]
    rows = B.Rows(
        prompt=out.prompt_index,
        tokens=out.tokens,
        mask=out.mask,
        advantages=np.zeros(n, np.float32),
        bucket=np.zeros(n, np.int32),
        correct=np.zeros(n, bool),
        soft_cost=np.zeros(n, np.float32),
        window_mask=np.zeros(out.mask.shape, bool),
    )
    lb = jax.tree.map(
        jnp.asarray, B.learner_batch(prompts, rows, cfg, micro_batch_size=n, num_micro=1)
    )
    mask = np.asarray(lb.mask[0])
    inputs, tokens = jax.tree.map(lambda x: x[0], (lb.inputs, lb.tokens))

    def run(m, trainable, head):
        g, _, frozen = Lr.split_params(m, freeze_vision=False)
        s = Lr.LearnerSettings(prompt_len=prompts.ids.shape[1], chunk_size=8, head_dtype=head)

        def objective(tr):
            logp, ent = Lr.response_logprobs(Lr.merge(g, tr, frozen), inputs, tokens, s)
            return jnp.sum(jnp.where(mask, logp + ent, 0.0)), (logp, ent)

        grads, (logp, ent) = jax.jit(jax.grad(objective, has_aux=True))(trainable)
        unembed = Lr.merge(g, grads, frozen).unembed()
        return np.asarray(logp), np.asarray(ent), np.asarray(unembed, np.float32)

    _, truth_params, _ = Lr.split_params(truth_model, freeze_vision=False)
    _, policy, _ = Lr.split_params(model, freeze_vision=False)
    reference = Lr.reference_params(policy, BF16, "compute")
    lp32, en32, gw32 = run(truth_model, truth_params, "param")
    policy_lp = {head: run(model, policy, head)[0] for head in Lr.HEAD_DTYPES}
    lines = []
    for head in Lr.HEAD_DTYPES:
        for ref_dtype, ref_params in (("param", policy), ("compute", reference)):
            lp, en, gw = run(model, ref_params, head)
            kl = K.kl_divergence(jnp.asarray(policy_lp[head]), jnp.asarray(lp), "k3")
            is_policy = ref_dtype == "param"
            lines.append(
                f"| {name} | {head} | {'policy' if is_policy else 'reference ' + ref_dtype} | "
                f"{np.abs(lp - lp32)[mask].max():.2e} | {np.abs(lp - lp32)[mask].mean():.2e} | "
                f"{np.abs(en - en32)[mask].max():.2e} | "
                f"{np.abs(lp - out.logp)[mask].max():.2e} | "
                f"{np.abs(lp - out.logp)[mask].mean():.2e} | "
                f"{float(np.asarray(kl)[mask].mean()):.2e} | "
                f"{_rel(gw, gw32) if is_policy else float('nan'):.2e} |"
            )
    return lines


def _head_rows(d: int, v: int) -> list[str]:
    """Table 1 at a real head's width and vocabulary: random hidden states and weights."""
    rng = np.random.default_rng(0)
    rows, t = 1, 64
    h32 = jnp.asarray(rng.normal(size=(rows, t, d)), F32)
    h = h32.astype(BF16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 4.0 / np.sqrt(d), F32)  # logits of std ~4
    y = jnp.asarray(rng.integers(0, v, size=(rows, t)), jnp.int32)

    def fn(hidden, w, head):
        def objective(w):
            ww = w.astype(hidden.dtype) if head == "compute" else w
            logp, ent = token_logprobs_and_entropy(hidden, ww, y, chunk_size=64)
            return jnp.sum(logp + ent), (logp, ent)

        g, (lp, en) = jax.jit(jax.grad(objective, has_aux=True))(w)
        return np.asarray(lp), np.asarray(en), np.asarray(g)

    lp32, en32, g32 = fn(h.astype(F32), w, "param")  # the bf16 hidden states, float32 math
    lines = []
    for head in Lr.HEAD_DTYPES:
        lp, en, g = fn(h, w, head)
        lines.append(
            f"| head D={d} V={v} | {head} | policy | {np.abs(lp - lp32).max():.2e} | "
            f"{np.abs(lp - lp32).mean():.2e} | {np.abs(en - en32).max():.2e} | - | - | - | "
            f"{_rel(g, g32):.2e} |"
        )
    return lines


def _tree_bytes(tree) -> int:
    return sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _memory_rows(devices: int) -> list[str]:
    lines = []
    for name in ("3b", "7b"):
        cfg = config.preset(name)
        _, state = nnx.split(params.abstract_model(cfg, dtype=BF16, param_dtype=F32))
        count = sum(x.size for x in jax.tree.leaves(state))
        head = cfg.text.hidden_size * cfg.text.vocab_size
        f32, bf16 = 4 * count, 2 * count
        lines.append(
            f"| {name} | {count / 1e9:.2f} B | {report.gib(f32)} | {report.gib(bf16)} | "
            f"{report.gib(f32 / devices)} | {report.gib(bf16 / devices)} | "
            f"{report.gib(4 * head)} | {report.gib(2 * head)} |"
        )
    return lines


def _compiled_rows(rows: int, seq: int, chunk: int) -> list[str]:
    """Table 3: on one device, and with more devices also FSDP over all of them (the learner's
    layout: rows over the devices, the unembedding's width D split, gathered for the head)."""
    lines = []
    counts = sorted({1, jax.device_count()})
    for name in ("3b", "7b"):
        cfg = config.preset(name)
        d, v, tied = cfg.text.hidden_size, cfg.text.vocab_size, cfg.tie_word_embeddings
        for n in counts:
            mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ("fsdp",))

            def sds(shape, dtype, *spec, mesh=mesh):
                sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
                return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

            h = sds((rows * n, seq, d), BF16, "fsdp")
            w = sds((v, d), F32, None, "fsdp") if tied else sds((d, v), F32, "fsdp")  # stored
            y = sds((rows * n, seq), jnp.int32, "fsdp")
            for head in Lr.HEAD_DTYPES:

                def forward(h, w, y, head=head, tied=tied):
                    ww = w.T if tied else w
                    ww = ww.astype(h.dtype) if head == "compute" else ww
                    return token_logprobs_and_entropy(h, ww, y, chunk_size=chunk)

                def update(h, w, y, forward=forward):
                    def loss(h, w):
                        logp, ent = forward(h, w, y)
                        return jnp.sum(logp) + jnp.sum(ent)

                    return jax.grad(loss, argnums=(0, 1))(h, w)

                temps = [
                    jax.jit(f).lower(h, w, y).compile().memory_analysis().temp_size_in_bytes
                    for f in (forward, update)
                ]
                lines.append(
                    f"| {name} (D={d}, V={v}{', tied' if tied else ''}) | {n} | {head} | "
                    f"{report.gib(temps[0])} | {report.gib(temps[1])} |"
                )
    return lines


def _time_rows() -> list[str]:
    rng = np.random.default_rng(0)
    rows, t, d, v = 1, 256, 2048, 32768
    h = jnp.asarray(rng.normal(size=(rows, t, d)), BF16)
    w = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), F32)
    y = jnp.asarray(rng.integers(0, v, size=(rows, t)), jnp.int32)
    lines = []
    for head in Lr.HEAD_DTYPES:

        def loss(h, w, head=head):
            ww = w.astype(h.dtype) if head == "compute" else w
            logp, ent = token_logprobs_and_entropy(h, ww, y, chunk_size=128)
            return jnp.sum(logp) + jnp.sum(ent)

        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        jax.block_until_ready(step(h, w))
        start = time.perf_counter()
        for _ in range(3):
            jax.block_until_ready(step(h, w))
        ms = (time.perf_counter() - start) / 3 * 1e3
        lines.append(f"| B={rows} T={t} D={d} V={v} | {head} | {ms:.0f} |")
    return lines


def main(argv):
    del argv
    lines = [
        f"{report.card()}; jax {jax.__version__}",
        "",
        "1. Log-probs and entropies on response tokens (bfloat16 compute, float32 parameters).",
        "",
        "| model | head | log-probs of | max abs dlogp vs f32 | mean abs dlogp vs f32 | "
        "max abs dH vs f32 | max abs dlogp vs sampler | mean abs dlogp vs sampler | "
        "mean k3 KL policy-ref at init | rel err of d unembed vs f32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *_model_rows(_MODEL.value),
        *_head_rows(2048, 151936),
        "",
        f"2. The reference's copy of the trainable parameters (all of them; per device: "
        f"{_DEVICES.value}-way FSDP).",
        "",
        "| model | parameters | float32 | bfloat16 | float32 / device | bfloat16 / device | "
        "unembedding float32 | unembedding bfloat16 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *_memory_rows(_DEVICES.value),
        "",
        f"3. The head's XLA temporaries per device: {_ROWS.value} rows x {_SEQ.value} "
        f"positions a device, chunk {_CHUNK.value}, bfloat16 hidden states, float32 stored "
        "unembedding (FSDP: split over the devices on D).",
        "",
        "| model | devices | head | forward temp | forward + backward temp |",
        "|---|---:|---|---:|---:|",
        *_compiled_rows(_ROWS.value, _SEQ.value, _CHUNK.value),
        "",
        "| head fwd + bwd on this machine | head | ms |",
        "|---|---|---:|",
        *_time_rows(),
    ]
    text = "\n".join(lines)
    print(text)
    if _RECORD.value:
        print(f"appended to {report.record('precision', _MODEL.value, text)}")


if __name__ == "__main__":
    app.run(main)
