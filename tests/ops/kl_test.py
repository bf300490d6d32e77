"""Tests for ares_jax.ops.kl against float64 NumPy loops (METHOD.md 4.8, 4.10)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ares_jax.ops import kl as kl_lib

# --------------------------------------------------------------------------- references


def ref_kl(logp, ref_logp, kind):
    logp = np.asarray(logp, np.float64)
    ref_logp = np.asarray(ref_logp, np.float64)
    out = np.zeros_like(logp)
    for idx in np.ndindex(logp.shape):
        d = logp[idx] - ref_logp[idx]
        if kind == "k1":
            out[idx] = d
        elif kind == "k2":
            out[idx] = 0.5 * d * d
        else:
            x = min(max(ref_logp[idx] - logp[idx], -20.0), 20.0)
            out[idx] = min(max(math.exp(x) - x - 1.0, -10.0), 10.0)
    return out


def ref_sequence_mean(x, mask):
    out = []
    for row, mrow in zip(np.asarray(x, np.float64), np.asarray(mask), strict=True):
        total = sum(v for v, m in zip(row, mrow, strict=True) if m)
        out.append(total / max(1, int(mrow.sum())))
    return np.array(out)


class RefBetaController:
    """Line-by-line transcription of the released `_update_beta_per_bucket` (float64)."""

    names = ("easy", "medium", "hard")

    def __init__(self, target=0.01, decay=0.97, deadzone=0.02, interval=100, lr=0.05, clip=0.2,
                 beta_min=1e-4, beta_max=1e2):  # fmt: skip
        self.state = {n: {"beta": 1.0, "dtarg": target, "last_kl": None} for n in self.names}
        self.e_ema = {n: 0.0 for n in self.names}
        self.count = 0
        self.decay, self.deadzone, self.interval = decay, deadzone, interval
        self.lr, self.clip, self.beta_min, self.beta_max = lr, clip, beta_min, beta_max

    def update(self, difficulties, seq_mean_kl):
        self.count += 1
        values = {n: [] for n in self.names}
        for diff, val in zip(difficulties, seq_mean_kl, strict=True):
            if diff in values:
                values[diff].append(float(val))
        for diff, vals in values.items():
            if not vals:
                continue
            cur = sum(vals) / len(vals)
            st = self.state[diff]
            last = st["last_kl"]
            if last is None:
                last = cur
            mean_kl = (1.0 - self.decay) * cur + self.decay * last
            st["last_kl"] = mean_kl
            e = mean_kl / max(1e-8, st["dtarg"]) - 1.0
            if abs(e) < self.deadzone:
                continue
            if self.count % self.interval != 0:
                continue
            self.e_ema[diff] = (1.0 - self.decay) * e + self.decay * self.e_ema[diff]
            de = min(max(self.e_ema[diff], -self.clip), self.clip)
            cur_beta = max(self.beta_min, min(self.beta_max, st["beta"]))
            logb = math.log(cur_beta) + self.lr * de
            logb = min(max(logb, math.log(self.beta_min)), math.log(self.beta_max))
            st["beta"] = math.exp(logb)


class ReleasedRankController:
    """The beta controller of one released FSDP rank (`verl/workers/actor/dp_actor.py`).

    `__init__` keeps the fields of `DataParallelPPOActor.__init__`; `_beta_for_levels` and
    `_update_beta_per_bucket` are the released methods statement for statement, with torch
    removed (`seq_mean_kl` arrives as the list that `.detach().cpu().tolist()` gives).
    """

    def __init__(self, params):
        dtarg = params.target if isinstance(params.target, tuple) else (params.target,) * 3
        beta_init = params.beta_init
        self._kl_state = {
            "easy": {"beta": beta_init, "dtarg": dtarg[0], "last_kl": None},
            "medium": {"beta": beta_init, "dtarg": dtarg[1], "last_kl": None},
            "hard": {"beta": beta_init, "dtarg": dtarg[2], "last_kl": None},
        }
        self._beta_min = params.beta_min
        self._beta_max = params.beta_max
        self._ema_decay = params.ema_decay
        self._kl_lr = params.lr
        self._kl_clip = params.err_clip
        self._kl_update_interval = params.interval
        self._kl_deadzone = params.deadzone
        self._e_ema = {"easy": 0.0, "medium": 0.0, "hard": 0.0}
        self._update_count = 0

    def _beta_for_levels(self, difficulty_levels):
        return [
            self._kl_state.get(str(level), self._kl_state["medium"]).get("beta", 1.0)
            for level in difficulty_levels
        ]

    def _update_beta_per_bucket(self, difficulties, seq_mean_kl):
        self._update_count += 1
        bucket_values = {"easy": [], "medium": [], "hard": []}
        for diff, val in zip(difficulties, seq_mean_kl, strict=True):
            key = str(diff)
            if key in bucket_values:
                bucket_values[key].append(val)
        for diff, vals in bucket_values.items():
            if not vals:
                continue
            cur = float(sum(vals) / len(vals))
            st = self._kl_state[diff]
            last = st.get("last_kl")
            if last is None:
                last = cur
            mean_kl = (1.0 - self._ema_decay) * cur + self._ema_decay * last
            st["last_kl"] = mean_kl
            target = max(1e-8, st["dtarg"])
            e = (mean_kl / target) - 1.0
            if abs(e) < self._kl_deadzone:
                continue
            if (self._update_count % self._kl_update_interval) != 0:
                continue
            self._e_ema[diff] = (1.0 - self._ema_decay) * e + self._ema_decay * self._e_ema[diff]
            de = float(np.clip(self._e_ema[diff], -self._kl_clip, self._kl_clip))
            cur_beta = max(self._beta_min, min(self._beta_max, st["beta"]))
            logb = float(np.log(cur_beta))
            logb_new = np.clip(
                logb + self._kl_lr * de, np.log(self._beta_min), np.log(self._beta_max)
            )
            st["beta"] = float(np.exp(logb_new))

    def betas(self):
        return np.array([self._kl_state[name]["beta"] for name in ("easy", "medium", "hard")])


def released_update_policy(params, ranks, rank_batch, mini_batches):
    """The released `update_policy` loop over mini-batches, one controller per rank.

    Each mini-batch (seq_kl [n] float32, bucket [n] int) is split into `ranks` contiguous shares;
    every rank walks its share in micro-batches of `rank_batch` rows: update, then the loss reads
    the rank's beta per row. Returns the controllers and each mini-batch's row betas [n].
    """
    actors = [ReleasedRankController(params) for _ in range(ranks)]
    names = ("easy", "medium", "hard")
    row_betas = []
    for seq_kl, bucket in mini_batches:
        share = len(seq_kl) // ranks
        beta = np.zeros(len(seq_kl))
        for r, actor in enumerate(actors):
            for start in range(r * share, (r + 1) * share, rank_batch):
                rows = slice(start, start + rank_batch)
                levels = [names[b] if 0 <= b < 3 else "unknown" for b in bucket[rows]]
                actor._update_beta_per_bucket(levels, seq_kl[rows].tolist())
                beta[rows] = actor._beta_for_levels(levels)
        row_betas.append(beta)
    return actors, row_betas


def ref_update_kappa(kappa, ctrl_kl, bucket, alpha, delta, kmin, kmax):
    """delta: 3 per-bucket targets."""
    kappa = [float(k) for k in kappa]
    for d in range(3):
        vals = [v for v, b in zip(ctrl_kl, bucket, strict=True) if b == d]
        if not vals:
            continue
        kl_d = sum(vals) / len(vals)
        kappa[d] = min(max(kappa[d] * (1.0 + alpha * (kl_d / delta[d] - 1.0)), kmin), kmax)
    return np.array(kappa)


def ref_control_kl(kld, mask, window):
    out = []
    for i in range(kld.shape[0]):
        length = int(mask[i].sum())
        total = sum(kld[i, t] for t in range(kld.shape[1]) if mask[i, t] and not window[i, t])
        out.append(total / max(1, length))
    return np.array(out)


def random_logps(rng, shape, spread=1.0):
    logp = -rng.exponential(2.0, size=shape)
    ref = logp + rng.normal(0.0, spread, size=shape)
    return logp, np.minimum(ref, 0.0)


def _data_sharding():
    return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


# --------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_divergence_matches_reference(kind):
    rng = np.random.default_rng(len(kind) + ord(kind[1]))
    logp, ref = random_logps(rng, (4, 33), spread=2.0)
    logp[0, :4] = [-30.0, -0.1, -25.0, 0.0]  # exercise the x and output clips of k3
    ref[0, :4] = [-0.1, -30.0, 0.0, -25.0]
    got = kl_lib.kl_divergence(jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32), kind)
    assert got.dtype == jnp.float32 and got.shape == logp.shape
    want = ref_kl(logp.astype(np.float32), ref.astype(np.float32), kind)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    if kind == "k3":
        assert np.all(np.asarray(got) >= 0.0) and np.asarray(got).max() == 10.0


def test_default_kind_is_k3_and_bf16_is_accepted():
    rng = np.random.default_rng(5)
    logp, ref = random_logps(rng, (3, 9))
    logp_bf, ref_bf = jnp.asarray(logp, jnp.bfloat16), jnp.asarray(ref, jnp.bfloat16)
    got = kl_lib.kl_divergence(logp_bf, ref_bf)
    assert got.dtype == jnp.float32
    want = ref_kl(
        np.asarray(logp_bf.astype(jnp.float32)), np.asarray(ref_bf.astype(jnp.float32)), "k3"
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_gradient_analytic_and_finite_difference(kind):
    rng = np.random.default_rng(ord(kind[1]))
    logp, ref = random_logps(rng, (3, 7), spread=0.7)
    logp[0, 0], ref[0, 0] = -25.0, -1.0  # k3: x clipped at 20, zero gradient there
    x = np.clip(ref - logp, -20, 20)
    analytic = {
        "k1": np.ones_like(logp),
        "k2": logp - ref,
        "k3": np.where(np.abs(ref - logp) < 20, 1.0 - np.exp(x), 0.0) * (np.exp(x) - x - 1 <= 10),
    }[kind]
    grad = jax.grad(lambda lp: jnp.sum(kl_lib.kl_divergence(lp, jnp.asarray(ref), kind)))
    got = grad(jnp.asarray(logp, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), analytic, rtol=1e-4, atol=1e-5)
    with jax.enable_x64(True):
        lp64, ref64 = jnp.asarray(logp, jnp.float64), jnp.asarray(ref, jnp.float64)
        f = lambda lp: jnp.sum(kl_lib.kl_divergence(lp, ref64, kind))
        g64 = np.asarray(jax.grad(f)(lp64))
        assert g64.dtype == np.float64
        h = 1e-6
        for idx in [(0, 1), (1, 3), (2, 6)]:
            e = np.zeros_like(logp)
            e[idx] = h
            fd = (f(lp64 + e) - f(lp64 - e)) / (2 * h)
            np.testing.assert_allclose(g64[idx], float(fd), rtol=1e-6, atol=1e-8)


def test_kl_divergence_jit_and_sharded_equal_eager():
    rng = np.random.default_rng(8)
    logp, ref = (jnp.asarray(x, jnp.float32) for x in random_logps(rng, (16, 12)))
    sharding = _data_sharding()
    for kind in kl_lib.KL_ESTIMATORS:
        eager = np.asarray(kl_lib.kl_divergence(logp, ref, kind))
        fn = jax.jit(lambda a, b, k=kind: kl_lib.kl_divergence(a, b, k))
        np.testing.assert_array_equal(np.asarray(fn(logp, ref)), eager)
        sharded = fn(jax.device_put(logp, sharding), jax.device_put(ref, sharding))
        np.testing.assert_array_equal(np.asarray(sharded), eager)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((jnp.zeros((2, 3)), jnp.zeros((2, 3))), dict(kind="k4"), ValueError, "kind='k4' is not"),
        ((jnp.zeros((2, 3)), jnp.zeros((2, 4))), {}, ValueError, "ref_logp has shape"),
        ((jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 3))), {}, TypeError, "logp must be a float"),
        ((jnp.zeros((2, 3)), jnp.zeros((2, 3), bool)), {}, TypeError, "ref_logp must be a float"),
    ],
)
def test_kl_divergence_bad_inputs(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_lib.kl_divergence(*args, **kwargs)


def test_sequence_mean_and_control_kl():
    rng = np.random.default_rng(21)
    x = rng.normal(size=(5, 11))
    mask = rng.random((5, 11)) < 0.7
    mask[2] = False  # empty row -> 0
    window = rng.random((5, 11)) < 0.3
    x_nan = np.where(mask, x, np.nan)  # padding values never enter
    got = kl_lib.sequence_mean(jnp.asarray(x_nan, jnp.float32), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), ref_sequence_mean(x, mask), rtol=1e-5, atol=1e-6)
    assert got[2] == 0.0
    got = kl_lib.control_kl(jnp.asarray(x_nan), jnp.asarray(mask), jnp.asarray(window))
    np.testing.assert_allclose(
        np.asarray(got), ref_control_kl(x, mask, window), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(TypeError, match="mask must be a bool"):
        kl_lib.sequence_mean(jnp.asarray(x), jnp.asarray(mask, jnp.float32))
    with pytest.raises(ValueError, match="x must have rank 2"):
        kl_lib.sequence_mean(jnp.ones(3), jnp.ones(3, bool))
    with pytest.raises(ValueError, match="window_mask has shape"):
        kl_lib.control_kl(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(window[:, :3]))


# --------------------------------------------------------------------------- beta controller


def _beta_stream(seed, steps, n):
    """Per-micro-batch (seq_kl, bucket): KL drifting around the target, buckets sometimes absent."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        level = 0.01 * (1.0 + 0.5 * np.sin(step / 17.0)) * np.array([0.6, 1.0, 1.6])
        bucket = rng.integers(0, 3, size=n)
        if step % 7 == 0:
            bucket[:] = rng.integers(0, 2)  # only one bucket present
        if step % 11 == 0:
            bucket[0] = 5  # unknown difficulty: ignored
        seq_kl = level[np.clip(bucket, 0, 2)] * rng.lognormal(0.0, 0.3, size=n)
        yield seq_kl, bucket


