"""The exec supervisor: the payload of every sandbox (nspawn ``--as-pid2``).

Why a supervisor inside the jail rather than ``nsenter`` from outside: a process
entered from outside gets the namespaces but not the sandbox's seccomp filter,
capability bounding set or cgroup, and entering the user namespace resets the
bounding set (verified on systemd 252). A child forked by this process inherits
all of them from it, exactly, by construction, and costs no D-Bus round trip.

It runs with the image's own ``python3``, uses only the standard library, and
must stay importable by Python 3.9 and later.

Every command runs in a cgroup of its own under the supervisor's (cgroup v2,
which nspawn delegates to the container), so "kill the command" means every
process it started, including ones that called ``setsid`` or double-forked. Where
no writable cgroup v2 exists, the command's process group is used instead.

Protocol, over a Unix stream socket in a directory the host binds in: one
connection per request. The client sends one JSON object on one line and reads
JSON lines back; the last line is the reply, earlier ones (only for ``exec`` with
``"stream": true``) are ``{"event": "output", "stdout_b64": ..., "stderr_b64": ...}``.

``{"op": "exec", "argv": [...], "cwd": "/", "env": {}, "user": "root",
"stdin_b64": "", "timeout": 60.0, "max_output": 1048576, "stream": false}``
    Run to completion. Reply: ``exit_code``, ``signal``, ``stdout_b64``,
    ``stderr_b64``, ``stdout_truncated``, ``stderr_truncated``, ``timed_out``,
    ``duration_ms``. Hanging up kills the command.

``{"op": "spawn", ... same fields ..., "timeout": null}``
    Start in the background; output goes to files (bounded by ``max_output``) so
    it outlives any client. Reply: ``{"process_id": "p1"}``.

``{"op": "read", "process_id": "p1", "stdout_offset": 0, "stderr_offset": 0, "max_bytes": N}``
    New output since the offsets, the next offsets, and the process's state.

``{"op": "write", "process_id": "p1", "data_b64": "...", "close": false}``
    Feed stdin (what fits without blocking); ``close`` closes it afterwards.

``{"op": "kill", "process_id": "p1", "signal": 15}`` and ``{"op": "list"}``.

Errors: ``{"error": "not_found" | "not_executable" | "bad_cwd" | "bad_user" |
"no_such_process" | "bad_request", "message": "..."}``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import subprocess


MAX_REQUEST_BYTES = 128 << 20
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
PROCESS_DIR = "/var/tmp/.nspawn-mcp/processes"
STREAM_INTERVAL = 0.25
_CHUNK = 65536


class RequestError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- cgroups -------------------------------------------------------------------


def _find_cgroup_base() -> str | None:
    """The supervisor's own cgroup v2 directory, if one is writable here."""
    try:
        with open("/proc/self/cgroup") as lines:
            own = next((line.split("::", 1)[1].strip() for line in lines if line.startswith("0::")), None)
    except OSError:
        return None
    if own is None:
        return None
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        base = mount + own.rstrip("/")
        if os.path.exists(base + "/cgroup.kill") and os.access(base, os.W_OK):
            return base
    return None


class Cgroup:
    """One command's cgroup; falls back to its process group where cgroups are unavailable."""

    _base = _find_cgroup_base()
    _counter = 0
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.path: str | None = None
        self._procs_fd: int | None = None
        if self._base is None:
            return
        with Cgroup._lock:
            Cgroup._counter += 1
            name = f"exec-{os.getpid()}-{Cgroup._counter}"
        try:
            os.mkdir(self._base + "/" + name)
            self.path = self._base + "/" + name
            self._procs_fd = os.open(self.path + "/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            self.path = None

    def join(self) -> None:
        """Runs in the forked child, before exec: move it into this cgroup."""
        if self._procs_fd is not None:
            os.write(self._procs_fd, b"0")

    def kill(self, pgid: int) -> None:
        if self.path is not None:
            try:
                with open(self.path + "/cgroup.kill", "w") as kill:
                    kill.write("1")
            except OSError:
                pass
            else:
                return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def signal(self, pgid: int, signum: int) -> None:
        if signum == signal.SIGKILL:
            self.kill(pgid)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signum)

    def remove(self) -> None:
        if self._procs_fd is not None:
            os.close(self._procs_fd)
            self._procs_fd = None
        if self.path is None:
            return
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                os.rmdir(self.path)
            except OSError:
                time.sleep(0.005)  # processes are still exiting
            else:
                return


