#!/usr/bin/env bash
# One per node, started by gem_train.sh through srun: torchrun with this node's rank.
#
# Rendezvous is static: node rank SLURM_NODEID, the first node of the job as MASTER_ADDR and
# a port derived from the job id (all exported by gem_train.sh). Arguments: what each rank
# runs (train.py and its flags, or -m <module> and its flags).
set -euo pipefail
: "${MASTER_ADDR:?}" "${MASTER_PORT:?}" "${NODES:?}" "${RANKS_PER_NODE:?}" "${PYTHON:?}"
NODE_RANK=${SLURM_NODEID:-${SLURM_PROCID:?not started by srun}}

# Pre-emption: SLURM signals every process of the step. The ranks catch SIGUSR1 (train.py
# --exit-signal-handler installs a handler over the inherited "ignore"); torchrun and this
# shell must not die of it (its default action), or the ranks would be killed mid-save.
trap '' USR1

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NODES" --nproc-per-node="$RANKS_PER_NODE" --node-rank="$NODE_RANK" \
  --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0 \
  "$@"