@pytest.mark.parametrize(
    "params",
    [
        kl_lib.BetaControllerParams(),
        kl_lib.BetaControllerParams(interval=3, lr=0.5, deadzone=0.05, beta_max=1.5),
        kl_lib.BetaControllerParams(interval=1, lr=2.0, err_clip=0.5, beta_min=0.5),
    ],
)
def test_beta_controller_matches_released_code(params):
    names = RefBetaController.names
    ref = RefBetaController(target=params.target, decay=params.ema_decay,
                            deadzone=params.deadzone, interval=params.interval, lr=params.lr,
                            clip=params.err_clip, beta_min=params.beta_min,
                            beta_max=params.beta_max)  # fmt: skip
    state = kl_lib.init_beta_state(params)
    update = jax.jit(kl_lib.update_beta, static_argnames="params")
    updates = 0
    for seq_kl, bucket in _beta_stream(params.interval + 1, 250, 16):
        diffs = [names[b] if 0 <= b < 3 else "unknown" for b in bucket]
        ref.update(diffs, seq_kl.astype(np.float32))
        before = np.asarray(state.beta)
        state = update(state, jnp.asarray(seq_kl, jnp.float32), jnp.asarray(bucket), params=params)
        updates += int(np.any(np.asarray(state.beta) != before))
        assert int(state.count) == ref.count
        for d, name in enumerate(names):
            st = ref.state[name]
            assert bool(state.has_kl[d]) == (st["last_kl"] is not None)
            if st["last_kl"] is not None:
                np.testing.assert_allclose(float(state.kl_ema[d]), st["last_kl"], rtol=2e-5)
            np.testing.assert_allclose(
                float(state.err_ema[d]), ref.e_ema[name], rtol=1e-4, atol=1e-5
            )
            # float32 log/exp round trips compound over up to 250 updates.
            np.testing.assert_allclose(float(state.beta[d]), st["beta"], rtol=1e-4)
    assert updates >= 2  # the comparison saw beta move


