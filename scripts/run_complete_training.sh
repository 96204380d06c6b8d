#!/usr/bin/env bash
# The seed guide's launcher: DeepSpeed reference trainer on N GPUs of this host.
#   scripts/run_complete_training.sh [NUM_GPUS] [CONFIG] [DS_CONFIG] [extra args for qvl_torch.train ...]
# Environment: PYTHON (default: .venv/bin/python if present, else python3), MASTER_PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_GPUS="${1:-8}"
CONFIG="${2:-configs/complete_training_config.yaml}"
DS_CONFIG="${3:-configs/ds_config_zero2.json}"
shift $(( $# < 3 ? $# : 3 ))
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PYTHON" -m deepspeed.launcher.runner --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" \
    --module qvl_torch.train --config "$CONFIG" --deepspeed "$DS_CONFIG" "$@"
