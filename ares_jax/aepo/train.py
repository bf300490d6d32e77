"""AEPO, the RL stage of ARES: `run(config, workdir)` (METHOD.md 4.11).

  python -m ares_jax.main --config=configs/aepo.py[:PRESET] --workdir=DIR

Each iteration:
  1. rollout: prompts are sampled and answers checked; the phase computes buckets, HWE counts,
     the entropy reward, the online filter and the advantages (aepo/rollout.py);
  2. the rollout is split into mini-batches of `train.prompts_per_step` prompts; before any update,
     the learner recomputes the old-policy log-probs of every mini-batch, or reuses the sampler's
     by config (the gap is logged either way), and computes the reference log-probs from the
     frozen initial policy;
  3. one optimizer step per mini-batch, with exact gradient accumulation over micro-batches
     (aepo/learner.py); the ratio of a later mini-batch is taken against the rollout's policy;
  4. the paper's kappa controller, if selected, is updated; the released beta controller runs
     inside the update;
  5. metrics, periodic validation, checkpoints.
Resume order, logged at start: a checkpoint in the workdir, then config.checkpoint.resume, then the
model's initial weights (model.path or the preset's random init). SIGTERM saves and exits.

Several processes (one per host, `parallel/distributed.py`) run this same function on one mesh
over all their devices. Each reads its share of every global batch and the shares are exchanged
(`PromptStream.next_global_batch`), so the host side of a step (grading, buckets, filter,
advantages, batch assembly) runs on the same data everywhere and is checked to agree; host arrays
enter the mesh through `parallel.multihost.put` and come back through `multihost.fetch`. Every
process takes part in checkpoint saves and restores (Orbax writes each array's shards from the
process that holds them) and in the export's gathers; only process 0 writes config.json, metrics,
TensorBoard events and the exported files.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ares_jax import batching as B
from ares_jax import checkpoint as ckpt
from ares_jax import evaluate as ev
from ares_jax import metrics as mt
from ares_jax import runtime
from ares_jax.aepo import learner as Lr
from ares_jax.aepo import rollout as RO
from ares_jax.data import pipeline, prompts
from ares_jax.models.qwen2_5_vl import tokenizer as tok
from ares_jax.ops import hwe as H
from ares_jax.ops import kl as K
from ares_jax.ops import policy_loss as PL
from ares_jax.parallel import multihost
from ares_jax.parallel import rules as R
from ares_jax.rewards import buckets as BK
from ares_jax.rewards import entropy_shaping as ES
from ares_jax.rewards import triggers as TR
from ares_jax.sampling import BranchingParams, SamplingParams
from ares_jax.sampling.engine import EngineParams

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Config -> settings (the config stops here, STYLE.md 5 rule 5)
# ---------------------------------------------------------------------------------------------


def _sampling(c, cfg, tokenizer, *, n, temperature, max_new) -> SamplingParams:
    stops = tuple(
        sorted({cfg.eos_token_id, tok.special_ids(tokenizer).endoftext, tokenizer.eos_token_id})
    )
    br = c.rollout.branching
    return SamplingParams(
        n=n,
        max_new_tokens=max_new,
        temperature=temperature,
        top_p=c.rollout.top_p,
        top_k=c.rollout.top_k,
        stop_token_ids=stops,
        pad_token_id=cfg.pad_token_id,
        logit_bias=((cfg.image_token_id, float(c.rollout.image_token_logit_bias)),),
        vocab_limit=len(tokenizer),
        topk_entropy=c.entropy.topk if c.entropy.estimator != "exact" else 0,
        branching=BranchingParams(
            enabled=bool(br.enabled),
            budget=int(br.budget),
            window=int(c.entropy.window),
            cooldown=int(br.cooldown),
        ),
    )


def validation_sampling(c, cfg, tokenizer) -> SamplingParams:
    """How the in-run validation samples: `c.eval`'s n, temperature, top-p and response length,
    the rollout's stops and logit bias, no branching."""
    e = c.eval
    sampling = _sampling(
        c, cfg, tokenizer, n=e.n, temperature=e.temperature, max_new=e.max_response_len
    )
    return dataclasses.replace(sampling, top_p=c.eval.top_p, branching=BranchingParams())


