"""The Qwen2.5-VL vision tower (QWEN2_5_VL.md 3.1).

The host (`positions.vision_metadata`) builds every data-dependent index once, in NumPy: the
window permutation is applied to the pixel rows and rotary positions before they reach the
device, each patch row carries a segment id for the window-attention blocks and one for the
full-attention blocks (one segment per image and frame), and `unpermute` restores the image-token
order after the merger. The device code is a plain stack of blocks with block-diagonal attention
expressed as a boolean same-segment mask, so shapes are static per patch bucket.

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
from ares_jax.parallel import rules as R


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

    def __call__(self, x, cos, sin, mask, *, implementation=None):
        """x [P, Dv]; cos/sin [P, hd] float32; mask [P, P] bool (same segment)."""
        dt = x.dtype
        h = rms_norm(x, self.norm1[...], self.eps)
        qkv = jnp.einsum("pd,dsnh->spnh", h, self.qkv[...].astype(dt))
        qkv = qkv + self.qkv_bias[...].astype(dt)[:, None]
        q, k, v = qkv[0], qkv[1], qkv[2]  # [P, Hv, hd] each
        # Rotary in float32, cast back (transformers' apply_rotary_pos_emb_vision).
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(dt)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(dt)
        impl = None if implementation in (None, "xla") else implementation
        attn = jax.nn.dot_product_attention(
            q[None], k[None], v[None], mask=mask[None, None], implementation=impl
        )[0]
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
        window_segment: jax.Array,
        full_segment: jax.Array,
        unpermute: jax.Array,
        *,
        dtype=jnp.float32,
        scan: bool = True,
        remat: bool = False,
        implementation: str | None = None,
    ) -> jax.Array:
        """Image features in image-token order.

        Args:
          pixels: [P, patch_in] float patch rows in window order (pixel_values[meta.perm]).
          rotary_pos: [P, 2] int (row, column) of each patch row, window order.
          window_segment, full_segment: [P] int segment ids for the two kinds of block.
          unpermute: [U] int, merged-unit index of each image token in token order.

        Returns:
          [U, D] features in `dtype`, one per image token.
        """
        cfg = self.cfg
        x = pixels.astype(dtype) @ self.patch_embed[...].astype(dtype)  # [P, Dv]
        cos, sin = vision_cos_sin(rotary_pos, head_dim=cfg.head_dim, theta=cfg.rope_theta)
        window_mask = window_segment[:, None] == window_segment[None, :]
        full_mask = full_segment[:, None] == full_segment[None, :]
        is_full = jnp.asarray([i in cfg.fullatt_block_indexes for i in range(cfg.depth)])

        def body(block, x, full):
            mask = jnp.where(full, full_mask, window_mask)
            return block(x, cos, sin, mask, implementation=implementation)

        x = run_layers(self.blocks, x, body, scan=scan, remat=remat, extra=is_full)
        x = rms_norm(x, self.merger_norm[...], cfg.rms_norm_eps)
        x = x.reshape(-1, x.shape[-1] * cfg.spatial_merge_size**2)  # [P/4, 4 Dv]
        x = x @ self.merger_fc1[...].astype(dtype) + self.merger_fc1_bias[...].astype(dtype)
        x = jax.nn.gelu(x, approximate=False)
        x = x @ self.merger_fc2[...].astype(dtype) + self.merger_fc2_bias[...].astype(dtype)
        return jnp.take(x, unpermute, axis=0)
