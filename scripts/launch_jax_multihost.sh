#!/usr/bin/env bash
# Multi-host JAX training. One process per host; every process reads its own share of the data.
#
#   SLURM:  srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_jax_multihost.sh configs/X.yaml [args]
#           (jax.distributed.initialize() detects SLURM: nothing else to set)
#   plain:  on each host i of N:
#           COORDINATOR=host0:12345 NUM_PROCESSES=N PROCESS_ID=i scripts/launch_jax_multihost.sh configs/X.yaml [args]
#
# Environment: COORDINATOR (host:port of process 0), NUM_PROCESSES, PROCESS_ID (plain multi-host only);
# PYTHON (default: .venv/bin/python if present, else python3). Extra arguments go to qvl_jax.train
# (e.g. --resume_from auto, --set training.batch_size=4).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG="${1:?usage: $0 CONFIG.yaml [qvl_jax.train args...]}"
shift
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
ARGS=(--config "$CONFIG")
if [ -n "${COORDINATOR:-}" ]; then
    : "${NUM_PROCESSES:?set NUM_PROCESSES with COORDINATOR}" "${PROCESS_ID:?set PROCESS_ID with COORDINATOR}"
    ARGS+=(--set "distributed.coordinator_address=$COORDINATOR" --set "distributed.num_processes=$NUM_PROCESSES"
           --set "distributed.process_id=$PROCESS_ID")
elif [ -z "${SLURM_NTASKS:-}" ]; then
    echo "neither SLURM nor COORDINATOR/NUM_PROCESSES/PROCESS_ID is set: running one process" >&2
fi
exec "$PYTHON" -m qvl_jax.train "${ARGS[@]}" "$@"
