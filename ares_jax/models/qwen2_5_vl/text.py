"""The Qwen2 text decoder with M-RoPE (QWEN2_5_VL.md 3.3).

Grouped-query attention with q/k/v bias and no output bias, RMSNorm, SwiGLU MLP. Full forwards
and prefills run through `ops.attention` with the mask as segment ids (packed rows: one id per
sequence), by default with the kernel of the backend (Splash on TPU, cuDNN or Pallas on GPU, the
blockwise XLA path on CPU), none of which holds [T, T] scores; 'xla' and 'cudnn' select
`jax.nn.dot_product_attention` with a dense mask instead (`IMPLEMENTATIONS` below). Logits and
softmax are float32. Masks are boolean, never additive, so rows of left padding cannot produce
NaN (QWEN2_5_VL.md 8.4).

Parameter layout (logical axes in brackets): embed [vocab, embed]; per layer, stacked on a leading
[layers] axis: q [embed, heads, head_dim] + bias, k/v [embed, kv_heads, head_dim] + bias,
o [heads, head_dim, embed], gate/up [embed, mlp], down [mlp, embed], two norms [embed]; final norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ares_jax.models.qwen2_5_vl.config import TextConfig
from ares_jax.models.qwen2_5_vl.layers import (
    ones_init,
    param,
    rms_norm,
    run_layers,
    stack_layers,
    zeros_init,
)
from ares_jax.models.qwen2_5_vl.rope import apply_rotary
from ares_jax.ops import attention as ops_attention
from ares_jax.parallel import rules as R

# The model's attention implementations (`attention_impl`, config key `model.attention`), for
# full forwards (training, log-probs) and prefills:
# - 'auto': `ops.attention` by backend: Splash on TPU, cuDNN or Pallas on GPU, blockwise on CPU;
# - 'blockwise': `ops.attention`'s online-softmax XLA path on every backend;
# - 'splash', 'pallas_gpu': that `ops.attention` kernel forced (interpreted on CPU);
# - 'dense': `ops.attention`'s reference (holds [T, T] scores; tests);
# - 'xla', 'cudnn' (or None): `jax.nn.dot_product_attention` with a dense [B, T, S] mask, with
#   XLA's or cuDNN's implementation (cuDNN reads the mask whatever the layout; packed rows too).
# Decode steps over the KV cache: `cache_step_attention` (XLA's dots), or cuDNN's with 'cudnn'.
KERNELS = {
    "auto": "auto",
    "blockwise": "xla",
    "splash": "splash",
    "pallas_gpu": "pallas_gpu",
    "dense": "dense",
}
IMPLEMENTATIONS = (*KERNELS, "xla", "cudnn")
BLOCKWISE = "blockwise"


def check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; known: {list(IMPLEMENTATIONS)}"
        )


def uses_kernel(implementation: str | None) -> bool:
    """Whether full forwards and prefills go through `ops.attention` (segment ids, no mask)."""
    return implementation in KERNELS


def kernel_partition(q: jax.Array, k: jax.Array, heads: str, kv_heads: str):
    """(q_spec, kv_spec) of [rows, length, heads, head_dim] activations under the current mesh
    (None without one): the `partition` that `ops.attention` runs its Pallas kernels per shard by.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    spec = lambda x, h: R.logical_to_spec(  # noqa: E731
        (R.BATCH, None, h, None), shape=x.shape, mesh=mesh
    )
    return spec(q, heads), spec(k, kv_heads)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, implementation: str | None
) -> jax.Array:
    """q [B, T, H, hd], k/v [B, S, K, hd], mask [B, T, S] bool -> [B, T, H, hd].

    K must divide H (grouped-query attention). Softmax in float32. With an `ops.attention`
    implementation (`uses_kernel`) a full forward (T == S) passes its [B, T] segment ids (the
    attention mask as int32: 0 is padding) instead of the mask, attended causally without
    [T, T] scores, forward or backward (padding queries give 0); a KV-cache step, whose mask is
    [B, T, S], takes XLA's dense path.
    """
    if uses_kernel(implementation) and mask.ndim == 2:
        return ops_attention.attention(
            q,
            k,
            v,
            segment_ids=mask,
            causal=True,
            impl=KERNELS[implementation],
            partition=kernel_partition(q, k, R.HEADS, R.KV_HEADS),
        )
    impl = "cudnn" if implementation == "cudnn" else None
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=impl)


