r"""AEPO, the RL stage of ARES (METHOD.md section 4), with every hyper-parameter and switch.

Each point where the paper and the released code disagree (METHOD.md 9, 11) is one switch,
commented with its section and the choices. The algorithm's constants are the released code's
(METHOD.md 4 and 6). The switches in RELEASED_SWITCHES default to the released behaviour except
where the README's table (*Presets and the released code*) says otherwise and why: the
`paper_*` presets set every one of them to the released value, the `corrected_*` presets to the
method with the released code's bugs fixed. Only `main.py` and the stage's `run` read this
ConfigDict.

Presets (the text after the colon; `preset=NAME` or just `NAME`):

  (none)    The embedded default: the whole ARES pipeline (configs/pipeline.py) on one CPU in
            minutes: a warm-up fine-tune of the random small model gives the base model, then
            AdaCS (pass rates, length-targeted curation, fine-tuning), then AEPO (this stage),
            then the base, AdaCS and AEPO models on held-out problems (a Table-4 report, plots).
              python -m ares_jax.main --config=configs/aepo.py --workdir=/tmp/ares
            Keys live in the blocks warmup., adacs., aepo. and eval.:
              --config.aepo.optim.lr=3e-5
  stage     The AEPO stage alone on the embedded task (the small model from random weights, or
            model.path): 8 rollouts per prompt, short responses.
              python -m ares_jax.main --config=configs/aepo.py:stage --workdir=/tmp/aepo
  smoke     The AEPO stage with the tiny model, 2 steps, seconds; for CI.
              python -m ares_jax.main --config=configs/aepo.py:smoke --workdir=/tmp/aepo_smoke
  pipeline_smoke
            The whole pipeline at the smoke sizes, about a minute; for CI.
  paper_7b  The authors' final run for Qwen2.5-VL-7B as released (METHOD.md 6), quirks included:
            512 prompts x 8 rollouts per iteration, 4 optimizer steps of 128 prompts, 16k
            responses, lr 1e-6, 250 iterations; the authors' 174 trigger words, arg-max trigger
            tokens, top-10 entropies as vLLM returns them, the reward-timing quirk, the
            per-rank beta cadence of 8 GPUs x 1 sequence, bfloat16 master weights and AdamW.
            Needs the AdaCS checkpoint and ViRL39K-style data files:
              python -m ares_jax.main --config=configs/aepo.py:paper_7b --workdir=DIR \
                --config.model.path=CKPT_DIR --config.data.train_files=TRAIN.jsonl \
                --config.data.val_files=VAL.jsonl
  paper_3b  The same for Qwen2.5-VL-3B (the paper does not say whether 3B used other settings).
  corrected_7b, corrected_3b
            The same sizes with the released code's bugs fixed and exact estimators: sampled
            trigger tokens, full-vocabulary entropies, bucket-aware rewards in the advantage, one
            beta controller for all rows, float32 master weights.

A topology (configs/topologies.py: v5p-8, v5p-64, v6e-16, 8xh100, 2x8xh100, Nx8xh100) comes after
the preset and sets the mesh for that machine; `python -m ares_jax.plan` tells whether it fits:
  python -m ares_jax.main --config=configs/aepo.py:preset=paper_3b,topology=v5p-8 --workdir=DIR ...
  python -m ares_jax.plan --config=configs/aepo.py:preset=paper_7b,topology=2x8xh100

`--config.KEY=VALUE` overrides come on top; the config is locked, so an unknown key fails at
start-up. Paths left None that a preset needs (model.path, data.*_files) are reported by `validate`.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common, topologies

PRESETS = (
    "",
    "stage",
    "smoke",
    "pipeline_smoke",
    "paper_3b",
    "paper_7b",
    "corrected_3b",
    "corrected_7b",
)
PIPELINE_PRESETS = {"": "", "pipeline_smoke": "smoke"}  # preset -> configs/pipeline.py preset

# The released prompt suffix (METHOD.md 4.1, examples/format_prompt/math.jinja): appended to the
# question text after one space; images are inserted at <image> markers by the chat template.
PROMPT_SUFFIX = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}."
)


def _base() -> ml_collections.ConfigDict:
    """The embedded CPU default; algorithm constants are the released code's."""
    c = ml_collections.ConfigDict()
    c.stage = "aepo"
    c.seed = 0

    # --- Model (QWEN2_5_VL.md). The policy starts from model.path (the AdaCS checkpoint in the
    # paper); the KL reference is the frozen initial policy.
    c.model = dict(
        preset="small",  # 'tiny' | 'small' (embedded, random init) | '3b' | '7b' (need path)
        path=config_dict.placeholder(str),  # Hugging Face checkpoint dir (config.json+safetensors)
        dtype="float32",  # compute dtype: 'float32' | 'bfloat16'
        param_dtype="float32",  # parameter (master weight) dtype
        # The KL reference's copy of the trainable parameters (it only runs forward):
        # 'compute' = in model.dtype (bfloat16: half the bytes of float32 master weights, 7.0 GiB
        # less for 3B and 15.4 GiB for 7B over the mesh); its log-probs equal a float32 copy's
        # bit for bit with train.logprob_head_dtype='compute', as the model casts each weight to
        # model.dtype where it uses it | 'param' = in param_dtype. The same where param_dtype
        # equals dtype (paper_*). Measured: benchmarks/precision.py.
        reference_dtype="compute",
        # What each layer (decoder and vision tower) keeps for the backward pass, the rest being
        # recomputed: 'none' (everything) | 'full' (its input) | 'attention' (its input and the
        # attention kernel's output and log-sum-exp, so its forward is not rerun) | 'dots' (its
        # input and every matmul output) | 'offload' ('attention' with the residuals in host
        # memory); True/False = 'full'/'none'. Measured: benchmarks/remat.py, RESULTS.md.
        remat="none",
        scan_layers=True,  # stack layers and lax.scan over them (fast compiles)
        # METHOD.md 6: the vision tower is trainable during RL (freeze_vision_tower: false).
        # AdaCS (METHOD.md 3.3) trains the LLM only; that is configs/adacs.py's default.
        freeze_vision=False,
        # Full forwards and prefills (ops/attention.py, segment ids, no [T, T] scores or masks,
        # forward or backward): 'auto' picks the backend's kernel (Splash on TPU; cuDNN for rows
        # of one sequence, else Pallas, on GPU; the blockwise online-softmax XLA path on CPU);
        # 'blockwise' | 'splash' | 'pallas_gpu' force one (the Pallas kernels run interpreted on
        # CPU). 'xla' | 'cudnn': jax.nn.dot_product_attention with a dense [T, T] mask (tests,
        # comparisons). Decode steps use XLA's attention over the cache (cuDNN's with 'cudnn').
        attention="auto",
    )

    # --- Data (METHOD.md 4.1).
    c.data = dict(
        source="synthetic",  # 'synthetic' (the embedded task) | 'files'
        # Local or remote paths; a comma-separated string or a list. Records need a stable id
        # (the released code's global_id, METHOD.md 4.2).
        train_files=config_dict.placeholder(object),
        val_files=config_dict.placeholder(object),
        # Data paths (train_files, val_files): a file, a directory (its .jsonl/.json/.parquet
        # files, sorted; subdirectories are not searched), a glob (`**` spans directories), or a
        # comma-separated string / list of these: ViRL39K's release directory works as it is.
        # Field -> column of the data files, for files whose columns records.COLUMNS does not
        # know (or to pick one of several): --config.data.columns.question=problem, or all at
        # once --config.data.columns='{"question": "problem", "pass_rate": "PassRate_32BTrained"}'
        # (fields left out keep the default lookup). Fields: question, answer, images, id,
        # traces, source, pass_rate, difficulty, messages. By default a ViRL39K row's pass rate
        # is PassRate_7BBase, else (null) PassRate_32BTrained (records.py docstring).
        columns=common.data_columns(),
        synthetic_train_size=512,  # problems generated for data.source='synthetic'
        synthetic_val_size=64,
        prompt_template=PROMPT_SUFFIX,
        # Pixel budget of the Qwen2.5-VL processor; the paper's [262144, 4194304] (512^2..2048^2)
        # is set by the paper presets; the CPU default keeps images tiny.
        min_pixels=3136,
        max_pixels=12544,
        # Image normalisation after rescaling to [0, 1], per channel (R, G, B); None: model.path's
        # image processor's (either checkpoint layout), else the hub's Qwen2.5-VL values.
        image_mean=config_dict.placeholder(tuple),
        image_std=config_dict.placeholder(tuple),
        max_prompt_len=256,  # tokens, text + image placeholders; paper 4096
        prompt_len_buckets=(192, 256),  # prompts pad to the smallest bucket; last = max_prompt_len
        # Every prompt (text + image tokens) is measured at start-up. True: one longer than the
        # last bucket is dropped and counted (logged with its file and line); False: it stops
        # the run naming file and line.
        drop_overlong_prompts=True,
        shuffle_seed=0,
        # A bad record: 'raise' (names file and line) | 'skip' (counted by reason and logged).
        # Bad: no question or answer, unreadable or missing image, <image> markers that do not
        # match the images (no marker at all is fine: images go first), an image path outside
        # the image root, a prompt the processor refuses. An empty file always raises.
        on_error="raise",
        # Relative image paths resolve against image_root (None: each data file's directory)
        # and, like absolute ones, must stay inside it after `..` and symlinks; True lifts that.
        # Only regular files up to records.MAX_IMAGE_FILE_BYTES (64 MiB) are read.
        image_root=config_dict.placeholder(str),
        allow_absolute_image_paths=False,
    )

    # --- Rollout (METHOD.md 4.1, 4.3).
    c.rollout = dict(
        n=8,  # G, rollouts per prompt
        temperature=1.0,
        top_p=0.99,
        top_k=0,  # 0 = off
        # METHOD.md 9.12: the released example config samples 8192 tokens, the paper and the final
        # config [C-hist] 16384; the paper presets use 16384. The CPU default is tiny.
        max_response_len=64,
        # Learner batches pad responses to the smallest bucket holding the longest response; the
        # last bucket must equal max_response_len.
        length_buckets=(32, 64),
        prompts_per_iter=16,  # paper 512; refilled by the online filter (filter.*)
        decode_batch_size=128,  # rows decoded at once (bounds the KV cache); whole prompts
        # 'paged': continuous batching over a paged KV cache (ares_jax/sampling/engine.py): a row
        # that ends is replaced by the next waiting one, attention reads filled pages only.
        # 'static': calls of decode_batch_size rows, each until its longest row ends (a dense
        # cache of prompt + max_response_len per row). Both branch (branching.*) alike.
        engine="paged",
        page_size=64,  # tokens per KV page
        # Pages in the pool, 0 = decode_batch_size x (longest prompt + max_response_len) / page
        # (never preempts). Fewer bound the cache's memory; rows are preempted and regenerated
        # (the same tokens: draws are keyed by prompt, sample and position) when it runs dry.
        kv_pages=0,
        chunk_steps=32,  # decode steps per device call (one host round trip each)
        prefill_prompts=4,  # prompts prefilled per admission
        # Prompt tokens per prefill chunk, 0 = whole prompts: long prompts are prefilled chunk by
        # chunk (each attending to the chunks before it), bounding the prefill's activations.
        prefill_chunk=0,
        image_token_logit_bias=-100.0,  # released vLLM setting: never sample image placeholders
        # METHOD.md 4.3 / 9.5: the paper branches extra trajectories where the window entropy
        # exceeds tau; the released code has no branching (plain n independent samples). The paper
        # gives no rule; ours (ares_jax/sampling/sampler.py): a row whose mean entropy over its
        # last entropy.window tokens reaches tau forks one continuation into a spare row of its
        # prompt, at most `budget` per prompt, a row at most once per `cooldown` steps.
        branching=dict(
            enabled=False,
            budget=4,  # extra rows per prompt that forks may fill (they join the group)
            cooldown=4,  # steps between two forks of one row
        ),
    )

    # --- Entropy, threshold tau, HWE count (METHOD.md 2).
    c.entropy = dict(
        window=4,  # w (METHOD.md 2.2): code and final runs 4; paper: 4-8 work best
        # METHOD.md 2.2 / 9.3: 1 = released code, the next w tokens i+1..i+w;
        # 0 = paper, t..t+w-1 (the position's own entropy included).
        window_offset=1,
        percentile=95.0,  # q of the per-response quantile (linear interpolation)
        # METHOD.md 2.3 / 9.1: 'code' = per-response p95 of window means, batch median, EMA
        # (threshold_ema), one-step lag; 'paper' = batch mean of per-response p95 of token
        # entropies, recomputed every batch.
        threshold="code",
        threshold_ema=0.99,
        # METHOD.md 2.3: 'validation' = the released code: the counts of step 1 use the mean
        # per-response p95 of the validation run before training (needs eval.val_before_train);
        # 'first_batch' = step 1 counts against threshold_fallback. Either way the EMA starts
        # from the first training batch's median.
        threshold_init="validation",
        threshold_fallback=1.5,  # tau used if no seed exists (the released worker's default)
        # METHOD.md 2.5 / 9.2: 'code' = trigger word followed by a next-window mean >= tau;
        # 'paper_token' = App. H, trigger word with token entropy >= tau;
        # 'paper_window' = Algorithm 1, every window with mean >= tau, no vocabulary.
        hwe_count="code",
        # METHOD.md 2.4 / 11: which token is tested against the trigger list: 'sampled' (the
        # paper's o_t; our default) | 'argmax' (what the released code decodes).
        trigger_token="sampled",
        # None = the project's list (195 words, with verification words such as "verify" and
        # "check"); 'released' = the authors' 174 words (ares_jax/rewards, Apache-2.0); or a
        # .txt/.json path.
        trigger_words=config_dict.placeholder(str),
        # METHOD.md 2.1 / 9.4 / 11: 'exact' = full-vocabulary entropy from the logits (default,
        # one estimator for threshold and counts); 'topk_tail' = the top-k log-probs plus a tail
        # bucket for both; 'topk_code' = the released code exactly: tail-corrected for the
        # counts, raw truncated for the threshold. The top-k set is what vLLM returns: the top k
        # and the sampled token when it is outside them.
        estimator="exact",
        topk=10,
    )

    # Difficulty buckets (METHOD.md 4.2) are the released code's: easy if at least 2/3 of a
    # group is correct, medium if at least 1/3, else hard (for n=8: >= 6, 3..5, <= 2 correct),
    # recomputed every iteration; its optional pre-training bucket pass is off in all its configs.

    # --- Reward (METHOD.md 4.1, 4.4). Per-bucket tuples are (easy, medium, hard).
    c.reward = dict(
        # METHOD.md 4.4 / 9.6: 'code' = piecewise Huber/sigmoid shaping (4.4.2, matches App. I, M);
        # 'paper' = the closed-form Lagrangian penalty of 4.4.1; 'none' = accuracy only (ablation).
        variant="code",
        accuracy_weight=1.0,
        format_weight=0.0,  # AEPO adds no format reward (the GRPO ablation used 0.9 acc + 0.1)
        alpha_init=0.5,  # alpha_d, adaptive entropy weight per bucket
        alpha_lr=0.05,
        alpha_min=0.0,
        alpha_max=2.0,
        target_scale=(1.0, 1.0, 1.0),  # N*_d = round(scale_d * bucket mean of per-prompt mean N)
        margin_frac=(0.15, 0.25, 0.35),
        huber_kappa=(2.0, 3.0, 4.0),
        sigmoid_temp=(2.0, 2.5, 3.0),
        cap_scale=(1.0, 1.0, 1.2),
        wrong_gain=(0.6, 0.8, 1.0),  # incorrect-answer gain factor (hard: sigma * cap, i.e. 1.0)
        paper_eps=1e-6,  # eps of the paper multiplier lambda_d
        # METHOD.md 4.4.2 / 9.7: True reproduces the released ordering bug (the advantage uses a
        # reward computed with default bucket fields: easy, target 0, alpha 0.5); False computes
        # buckets, targets and alpha before the reward (the method as described).
        reward_timing_quirk=False,
    )

    # --- Online filter, DAPO dynamic sampling (METHOD.md 4.5): keep a group if the mean of its
    # overall rewards is strictly inside (low, high); refill up to max_tries prompt batches.
    c.filter = dict(enabled=True, low=0.01, high=0.99, max_tries=20)

    # --- Advantage (METHOD.md 4.6 / 9.8): 'std' = released GRPO (R - mean) / (std_unbiased + eps);
    # 'none' = centred only; 'length' = paper Algorithm 1, centred and divided by the response
    # length (its token bonus psi is unspecified in the paper and not implemented).
    c.advantage = dict(scale="std", eps=1e-6)

    # --- Policy loss (METHOD.md 4.7 / 9.10): clip-higher + dual clip, released defaults.
    c.loss = dict(
        clip_low=0.2,
        clip_high=0.3,
        dual_clip=3.0,
        logratio_clamp=20.0,  # ratio = exp(clamp(logp - old_logp, -20, 20))
        # 'seq-mean-token-mean' (paper Eq. 2; equals the released 'token' mode at its 1 sample per
        # micro-batch, METHOD.md 4.7) | 'token-mean' | 'seq-mean-token-sum'.
        agg="seq-mean-token-mean",
    )

    # --- KL to the frozen reference, as an actor loss (METHOD.md 4.8 / 9.9).
    c.kl = dict(
        estimator="k3",  # 'k1' | 'k2' | 'k3' (low_var_kl, clamped as in the code)
        coef=0.01,  # kl_coef; 0 disables the KL loss
        # 'code' = per-bucket beta_d in log space, slow EMA controller on all-token sequence KL;
        # 'paper' = beta_d * rho inside validated HWE windows, kappa_d controller on non-window
        # KL; 'fixed' = constant beta_init.
        controller="code",
        bucket_coef=(1.0, 1.0, 1.0),  # static per-bucket factor ([C-hist] 1.25/1.0/0.75, unused)
        # Released controller constants (counts are actor micro-batches, as in the code).
        target=(0.01, 0.01, 0.01),  # delta_d
        # METHOD.md 4.8: when the controller steps. The released actor keeps one state per
        # data-parallel rank (8 in its launcher, never synchronised) and steps it once per
        # micro-batch of `micro_batch` sequences of that rank's share (1 in its launcher),
        # touching only the buckets in it; each row's KL reads its rank's beta. Ours by default:
        # ranks=1, micro_batch=0, one state stepped once per learner micro-batch
        # (train.micro_batch_size) with every bucket in it. train.micro_batch_size must be a
        # multiple of ranks * micro_batch. Packed (train.pack_tokens), a micro-batch's rows are
        # its packed rows' slots, row by row (rank r = packed row r when ranks equals the
        # devices of the batch axes; micro_batch=0 then steps each once per micro-batch); the
        # slots per packed row are rounded up so that ranks * micro_batch divides them, and a
        # chunk of padding slots only does not step.
        beta_cadence=dict(ranks=1, micro_batch=0),
        beta_init=1.0,
        ema_decay=0.97,
        beta_lr=0.05,
        err_clip=0.2,
        deadzone=0.02,
        update_interval=100,
        beta_min=1e-4,
        beta_max=1e2,
        # Paper controller (METHOD.md 4.8 "Paper", App. K Eq. 27). The paper gives no numbers for
        # rho, kappa or delta (METHOD.md 10.5); these are ours.
        rho=0.5,
        kappa_init=1.0,
        kappa_lr=0.1,
        kappa_min=1e-3,
        kappa_max=1e2,
        delta=(0.01, 0.01, 0.01),
        # The code's "second chance" relaxation: multiply an easy, incorrect sample's KL by
        # `factor` if its soft cost >= soft_cost_min. Enabled in the code's defaults but it never
        # fired there (its inputs never reached the actor), so off here (METHOD.md 4.8).
        second_chance=dict(
            enabled=False, factor=0.67, soft_cost_min=0.5, easy_only=True, incorrect_only=True
        ),
    )

    # --- Optimizer (METHOD.md 6): AdamW, constant lr, no warm-up, grad-norm clip 1.0.
    c.optim = dict(
        lr=1e-5,  # paper 1e-6; the small embedded model needs larger steps to move in minutes
        weight_decay=1e-2,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,
        schedule="constant",  # 'constant' | 'cosine'
        warmup_steps=0,
        state_dtype="float32",  # Adam's first moment; the released launcher used a bf16 AdamW
    )

    # --- Training loop (METHOD.md 4.7, 4.11).
    c.train = dict(
        steps=20,  # iterations (rollout + updates); paper ~250
        prompts_per_step=4,  # prompts per optimizer step; paper 128 (4 steps per 512 iteration)
        # Sequences per gradient-accumulation micro-batch, whole mesh; packed (pack_tokens > 0),
        # the most one micro-batch holds (it bounds its prompts' images and per-row arrays).
        micro_batch_size=32,
        # Packed learner rows (ares_jax/batching.py): micro-batches of a token budget, one row
        # of at most this many tokens per device of the batch axes, each holding as many
        # sequences (prompts and responses without their padding) as fit, so no row exceeds
        # what the memory plan assumes; as many micro-batches as the mini-batch needs (bucketed;
        # spare ones cost no compute). Must hold the longest sequence. 0 = padded rows, prompt
        # bucket + response bucket each, micro_batch_size rows per micro-batch.
        pack_tokens=0,
        ppo_epochs=1,
        # 'learner' = old log-probs recomputed by the learner after the rollout (released code);
        # 'sampler' = taken from the sampler (same parameters here, saves one forward pass).
        old_logp_source="learner",
        max_nonfinite_steps=0,  # non-finite loss/grad steps tolerated before stopping (0 = none)
        score_workers=0,  # processes grading answers with math-verify; 0 = in this process
        export=True,  # write the final policy as a Hugging Face checkpoint to WORKDIR/export
        logprob_chunk_size=64,  # sequence chunk of the log-prob/entropy kernel
        logprob_vocab_chunk_size=config_dict.placeholder(int),  # None = whole vocabulary
        # dtype of the unembedding in the learner's log-prob head: 'compute' = cast to
        # model.dtype, as the sampler's logits are (bfloat16 matmuls accumulating in float32; the
        # gradient reaches the float32 master weight through the cast; log-probs move by
        # bfloat16 rounding, about 1e-3) | 'param' = as stored (float32 master weights: 3 of the
        # head's 4 vocabulary matmuls in float32, and a float32 [D, V] gathered for the head).
        # Measured: benchmarks/precision.py.
        logprob_head_dtype="compute",
    )

    # --- In-training evaluation (METHOD.md 4.1, 6): T 0.5, n 1, every 5 steps.
    c.eval = dict(
        val_before_train=True,  # also seeds tau (entropy.threshold_init='validation')
        every_steps=5,
        temperature=0.5,
        top_p=0.99,  # the code overrides only T and n for validation
        n=1,
        max_response_len=64,
        max_examples=0,  # 0 = the whole validation set
    )

    c.checkpoint = dict(
        every_steps=5,
        keep=3,
        resume=config_dict.placeholder(str),  # checkpoint to resume if the workdir holds none
        async_save=True,
    )
    c.log = dict(every_steps=1, tensorboard=True)

    # --- Mesh (ares_jax/parallel): -1 takes the remaining devices. `rules` are logical-axis
    # overrides merged over ares_jax.parallel.rules.DEFAULT_RULES, as (name, axes) pairs, e.g.
    # (('kv_heads', None), ('batch', ('data', 'fsdp'))). The sampler uses the same table.
    # `topology` names the machine (configs/topologies.py); set through the preset argument
    # (`:preset=paper_3b,topology=v5p-8`), it also sets `shape` and `rules`. '' = none named.
    c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=(), topology="")
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.model.preset = "tiny"
    c.data.update(
        synthetic_train_size=32,
        synthetic_val_size=8,
        max_pixels=3136,
        max_prompt_len=256,
        prompt_len_buckets=(256,),
    )
    c.rollout.update(
        n=4, max_response_len=16, length_buckets=(16,), prompts_per_iter=2, decode_batch_size=8
    )
    c.train.update(steps=2, prompts_per_step=2, micro_batch_size=8, logprob_chunk_size=16)
    c.eval.update(every_steps=1, max_response_len=16, max_examples=4)
    c.checkpoint.update(every_steps=1, keep=1)


