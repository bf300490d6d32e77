#!/usr/bin/env bash
# Every benchmark's GPU preset in one call on a lent GPU machine, each under its own time limit.
#
#   bash benchmarks/gpu_suite.sh            # logs and RESULTS.md go to $OUT (default /tmp/bench)
#
# The GPU image has jax, flax, optax, orbax, torch and transformers. The AEPO iteration also needs
# grain, tensorflow-datasets, ml-collections and math-verify: put their wheels (and what they
# require) in .whl/ and they are installed first; without them that benchmark is skipped.
set -u
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT/gpu.txt" 2>&1

# One device call of at most 8 minutes: every run gets its own limit, and none starts past the
# suite's budget (SUITE_S seconds, default 460, compile time included).
SUITE_S=${SUITE_S:-460}
START=$(date +%s)
SUMMARY="$OUT/summary.md"
printf '| benchmark | exit | seconds | headline |\n|---|---|---|---|\n' > "$SUMMARY"

run() {  # name, preset, seconds, arguments...
  local name=$1 preset=$2 limit=$3
  shift 3
  local left=$((SUITE_S - ($(date +%s) - START)))
  if [ "$left" -lt 30 ]; then
    echo "=== $name --preset=$preset skipped: ${left}s left of the suite's ${SUITE_S}s"
    printf '| %s %s | skipped | 0 | out of time |\n' "$name" "$preset" >> "$SUMMARY"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name --preset=$preset (limit ${limit}s)"
  local t0 rc log="$OUT/$name.$preset.log"
  t0=$(date +%s)
  timeout "$limit" python3 -m "benchmarks.$name" --preset="$preset" --record "$@" > "$log" 2>&1
  rc=$?
  echo "exit $rc"
  tail -n 20 "$log"
  # The headline: the benchmark's ratio line, else its last line.
  local head
  head=$(grep -E 'x useful tokens/s|throughput / transformers|/ transformers|x faster|ratio' "$log" \
    | tail -n 1)
  [ -z "$head" ] && head=$(tail -n 1 "$log")
  printf '| %s %s | %s | %s | %s |\n' "$name" "$preset" "$rc" "$(($(date +%s) - t0))" \
    "$(echo "$head" | tr '|' '/' | cut -c1-160)" >> "$SUMMARY"
}

# The RL-length rollout first: the static loop's and the engine's useful tokens/s. Transformers'
# fixed-length figure comes from the `sampler gpu` run below (its RL-length run would not fit).
run sampler gpu_rl 170 --torch=false
run sampler gpu 60
run logprob_entropy gpu 40
run model gpu 70
run learner gpu 60
if python3 -c "import grain, ml_collections, math_verify" 2> /dev/null; then
  run aepo_step gpu 60
else
  echo "=== aepo_step skipped: grain, ml-collections or math-verify is missing (see above)"
  printf '| aepo_step gpu | skipped | 0 | grain, ml-collections or math-verify missing |\n' \
    >> "$SUMMARY"
fi
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
echo
echo "=== summary ($(($(date +%s) - START))s of ${SUITE_S}s)"
cat "$SUMMARY"
