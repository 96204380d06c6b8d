#!/usr/bin/env bash
# The GPU benchmark of issue 6: JAX vs PyTorch on a Qwen2.5-VL-3B-shaped training step (random weights,
# bf16 compute, float32 master weights, 448-px images, remat), one GPU, each framework in its own process so
# neither holds the other's memory. Sized for < 8 minutes on an H100 (compile ~1-2 min, 10 timed steps each).
#   benchmarks/gpu.sh [OUT_DIR] [extra --set args for both]
# Writes OUT_DIR/{jax,torch}.json and prints the side-by-side table last.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench_out}}"
shift || true
mkdir -p "$OUT"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# The environment (GPU, driver, CUDA, cuDNN, library versions), unless benchmarks/device_check.sh reported it already.
[ "${QVL_DOCTOR:-1}" = 0 ] || "$PYTHON" -m qvl_core.doctor || true
"$PYTHON" -m parity_tests.bench --config configs/bench_3b.yaml --steps 10 --warmup 2 --only jax \
    --json "$OUT/jax.json" "$@" 2>&1 | tail -8
"$PYTHON" -m parity_tests.bench --config configs/bench_3b.yaml --steps 10 --warmup 2 --only torch \
    --json "$OUT/torch.json" "$@" 2>&1 | tail -8
"$PYTHON" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
j, t = (json.load(open(f"{out}/{n}.json")) for n in ("jax", "torch"))
peak = "unknown" if j["peak_tflops"] is None else f"{j['peak_tflops']:.4g}"
print(f"device: {j['device']}; peak {peak} TFLOP/s ({j['peak_source']})")
print(f"{'framework':10} {'samples/s':>10} {'step ms':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak mem GB':>11}  attention")
for name, r in (("jax", j["jax"]), ("torch", t["torch"])):
    mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
    mem = "n/a" if r.get("peak_memory_gb") is None else f"{r['peak_memory_gb']:.1f}"
    if r.get("memory_limit_gb"):
        mem += f" / {r['memory_limit_gb']:.0f}"
    print(f"{name:10} {r['samples_per_second']:10.2f} {r['step_time_s'] * 1e3:9.1f} {r['tflops']:8.1f} {mfu:>6} {mem:>11}"
          f"  {r['attention']}")
print(f"JAX / PyTorch samples/s: {j['jax']['samples_per_second'] / t['torch']['samples_per_second']:.2f}x")
PY
