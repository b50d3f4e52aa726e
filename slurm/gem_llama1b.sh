#!/usr/bin/env bash
# GEM post-training of Llama-3.2-1B: 1 node(s) x 8 GPUs, DeepSpeed ZeRO-3.
#
#   DATA=/data/sentences.jsonl sbatch slurm/gem_llama1b.sh
#   MODEL=/ckpt/my-llama1b DATA=... SAVE=/runs/x sbatch --nodes=4 --time=48:00:00 slurm/gem_llama1b.sh
#
# Defaults below follow the paper's recipe (batch 32, length 512, phase 2 from step 100,
# lr 1e-4 then 1e-5); any of them, and everything gem_train.sh reads, can be set in the
# environment. Allocation changes go on the sbatch command line. See docs/slurm.md.
#
#SBATCH --job-name=gem-llama1b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=06:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

: "${MODEL:=meta-llama/Llama-3.2-1B}"
: "${SEQ_LENGTH:=512}" "${MICRO_BATCH_SIZE:=1}" "${GLOBAL_BATCH_SIZE:=32}"
: "${TRAIN_ITERS:=1000}" "${CONTRASTIVE_FROM_STEP:=100}" "${LR:=1e-4}" "${CONTRASTIVE_LR:=1e-5}"
: "${SAVE_INTERVAL:=100}" "${LOG_INTERVAL:=10}" "${GRADIENT_CHECKPOINTING:=0}"
export MODEL SEQ_LENGTH MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS CONTRASTIVE_FROM_STEP LR CONTRASTIVE_LR \
  SAVE_INTERVAL LOG_INTERVAL GRADIENT_CHECKPOINTING

# sbatch runs a copy of this file from its spool directory: find the checkout through the
# path that was submitted (paths with spaces are not supported; set GEM_ROOT then).
if [ -z "${GEM_ROOT:-}" ]; then
  submitted=$0
  [ -z "${SLURM_JOB_ID:-}" ] ||
    submitted=$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n1)
  GEM_ROOT=$(cd "$(dirname "$submitted")/.." 2>/dev/null && pwd || true)
  [ -f "$GEM_ROOT/train.py" ] || GEM_ROOT=${SLURM_SUBMIT_DIR:-.}
fi
export GEM_ROOT
: "${SAVE:=$GEM_ROOT/runs/gem-llama1b}"
export SAVE
exec bash "$GEM_ROOT/slurm/gem_train.sh" "$@"
