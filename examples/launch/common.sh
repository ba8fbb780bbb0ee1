# shellcheck shell=bash
# Shared part of the StagFormer launch scripts: the model and training flags for each MODEL, the
# parallel sizes, and the dry-run / run step. Sourced by train_single_node.sh,
# train_multi_node.sh and train_slurm.sbatch; not run on its own.
#
# Every variable is read from the environment; the default is in brackets.
#
#   MODEL           which shapes to train [stag2x18-separate]:
#                     gpt18              the paper's 18-layer baseline (configs/paper_gpt_18l.yaml)
#                     stag2x18-separate  StagFormer, 2 sections x 18 layers, separate weights
#                                        (configs/paper_stag_2x18_separate.yaml)
#                     stag2x18-shared    StagFormer, 2 sections sharing one 18-layer stack
#                                        (configs/paper_stag_2x18_shared.yaml)
#                     tiny               2 x 2 layers, hidden 128, fp32: the CPU smoke test
#                                        (configs/tiny_cpu.yaml)
#   TP              --tensor-model-parallel-size [1]
#   PP              --pipeline-model-parallel-size [2 for stag2x18-*: one section per stage;
#                   1 for gpt18 and tiny]
#   DP              data-parallel size [world size / (TP x PP)]; when set, TP x PP x DP must
#                   equal the world size the launcher starts
#   MICRO_BATCH_SIZE   --micro-batch-size [4]
#   GLOBAL_BATCH_SIZE  --global-batch-size [1024; tiny: 8]; a multiple of MICRO_BATCH_SIZE x DP
#   TRAIN_ITERS     --train-iters [250000; tiny: 100]
#   LR_WARMUP_ITERS --lr-warmup-iters [2000; tiny: 10; at most a tenth of TRAIN_ITERS, so short
#                   runs work]
#   DATA_PATH       --data-path, one or more space-separated files/folders [unset: the trainer's
#                   default corpus, the Python standard library]
#   VOCAB_SIZE      --vocab-size [unset: the trainer's default; tiny: 4096]
#   SAVE_DIR        --save, checkpoint folder; shared by all nodes [runs/$MODEL]
#   LOAD_DIR        --load, resume from here [$SAVE_DIR, so a restarted job resumes]
#   SAVE_INTERVAL   --save-interval [1000; tiny: 50]
#   LOG_INTERVAL    --log-interval [10; tiny: 5]
#   EVAL_INTERVAL   --eval-interval [1000; tiny: 25]
#   EVAL_ITERS      --eval-iters [50; tiny: 4]
#   BF16            1: --bf16 [1; tiny: 0]
#   DISTRIBUTED_OPTIMIZER  1: --use-distributed-optimizer [1; tiny: 0]
#   SEQUENCE_PARALLEL      1: --sequence-parallel [1 when TP > 1, else 0]
#   DISTRIBUTED_TIMEOUT_MINUTES  --distributed-timeout-minutes [30]: how long a collective may
#                   wait (a slow checkpoint save, a rank that froze)
#   HEARTBEAT_TIMEOUT  seconds a rank may go without a heartbeat before `stag train` ends the job
#                   naming it and its node [60; 0: no watchdog]; exported as
#                   STAG_HEARTBEAT_TIMEOUT. Heartbeats come from a thread, so long steps, saves
#                   and data preparation do not count as silence
#   ENTRY           the trainer, as the words that follow `python` [-m stag_plugin train]; e.g.
#                   ENTRY=examples/megatron_lm/pretrain_stag.py for the Megatron-LM entry (it may
#                   need its own data/tokenizer flags: pass them as extra arguments)
#   TORCHRUN        the torchrun command, split into words [torchrun]; e.g.
#                   TORCHRUN="python -m torch.distributed.run"
#   TORCHRUN_ARGS   more torchrun options, split into words, after the script's own (so they
#                   win) [none]; e.g. TORCHRUN_ARGS="--local-addr 10.0.0.2" or
#                   TORCHRUN_ARGS="--rdzv-conf is_host=1,read_timeout=120"
#   DRY_RUN         1: print the command, one flag (and its value) per line, instead of running it
#   REPO_DIR        the repository root; the command runs there, so relative paths are relative
#                   to it [the folder two levels above this file]
#   CUDA_DEVICE_MAX_CONNECTIONS  exported to the trainer [1, as Megatron-LM's examples do]
#
# On several nodes the trainer checks before it starts that every node sees rank 0's SAVE_DIR
# (each rank writes its part of every checkpoint there) and either rank 0's data cache
# (--data-cache-dir, default $STAG_CACHE/data) or an identical prepared copy (rank 0 alone
# prepares the data): a node that does not fails the job at once, named in the message.
#
# Arguments given to a launch script are appended to the trainer's flags; a flag given twice takes
# the last value, so e.g. `train_single_node.sh --lr 1e-4` overrides the default learning rate.