def test_beta_first_observation_and_absent_buckets():
    state = kl_lib.init_beta_state()
    np.testing.assert_array_equal(np.asarray(state.beta), [1.0, 1.0, 1.0])
    state = kl_lib.update_beta(state, jnp.array([0.02, 0.04]), jnp.array([2, 2]))
    np.testing.assert_array_equal(np.asarray(state.has_kl), [False, False, True])
    np.testing.assert_allclose(float(state.kl_ema[2]), 0.03, rtol=1e-6)  # first: ema = cur
    # valid=False rows are ignored.
    state = kl_lib.update_beta(
        state, jnp.array([0.5, 0.02]), jnp.array([0, 2]), valid=jnp.array([False, True])
    )
    assert not bool(state.has_kl[0])
    np.testing.assert_allclose(float(state.kl_ema[2]), 0.03 * 0.02 + 0.97 * 0.03, rtol=1e-5)
    np.testing.assert_array_equal(
        np.asarray(
            kl_lib.beta_for_buckets(
                state._replace(beta=jnp.array([1.0, 2.0, 3.0])), jnp.array([0, 1, 2, 3, -1])
            )
        ),  # fmt: skip
        [1.0, 2.0, 3.0, 2.0, 2.0],
    )


def test_beta_controller_sharded_equals_single_device():
    sharding = _data_sharding()
    params = kl_lib.BetaControllerParams(interval=2, lr=0.5)
    update = jax.jit(kl_lib.update_beta, static_argnames="params")
    single = sharded = kl_lib.init_beta_state(params)
    for seq_kl, bucket in _beta_stream(3, 6, 32):
        seq_kl, bucket = jnp.asarray(seq_kl, jnp.float32), jnp.asarray(bucket)
        single = kl_lib.update_beta(single, seq_kl, bucket, params=params)
        sharded = update(
            sharded,
            jax.device_put(seq_kl, sharding),
            jax.device_put(bucket, sharding),
            params=params,
        )
    for a, b in zip(single, sharded, strict=True):  # sums reduce in a different order
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_update_beta_bad_inputs():
    state = kl_lib.init_beta_state()
    with pytest.raises(TypeError, match="bucket must be an integer"):
        kl_lib.update_beta(state, jnp.ones(3), jnp.ones(3))
    with pytest.raises(ValueError, match="bucket has shape"):
        kl_lib.update_beta(state, jnp.ones(3), jnp.ones(4, jnp.int32))
    with pytest.raises(ValueError, match="seq_kl must have rank 1"):
        kl_lib.update_beta(state, jnp.ones((3, 2)), jnp.ones(3, jnp.int32))
    with pytest.raises(TypeError, match="valid must be a bool"):
        kl_lib.update_beta(state, jnp.ones(3), jnp.ones(3, jnp.int32), valid=jnp.ones(3))


