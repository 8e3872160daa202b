"""The operator's view of the host (``nspawn-mcp list``, ``destroy``, ``logs``, ``box shell``).

Pure: the table ``list`` prints, and the ``journalctl`` and ``nsenter`` command lines that
``logs`` and ``box shell`` run. The requests themselves go to the daemon
(:mod:`nspawn_mcp.daemon.operator`), which admits them from root only.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from .naming import service_unit, slice_unit
from .records import LiveSandbox

__all__ = [
    "COLUMNS",
    "box_shell_command",
    "format_bytes",
    "format_cpu",
    "format_duration",
    "format_json",
    "format_table",
    "journal_command",
]

COLUMNS = ("ID", "OWNER", "POLICY", "IMAGE", "AGE", "EXPIRES IN", "MEMORY", "CPU", "TASKS")
_UNKNOWN = "-"


def format_duration(seconds: float) -> str:
    """A span of time in its largest two units: ``45s``, ``3m07s``, ``2h05m``, ``3d04h``;
    ``expired`` for a negative one."""
    if seconds < 0:
        return "expired"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_bytes(count: int | None) -> str:
    """IEC units, as policies write them: ``512B``, ``3.2MiB``, ``1.5GiB``; ``-`` when unknown."""
    if count is None:
        return _UNKNOWN
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count}B" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_cpu(nanoseconds: int | None) -> str:
    """CPU time used: ``0.42s``, ``1m05s``; ``-`` when unknown."""
    if nanoseconds is None:
        return _UNKNOWN
    seconds = nanoseconds / 1e9
    return f"{seconds:.2f}s" if seconds < 60 else format_duration(seconds)


def _row(sandbox: LiveSandbox, now: datetime) -> tuple[str, ...]:
    if sandbox.pooled:
        owner = "(warm pool)"
    else:
        owner = sandbox.owner if sandbox.connected else f"{sandbox.owner} (detached)"
    return (
        sandbox.sandbox_id,
        owner,
        sandbox.policy,
        sandbox.image,
        format_duration((now - sandbox.created_at).total_seconds()),
        format_duration((sandbox.expires_at - now).total_seconds()),
        format_bytes(sandbox.memory_bytes),
        format_cpu(sandbox.cpu_nsec),
        _UNKNOWN if sandbox.tasks is None else str(sandbox.tasks),
    )


def format_table(sandboxes: Sequence[LiveSandbox], now: datetime) -> str:
    """The live sandboxes as aligned columns under a header; a sentence when there are none."""
    if not sandboxes:
        return "no live sandboxes"
    rows = [COLUMNS, *(_row(sandbox, now) for sandbox in sandboxes)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def format_json(sandboxes: Sequence[LiveSandbox]) -> str:
    """The live sandboxes as a JSON array (times in ISO 8601), for scripts."""
    rows = [
        asdict(sandbox)
        | {"created_at": sandbox.created_at.isoformat(), "expires_at": sandbox.expires_at.isoformat()}
        for sandbox in sandboxes
    ]
    return json.dumps(rows, indent=2)


def journal_command(
    sandbox_id: str, journal_dir: Path | None, *, follow: bool = False, lines: int | None = None
) -> list[str]:
    """``journalctl`` for one sandbox's story: what the daemon logged about it (its
    ``NSPAWN_MCP_SANDBOX`` field), the output of its nspawn service (nspawn's own messages; the
    sandbox's commands' output is not logged), and systemd's messages about its units (started,
    stopped, the result). ``journal_dir``: the private systemd's journal, where it is the one in use."""
    command = ["journalctl", "--no-pager", "--output=short-iso"]
    if journal_dir is not None:
        command.append(f"--directory={journal_dir}")
    if follow:
        command.append("--follow")
    if lines is not None:
        command.append(f"--lines={lines}")
    service, slice_name = service_unit(sandbox_id), slice_unit(sandbox_id)
    matches = [
        f"NSPAWN_MCP_SANDBOX={sandbox_id}",
        f"_SYSTEMD_UNIT={service}",
        f"UNIT={service}",
        f"UNIT={slice_name}",
    ]
    for index, match in enumerate(matches):
        command += [match] if index == 0 else ["+", match]
    return command


def box_shell_command(box_pid: int, command: Sequence[str]) -> list[str]:
    """``nsenter`` into the private systemd's namespaces (mount and pid: its ``/run`` with its bus,
    journal and machined), where ``machinectl`` and ``journalctl`` work as on a systemd host."""
    return ["nsenter", f"--target={box_pid}", "--mount", "--pid", "--", *command]
