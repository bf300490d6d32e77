"""Qwen2.5-VL: vision tower + text decoder + LM head, with a KV cache for generation.

Built with Flax NNX and used functionally: `nnx.split(model)` once gives (graphdef, params); the
jitted entry points below are functions of (params, inputs[, cache]) that merge inside the trace
(`forward`, `prefill`, `decode_step`). The policy and the reference model share one graphdef and
differ only in their params.

Inputs are `ModelInputs`, device arrays with static shapes built on the host by
`processor_glue.prepare_inputs` (position ids, vision metadata, image-token indices).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ares_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig
from ares_jax.models.qwen2_5_vl.layers import param
from ares_jax.models.qwen2_5_vl.rope import text_cos_sin
from ares_jax.models.qwen2_5_vl.text import (
    TextModel,
    attention,
    cache_step_attention,
    check_implementation,
    uses_kernel,
)
from ares_jax.models.qwen2_5_vl.vision import VisionTower
from ares_jax.ops import attention as ops_attention
from ares_jax.ops import paged_attention as paged
from ares_jax.parallel import rules as R


class VisionInputs(NamedTuple):
    """Patch rows of all images of a batch in the packed vision layout (positions.VisionMeta)."""

    pixels: jax.Array  # [R, patch_in] float, zeros at padding
    rotary_pos: jax.Array  # [R, 2] int32
    segment_ids: jax.Array  # [R] int32, the row's frame, 0 at padding
    unpermute: jax.Array  # [R / 4] int32


class ModelInputs(NamedTuple):
    """One batch of token rows, left-padded, with their images."""

    input_ids: jax.Array  # [B, T] int32
    # [B, T] bool, False at padding; or, in a full forward of packed rows (`hidden_states`), int32
    # segment ids: 1, 2, ... per sequence laid end to end in the row, 0 at padding.
    attention_mask: jax.Array
    position_ids: jax.Array  # [3, B, T] int32, M-RoPE (temporal, height, width)
    image_index: jax.Array | None = None  # [B, T] int32: feature row per image token, -1 else
    vision: VisionInputs | None = None


# The logical axes of a KV cache buffer: rows and KV heads first, the batch dimensions of a
# decode step's attention dots (`text.cache_step_attention`), so they read the cache in place.
KV_AXES = (R.BATCH, R.KV_HEADS, R.KV_LENGTH, R.HEAD_DIM)


class KVCache(NamedTuple):
    """Per-layer keys and values of the tokens seen so far.

    All rows share one write slot (`index`): prompts are left-padded to one length, so slot s
    holds the s-th token of every row; `valid` marks slots holding a real token (False at left
    padding) and `next_pos` is each row's next M-RoPE position (n_valid + rope_delta, the same on
    the three axes for generated text). Buffers are laid out by `KV_AXES`.
    """

    k: tuple[jax.Array, ...]  # L x [B, K, S, hd]
    v: tuple[jax.Array, ...]  # L x [B, K, S, hd]
    valid: jax.Array  # [B, S] bool
    index: jax.Array  # int32 scalar: next slot to write
    next_pos: jax.Array  # [B] int32


class Qwen2_5_VL(nnx.Module):  # noqa: N801 - the model's name
    """Qwen2_5_VLForConditionalGeneration, in NNX."""

    def __init__(
        self,
        cfg: Qwen2_5_VLConfig,
        *,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        scan_layers: bool = True,
        remat: str | bool = False,
        attention_impl: str | None = "auto",
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.scan_layers = scan_layers
        self.remat = remat
        check_implementation(attention_impl)
        self.attention_impl = attention_impl
        self.visual = VisionTower(cfg.vision, param_dtype=param_dtype, rngs=rngs)
        self.language_model = TextModel(cfg.text, param_dtype=param_dtype, rngs=rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(
                rngs,
                (cfg.text.hidden_size, cfg.text.vocab_size),
                (R.EMBED, R.VOCAB),
                dtype=param_dtype,
            )

    # ------------------------------------------------------------------------------------------
    # Pieces
    # ------------------------------------------------------------------------------------------

    def unembed(self) -> jax.Array:
        """The output projection [D, V] (the transposed embedding for tied checkpoints)."""
        if self.cfg.tie_word_embeddings:
            return self.language_model.embed[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V] from final hidden states [..., D]."""
        w = self.unembed().astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, w, preferred_element_type=jnp.float32)

    def image_features(self, vision: VisionInputs) -> jax.Array:
        """[U, D] features of the image tokens, in token order."""
        return self.visual(
            *vision,
            dtype=self.dtype,
            scan=self.scan_layers,
            remat=self.remat,
            implementation=self.attention_impl,
        )

    def embed(self, inputs: ModelInputs, features: jax.Array | None = None) -> jax.Array:
        """Token embeddings [B, T, D] with image features written at the image tokens."""
        x = self.language_model.embed_tokens(inputs.input_ids, self.dtype)
        if inputs.vision is not None or features is not None:
            if features is None:
                features = self.image_features(inputs.vision)
            idx = inputs.image_index
            rows = jnp.take(features.astype(self.dtype), jnp.maximum(idx, 0), axis=0)
            x = jnp.where((idx >= 0)[..., None], rows, x)
        return x

    def _cos_sin(self, position_ids):
        t = self.cfg.text
        return text_cos_sin(
            position_ids,
            head_dim=t.head_dim,
            theta=t.rope_theta,
            mrope_section=t.mrope_section,
            dtype=self.dtype,
        )

    # ------------------------------------------------------------------------------------------
    # Full forward (training, log-probs)
    # ------------------------------------------------------------------------------------------

    def hidden_states(self, inputs: ModelInputs, features: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states [B, T, D] (feed `token_logprobs_and_entropy` with these)."""
        x = self.embed(inputs, features)
        cos, sin = self._cos_sin(inputs.position_ids)
        t = inputs.input_ids.shape[1]
        segments = inputs.attention_mask.astype(jnp.int32)
        if uses_kernel(self.attention_impl):  # segment ids, attended causally, no [T, T] mask
            mask = segments
        else:
            # A query sees the earlier keys of its own segment; a padding query (id 0) every
            # earlier real key, as with a boolean mask (never an empty row after the first key).
            causal = jnp.tril(jnp.ones((t, t), bool))
            q, k = segments[:, :, None], segments[:, None, :]
            mask = causal[None] & (k != 0) & ((q == k) | (q == 0))
        return self.language_model(
            x,
            cos,
            sin,
            mask,
            scan=self.scan_layers,
            remat=self.remat,
            implementation=self.attention_impl,
        )

    def __call__(self, inputs: ModelInputs | None = None, **hf_inputs) -> jax.Array:
        """float32 logits [B, T, V].

        Takes `ModelInputs`, or the Hugging Face processor's arrays as keywords (input_ids,
        attention_mask, pixel_values [patches, 1176], image_grid_thw), which are turned into
        `ModelInputs` on the host first (`inputs.from_hf`; concrete arrays only, not under jit).
        """
        if inputs is None:
            from ares_jax.models.qwen2_5_vl.inputs import from_hf  # host-side, NumPy

            inputs = from_hf(self.cfg, **hf_inputs)
        return self.logits(self.hidden_states(inputs))

    # ------------------------------------------------------------------------------------------
    # Generation with a KV cache (layers unrolled: each layer's cache buffer is updated in place)
    # ------------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.cfg.text
        shape = (batch, t.num_key_value_heads, max_len, t.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(t.num_hidden_layers))
        return KVCache(
            k=zeros,
            v=tuple(jnp.zeros(shape, self.dtype) for _ in range(t.num_hidden_layers)),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    def _cached_layers(
        self, x, cos, sin, cache: KVCache, valid: jax.Array, fresh: jax.Array | None = None
    ):
        """Runs the decoder on x [B, T, D] written at slots index..index+T-1 of the cache.

        `fresh` [B, T] (the prompt's mask), given when the cache is empty before this call (a
        prefill): with an `ops.attention` implementation the queries then attend to the T new keys
        only, through `ops.attention` with the mask as segment ids, and no [B, T, cache length]
        mask or scores exist.
        """
        graphdef, state = nnx.split(self.language_model.layers)
        s = cache.valid.shape[1]
        t = x.shape[1]
        slots = cache.index + jnp.arange(t)
        fresh_only = fresh is not None and uses_kernel(self.attention_impl)
        if fresh_only:
            segments = fresh.astype(jnp.int32)
        else:
            # Query at slot `slots[i]` sees valid keys up to its own slot.
            key_ok = valid[:, None, :] & (jnp.arange(s)[None, None, :] <= slots[None, :, None])
        new_k, new_v = [], []
        for i in range(len(cache.k)):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            q, k, v = layer.qkv(x, cos, sin)
            heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # noqa: E731 - [B, T, K, hd] <-> KV_AXES
            k_all = jax.lax.dynamic_update_slice_in_dim(cache.k[i], heads_first(k), cache.index, 2)
            v_all = jax.lax.dynamic_update_slice_in_dim(cache.v[i], heads_first(v), cache.index, 2)
            if fresh_only:
                attn = attention(q, k, v, segments, implementation=self.attention_impl)
            elif t == 1 and self.attention_impl != "cudnn":
                attn = cache_step_attention(q, k_all, v_all, key_ok)
            else:  # a prefill without a kernel, or cuDNN: [B, S, K, hd] operands
                k_seq, v_seq = heads_first(k_all), heads_first(v_all)
                attn = attention(q, k_seq, v_seq, key_ok, implementation=self.attention_impl)
            x = layer.finish(x, attn)
            new_k.append(k_all)
            new_v.append(v_all)
        return self.language_model.final_norm(x), tuple(new_k), tuple(new_v)

    def prefill(
        self, inputs: ModelInputs, cache: KVCache, features: jax.Array | None = None
    ) -> tuple[jax.Array, KVCache]:
        """Runs the prompt [B, T] into an empty cache; returns hidden states [B, T, D]."""
        x = self.embed(inputs, features)
        cos, sin = self._cos_sin(inputs.position_ids)
        t = x.shape[1]
        valid = jax.lax.dynamic_update_slice_in_dim(
            cache.valid, inputs.attention_mask, cache.index, axis=1
        )
        hidden, k, v = self._cached_layers(x, cos, sin, cache, valid, inputs.attention_mask)
        last_pos = jnp.max(jnp.where(inputs.attention_mask, inputs.position_ids, -1), axis=(0, 2))
        return hidden, KVCache(k, v, valid, cache.index + t, last_pos + 1)

    def decode_step(self, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """One token per row [B] -> final hidden state [B, D] and the updated cache."""
        b = tokens.shape[0]
        inputs = ModelInputs(
            input_ids=tokens[:, None],
            attention_mask=jnp.ones((b, 1), bool),
            position_ids=jnp.broadcast_to(cache.next_pos[None, :, None], (3, b, 1)),
        )
        x = self.embed(inputs)
        cos, sin = self._cos_sin(inputs.position_ids)
        valid = jax.lax.dynamic_update_slice_in_dim(
            cache.valid, jnp.ones((b, 1), bool), cache.index, axis=1
        )
        hidden, k, v = self._cached_layers(x, cos, sin, cache, valid)
        return hidden[:, 0], KVCache(k, v, valid, cache.index + 1, cache.next_pos + 1)

    # ------------------------------------------------------------------------------------------
    # Generation over a paged KV cache (sampling/engine.py)
    # ------------------------------------------------------------------------------------------

    def prompt_kv(
        self, inputs: ModelInputs, features: jax.Array | None = None, *, chunk: int | None = None
    ) -> tuple[jax.Array, tuple[jax.Array, ...], tuple[jax.Array, ...]]:
        """A prefill without a cache: the prompt [B, T] attends to itself only.

        Returns final hidden states [B, T, D] and each layer's rotated keys and values
        [B, T, K, hd], for the caller to write into its pages (`ops.paged_attention.write_prompt`).

        `chunk` (tokens) bounds the activations when T > chunk: the embedding and cos/sin are
        computed for the whole prompt, then the decoder runs over ceil(T / chunk) consecutive
        chunks in a `lax.fori_loop` (one compiled chunk, whatever T / chunk), each chunk's
        queries attending to the keys and values of the chunks so far, written chunk by chunk
        into the [B, T, K, hd] outputs (`ops.attention.prefix_attention`, whatever
        `attention_impl`). T need not be a multiple of `chunk`: the last chunk is then taken to
        end at T, overlapping the one before, whose tokens it recomputes to the same values. The
        result equals the unchunked one to float rounding at real tokens (hidden states and
        keys/values at padding are defined differently; callers ignore them). T <= chunk, or
        None, runs the whole prompt at once.
        """
        if chunk is not None and chunk < 1:
            raise ValueError(f"prompt_kv: chunk must be a positive number of tokens, got {chunk}")
        x = self.embed(inputs, features)
        cos, sin = self._cos_sin(inputs.position_ids)
        if chunk is not None and x.shape[1] > chunk:
            return self._chunked_prompt_kv(x, cos, sin, inputs.attention_mask, chunk)
        segments = inputs.attention_mask.astype(jnp.int32)
        if uses_kernel(self.attention_impl):
            mask = segments
        else:
            t = x.shape[1]
            real = inputs.attention_mask.astype(bool)
            mask = jnp.tril(jnp.ones((t, t), bool))[None] & real[:, None, :]
        graphdef, state = nnx.split(self.language_model.layers)
        ks, vs = [], []
        for i in range(self.cfg.text.num_hidden_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            q, k, v = layer.qkv(x, cos, sin)
            x = layer.finish(x, attention(q, k, v, mask, implementation=self.attention_impl))
            ks.append(k)
            vs.append(v)
        return self.language_model.final_norm(x), tuple(ks), tuple(vs)

    def _chunked_prompt_kv(self, x, cos, sin, real, chunk: int):
        """`prompt_kv` over chunks: x [B, T, D], cos/sin [B, T, hd], real [B, T] bool."""
        b, t, _ = x.shape
        tc = self.cfg.text
        graphdef, state = nnx.split(self.language_model.layers)
        real = real.astype(bool)

        def one_chunk(c, carry):
            hidden, ks, vs = carry
            start = jnp.minimum(c * chunk, t - chunk)  # the last chunk ends at T
            h, cos_c, sin_c = (
                jax.lax.dynamic_slice_in_dim(a, start, chunk, axis=1) for a in (x, cos, sin)
            )
            ks, vs = list(ks), list(vs)
            for i in range(tc.num_hidden_layers):
                layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                q, k, v = layer.qkv(h, cos_c, sin_c)
                ks[i] = jax.lax.dynamic_update_slice_in_dim(ks[i], k, start, axis=1)
                vs[i] = jax.lax.dynamic_update_slice_in_dim(vs[i], v, start, axis=1)
                attn = ops_attention.prefix_attention(q, ks[i], vs[i], q_start=start, kv_mask=real)
                h = layer.finish(h, attn)
            hidden = jax.lax.dynamic_update_slice_in_dim(hidden, h, start, axis=1)
            return hidden, tuple(ks), tuple(vs)

        kv = jnp.zeros((b, t, tc.num_key_value_heads, tc.head_dim), x.dtype)
        layers = range(tc.num_hidden_layers)
        init = (jnp.zeros_like(x), tuple(kv for _ in layers), tuple(kv for _ in layers))
        hidden, ks, vs = jax.lax.fori_loop(0, -(-t // chunk), one_chunk, init)
        return self.language_model.final_norm(hidden), ks, vs

    def init_pages(self, num_pages: int, page_size: int) -> tuple[tuple, tuple]:
        """Empty page pools: per layer keys and values [K, num_pages, page_size, hd]."""
        t = self.cfg.text
        shape = (t.num_key_value_heads, num_pages, page_size, t.head_dim)
        layers = range(t.num_hidden_layers)
        return (
            tuple(jnp.zeros(shape, self.dtype) for _ in layers),
            tuple(jnp.zeros(shape, self.dtype) for _ in layers),
        )

    def paged_decode_step(
        self,
        tokens: jax.Array,
        next_pos: jax.Array,
        k_pages: tuple[jax.Array, ...],
        v_pages: tuple[jax.Array, ...],
        page_table: jax.Array,
        lengths: jax.Array,
        live: jax.Array,
        partition: paged.Partition | None = None,
    ):
        """One token per row over a paged cache.

        Args:
          tokens: [B] int32, the token each row feeds.
          next_pos: [B] int32, its M-RoPE position (the same on the three axes for text).
          k_pages, v_pages: per layer [K, P, ps, hd] page pools.
          page_table: [B, max_pages] int32, the pages of each row in order.
          lengths: [B] int32, tokens each row already holds; the new one is written at position
            `lengths` (its page must be in the table).
          live: [B] bool; rows that are False write nothing and read nothing (zeros).
          partition: under a mesh, how rows, pages and KV heads are split (`paged.Partition`:
            each shard's table indexes its own pages); None without one.

        Returns:
          (hidden [B, D], k_pages, v_pages).
        """
        b = tokens.shape[0]
        x = self.language_model.embed_tokens(tokens[:, None], self.dtype)
        cos, sin = self._cos_sin(jnp.broadcast_to(next_pos[None, :, None], (3, b, 1)))
        seen = jnp.where(live, lengths + 1, 0)
        impl = paged_implementation(self.attention_impl)
        graphdef, state = nnx.split(self.language_model.layers)
        new_k, new_v = [], []
        for i in range(self.cfg.text.num_hidden_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            q, k, v = layer.qkv(x, cos, sin)
            kp, vp = paged.write_decode(
                k_pages[i], v_pages[i], k[:, 0], v[:, 0], page_table, lengths, live, partition
            )
            attn = paged.paged_attention(
                q[:, 0], kp, vp, seen, page_table, impl=impl, partition=partition
            )
            x = layer.finish(x, attn[:, None])
            new_k.append(kp)
            new_v.append(vp)
        return self.language_model.final_norm(x)[:, 0], tuple(new_k), tuple(new_v)


def paged_implementation(attention_impl: str | None) -> str:
    """The `ops.paged_attention` implementation that goes with a model attention implementation."""
    return {
        "auto": "auto",
        "splash": "pallas_tpu",
        "pallas_gpu": "pallas_gpu",
        "dense": "dense",
    }.get(attention_impl, "xla")


# ---------------------------------------------------------------------------------------------
# Functional entry points: pure functions of (params, inputs[, cache]).
# ---------------------------------------------------------------------------------------------


def forward(graphdef: nnx.GraphDef, params: nnx.State, inputs: ModelInputs) -> jax.Array:
    """float32 logits [B, T, V]."""
    return nnx.merge(graphdef, params)(inputs)


def hidden_states(graphdef: nnx.GraphDef, params: nnx.State, inputs: ModelInputs) -> jax.Array:
    """Final hidden states [B, T, D]."""
    return nnx.merge(graphdef, params).hidden_states(inputs)


def prefill(graphdef, params, inputs: ModelInputs, cache: KVCache):
    """(hidden [B, T, D], cache)."""
    return nnx.merge(graphdef, params).prefill(inputs, cache)


def decode_step(graphdef, params, tokens: jax.Array, cache: KVCache):
    """(hidden [B, D], cache)."""
    return nnx.merge(graphdef, params).decode_step(tokens, cache)
