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

The protocol (requests, replies, their bounds) is defined in ``protocol.py``,
which lives next to this file and which the server imports too. The listening
socket is the server's: it is created in a directory only the host's root can
reach and handed to nspawn as the service's standard input, which
``--console=pipe`` passes on to this payload as fd 0. No path the sandbox can
write ever leads the server anywhere.

Commands are the processes the OOM killer should choose: each raises its own
``oom_score_adj`` before it runs, so a full ``/dev/shm`` or a memory hog kills
commands, not the supervisor.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import pwd
import selectors
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable

# Only what an idle supervisor and ``exec`` need is imported at start: every module costs each
# sandbox start time and memory for as long as it lives. ``typing`` (not imported at run time),
# ``subprocess`` (the first command) and ``fileops`` (the first file operation) wait until used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import subprocess
    from typing import IO, Any

    from . import protocol
else:
    try:  # imported from the package (tests, type checking)
        from . import protocol
    except ImportError:  # inside a sandbox: protocol.py and fileops.py lie next to this file
        import protocol


BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
PROCESS_DIR = "/var/tmp/.nspawn-mcp/processes"
STREAM_INTERVAL = 0.25
KILL_WAIT_SECONDS = 5.0
"""The longest a ``kill`` waits for the process to end before it answers."""
_CHUNK = 65536
COMMAND_OOM_SCORE_ADJ = b"1000"


RequestError = protocol.RequestError


def _file_operations() -> tuple[
    dict[str, Callable[[socket.socket, dict[str, Any]], dict[str, Any]]],
    dict[str, Callable[[dict[str, Any]], dict[str, Any]]],
]:
    """The file operations (streaming ones, plain ones), imported on first use."""
    if TYPE_CHECKING or __package__:
        from . import fileops
    else:  # inside a sandbox: fileops.py lies next to this file
        import fileops
    return fileops.STREAMING, fileops.OPERATIONS


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


