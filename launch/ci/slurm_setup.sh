#!/usr/bin/env bash
# Bring up a real Slurm cluster on this machine for the launcher tests (Debian, run as root, no systemd).
#
# Default: a multi-host cluster in network namespaces. slurmctld runs in the namespace aa-ctl and one slurmd
# in each of aa-node0..aa-node2, every namespace with its own host name (a UTS namespace) and its own private
# address on a bridge that this script creates (10.213.0.0/24; the host side of the bridge is 10.213.0.254,
# so that sbatch and scontrol work from the root namespace). Nothing listens on any other address: each
# daemon binds inside its own namespace. The host names are added to /etc/hosts, so a job's node names
# resolve on every node and from here. --one-node (or a kernel that refuses network namespaces) gives the
# old one-node cluster on localhost instead.
#
# Installs slurm-wlm and munge with apt-get if they are missing, writes /etc/slurm/slurm.conf sized from this
# machine, starts munged, slurmctld and the slurmds (each only if not already running; a changed layout
# restarts them), and waits until every node is idle. Idempotent.
# Stop everything (daemons, namespaces, bridge, /etc/hosts lines) with: launch/ci/slurm_setup.sh --stop
# Facts, timings and traps: shared/research/slurm_local.md; the namespace layout: docs/launch.md.
set -euo pipefail

NET=10.213.0               # a /24 that the test machines do not use
BRIDGE=aa-slurm0
HOSTS_TAG="# alphaalign-slurm-cluster"  # marks the lines this script adds to /etc/hosts
NODES=(aa-node0 aa-node1 aa-node2)  # servers on one, a trainer rank on each of two others
CONTROLLER=aa-ctl

addr_of() {  # the namespace's address: the controller .1, node i .(10 + i)
    if [[ $1 == "$CONTROLLER" ]]; then echo "$NET.1"; else echo "$NET.$((10 + ${1#aa-node}))"; fi
}

alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }  # a daemon's pid file names a live process

stop_slurm() {
    local pidfile
    for pidfile in /run/slurmd.pid /run/slurmd-*.pid /run/slurmctld.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    for pidfile in /run/slurmd.pid /run/slurmd-*.pid /run/slurmctld.pid; do
        for _ in $(seq 50); do alive "$pidfile" || break; sleep 0.1; done
        rm -f "$pidfile"
    done
}

remove_network() {
    local ns
    for ns in "$CONTROLLER" "${NODES[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
    ip link del "$BRIDGE" 2>/dev/null || true
    drop_hosts_lines
}

drop_hosts_lines() {  # rewritten in place: /etc/hosts may be a bind mount that cannot be renamed over
    local kept
    kept=$(grep -v -- "$HOSTS_TAG\$" /etc/hosts || true)
    printf '%s\n' "$kept" > /etc/hosts
}

if [[ "${1:-}" == "--stop" ]]; then
    stop_slurm
    [[ -s /run/munge/munged.pid ]] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    remove_network
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then exec sudo -n bash "$0" "$@"; fi
    echo "slurm_setup.sh: needs root or passwordless sudo (it installs packages and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi

# ---- the network: a bridge on the host, one namespace per Slurm host, a veth pair from each to the bridge
make_network() {
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge || return 1
    ip addr replace "$NET.254/24" dev "$BRIDGE" && ip link set "$BRIDGE" up || return 1
    local ns veth
    for ns in "$CONTROLLER" "${NODES[@]}"; do
        veth="v-$ns"  # the host side; the namespace side is eth0 in the namespace
        [[ -e /run/netns/$ns ]] || ip netns add "$ns" || return 1
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip link add "$veth" type veth peer name eth0 netns "$ns" || return 1
        fi
        ip link set "$veth" master "$BRIDGE" up || return 1
        ip -n "$ns" link set lo up && ip -n "$ns" link set eth0 up || return 1
        ip -n "$ns" addr replace "$(addr_of "$ns")/24" dev eth0 || return 1
    done
    drop_hosts_lines
    for ns in "$CONTROLLER" "${NODES[@]}"; do echo "$(addr_of "$ns") $ns $HOSTS_TAG" >> /etc/hosts; done
}

