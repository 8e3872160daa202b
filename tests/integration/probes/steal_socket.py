"""Run inside a sandbox as root: try to take the supervisor's listening socket; print one JSON object.

``supervisor``: pidfd_getfd on each socket of PID 2 (the supervisor); ``stub init``: on PID 1.
``own child``: the same call on a child of our own. ``sockets seen``: how many sockets of the
supervisor the probe saw (the control: it aimed at real ones).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import time

libc = ctypes.CDLL(None, use_errno=True)
SYS_PIDFD_OPEN, SYS_PIDFD_GETFD = 434, 438  # the same on x86_64 and aarch64


def steal(pid: int, fd: int) -> str:
    pidfd = libc.syscall(SYS_PIDFD_OPEN, pid, 0)
    if pidfd < 0:
        return errno.errorcode.get(ctypes.get_errno(), "E?")
    stolen = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    code = ctypes.get_errno()
    os.close(pidfd)
    if stolen < 0:
        return errno.errorcode.get(code, "E?")
    os.close(stolen)
    return "taken"


def sockets_of(pid: int) -> list[int]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return [3]  # unlistable: try the number the supervisor's listener has
    return [int(n) for n in names if os.readlink(f"/proc/{pid}/fd/{n}").startswith("socket:")]


targets = sockets_of(2)
results: dict[str, object] = {
    "supervisor": sorted({steal(2, fd) for fd in targets}),
    "stub init": steal(1, 0),
    "sockets seen": len(targets),
}
parent, child_end = socket.socketpair()
child = os.fork()
if child == 0:
    time.sleep(5)
    os._exit(0)
results["own child"] = steal(child, child_end.fileno())
os.kill(child, 9)
print(json.dumps(results))
