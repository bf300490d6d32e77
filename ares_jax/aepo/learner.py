"""The AEPO learner: teacher-forced log-probs, and the update with exact gradient accumulation.

Everything here is jitted and works on `LearnerBatch`es: micro-batches stacked on a leading axis
[M, ...], each with the full sequences of its rows (prompt + response) and the images of its
prompts, all padded to static shapes on the host (`ares_jax/batching.py`).

One update (`train_step`, METHOD.md 4.7, 4.8, 4.11):
  1. for each micro-batch with a valid row, in a `lax.scan` (one of padding only is skipped
     under a `lax.cond`), do the following:
     - recompute the policy's log-probs of the response tokens;
     - estimate the per-token KL to the reference;
     - update the released per-bucket beta controller from this micro-batch's sequence KL,
       before its loss uses beta, as the released actor does, at the released cadence when asked
       (one state per rank of its launcher, one step per rank micro-batch);
     - form the clipped policy loss plus the weighted KL, as a (sum, denominator);
     - accumulate the gradient of the sum;
  2. divide by the mini-batch's total denominator (exact accumulation, whatever the micro-batch
     split), clip the global norm, take one AdamW step;
  3. if the loss or the gradient is not finite, or the step would make a parameter non-finite,
     keep the parameters and optimizer state, and report the step as skipped
     (`apply_if_finite`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ares_jax.batching import LearnerBatch, Packing  # noqa: F401 - re-exported
from ares_jax.models.qwen2_5_vl.model import ModelInputs
from ares_jax.ops import kl as K
from ares_jax.ops import policy_loss as PL
from ares_jax.ops.entropy import token_logprobs_and_entropy

# Where the log-prob head's unembedding and the reference's parameters are kept: 'param' = as
# stored (the master weights' dtype), 'compute' = cast to the compute dtype.
HEAD_DTYPES = REFERENCE_DTYPES = ("param", "compute")


@dataclasses.dataclass(frozen=True)
class LearnerSettings:
    """Static settings of the learner (from config.loss, config.kl, config.train)."""

    prompt_len: int
    temperature: float = 1.0
    chunk_size: int | None = None
    vocab_chunk_size: int | None = None
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float | None = 3.0
    logratio_clamp: float = 20.0
    agg: str = "seq-mean-token-mean"
    kl_estimator: str = "k3"
    kl_coef: float = 0.01
    kl_controller: str = "code"  # 'code' | 'paper' | 'fixed'
    beta_params: K.BetaControllerParams = K.DEFAULT_BETA_PARAMS
    # Cadence of the code controller (K.update_beta_cadence): independent states, one per rank of
    # the released launcher, each stepping once per `beta_rank_batch` of its rows (0: its share of
    # the learner micro-batch, i.e. one step per micro-batch).
    beta_ranks: int = 1
    beta_rank_batch: int = 0
    bucket_coef: tuple[float, float, float] = (1.0, 1.0, 1.0)
    rho: float = 0.5
    second_chance: bool = False
    second_chance_factor: float = 0.67
    second_chance_soft_cost_min: float = 0.5
    second_chance_easy_only: bool = True
    second_chance_incorrect_only: bool = True
    # dtype of the unembedding [D, V] in the log-prob head (config train.logprob_head_dtype):
    # 'param' = as stored (float32 master weights make 3 of the kernel's 4 vocabulary matmuls run
    # in float32 and gather a float32 copy of [D, V]); 'compute' = cast to the hidden states'
    # dtype, as the sampler's logits are (`Qwen2_5_VL.logits`). Either way the logits accumulate
    # in float32 and the gradient reaches the stored parameter (through the cast).
    head_dtype: str = "param"

    def __post_init__(self):
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(
                f"LearnerSettings: head_dtype={self.head_dtype!r} is not one of "
                + ", ".join(repr(x) for x in HEAD_DTYPES)
                + "."
            )


class TrainState(NamedTuple):
    trainable: nnx.State
    opt_state: optax.OptState
    beta: K.BetaState
    kappa: jax.Array  # [3]
    step: jax.Array  # int32, optimizer steps taken


def split_params(model: nnx.Module, *, freeze_vision: bool):
    """(graphdef, trainable, frozen): the vision tower is frozen when `freeze_vision` (frozen is
    an empty State otherwise)."""
    if freeze_vision:
        graphdef, frozen, trainable = nnx.split(model, nnx.PathContains("visual"), ...)
        return graphdef, trainable, frozen
    graphdef, trainable = nnx.split(model)
    return graphdef, trainable, nnx.State({})


def reference_params(trainable, compute_dtype, reference_dtype: str = "param"):
    """The KL reference's copy of the trainable parameters (config model.reference_dtype).

    'param': a copy as stored; 'compute': a copy in `compute_dtype` (in bfloat16, half the bytes
    of float32 master weights), never wider than stored (bfloat16 parameters under float32
    compute stay bfloat16). The reference only runs forward, and the model casts every weight to
    its compute dtype where it uses it, so the reference's hidden states are the same either
    way, bit for bit, and so are its log-probs when the head casts too
    (`LearnerSettings.head_dtype='compute'`). With head_dtype='param' the reference's head runs
    in the compute dtype and the policy's in float32: the KL to the reference then starts at
    bfloat16 rounding instead of 0. Always a fresh copy on the parameters' shardings (the update
    donates the trainable state). A frozen part (`split_params`) is not copied: the reference
    shares the policy's.
    """
    if reference_dtype not in REFERENCE_DTYPES:
        raise ValueError(
            f"reference_params: reference_dtype={reference_dtype!r} is not one of "
            + ", ".join(repr(x) for x in REFERENCE_DTYPES)
            + "."
        )

    def copy(x):
        narrower = jnp.dtype(compute_dtype).itemsize < x.dtype.itemsize
        if reference_dtype == "compute" and jnp.issubdtype(x.dtype, jnp.floating) and narrower:
            return jnp.array(x, dtype=compute_dtype, copy=True)
        return jnp.copy(x)

    return jax.tree.map(copy, trainable)


def merge(graphdef, trainable, frozen) -> nnx.Module:
    """The model from its two parameter parts."""
    if len(frozen) == 0:
        return nnx.merge(graphdef, trainable)
    return nnx.merge(graphdef, trainable, frozen)


def head_unembedding(model, hidden_dtype, s) -> jax.Array:
    """The unembedding [D, V] the log-prob head multiplies by: as stored, or in the compute dtype
    (`LearnerSettings.head_dtype`). `s` may be another stage's settings without the field
    (adacs/sft.py's SFTSettings): the parameter as stored, as before."""
    w = model.unembed()
    if getattr(s, "head_dtype", "param") == "compute":
        w = w.astype(hidden_dtype)
    return w


def response_logprobs(model, inputs: ModelInputs, tokens, s: LearnerSettings, packing=None):
    """Teacher-forced log-probs and entropies [mb, T] of the response tokens.

    Packed (`packing`, one micro-batch's [R, L] targets and [mb, T] index): the head runs over
    the R * L packed positions, whose targets are the tokens they predict, and each response
    token's values are gathered from the position that predicts it.
    """
    hidden = model.hidden_states(inputs)
    if packing is not None:
        logp, entropy = token_logprobs_and_entropy(
            hidden,
            head_unembedding(model, hidden.dtype, s),
            packing.targets,
            temperature=s.temperature,
            chunk_size=s.chunk_size,
            vocab_chunk_size=s.vocab_chunk_size,
        )
        flat = packing.index.reshape(-1)
        take = lambda x: jnp.take(x.reshape(-1), flat).reshape(packing.index.shape)  # noqa: E731
        return take(logp), take(entropy)
    t = tokens.shape[1]
    h = jax.lax.dynamic_slice_in_dim(hidden, s.prompt_len - 1, t, axis=1)
    return token_logprobs_and_entropy(
        h,
        head_unembedding(model, h.dtype, s),
        tokens,
        temperature=s.temperature,
        chunk_size=s.chunk_size,
        vocab_chunk_size=s.vocab_chunk_size,
    )


def _micro(batch: LearnerBatch, i):
    return jax.tree.map(lambda x: x[i], batch)


def logprob_pass(
    graphdef,
    trainable,
    frozen,
    inputs: ModelInputs,
    tokens,
    s: LearnerSettings,
    packing=None,
    row_valid=None,
):
    """Log-probs and entropies [M, mb, T] of every micro-batch, one after the other (lax.map).
    `packing`: the batch's, when it is packed. `row_valid` [M, mb] bool, optional: a micro-batch
    without a valid row is not computed (zeros)."""

    def one(xs):
        inp, tok, pk, ok = xs

        def run():
            return response_logprobs(merge(graphdef, trainable, frozen), inp, tok, s, pk)

        if ok is None:
            return run()
        shapes = jax.eval_shape(run)
        zeros = lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)  # noqa: E731
        return jax.lax.cond(jnp.any(ok), run, zeros)

    return jax.lax.map(one, (inputs, tokens, packing, row_valid))