def _paper_scale(c: ml_collections.ConfigDict, size: str) -> None:
    """The paper's sizes (METHOD.md 6), shared by both paper-scale families."""
    # remat 'full': measured on v5p-8 (benchmarks/RESULTS.md "Remat policy"), 'attention' with
    # Splash needs 59 GiB more XLA temporaries per chip and no longer fits with 15% to spare.
    c.model.update(preset=size, dtype="bfloat16", param_dtype="float32", remat="full")
    c.data.update(
        source="files",
        min_pixels=262144,
        max_pixels=4194304,
        max_prompt_len=4096,
        prompt_len_buckets=(1024, 2048, 4096),
    )
    c.rollout.update(
        max_response_len=16384,  # METHOD.md 9.12: final config/paper; released example 8192
        length_buckets=(2048, 4096, 8192, 16384),
        prompts_per_iter=512,
        decode_batch_size=256,
        # Half the worst case (256 slots x 20480 positions / 64): 10,240 positions per slot on
        # average, against a 4096-token prompt bucket and responses of median ~800; a shard whose
        # pool runs dry preempts its youngest row. Per v5p-8 chip: 22.5 GiB (3B), 35 GiB (7B).
        kv_pages=40960,
        prefill_prompts=2,  # per shard and admission: 2 x 4096 prompt tokens per chip
    )
    c.optim.update(lr=1e-6, state_dtype="bfloat16")
    # 250 iterations: the length of the paper's training curves (METHOD.md 7.4, Fig. 6). The
    # released trainer derives its length from `total_epochs: 250` as 250 x floor(N / 512) global
    # steps (18,750 for ViRL39K's 38,870 problems, `RayPPOTrainer.__init__`), an upper bound the
    # authors' runs did not reach; a global step that finds the data exhausted starts the next
    # epoch without an update. Here one iteration always updates, and the stream wraps into the
    # next epoch seamlessly; set train.steps for a longer run.
    # Packed rows of 32768 tokens: 8 sequences per v5p chip (4 per H100) at 4k tokens on average;
    # padded they would take 8 x 20480.
    c.train.update(
        steps=250,
        prompts_per_step=128,
        micro_batch_size=32,
        logprob_chunk_size=256,
        pack_tokens=32768,
    )
    c.entropy.update(trigger_words="released")  # the authors' 174 words (METHOD.md 2.4)
    c.eval.update(max_response_len=16384)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)  # FSDP over all devices (verl: FSDP, 8 GPUs)


