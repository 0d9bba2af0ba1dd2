#!/bin/sh
# Start a real single-node SLURM (munge + slurmctld + slurmd) on this Debian machine.
#
# For tests and demos of `dfre cluster start --jobqueue slurm`: run as root after
# `apt-get install -y slurm-wlm munge` (.ci/run does both). The daemons this script
# starts have their PIDs recorded in $STATE/started.pids; stop.sh stops exactly those.
# Daemons that are already running are left alone and not recorded. An existing
# /etc/slurm/slurm.conf that this script did not write is never overwritten.
set -eu

STATE=${DFRE_LOCAL_SLURM_STATE:-/var/spool/dfre-local-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by dfre deploy/local-slurm/start.sh"

if [ "$(id -u)" != 0 ]; then
    echo "local-slurm: run as root (it starts munged, slurmctld and slurmd)" >&2
    exit 2
fi
for cmd in munged slurmctld slurmd sbatch sinfo; do
    if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then
        echo "local-slurm: $cmd not found: apt-get install -y slurm-wlm munge" >&2
        exit 2
    fi
done
PATH=$PATH:/usr/sbin

mkdir -p "$STATE" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /etc/slurm
touch "$STATE/started.pids"

alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
pid_of() { [ -f "$1" ] && cat "$1" || true; }

# --- munge: a 1024-byte key owned by munge, munged running as user munge
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge
if ! alive "$(pid_of /run/munge/munged.pid)"; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- munged
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s /run/munge/munged.pid ] && break; sleep 0.2; done
    echo "munged $(cat /run/munge/munged.pid)" >> "$STATE/started.pids"
fi

# --- slurm.conf for this one node
HOST=$(hostname -s 2>/dev/null || uname -n | cut -d. -f1)
CPUS=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS
MEM_MB=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "local-slurm: $CONF exists and was not written by dfre; using it unchanged" >&2
else
    cat > "$CONF" <<CONF
$MARK
ClusterName=dfre-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
MinJobAge=30
DefMemPerCPU=1024
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
fi

# --- daemons
if ! alive "$(pid_of /run/slurmctld.pid)"; then
    rm -f /run/slurmctld.pid
    slurmctld -c  # a fresh cluster: no jobs restored from an earlier run
    for _ in $(seq 50); do [ -s /run/slurmctld.pid ] && break; sleep 0.1; done
    echo "slurmctld $(cat /run/slurmctld.pid)" >> "$STATE/started.pids"
fi
if ! alive "$(pid_of /run/slurmd.pid)"; then
    rm -f /run/slurmd.pid
    slurmd
    for _ in $(seq 50); do [ -s /run/slurmd.pid ] && break; sleep 0.1; done
    echo "slurmd $(cat /run/slurmd.pid)" >> "$STATE/started.pids"
fi

# --- wait until the node takes jobs
for _ in $(seq 150); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -n 1)
    case "$state" in
        idle*|mixed*|allocated*) echo "local-slurm: node $HOST is $state"; exit 0 ;;
        down*|drain*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
done
echo "local-slurm: node $HOST did not become idle; see /var/log/slurm/*.log" >&2
exit 1
