#!/usr/bin/env bash
# Submit MiniGPT training to Slurm: fills slurm/train_{single,multi}_node.sbatch from flags, prints the
# exact sbatch command it runs and the job id.
#
#   slurm/submit.sh --nodes 2 --gpus-per-node 8 --time 12:00:00 --partition gpu --mode pretrain \
#       --preset small -- --max-steps 20000 --data data/owt
#   slurm/submit.sh --cpu-ranks-per-node 2 --time 10 --launcher srun -- --max-steps 50   # CPU-only cluster
#
# Flags after `--` go to launch/train.py. --dry-run prints the command without submitting.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: slurm/submit.sh [options] [-- launch/train.py flags]
  --nodes N               nodes (default 1; more than 1 uses train_multi_node.sbatch)
  --gpus-per-node G       GPUs (= ranks) per node (default 0: CPU-only nodes)
  --cpu-ranks-per-node C  ranks per node when --gpus-per-node is 0 (default 1)
  --cpus-per-task N       CPUs per rank (srun) or per node (deepspeed/python) (default: the script's)
  --time T                time limit, Slurm format: MM, HH:MM:SS, D-HH (default: the script's)
  --partition P           partition
  --account A             account
  --job-name NAME         job name (default minigpt-<mode>-<preset>)
  --signal-lead S         seconds before the time limit at which the job checkpoints (default 120)
  --mode M                pretrain | sft | dpo | reward | rlhf (default pretrain)
  --preset P              tiny | small | medium | shakespeare (default tiny)
  --out DIR               run directory (default checkpoints/<mode>_<preset>); the job log goes there
  --ds-config FILE        DeepSpeed JSON config
  --launcher L            srun (default) | deepspeed | python
  --ds-launcher L         with --launcher deepspeed on several nodes, how DeepSpeed reaches them:
                          pdsh (default, needs ssh between nodes) | slurm (srun, no ssh) | openmpi | ...
  --no-requeue            a signal still saves a checkpoint, but the job does not requeue itself
  --sbatch-arg ARG        pass ARG to sbatch as is (repeatable), e.g. --sbatch-arg=--qos=high
  --dry-run               print the command, do not submit
EOF
}

die() { echo "submit.sh: $*" >&2; exit 2; }

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }

need_int() { [[ $2 =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }

main() {
    local nodes=1 gpus=0 cpu_ranks=1 cpus_per_task="" time_limit="" partition="" account="" job_name=""
    local lead=120 mode=pretrain preset=tiny out="" ds_config="" launcher=srun ds_launcher=${DS_MULTINODE_LAUNCHER:-pdsh} requeue=1 dry_run=0
    local extra_sbatch=() train_args=()
    while [[ $# -gt 0 ]]; do
        case $1 in
            --nodes) need_value "$@"; nodes=$2; shift 2 ;;
            --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
            --cpu-ranks-per-node) need_value "$@"; cpu_ranks=$2; shift 2 ;;
            --cpus-per-task) need_value "$@"; cpus_per_task=$2; shift 2 ;;
            --time) need_value "$@"; time_limit=$2; shift 2 ;;
            --partition) need_value "$@"; partition=$2; shift 2 ;;
            --account) need_value "$@"; account=$2; shift 2 ;;
            --job-name) need_value "$@"; job_name=$2; shift 2 ;;
            --signal-lead) need_value "$@"; lead=$2; shift 2 ;;
            --mode) need_value "$@"; mode=$2; shift 2 ;;
            --preset) need_value "$@"; preset=$2; shift 2 ;;
            --out) need_value "$@"; out=$2; shift 2 ;;
            --ds-config) need_value "$@"; ds_config=$2; shift 2 ;;
            --launcher) need_value "$@"; launcher=$2; shift 2 ;;
            --ds-launcher) need_value "$@"; ds_launcher=$2; shift 2 ;;
            --no-requeue) requeue=0; shift ;;
            --sbatch-arg) need_value "$@"; extra_sbatch+=("$2"); shift 2 ;;
            --sbatch-arg=*) extra_sbatch+=("${1#--sbatch-arg=}"); shift ;;
            --dry-run) dry_run=1; shift ;;
            -h|--help) usage; exit 0 ;;
            --) shift; train_args=("$@"); break ;;
            *) die "unknown option '$1' (training flags go after --; see --help)" ;;
        esac
    done
    need_int --nodes "$nodes"; need_int --gpus-per-node "$gpus"; need_int --cpu-ranks-per-node "$cpu_ranks"
    need_int --signal-lead "$lead"
    (( nodes >= 1 )) || die "--nodes must be at least 1"
    (( gpus > 0 || cpu_ranks >= 1 )) || die "--cpu-ranks-per-node must be at least 1"
    case $mode in pretrain|sft|dpo|reward|rlhf) ;; *) die "--mode must be pretrain, sft, dpo, reward or rlhf, got '$mode'" ;; esac
    case $launcher in srun|deepspeed|python) ;; *) die "--launcher must be srun, deepspeed or python, got '$launcher'" ;; esac
    local ranks_per_node=$(( gpus > 0 ? gpus : cpu_ranks ))
    if [[ $launcher == python ]] && (( nodes * ranks_per_node != 1 )); then
        die "--launcher python runs one rank; use srun or deepspeed for $nodes node(s) x $ranks_per_node rank(s)"
    fi

    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    cd "$root"
    out=${out:-checkpoints/${mode}_${preset}}
    job_name=${job_name:-minigpt-${mode}-${preset}}
    local script=slurm/train_single_node.sbatch
    (( nodes > 1 )) && script=slurm/train_multi_node.sbatch
    # srun starts one task per rank; the deepspeed launcher and plain python are one task per node.
    local tasks_per_node=1 cpus_default=$ranks_per_node
    if [[ $launcher == srun ]]; then tasks_per_node=$ranks_per_node; cpus_default=1; fi

    local sbatch_args=(--parsable --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
                       --gpus-per-node="$gpus" --signal="B:USR1@$lead" --requeue --open-mode=append
                       --output="$out/slurm-%j.out")
    [[ -n $cpus_per_task ]] && sbatch_args+=(--cpus-per-task="$cpus_per_task")
    # CPU-only nodes: one CPU per rank unless told otherwise (the scripts' default suits GPU nodes).
    [[ -z $cpus_per_task && $gpus -eq 0 ]] && sbatch_args+=(--cpus-per-task="$cpus_default")
    [[ -n $time_limit ]] && sbatch_args+=(--time="$time_limit")
    [[ -n $partition ]] && sbatch_args+=(--partition="$partition")
    [[ -n $account ]] && sbatch_args+=(--account="$account")
    sbatch_args+=("${extra_sbatch[@]}")

    local knobs=(MINIGPT_ROOT="$root" MODE="$mode" PRESET="$preset" OUT="$out" DS_CONFIG="$ds_config"
                 LAUNCHER="$launcher" GPUS_PER_NODE="$gpus" CPU_RANKS_PER_NODE="$cpu_ranks"
                 REQUEUE_ON_STOP="$requeue" DS_MULTINODE_LAUNCHER="$ds_launcher")
    local cmd=(env "${knobs[@]}" sbatch "${sbatch_args[@]}" "$script" "${train_args[@]}")
    echo "+ $(printf "%q " "${cmd[@]}")"
    (( dry_run )) && return 0
    mkdir -p "$out"
    local job_id
    job_id=$("${cmd[@]}")
    job_id=${job_id%%;*}
    local log_dir=$out
    [[ $out == /* ]] || log_dir=$root/$out
    echo "submitted job $job_id; log: $log_dir/slurm-$job_id.out"
    echo "$job_id"
}

main "$@"