# --------------------------------------------------------------------------- beta cadence

_update_cadence = jax.jit(
    kl_lib.update_beta_cadence, static_argnames=("params", "ranks", "rank_batch")
)
_update_beta = jax.jit(kl_lib.update_beta, static_argnames="params")


def _cadence_stream(seed, mini_batches, n):
    """Mini-batches of (seq_kl [n] float32, bucket [n]): KL off target, a few unknown buckets."""
    rng = np.random.default_rng(seed)
    level = np.array([0.004, 0.03, 0.012])
    for _ in range(mini_batches):
        bucket = rng.integers(0, 3, size=n)
        bucket[rng.random(n) < 0.1] = 7
        seq_kl = level[np.clip(bucket, 0, 2)] * rng.lognormal(0.0, 0.4, size=n)
        yield seq_kl.astype(np.float32), bucket


def _global_micro_batches(x, ranks, rank_batch):
    """[n] rows laid out rank-major -> k global micro-batches [ranks * rank_batch], chunk j of
    every rank, as a sharded global micro-batch lies on the devices."""
    return np.swapaxes(np.reshape(x, (ranks, -1, rank_batch)), 0, 1).reshape(-1, ranks * rank_batch)


def _step_and_compare(states, seq_kl, bucket, want, *, params, ranks, rank_batch):
    """One `update_beta_cadence` call; its row betas must equal the released loop's `want`."""
    states, row_beta = _update_cadence(
        states, jnp.asarray(seq_kl), jnp.asarray(bucket),
        params=params, ranks=ranks, rank_batch=rank_batch,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(row_beta), want, rtol=1e-5)
    return states


