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

run() {  # name, seconds, arguments...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" python3 -m "benchmarks.$name" --preset=gpu --record "$@" > "$OUT/$name.log" 2>&1
  echo "exit $?"
  tail -n 20 "$OUT/$name.log"
}

run logprob_entropy 120
run model 240
run learner 150
run sampler 240
if python3 -c "import grain, ml_collections, math_verify" 2> /dev/null; then
  run aepo_step 300
else
  echo "=== aepo_step skipped: grain, ml-collections or math-verify is missing (see above)"
fi
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
