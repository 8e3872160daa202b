"""The daemon as a systemd unit: ``nspawn-mcp.service``, started on demand by the front ends.

On a systemd host an installed unit file (``nspawn-mcp.service``, shipped in
``examples/systemd/``) is started if there is one; otherwise, and always where PID 1 is
not systemd (in the project's private systemd), the same unit is made transient. Either
way systemd supervises the daemon (``Restart=on-failure``) and journald keeps its log.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from ..backend.bus import Bus
from ..backend.systemd1 import Systemd, UnitStatus
from ..box import HOST_ANCHOR_FILE
from ..errors import BackendError, NoSuchObject
from ..layout import Layout
from ..runtime import Daemons, find_daemons
from .main import REFUSED, SYSTEMD_ROOT_ENV

__all__ = ["DAEMON_UNIT", "DaemonOptions", "daemon_status", "start_daemon", "stop_daemon", "unit_properties"]

DAEMON_UNIT = "nspawn-mcp.service"
_USEC = 1_000_000
_IN_HAND = frozenset({"active", "activating", "reloading", "deactivating"})
"""Unit states in which systemd has the daemon in hand: running it, starting or restarting it, or
cleaning up after it (a daemon that died is "deactivating" until its last process is gone, then
restarted). Only a "failed" or absent unit is the front end's to start."""
_PASSED_ENVIRONMENT = (
    "NSPAWN_MCP_STATE_DIR",
    "NSPAWN_MCP_RUNTIME_DIR",
    "NSPAWN_MCP_BUS_ADDRESS",
    "PYTHONPATH",
)
"""What a front end that starts the daemon hands on to it. ``PYTHONPATH``: the daemon runs the code
the front end runs (a checkout under test, not only what is installed in the virtualenv)."""


@dataclass(frozen=True)
class DaemonOptions:
    """The command-line options the daemon is started with (``nspawn-mcp daemon run ...``)."""

    arguments: tuple[str, ...] = ()


@dataclass(frozen=True)
class BoxPlacement:
    """Where the daemon's unit runs when it is a unit of the private systemd."""

    box_pid: int
    """The box's systemd, as the host numbers it."""
    anchor_pid: int
    """The box's anchor (in the host's mount namespace), as the box numbers it."""
    nsenter: str = "/usr/bin/nsenter"


def unit_properties(
    options: DaemonOptions, *, python: str, environment: Mapping[str, str], box: BoxPlacement | None
) -> dict[str, object]:
    """The transient unit of the daemon (pure).

    In the box, the unit's command first enters the host's mount namespace (the box's own
    has a fresh ``/tmp``, where the daemon's Python may live), then runs the daemon."""
    env = dict(environment)
    argv = [python, "-m", "nspawn_mcp", "daemon", "run", *options.arguments]
    command = (python, argv)
    if box is not None:
        env[SYSTEMD_ROOT_ENV] = f"/proc/{box.box_pid}/root"
        command = (box.nsenter, ["nsenter", f"--mount=/proc/{box.anchor_pid}/ns/mnt", "--", *argv])
    return {
        "Description": "nspawn-mcp: disposable sandboxes for AI agents",
        "ExecStart": [(command[0], command[1], False)],
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartUSec": _USEC // 2,
        # however often it dies: systemd's default start limit (5 in 10 s) would leave it dead, and
        # its sandboxes unserved, until a stdio front end happened to start it again; but not when
        # it refused to start, which it would do again every half second
        "StartLimitIntervalUSec": 0,
        "RestartPreventExitStatus": ([REFUSED], []),
        "TimeoutStartUSec": 90 * _USEC,
        "TimeoutStopUSec": 15 * _USEC,
        "KillMode": "mixed",
        "CollectMode": "inactive-or-failed",
        "Environment": [f"{key}={value}" for key, value in sorted(env.items())],
        "StandardOutput": "journal",
        "StandardError": "journal",
        "SyslogIdentifier": "nspawn-mcp",
    }


@asynccontextmanager
async def _systemd(layout: Layout) -> AsyncIterator[tuple[Systemd, Daemons]]:
    daemons = await anyio.to_thread.run_sync(find_daemons, layout)
    bus = await Bus.connect(daemons.bus_address)
    try:
        yield await Systemd.attach(bus), daemons
    finally:
        bus.disconnect()


async def daemon_status(layout: Layout) -> UnitStatus | None:
    async with _systemd(layout) as (systemd, _):
        units = await systemd.list_units([DAEMON_UNIT])
    return units[0] if units else None


async def start_daemon(layout: Layout, options: DaemonOptions) -> None:
    """Start the daemon's unit unless it runs; returns once systemd reports it ready (or failed)."""
    async with _systemd(layout) as (systemd, daemons):
        units = await systemd.list_units([DAEMON_UNIT])
        if units and units[0].active_state in _IN_HAND:
            return
        if not daemons.in_box:
            with contextlib.suppress(NoSuchObject):
                await systemd.start_unit(DAEMON_UNIT)  # the operator installed the unit file
                return
        if units and units[0].active_state == "failed":
            # only then: resetting a unit also clears the failure that its pending restart is for
            await systemd.reset_failed(DAEMON_UNIT)
        environment = {key: os.environ[key] for key in _PASSED_ENVIRONMENT if key in os.environ}
        box = None if daemons.box_pid is None else await anyio.to_thread.run_sync(_placement, daemons.box_pid)
        properties = unit_properties(options, python=sys.executable, environment=environment, box=box)
        try:
            await systemd.start_transient_unit(DAEMON_UNIT, properties, timeout=120)
        except BackendError as exc:
            if "already exists" not in str(exc):  # another front end is starting it: fine
                raise BackendError(
                    f"the nspawn-mcp daemon did not start ({exc}); its log: {journal_hint(daemons)}"
                ) from None


def _placement(box_pid: int) -> BoxPlacement:
    anchor = Path(f"/proc/{box_pid}/root{HOST_ANCHOR_FILE}")
    try:
        anchor_pid = int(anchor.read_text())
    except (OSError, ValueError):
        raise BackendError(
            "the private systemd has no anchor in the host's mount namespace (it was started by an older "
            "version): stop it with `nspawn-mcp box stop` (its sandboxes go with it)"
        ) from None
    nsenter = shutil.which("nsenter") or "/usr/bin/nsenter"
    return BoxPlacement(box_pid=box_pid, anchor_pid=anchor_pid, nsenter=nsenter)


async def stop_daemon(layout: Layout) -> bool:
    """Stop the daemon (its sandboxes keep running; the next daemon adopts them)."""
    async with _systemd(layout) as (systemd, _):
        units = await systemd.list_units([DAEMON_UNIT])
        if not units or units[0].active_state not in _IN_HAND:
            return False
        await systemd.stop_unit(DAEMON_UNIT)
        return True


def journal_hint(daemons: Daemons, extra: Sequence[str] = ()) -> str:
    """The command that shows the daemon's log on this host."""
    if daemons.in_box:
        return f"journalctl --directory={daemons.journal_dir} -u {DAEMON_UNIT} " + " ".join(extra)
    return f"journalctl -u {DAEMON_UNIT} " + " ".join(extra)
