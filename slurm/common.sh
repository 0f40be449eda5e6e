# Shared body of slurm/train_single_node.sbatch and slurm/train_multi_node.sbatch (sourced, not run).
#
# The sbatch script sets the knobs (see its top) and calls `run_training "$@"`. This file derives the
# rest from the allocation, launches the ranks, forwards preemption signals and decides about requeueing:
#
#   ranks exit 0   -> the run finished: the job ends COMPLETED, no requeue
#   ranks exit 75  -> stopped by a signal after saving a checkpoint: `scontrol requeue`; the requeued
#                     job runs this script again and --auto-resume continues from <out>/latest
#   anything else  -> the job fails with that code
#
# Launchers (LAUNCHER=...):
#   srun       (default) srun starts every rank itself: no ssh needed, Slurm tracks and cleans up every
#              rank, and `scancel --signal` reaches all of them on every node.
#   deepspeed  the DeepSpeed launcher with a hostfile built from SLURM_JOB_NODELIST; several nodes need
#              passwordless ssh + pdsh between them (DS_MULTINODE_LAUNCHER=pdsh|openmpi|...), or
#              DS_MULTINODE_LAUNCHER=slurm, with which DeepSpeed starts the ranks through srun (no ssh).
#              Signals are delivered to the rank processes by slurm/signal_ranks.py on each node,
#              because the launcher does not forward SIGUSR1.
#   python     one plain process (no DeepSpeed), for one-rank jobs.

EXIT_PREEMPTED=75

slurm_log() { echo "[minigpt-slurm $(date '+%F %T')] $*" >&2; }

# Knob defaults; the sbatch script or the environment (e.g. slurm/submit.sh) may set any of them.
set_defaults() {
    MINIGPT_ROOT=${MINIGPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
    MODE=${MODE:-pretrain}
    PRESET=${PRESET:-tiny}
    OUT=${OUT:-checkpoints/${MODE}_${PRESET}}
    DS_CONFIG=${DS_CONFIG:-}
    EXTRA_ARGS=${EXTRA_ARGS:-}
    LAUNCHER=${LAUNCHER:-srun}
    GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
    CPU_RANKS_PER_NODE=${CPU_RANKS_PER_NODE:-1}
    REQUEUE_ON_STOP=${REQUEUE_ON_STOP:-1}
    DS_MULTINODE_LAUNCHER=${DS_MULTINODE_LAUNCHER:-pdsh}
    PYTHON=${PYTHON:-python3}
    TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
    if (( GPUS_PER_NODE > 0 )); then RANKS_PER_NODE=$GPUS_PER_NODE; else RANKS_PER_NODE=$CPU_RANKS_PER_NODE; fi
    NUM_NODES=${SLURM_JOB_NUM_NODES:-1}
}

# MASTER_ADDR = first node of the allocation; MASTER_PORT from the job id, so jobs sharing a node differ.
derive_rendezvous() {
    local hosts
    hosts=$("$PYTHON" slurm/hostfile.py --hosts) || return 1
    MASTER_ADDR=${MASTER_ADDR:-$(head -n 1 <<<"$hosts")}
    MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    export MASTER_ADDR MASTER_PORT
}

check_setup() {
    cd "$MINIGPT_ROOT" || { slurm_log "MINIGPT_ROOT=$MINIGPT_ROOT does not exist"; return 2; }
    if [[ ! -f $TRAIN_SCRIPT || ! -f slurm/hostfile.py ]]; then
        slurm_log "$MINIGPT_ROOT has no $TRAIN_SCRIPT or slurm/hostfile.py: submit from the repository root" \
                  "or set MINIGPT_ROOT"
        return 2
    fi
    case $LAUNCHER in
        srun|deepspeed) ;;
        python)
            if (( NUM_NODES * RANKS_PER_NODE != 1 )); then
                slurm_log "LAUNCHER=python runs one rank, but $NUM_NODES node(s) x $RANKS_PER_NODE rank(s) were asked"
                return 2
            fi ;;
        *) slurm_log "LAUNCHER must be srun, deepspeed or python, got '$LAUNCHER'"; return 2 ;;
    esac
}

training_args() {
    TRAIN_ARGS=(--mode "$MODE" --config "$PRESET" --out "$OUT" --auto-resume)
    [[ -n $DS_CONFIG ]] && TRAIN_ARGS+=(--ds-config "$DS_CONFIG")
    local extra
    read -r -a extra <<<"$EXTRA_ARGS"
    TRAIN_ARGS+=("${extra[@]}" "$@")
}