multi_node=1
if [[ "${1:-}" == "--one-node" ]]; then
    multi_node=0
    remove_network
elif ! make_network; then
    echo "slurm_setup.sh: this kernel refused network namespaces or veth links; one node on localhost instead" >&2
    multi_node=0
    remove_network
fi

# in_host NS CMD...: run CMD in the network namespace NS under its own host name (slurmctld checks that it
# runs on SlurmctldHost; torchrun's rendezvous host and gloo find their address from the host name). nsenter,
# not `ip netns exec`: that remounts /sys, which hides the cgroup file system slurmd needs.
in_host() {
    local ns=$1; shift
    nsenter --net="/run/netns/$ns" unshare --uts -- sh -c 'hostname "$0" && exec "$@"' "$ns" "$@"
}

# ---- munge: the key exists after install; nothing creates its socket folder without systemd. Its socket is
# a file, so the daemons in every namespace reach the one munged.
mkdir -p /run/munge && chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
alive /run/munge/munged.pid || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# ---- slurm.conf for this machine. Every node gets all the machine's CPUs (they share them) and an equal
# share of ~90% of its memory, half a CPU's share per CPU by default.
cpus=$(nproc)
memory_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
if ((multi_node)); then
    node_memory=$((memory_mb / ${#NODES[@]}))
    controller="$CONTROLLER($(addr_of "$CONTROLLER"))"
    node_lines=""
    for node in "${NODES[@]}"; do
        node_lines+="NodeName=$node NodeAddr=$(addr_of "$node") CPUs=$cpus RealMemory=$node_memory State=UNKNOWN"$'\n'
    done
    partition_nodes=$(IFS=,; echo "${NODES[*]}")
    what="${#NODES[@]} nodes in network namespaces ($partition_nodes), slurmctld in $CONTROLLER"
else
    node_memory=$memory_mb
    controller=localhost
    node_lines="NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN"$'\n'
    partition_nodes=localhost
    what="one node (localhost)"
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf.new <<CONF
# Written by launch/ci/slurm_setup.sh: $what; everything runs as root.
ClusterName=localcluster
SlurmctldHost=$controller
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((node_memory / cpus / 2))
EnforcePartLimits=ALL
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
${node_lines}PartitionName=debug Nodes=$partition_nodes Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    stop_slurm  # another layout (or an older version of this script) may be running
    mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
else
    rm /etc/slurm/slurm.conf.new
fi

# ---- daemons. A fresh slurmctld drops the jobs saved by a slurmctld that died (-c): they would show as
# running forever and hold the nodes.
if ((multi_node)); then
    alive /run/slurmctld.pid || in_host "$CONTROLLER" /usr/sbin/slurmctld -c
    for node in "${NODES[@]}"; do
        mkdir -p "/var/spool/slurmd/$node"
        alive "/run/slurmd-$node.pid" || in_host "$node" /usr/sbin/slurmd -N "$node"
    done
else
    alive /run/slurmctld.pid || /usr/sbin/slurmctld -c
    mkdir -p /var/spool/slurmd/localhost
    alive /run/slurmd-localhost.pid || /usr/sbin/slurmd -N localhost
fi

wanted=$(wc -w <<< "${partition_nodes//,/ }")
for _ in $(seq 150); do
    up=$(sinfo -h -N -o %T 2>/dev/null | grep -cE '^(idle|mixed|allocated)$' || true)
    if ((up == wanted)); then
        echo "slurm is up: $what; $cpus CPUs and ${node_memory} MB per node"
        exit 0
    fi
    sleep 0.2
done
echo "slurm_setup.sh: not every node became idle within 30 s; see /var/log/slurm/ and sinfo -N" >&2
exit 1
