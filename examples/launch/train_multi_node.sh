#!/usr/bin/env bash
# Train a paper-shaped StagFormer (or the 18-layer GPT baseline) on NNODES nodes with torchrun and
# a c10d rendezvous. Run this same command on every node (same variables everywhere):
#
#     torchrun --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d \
#         --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $JOB_ID --max-restarts $MAX_RESTARTS \
#         -m stag_plugin train <flags> "$@"
#
#     NNODES=2 MASTER_ADDR=node0 MODEL=stag2x18-separate examples/launch/train_multi_node.sh
#
# The c10d rendezvous assigns node and process ranks, so there is no --node-rank: torchrun uses
# --node-rank only with the static rendezvous (and warns that it ignores it otherwise). The node
# whose address is MASTER_ADDR hosts the rendezvous store; start it first or within the timeout.
#
# Variables of this script (default in brackets):
#   NNODES          number of nodes (required)
#   GPUS_PER_NODE   processes per node, one per GPU [8]; world size = NNODES x GPUS_PER_NODE
#   MASTER_ADDR     host name or address of the node that hosts the rendezvous (required)
#   MASTER_PORT     a free TCP port on MASTER_ADDR [29500]
#   JOB_ID          rendezvous id, the same on every node and unique per job [stag-$MODEL]
#   MAX_RESTARTS    times torchrun restarts the workers after a failure [0]
#
# Variables shared with the other launch scripts, documented in common.sh next to this file:
#   MODEL TP PP DP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS DATA_PATH VOCAB_SIZE SAVE_DIR
#   LOAD_DIR SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS BF16 DISTRIBUTED_OPTIMIZER
#   SEQUENCE_PARALLEL DISTRIBUTED_TIMEOUT_MINUTES ENTRY TORCHRUN DRY_RUN REPO_DIR
#   CUDA_DEVICE_MAX_CONNECTIONS
# SAVE_DIR (and DATA_PATH) must be on a file system every node sees at the same path.
# Arguments of this script are appended to the trainer's flags (the last value of a flag wins).
set -euo pipefail

# shellcheck source=examples/launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -n ${NNODES:-} ]] || die "set NNODES, the number of nodes (the same on every node)"
[[ -n ${MASTER_ADDR:-} ]] || die "set MASTER_ADDR, the host of the rendezvous (the same on every node)"
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-stag-$MODEL}
MAX_RESTARTS=${MAX_RESTARTS:-0}
require_positive_int NNODES "$NNODES"
require_positive_int GPUS_PER_NODE "$GPUS_PER_NODE"
build_train_args "$((NNODES * GPUS_PER_NODE))"

launch "$TORCHRUN" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" \
    --max-restarts "$MAX_RESTARTS" \
    "${ENTRY_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
