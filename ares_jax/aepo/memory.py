"""Per-device memory of the AEPO stage, from abstract shapes: counted, and compiled by XLA.

Nothing is allocated: the model comes from `params.abstract_model` (`jax.eval_shape`), every array
is a `jax.ShapeDtypeStruct` carrying the NamedSharding the mesh rules give it, so a 7B plan runs on
a laptop. Two sources, kept apart:

- analytic (`analytic_items`): the bytes of each array's shard on one device (`shard_bytes`),
  exact for parameters, optimizer state, the reference copy, gradient buffers, the learner batch
  and the KV cache; the activations are a formula over the same sizes (`text_activations`,
  `vision_activations`, `head_activations`), whose terms are listed where they are computed.
  Against XLA's temporaries of the update step, activations + gradient buffers come to
  0.84-0.86x on the CPU (tiny model, tests/plan_test.py allows 25%), 0.86-1.03x on TPU v5p for
  3B at 3k-9k tokens, and about 1.4x at the paper's 20k tokens, where XLA fuses more;
- XLA (`compile_phases`): `jit(f).lower(abstract inputs).compile().memory_analysis()` of the
  functions the stage really runs, for the mesh's devices: the learner's `train_step` and
  `logprob_pass` (aepo/learner.py) and the rollout's prefill and decode: with the paged engine
  (`rollout.engine='paged'`, the default) one admission (`engine._admit`) and one chunk of
  decode steps (`engine._decode_chunk`) on the engine's state split over the batch axes (page
  pools of `rollout.kv_pages`); with the static loop the sampler's `_prefill` and `_decode`
  (sampling/sampler.py). The static settings are those `aepo/train.py` derives from the config.

What lives at once (the phases of one iteration, aepo/train.py): the parameters, the optimizer
state and the reference model (a copy of the trainable parameters made at start-up) always; during
the rollout also the KV cache (the engine's page pools and slots, or the static loop's cache of one
generate call) and the prefill's or the decode loop's work space; during the log-prob passes
the learner batch and one micro-batch's forward pass; during an update the batch, the gradient
accumulator, one micro-batch's gradient and its activations. The optimizer moments take their
parameters' shardings (`learner.opt_state_shardings`).
The rollout runs on its own copy of the policy (`sampling/layout.py`, made once per iteration):
every parameter in the compute dtype, none split over the batch axes, so that the decode loop
gathers no weight per step. The prefill and the decode loop are compiled with that copy as
their argument (beside the cache); the policy's own parameters stay alive beside them
(`OUTSIDE`), and the copy is counted in the rollout's `rollout_work`.

Shapes are the worst case the config admits: prompts padded to the largest prompt bucket,
responses to the largest length bucket, one image per prompt as large as data.max_pixels allows
and the prompt length holds, a full micro-batch of rows. Inputs are placed as the stage places
them (`batching.learner_shardings`, `inputs.logical_axes`: token rows over the batch axes, images
whole). All four functions are compiled under `jax.set_mesh(mesh)`, so that the model's
`rules.constrain` pins the activations' batch sharding as the analytic count assumes; the sampler
runs so (`generate`), and the learner must too: called outside a mesh context, GSPMD is free to
replicate activations, and XLA's temporaries of the update step grow 1.5-2.4x (the smoke and
default presets on 8 CPU devices).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import batching as B
from ares_jax import runtime
from ares_jax.aepo import learner as Lr
from ares_jax.aepo import train as aepo_train
from ares_jax.models.qwen2_5_vl import config as model_config
from ares_jax.models.qwen2_5_vl import inputs as model_inputs
from ares_jax.models.qwen2_5_vl import model as model_lib
from ares_jax.models.qwen2_5_vl import params as model_params
from ares_jax.models.qwen2_5_vl.layers import remat_policy
from ares_jax.models.qwen2_5_vl.model import KVCache, ModelInputs, VisionInputs
from ares_jax.ops import attention as ops_attention
from ares_jax.ops import kl as K
from ares_jax.ops import paged_attention as paged
from ares_jax.parallel import rules as R
from ares_jax.sampling import engine as E
from ares_jax.sampling import layout as sampling_layout
from ares_jax.sampling import sampler as S

SDS = jax.ShapeDtypeStruct


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The static shapes of one AEPO iteration (what aepo/train.py pads to), whole mesh."""

    micro_batch: int  # rows per micro-batch
    num_micro: int  # micro-batches per optimizer step
    prompt_len: int  # P: the largest prompt bucket
    response_len: int  # T: the largest response bucket
    rows_per_prompt: int  # n, plus the spare rows of branching
    decode_prompts: int  # prompts per generate call
    image_tokens: int  # merged image tokens of a prompt's image (a square number)
    learner_images: int  # images per learner micro-batch (one per prompt)
    pack_tokens: int  # tokens of one packed learner row (train.pack_tokens); 0: padded rows

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def decode_rows(self) -> int:
        return self.decode_prompts * self.rows_per_prompt

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.response_len


