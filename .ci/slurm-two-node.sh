#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for the multi-node integration tests.
#
#   .ci/slurm-two-node.sh start     build it (default): bridge, one network + UTS namespace per node,
#                                   /etc/hosts entries, slurmctld on the host, one slurmd per node
#   .ci/slurm-two-node.sh stop      tear all of it down: daemons, job processes, namespaces, veths,
#                                   bridge, /etc/hosts entries, config and state
#   .ci/slurm-two-node.sh status    print the nodes; exit 0 only when both accept jobs
#   .ci/slurm-two-node.sh kill-node NODE   lose NODE as a power cut would: its link goes down first (no
#                                   FIN/RST reaches the others), then every process in it is SIGKILLed
#   .ci/slurm-two-node.sh revive-node NODE link up again, a fresh slurmd and sshd (Slurm returns it to service)
#
# Every node also runs an sshd (root, key only, listening on the node's bridge address only), and ssh on
# this machine is configured for the nodes (/etc/ssh/ssh_config.d/minigpt-2node.conf: the cluster's own
# key and known_hosts), so DeepSpeed's hostfile launcher starts ranks over pdsh/ssh as on a real
# cluster: `ssh mgn2 hostname` works from the host and from inside every node.
#
# Each "host" is a network namespace (own address on a private bridge, no route anywhere else) plus a
# UTS namespace (own hostname), so ranks see different hosts and talk over a real network. Traps (see
# docs/distributed.md): slurmd is entered with `nsenter --net` (`ip netns exec` remounts /sys and
# slurmd then finds no cgroup filesystem), and the node names must resolve (/etc/hosts here).
#
# Apart from the one-node cluster of .ci/slurm-setup.sh: its own config dir, ports, spool, pid and log
# paths, cluster name; clients use it through SLURM_CONF=$CONF_DIR/slurm.conf. munged is shared (one
# key on the filesystem); `stop` stops munged only if `start` started it and the one-node cluster is down.
# Idempotent. Exit codes: 0 ok, 1 failure, 3 not possible here (not root, no netns/veth/bridge, no apt).
set -euo pipefail

# install_packages, start_munge, pid_alive, log come from the one-node script.
# shellcheck source=.ci/slurm-setup.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm-setup.sh"
ONE_NODE_RUN_DIR=$RUN_DIR

MARKER="# written by minigpt .ci/slurm-two-node.sh"
CONF_DIR=/etc/slurm-minigpt-2node
CONF=$CONF_DIR/slurm.conf
RUN_DIR=/run/minigpt-slurm-2node
LOG_DIR=/var/log/minigpt-slurm-2node
SPOOL_DIR=/var/spool/minigpt-slurm-2node
SUBNET=${MINIGPT_2NODE_SUBNET:-10.213.0}   # a /24 of the private 10/8 range, on our bridge only
BRIDGE=mgbr0
HOST_ADDR=$SUBNET.1
NODES=(mgn1 mgn2)
NODE_IFNAME=mg0                            # the interface inside every node (GLOO_SOCKET_IFNAME=mg0)
CTLD_PORT=6917                             # the one-node cluster uses Slurm's defaults 6817/6818
SLURMD_PORT=6918
SSH_DIR=$CONF_DIR/ssh                      # host key, the cluster's client key, authorized_keys, known_hosts
SSH_CLIENT_CONF=/etc/ssh/ssh_config.d/minigpt-2node.conf
CONTROL_HOST=$(hostname -s)

log() { echo "[slurm-two-node] $*" >&2; }

node_addr() {
    local i
    for i in "${!NODES[@]}"; do [[ ${NODES[$i]} == "$1" ]] && { echo "$SUBNET.$((11 + i))"; return 0; }; done
    log "unknown node '$1' (nodes: ${NODES[*]})"; exit 1
}

host_veth() { echo "mgv-$1"; }

uts_file() { echo "$RUN_DIR/uts/$1"; }

# Refuse, with the reason, where namespaces cannot be built (exit 3 lets the tests skip).
require_root() {
    if [[ $(id -u) -ne 0 ]]; then log "needs root to create network namespaces and start Slurm"; exit 3; fi
}

