#!/usr/bin/env bash
# Every GPU check of issue 6 in one call to a lent GPU machine, inside the 10 minutes one call may run:
#   1. the environment: `qvl_core.doctor` (GPU and driver, CUDA and cuDNN, library versions, cuDNN attention);
#   2. the parity contract on the GPU in bfloat16 (JAX with cuDNN attention vs torch with sdpa) on a generated
#      checkpoint whose head dims (16) let cuDNN run;
#   3. benchmarks/gpu.sh (the 3B-shaped benchmark: JAX vs PyTorch, table last).
# Each step has its own time limit, so a slow step cannot take the others' results with it. Results land in
# $OUT (what the device tool brings back): doctor.txt, parity_bf16.json, parity.log, jax.json, torch.json,
# bench.log.
#   here:    benchmarks/fetch_device_wheels.sh
#   device:  run(command="benchmarks/device_check.sh", carry=[".whl"], timeout_s=600)
# Arguments are passed on to the benchmark (e.g. `--set` overrides; a test runs this on a CPU with a shrunk model).
# CHECKS picks the steps (default "doctor parity bench": rerun one alone after it failed; "memory" runs
# benchmarks/memory_check.py, the planner's memory against the measured peak, in a call of its own); PARITY_SIZES,
# PARITY_S, BENCH_S and MEMORY_S set the parity check's image sizes and the steps' time limits; PARITY_ARGS adds
# arguments to `parity_tests.check` (e.g. `--no-train`: the forward quantities only).
# Exit status: 0 only when every step run passed (the parity contract held, the benchmark ran).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-device_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
export PYTHON="$PY" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/qvl_site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="/tmp/qvl_site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
PARITY_S="${PARITY_S:-100}" BENCH_S="${BENCH_S:-420}" PARITY_SIZES="${PARITY_SIZES:-140x252,84x56}"
CHECKS=" ${CHECKS:-doctor parity bench} " PARITY_STATUS=0 BENCH_STATUS=0 MEMORY_STATUS=0

if [[ "$CHECKS" == *" doctor "* ]]; then
{ date -u; timeout 60 "$PY" -m qvl_core.doctor; } > "$OUT/doctor.txt" 2>&1
cat "$OUT/doctor.txt"
fi

if [[ "$CHECKS" == *" parity "* ]]; then
echo "== parity in bfloat16 (log: $OUT/parity.log)"
CK="$(mktemp -d)/ck"
trap 'rm -rf "$(dirname "$CK")"' EXIT
timeout "$PARITY_S" bash -c '
"$0" -c "
from parity_tests.tiny import make_checkpoint
make_checkpoint(\"$1\", seed=3, dtype=\"bfloat16\", num_labels=9,
                vision=dict(depth=3, hidden_size=64, num_heads=4, intermediate_size=96, out_hidden_size=64,
                            window_size=56, fullatt_block_indexes=[1]),
                text=dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                          rope_parameters={\"rope_type\": \"default\", \"rope_theta\": 1e6, \"mrope_section\": [2, 3, 3]}))
" && "$0" -m parity_tests.check --checkpoint "$1" --dtype bfloat16 --image-sizes "$3" --json "$2" $4
' "$PY" "$CK" "$OUT/parity_bf16.json" "$PARITY_SIZES" "${PARITY_ARGS:-}" > "$OUT/parity.log" 2>&1
PARITY_STATUS=$?
echo "parity exit status $PARITY_STATUS (124: out of time)"
tail -3 "$OUT/parity.log"
fi

if [[ "$CHECKS" == *" bench "* ]]; then
echo "== benchmark (benchmarks/gpu.sh)"
QVL_DOCTOR=0 timeout "$BENCH_S" bash benchmarks/gpu.sh "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
BENCH_STATUS=${PIPESTATUS[0]}
echo "benchmark exit status $BENCH_STATUS (124: out of time)"
fi
if [[ "$CHECKS" == *" memory "* ]]; then
echo "== planned vs measured memory (benchmarks/memory_check.py)"
timeout "${MEMORY_S:-420}" "$PY" benchmarks/memory_check.py --json "$OUT/memory.json" 2>&1 | tee "$OUT/memory.log"
MEMORY_STATUS=${PIPESTATUS[0]}
echo "memory check exit status $MEMORY_STATUS (124: out of time)"
fi
[ "$PARITY_STATUS" = 0 ] && [ "$BENCH_STATUS" = 0 ] && [ "$MEMORY_STATUS" = 0 ]