def sizes(c, cfg: model_config.Qwen2_5_VLConfig) -> Sizes:
    """The worst-case shapes the config admits (module docstring)."""
    br = c.rollout.branching
    rows_per_prompt = c.rollout.n + (br.budget if br.enabled else 0)
    mb = c.train.micro_batch_size
    rows_per_step = c.train.prompts_per_step * rows_per_prompt
    prompt_len = max(c.data.prompt_len_buckets)
    unit = cfg.vision.patch_size * cfg.vision.spatial_merge_size  # pixels of one image token
    side = math.isqrt(min(c.data.max_pixels // unit**2, prompt_len))
    # Prompts whose rows one micro-batch holds: mini-batches start at a prompt's first row.
    if mb % rows_per_prompt:
        per_micro = -(-(mb - 1) // rows_per_prompt) + 1
    else:
        per_micro = mb // rows_per_prompt
    per_micro = min(c.train.prompts_per_step, per_micro)
    return Sizes(
        micro_batch=mb,
        num_micro=-(-rows_per_step // mb),
        prompt_len=prompt_len,
        response_len=max(c.rollout.length_buckets),
        rows_per_prompt=rows_per_prompt,
        decode_prompts=min(
            c.rollout.prompts_per_iter, max(1, c.rollout.decode_batch_size // rows_per_prompt)
        ),
        image_tokens=side * side,
        learner_images=per_micro,
        pack_tokens=int(c.train.pack_tokens),
    )


def _vision_rows(cfg: model_config.Qwen2_5_VLConfig, image_tokens: int, images: int) -> int:
    """Patch rows of the packed vision layout of `images` square images (positions.VisionMeta),
    their windows padded as the stages bucket them (`batching.window_bucket`)."""
    v = cfg.vision
    win = v.window_size // v.spatial_merge_size // v.patch_size  # merged units per window side
    windows = (-(-math.isqrt(image_tokens) // win)) ** 2
    return B.window_bucket(images * windows) * win * win * v.spatial_merge_size**2


# ---------------------------------------------------------------------------------------------
# Abstract, sharded inputs
# ---------------------------------------------------------------------------------------------


def shard_bytes(x) -> int:
    """Bytes of the shard of `x` (array or ShapeDtypeStruct with a sharding) on one device."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def tree_bytes(tree) -> int:
    """Sum of `shard_bytes` over the leaves of a pytree."""
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree))


def _rules(c):
    return tuple(tuple(r) for r in c.mesh.rules) or None


def _sds(mesh, rules, shape, dtype, axes) -> SDS:
    """A ShapeDtypeStruct sharded by logical `axes` (None entries replicated)."""
    spec = R.logical_to_spec(axes, rules, shape=shape, mesh=mesh)
    return SDS(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))


def _replicated(mesh, shape, dtype) -> SDS:
    return SDS(tuple(shape), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass
class Setup:
    """Everything abstract one plan needs; built by `setup` (nothing allocated)."""

    c: object
    mesh: jax.sharding.Mesh
    cfg: model_config.Qwen2_5_VLConfig
    sizes: Sizes
    graphdef: nnx.GraphDef
    trainable: nnx.State
    frozen: nnx.State
    optimizer: optax.GradientTransformation
    state: Lr.TrainState
    batch: Lr.LearnerBatch
    settings: Lr.LearnerSettings
    sampling: S.SamplingParams
    # The static loop: one generate call's prompts and its dense cache. The paged engine
    # (`engine` set): one admission's prompts and the engine's state (pools, tables, outputs).
    prefill_inputs: ModelInputs
    cache: KVCache | E._State
    compute_dtype: jnp.dtype
    rollout_graphdef: nnx.GraphDef  # the whole model's (trainable and frozen parts merged)
    rollout_params: nnx.State  # the rollout's copy of the policy (`sampling.layout`)
    engine: E._Plan | None = None  # the paged engine's split over the mesh (rollout.engine)
    requests: E._Requests | None = None  # one admission's rows
    platform: str = "tpu"  # the platform planned for: its attention blocks (`text_activations`)


def model_cfg(c) -> model_config.Qwen2_5_VLConfig:
    """The model's shapes: the checkpoint's config.json if model.path is set, else the preset."""
    if c.model.path:
        return model_config.Qwen2_5_VLConfig.from_file(c.model.path)
    return model_config.preset(c.model.preset)


def _abstract_policy(c, mesh, cfg):
    kwargs = dict(
        dtype=runtime.DTYPES[c.model.dtype],
        param_dtype=runtime.DTYPES[c.model.param_dtype],
        scan_layers=c.model.scan_layers,
        remat=c.model.remat,
        attention_impl=c.model.attention,
    )
    graphdef, state = nnx.split(model_params.abstract_model(cfg, **kwargs))
    shardings = model_params.param_shardings(state, mesh, _rules(c))
    state = nnx.from_flat_state(
        [
            (k, v.replace(SDS(v.get_value().shape, v.get_value().dtype, sharding=shardings[k])))
            for k, v in nnx.to_flat_state(state)
        ]
    )
    return Lr.split_params(nnx.merge(graphdef, state), freeze_vision=c.model.freeze_vision)


def _opt_state(optimizer, trainable):
    """Abstract optimizer state, each moment on its parameter's sharding
    (`learner.opt_state_shardings`)."""
    shapes = jax.eval_shape(optimizer.init, trainable)
    return _placed(shapes, Lr.opt_state_shardings(optimizer, trainable))


def _vision_inputs(rows: int, lead: tuple, patch_dim: int) -> VisionInputs:
    """Unsharded VisionInputs of `rows` patch rows (packed layout), leading shape `lead`."""
    return VisionInputs(
        pixels=SDS((*lead, rows, patch_dim), jnp.float32),
        rotary_pos=SDS((*lead, rows, 2), jnp.int32),
        segment_ids=SDS((*lead, rows), jnp.int32),
        unpermute=SDS((*lead, rows // 4), jnp.int32),
    )


def _placed(tree, shardings):
    """`tree` of ShapeDtypeStructs with the matching `shardings`."""
    return jax.tree.map(lambda x, s: SDS(x.shape, x.dtype, sharding=s), tree, shardings)


def pack_rows(mesh, rules, z: Sizes) -> int:
    """Packed rows per learner micro-batch: one per device of the batch axes (aepo/train.py)."""
    return R.ways(mesh, rules, R.BATCH, z.micro_batch)


def _learner_batch(mesh, rules, cfg, z: Sizes) -> Lr.LearnerBatch:
    """The abstract LearnerBatch of one optimizer step, placed as aepo/train.py places it
    (`batching.learner_shardings`: rows over the batch axes, images whole); packed rows of
    `z.pack_tokens` tokens when the config packs."""
    m, mb, s, t = z.num_micro, z.micro_batch, z.seq_len, z.response_len
    rows, mask_dtype, packing = mb, jnp.bool_, None
    if z.pack_tokens:
        rows, s, mask_dtype = pack_rows(mesh, rules, z), z.pack_tokens, jnp.int32
        packing = Lr.Packing(targets=SDS((m, rows, s), jnp.int32), index=SDS((m, mb, t), jnp.int32))
    vision, index = None, None
    if z.image_tokens:
        vrows = _vision_rows(cfg, z.image_tokens, z.learner_images)
        vision = _vision_inputs(vrows, (m,), cfg.vision.patch_dim)
        index = SDS((m, rows, s), jnp.int32)
    inputs = ModelInputs(
        input_ids=SDS((m, rows, s), jnp.int32),
        attention_mask=SDS((m, rows, s), mask_dtype),
        position_ids=SDS((m, 3, rows, s), jnp.int32),
        image_index=index,
        vision=vision,
    )
    per_row = lambda dtype: SDS((m, mb), dtype)  # noqa: E731
    per_token = lambda dtype: SDS((m, mb, t), dtype)  # noqa: E731
    batch = Lr.LearnerBatch(
        inputs=inputs,
        tokens=per_token(jnp.int32),
        mask=per_token(jnp.bool_),
        advantages=per_row(jnp.float32),
        bucket=per_row(jnp.int32),
        correct=per_row(jnp.bool_),
        soft_cost=per_row(jnp.float32),
        window_mask=per_token(jnp.bool_),
        row_valid=per_row(jnp.bool_),
        old_logp=per_token(jnp.float32),
        ref_logp=per_token(jnp.float32),
        packing=packing,
    )
    return _placed(batch, B.learner_shardings(batch, mesh, rules))


def _sampling(c, cfg, z: Sizes) -> S.SamplingParams:
    """SamplingParams of the rollout, as aepo/train.py builds them; the stop tokens and the
    vocabulary limit come from the tokenizer there and do not change the memory."""
    br = c.rollout.branching
    return S.SamplingParams(
        n=c.rollout.n,
        max_new_tokens=z.response_len,
        temperature=c.rollout.temperature,
        top_p=c.rollout.top_p,
        top_k=c.rollout.top_k,
        stop_token_ids=(cfg.eos_token_id,),
        pad_token_id=cfg.pad_token_id,
        logit_bias=((cfg.image_token_id, float(c.rollout.image_token_logit_bias)),),
        topk_entropy=c.entropy.topk if c.entropy.estimator != "exact" else 0,
        branching=S.BranchingParams(
            enabled=bool(br.enabled),
            budget=int(br.budget),
            window=int(c.entropy.window),
            cooldown=int(br.cooldown),
        ),
    )


def setup(c, mesh: jax.sharding.Mesh, platform: str | None = None) -> Setup:
    """Abstract parameters, optimizer state, learner batch, prompts and KV cache on `mesh`, for
    `platform` (default: that of the mesh's devices, else the default backend)."""
    cfg = model_cfg(c)
    z = sizes(c, cfg)
    rules = _rules(c)
    cdt = runtime.DTYPES[c.model.dtype]
    graphdef, trainable, frozen = _abstract_policy(c, mesh, cfg)
    optimizer = aepo_train.make_optimizer(c)
    state = Lr.TrainState(
        trainable=trainable,
        opt_state=_opt_state(optimizer, trainable),
        beta=jax.tree.map(
            lambda x: _replicated(mesh, x.shape, x.dtype),
            K.init_beta_states(ranks=c.kl.beta_cadence.ranks),
        ),
        kappa=_replicated(mesh, (3,), jnp.float32),
        step=_replicated(mesh, (), jnp.int32),
    )
    rollout_graphdef, full = nnx.split(Lr.merge(graphdef, trainable, frozen))
    rollout_params = sampling_layout.abstract_rollout_params(
        rollout_graphdef, full, mesh, dtype=cdt, rules=rules
    )
    sampling = _sampling(c, cfg, z)
    ep = aepo_train._engine(c)
    pl = requests = None
    if ep is not None:
        pl = E.plan(ep, sampling, z.prompt_len, cfg.text.num_key_value_heads, mesh)
    # The prompts of one prefill, placed as the sampler places them (rows over `batch`): one
    # generate call's (static loop), or one admission's, prefill_prompts per shard (engine).
    b, p = (pl.shards * ep.prefill_prompts if pl else z.decode_prompts), z.prompt_len
    vision, index = None, None
    if z.image_tokens:
        vision = _vision_inputs(_vision_rows(cfg, z.image_tokens, b), (), cfg.vision.patch_dim)
        index = SDS((b, p), jnp.int32)
    prompts = ModelInputs(
        input_ids=SDS((b, p), jnp.int32),
        attention_mask=SDS((b, p), jnp.bool_),
        position_ids=SDS((3, b, p), jnp.int32),
        image_index=index,
        vision=vision,
    )
    if pl is None:
        axes = model_inputs.logical_axes(prompts)
        prefill_inputs = _placed(prompts, R.tree_shardings(mesh, axes, prompts))
        cache = abstract_cache(rollout_graphdef, full, mesh, rules, z.decode_rows, z.cache_len)
    else:
        prefill_inputs, cache, requests = _engine_arrays(
            mesh,
            pl,
            prompts,
            E._abstract_state(rollout_graphdef, rollout_params, pl, sampling),
            sampling.rows_per_prompt,
        )
    return Setup(
        c=c,
        mesh=mesh,
        cfg=cfg,
        sizes=z,
        graphdef=graphdef,
        trainable=trainable,
        frozen=frozen,
        optimizer=optimizer,
        state=state,
        batch=_learner_batch(mesh, rules, cfg, z),
        settings=aepo_train._learner_settings(c, z.prompt_len),
        sampling=sampling,
        prefill_inputs=prefill_inputs,
        cache=cache,
        compute_dtype=cdt,
        rollout_graphdef=rollout_graphdef,
        rollout_params=rollout_params,
        engine=pl,
        requests=requests,
        platform=platform or _platform(mesh),
    )


def _platform(mesh) -> str:
    devices = getattr(mesh, "devices", None)
    if devices is not None and devices.size:
        return devices.flat[0].platform
    device = getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def _engine_arrays(mesh, pl: E._Plan, prompts: ModelInputs, state: E._State, rows: int):
    """The engine's admission prompts, state and requests with the shardings it gives them
    (`engine._run`: rows, slots and pages over the batch axes of `pl`, the rest whole)."""
    whole = lambda x: _replicated(mesh, x.shape, x.dtype)  # noqa: E731

    def split(x, dims):
        spec = pl.partition.spec(*dims, *[None] * (len(x.shape) - len(dims)))
        return SDS(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    by_row = lambda x: split(x, ("rows",))  # noqa: E731
    inputs = ModelInputs(
        input_ids=by_row(prompts.input_ids),
        attention_mask=by_row(prompts.attention_mask),
        position_ids=split(prompts.position_ids, (None, "rows")),
        image_index=None if prompts.image_index is None else by_row(prompts.image_index),
        vision=None if prompts.vision is None else jax.tree.map(whole, prompts.vision),
    )
    dims = E._state_dims(len(state.k_pages))
    flat_dims = jax.tree.leaves(dims, is_leaf=paged.is_dims)
    leaves, tree = jax.tree.flatten(state)
    state = jax.tree.unflatten(tree, [split(x, d) for x, d in zip(leaves, flat_dims, strict=True)])
    a = pl.shards * pl.ep.prefill_prompts * rows  # one admission's rows (per prompt: `rows`)
    requests = E._Requests(*[by_row(SDS((a,), jnp.int32)) for _ in E._Requests._fields])
    return inputs, state, requests


# The logical axes of a KV cache buffer: the model's (`model.KV_AXES`) where it names them.
KV_AXES = getattr(model_lib, "KV_AXES", (R.BATCH, R.KV_LENGTH, R.KV_HEADS, R.HEAD_DIM))


def abstract_cache(graphdef, params, mesh, rules, rows: int, length: int) -> KVCache:
    """The abstract KV cache of `rows` rows and `length` slots, as the model builds it
    (`init_cache`, in its compute dtype), each buffer sharded by `KV_AXES`."""
    shapes = jax.eval_shape(lambda: nnx.merge(graphdef, params).init_cache(rows, length))
    kv = lambda x: _sds(mesh, rules, x.shape, x.dtype, KV_AXES)  # noqa: E731
    return KVCache(
        k=tuple(map(kv, shapes.k)),
        v=tuple(map(kv, shapes.v)),
        valid=_sds(mesh, rules, shapes.valid.shape, jnp.bool_, (R.BATCH, R.KV_LENGTH)),
        index=_replicated(mesh, (), jnp.int32),
        next_pos=_sds(mesh, rules, shapes.next_pos.shape, jnp.int32, (R.BATCH,)),
    )


# ---------------------------------------------------------------------------------------------
# Analytic activations
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """How many ways the mesh splits each dimension that activations carry, for one plan."""

    batch: int  # rows of a learner micro-batch
    decode_batch: int  # rows of a generate call
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    patches: int  # vision rows of a learner micro-batch
    vision_heads: int
    vision_mlp: int


_ways = R.ways


def split(x: Setup) -> Split:
    """The `Split` of a plan, by the same rules that shard its arrays."""
    mesh, rules, cfg, z = x.mesh, _rules(x.c), x.cfg, x.sizes
    t, v = cfg.text, cfg.vision
    vrows = _vision_rows(cfg, z.image_tokens, z.learner_images) if z.image_tokens else 1
    return Split(
        batch=_ways(mesh, rules, R.BATCH, z.micro_batch),
        decode_batch=_ways(mesh, rules, R.BATCH, z.decode_rows),
        heads=_ways(mesh, rules, R.HEADS, t.num_attention_heads),
        kv_heads=_ways(mesh, rules, R.KV_HEADS, t.num_key_value_heads),
        mlp=_ways(mesh, rules, R.MLP, t.intermediate_size),
        vocab=_ways(mesh, rules, R.VOCAB, t.vocab_size),
        patches=_ways(mesh, rules, R.PATCHES, vrows),
        vision_heads=_ways(mesh, rules, R.VISION_HEADS, v.num_heads),
        vision_mlp=_ways(mesh, rules, R.VISION_MLP, v.intermediate_size),
    )


# The query and key block of ops/attention.py's blockwise path (its default off a CPU).
BLOCKWISE_BLOCK = ops_attention.BLOCK


def text_activations(
    cfg,
    sp: Split,
    *,
    rows: float,
    seq: int,
    c: int,
    remat: str | bool,
    backward: bool,
    flash: bool = False,
    blockwise: bool = False,
    block: int = BLOCKWISE_BLOCK,
) -> int:
    """Bytes per device of the text decoder's activations for `rows` rows of `seq` tokens.

    Terms, per token and layer ("linear"): the inputs and outputs of the two norms (4 D), q, k, v
    before and after the rotation (3 H/t + 3 K/t head dims), the attention output (H/t), the
    MLP's gate, up, SiLU and product (4 F/t), all in the compute dtype; per row and layer the
    attention scores [H/t, seq, seq]: float32 logits and compute-dtype probabilities forward,
    plus one compute-dtype gradient of them backward (XLA's attention materialises them).
    Shared by the layers: the boolean [seq, seq] mask per row, M-RoPE cos/sin, the embeddings
    and the final hidden states. Forward only, one layer is alive at a time. With backward, what
    every layer keeps is the remat policy's (`_kept`), one layer is recomputed unless it is
    'none', and one layer's gradients live beside them. `flash` (cuDNN attention)
    keeps one softmax statistic per query and head instead of the scores. `blockwise`
    (ops/attention.py) keeps that statistic too, works on one [block, block] tile of float32
    scores per row and head at a time (`block`: its block length on the platform), and takes
    [seq] segment ids per row instead of the [seq, seq] mask.
    """
    t = cfg.text
    d, dh = t.hidden_size, t.head_dim
    h, k = t.num_attention_heads / sp.heads, t.num_key_value_heads / sp.kv_heads
    f = t.intermediate_size / sp.mlp
    linear = rows * seq * c * (4 * d + (3 * h + 3 * k) * dh + h * dh + 4 * f)
    scores = rows * h * seq * (1 if flash or blockwise else seq)
    residual = rows * seq * d * c
    mask = rows * seq * 4 if blockwise else rows * seq * seq
    shared = mask + 2 * rows * seq * dh * c + 2 * residual
    if blockwise:  # one tile of logits, probabilities and their gradient at a time
        tile = min(block, seq)
        shared += 3 * rows * h * tile * tile * 4
    if not backward:
        return int(shared + linear + scores * (4 + c))
    # The named residuals: the attention output and its per-query log-sum-exp (float32).
    attention = rows * seq * h * dh * c + rows * h * seq * 4 if blockwise else 0
    dots = rows * seq * c * ((h + 2 * k) * dh + 2 * d + 2 * f)  # q, k, v, o, gate, up, down
    layer = linear + scores * (4 + c)  # everything of one layer (recomputed if checkpointed)
    kept = t.num_hidden_layers * _kept(remat, residual, layer, attention, dots)
    kept += 0 if remat_policy(remat) == "none" else layer
    return int(shared + kept + linear + scores * c)


def _kept(remat: str | bool, residual: float, everything: float, attention: float, dots: float):
    """Bytes one layer keeps for the backward pass under a remat policy (models/qwen2_5_vl/
    layers.py REMAT_POLICIES): 'none' every intermediate; 'full' and 'offload' (attention
    residuals in host memory) the layer's input; 'attention' the input and the attention kernel's
    output and log-sum-exp (kernels whose residuals carry no name keep only the input: cuDNN's,
    XLA's dense attention); 'dots' the input and every matmul output."""
    policy = remat_policy(remat)
    if policy == "none":
        return everything
    return residual + {"attention": attention, "dots": dots}.get(policy, 0)


def head_activations(
    cfg, sp: Split, *, rows: float, tokens: int, chunk: int, backward: bool
) -> int:
    """Bytes per device of the chunked log-prob/entropy kernel (ops/entropy.py) on `rows` rows of
    `tokens` response positions: the unembedding gathered in float32 (the kernel's weight
    blocks), one chunk's float32 logits-sized temporaries (3 forward, 5 backward), the
    three saved float32 statistics per position, and, with backward, the float32 gradient
    of the unembedding and of the hidden states."""
    t = cfg.text
    v = t.vocab_size / sp.vocab
    c_ = min(chunk, tokens)
    weight = t.hidden_size * v * 4
    per_chunk = rows * c_ * v * 4
    stats = 3 * rows * tokens * 4
    if not backward:
        return int(weight + 3 * per_chunk + stats)
    return int(2 * weight + 5 * per_chunk + stats + rows * tokens * t.hidden_size * 4)


def vision_activations(
    cfg,
    sp: Split,
    *,
    vrows: int,
    c: int,
    remat: str | bool,
    backward: bool,
    flash: bool = False,
) -> int:
    """Bytes per device of the vision tower on `vrows` patch rows (packed layout), rows split
    `sp.patches` ways. As `text_activations`, per row and block: the norms (4 Dv), q, k, v and the
    rotated q, k in float32, the attention output, the MLP (4 Fv/t), and the scores of the window
    attention (float32 logits and probabilities over a window's rows, and one gradient of them
    backward); full attention is blockwise (`ops.attention`), one statistic per query, whatever
    the model's attention (`flash` is accepted for symmetry with `text_activations`); then the
    merger's inputs and outputs."""
    del flash
    v = cfg.vision
    r = vrows / sp.patches
    dv, hd = v.hidden_size, v.head_dim
    h, f = v.num_heads / sp.vision_heads, v.intermediate_size / sp.vision_mlp
    linear = r * (c * (4 * dv + 4 * h * hd + 4 * f) + 4 * 2 * h * hd)
    window_rows = (
        v.window_size // v.spatial_merge_size // v.patch_size
    ) ** 2 * v.spatial_merge_size**2
    scores = r * h * (window_rows + 1)
    residual = r * dv * c
    features = r / 4 * (4 * dv + cfg.text.hidden_size) * c
    if not backward:
        return int(2 * residual + linear + scores * (4 + c) + features)
    # Every block keeps its full-attention branch's residuals (lax.cond keeps both branches').
    attention = r * (h * hd * c + h * 4)
    dots = r * c * (3 * h * hd + 2 * dv + 2 * f)
    layer = linear + scores * (4 + c)
    kept = v.depth * _kept(remat, residual, layer, attention, dots)
    kept += 0 if remat_policy(remat) == "none" else layer
    return int(kept + linear + scores * c + features)


# ---------------------------------------------------------------------------------------------
# Analytic items and phases
# ---------------------------------------------------------------------------------------------

ITEMS = {
    "parameters": "parameters, trainable + frozen, in model.param_dtype",
    "optimizer": "AdamW moments (mu in optim.state_dtype, nu in the parameters' dtype)",
    "reference": "the reference policy: train.py's copy of the trainable parameters "
    "(model.reference_dtype)",
    "gradients": "gradient accumulator + one micro-batch's gradient, parameters' dtype",
    "learner_batch": "the learner batch of one optimizer step (ids, positions, images, log-probs)",
    "activations": "one micro-batch forward + backward (remat policy of model.remat)",
    "logprob_pass": "one micro-batch forward of the old/reference log-prob pass + its outputs",
    "kv_cache": "KV cache of one generate call (decode rows x (prompt + response) x layers); "
    "with the paged engine its state: the page pools (rollout.kv_pages), page tables and the "
    "slots' output buffers",
    "rollout_work": "the rollout's copy of the policy (sampling/layout.py: compute dtype, not "
    "split over the batch axes) + the prefill forward of one generate call or the decode "
    "loop's buffers",
}

PHASES = {
    "rollout": ("parameters", "optimizer", "reference", "kv_cache", "rollout_work"),
    "logprob": ("parameters", "optimizer", "reference", "learner_batch", "logprob_pass"),
    "update": (
        "parameters",
        "optimizer",
        "reference",
        "gradients",
        "learner_batch",
        "activations",
    ),
}


def analytic_items(x: Setup) -> dict[str, int]:
    """Bytes per device of every item of `ITEMS` (module docstring: which are exact)."""
    cfg, z, sp = x.cfg, x.sizes, split(x)
    common = dict(
        c=np.dtype(x.compute_dtype).itemsize,
        remat=remat_policy(x.c.model.remat),
        flash=x.c.model.attention == "cudnn",
    )
    rows = z.micro_batch / sp.batch
    vrows = _vision_rows(cfg, z.image_tokens, z.learner_images) if z.image_tokens else 0
    # Padded: every row is prompt + response long and the head runs on the response positions.
    # Packed: one row of pack_tokens per device, and the head runs on all of its positions.
    seq_rows, seq, head_tokens = rows, z.seq_len, z.response_len
    if z.pack_tokens:
        seq_rows = pack_rows(x.mesh, _rules(x.c), z) / sp.batch
        seq = head_tokens = z.pack_tokens

    def micro_batch(backward: bool) -> int:
        total = text_activations(
            cfg,
            sp,
            rows=seq_rows,
            seq=seq,
            backward=backward,
            # The full forward's; not the prefill's. Splash and the Pallas GPU kernel hold what
            # the blockwise path holds (one statistic per query, tiles in on-chip memory).
            blockwise=x.c.model.attention in ("auto", "blockwise", "splash", "pallas_gpu"),
            block=ops_attention.default_block(
                "xla" if x.c.model.attention in ("auto", "blockwise") else x.c.model.attention,
                x.platform,
            ),
            **common,
        )
        total += head_activations(
            cfg,
            sp,
            rows=seq_rows,
            tokens=head_tokens,
            chunk=x.c.train.logprob_chunk_size,
            backward=backward,
        )
        if vrows:
            total += vision_activations(cfg, sp, vrows=vrows, backward=backward, **common)
        return total

    # The rollout: the prefill's forward over one generate call's prompts (static loop) or one
    # admission's (engine: prefill_prompts per shard), layers unrolled, no backward; or the
    # decode loop's per-row buffers ([rows, T] x 8; the engine keeps them in its state, counted
    # as kv_cache) and per-step logits.
    # With `rollout.prefill_chunk` the layers see one chunk at a time (its queries against
    # blocks of keys), beside the whole prompt's embeddings, hidden states, cos/sin and the
    # keys and values of every layer, carried from chunk to chunk.
    ways = lambda name, size: _ways(x.mesh, _rules(x.c), name, size)  # noqa: E731
    prompts = x.prefill_inputs.input_ids.shape[0]
    prompt_rows = prompts / ways(R.BATCH, prompts)
    chunk = x.engine.ep.prefill_chunk if x.engine is not None else 0
    chunked = 0 < chunk < z.prompt_len
    prefill = text_activations(
        cfg,
        sp,
        rows=prompt_rows,
        seq=chunk if chunked else z.prompt_len,
        backward=False,
        **{**common, "flash": common["flash"] or chunked},
    )
    if chunked:
        t, c = cfg.text, common["c"]
        kv = 2 * t.num_hidden_layers * t.num_key_value_heads / sp.kv_heads * t.head_dim
        prefill += prompt_rows * z.prompt_len * c * (2 * t.hidden_size + 2 * t.head_dim + kv)
    if z.image_tokens:
        prefill_rows = _vision_rows(cfg, z.image_tokens, prompts)
        prefill += vision_activations(
            cfg,
            dataclasses.replace(sp, patches=ways(R.PATCHES, prefill_rows)),
            vrows=prefill_rows,
            backward=False,
            **common,
        )
    if x.engine is not None:
        n = x.engine.slots
        decode = 6 * n * cfg.text.vocab_size / sp.vocab * 4
    else:
        n = z.decode_rows / sp.decode_batch
        decode = n * z.response_len * 4 * 8 + 6 * n * cfg.text.vocab_size / sp.vocab * 4

    trainable = tree_bytes(x.trainable)
    # The reference as aepo/train.py builds it (`learner.reference_params`): in the compute dtype
    # where that is narrower than the stored parameters and model.reference_dtype says so.
    ref_shapes = jax.eval_shape(
        lambda tr: Lr.reference_params(tr, x.compute_dtype, x.c.model.reference_dtype),
        x.trainable,
    )
    reference = tree_bytes(_placed(ref_shapes, jax.tree.map(lambda a: a.sharding, x.trainable)))
    outputs = 2 * z.num_micro * rows * z.response_len * 4  # log-probs and entropies
    return {
        "parameters": trainable + tree_bytes(x.frozen),
        "optimizer": tree_bytes(x.state.opt_state),
        "reference": reference,
        "gradients": 2 * trainable,
        "learner_batch": tree_bytes(x.batch),
        "activations": micro_batch(backward=True),
        "logprob_pass": int(micro_batch(backward=False) + outputs),
        "kv_cache": tree_bytes(x.cache),
        "rollout_work": tree_bytes(x.rollout_params) + int(max(prefill, decode)),
    }


def phase_totals(items: dict[str, int]) -> dict[str, int]:
    """Analytic bytes per device of each phase of `PHASES`."""
    return {phase: sum(items[k] for k in keys) for phase, keys in PHASES.items()}


# ---------------------------------------------------------------------------------------------
# XLA
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compiled:
    """XLA's memory analysis of one compiled function, bytes per device."""

    argument: int
    output: int
    alias: int
    temp: int
    code: int

    @property
    def peak(self) -> int:
        """Arguments + outputs not aliased to a donated argument + temporaries + code."""
        return self.argument + self.output - self.alias + self.temp + self.code

    @classmethod
    def of(cls, compiled) -> Compiled:
        m = compiled.memory_analysis()
        return cls(
            argument=int(m.argument_size_in_bytes),
            output=int(m.output_size_in_bytes),
            alias=int(m.alias_size_in_bytes),
            temp=int(m.temp_size_in_bytes),
            code=int(m.generated_code_size_in_bytes),
        )


def lower_update(x: Setup):
    """The learner's update step, jitted as aepo/train.py jits it (state donated)."""
    step = jax.jit(
        Lr.train_step, static_argnums=0, static_argnames=("optimizer", "s"), donate_argnums=(1,)
    )
    denom = _replicated(x.mesh, (), jnp.float32)
    with jax.set_mesh(x.mesh):
        return step.lower(
            x.graphdef, x.state, x.frozen, x.batch, denom, optimizer=x.optimizer, s=x.settings
        )


def lower_logprob(x: Setup):
    """The old/reference log-prob pass over all micro-batches, as aepo/train.py jits it."""
    fn = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))
    with jax.set_mesh(x.mesh):
        return fn.lower(
            x.graphdef,
            x.trainable,
            x.frozen,
            x.batch.inputs,
            x.batch.tokens,
            x.settings,
            x.batch.packing,
            x.batch.row_valid,
        )


def lower_prefill(x: Setup):
    """The sampler's prefill of one generate call on the rollout's copy of the policy (mesh set,
    as `generate` runs it); with the paged engine, one admission (`engine._admit`: prefill,
    pages written, first tokens drawn) on the donated engine state."""
    graphdef, params = x.rollout_graphdef, x.rollout_params
    if x.engine is not None:
        key = _replicated(x.mesh, (2,), jnp.uint32)
        with jax.set_mesh(x.mesh):
            return E._admit.lower(
                graphdef,
                params,
                x.cache,
                x.prefill_inputs,
                None,
                x.requests,
                x.sampling,
                x.engine,
                key,
            )
    with jax.set_mesh(x.mesh):
        return S._prefill.lower(graphdef, params, x.prefill_inputs, x.sampling, x.sizes.cache_len)


def lower_decode(x: Setup):
    """The sampler's decode loop of one generate call on the rollout's copy of the policy, on a
    donated cache; with the paged engine, one chunk of decode steps (`engine._decode_chunk`) on
    the donated engine state."""
    graphdef, params = x.rollout_graphdef, x.rollout_params
    if x.engine is not None:
        with jax.set_mesh(x.mesh):
            return E._decode_chunk.lower(graphdef, params, x.cache, x.sampling, x.engine)
    n, d = x.sizes.decode_rows, x.cfg.text.hidden_size
    rules = _rules(x.c)
    hidden = _sds(x.mesh, rules, (n, d), x.compute_dtype, (R.BATCH, None))
    key = _replicated(x.mesh, (2,), jnp.uint32)
    tau = _replicated(x.mesh, (), jnp.float32)
    first = _replicated(x.mesh, (), jnp.int32)  # the first prompt's index
    # As `generate` compiles it on a mesh: where the sampler leaves the cache's layout to XLA
    # (`lower_decode`), that; else the jitted `_decode` with the cache in the default layout.
    lower = getattr(S, "lower_decode", None) or S._decode.lower
    with jax.set_mesh(x.mesh):
        return lower(graphdef, params, x.cache, hidden, x.sampling, key, tau, first)


LOWERINGS: dict[str, Callable] = {
    "update": lower_update,
    "logprob": lower_logprob,
    "prefill": lower_prefill,
    "decode": lower_decode,
}


def argument_bytes(name: str, x: Setup) -> int:
    """Bytes per device of the arguments of compiled function `name` (shard sizes)."""
    trees = {
        "update": (x.state, x.frozen, x.batch),
        "logprob": (
            x.trainable,
            x.frozen,
            x.batch.inputs,
            x.batch.tokens,
            x.batch.packing,
            x.batch.row_valid,
        ),
        "prefill": (x.rollout_params, x.prefill_inputs)
        + ((x.cache, x.requests) if x.engine is not None else ()),
        "decode": (x.rollout_params, x.cache),
    }
    return tree_bytes(trees[name])


# What stays alive beside each compiled function but is not one of its arguments (analytic). The
# rollout's functions take the rollout's copy of the policy; the policy itself stays alive.
OUTSIDE = {
    "update": ("reference",),
    "logprob": ("optimizer", "reference"),
    "prefill": ("parameters", "optimizer", "reference"),
    "decode": ("parameters", "optimizer", "reference"),
}


def compile_phases(x: Setup, report: Callable[[str], object] = lambda name: None):
    """Compiles the four functions for the mesh; returns {name: Compiled}. `report(name)` is
    entered as a context manager around each compilation (progress display)."""
    out = {}
    for name, lower in LOWERINGS.items():
        with report(name):
            out[name] = Compiled.of(lower(x).compile())
    return out


def xla_phase_totals(compiled: dict[str, Compiled], items: dict[str, int]) -> dict[str, int]:
    """Per phase: XLA's peak of the compiled function plus the analytic bytes of what stays
    alive beside it (`OUTSIDE`); the rollout is the larger of prefill and decode."""
    total = {name: c.peak + sum(items[k] for k in OUTSIDE[name]) for name, c in compiled.items()}
    return {
        "rollout": max(total["prefill"], total["decode"]),
        "logprob": total["logprob"],
        "update": total["update"],
    }
