"""Tests for configs/common.py (parse_arg, validation helpers) and configs/aepo.py (presets)."""

import ast
from pathlib import Path

import ml_collections
import pytest

from configs import aepo, common

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------
# parse_arg


def test_parse_arg_defaults_and_types():
    out = common.parse_arg(None, preset="", steps=3, lr=0.5, runlocal=False)
    assert dict(out) == dict(preset="", steps=3, lr=0.5, runlocal=False)
    out = common.parse_arg("preset=paper_7b,steps=7,lr=1e-6,runlocal=true", preset="", steps=3,
                           lr=0.5, runlocal=False)  # fmt: skip
    assert out.preset == "paper_7b" and out.steps == 7 and out.lr == 1e-6 and out.runlocal is True
    assert isinstance(out.steps, int) and isinstance(out.lr, float)


def test_parse_arg_bare_values():
    out = common.parse_arg("paper_7b", preset="", runlocal=False)
    assert out.preset == "paper_7b" and out.runlocal is False
    out = common.parse_arg("paper_7b,runlocal", preset="", runlocal=False)
    assert out.runlocal is True
    out = common.parse_arg("runlocal=False", preset="", runlocal=True)
    assert out.runlocal is False


@pytest.mark.parametrize(
    "arg, match",
    [
        ("preset=paper_7b,hosts=4", r"unknown key 'hosts'.*known keys: preset, steps"),
        ("steps=abc", r"steps='abc' is not an integer"),
        ("steps=1.5", r"steps='1.5' is not an integer"),
        ("flag=maybe", r"flag='maybe' is not a bool"),
        ("x,y", r"bare item 'y'"),
        ("steps=1,steps=2", r"'steps' is given twice"),
    ],
)
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        common.parse_arg(arg, preset="", steps=1, flag=False)


def test_parse_arg_float_error_names_key():
    with pytest.raises(ValueError, match=r"lr='fast' is not a number"):
        common.parse_arg("lr=fast", lr=1.0)


# ---------------------------------------------------------------------------------------------
# Validation helpers


def test_validate_helpers():
    c = ml_collections.ConfigDict(dict(a=dict(mode="x", p=0.5, t=(1.0, 2.0, 3.0), k=None)))
    common.validate(c, {"a.mode": common.one_of("x", "y"), "a.p": common.in_range(0, 1)})
    with pytest.raises(ValueError, match=r"config\.a\.mode='x' must be one of 'y', 'z'"):
        common.validate(c, {"a.mode": common.one_of("y", "z")})
    with pytest.raises(ValueError, match=r"config\.a\.p=0\.5 must be in \(0\.5, 1\]"):
        common.validate(c, {"a.p": common.in_range(0.5, 1, lo_open=True)})
    with pytest.raises(ValueError, match=r"config\.a\.t=.*hard entry 3\.0"):
        common.validate(c, {"a.t": common.per_bucket(common.in_range(0, 2))})
    common.validate(c, {"a.k": common.optional(common.is_type(int))})
    with pytest.raises(KeyError, match="a.nokey"):
        common.validate(c, {"a.nokey": common.positive()})
    with pytest.raises(ValueError, match="must be one of 0, 1"):
        common.validate(ml_collections.ConfigDict(dict(w=True)), {"w": common.one_of(0, 1)})


# ---------------------------------------------------------------------------------------------
# Presets


