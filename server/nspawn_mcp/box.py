"""A private systemd + dbus + machined for hosts whose PID 1 is not systemd.

The box is ``/lib/systemd/systemd --system`` as PID 1 of new pid and mount
namespaces (``unshare``). Two traps, both avoided here:

- booted on the shared root filesystem, its tmpfiles would clean the host's
  ``/tmp``: the box gets fresh tmpfs mounts on ``/tmp``, ``/var/tmp`` and ``/run``
  before systemd starts, and units that would touch host-global state
  (sysctl, binfmt, sysusers, kernel modules, ...) are masked in its ``/run``;
- two boxes would share the (v1) cgroup tree: there is at most one per host,
  found through a pid file under a lock.

The sandbox pool (a btrfs loop file) is mounted on ``/var/lib/machines`` inside the
box's mount namespace only, so the host's view is untouched and the mount goes
away with the box. Processes on the host reach the box's bus through
``/proc/PID/root``.

The first process of the box's pid namespace forks an *anchor* before it leaves the
host's mount namespace: a sleeping process that keeps that namespace reachable from
inside the box (``/proc/ANCHOR/ns/mnt``, its pid in :data:`HOST_ANCHOR_FILE`). The
nspawn-mcp daemon, a unit of the box, joins it, so host paths mean to the daemon what
they mean to its clients. The anchor dies with the box.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .layout import Layout

__all__ = [
    "HOST_ANCHOR_FILE",
    "Box",
    "BoxError",
    "find_box",
    "host_runs_systemd",
    "start_box",
    "stop_box",
    "system_bus_address",
]

HOST_ANCHOR_FILE = "/run/nspawn-mcp-host-anchor"
"""Inside the box: the pid (in the box) of the process that holds the host's mount namespace."""

_MASKED_UNITS = (
    "systemd-sysusers.service",
    "systemd-firstboot.service",
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-modules-load.service",
    "systemd-random-seed.service",
    "systemd-machine-id-commit.service",
    "systemd-update-utmp.service",
    "systemd-journal-flush.service",
    "systemd-repart.service",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-kernel-config.mount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "sys-fs-fuse-connections.mount",
    "kmod-static-nodes.service",
    "systemd-tmpfiles-clean.timer",
)

# PID 1 of the new pid namespace, still in the host's mount namespace: fork the anchor, then
# become the box (a mount namespace of its own, then systemd)
_OUTER_SCRIPT = """boot="$1"; shift
sleep infinity </dev/null >/dev/null 2>&1 &
exec unshare --mount --propagation private sh -c "$boot" nspawn-mcp-box "$@" "$!"
"""

_BOOT_SCRIPT = """set -eu
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /var/tmp
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs /run
mkdir -p /run/systemd/system "$2"
for unit in $3; do ln -s /dev/null "/run/systemd/system/$unit"; done
# every sandbox's nspawn holds a connection to the bus as root: the system bus's default of 256
# connections per user would stop at about 250 sandboxes (and 128 replies pending per connection
# at about as many calls at once)
mkdir -p /run/systemd/system/dbus.service.d
cat >/run/nspawn-mcp-dbus.conf <<'END'
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <include>/usr/share/dbus-1/system.conf</include>
  <limit name="max_connections_per_user">16384</limit>
  <limit name="max_completed_connections">16384</limit>
  <limit name="max_replies_per_connection">16384</limit>
</busconfig>
END
cat >/run/systemd/system/dbus.service.d/nspawn-mcp.conf <<'END'
[Service]
ExecStart=
ExecStart=/usr/bin/dbus-daemon --config-file=/run/nspawn-mcp-dbus.conf --address=systemd: \\
  --nofork --nopidfile --systemd-activation --syslog-only
LimitNOFILE=65536
END
echo "$5" >"$4"
if [ -f "$1" ]; then mount -o loop,nodiscard "$1" "$2"; fi
exec /lib/systemd/systemd --system --unit=basic.target
"""

_START_TIMEOUT = 60.0


class BoxError(RuntimeError):
    """The private systemd could not be started or found."""


@dataclass(frozen=True)
class Box:
    pid: int
    """Host PID of the box's systemd."""

    @property
    def bus_address(self) -> str:
        return f"unix:path={self.bus_socket}"

    @property
    def bus_socket(self) -> Path:
        return Path(f"/proc/{self.pid}/root/run/dbus/system_bus_socket")