@pytest.mark.parametrize(("ranks", "rank_batch"), [(1, 1), (2, 1), (4, 2), (1, 16), (8, 2)])
def test_beta_cadence_matches_released_loop(ranks, rank_batch):
    params = kl_lib.BetaControllerParams(target=(0.01, 0.02, 0.005), interval=3, lr=0.5)
    stream = list(_cadence_stream(ranks + 10 * rank_batch, 12, 16))
    actors, ref_rows = released_update_policy(params, ranks, rank_batch, stream)
    ref_beta = np.stack([a.betas() for a in actors])
    assert np.abs(np.log(ref_beta)).max() > 0.1  # the comparison saw beta move

    # One call per mini-batch (k sub-steps), and one call per global micro-batch (k = 1).
    whole = per_micro = kl_lib.init_beta_states(params, ranks)
    for (seq_kl, bucket), want in zip(stream, ref_rows, strict=True):
        cadence = dict(params=params, ranks=ranks, rank_batch=rank_batch)
        whole = _step_and_compare(whole, seq_kl, bucket, want, **cadence)
        parts = [_global_micro_batches(x, ranks, rank_batch) for x in (seq_kl, bucket, want)]
        for kl_j, bucket_j, want_j in zip(*parts, strict=True):
            per_micro = _step_and_compare(per_micro, kl_j, bucket_j, want_j, **cadence)
    for states in (whole, per_micro):
        np.testing.assert_array_equal(np.asarray(states.count), [a._update_count for a in actors])
        np.testing.assert_allclose(np.asarray(states.beta), ref_beta, rtol=1e-5)


def test_beta_cadence_one_rank_whole_batch_equals_update_beta():
    # Both compiled: eager op-by-op float32 rounding differs from a fused program in the last bit.
    params = kl_lib.BetaControllerParams(interval=2, lr=0.5)
    rng = np.random.default_rng(4)
    single = kl_lib.init_beta_state(params)
    states = kl_lib.init_beta_states(params, ranks=1)
    for step, (seq_kl, bucket) in enumerate(_beta_stream(6, 20, 16)):
        seq_kl, bucket = jnp.asarray(seq_kl, jnp.float32), jnp.asarray(bucket)
        valid = None if step % 2 else jnp.asarray(rng.random(16) < 0.8)
        single = _update_beta(single, seq_kl, bucket, params=params, valid=valid)
        states, row_beta = _update_cadence(
            states, seq_kl, bucket, params=params, ranks=1, rank_batch=16, valid=valid
        )
        for a, b in zip(single, states, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])
        np.testing.assert_array_equal(
            np.asarray(row_beta), np.asarray(kl_lib.beta_for_buckets(single, bucket))
        )
    assert int(single.count) == 20 and np.any(np.asarray(single.beta) != 1.0)