def evaluate_policy(
    c, graphdef, params, examples, tokenizer, cfg, *, key, mesh, sampling=None
) -> ev.EvalResult:
    """The in-run validation of a policy (its `eval/...` metrics): the stage's prompt template,
    image settings (`runtime.image_kwargs`) and prompt buckets, `validation_sampling` unless
    `sampling` is given. `python -m ares_jax.evaluate` on the stage's export with the same
    decoding gives the same responses (tests/evaluate_export_test.py)."""
    return ev.evaluate(
        graphdef,
        params,
        examples,
        tokenizer,
        cfg,
        sampling=sampling or validation_sampling(c, cfg, tokenizer),
        template=c.data.prompt_template,
        **runtime.image_kwargs(c),
        prompt_len_buckets=tuple(c.data.prompt_len_buckets),
        batch_size=min(len(examples), c.rollout.prompts_per_iter),
        key=key,
        mesh=mesh,
    )


def _rollout_settings(c, sampling: SamplingParams) -> RO.RolloutSettings:
    r = c.reward
    return RO.RolloutSettings(
        sampling=sampling,
        prompts_per_iter=c.rollout.prompts_per_iter,
        template=c.data.prompt_template,
        **runtime.image_kwargs(c),
        prompt_len_buckets=tuple(c.data.prompt_len_buckets),
        window=c.entropy.window,
        window_offset=c.entropy.window_offset,
        percentile=c.entropy.percentile,
        threshold=c.entropy.threshold,
        threshold_ema=c.entropy.threshold_ema,
        hwe_count=c.entropy.hwe_count,
        trigger_token=c.entropy.trigger_token,
        estimator=c.entropy.estimator,
        reward_variant=r.variant,
        shaping=ES.ShapingParams(
            margin_frac=tuple(r.margin_frac),
            huber_kappa=tuple(r.huber_kappa),
            sigmoid_temp=tuple(r.sigmoid_temp),
            cap_scale=tuple(r.cap_scale),
            wrong_gain=tuple(r.wrong_gain),
            eps=r.paper_eps,
        ),
        alpha_lr=r.alpha_lr,
        alpha_min=r.alpha_min,
        alpha_max=r.alpha_max,
        target_scale=tuple(r.target_scale),
        accuracy_weight=r.accuracy_weight,
        format_weight=r.format_weight,
        reward_timing_quirk=r.reward_timing_quirk,
        filter_enabled=c.filter.enabled,
        filter_low=c.filter.low,
        filter_high=c.filter.high,
        max_tries=c.filter.max_tries,
        advantage_scale=c.advantage.scale,
        advantage_eps=c.advantage.eps,
        score_workers=c.train.score_workers,
        decode_batch_size=c.rollout.decode_batch_size,
        engine=_engine(c),
    )


def _engine(c) -> EngineParams | None:
    """The rollout engine of `rollout.engine` ('paged' or 'static')."""
    if c.rollout.engine == "static":
        return None
    return EngineParams(
        slots=c.rollout.decode_batch_size,
        page_size=c.rollout.page_size,
        num_pages=c.rollout.kv_pages,
        chunk_steps=c.rollout.chunk_steps,
        prefill_prompts=c.rollout.prefill_prompts,
        prefill_chunk=c.rollout.prefill_chunk,
    )