def _sample_factor(mb: LearnerBatch, s: LearnerSettings):
    if not s.second_chance:
        return None
    return K.second_chance_factor(
        mb.bucket,
        mb.correct,
        mb.soft_cost,
        factor=s.second_chance_factor,
        soft_cost_min=s.second_chance_soft_cost_min,
        easy_only=s.second_chance_easy_only,
        incorrect_only=s.second_chance_incorrect_only,
    )


def _rank_batch(rows: int, s: LearnerSettings) -> int:
    """Rows per step of a rank's beta state (`K.update_beta_cadence`) in a micro-batch of `rows`
    entries (packed: R * slots, share-major, so rank r's rows are share r's when ranks = R)."""
    if rows % (s.beta_ranks * max(s.beta_rank_batch, 1)):
        raise ValueError(
            f"kl.beta_cadence: ranks x micro_batch ({s.beta_ranks} x {s.beta_rank_batch}) must "
            f"divide the learner micro-batch's {rows} rows (packed: packed rows x slots)."
        )
    return s.beta_rank_batch or rows // s.beta_ranks


def _loss(trainable, frozen, graphdef, mb: LearnerBatch, beta: K.BetaState, kappa, s):
    model = merge(graphdef, trainable, frozen)
    logp, entropy = response_logprobs(model, mb.inputs, mb.tokens, s, mb.packing)
    mask = mb.mask & mb.row_valid[:, None]
    kld, weights = None, None
    if s.kl_coef > 0:
        kld = K.kl_divergence(logp, mb.ref_logp, s.kl_estimator)
        beta_vec = jnp.asarray(s.bucket_coef, jnp.float32)
        factor = _sample_factor(mb, s)
        if s.kl_controller == "code":
            # The released actor steps its controller per rank micro-batch, then that micro-batch's
            # loss reads the rank's beta: each row gets its own (`row_beta`).
            rank_batch = _rank_batch(mb.bucket.shape[0], s)
            beta, row_beta = K.update_beta_cadence(
                beta,
                K.sequence_mean(jax.lax.stop_gradient(kld), mask),
                mb.bucket,
                params=s.beta_params,
                ranks=s.beta_ranks,
                rank_batch=rank_batch,
                valid=mb.row_valid,
            )
            factor = row_beta if factor is None else factor * row_beta
        elif s.kl_controller == "paper":
            beta_vec = beta_vec * beta.beta[0]  # the paper's base weights beta_d (beta_init)
        mode = "paper" if s.kl_controller == "paper" else "code"
        weights = K.kl_token_weights(
            mb.bucket,
            mask,
            mode=mode,
            kl_coef=s.kl_coef,
            beta=beta_vec,
            kappa=kappa if mode == "paper" else None,
            window_mask=mb.window_mask if mode == "paper" else None,
            rho=s.rho,
            sample_factor=factor,
        )
    terms = PL.policy_loss(
        logp,
        mb.old_logp,
        mb.advantages,
        mask,
        kl=kld,
        kl_weight=weights,
        clip_low=s.clip_low,
        clip_high=s.clip_high,
        dual_clip=s.dual_clip,
        agg=s.agg,
        logratio_clamp=s.logratio_clamp,
    )
    # Per-bucket sums of the KL to the reference and their token counts, [2, 3].
    onehot = jax.nn.one_hot(mb.bucket, 3, dtype=jnp.float32)  # [mb, 3]
    kl_tok = jnp.where(mask, kld, 0.0) if kld is not None else jnp.zeros(mask.shape)
    kl_sum = jnp.stack([kl_tok.sum(1) @ onehot, mask.sum(1).astype(jnp.float32) @ onehot])
    entropy_sum = jnp.sum(jnp.where(mask, entropy, 0.0))
    return terms.loss_sum, (terms, beta, kl_sum, entropy_sum)


