"""AdaCS, the cold-start stage of ARES: `run(config, workdir)` (METHOD.md 3).

  python -m ares_jax.main --config=configs/adacs.py[:PRESET] --workdir=DIR

The stage runs in three steps, each resumable:
  1. pass rates for the problems that carry none: K samples per problem from the pass-rate
     model, graded with math-verify; written shard by shard under DIR/pass_rates, where a
     restart finds them (adacs/pass_rate.py);
  2. length-targeted curation, deterministic; DIR/curation holds the report, the plot and the
     per-problem records (adacs/curation.py, adacs/report.py);
  3. supervised fine-tuning on the curated traces (adacs/sft.py), then the fine-tuned model is
     exported to DIR/export. Checkpoints hold the parameters, the optimizer and the data
     position; the run resumes from them on restart, and SIGTERM saves and exits.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ares_jax import batching as B
from ares_jax import checkpoint as ckpt
from ares_jax import evaluate as ev
from ares_jax import metrics as mt
from ares_jax import runtime
from ares_jax.adacs import curation as C
from ares_jax.adacs import pass_rate as PR
from ares_jax.adacs import report, sft
from ares_jax.aepo import learner as Lr
from ares_jax.data import pipeline, prompts, records, synthetic
from ares_jax.ops import kl as K
from ares_jax.parallel import multihost
from ares_jax.rewards import answers

log = logging.getLogger(__name__)


def _problems(c, split: str, tokenizer=None, cfg=None) -> list[records.Example]:
    """The split's problems. From files, given the tokenizer and the model config, every prompt
    is measured once here: one longer than the largest prompt bucket is dropped and counted
    (data.drop_overlong_prompts) or stops the run naming its file and line."""
    d = c.data
    if d.source == "synthetic":
        n = d.synthetic_train_size if split == "train" else d.synthetic_val_size
        return synthetic.make_examples(n, seed=c.seed, split=split, wrong_trace=True)
    files = d.train_files if split == "train" else d.val_files
    if files is None:
        return []
    paths = [p.strip() for p in files.split(",")] if isinstance(files, str) else list(files)
    examples, stats = records.read_many(
        paths,
        on_error=d.on_error,
        image_root=d.image_root,
        allow_absolute_image_paths=d.allow_absolute_image_paths,
    )
    if tokenizer is not None:
        settings = runtime.prompt_settings(c, cfg)
        examples, stats = prompts.check_prompts(
            examples,
            tokenizer,
            settings,
            drop_overlong=d.drop_overlong_prompts,
            on_error=d.on_error,
            stats=stats,
        )
    if stats.num_skipped:  # bad rows, and prompts over the largest bucket
        log.warning("AdaCS: skipped %d %s records: %s", stats.num_skipped, split, stats.summary())
    return list(examples)


def _response_tokens(traces, tokenizer, eos: int, max_len: int):
    """[N, T] token ids of the traces (plus eos, cut at max_len) and the [N, T] mask."""
    ids = tokenizer(list(traces), add_special_tokens=False)["input_ids"]
    rows = [(row + [eos])[:max_len] for row in ids]
    longest = max(len(r) for r in rows)
    tokens = np.zeros((len(rows), longest), np.int32)
    mask = np.zeros((len(rows), longest), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)], mask[i, : len(r)] = r, True
    return tokens, mask, sum(len(r) < len(i) + 1 for r, i in zip(rows, ids, strict=True))


def _curate(c, problems, tokenizer, work: Path, is_main: bool) -> list[records.Example]:
    settings = C.CurationSettings(
        tolerance=c.curation.tolerance or None,
        per_bracket=c.curation.per_bracket or None,
        per_source=c.curation.per_source,
        require_correct=c.curation.require_correct,
        vanilla=c.curation.vanilla,
        seed=c.seed,
    )
    curated = C.curate(problems, settings, length_fn=C.token_length_fn(tokenizer))
    if is_main:
        report.write_report(curated, work / "curation")
        records.write_jsonl(curated.selected, work / "curation" / "curated.jsonl")
    if not curated.selected:
        raise ValueError(
            "AdaCS curation selected no problem: no correct teacher trace within "
            f"curation.tolerance={c.curation.tolerance} of its target ({curated.reasons()})."
        )
    log.info(
        "AdaCS: curated %d of %d problems (%s)",
        len(curated.selected),
        len(problems),
        curated.reasons(),
    )
    return curated.selected


def _any_correct_trace(problems, seed: int) -> list[records.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for p in problems:
        good = [t for t in p.traces if answers.is_correct(t, p.answer)]
        if good:
            trace = good[int(rng.integers(len(good)))]
            out.append(dataclasses.replace(p, traces=(trace,), pass_rate=p.pass_rate or 0.0))
    if not out:
        raise ValueError("AdaCS: no problem has a correct teacher trace to fine-tune on.")
    return out


def run(config, workdir: str) -> dict[str, float]:
    """Runs pass rates, curation and SFT; returns the final evaluation metrics.

    Raises:
      runtime.WorkdirError: the workdir is not writable or another run holds it.
      checkpoint.Preempted: SIGTERM arrived; the work so far was saved, nothing was exported.
      metrics.NonFiniteError: more than `sft.max_nonfinite_steps` non-finite steps in a row.
    """
    with runtime.stage_run(workdir, "AdaCS") as hold:
        return _run(config, Path(workdir), hold)


def _run(config, work: Path, hold) -> dict[str, float]:
    c = config
    is_main = jax.process_index() == 0

    # --- Model and tokenizer -----------------------------------------------------------------
    mesh, model, tokenizer = runtime.load_policy(c)
    rules = tuple(tuple(r) for r in c.mesh.rules) or None
    cfg = model.cfg
    eos = cfg.eos_token_id
    writer = hold.enter_context(mt.MetricWriter(work, tensorboard=c.log.tensorboard))
    writer.write_config(c.to_dict())
    buckets = tuple(c.data.prompt_len_buckets)

    # --- 1. Pass rates --------------------------------------------------------------------------
    problems = _problems(c, "train", tokenizer, cfg)
    val = _problems(c, "val", tokenizer, cfg)  # read now: a bad file stops the run before work
    if c.eval.max_examples:
        val = val[: c.eval.max_examples]
    missing = [p for p in problems if p.pass_rate is None] if c.curation.enabled else []
    if missing and not c.pass_rate.enabled:
        raise ValueError(
            f"{len(missing)} problems have no pass rate (e.g. {missing[0].id!r}) and "
            "pass_rate.enabled is False."
        )
    if missing:
        rater = model
        if c.pass_rate.model_path:
            rater = runtime.load_policy(c, path=c.pass_rate.model_path).model
        graphdef, params = nnx.split(rater)
        sampling = PR.default_sampling(
            cfg,
            tokenizer,
            samples=c.pass_rate.samples,
            max_new_tokens=c.pass_rate.max_new_tokens,
            temperature=c.pass_rate.temperature,
            top_p=c.pass_rate.top_p,
        )
        t0 = time.perf_counter()
        progress = mt.Progress(len(missing), desc="AdaCS pass rates")
        result = PR.estimate_pass_rates(
            graphdef,
            params,
            missing,
            tokenizer,
            cfg,
            samples=c.pass_rate.samples,
            sampling=sampling,
            template=c.data.prompt_template,
            min_pixels=c.data.min_pixels,
            max_pixels=c.data.max_pixels,
            prompt_len_buckets=buckets,
            batch_size=c.pass_rate.batch_size,
            out_path=str(work / "pass_rates"),
            key=jax.random.PRNGKey(c.seed),
            progress=progress,
            mesh=mesh,
            stop=ckpt.preempted_here,  # each host writes its own shard: no collective here
        )
        progress.close()
        if result.stopped:  # SIGTERM: the finished problems are on disk; a restart resumes
            log.warning("AdaCS: preempted during the pass rates; %d done now.", result.computed)
            ckpt.clear_preemption()
            raise ckpt.Preempted("AdaCS (pass rates)")
        rates = PR.merge_pass_rates(str(work / "pass_rates"))
        problems = PR.attach_pass_rates(problems, rates)
        log.info(
            "AdaCS: pass rates of %d problems (%d computed now) in %.1f s",
            len(rates),
            result.computed,
            time.perf_counter() - t0,
        )
        if rater is not model:
            del rater

    # --- 2. Curation -------------------------------------------------------------------------
    if c.curation.enabled:
        data = _curate(c, problems, tokenizer, work, is_main)
    else:  # plain SFT (a warm-up): every problem with one of its correct traces, drawn by seed
        data = _any_correct_trace(problems, c.seed)
        log.info("AdaCS: curation off; fine-tuning on %d problems", len(data))

    # --- 3. Fine-tuning: state, data, restore ------------------------------------------------
    graphdef, trainable, frozen = Lr.split_params(model, freeze_vision=c.model.freeze_vision)
    reference = (jax.tree.map(jnp.copy, trainable), frozen) if c.sft.kl_coef > 0 else None
    del model
    steps = math.ceil(len(data) * c.sft.epochs / c.sft.global_batch)
    if c.sft.max_steps:
        steps = min(steps, c.sft.max_steps)
    optimizer = Lr.make_optimizer(
        lr=c.sft.lr,
        weight_decay=c.sft.weight_decay,
        b1=c.sft.b1,
        b2=c.sft.b2,
        eps=c.sft.eps,
        grad_clip=c.sft.grad_clip,
        schedule=c.sft.schedule,
        warmup_steps=c.sft.warmup_steps,
        total_steps=steps,
        state_dtype=runtime.DTYPES[c.sft.state_dtype],
    )
    state = Lr.TrainState(
        trainable,
        jax.jit(optimizer.init, out_shardings=Lr.opt_state_shardings(optimizer, trainable))(
            trainable
        ),
        K.init_beta_states(),
        K.init_kappa(),
        jnp.zeros((), jnp.int32),
    )
    stream = pipeline.PromptStream(data, seed=c.data.shuffle_seed, num_epochs=c.sft.epochs)
    checkpointer = hold.enter_context(  # closed on any exit: an in-flight save completes
        ckpt.Checkpointer(
            work / "checkpoints",
            every_steps=c.checkpoint.every_steps or steps,
            keep=c.checkpoint.keep,
            async_save=c.checkpoint.async_save,
        )
    )
    restored, extra, start = runtime.restore_or_start(
        work, c, checkpointer, writer, {"train": runtime.place_state(state, mesh)}
    )
    state = runtime.place_state(restored["train"], mesh)
    if extra:
        stream.set_global_state(extra["data"])
    guard = mt.NonFiniteGuard(c.sft.max_nonfinite_steps)
    prompt_len = max(buckets)
    s = sft.SFTSettings(
        prompt_len=prompt_len,
        chunk_size=c.sft.logprob_chunk_size,
        vocab_chunk_size=c.sft.logprob_vocab_chunk_size,
        kl_coef=c.sft.kl_coef,
    )
    step_fn = jax.jit(
        sft.sft_step, static_argnums=0, static_argnames=("optimizer", "s"), donate_argnums=(1,)
    )
    ref_fn = jax.jit(Lr.logprob_pass, static_argnums=(0, 5))
    mb = c.sft.micro_batch_size
    num_micro = c.sft.global_batch // mb
    weights = np.asarray(c.sft.kl_bracket_weights, np.float32)

    # --- Loop ------------------------------------------------------------------------------------
    progress = mt.Progress(steps, desc="AdaCS SFT", initial=start)
    metrics: dict[str, float] = {}
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        batch = stream.next_global_batch(c.sft.global_batch)  # the same on every process
        if not batch:
            break
        prompts = B.encode_examples(
            batch,
            tokenizer,
            cfg,
            template=c.data.prompt_template,
            min_pixels=c.data.min_pixels,
            max_pixels=c.data.max_pixels,
            length_buckets=buckets,
        )
        prompts = runtime.left_pad_prompts(prompts, prompt_len)
        tokens, mask, cut = _response_tokens(
            [e.traces[0] for e in batch], tokenizer, eos, c.sft.max_response_len
        )
        t = runtime.bucket_up(tokens.shape[1], c.sft.length_buckets)
        tokens = np.pad(tokens, ((0, 0), (0, t - tokens.shape[1])))
        mask = np.pad(mask, ((0, 0), (0, t - mask.shape[1])))
        n = len(batch)
        rows = B.Rows(
            prompt=np.arange(n),
            tokens=tokens,
            mask=mask,
            advantages=np.zeros(n, np.float32),
            bucket=np.zeros(n, np.int32),
            correct=np.ones(n, bool),
            soft_cost=np.zeros(n, np.float32),
            window_mask=np.zeros_like(mask),
        )
        lb = B.learner_batch(prompts, rows, cfg, micro_batch_size=mb, num_micro=num_micro)
        brackets = np.asarray([C.bracket_of(e.pass_rate) for e in batch])
        kl_w = np.zeros(num_micro * mb, np.float32)
        kl_w[:n] = weights[brackets]
        shardings = B.learner_shardings(lb, mesh, rules)
        lb, kl_w = multihost.put(
            (lb, kl_w.reshape(num_micro, mb)), (shardings, shardings.advantages)
        )
        if reference is not None:
            with jax.set_mesh(mesh):  # the model's sharding constraints need the mesh
                ref, _ = ref_fn(graphdef, reference[0], reference[1], lb.inputs, lb.tokens, s)
            lb = lb._replace(ref_logp=ref)
        with jax.set_mesh(mesh):
            state, m = step_fn(graphdef, state, frozen, lb, kl_w, optimizer=optimizer, s=s)
        metrics = {k: float(v) for k, v in multihost.fetch(m).items()}
        metrics.update(
            {
                "data/epoch": float(stream.epoch),
                "data/traces_cut": float(cut),
                "data/response_len": float(mask.sum(1).mean()),
                "time/step_s": time.perf_counter() - t0,
            }
        )
        metrics["train/tokens_per_s"] = metrics["train/tokens"] / metrics["time/step_s"]
        checked = {k: metrics[k] for k in ("train/loss", "train/grad_norm")}
        checked["train/parameters"] = np.nan if metrics["train/nonfinite_params"] else 0.0
        if not runtime.check_finite(guard, step, checked, checkpointer):
            log.warning("AdaCS step %d: non-finite values; the update was skipped.", step)
        if step % c.log.every_steps == 0 or step == steps:
            writer.write(step, metrics)
        progress.update(1, loss=f"{metrics['train/loss']:.3f}")
        # On SIGTERM: saved, then Preempted ends the stage here (no evaluation, no export).
        ckpt.save_or_stop(
            checkpointer,
            step,
            {"train": state},
            {"data": stream.get_global_state()},
            force=step == steps,
            stage="AdaCS",
        )
    progress.close()
    checkpointer.wait()

    # --- Evaluation and export ----------------------------------------------------------------
    full_graphdef, params_now = nnx.split(Lr.merge(graphdef, state.trainable, frozen))
    result = {}
    if val:
        sampling = ev.policy_sampling(
            cfg,
            tokenizer,
            max_new_tokens=c.eval.max_response_len,
            temperature=c.eval.temperature,
            top_p=c.eval.top_p,
        )
        evaluation = ev.evaluate(
            full_graphdef,
            params_now,
            val,
            tokenizer,
            cfg,
            sampling=sampling,
            template=c.data.prompt_template,
            min_pixels=c.data.min_pixels,
            max_pixels=c.data.max_pixels,
            prompt_len_buckets=buckets,
            batch_size=min(len(val), 16),
            key=jax.random.PRNGKey(c.seed + 1),
            mesh=mesh,
        )
        result = evaluation.metrics
        writer.write(steps, result)
    policy = Lr.merge(graphdef, state.trainable, frozen)
    runtime.export_policy(c, policy, work / "export", tokenizer, stage="AdaCS")
    runtime.mark_complete(work, "AdaCS", steps)
    return result
