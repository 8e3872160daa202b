"""The seams between a sandbox and the server, attacked by root inside (issue #7 items 2, 8, 9).

Each denial is paired with a control that proves the probe would have seen the attack work.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.errors import CopyRefused
from nspawn_mcp.layout import Layout
from tests.integration.conftest import Factory, HostView
from tests.integration.test_sandbox_lifecycle import command, run

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBES = Path(__file__).parents[1] / "probes"


async def test_the_control_path_is_nothing_a_sandbox_can_write_or_redirect(
    backend: NspawnBackend, make_sandbox: Factory, layout: Layout
) -> None:
    first, second = await make_sandbox(), await make_sandbox()
    await run(backend, first, "echo first > /root/who")
    await run(backend, second, "echo second > /root/who")
    # what used to redirect the server (a link in place of the socket in a directory bound in)
    # has nowhere to go: no control directory is bound in, and none can be made where it was
    planted = await run(backend, first, "mkdir /run/nspawn-mcp/ctl; ls -A /run/nspawn-mcp")
    assert (planted.exit_code, planted.stdout) == (0, b"lib\n")
    assert b"Permission denied" in planted.stderr
    # each request still reaches its own sandbox; the second answering "second" is the control
    assert (await run(backend, first, "cat /root/who")).stdout == b"first\n"
    assert (await run(backend, second, "cat /root/who")).stdout == b"second\n"
    # on the host, the control socket lives where only the host's root can reach
    directory = layout.sandbox_dir(first)
    assert (directory.stat().st_uid, stat.S_IMODE(directory.stat().st_mode)) == (0, 0o700)
    assert {(entry.name, entry.lstat().st_uid) for entry in directory.iterdir()} <= {
        ("exec.sock", 0),
        ("meta.json", 0),
        ("resolv.conf", 0),
    }


def _mounts(mountinfo: str) -> list[tuple[str, str, str]]:
    """(mount point, filesystem type, per-mount options) of each line of a mountinfo."""
    found = []
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")
        parts = fields.split()
        found.append((parts[4], rest.split()[0], parts[5]))
    return found


async def test_nothing_of_the_hosts_own_filesystem_is_writable_inside(
    backend: NspawnBackend, make_sandbox: Factory, host: HostView
) -> None:
    """Writes land only in the sandbox's own (quota'd) snapshot and its memory-backed mounts."""
    sandbox = await make_sandbox()
    leader = await backend.machined.machine_leader(sandbox)
    host_root_type = next(
        kind for point, kind, _ in _mounts(Path("/proc/self/mountinfo").read_text()) if point == "/"
    )
    inside = _mounts((host.root / "proc" / str(leader) / "mountinfo").read_text())
    from_host = [(point, options) for point, kind, options in inside if kind == host_root_type]
    # the control: the supervisor's code is bound from the host's filesystem, and seen here
    assert ("/run/nspawn-mcp/lib", "ro") in [(point, options.split(",")[0]) for point, options in from_host]
    writable = [point for point, options in from_host if "rw" in options.split(",")]
    assert writable == ["/run/host/os-release"]  # nspawn's copy of the host's os-release, host root's
    attempt = await run(backend, sandbox, "echo x >> /run/host/os-release")
    assert b"Permission denied" in attempt.stderr


STEAL_SOCKET = (PROBES / "steal_socket.py").read_bytes()


async def test_root_inside_cannot_take_the_supervisors_socket(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    """Answering in the supervisor's place needs its listening socket, which only it holds:
    pidfd_getfd is refused in a sandbox (nspawn's seccomp filter), and the socket has no path.

    (Root inside can still ptrace its own supervisor and make it lie: what a lying supervisor
    can do is bounded by the protocol's decoding, tests/unit/test_protocol.py.)
    """
    sandbox = await make_sandbox()
    outcome = await backend.jail(sandbox).run(command("python3", "-", stdin=STEAL_SOCKET))
    stolen = json.loads(outcome.stdout)
    assert stolen.pop("sockets seen") >= 3  # the control: its listener and journal streams were aimed at
    assert stolen == {"supervisor": ["EPERM"], "stub init": "EPERM", "own child": "EPERM"}
    assert await backend.jail(sandbox).list() == []  # and the supervisor still answers


async def _read_all(backend: NspawnBackend, sandbox: str, path: str, limit: int = 1 << 30) -> bytes:
    received = bytearray()

    async def sink(data: bytes) -> None:
        received.extend(data)

    await backend.jail(sandbox).read_file(path, limit, sink)
    return bytes(received)


async def test_copies_out_read_only_what_root_inside_may_read_and_check_before_moving_a_byte(
    backend: NspawnBackend, make_sandbox: Factory
) -> None:
    sandbox = await make_sandbox()
    # the control: what root inside can read comes out whole
    assert (await _read_all(backend, sandbox, "/etc/debian_version")).strip()
    # root inside cannot read the host kernel's secrets, so they do not come out either
    denied = await run(backend, sandbox, "cat /proc/timer_list")
    assert b"Permission denied" in denied.stderr
    with pytest.raises(CopyRefused, match=r"permission denied on /proc/timer_list"):
        await _read_all(backend, sandbox, "/proc/timer_list")
    # type and size as the sandbox sees them, before a byte moves
    await run(backend, sandbox, "truncate -s 3G /root/sparse && mkfifo /root/fifo && ln -s /etc /root/link")
    sent: list[bytes] = []

    async def sink(data: bytes) -> None:
        sent.append(data)

    cases = {
        "/root/sparse": "more than",
        "/root": "directory",
        "/root/fifo": "not a regular file",
        "/root/link": "symbolic link",
        "/proc/1/root/root/sparse": "permission denied",  # nspawn's stub init is not root inside's
    }
    for path, reason in cases.items():
        with anyio.fail_after(10), pytest.raises(CopyRefused, match=reason):
            await backend.jail(sandbox).read_file(path, 1 << 30, sink)
    assert sent == []
    assert os.statvfs("/").f_bfree > 0
