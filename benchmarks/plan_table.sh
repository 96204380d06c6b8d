#!/usr/bin/env bash
# The README's "largest batch per GPU" table: `python -m qvl_jax.plan --max-batch` for Qwen2.5-VL-3B and -7B
# (the seed config's settings: 448 px, bf16 compute, float32 master weights; remat on, no accumulation), zero2
# and fsdp, on GPU x N. No GPU needed (the CUDA plugin compiles for the card); each search compiles the full-size
# step a few times (~2 min each on a 2-core machine), two searches at a time.
#   benchmarks/plan_table.sh [OUT_DIR] [GPU] [DEVICES]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-plan_table}" GPU="${2:-h100-80gb}" DEVICES="${3:-8}"
mkdir -p "$OUT"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export JAX_PLATFORMS=cpu
plan() {  # size strategy
    "$PY" -m qvl_jax.plan --config configs/complete_training_config.yaml --gpu "$GPU" --devices "$DEVICES" \
        --set "model.pretrained_name=/models/Qwen2.5-VL-$1-Instruct" --set "sharding.strategy=$2" \
        --set training.gradient_checkpointing=true --set training.gradient_accumulation_steps=1 \
        --max-batch --no-deepspeed --json "$OUT/$1_$2.json" > "$OUT/$1_$2.txt" 2> "$OUT/$1_$2.log" || true
}
for size in 3B 7B; do
    plan "$size" zero2 & plan "$size" fsdp & wait
done
"$PY" - "$OUT" "$GPU" "$DEVICES" <<'PY'
import json, sys
out, gpu, devices = sys.argv[1:]
print(f"| model | strategy | largest batch per device ({devices} x {gpu}, 448 px, remat) | planned GiB at that batch | weights + optimizer state GiB |")
print("|---|---|---|---|---|")
for size in ("3B", "7B"):
    for strategy in ("zero2", "fsdp"):
        r = json.load(open(f"{out}/{size}_{strategy}.json"))
        b = r["max_batch"]
        at = r["max_batch_totals"].get(str(b)) if b else None
        states = sum(r["per_device_bytes"][k] for k in ("compute_params", "master_params", "optimizer"))
        print(f"| {size} | {strategy} | {b if b else 'none'} | {at / 2**30:.1f} |" if at else f"| {size} | {strategy} | none | - |", end="")
        print(f" {states / 2**30:.1f} |")
PY