def train_step(
    graphdef,
    state: TrainState,
    frozen,
    batch: LearnerBatch,
    denom,
    *,
    optimizer: optax.GradientTransformation,
    s: LearnerSettings,
):
    """One optimizer step on a mini-batch of M micro-batches (module docstring).

    Returns (new state, metrics dict of float32 scalars).
    """
    grad_fn = jax.grad(_loss, has_aux=True)
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)

    def body(carry, mb):
        def run(carry):
            acc, beta, sums = carry
            grads, (terms, beta, kl_sum, entropy_sum) = grad_fn(
                state.trainable, frozen, graphdef, mb, beta, state.kappa, s
            )
            acc = jax.tree.map(jnp.add, acc, grads)
            sums = jax.tree.map(jnp.add, sums, (terms, kl_sum, entropy_sum))
            return acc, beta, sums

        # A micro-batch of padding only (the packed layout's spare micro-batches) costs nothing.
        return jax.lax.cond(jnp.any(mb.row_valid), run, lambda carry: carry, carry), None

    first = _micro(batch, 0)
    _, (t0, _, k0, e0) = jax.eval_shape(
        lambda tr, fr, mb, beta, kappa: _loss(tr, fr, graphdef, mb, beta, kappa, s),
        state.trainable,
        frozen,
        first,
        state.beta,
        state.kappa,
    )
    sums0 = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (t0, k0, e0))
    (acc, beta, sums), _ = jax.lax.scan(body, (zeros, state.beta, sums0), batch)
    terms, kl_sum, entropy_sum = sums
    denom = jnp.maximum(denom, 1e-8)
    grads = jax.tree.map(lambda g: g / denom, acc)
    loss = terms.loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    trainable, opt_state, applied, params_ok = apply_if_finite(
        optimizer, grads, state.trainable, state.opt_state, finite
    )
    tokens = jnp.maximum(terms.token_count, 1.0)
    metrics = {
        "train/loss": loss,
        "train/pg_loss": terms.pg_sum / denom,
        "train/kl_loss": terms.kl_sum / denom,
        "train/grad_norm": grad_norm,
        "train/skipped": (~applied).astype(jnp.float32),
        "train/nonfinite_params": (~params_ok).astype(jnp.float32),
        "train/clip_frac_high": terms.clip_high_sum / tokens,
        "train/clip_frac_low": terms.clip_low_sum / tokens,
        "train/dual_clip_frac": terms.dual_clip_sum / tokens,
        "train/ppo_kl": terms.ppo_kl_sum / tokens,
        "kl/ref_mean": jnp.sum(kl_sum[0]) / tokens,
        **{
            f"kl/ref_mean/{name}": kl_sum[0, d] / jnp.maximum(kl_sum[1, d], 1.0)
            for d, name in enumerate(("easy", "medium", "hard"))
        },
        "train/entropy_mean": entropy_sum / tokens,
    }
    new_state = TrainState(trainable, opt_state, beta, state.kappa, state.step + 1)
    return new_state, metrics


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def apply_if_finite(optimizer: optax.GradientTransformation, grads, trainable, opt_state, ok):
    """One optimizer step, taken only when `ok` (a finite loss and gradient) and when every new
    parameter is finite; otherwise the parameters and the optimizer state stay as they were.

    A step can overflow parameters that a finite gradient produced (a huge learning rate):
    refused here, it shows as `params_ok` False instead of as NaN entropies in the next rollout.

    Returns:
      (trainable, opt_state, applied, params_ok): `applied` is a bool scalar; `params_ok` is
      False only when the step was refused for non-finite new parameters.
    """

    def apply(_):
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new = optax.apply_updates(trainable, updates)
        fine = _all_finite(new)
        new, new_opt_state = jax.lax.cond(
            fine, lambda: (new, new_opt_state), lambda: (trainable, opt_state)
        )
        return new, new_opt_state, fine, fine

    def skip(_):
        return trainable, opt_state, jnp.asarray(False), jnp.asarray(True)

    return jax.lax.cond(ok, apply, skip, None)


