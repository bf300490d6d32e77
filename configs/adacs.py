r"""AdaCS, the adaptive cold start of ARES (METHOD.md section 3), with every setting.

The stage (ares_jax/adacs/train.py) runs, in order:
  1. pass rates: K samples per problem from `pass_rate.model_path` (default: the model being
     fine-tuned; the paper used an external model, Revisual-R1: set model_path to reproduce it),
     checked with math-verify, for problems whose data carry no pass rate;
  2. curation: per source, L(0) and L(1), the median trace lengths at pass rates 0 and 1;
     L_target(p) = (1 - p) L(0) + p L(1); each problem keeps its correct teacher trace closest to
     its target within the tolerance; uniform sampling across pass-rate brackets
     (`curation.vanilla` is the paper's ablation: the same sampling, lengths ignored);
  3. supervised fine-tuning on the curated traces, with the loss on response tokens only and the
     vision tower frozen by default.

Presets (the text after the colon):

  (none)    The embedded CPU default: the small Qwen2.5-VL-architecture model on the project's
            synthetic task with its step-by-step teacher's traces.
              python -m ares_jax.main --config=configs/adacs.py --workdir=/tmp/adacs
  smoke     Tiny model, a few problems, seconds; for CI.
              python -m ares_jax.main --config=configs/adacs.py:smoke --workdir=/tmp/adacs_smoke
  paper_7b  The paper's SFT settings (METHOD.md 3.3): lr 2e-5, 2 epochs, global batch 256,
            sequences up to 32k. Needs the base checkpoint and the cold-start data; pass rates
            come from the records where they carry one, else from pass_rate.model_path (the
            paper's are Revisual-R1's):
              python -m ares_jax.main --config=configs/adacs.py:paper_7b --workdir=DIR \
                --config.model.path=CKPT_DIR --config.data.train_files=COLDSTART.parquet \
                [--config.pass_rate.model_path=REVISUAL_R1_DIR]
  paper_3b  The same for Qwen2.5-VL-3B.

A topology after the preset sets the mesh for that machine (configs/topologies.py):
  python -m ares_jax.main --config=configs/adacs.py:preset=paper_7b,topology=8xh100 --workdir=DIR
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from configs import common, topologies
from configs.aepo import PROMPT_SUFFIX

PRESETS = ("", "smoke", "paper_3b", "paper_7b")


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = "adacs"
    c.seed = 0
    c.model = dict(
        preset="small",  # 'tiny' | 'small' (embedded, random init) | '3b' | '7b' (need path)
        path=config_dict.placeholder(str),  # the base checkpoint (Qwen2.5-VL-*-Instruct)
        dtype="float32",
        param_dtype="float32",
        remat="none",  # the choices: configs/aepo.py model.remat
        scan_layers=True,
        freeze_vision=True,  # METHOD.md 3.3: "the LLM module" is trained
        attention="auto",  # the backend's kernel; the choices: configs/aepo.py model.attention
    )
    c.data = dict(
        source="synthetic",  # 'synthetic' (problems with the project's teacher traces) | 'files'
        # Problems with teacher traces, in the cold-start layout (question, answer, images,
        # reasoning traces, source, optional pass rate; ares_jax/data/records.py lists the columns).
        # The traces come from external teacher models (the paper's cold-start set); RL data
        # such as ViRL39K has none, and the stage stops before any work when no training row
        # carries one. A row's provided pass rate (e.g. ViRL39K's) is used, not estimated.
        train_files=config_dict.placeholder(object),
        val_files=config_dict.placeholder(object),
        # Data paths (train_files, val_files): a file, a directory (its .jsonl/.json/.parquet
        # files, sorted; subdirectories are not searched), a glob (`**` spans directories), or a
        # comma-separated string / list of these.
        # Field -> column of the data files, for files whose columns records.COLUMNS does not
        # know (or to pick one of several): --config.data.columns.question=problem, or all at
        # once --config.data.columns='{"question": "problem", "pass_rate": "PassRate_32BTrained"}'
        # (fields left out keep the default lookup). Fields: question, answer, images, id,
        # traces, source, pass_rate, difficulty, messages. By default a ViRL39K row's pass rate
        # is PassRate_7BBase, else (null) PassRate_32BTrained (records.py docstring).
        columns=common.data_columns(),
        synthetic_train_size=256,
        synthetic_val_size=64,
        # The synthetic teacher also writes its checked style (a quick count, "So 12? Let me
        # check row by row: 1, 2 in row 1, then ...", correcting a quick count that missed a
        # shape; data/synthetic.py).
        synthetic_checks=False,
        prompt_template=PROMPT_SUFFIX,
        min_pixels=3136,
        max_pixels=12544,
        # Image normalisation after rescaling to [0, 1], per channel (R, G, B); None: model.path's
        # image processor's (either checkpoint layout), else the hub's Qwen2.5-VL values.
        image_mean=config_dict.placeholder(tuple),
        image_std=config_dict.placeholder(tuple),
        max_prompt_len=256,
        prompt_len_buckets=(192, 256),
        # As configs/aepo.py: prompts are measured at start-up; True drops (and counts) one
        # longer than the last bucket, False stops the run naming its file and line.
        drop_overlong_prompts=True,
        on_error="raise",  # a bad record: 'raise' (names file and line) | 'skip' (counted)
        shuffle_seed=0,
        # Relative image paths resolve against image_root (None: each data file's directory)
        # and, like absolute ones, must stay inside it after `..` and symlinks; True lifts that.
        # Only regular files up to records.MAX_IMAGE_FILE_BYTES (64 MiB) are read.
        image_root=config_dict.placeholder(str),
        allow_absolute_image_paths=False,
    )
    # METHOD.md 3.1: 8 samples per problem from the pass-rate model; rates in 9 brackets.
    # The paper takes pass rates from an external model, Revisual-R1 (8 samples each), not from
    # the model being fine-tuned; to reproduce it, set model_path to a Revisual-R1 checkpoint, or
    # give data whose records carry pass rates. Our default, the model being fine-tuned, measures
    # difficulty for the student itself (the only model the embedded task has).
    c.pass_rate = dict(
        enabled=True,  # estimate rates for problems without one; False: problems need rates
        # None = the model being fine-tuned (our default); the paper: a Revisual-R1 checkpoint.
        model_path=config_dict.placeholder(str),
        samples=8,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=128,  # paper: not stated; the CPU default is short
        batch_size=16,  # problems per generate call
    )
    # METHOD.md 3.2 and 10.2 (the paper leaves tolerance and quotas open; these are ours).
    c.curation = dict(
        enabled=True,  # False: no pass rates, no curation; SFT on every problem (a warm-up)
        tolerance=0.25,  # |len - target| <= tolerance * target; 0 = no limit
        per_bracket=0,  # problems per pass-rate bracket; 0 = the smallest non-empty bracket
        per_source=False,  # quotas per (source, bracket) instead of per bracket
        require_correct=True,  # only teacher traces whose boxed answer is correct
        vanilla=False,  # the ARES-CS-Vanilla ablation: uniform brackets, lengths ignored
    )
    # METHOD.md 3.3: lr 2e-5, 2 epochs, batch 256, 32k sequences (scheduler not stated).
    c.sft = dict(
        epochs=2,
        max_steps=0,  # stop after this many optimizer steps; 0 = the epochs decide
        global_batch=32,  # sequences per optimizer step; paper 256
        micro_batch_size=16,
        lr=1e-4,  # paper 2e-5; the small embedded model learns in minutes with more
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip=1.0,
        schedule="cosine",  # 'constant' | 'cosine'
        warmup_steps=2,
        state_dtype="float32",
        max_response_len=256,  # teacher traces longer than this are cut; paper 32k sequences
        length_buckets=(128, 256),
        # Batches of similar trace length: each window of this many batches is sorted by trace
        # length, cut into batches and shuffled batch by batch (data/pipeline.py
        # LengthGroupedBatches), so that a batch of short traces takes a short length bucket
        # instead of the bucket of the one long trace among them. 0 = batches as drawn.
        length_group_batches=0,
        logprob_chunk_size=64,
        logprob_vocab_chunk_size=config_dict.placeholder(int),
        # METHOD.md 3.3 / 10.1: "adaptive KL-guided fine-tuning" is named but never defined.
        # Our interpretation (ares_jax/adacs/sft.py): kl_coef * w_b * k3 per token to the frozen
        # initial model, w_b the weight of the problem's pass-rate bracket (9 brackets, p = 0..1).
        kl_coef=0.0,  # 0 = off (plain SFT, what the paper's setting is read as)
        kl_bracket_weights=(0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
        max_nonfinite_steps=0,
    )
    c.eval = dict(
        every_steps=0,  # 0 = only at the end
        temperature=0.5,
        top_p=0.99,
        max_response_len=256,
        max_examples=0,
    )
    c.checkpoint = dict(
        every_steps=10, keep=3, resume=config_dict.placeholder(str), async_save=True
    )
    c.log = dict(every_steps=1, tensorboard=True)
    # configs/aepo.py documents the mesh block; `topology` is set by the preset argument.
    c.mesh = dict(shape=dict(data=-1, fsdp=1, tensor=1), rules=(), topology="")
    return c


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.model.preset = "tiny"
    c.data.update(
        synthetic_train_size=24, synthetic_val_size=4, max_pixels=3136, prompt_len_buckets=(256,)
    )
    c.pass_rate.update(samples=2, max_new_tokens=8, batch_size=8)
    c.sft.update(
        epochs=1,
        global_batch=8,
        micro_batch_size=8,
        max_response_len=128,
        length_buckets=(128,),
        logprob_chunk_size=32,
        warmup_steps=0,
    )
    c.eval.update(max_response_len=16, max_examples=4)
    c.checkpoint.update(every_steps=1, keep=1)


def _paper(c: ml_collections.ConfigDict, size: str) -> None:
    c.model.update(preset=size, dtype="bfloat16", param_dtype="float32", remat="full")
    c.data.update(
        source="files",
        min_pixels=262144,
        max_pixels=4194304,
        max_prompt_len=4096,
        prompt_len_buckets=(1024, 2048, 4096),
    )
    c.pass_rate.update(max_new_tokens=16384, batch_size=64)
    c.sft.update(
        epochs=2,
        global_batch=256,
        micro_batch_size=8,
        lr=2e-5,
        weight_decay=0.0,
        schedule="cosine",
        warmup_steps=20,
        state_dtype="bfloat16",
        max_response_len=28672,
        length_buckets=(4096, 8192, 16384, 28672),
        logprob_chunk_size=512,
    )
    c.eval.update(max_response_len=16384)
    c.checkpoint.update(every_steps=100)
    c.mesh.shape.update(data=1, fsdp=-1, tensor=1)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Returns the locked AdaCS config for the preset named in `arg` (module docstring)."""
    args = common.parse_arg(arg, preset="", topology="")
    if args.preset not in PRESETS:
        known = ", ".join(repr(p) for p in PRESETS[1:])
        raise ValueError(
            f"configs/adacs.py: unknown preset {args.preset!r}; known: {known} (or none)."
        )
    c = _base()
    if args.preset == "smoke":
        _smoke(c)
    elif args.preset.startswith("paper_"):
        _paper(c, args.preset.removeprefix("paper_"))
    if args.topology:
        topologies.apply(c, args.topology)
    return c.lock()