die() {
    echo "error: $*" >&2
    exit 2
}

REPO_DIR=${REPO_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
MODEL=${MODEL:-stag2x18-separate}
DRY_RUN=${DRY_RUN:-0}
TORCHRUN=${TORCHRUN:-torchrun}
TORCHRUN_ARGS=${TORCHRUN_ARGS:-}
ENTRY=${ENTRY:--m stag_plugin train}
read -ra TORCHRUN_CMD <<<"$TORCHRUN"
# shellcheck disable=SC2034  # TORCHRUN_CMD and TORCHRUN_EXTRA are read by the launch scripts
read -ra TORCHRUN_EXTRA <<<"$TORCHRUN_ARGS"
((${#TORCHRUN_CMD[@]})) || die "TORCHRUN is empty"

# model_args: MODEL_ARGS (shapes, --stag-* flags, schedule) and the per-model defaults. Every
# value differing from Megatron-LM's default is passed, as the presets in configs/ set it.
model_args() {
    local common=(
        --transformer-impl local --position-embedding-type rope
        --hidden-dropout 0.0 --attention-dropout 0.0
        --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95
    )
    local paper=(
        "${common[@]}"
        --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 7168 --swiglu
        --normalization RMSNorm --disable-bias-linear
        --seq-length 1024 --max-position-embeddings 1024
        --lr 3.0e-4 --min-lr 3.0e-5 --clip-grad 1.0
    )
    DEFAULT_WARMUP=2000
    case "$MODEL" in
        gpt18)
            MODEL_ARGS=(--num-layers 18 --stag-num-sections 1 --stag-weight-sharing separate
                        "${paper[@]}")
            DEFAULT_PP=1 ;;
        stag2x18-separate)
            MODEL_ARGS=(--num-layers 36 --stag-num-sections 2 --stag-weight-sharing separate
                        "${paper[@]}")
            DEFAULT_PP=2 ;;
        stag2x18-shared)
            MODEL_ARGS=(--num-layers 36 --stag-num-sections 2 --stag-weight-sharing shared
                        "${paper[@]}")
            DEFAULT_PP=2 ;;
        tiny)
            MODEL_ARGS=(--num-layers 4 --stag-num-sections 2 --stag-weight-sharing separate
                        "${common[@]}"
                        --hidden-size 128 --num-attention-heads 4 --seq-length 128
                        --max-position-embeddings 128
                        --lr 3.0e-3 --min-lr 3.0e-4)
            DEFAULT_WARMUP=10
            DEFAULT_PP=1 ;;
        *)
            die "MODEL='$MODEL' is not one of: gpt18 stag2x18-separate stag2x18-shared tiny" ;;
    esac
}

# pick TINY PAPER: the default for MODEL=tiny, or for the paper's shapes.
pick() {
    if [[ $MODEL == tiny ]]; then echo "$1"; else echo "$2"; fi
}

