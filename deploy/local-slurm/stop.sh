#!/bin/sh
# Stop the daemons that start.sh started (by the PIDs it recorded), after cancelling
# the jobs of this single-node cluster. Daemons that start.sh found running are kept.
set -eu
STATE=${DFRE_LOCAL_SLURM_STATE:-/var/spool/dfre-local-slurm}
PATH=$PATH:/usr/sbin
[ -f "$STATE/started.pids" ] || exit 0

if grep -q '^slurmctld ' "$STATE/started.pids"; then
    scancel --full --quiet $(squeue -h -o %i 2>/dev/null) 2>/dev/null || true
    for _ in $(seq 150); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.2; done
fi

# Stop in reverse order of starting: slurmd, slurmctld, munged.
tac "$STATE/started.pids" | while read -r name pid; do
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        echo "local-slurm: stopped $name ($pid)"
    fi
done
rm -f "$STATE/started.pids"