_pos = common.positive()
_nonneg = common.non_negative()
_int = common.is_type(int)

SCHEMA = {
    "stage": common.one_of("adacs"),
    "seed": _int,
    "model.preset": common.one_of("tiny", "small", "3b", "7b"),
    "model.dtype": common.one_of("float32", "bfloat16"),
    "model.param_dtype": common.one_of("float32", "bfloat16"),
    "model.attention": common.one_of(*common.MODEL_ATTENTION),
    "model.remat": common.one_of(*common.MODEL_REMAT),
    "data.source": common.one_of("synthetic", "files"),
    "data.synthetic_train_size": (_int, _pos),
    "data.synthetic_val_size": (_int, _nonneg),
    "data.synthetic_checks": common.is_type(bool),
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
    "pass_rate.samples": (_int, _pos),
    "pass_rate.temperature": _nonneg,
    "pass_rate.top_p": common.in_range(0.0, 1.0, lo_open=True),
    "pass_rate.max_new_tokens": (_int, _pos),
    "pass_rate.batch_size": (_int, _pos),
    "curation.tolerance": _nonneg,
    "curation.per_bracket": (_int, _nonneg),
    "sft.epochs": (_int, _pos),
    "sft.max_steps": (_int, _nonneg),
    "sft.length_group_batches": (_int, _nonneg),
    "sft.global_batch": (_int, _pos),
    "sft.micro_batch_size": (_int, _pos),
    "sft.lr": _pos,
    "sft.weight_decay": _nonneg,
    "sft.grad_clip": _nonneg,
    "sft.schedule": common.one_of("constant", "cosine"),
    "sft.warmup_steps": (_int, _nonneg),
    "sft.state_dtype": common.one_of("float32", "bfloat16"),
    "sft.max_response_len": (_int, _pos),
    "sft.length_buckets": common.ascending_ints(),
    "sft.logprob_chunk_size": (_int, _pos),
    "sft.logprob_vocab_chunk_size": common.optional(common.is_type(int)),
    "sft.kl_coef": _nonneg,
    "sft.kl_bracket_weights": common.per_bucket(_nonneg, n=9),
    "sft.max_nonfinite_steps": (_int, _nonneg),
    "eval.every_steps": (_int, _nonneg),
    "eval.temperature": _nonneg,
    "eval.max_response_len": (_int, _pos),
    "eval.max_examples": (_int, _nonneg),
    "checkpoint.every_steps": (_int, _nonneg),
    "checkpoint.keep": (_int, _pos),
}


