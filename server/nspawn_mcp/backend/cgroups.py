"""Reading the counters systemd's cgroups keep for a sandbox's slice (host side, read only)."""

from __future__ import annotations

import os
from pathlib import Path

from ..naming import PARENT_SLICE, slice_unit

__all__ = ["oom_kill_count", "parse_oom_kill", "parse_process_cpu_ticks", "process_cpu_nsec"]

_ROOT = Path("/sys/fs/cgroup")


def parse_oom_kill(text: str) -> int:
    """``oom_kill N`` from ``memory.events`` (v2) or ``memory.oom_control`` (v1); 0 if absent."""
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def oom_kill_count(sandbox_id: str, root: Path = _ROOT) -> int | None:
    """How often the kernel's OOM killer has struck in the sandbox's slice; None if unknown.

    cgroup v2's ``memory.events`` counts the whole subtree; v1 counts each cgroup on
    its own, so there the slice's subtree is summed.
    """
    relative = Path(PARENT_SLICE) / slice_unit(sandbox_id)
    try:
        if (root / "cgroup.controllers").exists():
            return parse_oom_kill((root / relative / "memory.events").read_text())
        slice_dir = root / "memory" / relative
        if not slice_dir.is_dir():
            return None
        return sum(parse_oom_kill(path.read_text()) for path in slice_dir.rglob("memory.oom_control"))
    except (OSError, ValueError):
        return None


def parse_process_cpu_ticks(stat: str) -> int:
    """utime + stime + cutime + cstime (clock ticks) from ``/proc/PID/stat``: the process's CPU time
    and that of the children it has waited for. The command name may hold spaces and parentheses;
    the fields after its last ``)`` are fixed."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(value) for value in fields[11:15])


def process_cpu_nsec(sandbox_id: str, proc_root: Path, root: Path = _ROOT) -> int | None:
    """CPU time of the processes in the sandbox's slice now, from ``/proc``: where systemd cannot
    account CPU (cgroup v1 without the cpuacct controller, as in the private systemd), the next
    best. PIDs are read from the memory hierarchy's ``cgroup.procs`` (v1) or the unified one, as
    the pid namespace of ``proc_root`` numbers them. None if the slice is not there."""
    relative = Path(PARENT_SLICE) / slice_unit(sandbox_id)
    slice_dir = root / relative if (root / "cgroup.controllers").exists() else root / "memory" / relative
    if not slice_dir.is_dir():
        return None
    ticks = 0
    for procs in slice_dir.rglob("cgroup.procs"):
        try:
            pids = procs.read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                ticks += parse_process_cpu_ticks((proc_root / pid / "stat").read_text())
            except (OSError, ValueError):
                continue  # it exited meanwhile
    return ticks * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
