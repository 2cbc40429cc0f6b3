#!/usr/bin/env bash
# One node, N GPUs (or N CPU processes over gloo when the config says train.device=cpu):
#
#   bash launch/torchrun.sh configs/stages/dacpt-llama3.1-8b.yaml [--set parallel.tp=2 ...] [--resume]
#   NPROC=2 bash launch/torchrun.sh my.yaml --set train.device=cpu --set parallel.tp=2
#
# NPROC defaults to the number of visible GPUs. Every argument after the config goes to
# `mdt train` unchanged (overrides, --resume, --dry-run). Per-rank logs: $LOG_DIR (default
# logs/torchrun-<timestamp>), rank 0 also on the console.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: [NPROC=N] bash launch/torchrun.sh CONFIG [mdt train options ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [[ ! -f $CONFIG ]]; then
    echo "launch/torchrun.sh: config file $CONFIG does not exist" >&2
    exit 2
fi

if [[ -z ${NPROC:-} ]]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [[ ${NPROC:-0} -ge 1 ]] || NPROC=1
fi
LOG_DIR=${LOG_DIR:-logs/torchrun-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$LOG_DIR"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONUNBUFFERED=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# NCCL's flight recorder: on a collective timeout every rank dumps its last collectives (train.hang_timeout_s)
export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}

# Preemption: the training processes catch SIGUSR1 (and SIGTERM), finish their step, checkpoint and
# exit 0. torchrun itself would die from SIGUSR1 (it does not handle it) when a scheduler signals
# every process of the job, so it starts with SIGUSR1 ignored; the workers install their handler.
trap '' USR1
exec torchrun --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    --log-dir "$LOG_DIR" --tee 3 --local-ranks-filter 0 \
    -m megatron_domain.cli train "$CONFIG" "$@"
