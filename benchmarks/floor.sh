#!/bin/bash
# The raw systemd-nspawn + machined floor, driven from the shell inside the box (or on a systemd host):
# what a sandbox costs with nothing but machined's clone, a transient nspawn unit and nsenter.
# Usage: floor.sh N TEMPLATE PREFIX. Prints one line per round, in microseconds:
#   create (clone + unit ready)  first-exec (from the create's start)  exec  destroy (unit stopped)
# Not a sandbox nspawn-mcp would hand out: nsenter gets neither the seccomp filter nor the cgroup.
set -euo pipefail
n=$1 template=$2 prefix=$3
current=
cleanup() {
    if [ -n "$current" ]; then
        systemctl stop "$current.service" 2>/dev/null || true
        machinectl remove "$current" 2>/dev/null || true
    fi
}
trap cleanup EXIT
for i in $(seq 1 "$n"); do
    m="$prefix-$i"
    current=$m
    t0=${EPOCHREALTIME/./}
    machinectl clone "$template" "$m"
    systemd-run --quiet --unit="$m" --slice=bench-floor.slice -p Type=notify -p Delegate=yes -p KillMode=mixed \
        systemd-nspawn --quiet --keep-unit --register=yes --settings=no --machine="$m" -D "/var/lib/machines/$m" \
        --private-users=pick --private-users-ownership=map --private-network --as-pid2 /bin/sleep infinity
    t1=${EPOCHREALTIME/./}
    leader=$(machinectl show --property=Leader --value "$m")
    nsenter -t "$leader" -a true
    t2=${EPOCHREALTIME/./}
    nsenter -t "$leader" -a true
    t3=${EPOCHREALTIME/./}
    systemctl stop "$m.service"
    t4=${EPOCHREALTIME/./}
    machinectl remove "$m"
    current=
    echo "$((t1 - t0)) $((t2 - t0)) $((t3 - t2)) $((t4 - t3))"
done