# Starts the ranks in the background; RANKS_PID is what `wait` waits for.
start_ranks() {
    mkdir -p "$OUT"
    case $LAUNCHER in
        srun)
            srun --nodes="$NUM_NODES" --ntasks-per-node="$RANKS_PER_NODE" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
                --kill-on-bad-exit=0 \
                "$PYTHON" -u "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}" &
            ;;
        deepspeed)
            local hostfile="$OUT/hostfile.$SLURM_JOB_ID" ds_args
            "$PYTHON" slurm/hostfile.py --slots "$RANKS_PER_NODE" --out "$hostfile" || return 1
            ds_args=(--hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
            # One node: local launch without the ssh check; more: ssh/pdsh to the other nodes, or srun.
            if (( NUM_NODES == 1 )); then ds_args+=(--no_ssh_check); else ds_args+=(--launcher "$DS_MULTINODE_LAUNCHER"); fi
            if (( NUM_NODES > 1 )) && [[ $DS_MULTINODE_LAUNCHER == slurm ]]; then
                # DeepSpeed's slurm launcher runs `srun -n <ranks> launch/train.py`: no ssh is needed, and
                # the step must fit the allocation's one task of SLURM_CPUS_PER_TASK CPUs per node.
                local cpus=$(( ${SLURM_CPUS_PER_TASK:-$RANKS_PER_NODE} / RANKS_PER_NODE ))
                ds_args+=(--no_ssh_check
                          "--launcher_args=--ntasks-per-node=$RANKS_PER_NODE --cpus-per-task=$(( cpus > 0 ? cpus : 1 ))")
            fi
            deepspeed "${ds_args[@]}" "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}" &
            ;;
        python)
            # A lone process is not a DeepSpeed rank: hide the batch step's task ids from it.
            env -u SLURM_PROCID -u SLURM_LOCALID -u SLURM_NTASKS -u SLURM_NPROCS \
                "$PYTHON" -u "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}" &
            ;;
    esac
    RANKS_PID=$!
}

# Runs in the batch shell when Slurm signals it (--signal=B:USR1@N, time limit/preemption TERM, scancel).
forward_signal() {
    local sig=$1
    STOP_SIGNAL=$sig
    slurm_log "received SIG$sig: asking every rank to checkpoint at the next step boundary"
    case $LAUNCHER in
        srun) scancel --signal="$sig" "$SLURM_JOB_ID" ;;  # every job step, not the batch shell
        python) kill -s "$sig" "$RANKS_PID" 2>/dev/null ;;
        deepspeed)
            if (( NUM_NODES == 1 )); then
                "$PYTHON" slurm/signal_ranks.py "$sig" --script "$TRAIN_SCRIPT" --out "$OUT"
            else
                srun --overlap --nodes="$NUM_NODES" --ntasks-per-node=1 \
                    "$PYTHON" slurm/signal_ranks.py "$sig" --script "$TRAIN_SCRIPT" --out "$OUT"
            fi ;;
    esac
}

# `wait` returns early (>128) whenever a trapped signal arrives; keep waiting until the ranks are gone.
wait_for_ranks() {
    local rc
    while true; do
        wait "$RANKS_PID"
        rc=$?
        kill -0 "$RANKS_PID" 2>/dev/null || return "$rc"
    done
}

run_training() {
    set_defaults
    check_setup || return $?
    derive_rendezvous || return 1
    training_args "$@"
    STOP_SIGNAL=""
    trap 'forward_signal USR1' USR1
    trap 'forward_signal TERM' TERM
    trap 'forward_signal INT' INT
    slurm_log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on ${SLURM_JOB_NODELIST:-?}:" \
              "$NUM_NODES node(s) x $RANKS_PER_NODE rank(s), launcher $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT"
    slurm_log "train args: ${TRAIN_ARGS[*]}"
    start_ranks || return 1
    wait_for_ranks
    local rc=$?
    trap - USR1 TERM INT
    if (( rc == 0 )); then
        slurm_log "training finished (exit 0); not requeueing"
        return 0
    fi
    if (( rc == EXIT_PREEMPTED )); then
        slurm_log "ranks stopped after a checkpoint (exit $rc, signal ${STOP_SIGNAL:-none seen here})"
        if (( ! REQUEUE_ON_STOP )); then
            slurm_log "REQUEUE_ON_STOP=0: not requeueing; resubmit to resume from $OUT/latest"
            return "$rc"
        fi
        slurm_log "requeueing job $SLURM_JOB_ID; the next run resumes from $OUT/latest"
        # Requeueing ends this run of the job at once (the batch shell is killed during the sleep).
        if scontrol requeue "$SLURM_JOB_ID"; then
            sleep 60
            return 0
        fi
        slurm_log "scontrol requeue failed: resubmit by hand; the run resumes from $OUT/latest"
        return "$rc"
    fi
    if [[ -n $STOP_SIGNAL ]] && (( REQUEUE_ON_STOP )); then
        # A rank signalled before it installed its handlers (still starting up) dies without saving;
        # the last checkpoint is intact, so the requeued run resumes from it.
        slurm_log "ranks exited $rc after SIG$STOP_SIGNAL without saving; requeueing to resume from the last checkpoint"
        scontrol requeue "$SLURM_JOB_ID" && sleep 60
        return "$rc"
    fi
    # A node failure is not ours to handle: Slurm itself cancels and requeues a --requeue job whose node
    # stopped answering (SlurmdTimeout), and the next run resumes from the last complete checkpoint.
    slurm_log "training failed (exit $rc); not requeueing from here (after a node failure Slurm requeues a --requeue job)"
    return "$rc"
}