def _learner_settings(c, prompt_len: int) -> Lr.LearnerSettings:
    k = c.kl
    return Lr.LearnerSettings(
        prompt_len=prompt_len,
        temperature=c.rollout.temperature or 1.0,
        chunk_size=c.train.logprob_chunk_size,
        vocab_chunk_size=c.train.logprob_vocab_chunk_size,
        clip_low=c.loss.clip_low,
        clip_high=c.loss.clip_high,
        dual_clip=c.loss.dual_clip,
        logratio_clamp=c.loss.logratio_clamp,
        agg=c.loss.agg,
        kl_estimator=k.estimator,
        kl_coef=k.coef,
        kl_controller=k.controller,
        beta_params=K.BetaControllerParams(
            target=tuple(k.target),
            ema_decay=k.ema_decay,
            deadzone=k.deadzone,
            interval=k.update_interval,
            lr=k.beta_lr,
            err_clip=k.err_clip,
            beta_min=k.beta_min,
            beta_max=k.beta_max,
            beta_init=k.beta_init,
        ),
        beta_ranks=k.beta_cadence.ranks,
        beta_rank_batch=k.beta_cadence.micro_batch,
        bucket_coef=tuple(k.bucket_coef),
        rho=k.rho,
        second_chance=k.second_chance.enabled,
        second_chance_factor=k.second_chance.factor,
        second_chance_soft_cost_min=k.second_chance.soft_cost_min,
        second_chance_easy_only=k.second_chance.easy_only,
        second_chance_incorrect_only=k.second_chance.incorrect_only,
        head_dtype=c.train.logprob_head_dtype,
    )


def _kappa_params(k) -> K.KappaControllerParams:
    return K.KappaControllerParams(
        alpha=k.kappa_lr,
        delta=tuple(k.delta),
        kappa_min=k.kappa_min,
        kappa_max=k.kappa_max,
        kappa_init=k.kappa_init,
    )


def _source(c, split: str, tokenizer=None, cfg=None, paths=None):
    """The split's Examples (`paths` overrides the split's files). From files, given the
    tokenizer and the model config, every prompt is measured once here: one longer than the
    largest prompt bucket is dropped and counted (data.drop_overlong_prompts) or stops the run
    naming its file and line, instead of stopping the first rollout that draws it."""
    d = c.data
    if d.source == "synthetic":
        n = d.synthetic_train_size if split == "train" else d.synthetic_val_size
        return pipeline.example_source(pipeline.SyntheticSpec(n=n, seed=c.seed, split=split))
    if paths is None:
        files = d.train_files if split == "train" else d.val_files
        if files is None:
            return None
        paths = [p.strip() for p in files.split(",")] if isinstance(files, str) else files
    source = pipeline.example_source(
        pipeline.FilesSpec(
            paths=tuple(paths),
            on_error=d.on_error,
            image_root=d.image_root,
            allow_absolute_image_paths=d.allow_absolute_image_paths,
            columns=d.columns,
        )
    )
    if tokenizer is None:
        return source
    settings = runtime.prompt_settings(c, cfg)
    source, _ = prompts.check_prompts(
        source, tokenizer, settings, drop_overlong=d.drop_overlong_prompts, on_error=d.on_error
    )
    return source


def _val_examples(c, tokenizer=None, cfg=None) -> list:
    """Validation problems; from files, each file is one benchmark (its stem names the source
    where the records carry none), so evaluation reports accuracy per file."""
    if c.data.source == "synthetic":
        source = _source(c, "val")
        examples = [source[i] for i in range(len(source))]
    elif c.data.val_files is None:
        return []
    else:
        files = c.data.val_files
        paths = [p.strip() for p in files.split(",")] if isinstance(files, str) else list(files)
        examples = []
        for path in paths:
            src = _source(c, "val", tokenizer, cfg, paths=(path,))
            stats = getattr(src, "read_stats", None)  # a tfds build has none
            if stats is not None and stats.num_skipped:
                log.warning(
                    "AEPO: skipped %d validation records of %s: %s",
                    stats.num_skipped,
                    path,
                    stats.summary(),
                )
            stem = Path(path).stem
            examples += [
                dataclasses.replace(src[i], source=src[i].source or stem) for i in range(len(src))
            ]
    if c.eval.max_examples:
        examples = examples[: c.eval.max_examples]
    return examples