def host_runs_systemd() -> bool:
    """sd_booted(): true when PID 1 of this namespace is systemd."""
    return Path("/run/systemd/system").is_dir()


def system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/run/dbus/system_bus_socket")


def _pid_file(layout: Layout) -> Path:
    return layout.box_dir / "pid"


def _is_box_systemd(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and cmdline[0].endswith(b"systemd") and b"--system" in cmdline


def find_box(layout: Layout) -> Box | None:
    try:
        pid = int(_pid_file(layout).read_text().strip())
    except (OSError, ValueError):
        return None
    return Box(pid) if _is_box_systemd(pid) else None


@contextlib.contextmanager
def _locked(layout: Layout) -> Iterator[None]:
    layout.box_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(layout.box_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _child_pid(parent: int, deadline: float) -> int:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    while time.monotonic() < deadline:
        try:
            text = children.read_text().split()
        except OSError:
            raise BoxError("the box's unshare process exited early; see box.log") from None
        if text and _is_box_systemd(int(text[0])):
            return int(text[0])
        time.sleep(0.01)
    raise BoxError("the box's systemd did not start in time; see box.log")


def _wait_for_bus(box: Box, deadline: float) -> None:
    while time.monotonic() < deadline:
        if box.bus_socket.exists():
            return
        if not _is_box_systemd(box.pid):
            raise BoxError("the box's systemd exited while starting; see box.log")
        time.sleep(0.01)
    raise BoxError("the box's system bus did not appear in time; see box.log")


def _unshare_argv(layout: Layout) -> list[str]:
    return [
        "unshare",
        "--pid",
        "--fork",
        "sh",
        "-c",
        _OUTER_SCRIPT,
        "nspawn-mcp-box-init",
        _BOOT_SCRIPT,
        str(layout.pool_image),
        str(layout.machines_dir),
        " ".join(_MASKED_UNITS),
        HOST_ANCHOR_FILE,  # $5, the anchor's pid, is appended by the outer script
    ]


def start_box(layout: Layout) -> Box:
    """Find the running box or start one; returns once its bus socket exists."""
    with _locked(layout):
        box = find_box(layout)
        if box is not None:
            return box
        # A short-lived shell starts unshare in the background and reports its
        # pid, so the box is nobody's child here and outlives this process.
        launcher = subprocess.run(
            [
                "sh",
                "-c",
                '"$@" </dev/null >>"$0" 2>&1 & echo $!',
                str(layout.box_dir / "box.log"),
                *_unshare_argv(layout),
            ],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
            start_new_session=True,
        )
        unshare_pid = int(launcher.stdout.strip())
        deadline = time.monotonic() + _START_TIMEOUT
        box = Box(_child_pid(unshare_pid, deadline))
        _pid_file(layout).write_text(f"{box.pid}\n")
        _wait_for_bus(box, deadline)
        return box


def stop_box(layout: Layout, timeout: float = 10.0) -> bool:
    """Kill the box (its whole pid namespace goes with it). Returns whether one ran."""
    with _locked(layout):
        box = find_box(layout)
        _pid_file(layout).unlink(missing_ok=True)
        if box is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.kill(box.pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and Path(f"/proc/{box.pid}").exists():
            time.sleep(0.01)
        layout.daemon_socket.unlink(missing_ok=True)  # the daemon, a unit of the box, died with it
        _remove_empty_cgroups(Path("/sys/fs/cgroup"))
        return True


_BOX_CGROUPS = ("nspawnmcp.slice", "machine.slice", "system.slice", "user.slice", "init.scope")


def _remove_empty_cgroups(mount: Path) -> None:
    """Remove the (now empty) cgroups the box's systemd made at the top of each hierarchy.

    rmdir only succeeds on a cgroup with no processes and no children, so a
    cgroup anybody still uses is left alone.
    """
    hierarchies = (
        [mount] if (mount / "cgroup.controllers").exists() else [p for p in mount.iterdir() if p.is_dir()]
    )
    for hierarchy in hierarchies:
        for name in _BOX_CGROUPS:
            top = hierarchy / name
            if not top.is_dir() or top.is_symlink():
                continue
            for directory in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            with contextlib.suppress(OSError):
                top.rmdir()
