#!/usr/bin/env bash
# GEM post-training on SLURM: one torchrun per node (srun), DeepSpeed ZeRO-3 by default.
#
#   MODEL=/ckpt/Llama-3.2-1B DATA=/data/sentences.jsonl SAVE=/runs/gem-1b sbatch slurm/gem_train.sh
#   sbatch slurm/gem_llama8b.sh            (the wrappers set per-size defaults, then run this)
#
# #SBATCH lines cannot read the environment: change the allocation on the sbatch command line
# (`sbatch --nodes=4 --time=12:00:00 --cpus-per-task=96 slurm/gem_train.sh`). Everything else
# comes from the environment (sbatch passes it to the job); see docs/slurm.md for the list.
#
# Pre-emption: SLURM sends SIGUSR1 to this shell --signal's lead time before the limit. The
# trap forwards it to the training ranks (train.py --exit-signal-handler finishes the step,
# saves, exits 0), then requeues the job. Every run passes --load $SAVE, so a requeued or
# resubmitted job resumes from SAVE/latest.
# Failure: a rank that dies ends its torchrun; srun --kill-on-bad-exit ends the other nodes;
# ranks blocked in a collective give up after --distributed-timeout-minutes.
#
#SBATCH --job-name=gem
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -euo pipefail

log() { echo "[gem_train] $*"; }
die() { echo "[gem_train] error: $*" >&2; exit 2; }

# ---- where the checkout is ---------------------------------------------------------------------
# sbatch runs a copy of the script from its spool directory, so $0 does not point into the
# checkout; ask the controller which file was submitted (paths with spaces are not supported).
if [ -z "${GEM_ROOT:-}" ]; then
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
    GEM_ROOT=$(cd "$(dirname "${submitted:-.}")/.." 2>/dev/null && pwd || true)
    [ -f "$GEM_ROOT/train.py" ] || GEM_ROOT=${SLURM_SUBMIT_DIR:-}
  else
    GEM_ROOT=$(cd "$(dirname "$0")/.." && pwd)
  fi
fi
[ -f "$GEM_ROOT/train.py" ] || die "cannot find the megatron-gem checkout (train.py); set GEM_ROOT=/path/to/checkout"
export GEM_ROOT

[ -n "${SLURM_JOB_ID:-}" ] || die "not inside a SLURM job: submit with sbatch (or run inside salloc)"

# ---- configuration (environment, then SLURM, then defaults) ------------------------------------
# No default model: a hub id would make every rank download (or fail offline, or be refused a
# gated repo) at start; a cluster job names the checkpoint on its shared file system.
[ -n "${MODEL:-}" ] ||
  die "MODEL is not set: give the checkpoint to train${GEM_RECIPE:+ (${GEM_RECIPE})}, e.g. MODEL=/ckpt/Llama-3.1-8B DATA=... sbatch slurm/gem_llama8b.sh (an HF checkpoint directory; BACKEND=megatron also takes a converted megatron checkpoint)"
: "${DATA:?set DATA to the training data (space-separated files or a Megatron prefix)}"
: "${SAVE:?set SAVE to the run directory (checkpoints, metrics.jsonl, hf/)}"
BACKEND=${BACKEND:-deepspeed}
ALLOC_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NODES=${NODES:-$ALLOC_NODES}
[ "${CPU:-0}" = 1 ] && GPUS_PER_NODE=0
if [ -z "${GPUS_PER_NODE:-}" ]; then
  # SLURM_GPUS_ON_NODE (22.05+); else the job's --gpus-per-node (maybe "type:N"); else the driver.
  GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-}
  GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE##*:}}
  if [ -z "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
fi
GPUS_PER_NODE=${GPUS_PER_NODE:-0}
if [ "$GPUS_PER_NODE" -gt 0 ]; then
  RANKS_PER_NODE=${RANKS_PER_NODE:-$GPUS_PER_NODE}
  DEVICE="gpu (nccl)"
  BF16=${BF16:-1}
else
  RANKS_PER_NODE=${RANKS_PER_NODE:-1}
  DEVICE="cpu (gloo)"
  BF16=${BF16:-0}
  # CPU mode even on a node with GPUs: hide them from torch and DeepSpeed.
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
fi
CPUS_PER_NODE=${CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-$(nproc)}}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((CPUS_PER_NODE / RANKS_PER_NODE > 0 ? CPUS_PER_NODE / RANKS_PER_NODE : 1))}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
# A port per job: jobs sharing a node do not collide, and a requeued job (same id) reuses it.
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$GEM_ROOT/.venv/bin/python" ]; then PYTHON=$GEM_ROOT/.venv/bin/python; else PYTHON=$(command -v python3); fi
fi
DS_CONFIG=${DS_CONFIG:-$GEM_ROOT/ds_zero3.json}
TP=${TP:-1}
PP=${PP:-1}
export MASTER_ADDR MASTER_PORT NODES RANKS_PER_NODE PYTHON

[ "$NODES" -ge 1 ] && [ "$NODES" -le "$ALLOC_NODES" ] ||
  die "NODES=$NODES but the job has $ALLOC_NODES node(s): change the allocation with sbatch --nodes=N"
[ "$RANKS_PER_NODE" -ge 1 ] || die "RANKS_PER_NODE=$RANKS_PER_NODE must be >= 1"
[ "$GPUS_PER_NODE" -eq 0 ] || [ "$RANKS_PER_NODE" -le "$GPUS_PER_NODE" ] ||
  die "RANKS_PER_NODE=$RANKS_PER_NODE exceeds GPUS_PER_NODE=$GPUS_PER_NODE"
[ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not executable"

# ---- the train.py command line -----------------------------------------------------------------
# shellcheck disable=SC2206  # DATA and TRAIN_ARGS are word lists on purpose
TRAIN=(--model "$MODEL" --data $DATA --save "$SAVE" --load "$SAVE" --exit-signal-handler --no-progress)
case "$BACKEND" in
  deepspeed)
    [ -f "$DS_CONFIG" ] || die "DS_CONFIG=$DS_CONFIG does not exist"
    TRAIN=("$GEM_ROOT/train.py" "${TRAIN[@]}" --deepspeed "$DS_CONFIG")
    ;;
  megatron)
    # train.py selects the megatron-core engine when Megatron's parallelism flags are given.
    [ $((NODES * RANKS_PER_NODE % (TP * PP))) -eq 0 ] ||
      die "BACKEND=megatron: world size $((NODES * RANKS_PER_NODE)) is not a multiple of TP=$TP x PP=$PP"
    TRAIN=("$GEM_ROOT/train.py" "${TRAIN[@]}"
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
    ;;
  *) die "BACKEND=$BACKEND: expected deepspeed or megatron" ;;
esac
add_flag() { [ -z "${2:-}" ] || TRAIN+=("$1" "$2"); }
add_flag --seq-length "${SEQ_LENGTH:-}"
add_flag --micro-batch-size "${MICRO_BATCH_SIZE:-}"
add_flag --global-batch-size "${GLOBAL_BATCH_SIZE:-}"
add_flag --train-iters "${TRAIN_ITERS:-}"
add_flag --gem-contrastive-from-step "${CONTRASTIVE_FROM_STEP:-}"
add_flag --lr "${LR:-}"
add_flag --contrastive-lr "${CONTRASTIVE_LR:-}"
add_flag --contrastive-micro-batch-size "${CONTRASTIVE_MICRO_BATCH_SIZE:-}"
add_flag --save-interval "${SAVE_INTERVAL:-}"
add_flag --log-interval "${LOG_INTERVAL:-}"
add_flag --seed "${SEED:-}"
add_flag --distributed-timeout-minutes "${DISTRIBUTED_TIMEOUT_MINUTES:-}"
add_flag --save-total-limit "${SAVE_TOTAL_LIMIT:-}"
add_flag --data-cache-path "${DATA_CACHE_PATH:-}"
[ "$BF16" = 1 ] && TRAIN+=(--bf16)
[ "${GRADIENT_CHECKPOINTING:-0}" = 1 ] && TRAIN+=(--gradient-checkpointing)
# shellcheck disable=SC2206
TRAIN+=(${TRAIN_ARGS:-} "$@")

mkdir -p "$SAVE"  # --load needs the directory; a missing SAVE/latest means a fresh start
if [ -s "$SAVE/latest" ]; then RESUME="from $SAVE/$(cat "$SAVE/latest")"; else RESUME="none (fresh start)"; fi

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST}, $(date -u +%FT%TZ)"
log "checkout ${GEM_ROOT}; python ${PYTHON}; backend ${BACKEND}$([ "$BACKEND" = megatron ] && echo " (tp=$TP pp=$PP)")"
log "nodes ${NODES} x ranks ${RANKS_PER_NODE} = world size $((NODES * RANKS_PER_NODE)); device ${DEVICE}; gpus/node ${GPUS_PER_NODE}; cpus/node ${CPUS_PER_NODE}; OMP_NUM_THREADS ${OMP_NUM_THREADS}"
log "rendezvous ${MASTER_ADDR}:${MASTER_PORT} (node rank = SLURM_NODEID)"
log "model ${MODEL}; data ${DATA}; save ${SAVE}; resume ${RESUME}"
log "train: ${TRAIN[*]}"

# ---- launch, forward pre-emption, requeue ------------------------------------------------------
PREEMPTED=0
SRUN_PID=
# shellcheck disable=SC2317  # called by the trap
on_preempt() {
  PREEMPTED=1
  log "SIGUSR1 (time limit near or pre-emption): asking the ranks to save and exit"
  # Signals every step of this job but not this batch shell. launch_node.sh makes torchrun
  # ignore SIGUSR1, so it reaches train.py's handler and the agents stay up while ranks save.
  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || { [ -z "$SRUN_PID" ] || kill -USR1 "$SRUN_PID"; }
}
trap on_preempt USR1

srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_NODE" \
  --kill-on-bad-exit=1 --label "$GEM_ROOT/slurm/launch_node.sh" "${TRAIN[@]}" &
SRUN_PID=$!
while :; do
  rc=0
  wait "$SRUN_PID" || rc=$?
  # A trapped signal interrupts `wait` (rc > 128) while srun still runs: keep waiting.
  if [ "$rc" -gt 128 ] && kill -0 "$SRUN_PID" 2>/dev/null; then continue; fi
  break
done

if [ "$PREEMPTED" = 1 ]; then
  if [ "$rc" -eq 0 ]; then
    log "checkpoint saved ($(cat "$SAVE/latest" 2>/dev/null)); requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  log "training exited with $rc after SIGUSR1; not requeueing"
fi
if [ "$rc" -eq 0 ]; then log "finished"; else log "training failed (exit $rc); see the .err log"; fi
exit "$rc"