def validate(c: ml_collections.ConfigDict) -> None:
    """Checks switches, ranges and required paths; raises ValueError naming the first bad key."""
    common.validate(c, SCHEMA)
    if c.sft.global_batch % c.sft.micro_batch_size:
        common.fail("sft.micro_batch_size", f"must divide sft.global_batch ({c.sft.global_batch}).")
    for buckets, limit in (
        ("sft.length_buckets", "sft.max_response_len"),
        ("data.prompt_len_buckets", "data.max_prompt_len"),
    ):
        if common.get_path(c, buckets)[-1] != common.get_path(c, limit):
            common.fail(buckets, f"the last bucket must equal {limit}.")
    if c.data.min_pixels > c.data.max_pixels:
        common.fail("data.min_pixels", "must not exceed data.max_pixels.")
    topologies.check(c)
    big = c.model.preset in ("3b", "7b")
    common.check_path(c, "model.path", required=big, why=f"for model.preset={c.model.preset!r}")
    common.check_path(c, "pass_rate.model_path", required=False)
    common.check_path(c, "checkpoint.resume", required=False)
    files = c.data.source == "files"
    if not files:
        for key in ("data.train_files", "data.val_files"):
            if common.get_path(c, key) is not None:
                common.fail(key, "is set but data.source='synthetic'; set data.source='files'.")
    common.check_files(c, "data.train_files", required=files, why="for data.source='files'")
    common.check_files(c, "data.val_files", required=False)
    common.check_path(c, "data.image_root", required=False)
    common.check_columns(c, "data.columns")
