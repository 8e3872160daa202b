"""Reading the counters systemd's cgroups keep for a sandbox's slice (host side, read only)."""

from __future__ import annotations

from pathlib import Path

from ..naming import PARENT_SLICE, slice_unit

__all__ = ["cpu_usage_nsec", "oom_kill_count", "parse_oom_kill"]

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


def _usage_usec(text: str) -> int | None:
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    return None


def cpu_usage_nsec(sandbox_id: str, root: Path = _ROOT) -> int | None:
    """CPU time used by everything in the sandbox's slice, in ns; None if unknown.

    systemd's ``CPUUsageNSec`` of a slice is unknown on a cgroup v1 (or hybrid) host even with
    ``CPUAccounting=yes``; the kernel counts it anyway: cgroup v2's ``cpu.stat`` (``usage_usec``,
    also in a hybrid host's ``unified`` tree), or v1's ``cpuacct.usage``.
    """
    relative = Path(PARENT_SLICE) / slice_unit(sandbox_id)
    for stat in (root / relative / "cpu.stat", root / "unified" / relative / "cpu.stat"):
        try:
            usec = _usage_usec(stat.read_text())
        except (OSError, ValueError):
            continue
        if usec is not None:
            return usec * 1000
    for hierarchy in ("cpuacct", "cpu,cpuacct"):
        try:
            return int((root / hierarchy / relative / "cpuacct.usage").read_text())
        except (OSError, ValueError):
            continue
    return None
