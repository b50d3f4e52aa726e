#!/usr/bin/env bash
# GEM post-training of Llama-3.1-8B: 2 node(s) x 8 GPUs, DeepSpeed ZeRO-1 (configs/deepspeed/ds_zero1.json).
#
#   MODEL=/ckpt/Llama-3.1-8B DATA=/data/sentences.jsonl sbatch slurm/gem_llama8b.sh
#   MODEL=/ckpt/my-llama8b DATA=... SAVE=/runs/x sbatch --nodes=4 --time=48:00:00 slurm/gem_llama8b.sh
#
# MODEL is required (a checkpoint directory on a file system every node sees). Defaults below
# follow the paper's recipe (batch 32, length 512, phase 2 from step 100,
# lr 1e-4 then 1e-5); any of them, and everything gem_train.sh reads, can be set in the
# environment. Allocation changes go on the sbatch command line. See docs/slurm.md.
#
# Recipe figures (Llama-3.1-8B with 1 GEM token: 8,030,269,440 parameters, counted as in
# docs/slurm.md "Recipe figures"):
#   checkpoint (ZeRO-1, full mode): 14 bytes per parameter (fp32 master weights and Adam's two
#     moments, 12, sharded; bf16 weights, 2, written by rank 0) = 112.4 GB, 6.0 GB of
#     optimizer state per rank at 16 ranks; summary mode (--gem-train summary) stores only
#     the adapter and its optimizer state
#   HF export (hf/, bf16): 2 bytes per parameter = 16.1 GB
#   on disk: SAVE_TOTAL_LIMIT=2 keeps the newest 2 checkpoints (of the 10 that SAVE_INTERVAL=100
#     of 1000 steps writes)
#   collective timeout 30 min: a save written at 200 MB/s (a slow shared file system) takes
#     9.4 min, and ranks wait in a collective for the slowest writer
#   tokens: 32 rows x 512 = 16,384 per optimizer step, 1,024 per GPU on 16 GPUs
#     (one micro-batch of 2 x 512 each)
#   per-GPU memory (tools/estimate_memory.py --recipe paper-llama3-8b): peak 41.2 GB
#     (parameters 16.1, gradients and the step's copies 19.1, optimizer 6.0; the step's own peak)
#   sent per rank per step: 45.2 GB (gradient all-reduce + parameter all-gather, bf16)
#   ZeRO-1 is the lowest stage that fits (docs/slurm.md "Memory and communication")
#
#SBATCH --job-name=gem-llama8b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@600

: "${SEQ_LENGTH:=512}" "${MICRO_BATCH_SIZE:=2}" "${GLOBAL_BATCH_SIZE:=32}"
: "${TRAIN_ITERS:=1000}" "${CONTRASTIVE_FROM_STEP:=100}" "${LR:=1e-4}" "${CONTRASTIVE_LR:=1e-5}"
# phase 2: GradCache chunks of 4 pairs (the 8 x micro-batch contrastive batch unchunked needs > 80 GB; docs/slurm.md)
: "${CONTRASTIVE_MICRO_BATCH_SIZE:=4}"
: "${SAVE_INTERVAL:=100}" "${SAVE_TOTAL_LIMIT:=2}" "${DISTRIBUTED_TIMEOUT_MINUTES:=30}" "${LOG_INTERVAL:=10}" "${GRADIENT_CHECKPOINTING:=0}"
export SEQ_LENGTH MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS CONTRASTIVE_FROM_STEP LR CONTRASTIVE_LR CONTRASTIVE_MICRO_BATCH_SIZE \
  SAVE_INTERVAL SAVE_TOTAL_LIMIT DISTRIBUTED_TIMEOUT_MINUTES LOG_INTERVAL GRADIENT_CHECKPOINTING
export GEM_RECIPE="Llama-3.1-8B, slurm/gem_llama8b.sh"

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
: "${DS_CONFIG:=$GEM_ROOT/configs/deepspeed/ds_zero1.json}"  # the estimator's choice (docs/slurm.md)
export DS_CONFIG
: "${SAVE:=$GEM_ROOT/runs/gem-llama8b}"
export SAVE
exec bash "$GEM_ROOT/slurm/gem_train.sh" "$@"