def _with_paths(c, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir(exist_ok=True)
    for name in ("train.jsonl", "val.jsonl"):
        (tmp_path / name).write_text("{}\n")
    c.model.path = str(ckpt)
    c.data.train_files = str(tmp_path / "train.jsonl")
    c.data.val_files = [str(tmp_path / "val.jsonl")]
    return c


@pytest.mark.parametrize(
    "arg", [None, "", "stage", "smoke", "preset=smoke", "pipeline_smoke", "paper_3b", "paper_7b"]
)
def test_presets_build_and_validate(arg, tmp_path):
    c = aepo.get_config(arg)
    assert c.is_locked
    assert c.stage == ("pipeline" if arg in (None, "", "pipeline_smoke") else "aepo")
    if c.stage == "aepo" and c.model.preset in ("3b", "7b"):
        with pytest.raises(ValueError, match=r"config\.model\.path: is required"):
            aepo.validate(c)
        _with_paths(c, tmp_path)
    aepo.validate(c)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'paper_13b'.*'paper_7b'"):
        aepo.get_config("paper_13b")
    with pytest.raises(ValueError, match=r"unknown key 'hosts'"):
        aepo.get_config("preset=paper_7b,hosts=4")


def test_locked_rejects_unknown_keys():
    c = aepo.get_config("stage")
    with pytest.raises(AttributeError):
        c.loss.nokey = 1
    with pytest.raises(TypeError):
        c.loss.clip_low = "abc"


RELEASED = {
    "stage": "aepo",
    "model.freeze_vision": False,
    "data.prompt_template": aepo.PROMPT_SUFFIX,
    "rollout.n": 8,
    "rollout.temperature": 1.0,
    "rollout.top_p": 0.99,
    "rollout.top_k": 0,
    "rollout.image_token_logit_bias": -100.0,
    "rollout.branching.enabled": False,
    "entropy.window": 4,
    "entropy.window_offset": 1,
    "entropy.percentile": 95.0,
    "entropy.threshold": "code",
    "entropy.threshold_ema": 0.99,
    "entropy.threshold_init": "validation",
    "entropy.threshold_fallback": 1.5,
    "entropy.hwe_count": "code",
    "entropy.trigger_token": "sampled",
    "entropy.trigger_words": None,
    "entropy.estimator": "exact",
    "entropy.topk": 10,
    "reward.variant": "code",
    "reward.alpha_init": 0.5,
    "reward.alpha_lr": 0.05,
    "reward.alpha_min": 0.0,
    "reward.alpha_max": 2.0,
    "reward.target_scale": (1.0, 1.0, 1.0),
    "reward.margin_frac": (0.15, 0.25, 0.35),
    "reward.huber_kappa": (2.0, 3.0, 4.0),
    "reward.sigmoid_temp": (2.0, 2.5, 3.0),
    "reward.cap_scale": (1.0, 1.0, 1.2),
    "reward.wrong_gain": (0.6, 0.8, 1.0),
    "reward.paper_eps": 1e-6,
    "reward.format_weight": 0.0,
    "reward.accuracy_weight": 1.0,
    "reward.reward_timing_quirk": False,
    "filter.enabled": True,
    "filter.low": 0.01,
    "filter.high": 0.99,
    "filter.max_tries": 20,
    "advantage.scale": "std",
    "advantage.eps": 1e-6,
    "loss.clip_low": 0.2,
    "loss.clip_high": 0.3,
    "loss.dual_clip": 3.0,
    "loss.logratio_clamp": 20.0,
    "loss.agg": "seq-mean-token-mean",
    "kl.estimator": "k3",
    "kl.coef": 0.01,
    "kl.controller": "code",
    "kl.bucket_coef": (1.0, 1.0, 1.0),
    "kl.target": (0.01, 0.01, 0.01),
    "kl.beta_init": 1.0,
    "kl.ema_decay": 0.97,
    "kl.beta_lr": 0.05,
    "kl.err_clip": 0.2,
    "kl.deadzone": 0.02,
    "kl.update_interval": 100,
    "kl.beta_min": 1e-4,
    "kl.beta_max": 1e2,
    "kl.rho": 0.5,
    "kl.kappa_init": 1.0,
    "kl.kappa_lr": 0.1,
    "kl.kappa_min": 1e-3,
    "kl.kappa_max": 1e2,
    "kl.delta": (0.01, 0.01, 0.01),
    "kl.second_chance.enabled": False,
    "kl.second_chance.factor": 0.67,
    "kl.second_chance.soft_cost_min": 0.5,
    "kl.second_chance.easy_only": True,
    "kl.second_chance.incorrect_only": True,
    "optim.weight_decay": 1e-2,
    "optim.b1": 0.9,
    "optim.b2": 0.999,
    "optim.eps": 1e-8,
    "optim.grad_clip": 1.0,
    "optim.schedule": "constant",
    "optim.warmup_steps": 0,
    "train.ppo_epochs": 1,
    "train.old_logp_source": "learner",
    "eval.val_before_train": True,
    "eval.every_steps": 5,
    "eval.temperature": 0.5,
    "eval.n": 1,
}

PAPER = {
    "rollout.prompts_per_iter": 512,
    "rollout.max_response_len": 16384,
    "data.max_prompt_len": 4096,
    "data.min_pixels": 262144,
    "data.max_pixels": 4194304,
    "data.source": "files",
    "train.prompts_per_step": 128,
    "optim.lr": 1e-6,
    "eval.max_response_len": 16384,
    "checkpoint.every_steps": 5,
    "checkpoint.keep": 3,
    "model.path": None,
    "data.train_files": None,
    "data.val_files": None,
    "mesh.shape.fsdp": -1,
}


@pytest.mark.parametrize(
    "arg", ["stage", "smoke", "paper_3b", "paper_7b", "corrected_3b", "corrected_7b"]
)
def test_released_code_defaults(arg):
    """The algorithm's constants are the released code's in every preset; the behaviour
    switches (aepo.RELEASED_SWITCHES) are checked against the README's table below."""
    c = aepo.get_config(arg)
    for key, value in RELEASED.items():
        if arg == "smoke" and key in ("rollout.n", "eval.every_steps"):
            continue  # smoke samples 4 per prompt and evaluates every step, for speed
        if key in aepo.RELEASED_SWITCHES:
            continue
        got = common.get_path(c, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, key


def _switch_table() -> dict[str, tuple]:
    """The README's switch table: key -> (released, ours, corrected) Python values."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- switches:begin -->")[1].split("<!-- switches:end -->")[0]
    rows = [line for line in block.strip().splitlines()[2:] if line.startswith("|")]
    table = {}
    for line in rows:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        key = cells[0].strip("`")
        assert key not in table, f"README switch table lists {key} twice"
        table[key] = tuple(ast.literal_eval(cell.strip("`")) for cell in cells[1:4])
        assert cells[4], f"README switch table: {key} needs a reason"
    return table


def test_readme_switch_table_matches_the_config_key_for_key():
    """Every behaviour switch whose default is not the released value is in the README's table,
    with the values of paper_3b/7b (released), stage (ours) and corrected_3b/7b; the table lists
    nothing else. The embedded pipeline's AEPO block (the default command) agrees with `stage`
    on every switch of the table."""
    table = _switch_table()
    presets = {name: aepo.get_config(name) for name in ("stage", "paper_3b", "paper_7b")}
    presets["corrected_3b"] = aepo.get_config("corrected_3b")
    presets["corrected_7b"] = aepo.get_config("corrected_7b")
    pipeline_aepo = aepo.get_config("").aepo
    assert set(table) <= set(aepo.RELEASED_SWITCHES), set(table) - set(aepo.RELEASED_SWITCHES)
    for key in aepo.RELEASED_SWITCHES:
        released = common.get_path(presets["paper_3b"], key)
        ours = common.get_path(presets["stage"], key)
        assert common.get_path(presets["paper_7b"], key) == released, key
        corrected = common.get_path(presets["corrected_3b"], key)
        assert common.get_path(presets["corrected_7b"], key) == corrected, key
        if key in table:
            assert table[key] == (released, ours, corrected), key
            assert common.get_path(pipeline_aepo, key) == ours, key
        else:
            assert ours == released, f"{key}: default {ours!r} is not the released {released!r}"
            assert corrected == released, f"{key}: corrected {corrected!r} is not in the table"


def test_readme_and_adacs_config_name_the_papers_pass_rate_model():
    """The paper's AdaCS pass rates come from an external model (Revisual-R1); our default is
    the model being fine-tuned, and pass_rate.model_path is the switch."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## AdaCS")[1].split("\n## ")[0]
    adacs_config = (ROOT / "configs" / "adacs.py").read_text()
    for text in (section, adacs_config):
        assert "Revisual-R1" in text and "pass_rate.model_path" in text


@pytest.mark.parametrize(
    "arg, size",
    [("paper_3b", "3b"), ("paper_7b", "7b"), ("corrected_3b", "3b"), ("corrected_7b", "7b")],
)
def test_paper_presets(arg, size):
    c = aepo.get_config(arg)
    assert c.model.preset == size
    for key, value in PAPER.items():
        assert common.get_path(c, key) == value, key
    assert c.rollout.prompts_per_iter // c.train.prompts_per_step == 4  # optimizer steps / iter


def test_default_is_the_whole_pipeline():
    from configs import pipeline

    c = aepo.get_config()
    assert c.stage == "pipeline" and c == pipeline.get_config()
    assert c.aepo.stage == "aepo" and c.adacs.stage == c.warmup.stage == "adacs"
    assert not c.warmup.curation.enabled and c.adacs.curation.enabled
    assert c.aepo.model.preset == c.adacs.model.preset == "small"
    aepo.validate(c)
    c.adacs.sft.lr = -1.0
    with pytest.raises(ValueError, match=r"adacs: config\.sft\.lr"):
        aepo.validate(c)
    assert aepo.get_config("pipeline_smoke") == pipeline.get_config("smoke")
    with pytest.raises(ValueError, match="topology applies to the stage presets"):
        aepo.get_config("preset=,topology=v5p-8")


def test_cpu_default_and_smoke_sizes():
    c = aepo.get_config("stage")
    assert c.model.preset == "small" and c.data.source == "synthetic"
    assert c.model.path is None and c.mesh.shape.data == -1
    s = aepo.get_config("smoke")
    assert s.model.preset == "tiny" and s.train.steps <= 2
    assert s.rollout.max_response_len < c.rollout.max_response_len


def test_remat_policy_key():
    """model.remat names a layers.py policy (paper presets: 'full', RESULTS.md "Remat policy");
    the old booleans still validate; anything else names the key."""
    from ares_jax.models.qwen2_5_vl import layers
    from configs import adacs

    strings = tuple(v for v in common.MODEL_REMAT if isinstance(v, str))
    assert strings == layers.REMAT_POLICIES
    assert aepo.get_config("stage").model.remat == "none"
    papers = [aepo.get_config(name) for name in ("paper_3b", "paper_7b")]
    for c in [*papers, adacs.get_config("paper_3b")]:
        assert c.model.remat == "full"
    c = aepo.get_config("stage")
    for value in (True, False, "full", "offload"):
        with c.ignore_type():
            c.model.remat = value
        aepo.validate(c)
    with c.ignore_type():
        c.model.remat = "checkpoint"
    with pytest.raises(ValueError, match=r"config\.model\.remat='checkpoint' must be one of"):
        aepo.validate(c)


ENUMS = {k: check.allowed for k, check in aepo.SCHEMA.items() if hasattr(check, "allowed")}


def test_every_switch_is_an_enum():
    for key in (
        "entropy.window_offset entropy.threshold entropy.threshold_init entropy.hwe_count "
        "entropy.trigger_token entropy.estimator reward.variant advantage.scale loss.agg "
        "kl.estimator kl.controller train.old_logp_source data.source model.preset"
    ).split():
        assert key in ENUMS, key


@pytest.mark.parametrize("key", sorted(ENUMS))
def test_bad_enum_is_rejected_naming_key(key):
    c = aepo.get_config("stage")
    allowed = ENUMS[key]
    bad = 7 if isinstance(allowed[0], int) else "bogus"
    node, leaf = (c, key) if "." not in key else (
        common.get_path(c, key.rsplit(".", 1)[0]), key.rsplit(".", 1)[1])  # fmt: skip
    node[leaf] = bad
    with pytest.raises(ValueError, match=rf"config\.{key}=.*must be one of"):
        aepo.validate(c)


@pytest.mark.parametrize(
    "arg", ["stage", "smoke", "paper_3b", "paper_7b", "corrected_3b", "corrected_7b", ""]
)
def test_precision_switches(arg):
    """The head's unembedding and the reference's copy are in the compute dtype by default
    (benchmarks/precision.py); the learner gets the head's setting; a bad value names its key."""
    from ares_jax.aepo import train as aepo_train

    c = aepo.get_config(arg)
    c = c.aepo if arg == "" else c
    assert c.model.reference_dtype == "compute" and c.train.logprob_head_dtype == "compute"
    assert aepo_train._learner_settings(c, 64).head_dtype == "compute"
    c = aepo.get_config("stage")
    c.train.logprob_head_dtype = "param"
    aepo.validate(c)
    assert aepo_train._learner_settings(c, 64).head_dtype == "param"
    for key in ("model.reference_dtype", "train.logprob_head_dtype"):
        c = aepo.get_config("stage")
        parent, leaf = key.rsplit(".", 1)
        common.get_path(c, parent)[leaf] = "bfloat16"
        with pytest.raises(ValueError, match=rf"config\.{key}='bfloat16' must be one of"):
            aepo.validate(c)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("rollout.top_p", 1.5, r"config\.rollout\.top_p=1\.5 must be in"),
        ("loss.clip_low", -0.1, r"config\.loss\.clip_low"),
        ("reward.margin_frac", (0.1, 0.2), r"config\.reward\.margin_frac=.*tuple of 3"),
        ("train.prompts_per_step", 3, r"config\.train\.prompts_per_step: 3 must divide"),
        ("train.micro_batch_size", 5, r"config\.train\.micro_batch_size: 5 must divide"),
        ("rollout.length_buckets", (32, 48), r"config\.rollout\.length_buckets: the last bucket"),
        ("filter.low", 0.995, r"config\.filter\.low: must be below"),
        ("reward.alpha_init", 3.0, r"config\.reward\.alpha_min: must satisfy"),
        ("eval.val_before_train", False, r"config\.entropy\.threshold_init: 'validation' needs"),
        ("kl.beta_cadence.ranks", 3, r"config\.kl\.beta_cadence: ranks x micro_batch \(3\) must"),
        ("kl.beta_cadence.micro_batch", -1, r"config\.kl\.beta_cadence\.micro_batch"),
        ("data.train_files", "x.jsonl", r"config\.data\.train_files: is set but"),
        ("entropy.trigger_words", "/no/such/file.txt", r"config\.entropy\.trigger_words: path"),
        ("mesh.shape.fsdp", 0, r"config\.mesh\.shape\.fsdp: must be a positive integer or -1"),
        ("mesh.shape.fsdp", -1, r"config\.mesh\.shape: at most one axis may be -1"),
        ("mesh.rules", (("vocabx", "fsdp"),), r"config\.mesh\.rules: unknown logical axis"),
    ],
)
def test_ranges_and_cross_field_rules(key, value, match):
    c = aepo.get_config("stage")
    parent, leaf = key.rsplit(".", 1)
    common.get_path(c, parent)[leaf] = value
    with pytest.raises(ValueError, match=match):
        aepo.validate(c)


def test_mesh_rules_override_accepted():
    c = aepo.get_config("stage")
    c.mesh.rules = (("kv_heads", None), ("batch", ("data", "fsdp")))
    aepo.validate(c)


def test_files_source_checks_paths(tmp_path):
    c = aepo.get_config("stage")
    c.data.source = "files"
    with pytest.raises(ValueError, match=r"config\.data\.train_files: is required"):
        aepo.validate(c)
    c.data.train_files = str(tmp_path / "missing-*.jsonl")
    with pytest.raises(ValueError, match=r"no file matches"):
        aepo.validate(c)
    (tmp_path / "a.jsonl").write_text("{}\n")
    c.data.train_files = str(tmp_path / "*.jsonl")
    with pytest.raises(ValueError, match=r"config\.data\.val_files: is required"):
        aepo.validate(c)
    c.data.val_files = "gs://bucket/val.jsonl"  # remote paths are not checked here
    aepo.validate(c)