def _paper(c: ml_collections.ConfigDict, size: str) -> None:
    """The authors' final run as released, quirks included (README, *Presets and the released
    code*): every switch of RELEASED_SWITCHES at the released value."""
    _paper_scale(c, size)
    c.entropy.update(trigger_token="argmax", estimator="topk_code", topk=10)
    c.reward.reward_timing_quirk = True
    c.kl.beta_cadence.update(ranks=8, micro_batch=1)  # 8 GPUs, 1 sequence per micro-batch
    # The released launcher trains in bfloat16 master weights with a bfloat16 AdamW
    # (fsdp.torch_dtype=bf16, optim.strategy=adamw_bf16): parameters and both moments.
    c.model.param_dtype = "bfloat16"
    c.optim.state_dtype = "bfloat16"


def _corrected(c: ml_collections.ConfigDict, size: str) -> None:
    """The method at the paper's scale with the released code's bugs fixed and the exact
    estimators: sampled trigger tokens, full-vocabulary entropies, bucket-aware rewards for the
    advantage, one beta controller for all rows, float32 master weights."""
    _paper_scale(c, size)
    # One shared controller state stepped once per 8 sequences: as many controller steps per
    # iteration as each rank of the released launcher takes, independent of the device count.
    c.kl.beta_cadence.update(ranks=1, micro_batch=8)


