#!/usr/bin/env bash
# Bring up a real one-node Slurm cluster on localhost for the launcher tests (Debian, run as root, no systemd).
# Installs slurm-wlm and munge with apt-get if they are missing, writes /etc/slurm/slurm.conf sized from this
# machine, starts munged, slurmctld and slurmd (each only if not already running), and waits until the node is
# idle. Idempotent. Stop everything with: launch/ci/slurm_setup.sh --stop
# Facts, timings and traps: shared/research/slurm_local.md (the conf below is the one measured there).
set -euo pipefail

if [[ "${1:-}" == "--stop" ]]; then
    for pidfile in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
        [[ -s $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
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

running() { pgrep -x "$1" -r D,R,S >/dev/null; }  # daemons leave zombies that PID 1 may never reap

# ---- munge: the key exists after install; nothing creates its socket folder without systemd
mkdir -p /run/munge && chown munge:munge /run/munge
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
running munged || runuser -u munge -- /usr/sbin/munged
munge -n | unmunge >/dev/null

# ---- slurm.conf for this machine: all its CPUs, ~90% of its memory, half a CPU's share per CPU by default
cpus=$(nproc)
memory_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.9)}')
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
# Written by launch/ci/slurm_setup.sh: one node (localhost), everything runs as root.
ClusterName=localcluster
SlurmctldHost=localhost
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
DefMemPerCPU=$((memory_mb / cpus / 2))
EnforcePartLimits=ALL
MailProg=/bin/true
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

# ---- daemons. A running slurmctld rereads the conf; a fresh one drops the jobs saved by a slurmctld that
# died (-c): they would show as running forever and hold the node.
if running slurmctld; then scontrol reconfigure; else /usr/sbin/slurmctld -c; fi
running slurmd || /usr/sbin/slurmd

for _ in $(seq 150); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    if [[ $state == idle || $state == mixed || $state == allocated ]]; then
        echo "slurm is up: node localhost $state, $cpus CPUs, ${memory_mb} MB"
        exit 0
    fi
    sleep 0.2
done
echo "slurm_setup.sh: the node did not become idle within 30 s; see /var/log/slurm/" >&2
exit 1
