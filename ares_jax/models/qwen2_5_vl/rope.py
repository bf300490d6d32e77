"""Rotary embeddings: 3-axis M-RoPE for the text decoder, 2-D axial RoPE for the vision tower.

Text (QWEN2_5_VL.md 3.3): frequency j of head_dim/2 rotates by the temporal, height or width
position according to `mrope_section`; the angles are duplicated to the full head dim and applied
with the non-interleaved rotate-half formula. cos/sin are cast to the activation dtype before they
are applied, as transformers does. Vision (3.1 item 2): the first half of the angles comes from
the patch row, the second from the column, computed and applied in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.models.qwen2_5_vl.layers import rotate_half


def text_cos_sin(
    position_ids: jax.Array,
    *,
    head_dim: int,
    theta: float,
    mrope_section: Sequence[int],
    dtype: jnp.dtype,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, head_dim] in `dtype` from M-RoPE positions [3, B, T] (int)."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    # Which position axis (0 temporal, 1 height, 2 width) drives each frequency.
    axis = np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)])
    pos = position_ids.astype(jnp.float32)[axis]  # [head_dim/2, B, T]
    angles = jnp.moveaxis(pos, 0, -1) * jnp.asarray(inv_freq)  # [B, T, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def vision_cos_sin(
    rotary_pos: jax.Array, *, head_dim: int, theta: float
) -> tuple[jax.Array, jax.Array]:
    """float32 cos, sin [P, head_dim] from per-patch (row, column) positions [P, 2] (int)."""
    spatial = head_dim // 2
    inv_freq = 1.0 / (theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
    freqs = rotary_pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [P, 2, hd/4]
    angles = jnp.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # [P, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [..., T, N, hd] rotated by cos/sin [..., T, hd] (broadcast over the N heads)."""
    cos, sin = cos[..., None, :], sin[..., None, :]
    return x * cos + rotate_half(x) * sin