# -- starting commands -----------------------------------------------------------


def _start(request: dict[str, Any], cgroup: Cgroup) -> subprocess.Popen[bytes]:
    import subprocess

    argv = request.get("argv")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        raise RequestError("bad_request", "argv must be a non-empty list of strings")
    cwd = request.get("cwd") or None
    env = dict(BASE_ENV)
    user = request.get("user") or "root"
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        raise RequestError("bad_user", f"no user {user!r} in this sandbox's image") from None
    env["HOME"] = account.pw_dir
    env["USER"] = env["LOGNAME"] = account.pw_name
    env.update({str(k): str(v) for k, v in (request.get("env") or {}).items()})
    if cwd is None:
        cwd = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
    as_other = account.pw_uid != os.getuid()
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=cgroup.join,
            user=account.pw_uid if as_other else None,
            group=account.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
        )
    except OSError as exc:
        cgroup.remove()
        raise _spawn_error(exc, argv[0], cwd) from None


def _spawn_error(exc: OSError, argv0: str, cwd: str) -> RequestError:
    if isinstance(exc, FileNotFoundError):
        if exc.filename == cwd:
            return RequestError("bad_cwd", f"working directory {cwd} does not exist")
        return RequestError("not_found", f"command not found: {argv0}")
    if isinstance(exc, PermissionError):
        if exc.filename == cwd:
            return RequestError("bad_cwd", f"permission denied on working directory {cwd}")
        return RequestError("not_executable", f"permission denied: {argv0}")
    if isinstance(exc, NotADirectoryError):
        return RequestError("bad_cwd", f"working directory {cwd} is not a directory")
    return RequestError("not_executable", f"cannot run {argv0}: {os.strerror(exc.errno or 0)}")


def _status(returncode: int | None) -> dict[str, int | None]:
    if returncode is None:
        return {"exit_code": None, "signal": None}
    if returncode < 0:
        return {"exit_code": None, "signal": -returncode}
    return {"exit_code": returncode, "signal": None}