def _start(command: protocol.Command, cgroup: Cgroup) -> subprocess.Popen[bytes]:
    import subprocess

    env = dict(BASE_ENV)
    try:
        account = pwd.getpwnam(command.user)
    except KeyError:
        raise RequestError("bad_user", f"no user {command.user!r} in this sandbox's image") from None
    env["HOME"] = account.pw_dir
    env["USER"] = env["LOGNAME"] = account.pw_name
    env.update(command.env)
    cwd = command.cwd
    if cwd is None:
        cwd = account.pw_dir if os.path.isdir(account.pw_dir) else "/"
    as_other = account.pw_uid != os.getuid()

    def child_setup() -> None:
        cgroup.join()
        with contextlib.suppress(OSError), open("/proc/self/oom_score_adj", "wb") as adjust:
            adjust.write(COMMAND_OOM_SCORE_ADJ)

    try:
        return subprocess.Popen(
            list(command.argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=child_setup,
            user=account.pw_uid if as_other else None,
            group=account.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
        )
    except OSError as exc:
        cgroup.remove()
        raise _spawn_error(exc, command.argv[0], cwd) from None


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
    """A command's stream, up to ``limit`` bytes: the first ones, or with ``tail`` the last ones."""

    def __init__(self, limit: int, tail: bool = False) -> None:
        self.data = bytearray()
        self.limit = limit
        self.tail = tail
        self.truncated = False
        self.unsent = 0

    def add(self, chunk: bytes) -> None:
        if self.tail:
            self.data += chunk
            self.unsent += len(chunk)
            if len(self.data) > self.limit:
                self.truncated = True
                del self.data[: len(self.data) - self.limit]
            return
        room = self.limit - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[: max(room, 0)]
        self.data += chunk
        self.unsent += len(chunk)

    def take_unsent(self) -> bytes:
        unsent = min(self.unsent, len(self.data))
        new = bytes(self.data[len(self.data) - unsent :]) if unsent else b""
        self.unsent = 0
        return new


def op_exec(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    command = protocol.Command.from_wire(request)
    out, err = (
        _Capture(command.max_output, command.keep_tail),
        _Capture(command.max_output, command.keep_tail),
    )
    cgroup = Cgroup()
    started = time.monotonic()
    proc = _start(command, cgroup)
    tick = None
    if request.get("stream"):
        last = [started]

        def tick() -> None:
            now = time.monotonic()
            if now - last[0] >= STREAM_INTERVAL and (out.unsent or err.unsent):
                last[0] = now
                _send(conn, protocol.OutputChunk(out.take_unsent(), err.take_unsent()).to_wire())

    pump = _Pump(
        proc,
        cgroup,
        {"stdout": out.add, "stderr": err.add},
        command.stdin,
        started + (command.timeout or 60.0),
        hangup=conn,
        tick=tick,
    )
    pump.run()
    if pump.hung_up:
        raise ConnectionAbortedError
    status = protocol.CommandOutcome.status(proc.returncode)
    return protocol.CommandOutcome(
        exit_code=status["exit_code"],
        signal=status["signal"],
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        timed_out=pump.timed_out,
        duration_ms=round((time.monotonic() - started) * 1000, 3),
    ).to_wire()


def op_read_file(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any]:
    """Send a regular file as root here may read it, in chunks, up to ``max_bytes``.

    The last component must not be a symlink; type and size are checked before a
    byte is sent, and the cap again while reading (a file may grow).
    """
    path, limit = request.get("path"), request.get("max_bytes")
    if not isinstance(path, str) or not path.startswith("/") or not isinstance(limit, int):
        raise RequestError("bad_request", "read_file needs an absolute path and max_bytes")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RequestError("no_such_file", f"{path} does not exist in the sandbox") from None
    except PermissionError:
        raise RequestError("permission_denied", f"permission denied on {path} in the sandbox") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RequestError("not_regular", f"{path} is a symbolic link") from None
        reason = os.strerror(exc.errno or 0)
        raise RequestError("permission_denied", f"cannot open {path}: {reason}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
        raise RequestError("not_regular", f"{path} is {kind}")
    if info.st_size > limit:
        os.close(fd)
        raise RequestError("too_large", f"{path} has {info.st_size} bytes, more than {limit}")
    with os.fdopen(fd, "rb", buffering=0) as source:
        os.set_blocking(fd, True)
        sent = 0
        while True:
            try:
                chunk = source.read(protocol.FILE_CHUNK)
            except OSError as exc:
                reason = os.strerror(exc.errno or 0)
                raise RequestError("permission_denied", f"cannot read {path}: {reason}") from None
            if not chunk:
                break
            sent += len(chunk)
            if sent > limit:
                raise RequestError("too_large", f"{path} grew past {limit} bytes while it was read")
            _send(conn, protocol.FileChunk(chunk).to_wire())
    return protocol.FileRead(size=sent, mode=stat.S_IMODE(info.st_mode)).to_wire()


# -- port forwards ----------------------------------------------------------------

CONNECT_TIMEOUT = 10.0
_SPLICE_CHUNK = 256 << 10


def _copy_stream(source: socket.socket, destination: socket.socket) -> None:
    """Copy until ``source`` ends, then pass the end on (a half-close); an error ends both ways."""
    try:
        while True:
            data = source.recv(_SPLICE_CHUNK)
            if not data:
                break
            destination.sendall(data)
        destination.shutdown(socket.SHUT_WR)
    except OSError:
        for either in (source, destination):
            with contextlib.suppress(OSError):
                either.shutdown(socket.SHUT_RDWR)


def op_connect(conn: socket.socket, request: dict[str, Any]) -> None:
    """Connect to ``port`` on this sandbox's own loopback and splice it with ``conn`` until both end.

    Only the sandbox's own network namespace is reachable from here: a forward leads
    in, never out.
    """
    port = request.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise RequestError("bad_request", "connect needs a port between 1 and 65535")
    target = None
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        candidate = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        candidate.settimeout(CONNECT_TIMEOUT)
        try:
            candidate.connect((address, port))
        except OSError:
            candidate.close()
            continue
        target = candidate
        break
    if target is None:
        raise RequestError(
            "not_listening", f"nothing listens on port {port} in the sandbox (127.0.0.1 or ::1)"
        )
    with target:
        target.settimeout(None)
        _send(conn, {"connected": True})
        backwards = threading.Thread(target=_copy_stream, args=(target, conn), daemon=True)
        backwards.start()
        _copy_stream(conn, target)
        backwards.join()


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
    def __init__(self, process_id: str, command: protocol.Command) -> None:
        self.process_id = process_id
        self.argv = command.argv
        self.directory = PROCESS_DIR + "/" + process_id
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self.out = _FileSink(self.directory + "/stdout", command.max_output)
        self.err = _FileSink(self.directory + "/stderr", command.max_output)
        self.cgroup = Cgroup()
        started = time.monotonic()
        self.proc = _start(command, self.cgroup)
        assert self.proc.stdin is not None
        self.stdin = self.proc.stdin
        os.set_blocking(self.stdin.fileno(), False)
        if command.stdin:
            self.write(command.stdin, close=False)
        self.pump = _Pump(
            self.proc,
            self.cgroup,
            {"stdout": self.out.add, "stderr": self.err.add},
            b"",
            started + command.timeout if command.timeout else None,
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

    def state(self, finished: bool | None = None) -> protocol.ProcessState:
        """The process's state; ``finished`` as observed by the caller, if it looked first."""
        running = not (self.finished.is_set() if finished is None else finished)
        status = protocol.CommandOutcome.status(None if running else self.proc.returncode)
        return protocol.ProcessState(
            process_id=self.process_id,
            argv=self.argv,
            running=running,
            exit_code=status["exit_code"],
            signal=status["signal"],
            timed_out=self.pump.timed_out,
            stdout_truncated=self.out.truncated,
            stderr_truncated=self.err.truncated,
        )


class Registry:
    def __init__(self) -> None:
        self.processes: dict[str, Background] = {}
        self.lock = threading.Lock()
        self.counter = 0

    def spawn(self, request: dict[str, Any]) -> dict[str, Any]:
        command = protocol.Command.from_wire(request)
        with self.lock:
            self.counter += 1
            process_id = f"p{self.counter}"
        self.processes[process_id] = Background(process_id, command)
        return {"process_id": process_id}

    def get(self, request: dict[str, Any]) -> Background:
        process = self.processes.get(str(request.get("process_id")))
        if process is None:
            shown = str(request.get("process_id"))[:16]
            raise RequestError("no_such_process", f"no background process {shown!r}")
        return process

    def read(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        finished = process.finished.is_set()  # read the state first: no output is missed after "finished"
        limit = int(request.get("max_bytes") or (1 << 20))
        data: dict[str, bytes] = {}
        offsets: dict[str, int] = {}
        for stream in ("stdout", "stderr"):
            offset = max(0, int(request.get(stream + "_offset") or 0))
            with open(process.directory + "/" + stream, "rb") as source:
                if request.get("tail"):  # the newest output: skip what does not fit
                    offset = max(offset, os.fstat(source.fileno()).st_size - limit)
                source.seek(offset)
                data[stream] = source.read(limit)
            offsets[stream] = offset + len(data[stream])
        return protocol.ProcessOutput(
            state=process.state(finished),
            stdout=data["stdout"],
            stderr=data["stderr"],
            next_stdout_offset=offsets["stdout"],
            next_stderr_offset=offsets["stderr"],
        ).to_wire()

    def write(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        data = base64.b64decode(request.get("data_b64") or "")
        return {"written": process.write(data, bool(request.get("close")))}

    def kill(self, request: dict[str, Any]) -> dict[str, Any]:
        process = self.get(request)
        signum = int(request.get("signal") or signal.SIGTERM)
        if not process.finished.is_set():
            process.cgroup.signal(process.proc.pid, signum)
            if signum not in (signal.SIGSTOP, signal.SIGCONT):  # wait briefly for the signal to take effect
                process.finished.wait(min(max(float(request.get("wait") or 0), 0.0), KILL_WAIT_SECONDS))
        return process.state().to_wire()

    def list(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"processes": [p.state().to_wire() for p in self.processes.values()]}


REGISTRY = Registry()


# -- the server -------------------------------------------------------------------


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(protocol.encode(message))


def _read_request(conn: socket.socket) -> dict[str, Any]:
    buffer = bytearray()
    scanned = 0  # only what arrived since is searched for the newline
    while (end := buffer.find(b"\n", scanned)) < 0:
        scanned = len(buffer)
        chunk = conn.recv(_CHUNK)
        if not chunk:
            raise RequestError("bad_request", "connection closed before a complete request")
        buffer += chunk
        if len(buffer) > protocol.MAX_REQUEST_BYTES:
            raise RequestError("bad_request", "request too large")
    try:
        return protocol.decode_line(bytes(buffer[:end]))
    except protocol.ProtocolError as exc:
        raise RequestError("bad_request", str(exc)) from None


OPERATIONS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "ping": lambda request: {"ok": True},
    "spawn": REGISTRY.spawn,
    "read": REGISTRY.read,
    "write": REGISTRY.write,
    "kill": REGISTRY.kill,
    "list": REGISTRY.list,
}
STREAMING: dict[str, Callable[[socket.socket, dict[str, Any]], dict[str, Any]]] = {
    "exec": op_exec,
    "read_file": op_read_file,
}
TAKEOVER: dict[str, Callable[[socket.socket, dict[str, Any]], None]] = {
    "connect": op_connect,
}
"""Operations that answer on their own and then use the connection for raw bytes."""


def _handle(conn: socket.socket, request: dict[str, Any]) -> dict[str, Any] | None:
    """The reply to send; None when the operation took the connection over."""
    op = request.get("op", "exec")
    if isinstance(op, str) and op in TAKEOVER:
        TAKEOVER[op](conn, request)
        return None
    if isinstance(op, str) and op in STREAMING:
        return STREAMING[op](conn, request)
    if isinstance(op, str) and op in OPERATIONS:
        return OPERATIONS[op](request)
    streaming, plain = _file_operations()
    if isinstance(op, str) and op in streaming:
        return streaming[op](conn, request)
    if isinstance(op, str) and op in plain:
        return plain[op](request)
    raise RequestError("bad_request", f"unknown op {str(op)[:32]!r}")


def _serve_connection(conn: socket.socket) -> None:
    with conn:
        try:
            request = _read_request(conn)
            reply = _handle(conn, request)
        except (ConnectionAbortedError, BrokenPipeError, ConnectionResetError):
            return
        except RequestError as exc:
            reply = protocol.Failure(exc.kind, str(exc)).to_wire()
        except protocol.ProtocolError as exc:
            reply = protocol.Failure("bad_request", str(exc)).to_wire()
        except (ValueError, TypeError, KeyError, OSError) as exc:
            reply = protocol.Failure("bad_request", f"{type(exc).__name__}: {exc}").to_wire()
        if reply is None:
            return
        with contextlib.suppress(OSError):
            _send(conn, reply)


def _listen(where: str) -> socket.socket:
    """The listening socket: ``fd:N`` is one the host made and passed in; else a path to bind."""
    if where.startswith("fd:"):
        fd = int(where[3:])
        server = socket.socket(fileno=os.dup(fd))
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, fd)  # fd 0 is standard input again, for whatever reads it
        os.close(null)
        return server
    # Bind under a temporary name and rename once listening: the socket's
    # appearance at ``where`` tells the test that started us that we accept.
    temporary = where + ".tmp"
    if os.path.exists(temporary):
        os.unlink(temporary)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(temporary)
    os.chmod(temporary, 0o600)
    server.listen(128)
    os.rename(temporary, where)
    return server


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: supervisor.py fd:N | SOCKET_PATH", file=sys.stderr)
        return 2
    os.environ.pop("NOTIFY_SOCKET", None)  # not for the commands we run
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server = _listen(argv[1])
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_connection, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
