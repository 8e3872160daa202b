"""The exec supervisor: the payload of every sandbox (nspawn ``--as-pid2``).

Why a supervisor inside the jail rather than ``nsenter`` from outside: a process
entered from outside gets the namespaces but not the sandbox's seccomp filter,
capability bounding set or cgroup, and entering the user namespace resets the
bounding set (verified on systemd 252). A child forked by this process inherits
all of them from it, exactly, by construction, and costs no D-Bus round trip.

It runs with the image's own ``python3``, uses only the standard library, and
must stay importable by Python 3.9 and later.

Protocol, over a Unix stream socket in a directory the host binds in: one
connection per command. The client sends one JSON object on one line::

    {"argv": [...], "cwd": "/", "env": {...}, "stdin_b64": "", "timeout": 60.0,
     "max_output": 1048576}

and reads one JSON line back::

    {"exit_code": 0, "signal": null, "stdout_b64": "...", "stderr_b64": "...",
     "stdout_truncated": false, "stderr_truncated": false, "timed_out": false,
     "duration_ms": 3.1}

or ``{"error": "not_found" | "not_executable" | "bad_cwd" | "bad_request", "message": "..."}``.

If the client hangs up while the command runs (a cancelled MCP request), the
command's whole process group is killed. When the command's main process ends,
its process group is killed too, so nothing it started lingers.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from typing import Any

MAX_REQUEST_BYTES = 128 << 20
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
_CHUNK = 65536


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = conn.recv(_CHUNK)
        if not chunk:
            raise ValueError("connection closed before a complete request")
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    line = bytes(buffer[: buffer.index(b"\n")])
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError("request must be a JSON object")
    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise ValueError("argv must be a non-empty list of strings")
    return request


def _spawn_error(exc: OSError, argv0: str, cwd: str) -> dict[str, Any]:
    if isinstance(exc, FileNotFoundError):
        if exc.filename == cwd:
            return {"error": "bad_cwd", "message": f"working directory {cwd} does not exist"}
        return {"error": "not_found", "message": f"command not found: {argv0}"}
    if isinstance(exc, PermissionError):
        return {"error": "not_executable", "message": f"permission denied: {argv0}"}
    if isinstance(exc, NotADirectoryError):
        return {"error": "bad_cwd", "message": f"working directory {cwd} is not a directory"}
    return {"error": "not_executable", "message": f"cannot run {argv0}: {os.strerror(exc.errno or 0)}"}


class _Capture:
    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _run(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    import subprocess

    argv = request["argv"]
    cwd = request.get("cwd") or "/"
    env = dict(BASE_ENV)
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    stdin_data = base64.b64decode(request.get("stdin_b64") or "")
    timeout = float(request.get("timeout") or 60.0)
    limit = int(request.get("max_output") or (1 << 20))

    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        return _spawn_error(exc, argv[0], cwd)

    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None
    captures = {proc.stdout.fileno(): _Capture(limit), proc.stderr.fileno(): _Capture(limit)}
    stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    selector = selectors.DefaultSelector()
    for fd in captures:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pending = memoryview(stdin_data)
    stdin_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(stdin_fd, False)
        selector.register(stdin_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    selector.register(conn.fileno(), selectors.EVENT_READ)

    deadline = started + timeout
    timed_out = False
    open_streams = set(captures)
    exited = False
    while open_streams:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            _killpg(proc.pid)
            break
        for key, _ in selector.select(min(remaining, 0.05 if exited else 1.0)):
            fd = key.fd
            if fd == conn.fileno():
                if conn.recv(_CHUNK):
                    continue  # nothing more is expected; ignore stray bytes
                # The client went away: a cancelled request. Kill the command.
                _killpg(proc.pid)
                proc.wait()
                raise ConnectionAbortedError
            if fd == stdin_fd:
                try:
                    written = os.write(fd, pending[:_CHUNK])
                except BrokenPipeError:
                    written = len(pending)
                pending = pending[written:]
                if not pending:
                    selector.unregister(fd)
                    proc.stdin.close()
                continue
            chunk = os.read(fd, _CHUNK)
            if chunk:
                captures[fd].add(chunk)
            else:
                selector.unregister(fd)
                open_streams.discard(fd)
        if not exited and proc.poll() is not None:
            # The main process is done: whatever it left running goes with it.
            exited = True
            _killpg(proc.pid)
    returncode = proc.wait()
    _killpg(proc.pid)
    selector.close()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if not stream.closed:
            stream.close()
    out, err = captures[stdout_fd], captures[stderr_fd]
    return {
        "exit_code": returncode if returncode >= 0 else None,
        "signal": -returncode if returncode < 0 else None,
        "stdout_b64": base64.b64encode(bytes(out.data)).decode("ascii"),
        "stderr_b64": base64.b64encode(bytes(err.data)).decode("ascii"),
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
        "timed_out": timed_out,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }


def _serve_connection(conn: socket.socket) -> None:
    with conn:
        try:
            request = _read_request(conn)
        except (ValueError, OSError) as exc:
            reply: dict[str, Any] = {"error": "bad_request", "message": str(exc)}
        else:
            try:
                reply = _run(conn, request)
            except ConnectionAbortedError:
                return
            except (ValueError, TypeError, OSError) as exc:
                reply = {"error": "bad_request", "message": str(exc)}
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: supervisor.py SOCKET_PATH", file=sys.stderr)
        return 2
    path = argv[1]
    os.environ.pop("NOTIFY_SOCKET", None)  # not for the commands we run
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # Bind under a temporary name and rename once listening: the socket's
    # appearance at ``path`` is the host's signal that commands are accepted.
    temporary = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(temporary)
    os.chmod(temporary, 0o600)
    server.listen(128)
    os.rename(temporary, path)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
