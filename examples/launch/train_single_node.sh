#!/usr/bin/env bash
# Train a paper-shaped StagFormer (or the 18-layer GPT baseline) on one node with torchrun:
#
#     torchrun --standalone --nproc-per-node $GPUS_PER_NODE $TORCHRUN_ARGS \
#         -m stag_plugin train <flags> "$@"
#
#     MODEL=stag2x18-shared examples/launch/train_single_node.sh
#     MODEL=tiny GPUS_PER_NODE=2 examples/launch/train_single_node.sh     # CPU smoke test (gloo)
#     DRY_RUN=1 MODEL=gpt18 examples/launch/train_single_node.sh          # print the command only
#
# Variables of this script (default in brackets):
#   GPUS_PER_NODE   processes to start, one per GPU (on a CPU-only machine: gloo processes)
#                   [the GPUs this machine shows; 1 without GPUs]; this is the world size,
#                   TP x PP x DP
#
# Variables shared with the other launch scripts, documented in common.sh next to this file:
#   MODEL TP PP DP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS LR_WARMUP_ITERS DATA_PATH
#   VOCAB_SIZE SAVE_DIR LOAD_DIR SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS BF16
#   DISTRIBUTED_OPTIMIZER SEQUENCE_PARALLEL DISTRIBUTED_TIMEOUT_MINUTES HEARTBEAT_TIMEOUT ENTRY
#   TORCHRUN TORCHRUN_ARGS DRY_RUN REPO_DIR CUDA_DEVICE_MAX_CONNECTIONS
# Arguments of this script are appended to the trainer's flags (the last value of a flag wins).
set -euo pipefail

# shellcheck source=examples/launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

GPUS_PER_NODE=${GPUS_PER_NODE:-$(default_gpus_per_node)}
require_positive_int GPUS_PER_NODE "$GPUS_PER_NODE"
build_train_args "$GPUS_PER_NODE"

launch "${TORCHRUN_CMD[@]}" --standalone --nproc-per-node "$GPUS_PER_NODE" "${TORCHRUN_EXTRA[@]}" \
    "${ENTRY_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