# set_defaults: the training defaults of MODEL for every variable not set in the environment.
set_defaults() {
    TP=${TP:-1}
    PP=${PP:-$DEFAULT_PP}
    require_positive_int TP "$TP"
    require_positive_int PP "$PP"
    MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
    GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$(pick 8 1024)}
    TRAIN_ITERS=${TRAIN_ITERS:-$(pick 100 250000)}
    require_positive_int TRAIN_ITERS "$TRAIN_ITERS"
    LR_WARMUP_ITERS=${LR_WARMUP_ITERS:-$((DEFAULT_WARMUP < TRAIN_ITERS / 10 ? DEFAULT_WARMUP
                                                                         : TRAIN_ITERS / 10))}
    [[ $LR_WARMUP_ITERS =~ ^[0-9]+$ ]] || die "LR_WARMUP_ITERS=$LR_WARMUP_ITERS must be a number"
    ((LR_WARMUP_ITERS < TRAIN_ITERS)) ||
        die "LR_WARMUP_ITERS=$LR_WARMUP_ITERS must be less than TRAIN_ITERS=$TRAIN_ITERS"
    VOCAB_SIZE=${VOCAB_SIZE:-$(pick 4096 "")}
    SAVE_DIR=${SAVE_DIR:-runs/$MODEL}
    LOAD_DIR=${LOAD_DIR:-$SAVE_DIR}
    SAVE_INTERVAL=${SAVE_INTERVAL:-$(pick 50 1000)}
    LOG_INTERVAL=${LOG_INTERVAL:-$(pick 5 10)}
    EVAL_INTERVAL=${EVAL_INTERVAL:-$(pick 25 1000)}
    EVAL_ITERS=${EVAL_ITERS:-$(pick 4 50)}
    BF16=${BF16:-$(pick 0 1)}
    DISTRIBUTED_OPTIMIZER=${DISTRIBUTED_OPTIMIZER:-$(pick 0 1)}
    SEQUENCE_PARALLEL=${SEQUENCE_PARALLEL:-$( ((TP > 1)) && echo 1 || echo 0)}
    DISTRIBUTED_TIMEOUT_MINUTES=${DISTRIBUTED_TIMEOUT_MINUTES:-30}
    HEARTBEAT_TIMEOUT=${HEARTBEAT_TIMEOUT:-60}
    [[ $HEARTBEAT_TIMEOUT =~ ^[0-9]+([.][0-9]*)?$ ]] ||
        die "HEARTBEAT_TIMEOUT=$HEARTBEAT_TIMEOUT must be a number of seconds (0: no watchdog)"
    export STAG_HEARTBEAT_TIMEOUT=$HEARTBEAT_TIMEOUT
}