# Behaviour switches where the released code, this project's defaults and the corrected family
# may differ (README, *Presets and the released code*: tests/configs/aepo_test.py checks that its
# table lists every key whose default is not the released value, with the values below).
RELEASED_SWITCHES = (
    "entropy.trigger_words",
    "entropy.trigger_token",
    "entropy.estimator",
    "entropy.threshold",
    "entropy.threshold_init",
    "entropy.hwe_count",
    "entropy.window_offset",
    "reward.variant",
    "reward.reward_timing_quirk",
    "advantage.scale",
    "kl.controller",
    "kl.beta_cadence.ranks",
    "kl.beta_cadence.micro_batch",
    "kl.second_chance.enabled",
    "rollout.branching.enabled",
    "train.old_logp_source",
    "model.param_dtype",
    "optim.state_dtype",
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked config for the preset named in `arg` (see the module docstring): the
    whole pipeline (configs/pipeline.py) for '' and 'pipeline_smoke', the AEPO stage otherwise."""
    args = common.parse_arg(arg, preset="", topology="")
    if args.preset not in PRESETS:
        known = ", ".join(repr(p) for p in PRESETS[1:])
        raise ValueError(
            f"configs/aepo.py: unknown preset {args.preset!r}; known: {known} (or none)."
        )
    if args.preset in PIPELINE_PRESETS:
        if args.topology:
            raise ValueError(
                "configs/aepo.py: topology applies to the stage presets (stage, smoke, paper_*, "
                f"corrected_*), not to the embedded pipeline preset {args.preset!r}."
            )
        from configs import pipeline  # configs/pipeline.py builds on this module

        return pipeline.get_config(PIPELINE_PRESETS[args.preset])
    return stage_config(args.preset, topology=args.topology)


def stage_config(preset: str = "", *, topology: str = "") -> ml_collections.ConfigDict:
    """The locked AEPO stage config: the embedded CPU sizes for '' or 'stage', or a preset's."""
    c = _base()
    if preset == "smoke":
        _smoke(c)
    elif preset.startswith("paper_"):
        _paper(c, preset.removeprefix("paper_"))
    elif preset.startswith("corrected_"):
        _corrected(c, preset.removeprefix("corrected_"))
    if topology:
        topologies.apply(c, topology)
    return c.lock()


# ---------------------------------------------------------------------------------------------
# Validation: run by main.py after command-line overrides.

_unit = common.in_range(0.0, 1.0)
_pos = common.positive()
_nonneg = common.non_negative()
_int = common.is_type(int)

SCHEMA = {
    "stage": common.one_of("aepo"),
    "seed": _int,
    "model.preset": common.one_of("tiny", "small", "3b", "7b"),
    "model.dtype": common.one_of("float32", "bfloat16"),
    "model.param_dtype": common.one_of("float32", "bfloat16"),
    "model.attention": common.one_of(*common.MODEL_ATTENTION),
    "model.remat": common.one_of(*common.MODEL_REMAT),
    "model.reference_dtype": common.one_of("compute", "param"),
    "data.source": common.one_of("synthetic", "files"),
    "data.synthetic_train_size": (_int, _pos),
    "data.synthetic_val_size": (_int, _pos),
    "data.min_pixels": (_int, _pos),
    "data.max_pixels": (_int, _pos),
    "data.image_mean": common.optional(common.rgb(common.in_range(0.0, 1.0))),
    "data.image_std": common.optional(common.rgb(common.positive())),
    "data.max_prompt_len": (_int, _pos),
    "data.prompt_len_buckets": common.ascending_ints(),
    "data.on_error": common.one_of("raise", "skip"),
    "data.drop_overlong_prompts": common.is_type(bool),
    "data.allow_absolute_image_paths": common.is_type(bool),
    "data.image_root": common.optional(common.is_type(str)),
    "rollout.n": (_int, common.in_range(2, None)),
    "rollout.temperature": _pos,
    "rollout.top_p": common.in_range(0.0, 1.0, lo_open=True),
    "rollout.top_k": (_int, _nonneg),
    "rollout.max_response_len": (_int, _pos),
    "rollout.length_buckets": common.ascending_ints(),
    "rollout.prompts_per_iter": (_int, _pos),
    "rollout.decode_batch_size": (_int, _pos),
    "rollout.engine": common.one_of("paged", "static"),
    "rollout.page_size": (_int, _pos),
    "rollout.kv_pages": (_int, _nonneg),
    "rollout.chunk_steps": (_int, _pos),
    "rollout.prefill_prompts": (_int, _pos),
    "rollout.prefill_chunk": (_int, _nonneg),
    "rollout.branching.budget": (_int, _nonneg),
    "rollout.branching.cooldown": (_int, _nonneg),
    "entropy.window": (_int, _pos),
    "entropy.window_offset": common.one_of(0, 1),
    "entropy.percentile": common.in_range(0.0, 100.0),
    "entropy.threshold": common.one_of("code", "paper"),
    "entropy.threshold_ema": common.in_range(0.0, 1.0, hi_open=True),
    "entropy.threshold_init": common.one_of("validation", "first_batch"),
    "entropy.hwe_count": common.one_of("code", "paper_token", "paper_window"),
    "entropy.trigger_token": common.one_of("sampled", "argmax"),
    "entropy.estimator": common.one_of("exact", "topk_tail", "topk_code"),
    "entropy.topk": (_int, _pos),
    "reward.variant": common.one_of("code", "paper", "none"),
    "reward.accuracy_weight": _nonneg,
    "reward.format_weight": _nonneg,
    "reward.alpha_lr": _nonneg,
    "reward.target_scale": common.per_bucket(_pos),
    "reward.margin_frac": common.per_bucket(_pos),
    "reward.huber_kappa": common.per_bucket(_pos),
    "reward.sigmoid_temp": common.per_bucket(_pos),
    "reward.cap_scale": common.per_bucket(_nonneg),
    "reward.wrong_gain": common.per_bucket(_nonneg),
    "reward.paper_eps": _pos,
    "filter.low": _unit,
    "filter.high": _unit,
    "filter.max_tries": (_int, _pos),
    "advantage.scale": common.one_of("std", "none", "length"),
    "advantage.eps": _pos,
    "loss.clip_low": common.in_range(0.0, 1.0, lo_open=True, hi_open=True),
    "loss.clip_high": _pos,
    "loss.dual_clip": common.in_range(1.0, None, lo_open=True),
    "loss.logratio_clamp": _pos,
    "loss.agg": common.one_of("seq-mean-token-mean", "token-mean", "seq-mean-token-sum"),
    "kl.estimator": common.one_of("k1", "k2", "k3"),
    "kl.coef": _nonneg,
    "kl.controller": common.one_of("code", "paper", "fixed"),
    "kl.bucket_coef": common.per_bucket(_nonneg),
    "kl.target": common.per_bucket(_pos),
    "kl.ema_decay": common.in_range(0.0, 1.0, hi_open=True),
    "kl.beta_lr": _nonneg,
    "kl.err_clip": _pos,
    "kl.deadzone": _nonneg,
    "kl.update_interval": (_int, _pos),
    "kl.beta_cadence.ranks": (_int, _pos),
    "kl.beta_cadence.micro_batch": (_int, _nonneg),
    "kl.beta_min": _pos,
    "kl.rho": common.in_range(0.0, 1.0, lo_open=True),
    "kl.kappa_lr": _nonneg,
    "kl.kappa_min": _pos,
    "kl.delta": common.per_bucket(_pos),
    "kl.second_chance.factor": common.in_range(0.0, 1.0),
    "kl.second_chance.soft_cost_min": _nonneg,
    "optim.lr": _pos,
    "optim.weight_decay": _nonneg,
    "optim.b1": common.in_range(0.0, 1.0, hi_open=True),
    "optim.b2": common.in_range(0.0, 1.0, hi_open=True),
    "optim.eps": _pos,
    "optim.grad_clip": _nonneg,  # 0 = no clipping
    "optim.schedule": common.one_of("constant", "cosine"),
    "optim.warmup_steps": (_int, _nonneg),
    "optim.state_dtype": common.one_of("float32", "bfloat16"),
    "train.steps": (_int, _pos),
    "train.prompts_per_step": (_int, _pos),
    "train.micro_batch_size": (_int, _pos),
    "train.ppo_epochs": (_int, _pos),
    "train.old_logp_source": common.one_of("learner", "sampler"),
    "train.max_nonfinite_steps": (_int, _nonneg),
    "train.score_workers": (_int, _nonneg),
    "train.logprob_chunk_size": (_int, _pos),
    "train.pack_tokens": (_int, _nonneg),
    "train.logprob_vocab_chunk_size": common.optional(common.is_type(int)),
    "train.logprob_head_dtype": common.one_of("compute", "param"),
    "eval.every_steps": (_int, _nonneg),  # 0 = no periodic evaluation
    "eval.temperature": _nonneg,  # 0 = greedy
    "eval.top_p": common.in_range(0.0, 1.0, lo_open=True),
    "eval.n": (_int, _pos),
    "eval.max_response_len": (_int, _pos),
    "eval.max_examples": (_int, _nonneg),
    "checkpoint.every_steps": (_int, _nonneg),  # 0 = only at the end
    "checkpoint.keep": (_int, _pos),
    "log.every_steps": (_int, _pos),
}


def _check_order(c, lo_key: str, mid_key: str | None, hi_key: str) -> None:
    keys = [k for k in (lo_key, mid_key, hi_key) if k]
    values = [common.get_path(c, k) for k in keys]
    if any(a > b for a, b in zip(values, values[1:], strict=False)):
        got = ", ".join(f"{k}={v!r}" for k, v in zip(keys, values, strict=True))
        common.fail(lo_key, f"must satisfy {' <= '.join(keys)}; got {got}.")


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks enum switches, ranges, cross-field rules and required paths (of each stage's block
    for the pipeline presets).

    Raises:
      ValueError: one sentence naming the first offending dotted key.
    """
    if c.get("stage") == "pipeline":
        from configs import pipeline

        pipeline.validate(c)
        return
    common.validate(c, SCHEMA)

    # Sizes that must divide.
    if c.rollout.prompts_per_iter % c.train.prompts_per_step:
        common.fail(
            "train.prompts_per_step",
            f"{c.train.prompts_per_step} must divide rollout.prompts_per_iter "
            f"({c.rollout.prompts_per_iter}).",
        )
    if (c.train.prompts_per_step * c.rollout.n) % c.train.micro_batch_size:
        common.fail(
            "train.micro_batch_size",
            f"{c.train.micro_batch_size} must divide train.prompts_per_step * rollout.n "
            f"({c.train.prompts_per_step * c.rollout.n}).",
        )
    longest = c.data.max_prompt_len + c.rollout.max_response_len
    if c.train.pack_tokens and c.train.pack_tokens < longest:
        common.fail(
            "train.pack_tokens",
            f"{c.train.pack_tokens} is shorter than the longest sequence, data.max_prompt_len + "
            f"rollout.max_response_len = {longest}; 0 turns packing off.",
        )
    cadence = c.kl.beta_cadence.ranks * max(c.kl.beta_cadence.micro_batch, 1)
    if c.train.micro_batch_size % cadence:
        common.fail(
            "kl.beta_cadence",
            f"ranks x micro_batch ({cadence}) must divide train.micro_batch_size "
            f"({c.train.micro_batch_size}).",
        )
    for buckets, limit in (
        ("rollout.length_buckets", "rollout.max_response_len"),
        ("data.prompt_len_buckets", "data.max_prompt_len"),
    ):
        if common.get_path(c, buckets)[-1] != common.get_path(c, limit):
            common.fail(buckets, f"the last bucket must equal {limit}.")

    # Orders.
    _check_order(c, "data.min_pixels", None, "data.max_pixels")
    _check_order(c, "reward.alpha_min", "reward.alpha_init", "reward.alpha_max")
    _check_order(c, "kl.beta_min", "kl.beta_init", "kl.beta_max")
    _check_order(c, "kl.kappa_min", "kl.kappa_init", "kl.kappa_max")
    if not c.filter.low < c.filter.high:
        common.fail("filter.low", f"must be below filter.high ({c.filter.low} >= {c.filter.high}).")

    # Switch combinations.
    if (
        c.entropy.threshold == "code"
        and c.entropy.threshold_init == "validation"
        and not c.eval.val_before_train
    ):
        common.fail(
            "entropy.threshold_init",
            "'validation' needs eval.val_before_train=True; or set threshold_init='first_batch'.",
        )
    if c.entropy.estimator != "exact" and c.entropy.topk < 1:
        common.fail("entropy.topk", "must be >= 1 for a top-k estimator.")

    _validate_mesh(c)

    # Paths.
    big = c.model.preset in ("3b", "7b")
    common.check_path(c, "model.path", required=big, why=f"for model.preset={c.model.preset!r}")
    if c.entropy.trigger_words != "released":  # a shipped list by name, else a path
        common.check_path(c, "entropy.trigger_words", required=False)
    common.check_path(c, "checkpoint.resume", required=False)
    files = c.data.source == "files"
    if not files:
        for key in ("data.train_files", "data.val_files"):
            if common.get_path(c, key) is not None:
                common.fail(key, "is set but data.source='synthetic'; set data.source='files'.")
    need_val = files and (c.eval.val_before_train or c.eval.every_steps > 0)
    common.check_files(c, "data.train_files", required=files, why="for data.source='files'")
    common.check_path(c, "data.image_root", required=False)
    common.check_columns(c, "data.columns")
    common.check_files(
        c,
        "data.val_files",
        required=need_val,
        why="for evaluation (eval.val_before_train, eval.every_steps)",
    )


def _validate_mesh(c: ml_collections.ConfigDict) -> None:
    shape = c.mesh.shape
    if set(shape) != {"data", "fsdp", "tensor"}:
        common.fail(
            "mesh.shape", f"must have exactly the keys data, fsdp, tensor; got {dict(shape)}."
        )
    for axis, size in shape.items():
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            common.fail(f"mesh.shape.{axis}", f"must be a positive integer or -1, got {size!r}.")
    if sum(size == -1 for size in shape.values()) > 1:
        common.fail("mesh.shape", "at most one axis may be -1.")
    # Imported here: configs stay importable without jax; the table lives in ares_jax.parallel.
    from ares_jax.parallel import rules

    for key in ("mesh.rules",):
        try:
            rules.merge_rules(common.get_path(c, key))
        except (TypeError, ValueError) as e:
            common.fail(key, str(e))
    topologies.check(c)