def _host_independent(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics every process must agree on: all but timings and rates."""
    return {k: v for k, v in metrics.items() if not k.startswith("time/") and "per_s" not in k}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _pack_layout(c, prompts, rows, selections, mesh, rules):
    """Micro-batches of a token budget (train.pack_tokens) for every mini-batch.

    Returns (plans, micro-batches, slots, packed length): each mini-batch's `B.pack_plan` (packed
    rows of at most train.pack_tokens tokens, one per device of the batch axes, at most
    train.micro_batch_size sequences per micro-batch), and the static shapes all of them are
    padded to: the micro-batch count (`B.micro_bucket`; spare micro-batches cost no compute),
    the sequences per packed row (`B.slot_bucket`, a multiple that the beta controller's cadence,
    kl.beta_cadence, divides) and the packed length (`B.pack_bucket` of the fullest row, at most
    train.pack_tokens).
    """
    mb = c.train.micro_batch_size
    pack_rows = R.ways(mesh, rules, R.BATCH, mb)
    lengths = B.sequence_lengths(prompts, rows)
    plans = [
        B.pack_plan(
            lengths[sel], pack_rows=pack_rows, pack_tokens=c.train.pack_tokens, max_sequences=mb
        )
        for sel in selections
    ]
    cadence = c.kl.beta_cadence.ranks * max(c.kl.beta_cadence.micro_batch, 1)
    slots = B.slot_bucket(
        max(p.slots for p in plans), multiple=cadence // np.gcd(cadence, pack_rows)
    )
    micros = B.micro_bucket(max(p.num_micro for p in plans))
    fullest = max(p.tokens(lengths[sel]) for p, sel in zip(plans, selections, strict=True))
    return plans, micros, slots, min(B.pack_bucket(fullest), c.train.pack_tokens)


def make_optimizer(c) -> optax.GradientTransformation:
    """The stage's AdamW from the optim block; the schedule spans every optimizer step."""
    return Lr.make_optimizer(
        lr=c.optim.lr,
        weight_decay=c.optim.weight_decay,
        b1=c.optim.b1,
        b2=c.optim.b2,
        eps=c.optim.eps,
        grad_clip=c.optim.grad_clip,
        schedule=c.optim.schedule,
        warmup_steps=c.optim.warmup_steps,
        total_steps=c.train.steps * max(1, c.rollout.prompts_per_iter // c.train.prompts_per_step),
        state_dtype=runtime.DTYPES[c.optim.state_dtype],
    )


def run(config, workdir: str) -> dict[str, float]:
    """Runs AEPO to `config.train.steps` iterations; returns the last evaluation metrics.

    Raises:
      runtime.WorkdirError: the workdir is not writable or another run holds it.
      checkpoint.Preempted: SIGTERM arrived; the step was saved, nothing was exported.
      metrics.NonFiniteError: more than `train.max_nonfinite_steps` non-finite steps in a row.
    """
    with runtime.stage_run(workdir, "AEPO") as hold:
        return _run(config, Path(workdir), hold)


def _run(config, workdir_path: Path, hold) -> dict[str, float]:
    c = config
    if c.rollout.prompts_per_iter % jax.process_count():
        raise ValueError(
            f"config.rollout.prompts_per_iter={c.rollout.prompts_per_iter} must be a multiple of "
            f"the {jax.process_count()} processes, which read equal shares of each batch."
        )

    # --- Mesh, model, tokenizer ----------------------------------------------------------------
    mesh, model, tokenizer = runtime.load_policy(c)
    rules = tuple(tuple(r) for r in c.mesh.rules) or None
    cfg = model.cfg
    graphdef, trainable, frozen = Lr.split_params(model, freeze_vision=c.model.freeze_vision)
    # The frozen initial policy. Rebuilt from the initial weights at every start (never
    # checkpointed), so a resumed run holds the same reference bit for bit.
    reference = (
        Lr.reference_params(trainable, runtime.DTYPES[c.model.dtype], c.model.reference_dtype),
        frozen,
    )
    del model

    # --- Settings ----------------------------------------------------------------------------
    t_max = c.rollout.max_response_len
    sampling = _sampling(
        c, cfg, tokenizer, n=c.rollout.n, temperature=c.rollout.temperature, max_new=t_max
    )
    rs = _rollout_settings(c, sampling)
    prompt_len = max(c.data.prompt_len_buckets)
    ls = _learner_settings(c, prompt_len)
    table = TR.trigger_table(
        tokenizer, TR.load_trigger_words(c.entropy.trigger_words), vocab_size=cfg.text.vocab_size
    )
    rows_per_prompt = sampling.rows_per_prompt
    mb = c.train.micro_batch_size
    rows_per_step = c.train.prompts_per_step * rows_per_prompt
    num_micro = -(-rows_per_step // mb)
    optimizer = make_optimizer(c)

    # --- Data ----------------------------------------------------------------------------------
    train_source = _source(c, "train", tokenizer, cfg)
    stats = getattr(train_source, "read_stats", None)
    if stats is not None and stats.num_skipped:  # bad rows, and prompts over the largest bucket
        log.warning("AEPO: skipped %d training records: %s", stats.num_skipped, stats.summary())
    stream = pipeline.PromptStream(train_source, seed=c.data.shuffle_seed)
    per_epoch = len(train_source) // c.rollout.prompts_per_iter
    log.info(
        "AEPO: %d training problems, %d prompt batches an epoch; %d iterations, at least %.1f "
        "epochs (more where the online filter refills).",
        len(train_source),
        per_epoch,
        c.train.steps,
        c.train.steps * c.rollout.prompts_per_iter / max(len(train_source), 1),
    )
    val_examples = _val_examples(c, tokenizer, cfg)

    # --- State and restore ---------------------------------------------------------------------
    state = Lr.TrainState(
        trainable=trainable,
        # Each moment on its parameter's shards (jitted alone, init would put all on one device).
        opt_state=jax.jit(
            optimizer.init, out_shardings=Lr.opt_state_shardings(optimizer, trainable)
        )(trainable),
        beta=K.init_beta_states(ls.beta_params, ranks=ls.beta_ranks),
        kappa=K.init_kappa(_kappa_params(c.kl)),
        step=jnp.zeros((), jnp.int32),
    )
    state = runtime.place_state(state, mesh)  # all on the mesh: the restore target
    rollout_state = RO.RolloutState(
        threshold=H.init_threshold(),
        targets=BK.init_bucket_targets(alpha_init=c.reward.alpha_init),
    )
    key = jax.random.PRNGKey(c.seed)
    # Both are closed on any exit (the hold's ExitStack): an asynchronous save in flight when an
    # exception stops the run is finished, not lost.
    checkpointer = hold.enter_context(
        ckpt.Checkpointer(
            workdir_path / "checkpoints",
            every_steps=c.checkpoint.every_steps or c.train.steps,  # 0: only at the end
            keep=c.checkpoint.keep,
            async_save=c.checkpoint.async_save,
        )
    )
    writer = hold.enter_context(mt.MetricWriter(workdir_path, tensorboard=c.log.tensorboard))
    writer.write_config(c.to_dict())
    # The rollout state and the key are host values between steps; they are checkpointed as
    # replicated arrays on the mesh, since Orbax refuses arrays that live on one process only.
    restored, extra, start = runtime.restore_or_start(
        workdir_path,
        c,
        checkpointer,
        writer,
        runtime.place_state({"train": state, "rollout": rollout_state, "key": key}, mesh),
    )
    state = runtime.place_state(restored["train"], mesh)
    rollout_state, key = multihost.fetch((restored["rollout"], restored["key"]))
    if extra:
        stream.set_global_state(extra["data"])
    guard = mt.NonFiniteGuard(c.train.max_nonfinite_steps)

    # --- Jitted steps ---------------------------------------------------------------------------
    logprob_fn = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))
    step_fn = jax.jit(
        Lr.train_step, static_argnums=0, static_argnames=("optimizer", "s"), donate_argnums=(1,)
    )
    val_sampling = validation_sampling(c, cfg, tokenizer)

    def validate(step: int) -> dict[str, float]:
        if not val_examples:
            return {}
        full_graphdef, params_now = nnx.split(Lr.merge(graphdef, state.trainable, frozen))
        result = evaluate_policy(
            c,
            full_graphdef,
            params_now,
            val_examples,
            tokenizer,
            cfg,
            sampling=val_sampling,
            key=jax.random.fold_in(jax.random.PRNGKey(c.seed + 1), step),
            mesh=mesh,
        )
        validate.last = result
        return result.metrics

    validate.last = None

    # --- Validation before training (METHOD.md 2.3 item 3) ------------------------------------
    # With threshold_init='validation' its tau serves the counts of step 1 only; the EMA starts
    # from the first training batch's median (H.update_threshold). The estimate is the one the
    # threshold uses in training (entropy.estimator).
    last_eval: dict[str, float] = {}
    if start == 0 and c.eval.val_before_train and val_examples:
        last_eval = validate(0)
        writer.write(0, last_eval)
        if c.entropy.threshold == "code" and c.entropy.threshold_init == "validation":
            r = validate.last
            ent_threshold, _ = RO.threshold_and_count_entropies(r, c.entropy.estimator)
            seed_tau = RO.seed_threshold(
                jnp.asarray(ent_threshold, jnp.float32),
                jnp.asarray(r.mask),
                q=c.entropy.percentile,
                window=c.entropy.window,
                offset=c.entropy.window_offset,
            )
            rollout_state = rollout_state._replace(threshold=H.init_threshold(float(seed_tau)))
            log.info("AEPO: tau for the first step's counts, from validation: %.4f", seed_tau)
    # A SIGTERM during the start-up (a long validation): stop before a step begins; the state is
    # the restored checkpoint's, or the start, so nothing is lost.
    ckpt.stop_preempted("AEPO", start or None, str(checkpointer.directory) if start else None)

    # --- Loop ------------------------------------------------------------------------------------
    progress = mt.Progress(c.train.steps, desc="AEPO", initial=start)
    for step in range(start + 1, c.train.steps + 1):
        t_step = time.perf_counter()
        full_graphdef, params_now = nnx.split(Lr.merge(graphdef, state.trainable, frozen))
        try:
            rollout = RO.collect(
                stream,
                full_graphdef,
                params_now,
                tokenizer,
                cfg,
                rs,
                rollout_state,
                table,
                jax.random.fold_in(key, step),
                tau_fallback=c.entropy.threshold_fallback,
                mesh=mesh,
            )
        except RO.NonFiniteRollout as e:  # broken logits: no update from this rollout
            runtime.check_finite(guard, step, {e.quantity: np.nan}, checkpointer)
            log.warning("AEPO step %d: %s The step was skipped.", step, e)
            ckpt.stop_preempted("AEPO", None, str(checkpointer.directory))
            continue
        rollout_state = rollout.state
        metrics = dict(rollout.metrics)

        # Learner batches: mini-batches of prompts_per_step prompts.
        t_learn = time.perf_counter()
        rows = rollout.rows
        t_bucket = runtime.bucket_up(int(rows.mask.sum(1).max()), c.rollout.length_buckets)
        rows = dataclasses.replace(
            rows,
            tokens=rows.tokens[:, :t_bucket],
            mask=rows.mask[:, :t_bucket],
            window_mask=rows.window_mask[:, :t_bucket],
        )
        sampler_logp = rollout.sampler_logp[:, :t_bucket]
        prompts = runtime.left_pad_prompts(rollout.prompts, prompt_len)
        n_prompts = prompts.size
        # Each mini-batch's rows (its prompts'); one layout for all of them (they share the
        # compiled steps): the window bucket and, packed, the micro-batch count, the sequences per
        # packed row and the packed length, each the most any mini-batch needs.
        selections = [
            np.flatnonzero(
                (rows.prompt >= first) & (rows.prompt < first + c.train.prompts_per_step)
            )
            for first in range(0, n_prompts, c.train.prompts_per_step)
        ]
        plans, micros, slots, pack_len, windows = None, num_micro, None, None, None
        if c.train.pack_tokens:
            plans, micros, slots, pack_len = _pack_layout(c, prompts, rows, selections, mesh, rules)
            # Over the micro-batches computed (those of padding only are skipped).
            capacity = sum(p.num_micro for p in plans) * plans[0].pack_rows * pack_len
            metrics["learner/pack_len"] = float(pack_len)
            metrics["learner/pack_fill"] = float(B.sequence_lengths(prompts, rows).sum() / capacity)
            metrics["learner/micro_batches"] = float(micros)
        if prompts.has_images:
            windows = B.window_bucket(
                max(
                    B.windows_needed(prompts, rows.select(sel), mb, cfg, plan=plan)
                    for sel, plan in zip(selections, plans or [None] * len(selections), strict=True)
                )
            )
        # Old-policy and reference log-probs of every mini-batch come first, from the parameters
        # that sampled the rollout, as the released trainer takes them before any update: the
        # ratio of mini-batch k > 1 then carries the importance correction of the steps before it.
        minibatches, gaps = [], []
        nonfinite = {"learner/old_logp": jnp.zeros((), jnp.int32)}
        nonfinite["learner/ref_logp"] = jnp.zeros((), jnp.int32)
        for k, sel in enumerate(selections):
            lb = B.learner_batch(
                prompts,
                rows.select(sel),
                cfg,
                micro_batch_size=mb,
                num_micro=micros,
                num_windows=windows,
                pack_len=pack_len,
                plan=None if plans is None else plans[k],
                slots=slots,
            )
            old_sampler = np.zeros(lb.old_logp.shape, np.float32).reshape(-1, t_bucket)
            if plans is None:
                old_sampler[: len(sel)] = sampler_logp[sel]
            else:  # each entry's row, as the plan laid them out
                order = plans[k].index(micros, slots).reshape(-1)
                old_sampler[order >= 0] = sampler_logp[sel[order[order >= 0]]]
            shardings = B.learner_shardings(lb, mesh, rules)
            lb, old_sampler = multihost.put(
                (lb, old_sampler.reshape(lb.old_logp.shape)), (shardings, shardings.old_logp)
            )
            if c.train.old_logp_source == "sampler":  # no learner pass: one forward saved
                old = old_sampler
            else:
                with jax.set_mesh(mesh):  # the model's sharding constraints need the mesh
                    old, _ = logprob_fn(
                        graphdef,
                        state.trainable,
                        frozen,
                        lb.inputs,
                        lb.tokens,
                        ls,
                        lb.packing,
                        lb.row_valid,
                    )
                gaps.append(
                    jnp.sum(jnp.where(lb.mask, jnp.abs(old - old_sampler), 0.0))
                    / jnp.maximum(jnp.sum(lb.mask), 1)
                )
                nonfinite["learner/old_logp"] += jnp.sum(~jnp.isfinite(old) & lb.mask)
            ref = jnp.zeros_like(old)
            if ls.kl_coef > 0:
                with jax.set_mesh(mesh):
                    ref, _ = logprob_fn(
                        graphdef,
                        reference[0],
                        reference[1],
                        lb.inputs,
                        lb.tokens,
                        ls,
                        lb.packing,
                        lb.row_valid,
                    )
                nonfinite["learner/ref_logp"] += jnp.sum(~jnp.isfinite(ref) & lb.mask)
            minibatches.append(lb._replace(old_logp=old, ref_logp=ref))

        kappa_obs, step_metrics = [], []
        for lb in minibatches:
            denom = PL.loss_denominator(lb.mask.reshape(-1, t_bucket), agg=ls.agg)
            for _ in range(c.train.ppo_epochs):
                with jax.set_mesh(mesh):
                    state, train_metrics = step_fn(
                        graphdef, state, frozen, lb, denom, optimizer=optimizer, s=ls
                    )
                step_metrics.append(train_metrics)
            if c.kl.controller == "paper":
                old, ref, mask, window = (
                    x.reshape(-1, t_bucket)
                    for x in (lb.old_logp, lb.ref_logp, lb.mask, lb.window_mask)
                )
                kld = K.kl_divergence(old, ref, c.kl.estimator)
                kappa_obs.append(
                    (
                        K.control_kl(kld, mask, window),
                        lb.bucket.reshape(-1),
                        lb.row_valid.reshape(-1),
                    )
                )
        del minibatches
        if kappa_obs:
            ctrl, bucket, valid = (jnp.concatenate(x) for x in zip(*kappa_obs, strict=True))
            new_kappa = K.update_kappa(
                state.kappa, ctrl, bucket, params=_kappa_params(c.kl), valid=valid
            )
            state = state._replace(kappa=new_kappa)
        step_metrics, gaps, beta, kappa, nonfinite = multihost.fetch(
            (step_metrics, gaps, state.beta.beta, state.kappa, nonfinite)
        )
        # The iteration's optimizer steps, averaged (a non-finite step stays non-finite).
        metrics.update({k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]})
        if gaps:  # how far the sampler's log-probs are from the learner's (same parameters)
            metrics["rollout/logp_gap_sampler_learner"] = float(np.mean(gaps))
        for d, name in enumerate(BK.BUCKET_NAMES):
            metrics[f"kl/beta/{name}"] = float(np.mean(beta[:, d]))  # mean over the ranks' states
            metrics[f"kl/kappa/{name}"] = float(kappa[d])
        metrics["time/learn_s"] = time.perf_counter() - t_learn
        metrics["time/step_s"] = time.perf_counter() - t_step
        metrics["train/tokens_per_s"] = float(rows.mask.sum()) / metrics["time/step_s"]

        checked = {k: np.nan if int(v) else 0.0 for k, v in nonfinite.items()}
        checked["train/parameters"] = np.nan if metrics["train/nonfinite_params"] else 0.0
        checked.update({k: metrics[k] for k in ("train/loss", "train/grad_norm")})
        if not runtime.check_finite(guard, step, checked, checkpointer):
            log.warning("AEPO step %d: non-finite values; the update was skipped.", step)
        if c.eval.every_steps and step % c.eval.every_steps == 0 and val_examples:
            last_eval = validate(step)
            metrics.update(last_eval)
        # Every process computed these from the same data; a difference is a bug, not noise.
        multihost.check_agreement(f"AEPO step {step}", _host_independent(metrics))
        log.info(
            "AEPO step %d: accuracy %.4f, reward %.6g, loss %.6g, grad norm %.6g",
            step,
            metrics["rollout/accuracy"],
            metrics["reward/total"],
            metrics["train/loss"],
            metrics["train/grad_norm"],
        )
        if step % c.log.every_steps == 0 or step == c.train.steps:
            writer.write(step, metrics)
        progress.update(
            1, acc=f"{metrics['rollout/accuracy']:.2f}", loss=f"{metrics['train/loss']:.3f}"
        )

        full = runtime.place_state({"train": state, "rollout": rollout_state, "key": key}, mesh)
        extra = {"data": stream.get_global_state()}
        # On SIGTERM: saved, then Preempted ends the stage here (no export, no completion).
        ckpt.save_or_stop(
            checkpointer, step, full, extra, force=step == c.train.steps, stage="AEPO"
        )
    progress.close()
    checkpointer.wait()

    # --- Export ----------------------------------------------------------------------------------
    if c.train.export:
        export = workdir_path / "export"
        policy = Lr.merge(graphdef, state.trainable, frozen)
        runtime.export_policy(c, policy, export, tokenizer, stage="AEPO")
    runtime.mark_complete(workdir_path, "AEPO", c.train.steps)
    return last_eval