def test_beta_cadence_padding_chunk_does_not_count():
    params = kl_lib.BetaControllerParams(interval=1, lr=0.5)
    # ranks=2, rank_batch=2: rank 0 walks rows [0, 1], [2, 3]; rank 1 walks [4, 5], [6, 7].
    seq_kl = jnp.array([0.02, 0.03, 0.5, 0.04, 0.5, 0.5, 0.001, 0.002])
    bucket = jnp.array([0, 1, 0, 7, 2, 2, 2, 0])
    valid = jnp.array([True, True, False, True, False, False, True, True])
    states, row_beta = _update_cadence(
        kl_lib.init_beta_states(params, 2), seq_kl, bucket,
        params=params, ranks=2, rank_batch=2, valid=valid,
    )  # fmt: skip
    # Rank 0's second chunk has one valid row, of an unknown bucket: it still counts. Rank 1's
    # first chunk is all padding: no micro-batch, no count, no state change.
    np.testing.assert_array_equal(np.asarray(states.count), [2, 1])
    init = kl_lib.init_beta_state(params)
    rank0_first = _update_beta(init, seq_kl[:2], bucket[:2], params=params)
    rank0 = _update_beta(rank0_first, seq_kl[2:4], bucket[2:4], params=params, valid=valid[2:4])
    rank1 = _update_beta(init, seq_kl[6:], bucket[6:], params=params)
    for name, a, b, got in zip(kl_lib.BetaState._fields, rank0, rank1, states, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.stack([a, b]), err_msg=name)
    want = np.concatenate(
        [
            kl_lib.beta_for_buckets(rank0_first, bucket[:2]),
            kl_lib.beta_for_buckets(rank0, bucket[2:4]),
            kl_lib.beta_for_buckets(init, bucket[4:6]),
            kl_lib.beta_for_buckets(rank1, bucket[6:]),
        ]
    )
    np.testing.assert_array_equal(np.asarray(row_beta), want)
    assert np.all(want[[0, 1, 6, 7]] != 1.0) and np.all(want[4:6] == 1.0)


def test_beta_cadence_bad_inputs():
    states = kl_lib.init_beta_states(ranks=4)
    kl10, b10 = jnp.ones(10), jnp.ones(10, jnp.int32)
    with pytest.raises(ValueError, match=r"seq_kl has 10 rows, which is not ranks \(4\) x "
                       r"rank_batch \(1\) x an integer k >= 1"):  # fmt: skip
        kl_lib.update_beta_cadence(states, kl10, b10, ranks=4, rank_batch=1)
    with pytest.raises(ValueError, match=r"seq_kl has 0 rows"):
        kl_lib.update_beta_cadence(
            states, jnp.ones(0), jnp.ones(0, jnp.int32), ranks=4, rank_batch=1
        )
    with pytest.raises(ValueError, match=r"states.kl_ema has shape \(4, 3\), expected \(2, 3\)"):
        kl_lib.update_beta_cadence(states, kl10[:8], b10[:8], ranks=2, rank_batch=2)
    with pytest.raises(ValueError, match="ranks must be an integer >= 1, got 0"):
        kl_lib.init_beta_states(ranks=0)
    with pytest.raises(ValueError, match="rank_batch must be an integer >= 1, got 0"):
        kl_lib.update_beta_cadence(states, kl10[:8], b10[:8], ranks=4, rank_batch=0)
    with pytest.raises(ValueError, match="bucket has shape"):
        kl_lib.update_beta_cadence(states, kl10[:8], b10, ranks=4, rank_batch=2)