def cache_step_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """One query per row against a dense KV cache: q [B, 1, H, hd], k/v [B, K, S, hd] (the
    cache's layout, `model.KV_AXES`), mask [B, 1, S] bool -> [B, 1, H, hd], softmax in float32.

    Two dots whose batch dimensions (rows, KV heads) lead the cache's layout, so a decode step
    reads the cache once, in place. With the cache laid out [B, S, K, hd], XLA on CPU copied
    every layer's whole K and V cache to put those dimensions first on every step, and products
    and sums in that layout (a reduction over the head dimension) took twice these dots' time
    (benchmarks/RESULTS.md). Masked keys get the most negative float32, as
    `jax.nn.dot_product_attention` gives them, so a row with no valid key is finite.
    """
    b, _, h, d = q.shape
    kv = k.shape[1]
    qg = (q[:, 0].astype(jnp.float32) * d**-0.5).reshape(b, kv, h // kv, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32))
    scores = jnp.where(mask[:, :, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v.astype(jnp.float32))
    return out.reshape(b, 1, h, d).astype(q.dtype)


@jax.custom_vjp
def gated_mlp(h: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """SwiGLU: (silu(h @ gate) * (h @ up)) @ down, h [B, T, D] -> [B, T, D].

    A custom VJP whose backward pass keeps the two [B, T, F] projections and recomputes the
    sigmoid, and writes the weight gradients as dots that contract the tokens of both operands
    as they lie. Autodiff of the same expression kept four [B, T, F] residuals per layer and
    had XLA on CPU transpose the gate and up gradients ([B * T, F] -> [F, B * T], fused with
    their elementwise work, twice) before the weight-gradient dots: 4 layers of 16 x 256 tokens
    took 229 ms forward and backward, against 163 ms here (benchmarks/RESULTS.md). Same values:
    the forward is the same expression, the backward the same products.
    """
    g = jnp.einsum("btd,df->btf", h, gate)
    u = jnp.einsum("btd,df->btf", h, up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down)


def _gated_mlp_fwd(h, gate, up, down):
    g = jnp.einsum("btd,df->btf", h, gate)
    u = jnp.einsum("btd,df->btf", h, up)
    return jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, down), (h, gate, up, down, g, u)


def _gated_mlp_bwd(res, dy):
    h, gate, up, down, g, u = res
    s = jax.nn.sigmoid(g)
    silu = g * s
    d_act = jnp.einsum("btd,fd->btf", dy, down)  # gradient of silu(g) * u
    d_down = jnp.einsum("btf,btd->fd", silu * u, dy)
    du = d_act * silu
    dg = d_act * u * s * (1 + g * (1 - s))  # silu'(g) = s (1 + g (1 - s))
    d_gate = jnp.einsum("btd,btf->df", h, dg)
    d_up = jnp.einsum("btd,btf->df", h, du)
    dh = jnp.einsum("btf,df->btd", dg, gate) + jnp.einsum("btf,df->btd", du, up)
    return dh, d_gate, d_up, d_down


gated_mlp.defvjp(_gated_mlp_fwd, _gated_mlp_bwd)


class DecoderLayer(nnx.Module):
    """One pre-norm decoder block."""

    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, f, h, k, hd = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        kw = dict(dtype=param_dtype)
        self.input_norm = param(rngs, (d,), (R.EMBED,), init=ones_init, **kw)
        self.q = param(rngs, (d, h, hd), (R.EMBED, R.HEADS, R.HEAD_DIM), **kw)
        self.q_bias = param(rngs, (h, hd), (R.HEADS, R.HEAD_DIM), init=zeros_init, **kw)
        self.k = param(rngs, (d, k, hd), (R.EMBED, R.KV_HEADS, R.HEAD_DIM), **kw)
        self.k_bias = param(rngs, (k, hd), (R.KV_HEADS, R.HEAD_DIM), init=zeros_init, **kw)
        self.v = param(rngs, (d, k, hd), (R.EMBED, R.KV_HEADS, R.HEAD_DIM), **kw)
        self.v_bias = param(rngs, (k, hd), (R.KV_HEADS, R.HEAD_DIM), init=zeros_init, **kw)
        self.o = param(rngs, (h, hd, d), (R.HEADS, R.HEAD_DIM, R.EMBED), **kw)
        self.post_norm = param(rngs, (d,), (R.EMBED,), init=ones_init, **kw)
        self.gate = param(rngs, (d, f), (R.EMBED, R.MLP), **kw)
        self.up = param(rngs, (d, f), (R.EMBED, R.MLP), **kw)
        self.down = param(rngs, (f, d), (R.MLP, R.EMBED), **kw)
        self.eps = cfg.rms_norm_eps

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array):
        """x [B, T, D] -> rotated q [B, T, H, hd], rotated k and v [B, T, K, hd]."""
        dt = x.dtype
        h = rms_norm(x, self.input_norm[...], self.eps)
        q = jnp.einsum("btd,dnh->btnh", h, self.q[...].astype(dt)) + self.q_bias[...].astype(dt)
        k = jnp.einsum("btd,dnh->btnh", h, self.k[...].astype(dt)) + self.k_bias[...].astype(dt)
        v = jnp.einsum("btd,dnh->btnh", h, self.v[...].astype(dt)) + self.v_bias[...].astype(dt)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def finish(self, x: jax.Array, attn: jax.Array) -> jax.Array:
        """Output projection, residual and MLP: x [B, T, D], attn [B, T, H, hd] -> [B, T, D]."""
        dt = x.dtype
        x = x + jnp.einsum("btnh,nhd->btd", attn, self.o[...].astype(dt))
        h = rms_norm(x, self.post_norm[...], self.eps)
        return x + gated_mlp(
            h, self.gate[...].astype(dt), self.up[...].astype(dt), self.down[...].astype(dt)
        )

    def __call__(self, x, cos, sin, mask, *, implementation=None):
        q, k, v = self.qkv(x, cos, sin)
        return self.finish(x, attention(q, k, v, mask, implementation=implementation))


class TextModel(nnx.Module):
    """Embedding, stacked decoder layers and the final norm (no LM head)."""

    def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = param(
            rngs, (cfg.vocab_size, cfg.hidden_size), (R.VOCAB, R.EMBED), dtype=param_dtype
        )
        self.layers = stack_layers(
            [
                DecoderLayer(cfg, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_hidden_layers)
            ]
        )
        self.norm = param(rngs, (cfg.hidden_size,), (R.EMBED,), init=ones_init, dtype=param_dtype)

    def embed_tokens(self, input_ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.embed[...], input_ids, axis=0).astype(dtype)

    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        *,
        scan: bool = True,
        remat: str | bool = False,
        implementation: str | None = None,
    ) -> jax.Array:
        """Decoder stack: x [B, T, D] embeddings -> final-norm hidden states [B, T, D]."""

        def body(layer, x, _):
            x = R.constrain(x, (R.BATCH, R.LENGTH, R.EMBED))
            return layer(x, cos, sin, mask, implementation=implementation)

        x = run_layers(self.layers, x, body, scan=scan, remat=remat)
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)

    def final_norm(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
