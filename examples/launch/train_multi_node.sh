#!/usr/bin/env bash
# Train a paper-shaped StagFormer (or the 18-layer GPT baseline) on NNODES nodes with torchrun and
# a c10d rendezvous. Run this same command on every node (same variables everywhere):
#
#     torchrun --nnodes $NNODES --nproc-per-node $GPUS_PER_NODE --rdzv-backend c10d \
#         --rdzv-endpoint $MASTER_ADDR:$MASTER_PORT --rdzv-id $JOB_ID --max-restarts $MAX_RESTARTS \
#         [--rdzv-conf is_host=1] $TORCHRUN_ARGS -m stag_plugin train <flags> "$@"
#
#     NNODES=2 MASTER_ADDR=node0 MODEL=stag2x18-separate examples/launch/train_multi_node.sh
#
# The c10d rendezvous assigns node and process ranks, so there is no --node-rank: torchrun uses
# --node-rank only with the static rendezvous (and warns that it ignores it otherwise). The node
# whose address is MASTER_ADDR hosts the rendezvous store; start it first or within the timeout.
# That node is found by its names (hostname, short and long) and its interfaces' addresses,
# and told so with `--rdzv-conf is_host=1`: torchrun's own guess compares MASTER_ADDR with what
# the node's hostname resolves to, which misses when that is not the routable address (both
# agents then wait as clients until the rendezvous times out).
#
# Variables of this script (default in brackets):
#   NNODES          number of nodes (required)
#   GPUS_PER_NODE   processes per node, one per GPU [the GPUs this node shows; 1 without GPUs];
#                   world size = NNODES x GPUS_PER_NODE
#   MASTER_ADDR     host name or address of the node that hosts the rendezvous (required); it
#                   must resolve on every node
#   MASTER_PORT     a free TCP port on MASTER_ADDR [29500]
#   JOB_ID          rendezvous id, the same on every node and unique per job [stag-$MODEL]
#   MAX_RESTARTS    times torchrun restarts the workers after a failure [0]
#   RDZV_IS_HOST    1: this node hosts the rendezvous store; 0: it does not; auto: 1 on the node
#                   whose name or address MASTER_ADDR is, else torchrun's guess [auto]
#
# Variables shared with the other launch scripts, documented in common.sh next to this file:
#   MODEL TP PP DP MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE TRAIN_ITERS LR_WARMUP_ITERS DATA_PATH
#   VOCAB_SIZE SAVE_DIR LOAD_DIR SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS BF16
#   DISTRIBUTED_OPTIMIZER SEQUENCE_PARALLEL DISTRIBUTED_TIMEOUT_MINUTES HEARTBEAT_TIMEOUT ENTRY
#   TORCHRUN TORCHRUN_ARGS DRY_RUN REPO_DIR CUDA_DEVICE_MAX_CONNECTIONS
# SAVE_DIR, DATA_PATH and the data cache (--data-cache-dir, default $STAG_CACHE/data) must be on
# a file system every node sees at the same path (or, for the cache, an identical prepared copy
# on each node): the trainer checks this before it starts and names a node that does not.
# Arguments of this script are appended to the trainer's flags (the last value of a flag wins).
set -euo pipefail

# shellcheck source=examples/launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

[[ -n ${NNODES:-} ]] || die "set NNODES, the number of nodes (the same on every node)"
[[ -n ${MASTER_ADDR:-} ]] || die "set MASTER_ADDR, the host of the rendezvous (the same on every node)"
require_positive_int NNODES "$NNODES"
GPUS_PER_NODE=${GPUS_PER_NODE:-$(default_gpus_per_node)}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-stag-$MODEL}
MAX_RESTARTS=${MAX_RESTARTS:-0}
require_positive_int GPUS_PER_NODE "$GPUS_PER_NODE"
require_positive_int MASTER_PORT "$MASTER_PORT"
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS=$MAX_RESTARTS must be a number"
if ((NNODES > 1)) && [[ $MASTER_ADDR == localhost || $MASTER_ADDR == 127.* ||
                        $MASTER_ADDR == ::1 ]]; then
    die "MASTER_ADDR=$MASTER_ADDR is a loopback address: the other nodes cannot reach it. Fix:" \
        "use the name or address of the node that hosts the rendezvous"
fi
if [[ $DRY_RUN != 1 ]] && command -v getent >/dev/null 2>&1 &&
        ! getent ahosts "$MASTER_ADDR" >/dev/null 2>&1; then
    die "MASTER_ADDR=$MASTER_ADDR does not resolve on $(hostname). Fix: use an address, or" \
        "a name this node resolves (/etc/hosts, DNS)"
fi
build_train_args "$((NNODES * GPUS_PER_NODE))"

RDZV_ARGS=(--rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID")
case ${RDZV_IS_HOST:-auto} in
    1) RDZV_ARGS+=(--rdzv-conf is_host=1) ;;
    0) RDZV_ARGS+=(--rdzv-conf is_host=0) ;;
    auto) if is_this_host "$MASTER_ADDR"; then RDZV_ARGS+=(--rdzv-conf is_host=1); fi ;;
    *) die "RDZV_IS_HOST=$RDZV_IS_HOST must be 1, 0 or auto" ;;
esac

launch "${TORCHRUN_CMD[@]}" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    "${RDZV_ARGS[@]}" --max-restarts "$MAX_RESTARTS" "${TORCHRUN_EXTRA[@]}" \
    "${ENTRY_ARGS[@]}" "${TRAIN_ARGS[@]}" "$@"