def test_beta_cadence_matters_at_released_defaults():
    """Released launcher cadence (8 ranks x 1 sequence) against one state fed the same 8-row
    global micro-batches (today's `update_beta`), default constants, constant KL 0.02 = 2 targets.

    Both cadences advance the count once per global micro-batch, so both reach the same interval
    steps; per rank a bucket is present at only about a third of them, in the 8-row micro-batch
    almost always, so beta moves about 3x further in log space without the per-rank cadence.
    """
    params = kl_lib.DEFAULT_BETA_PARAMS
    iterations, rows = 40, 512
    rng = np.random.default_rng(0)
    stream = [
        (np.full(rows, 0.02, np.float32), rng.permutation(np.arange(rows) % 3))
        for _ in range(iterations)
    ]
    cadences = {"released": (8, 1), "whole": (1, 8)}
    ref_log_beta = {}
    for name, (ranks, rank_batch) in cadences.items():
        actors, ref_rows = released_update_policy(params, ranks, rank_batch, stream)
        assert [a._update_count for a in actors] == [iterations * rows // 8] * ranks
        ref_log_beta[name] = np.log(np.stack([a.betas() for a in actors]))
        states = kl_lib.init_beta_states(params, ranks)
        for (seq_kl, bucket), want in zip(stream, ref_rows, strict=True):
            states = _step_and_compare(
                states, seq_kl, bucket, want, params=params, ranks=ranks, rank_batch=rank_batch
            )
        np.testing.assert_allclose(
            np.log(np.asarray(states.beta)), ref_log_beta[name], rtol=1e-4, atol=1e-6
        )
    released, whole = ref_log_beta["released"], ref_log_beta["whole"][0]
    assert np.all(released > 0.0)  # every rank moved every bucket a little
    assert np.all(whole > 2.0 * released.mean(axis=0))


def test_beta_cadence_jit_and_sharded_equal_eager():
    params = kl_lib.BetaControllerParams(interval=2, lr=0.5)
    ranks, rank_batch = len(jax.devices()), 2
    seq_kl, bucket = next(_cadence_stream(3, 1, ranks * rank_batch * 3))
    valid = np.random.default_rng(3).random(seq_kl.shape[0]) < 0.7
    args = [jnp.asarray(x) for x in (seq_kl, bucket, valid)]
    kw = dict(params=params, ranks=ranks, rank_batch=rank_batch)
    init = kl_lib.init_beta_states(params, ranks)
    eager = kl_lib.update_beta_cadence(init, *args[:2], valid=args[2], **kw)
    jitted = _update_cadence(init, *args[:2], valid=args[2], **kw)
    sharding = _data_sharding()
    sharded = _update_cadence(
        jax.device_put(init, sharding), *(jax.device_put(a, sharding) for a in args[:2]),
        valid=jax.device_put(args[2], sharding), **kw,
    )  # fmt: skip
    for out in (jitted, sharded):
        for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(out), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    assert np.any(np.asarray(eager[0].beta) != 1.0)
    # seq_kl only steers the controller: no gradient flows through it.
    grad = jax.grad(
        lambda x: jnp.sum(kl_lib.update_beta_cadence(init, x, args[1], **kw)[1])
    )(args[0])  # fmt: skip
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


# --------------------------------------------------------------------------- kappa controller


def test_kappa_controller_matches_reference():
    params = kl_lib.KappaControllerParams(alpha=0.3, delta=(0.01, 0.02, 0.005), kappa_max=3.0)
    kappa = kl_lib.init_kappa(params)
    ref = np.ones(3)
    update = jax.jit(kl_lib.update_kappa, static_argnames="params")
    rng = np.random.default_rng(9)
    hit_max = hit_min = False
    for step in range(60):
        b, t = 12, 20
        spread = [0.001, 0.05, 0.2, 0.4][(step // 10) % 4]  # KL well below, near, above delta
        logp, ref_logp = random_logps(rng, (b, t), spread=spread)
        kld = ref_kl(logp, ref_logp, "k3")
        mask = rng.random((b, t)) < 0.8
        mask[0] = step % 2 == 0  # sometimes an empty row
        window = rng.random((b, t)) < 0.25
        bucket = rng.integers(0, 3 if step % 4 else 2, size=b)  # hard sometimes absent
        ctrl = kl_lib.control_kl(
            jnp.asarray(kld, jnp.float32), jnp.asarray(mask), jnp.asarray(window)
        )
        kappa = update(kappa, ctrl, jnp.asarray(bucket), params=params)
        ctrl_ref = ref_control_kl(kld, mask, window)
        ref = ref_update_kappa(ref, ctrl_ref, bucket, 0.3, [0.01, 0.02, 0.005], 1e-3, 3.0)
        np.testing.assert_allclose(np.asarray(kappa), ref, rtol=1e-4)
        hit_max |= ref.max() == 3.0
        hit_min |= ref.min() == 1e-3
    assert hit_max and hit_min  # both clip bounds were exercised


def test_kappa_absent_buckets_and_bounds():
    kappa = jnp.array([1.0, 50.0, 0.0011])
    new = kl_lib.update_kappa(kappa, jnp.array([1.0, 0.0]), jnp.array([1, 2]))
    # medium: 50 * (1 + 0.1 * (100 - 1)) clipped to 100; hard: 0.0011 * 0.9 clipped to 1e-3.
    np.testing.assert_allclose(np.asarray(new), [1.0, 100.0, 1e-3], rtol=1e-6)
    with pytest.raises(ValueError, match=r"kappa must have shape \(3,\)"):
        kl_lib.update_kappa(jnp.ones(2), jnp.ones(2), jnp.ones(2, jnp.int32))


# --------------------------------------------------------------------------- weights


def test_second_chance_factor_matches_released_rule():
    bucket = np.array([0, 0, 0, 0, 1, 2, 0, 1])
    correct = np.array([0, 0, 1, 0, 0, 0, 1, 1], bool)
    soft = np.array([0.5, 0.9, 0.9, 0.49, 0.9, 0.9, 0.1, 0.7], np.float32)
    for easy_only in (True, False):
        for incorrect_only in (True, False):
            got = kl_lib.second_chance_factor(
                jnp.asarray(bucket), jnp.asarray(correct), jnp.asarray(soft),
                easy_only=easy_only, incorrect_only=incorrect_only,
            )  # fmt: skip
            want = [
                0.67
                if s >= 0.5 and (b == 0 or not easy_only) and (not c or not incorrect_only)
                else 1.0
                for b, c, s in zip(bucket, correct, soft, strict=True)
            ]
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-7)
    acc = jnp.asarray(correct, jnp.float32)  # float accuracy: incorrect means < 0.5
    np.testing.assert_array_equal(
        np.asarray(kl_lib.second_chance_factor(jnp.asarray(bucket), acc, jnp.asarray(soft))),
        np.asarray(
            kl_lib.second_chance_factor(
                jnp.asarray(bucket), jnp.asarray(correct), jnp.asarray(soft)
            )
        ),  # fmt: skip
    )
    with pytest.raises(ValueError, match="soft_cost has shape"):
        kl_lib.second_chance_factor(jnp.asarray(bucket), jnp.asarray(correct), jnp.ones(3))


def ref_token_weights(bucket, mask, mode, kl_coef, beta, kappa, window, rho, factor):
    b, t = mask.shape
    out = np.zeros((b, t))
    for i in range(b):
        d = bucket[i] if 0 <= bucket[i] < 3 else 1
        for j in range(t):
            if not mask[i, j]:
                continue
            w = kl_coef * beta[d] * factor[i]
            if mode == "paper":
                w *= kappa[d] * (rho if window[i, j] else 1.0)
            out[i, j] = w
    return out


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_kl_token_weights_matches_reference(mode):
    rng = np.random.default_rng(len(mode))
    b, t = 8, 13
    bucket = rng.integers(-1, 4, size=b)
    mask = rng.random((b, t)) < 0.75
    window = rng.random((b, t)) < 0.3
    beta = rng.uniform(0.5, 2.0, size=3)
    kappa = rng.uniform(0.1, 5.0, size=3)
    factor = np.where(rng.random(b) < 0.5, 0.67, 1.0)
    kw = dict(kappa=jnp.asarray(kappa, jnp.float32), window_mask=jnp.asarray(window), rho=0.3)
    got = kl_lib.kl_token_weights(
        jnp.asarray(bucket), jnp.asarray(mask), mode=mode, kl_coef=0.02,
        beta=jnp.asarray(beta, jnp.float32), sample_factor=jnp.asarray(factor, jnp.float32),
        **(kw if mode == "paper" else {}),
    )  # fmt: skip
    want = ref_token_weights(bucket, mask, mode, 0.02, beta, kappa, window, 0.3, factor)
    assert got.dtype == jnp.float32 and got.shape == (b, t)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # Defaults: code mode, kl_coef 0.01, beta 1.
    got = kl_lib.kl_token_weights(jnp.asarray(bucket), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), 0.01 * mask, rtol=1e-7)
    # Sharded equals single device.
    sharding = _data_sharding()
    fn = jax.jit(
        lambda bk, m, w: kl_lib.kl_token_weights(
            bk, m, mode="paper", kappa=jnp.arange(1.0, 4.0), window_mask=w
        )
    )
    args = [jnp.asarray(x) for x in (bucket, mask, window)]
    single = fn(*args)
    sharded = fn(*(jax.device_put(a, sharding) for a in args))
    np.testing.assert_array_equal(np.asarray(single), np.asarray(sharded))


def test_kl_token_weights_bad_inputs():
    bucket, mask = jnp.zeros(2, jnp.int32), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="mode='both' is not one of 'code', 'paper'"):
        kl_lib.kl_token_weights(bucket, mask, mode="both")
    with pytest.raises(ValueError, match="mode='paper' needs kappa"):
        kl_lib.kl_token_weights(bucket, mask, mode="paper", kappa=jnp.ones(3))
    with pytest.raises(ValueError, match="only used by mode='paper'"):
        kl_lib.kl_token_weights(bucket, mask, window_mask=mask)
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\)"):
        kl_lib.kl_token_weights(bucket, mask, beta=jnp.ones(2))
    with pytest.raises(ValueError, match="bucket has 3 rows but mask has 2"):
        kl_lib.kl_token_weights(jnp.zeros(3, jnp.int32), mask)
    with pytest.raises(ValueError, match="sample_factor has shape"):
        kl_lib.kl_token_weights(bucket, mask, sample_factor=jnp.ones(3))