def opt_state_shardings(optimizer: optax.GradientTransformation, trainable):
    """Shardings of `optimizer.init(trainable)`: each moment its parameter's, counters whole.

    Pass them as `jax.jit(optimizer.init, out_shardings=...)`: jitted alone, `init` returns
    zeros that depend on no input's sharding, which XLA puts on one device, and placing that state
    on the mesh then copies the whole of it to every device. `trainable` holds arrays or
    ShapeDtypeStructs with NamedShardings.
    """
    shardings = jax.tree.map(lambda x: x.sharding, trainable)
    mesh = next(s.mesh for s in jax.tree.leaves(shardings))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        jax.eval_shape(optimizer.init, trainable),
        shardings,
        transform_non_params=lambda _: whole,
    )


def make_optimizer(
    *,
    lr: float,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    grad_clip: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int = 1,
    state_dtype=None,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping (METHOD.md 6: lr 1e-6, wd 1e-2, clip 1.0, constant).

    `state_dtype` stores Adam's first moment in that dtype (bfloat16 halves its memory); the
    second moment stays in the parameters' dtype.
    """
    if schedule == "constant":
        lr_fn = optax.constant_schedule(lr)
        if warmup_steps:
            lr_fn = optax.linear_schedule(0.0, lr, warmup_steps)
            lr_fn = optax.join_schedules([lr_fn, optax.constant_schedule(lr)], [warmup_steps])
    elif schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup_steps, 0), max(total_steps, warmup_steps + 1)
        )
    else:
        raise ValueError(f"optim.schedule={schedule!r} is not one of 'constant', 'cosine'.")
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=state_dtype),
    )