class _Pump:
    """Moves a command's stdout/stderr to sinks and its stdin from a buffer, until both outputs close."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        cgroup: Cgroup,
        sinks: dict[str, Callable[[bytes], None]],
        stdin: bytes,
        deadline: float | None,
        hangup: socket.socket | None = None,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.proc, self.cgroup, self.sinks = proc, cgroup, sinks
        self.pending = memoryview(stdin)
        self.deadline, self.hangup, self.tick = deadline, hangup, tick
        self.timed_out = False
        self.hung_up = False

    def run(self) -> None:
        proc = self.proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        streams = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        selector = selectors.DefaultSelector()
        for fd in streams:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        stdin_fd = proc.stdin.fileno()
        if self.pending:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        elif self.hangup is not None:
            proc.stdin.close()
        if self.hangup is not None:
            selector.register(self.hangup.fileno(), selectors.EVENT_READ)
        open_streams = set(streams)
        exited = False
        while open_streams:
            wait = 1.0 if not exited else 0.05
            if self.deadline is not None:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    self.timed_out = True
                    self.cgroup.kill(proc.pid)
                    break
                wait = min(wait, remaining)
            if self.tick is not None:
                wait = min(wait, STREAM_INTERVAL)
            for key, _ in selector.select(wait):
                fd = key.fd
                if self.hangup is not None and fd == self.hangup.fileno():
                    if self.hangup.recv(_CHUNK):
                        continue  # nothing more is expected; ignore stray bytes
                    self.hung_up = True
                    self.cgroup.kill(proc.pid)
                    open_streams.clear()
                    break
                if fd == stdin_fd:
                    try:
                        written = os.write(fd, self.pending[:_CHUNK])
                    except BrokenPipeError:
                        written = len(self.pending)
                    self.pending = self.pending[written:]
                    if not self.pending:
                        selector.unregister(fd)
                        if self.hangup is not None:
                            proc.stdin.close()
                    continue
                chunk = os.read(fd, _CHUNK)
                if chunk:
                    self.sinks[streams[fd]](chunk)
                else:
                    selector.unregister(fd)
                    open_streams.discard(fd)
            if self.tick is not None:
                self.tick()
            if not exited and proc.poll() is not None:
                # The main process is done: whatever it left running goes with it.
                exited = True
                self.cgroup.kill(proc.pid)
        selector.close()
        proc.wait()
        self.cgroup.kill(proc.pid)
        for stream in (proc.stdout, proc.stderr):
            stream.close()
        if self.hangup is not None and not proc.stdin.closed:
            proc.stdin.close()
        self.cgroup.remove()


class _Capture:
    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.limit = limit
        self.truncated = False
        self.unsent = 0

    def add(self, chunk: bytes) -> None:
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk
        self.unsent += len(chunk)

    def take_unsent(self) -> bytes:
        new = bytes(self.data[len(self.data) - self.unsent :]) if self.unsent else b""
        self.unsent = 0
        return new


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def op_exec(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    limit = int(request.get("max_output") or (1 << 20))
    out, err = _Capture(limit), _Capture(limit)
    cgroup = Cgroup()
    started = time.monotonic()
    proc = _start(request, cgroup)
    tick = None
    if request.get("stream"):
        last = [started]

        def tick() -> None:
            now = time.monotonic()
            if now - last[0] >= STREAM_INTERVAL and (out.unsent or err.unsent):
                last[0] = now
                event = {
                    "event": "output",
                    "stdout_b64": _b64(out.take_unsent()),
                    "stderr_b64": _b64(err.take_unsent()),
                }
                _send(conn, event)

    pump = _Pump(
        proc,
        cgroup,
        {"stdout": out.add, "stderr": err.add},
        base64.b64decode(request.get("stdin_b64") or ""),
        started + float(request.get("timeout") or 60.0),
        hangup=conn,
        tick=tick,
    )
    pump.run()
    if pump.hung_up:
        raise ConnectionAbortedError
    reply: dict[str, Any] = {
        "stdout_b64": _b64(bytes(out.data)),
        "stderr_b64": _b64(bytes(err.data)),
        "stdout_truncated": out.truncated,
        "stderr_truncated": err.truncated,
        "timed_out": pump.timed_out,
        "duration_ms": round((time.monotonic() - started) * 1000, 3),
    }
    reply.update(_status(proc.returncode))
    return reply


# -- background processes -----------------------------------------------------------


class _FileSink:
    def __init__(self, path: str, limit: int) -> None:
        self.file: IO[bytes] = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self.limit = limit
        self.size = 0
        self.truncated = False

    def add(self, chunk: bytes) -> None:
        room = self.limit - self.size
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        if chunk:
            self.file.write(chunk)
            self.size += len(chunk)

    def close(self) -> None:
        self.file.close()


class Background:
    def __init__(self, process_id: str, request: dict[str, Any]) -> None:
        self.process_id = process_id
        self.argv: list[str] = list(request["argv"])
        self.directory = PROCESS_DIR + "/" + process_id
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        limit = int(request.get("max_output") or (16 << 20))
        self.out = _FileSink(self.directory + "/stdout", limit)
        self.err = _FileSink(self.directory + "/stderr", limit)
        self.cgroup = Cgroup()
        self.started_at = time.time()
        timeout = request.get("timeout")
        started = time.monotonic()
        self.proc = _start(request, self.cgroup)
        assert self.proc.stdin is not None
        self.stdin = self.proc.stdin
        os.set_blocking(self.stdin.fileno(), False)
        stdin_data = base64.b64decode(request.get("stdin_b64") or "")
        if stdin_data:
            self.write(stdin_data, close=False)
        self.pump = _Pump(
            self.proc,
            self.cgroup,
            {"stdout": self.out.add, "stderr": self.err.add},
            b"",
            started + float(timeout) if timeout else None,
        )
        self.finished = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self.pump.run()
        finally:
            self.out.close()
            self.err.close()
            if not self.stdin.closed:
                self.stdin.close()
            self.finished.set()

    def write(self, data: bytes, close: bool) -> int:
        written = 0
        if self.stdin.closed:
            raise RequestError("bad_request", f"stdin of {self.process_id} is closed")
        try:
            while written < len(data):
                written += os.write(self.stdin.fileno(), data[written : written + _CHUNK])
        except BlockingIOError:
            pass
        except BrokenPipeError:
            close = True
        if close:
            self.stdin.close()
        return written

    def state(self) -> dict[str, Any]:
        running = not self.finished.is_set()
        info: dict[str, Any] = {
            "process_id": self.process_id,
            "argv": self.argv,
            "running": running,
            "started_at": self.started_at,
            "timed_out": self.pump.timed_out,
            "stdout_truncated": self.out.truncated,
            "stderr_truncated": self.err.truncated,
        }
        info.update(_status(None if running else self.proc.returncode))
        return info


class Registry:
    def __init__(self) -> None:
        self.processes: dict[str, Background] = {}
        self.lock = threading.Lock()
        self.counter = 0

    def spawn(self, request: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self.counter += 1
            process_id = f"p{self.counter}"
        self.processes[process_id] = Background(process_id, request)
        return {"process_id": process_id}

    def get(self, request: dict[str, Any]) -> Background:
        process = self.processes.get(str(request.get("process_id")))
        if process is None:
            raise RequestError("no_such_process", f"no background process {request.get('process_id')!r}")
        return process

    def read(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        finished = process.finished.is_set()  # read the state first: no output is missed after "finished"
        reply = process.state()
        reply["running"] = not finished
        if not finished:
            reply.update(_status(None))
        limit = int(request.get("max_bytes") or (1 << 20))
        for stream in ("stdout", "stderr"):
            offset = max(0, int(request.get(stream + "_offset") or 0))
            with open(process.directory + "/" + stream, "rb") as source:
                source.seek(offset)
                data = source.read(limit)
            reply[stream + "_b64"] = _b64(data)
            reply["next_" + stream + "_offset"] = offset + len(data)
        return reply

    def write(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        data = base64.b64decode(request.get("data_b64") or "")
        return {"written": process.write(data, bool(request.get("close")))}

    def kill(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        signum = int(request.get("signal") or signal.SIGTERM)
        if not process.finished.is_set():
            process.cgroup.signal(process.proc.pid, signum)
        return process.state()

    def list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"processes": [p.state() for p in self.processes.values()]}


REGISTRY = Registry()


# -- the server -------------------------------------------------------------------


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = conn.recv(_CHUNK)
        if not chunk:
            raise RequestError("bad_request", "connection closed before a complete request")
        buffer += chunk
        if len(buffer) > MAX_REQUEST_BYTES:
            raise RequestError("bad_request", "request too large")
    try:
        request = json.loads(bytes(buffer[: buffer.index(b"\n")]))
    except ValueError:
        raise RequestError("bad_request", "request is not JSON") from None
    if not isinstance(request, dict):
        raise RequestError("bad_request", "request must be a JSON object")
    return request


OPERATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "spawn": REGISTRY.spawn,
    "read": REGISTRY.read,
    "write": REGISTRY.write,
    "kill": REGISTRY.kill,
    "list": REGISTRY.list,
}


def _operation(op: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    if not isinstance(op, str) or op not in OPERATIONS:
        raise RequestError("bad_request", f"unknown op {op!r}")
    return OPERATIONS[op]


def _serve_connection(conn: socket.socket) -> None:
    with conn:
        try:
            request = _read_request(conn)
            op = request.get("op", "exec")
            reply = op_exec(conn, request) if op == "exec" else _operation(op)(request)
        except ConnectionAbortedError:
            return
        except RequestError as exc:
            reply = {"error": exc.kind, "message": str(exc)}
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reply = {"error": "bad_request", "message": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(OSError):
            _send(conn, reply)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: supervisor.py SOCKET_PATH", file=sys.stderr)
        return 2
    path = argv[1]
    os.environ.pop("NOTIFY_SOCKET", None)  # not for the commands we run
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    # Bind under a temporary name and rename once listening: the socket's
    # appearance at ``path`` is the host's signal that commands are accepted.
    temporary = path + ".tmp"
    if os.path.exists(temporary):
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