require_positive_int() {  # name value
    [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1=$2 must be a positive integer"
}

# parallel_sizes WORLD: check TP/PP/DP against the launcher's world size; sets DP.
parallel_sizes() {
    local world=$1 name
    for name in MICRO_BATCH_SIZE GLOBAL_BATCH_SIZE; do
        require_positive_int "$name" "${!name}"
    done
    if [[ -n ${DP:-} ]]; then
        require_positive_int DP "$DP"
        ((TP * PP * DP == world)) ||
            die "TP x PP x DP = $TP x $PP x $DP = $((TP * PP * DP)) but the launcher starts" \
                "$world processes. Fix: change DP, or the node/GPU counts"
    else
        ((world % (TP * PP) == 0)) ||
            die "the world size $world is not a multiple of TP x PP = $((TP * PP))." \
                "Fix: launch a multiple of it"
        DP=$((world / (TP * PP)))
    fi
    ((GLOBAL_BATCH_SIZE % (MICRO_BATCH_SIZE * DP) == 0)) ||
        die "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not a multiple of MICRO_BATCH_SIZE x DP" \
            "= $MICRO_BATCH_SIZE x $DP. Fix: change one of them"
    [[ $SEQUENCE_PARALLEL == 1 && $TP == 1 ]] &&
        die "SEQUENCE_PARALLEL=1 needs TP > 1 (it splits activations over tensor-parallel ranks)"
    return 0
}

# build_train_args WORLD: TRAIN_ARGS, every flag the trainer gets (before the script's arguments).
build_train_args() {
    model_args
    set_defaults
    parallel_sizes "$1"
    TRAIN_ARGS=(
        "${MODEL_ARGS[@]}"
        --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
        --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
        --train-iters "$TRAIN_ITERS" --lr-warmup-iters "$LR_WARMUP_ITERS"
        --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS"
        --save "$SAVE_DIR" --load "$LOAD_DIR" --save-interval "$SAVE_INTERVAL"
        --distributed-timeout-minutes "$DISTRIBUTED_TIMEOUT_MINUTES"
    )
    if [[ -n ${DATA_PATH:-} ]]; then
        local paths
        read -ra paths <<<"$DATA_PATH"
        TRAIN_ARGS+=(--data-path "${paths[@]}")
    fi
    [[ -n $VOCAB_SIZE ]] && TRAIN_ARGS+=(--vocab-size "$VOCAB_SIZE")
    [[ $BF16 == 1 ]] && TRAIN_ARGS+=(--bf16)
    [[ $DISTRIBUTED_OPTIMIZER == 1 ]] && TRAIN_ARGS+=(--use-distributed-optimizer)
    [[ $SEQUENCE_PARALLEL == 1 ]] && TRAIN_ARGS+=(--sequence-parallel)
    # shellcheck disable=SC2034  # ENTRY_ARGS is read by the launch scripts
    read -ra ENTRY_ARGS <<<"$ENTRY"
    return 0
}

# count_gpus: the GPUs this node shows (CUDA_VISIBLE_DEVICES when set, else nvidia-smi), or 0.
count_gpus() {
    if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
        local ids
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        [[ ${ids[0]:-} == -1 || ${ids[0]:-} == NoDevFiles ]] && ids=()
        echo "${#ids[@]}"
    elif command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    else
        echo 0
    fi
}

# default_gpus_per_node: one process per GPU of this node; 1 (a gloo process) without GPUs.
default_gpus_per_node() {
    local gpus
    gpus=$(count_gpus)
    if ((gpus > 0)); then
        echo "$gpus"
    else
        echo "# no GPU on $(hostname): GPUS_PER_NODE=1 (one gloo process per node; set" \
             "GPUS_PER_NODE for more)" >&2
        echo 1
    fi
}

# is_this_host ADDRESS: whether ADDRESS (a name or an IP) is this machine.
is_this_host() {
    local address=$1 name mine resolved
    [[ $address == localhost || $address == 127.* || $address == ::1 ]] && return 0
    for name in "$(hostname)" "$(hostname -s 2>/dev/null)" "$(hostname -f 2>/dev/null)"; do
        [[ -n $name && $address == "$name" ]] && return 0
    done
    if command -v ip >/dev/null 2>&1; then
        mine=$(ip -o addr show 2>/dev/null | awk '{sub(/\/.*/, "", $4); print $4}')
    else
        mine=$(hostname -I 2>/dev/null | tr ' ' '\n')
    fi
    resolved=$(getent ahosts "$address" 2>/dev/null | awk '{print $1}' | sort -u)
    for name in $resolved; do
        grep -qxF "$name" <<<"$mine" && return 0
    done
    return 1
}

# print_command ARGS...: shell-quoted, a flag and its value per line, with `\` continuations.
print_command() {
    local arg quoted prev="" out="" words=0
    for arg in "$@"; do
        printf -v quoted '%q' "$arg"
        if ((words == 0)); then
            out=$quoted
            words=1
        elif ((words == 1)) && [[ $prev == -* && $arg != -* ]]; then
            out+=" $quoted"
            words=2
        else
            out+=$' \\\n    '$quoted
            words=1
        fi
        prev=$arg
    done
    printf '%s\n' "$out"
}

# launch ARGS...: print the command (DRY_RUN=1) or run it from the repository root.
launch() {
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    echo "# MODEL=$MODEL TP=$TP PP=$PP DP=$DP; runs in $REPO_DIR with" \
         "CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS" >&2
    if [[ $DRY_RUN == 1 ]]; then
        print_command "$@"
        return 0
    fi
    cd "$REPO_DIR" || die "cannot cd to REPO_DIR=$REPO_DIR"
    exec "$@"
}