check_possible() {
    if ! command -v ip >/dev/null && command -v apt-get >/dev/null; then
        log "installing iproute2 with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 >"$LOG_DIR/apt.log" 2>&1 \
            || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2; } \
            >>"$LOG_DIR/apt.log" 2>&1 || true
    fi
    local tool
    for tool in ip nsenter unshare mountpoint; do
        command -v "$tool" >/dev/null || { log "'$tool' is not installed (iproute2/util-linux)"; exit 3; }
    done
    if ! ip netns list >/dev/null 2>&1; then log "'ip netns' does not work here"; exit 3; fi
    if ip netns list | grep -qw mgprobe; then ip netns del mgprobe; fi
    if ! ip netns add mgprobe 2>"$LOG_DIR/probe.log"; then
        log "cannot create a network namespace: $(cat "$LOG_DIR/probe.log")"; exit 3
    fi
    if ! ip link add mgprobe0 type veth peer name mgprobe1 2>>"$LOG_DIR/probe.log"; then
        ip netns del mgprobe
        log "cannot create a veth pair: $(tail -n 1 "$LOG_DIR/probe.log")"; exit 3
    fi
    ip link del mgprobe0
    ip netns del mgprobe
}

write_config() {
    mkdir -p "$CONF_DIR" "$SPOOL_DIR/ctld"
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        log "$CONF exists and was not written by this script; leaving it alone"; exit 1
    fi
    local node_lines="" node
    for node in "${NODES[@]}"; do
        node_lines+="NodeName=$node NodeAddr=$(node_addr "$node") NodeHostname=$node CPUs=4 State=UNKNOWN"$'\n'
    done
    cat >"$CONF" <<EOF
$MARKER
ClusterName=minigpt2node
SlurmctldHost=$CONTROL_HOST($HOST_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$SPOOL_DIR/ctld
SlurmdSpoolDir=$SPOOL_DIR/%n
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
$(shared_slurm_settings)
# Losing a node: after SlurmdTimeout without an answer the node is DOWN, its jobs end NODE_FAIL and a
# job submitted with --requeue (JobRequeue=1 makes that the default) goes back to the queue at once.
SlurmdTimeout=30
${node_lines}PartitionName=two Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    printf '%s\nCgroupPlugin=autodetect\nIgnoreSystemd=yes\n' "$MARKER" >"$CONF_DIR/cgroup.conf"
}

set_hosts_entries() {
    local kept node
    kept=$(grep -vF "$MARKER" /etc/hosts || true)
    for node in "${NODES[@]}"; do kept+=$'\n'"$(node_addr "$node") $node $MARKER"; done
    # Rewrite in place: /etc/hosts is often a bind mount that cannot be replaced by rename.
    printf '%s\n' "$kept" >/etc/hosts
}

remove_hosts_entries() {
    if grep -qF "$MARKER" /etc/hosts; then
        local kept
        kept=$(grep -vF "$MARKER" /etc/hosts || true)
        printf '%s\n' "$kept" >/etc/hosts
    fi
}

start_bridge() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr show dev "$BRIDGE" | grep -qF " $HOST_ADDR/" || ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

# Network namespace joined to the bridge by a veth pair, plus a persistent UTS namespace for its hostname.
start_namespace() {
    local node=$1 veth uts
    veth=$(host_veth "$node")
    uts=$(uts_file "$node")
    [[ -e /run/netns/$node ]] || ip netns add "$node"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name "$NODE_IFNAME" netns "$node"
    fi
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$node" link set lo up
    ip -n "$node" addr show dev "$NODE_IFNAME" | grep -qF " $(node_addr "$node")/" \
        || ip -n "$node" addr add "$(node_addr "$node")/24" dev "$NODE_IFNAME"
    ip -n "$node" link set "$NODE_IFNAME" up
    mkdir -p "$RUN_DIR/uts"
    if ! mountpoint -q "$uts" 2>/dev/null; then
        touch "$uts"
        unshare --uts="$uts" hostname "$node"
    fi
}

start_slurmd() {
    local node=$1
    mkdir -p "$SPOOL_DIR/$node"
    pid_alive "$RUN_DIR/slurmd-$node.pid" && return 0
    # --net, not `ip netns exec` (which remounts /sys: slurmd then fails on /sys/fs/cgroup).
    nsenter --net="/run/netns/$node" --uts="$(uts_file "$node")" slurmd -f "$CONF" -N "$node"
}

# Keys and configs for ssh between the nodes (and from the host): one host key shared by the nodes, one
# client key for root, accepted only by the nodes' sshds; nothing of root's own ~/.ssh is touched.
write_ssh_config() {
    mkdir -p "$SSH_DIR" /run/sshd "$(dirname "$SSH_CLIENT_CONF")"
    chmod 700 "$SSH_DIR"
    [[ -s $SSH_DIR/host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N "" -C minigpt-2node-host -f "$SSH_DIR/host_ed25519_key"
    [[ -s $SSH_DIR/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -C minigpt-2node-root -f "$SSH_DIR/id_ed25519"
    cp "$SSH_DIR/id_ed25519.pub" "$SSH_DIR/authorized_keys"
    local node hosts="" known=""
    for node in "${NODES[@]}"; do
        hosts+=" $node $(node_addr "$node")"
        known+="$node,$(node_addr "$node") $(cut -d" " -f1-2 "$SSH_DIR/host_ed25519_key.pub")"$'\n'
        cat >"$SSH_DIR/sshd_config.$node" <<EOF
$MARKER
ListenAddress $(node_addr "$node"):22
HostKey $SSH_DIR/host_ed25519_key
PidFile $RUN_DIR/sshd-$node.pid
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile $SSH_DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
EOF
    done
    printf "%s" "$known" >"$SSH_DIR/known_hosts"
    cat >"$SSH_CLIENT_CONF" <<EOF
$MARKER
Host${hosts}
    User root
    IdentityFile $SSH_DIR/id_ed25519
    IdentitiesOnly yes
    UserKnownHostsFile $SSH_DIR/known_hosts
    StrictHostKeyChecking yes
    BatchMode yes
    ConnectTimeout 5
EOF
}

start_sshd() {
    local node=$1
    pid_alive "$RUN_DIR/sshd-$node.pid" && return 0
    nsenter --net="/run/netns/$node" --uts="$(uts_file "$node")" \
        "$(command -v sshd || echo /usr/sbin/sshd)" -f "$SSH_DIR/sshd_config.$node" -E "$LOG_DIR/sshd-$node.log"
}

# Both nodes answer ssh (from the host, by name): what DeepSpeed's launcher checks before it starts.
wait_for_ssh() {
    local _ node ok
    for _ in $(seq 40); do
        ok=0
        for node in "${NODES[@]}"; do
            [[ $(ssh "$node" hostname 2>/dev/null) == "$node" ]] && ok=$((ok + 1))
        done
        (( ok == ${#NODES[@]} )) && return 0
        sleep 0.25
    done
    log "ssh to the nodes does not work; see $LOG_DIR/sshd-*.log"; exit 1
}

wait_until_idle() {
    local _ states node state
    for _ in $(seq 120); do
        states=""
        for node in "${NODES[@]}"; do
            state=$(SLURM_CONF=$CONF sinfo -h -n "$node" -o %T 2>/dev/null || true)
            case $state in
                drain*|down*) SLURM_CONF=$CONF scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;;
            esac
            states+="$node=${state:-?} "
        done
        if [[ $(grep -oE "=(idle|mixed|allocated)" <<<"$states" | wc -l) -eq ${#NODES[@]} ]]; then
            log "cluster up: $states"; return 0
        fi
        sleep 0.5
    done
    log "nodes not idle after 60 s ($states); see $LOG_DIR/"; exit 1
}

start() {
    mkdir -p "$RUN_DIR" "$LOG_DIR"
    check_possible
    install_packages sshd:openssh-server pdsh:pdsh
    if status >/dev/null 2>&1 && cmp -s <(write_config_text) "$CONF"; then log "already running: $(status)"; return 0; fi
    write_config
    if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
        start_munge
        touch "$RUN_DIR/munged.started"
    fi
    set_hosts_entries
    start_bridge
    local node
    for node in "${NODES[@]}"; do start_namespace "$node"; done
    pid_alive "$RUN_DIR/slurmctld.pid" || slurmctld -f "$CONF"
    for node in "${NODES[@]}"; do start_slurmd "$node"; done
    write_ssh_config
    for node in "${NODES[@]}"; do start_sshd "$node"; done
    wait_for_ssh
    wait_until_idle
}

# The config `write_config` would write, for the idempotency check.
write_config_text() {
    local saved=$CONF tmp
    tmp=$(mktemp -d)
    CONF=$tmp/slurm.conf CONF_DIR=$tmp write_config
    cat "$tmp/slurm.conf"
    rm -r "$tmp"
    CONF=$saved
}

kill_pidfile() {
    local file=$1 name=$2 _
    pid_alive "$file" || return 0
    local pid
    pid=$(cat "$file")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || { log "stopped $name"; return 0; }; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    log "killed $name (did not stop on TERM)"
}

# SIGKILL every process living in NODE's network namespace (slurmd, slurmstepd, job processes).
kill_namespace_processes() {
    local node=$1 pids
    [[ -e /run/netns/$node ]] || return 0
    pids=$(ip netns pids "$node" 2>/dev/null || true)
    [[ -n $pids ]] && kill -9 $pids 2>/dev/null || true
}

kill_node() {
    local node=$1
    node_addr "$node" >/dev/null
    ip link set "$(host_veth "$node")" down
    kill_namespace_processes "$node"
    rm -f "$RUN_DIR/slurmd-$node.pid" "$RUN_DIR/sshd-$node.pid"
    log "node $node lost: link down, its processes killed"
}

revive_node() {
    local node=$1
    node_addr "$node" >/dev/null
    start_namespace "$node"
    start_slurmd "$node"
    start_sshd "$node"
    log "node $node back: link up, slurmd and sshd started"
}

stop() {
    local node
    for node in "${NODES[@]}"; do
        kill_pidfile "$RUN_DIR/slurmd-$node.pid" "slurmd $node"
        kill_pidfile "$RUN_DIR/sshd-$node.pid" "sshd $node"
    done
    kill_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
    for node in "${NODES[@]}"; do
        kill_namespace_processes "$node"
        ip link del "$(host_veth "$node")" 2>/dev/null || true
        [[ -e /run/netns/$node ]] && ip netns del "$node"
        if mountpoint -q "$(uts_file "$node")" 2>/dev/null; then umount "$(uts_file "$node")"; fi
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    remove_hosts_entries
    if [[ -e $SSH_CLIENT_CONF ]] && grep -qF "$MARKER" "$SSH_CLIENT_CONF"; then rm -f "$SSH_CLIENT_CONF"; fi
    if [[ -e $RUN_DIR/munged.started ]] && ! pid_alive "$ONE_NODE_RUN_DIR/slurmctld.pid"; then
        [[ -s /run/munge/munged.pid ]] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null && log "stopped munged"
    fi
    rm -rf "$RUN_DIR" "$SPOOL_DIR" "$CONF_DIR"
    log "stopped; namespaces, veths, bridge, /etc/hosts entries, config and state removed"
}

status() {
    [[ -s $CONF ]] && pid_alive "$RUN_DIR/slurmctld.pid" || return 1
    local node
    for node in "${NODES[@]}"; do
        pid_alive "$RUN_DIR/slurmd-$node.pid" && pid_alive "$RUN_DIR/sshd-$node.pid" || return 1
        SLURM_CONF=$CONF sinfo -h -n "$node" -o %T 2>/dev/null | grep -Eq "idle|mixed|allocated" || return 1
    done
    SLURM_CONF=$CONF sinfo -h -N -o "%N %T" | tr '\n' ' '
}

main_two_node() {
    local action=${1:-start}
    [[ $action == status ]] || require_root
    case $action in
        start) start ;;
        stop) stop ;;
        status) status ;;
        kill-node) [[ $# -eq 2 ]] || { echo "usage: $0 kill-node NODE" >&2; exit 2; }; kill_node "$2" ;;
        revive-node) [[ $# -eq 2 ]] || { echo "usage: $0 revive-node NODE" >&2; exit 2; }; revive_node "$2" ;;
        *) echo "usage: $0 [start|stop|status|kill-node NODE|revive-node NODE]" >&2; exit 2 ;;
    esac
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then main_two_node "$@"; fi
