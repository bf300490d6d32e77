"""The Qwen2.5-VL vision tower (QWEN2_5_VL.md 3.1).

The host (`positions.vision_metadata`) lays the patch rows out once, in NumPy: all images of a
batch packed into one sequence of windows of merged units, every window padded to the same
number of rows, the sequence padded to a bucket of windows, each row carrying its frame as a
segment id. Window attention is dense attention within each window's rows (a few dozen), batched,
with padding masked out of the keys; full attention is `ops.attention` over the whole sequence
with the frames as segments, through the model's kernel (`full_attention_impl`: no [R, R]
scores, forward or backward; the blockwise path also skips pairs of frames). Shapes are static
per window bucket, and no image is padded to another's size. `unpermute` restores the
image-token order after the merger.

Parameter layout: patch_embed [patch_in, vision_embed] (the 3-D convolution with stride = kernel
is one matmul per patch row); per block, stacked on [layers]: norm1, qkv [vision_embed, 3,
vision_heads, head_dim] + bias, proj [vision_heads, head_dim, vision_embed] + bias, norm2,
gate/up [vision_embed, vision_mlp] + bias, down [vision_mlp, vision_embed] + bias; merger:
norm [vision_embed], fc1 [4 vision_embed, 4 vision_embed] + bias, fc2 [4 vision_embed, embed] +
bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ares_jax.models.qwen2_5_vl.config import VisionConfig
from ares_jax.models.qwen2_5_vl.layers import (
    ones_init,
    param,
    rms_norm,
    run_layers,
    stack_layers,
    zeros_init,
)
from ares_jax.models.qwen2_5_vl.rope import apply_rotary, vision_cos_sin
from ares_jax.models.qwen2_5_vl.text import KERNELS, kernel_partition
from ares_jax.ops import attention as ops_attention
from ares_jax.parallel import rules as R


def full_attention_impl(implementation: str | None) -> str:
    """The `ops.attention` implementation of the tower's full-attention blocks: the model's
    kernel ('auto' included), else (XLA's or cuDNN's dense-mask attention, which cannot express
    the frames as segments without an [R, R] mask) the blockwise XLA path."""
    return KERNELS.get(implementation, "xla")


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        d, f, h, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.head_dim
        kw = dict(dtype=param_dtype)
        E, M, H, HD = R.VISION_EMBED, R.VISION_MLP, R.VISION_HEADS, R.HEAD_DIM
        self.norm1 = param(rngs, (d,), (E,), init=ones_init, **kw)
        self.qkv = param(rngs, (d, 3, h, hd), (E, None, H, HD), **kw)
        self.qkv_bias = param(rngs, (3, h, hd), (None, H, HD), init=zeros_init, **kw)
        self.proj = param(rngs, (h, hd, d), (H, HD, E), **kw)
        self.proj_bias = param(rngs, (d,), (E,), init=zeros_init, **kw)
        self.norm2 = param(rngs, (d,), (E,), init=ones_init, **kw)
        self.gate = param(rngs, (d, f), (E, M), **kw)
        self.gate_bias = param(rngs, (f,), (M,), init=zeros_init, **kw)
        self.up = param(rngs, (d, f), (E, M), **kw)
        self.up_bias = param(rngs, (f,), (M,), init=zeros_init, **kw)
        self.down = param(rngs, (f, d), (M, E), **kw)
        self.down_bias = param(rngs, (d,), (E,), init=zeros_init, **kw)
        self.eps = cfg.rms_norm_eps

    def __call__(self, x, cos, sin, segment_ids, full, *, window_rows: int, implementation=None):
        """x [R, Dv]; cos/sin [R, hd] float32; segment_ids [R] int32 (frame, 0 at padding);
        full: full or window block.

        `full` is a Python bool (unrolled layers) or a traced bool (scanned layers, lax.cond).
        """
        dt = x.dtype
        h = rms_norm(x, self.norm1[...], self.eps)
        qkv = jnp.einsum("pd,dsnh->spnh", h, self.qkv[...].astype(dt))
        qkv = qkv + self.qkv_bias[...].astype(dt)[:, None]
        q, k, v = qkv[0], qkv[1], qkv[2]  # [R, Hv, hd] each
        # Rotary in float32, cast back (transformers' apply_rotary_pos_emb_vision).
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(dt)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(dt)

        def window_attend(q, k, v):
            g = q.shape[0] // window_rows
            split = lambda a: a.reshape(g, window_rows, *a.shape[1:])  # noqa: E731
            keys = (segment_ids != 0).reshape(g, 1, 1, window_rows)
            return jax.nn.dot_product_attention(split(q), split(k), split(v), mask=keys).reshape(
                q.shape
            )

        def full_attend(q, k, v):
            q, k, v = q[None], k[None], v[None]
            out = ops_attention.attention(
                q,
                k,
                v,
                segment_ids=segment_ids[None],
                causal=False,
                impl=full_attention_impl(implementation),
                partition=kernel_partition(q, k, R.VISION_HEADS, R.VISION_HEADS),
            )
            return out[0]

        if isinstance(full, bool):
            attn = (full_attend if full else window_attend)(q, k, v)
        else:
            attn = jax.lax.cond(full, full_attend, window_attend, q, k, v)
        x = x + jnp.einsum("pnh,nhd->pd", attn, self.proj[...].astype(dt))
        x = x + self.proj_bias[...].astype(dt)
        h = rms_norm(x, self.norm2[...], self.eps)
        g = h @ self.gate[...].astype(dt) + self.gate_bias[...].astype(dt)
        u = h @ self.up[...].astype(dt) + self.up_bias[...].astype(dt)
        return x + (jax.nn.silu(g) * u) @ self.down[...].astype(dt) + self.down_bias[...].astype(dt)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        merged = d * cfg.spatial_merge_size**2
        kw = dict(dtype=param_dtype)
        self.patch_embed = param(rngs, (cfg.patch_dim, d), (R.PATCH_IN, R.VISION_EMBED), **kw)
        self.blocks = stack_layers(
            [VisionBlock(cfg, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)]
        )
        self.merger_norm = param(rngs, (d,), (R.VISION_EMBED,), init=ones_init, **kw)
        self.merger_fc1 = param(rngs, (merged, merged), (None, R.VISION_MLP), **kw)
        self.merger_fc1_bias = param(rngs, (merged,), (R.VISION_MLP,), init=zeros_init, **kw)
        self.merger_fc2 = param(rngs, (merged, cfg.out_hidden_size), (R.VISION_MLP, R.EMBED), **kw)
        self.merger_fc2_bias = param(
            rngs, (cfg.out_hidden_size,), (R.EMBED,), init=zeros_init, **kw
        )

    def __call__(
        self,
        pixels: jax.Array,
        rotary_pos: jax.Array,
        segment_ids: jax.Array,
        unpermute: jax.Array,
        *,
        dtype=jnp.float32,
        scan: bool = True,
        remat: str | bool = False,
        implementation: str | None = None,
    ) -> jax.Array:
        """Image features in image-token order.

        Args:
          pixels: [R, patch_in] float patch rows in the layout (zeros at padding).
          rotary_pos: [R, 2] int (row, column) of each patch row.
          segment_ids: [R] int32, each row's frame, 0 at padding.
          unpermute: [R / 4] int, layout slot of each image token in token order, then padding.

        Returns:
          [R / 4, D] features in `dtype`: the image tokens' in order, then padding slots.
        """
        cfg = self.cfg
        m = cfg.spatial_merge_size
        window_rows = (cfg.window_size // m // cfg.patch_size) ** 2 * m * m
        x = pixels.astype(dtype) @ self.patch_embed[...].astype(dtype)  # [R, Dv]
        x = R.constrain(x, (R.PATCHES, R.VISION_EMBED))
        cos, sin = vision_cos_sin(rotary_pos, head_dim=cfg.head_dim, theta=cfg.rope_theta)

        def body(block, x, full):
            return block(
                x,
                cos,
                sin,
                segment_ids,
                full,
                window_rows=window_rows,
                implementation=implementation,
            )

        flags = [i in cfg.fullatt_block_indexes for i in range(cfg.depth)]
        x = run_layers(self.blocks, x, body, scan=scan, remat=remat, flags=flags)
        x = rms_norm(x, self.merger_norm[...], cfg.rms_norm_eps)
        x = x.reshape(-1, x.shape[-1] * m * m)  # [R/4, 4 Dv]: the 4 rows of a unit are adjacent
        x = x @ self.merger_fc1[...].astype(dtype) + self.merger_fc1_bias[...].astype(dtype)
        x = jax.nn.gelu(x, approximate=False)
        x = x @ self.merger_fc2[...].astype(dtype) + self.merger_fc2_bias[...].astype(dtype)
        return jnp.take(x, unpermute, axis=0)
