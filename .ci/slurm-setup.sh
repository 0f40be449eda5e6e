#!/usr/bin/env bash
# One-node Slurm cluster on this machine for the Slurm integration tests.
#
#   .ci/slurm-setup.sh start    install slurm-wlm + munge if missing, write the config, start
#                               munged, slurmctld and slurmd, wait until the node is idle (default)
#   .ci/slurm-setup.sh stop     stop the three daemons this script started
#   .ci/slurm-setup.sh status   print what runs; exit 0 only when the cluster accepts jobs
#
# Idempotent: `start` on a running cluster only checks it. Needs root. It writes /etc/slurm/slurm.conf
# and cgroup.conf only when they are absent or were written by this script (marker line below), so a
# real cluster's configuration is never overwritten.
# Exit codes: 0 ok, 1 failure, 3 not possible here (not root, or apt cannot install the packages).
set -euo pipefail

MARKER="# written by minigpt .ci/slurm-setup.sh"
CONF_DIR=/etc/slurm
RUN_DIR=/run/minigpt-slurm
LOG_DIR=/var/log/minigpt-slurm
NODE_NAME=$(hostname -s)
# More CPUs than the machine has are declared on purpose (SlurmdParameters=config_overrides): the
# tests run a few small jobs side by side and only need Slurm's bookkeeping, not exclusive cores.
NODE_CPUS=${MINIGPT_SLURM_CPUS:-8}

log() { echo "[slurm-setup] $*" >&2; }

# install_packages [COMMAND:PACKAGE ...]: slurm-wlm + munge, plus any PACKAGE whose COMMAND is missing
# (the two-node cluster adds openssh-server and pdsh for DeepSpeed's hostfile launcher).
install_packages() {
    local wanted=() pair
    if ! { command -v sbatch && command -v slurmctld && command -v slurmd && command -v munged; } >/dev/null; then
        wanted+=(slurm-wlm munge)
    fi
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || [[ -x /usr/sbin/${pair%%:*} ]] || wanted+=("${pair#*:}")
    done
    (( ${#wanted[@]} )) || return 0
    if ! command -v apt-get >/dev/null; then
        log "${wanted[*]} missing and apt-get is not available"; exit 3
    fi
    log "installing ${wanted[*]} with apt-get"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${wanted[@]}" \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                 "${wanted[@]}"; }; } >"$LOG_DIR/apt.log" 2>&1; then
        log "apt-get could not install ${wanted[*]} (see $LOG_DIR/apt.log)"; exit 3
    fi
}

# The settings of both test clusters (this one and .ci/slurm-two-node.sh's); each adds its own names,
# hosts, ports and paths.
shared_slurm_settings() {
    cat <<'EOF'
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its old credential expired (default 120 s); a short lifetime
# and a frequent scheduler pass bring the restart of a requeued job down to ~20 s.
AuthInfo=cred_expire=15
SchedulerParameters=sched_interval=2
# No cgroup hierarchy is usable in containers such as this one: track processes by parent id.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
# A node that was DOWN (e.g. lost) returns to service as soon as its slurmd registers again.
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
EOF
}

# Writes slurm.conf.new (main() swaps it in when it differs) and cgroup.conf.
write_config() {
    mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd
    local f
    for f in slurm.conf cgroup.conf; do
        if [[ -e $CONF_DIR/$f ]] && ! grep -qF "$MARKER" "$CONF_DIR/$f"; then
            log "$CONF_DIR/$f exists and was not written by this script; leaving it alone"; exit 1
        fi
    done
    cat >"$CONF_DIR/slurm.conf.new" <<EOF
$MARKER
ClusterName=minigpt
SlurmctldHost=$NODE_NAME
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
$(shared_slurm_settings)
NodeName=$NODE_NAME CPUs=$NODE_CPUS State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf '%s\nCgroupPlugin=autodetect\nIgnoreSystemd=yes\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
}

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    local _
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    log "munged did not start (see /var/log/munge/munged.log)"; exit 1
}

start_slurm() {
    pid_alive "$RUN_DIR/slurmctld.pid" || slurmctld
    pid_alive "$RUN_DIR/slurmd.pid" || slurmd
    local _ state
    for _ in $(seq 120); do
        state=$(sinfo -h -n "$NODE_NAME" -o %T 2>/dev/null || true)
        case $state in
            idle*|mixed*|allocated*) log "cluster up: node $NODE_NAME $state"; return 0 ;;
            drain*|down*) scontrol update NodeName="$NODE_NAME" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.5
    done
    log "node $NODE_NAME did not become idle (state '${state:-?}'); see $LOG_DIR/"; exit 1
}

stop_daemons() {
    local name
    for name in slurmd slurmctld; do
        if pid_alive "$RUN_DIR/$name.pid"; then
            kill "$(cat "$RUN_DIR/$name.pid")"
            log "stopped $name"
        fi
    done
    if [[ -s /run/munge/munged.pid ]] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        kill "$(cat /run/munge/munged.pid)"
        log "stopped munged"
    fi
}

status() {
    pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid" \
        && sinfo -h -n "$NODE_NAME" -o "%N %T %c" 2>/dev/null | grep -Eq "idle|mixed|allocated" \
        && sinfo -h -n "$NODE_NAME" -o "node %N state %T cpus %c"
}

main() {
    local action=${1:-start}
    case $action in
        start)
            if [[ $(id -u) -ne 0 ]]; then log "needs root to install and start Slurm"; exit 3; fi
            mkdir -p "$RUN_DIR" "$LOG_DIR"
            install_packages
            write_config
            if cmp -s "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"; then
                rm "$CONF_DIR/slurm.conf.new"
                if status >/dev/null 2>&1; then log "already running: $(status)"; return 0; fi
            else
                stop_daemons
                sleep 1
                mv "$CONF_DIR/slurm.conf.new" "$CONF_DIR/slurm.conf"
            fi
            start_munge
            start_slurm ;;
        stop) stop_daemons ;;
        status) status ;;
        *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
    esac
}

# Sourced by .ci/slurm-two-node.sh for install_packages and start_munge; run as a script otherwise.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main "$@"; fi
