"""Client of the exec supervisor that runs inside each sandbox.

Speaks :mod:`nspawn_mcp.sandbox.protocol` over the sandbox's control socket. The
socket is the server's own: it lives in a directory only the host's root can
reach, and the supervisor got the listening end as a file descriptor, so no
path the sandbox can write is ever followed.

Everything read here may come from root in the sandbox posing as the supervisor.
Each line is bounded before it is parsed (by what the request asked for), every
message is decoded by the protocol module, and streamed output is counted
against the caps the server asked for. A broken or oversized reply is an error
of that request only; the connection is dropped and nothing else waits on it.
Closing the connection of a running ``exec`` (for example when the MCP request is
cancelled) makes the supervisor kill the command and everything it started.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.to_thread
from anyio.streams.buffered import BufferedByteStream

from ..errors import CopyRefused, ExecFailed, InvalidRequest, NotFound, SandboxGone, TooLarge
from ..sandbox import protocol
from .api import CommandOutcome, CommandSpec, OutputChunk, ProcessOutput, ProcessState

__all__ = ["JailClient"]

log = logging.getLogger(__name__)

_GRACE_SECONDS = 10.0
_CONTROL_TIMEOUT = 30.0
_CONTROL_LINE_LIMIT = protocol.line_limit(0) + protocol.MAX_PROCESSES * 20_000
"""Control replies carry no output: a list of processes (each argv cut to its bound) at most."""
_PARSE_IN_THREAD = 1 << 20
_COPY_TIMEOUT = 3600.0
_FILE_TIMEOUT = 300.0
_LIST_LINE_LIMIT = protocol.LIST_REPLY_BYTES + protocol.line_limit(0)
_CONNECT_TIMEOUT = 15.0
"""How long a ``connect`` may wait for its reply (the supervisor gives up connecting after 10 s)."""

T = TypeVar("T")
OutputHandler = Callable[[OutputChunk], Awaitable[None]]
EventHandler = Callable[[dict[str, Any]], Awaitable[None]]


def _command(spec: CommandSpec, timeout: float | None) -> dict[str, Any]:
    return protocol.Command(
        argv=spec.argv,
        cwd=spec.cwd,
        env=dict(spec.env),
        user=spec.user,
        stdin=spec.stdin,
        timeout=timeout,
        max_output=spec.max_output_bytes,
        keep_tail=spec.keep == "tail",
    ).to_wire()


_FILE_FAILURES = (
    "no_such_file",
    "permission_denied",
    "not_regular",
    "too_large",
    "no_match",
    "ambiguous",
    "io_error",
)


def _raise_for(failure: protocol.Failure) -> None:
    if failure.kind == "no_such_process":
        raise NotFound(f"{failure.message}; list_processes shows this sandbox's background processes")
    if failure.kind == "bad_user":
        raise InvalidRequest(failure.message)
    if failure.kind == "too_large":
        raise TooLarge(failure.message)
    if failure.kind in _FILE_FAILURES:
        raise CopyRefused(failure.message)
    raise ExecFailed(failure.message)


class _Lines:
    """JSON lines from one connection, each at most ``limit`` bytes."""

    def __init__(self, stream: anyio.abc.ByteStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buffer = bytearray()

    async def next(self) -> dict[str, Any]:
        scanned = 0  # only what arrived since is searched for the newline
        while (end := self._buffer.find(b"\n", scanned)) < 0:
            scanned = len(self._buffer)
            if len(self._buffer) > self._limit:
                raise protocol.ProtocolError(f"a line longer than {self._limit} bytes")
            try:
                self._buffer += await self._stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                raise SandboxGone("the sandbox stopped while the request was running") from None
        if end > self._limit:
            raise protocol.ProtocolError(f"a line longer than {self._limit} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        if len(line) > _PARSE_IN_THREAD:  # keep the event loop free for every other sandbox
            return await anyio.to_thread.run_sync(protocol.decode_line, line)
        return protocol.decode_line(line)


async def _exchange(
    stream: anyio.abc.ByteStream, request: dict[str, Any], limit: int, on_event: EventHandler | None
) -> dict[str, Any]:
    """Send ``request``; pass events to ``on_event``; return the reply, or raise the failure it reports."""
    await stream.send(protocol.encode(request))
    lines = _Lines(stream, limit)
    while "event" in (message := await lines.next()):
        if on_event is None:
            raise protocol.ProtocolError("an event where none was asked for")
        await on_event(message)
    if "error" in message:
        _raise_for(protocol.Failure.from_wire(message))
    return message


class JailClient:
    """The requests one sandbox's supervisor answers."""

    def __init__(self, socket_path: Path, sandbox_id: str = "sandbox") -> None:
        self._socket_path = socket_path
        self._sandbox_id = sandbox_id

    async def _request(
        self,
        request: dict[str, Any],
        *,
        timeout: float,
        limit: int,
        on_event: EventHandler | None = None,
    ) -> dict[str, Any]:
        """Send ``request``; pass events to ``on_event``; return the reply (a failure raises)."""
        try:
            stream = await anyio.connect_unix(str(self._socket_path))
        except OSError:
            raise SandboxGone("the sandbox is not accepting commands (it may have stopped)") from None
        async with stream:
            # The supervisor enforces a command's own timeout; this bound only
            # guards against a supervisor that stopped answering.
            with anyio.move_on_after(timeout) as scope:
                try:
                    return await _exchange(stream, request, limit, on_event)
                except protocol.ProtocolError as exc:
                    raise self._invalid(exc) from None
                except (anyio.BrokenResourceError, OSError):
                    raise SandboxGone("the sandbox stopped while the request was running") from None
        assert scope.cancelled_caught
        raise SandboxGone("the sandbox stopped answering (supervisor unresponsive)")

    def _invalid(self, error: protocol.ProtocolError) -> ExecFailed:
        log.warning("sandbox %s: invalid reply from its supervisor: %s", self._sandbox_id, error)
        return ExecFailed(
            f"the sandbox's supervisor sent an invalid reply ({error}); the sandbox may be broken "
            "or compromised: destroy it"
        )

    def _decoded(self, decode: Callable[..., T], reply: dict[str, Any], *bounds: int) -> T:
        """``decode(reply, *bounds)``; a reply that breaks the protocol is this request's error."""
        try:
            return decode(reply, *bounds)
        except protocol.ProtocolError as exc:
            raise self._invalid(exc) from None

    async def ping(self, timeout: float) -> None:
        """Return once the supervisor answers."""
        await self._request({"op": "ping"}, timeout=timeout, limit=_CONTROL_LINE_LIMIT)

    async def run(self, spec: CommandSpec, on_output: OutputHandler | None = None) -> CommandOutcome:
        cap = spec.max_output_bytes
        streamed = [0, 0]

        async def event(message: dict[str, Any]) -> None:
            if message.get("event") != "output" or on_output is None:
                raise protocol.ProtocolError("an unexpected event")
            chunk = OutputChunk.from_wire(message, cap)
            streamed[0] += len(chunk.stdout)
            streamed[1] += len(chunk.stderr)
            if max(streamed) > cap and spec.keep == "head":  # a tail capture streams all it sees
                raise protocol.ProtocolError(f"more streamed output than the cap of {cap} bytes")
            await on_output(chunk)

        request = {"op": "exec", "stream": on_output is not None, **_command(spec, spec.timeout_seconds)}
        reply = await self._request(
            request,
            timeout=spec.timeout_seconds + _GRACE_SECONDS,
            limit=protocol.line_limit(cap),
            on_event=event,
        )
        return self._decoded(CommandOutcome.from_wire, reply, cap)

    async def spawn(self, spec: CommandSpec, timeout: float | None) -> str:
        reply = await self._request(
            {"op": "spawn", **_command(spec, timeout)}, timeout=_CONTROL_TIMEOUT, limit=_CONTROL_LINE_LIMIT
        )
        return self._decoded(protocol.spawned_from_wire, reply)

    async def read(
        self, process_id: str, stdout_offset: int, stderr_offset: int, max_bytes: int, tail: bool = False
    ) -> ProcessOutput:
        reply = await self._request(
            {
                "op": "read",
                "process_id": process_id,
                "stdout_offset": stdout_offset,
                "stderr_offset": stderr_offset,
                "max_bytes": max_bytes,
                "tail": tail,
            },
            timeout=_CONTROL_TIMEOUT,
            limit=protocol.line_limit(max_bytes),
        )
        return self._decoded(ProcessOutput.from_wire, reply, max_bytes, stdout_offset, stderr_offset, tail)

    async def write(self, process_id: str, data: bytes, close: bool) -> int:
        reply = await self._request(
            {
                "op": "write",
                "process_id": process_id,
                "data_b64": protocol.data_to_wire(data),
                "close": close,
            },
            timeout=_CONTROL_TIMEOUT,
            limit=_CONTROL_LINE_LIMIT,
        )
        return self._decoded(protocol.written_from_wire, reply, len(data))

    async def kill(self, process_id: str, signal: int, wait: float = 0.0) -> ProcessState:
        reply = await self._request(
            {"op": "kill", "process_id": process_id, "signal": signal, "wait": wait},
            timeout=_CONTROL_TIMEOUT,
            limit=_CONTROL_LINE_LIMIT,
        )
        return self._decoded(ProcessState.from_wire, reply)

    async def list(self) -> list[ProcessState]:
        reply = await self._request({"op": "list"}, timeout=_CONTROL_TIMEOUT, limit=_CONTROL_LINE_LIMIT)
        return self._decoded(ProcessState.list_from_wire, reply)

    async def read_file(
        self, path: str, max_bytes: int, sink: Callable[[bytes], Awaitable[None]]
    ) -> protocol.FileRead:
        """Stream a regular file of the sandbox to ``sink``, as root in the sandbox may read it."""
        received = [0]

        async def event(message: dict[str, Any]) -> None:
            if message.get("event") != "data":
                raise protocol.ProtocolError("an unexpected event")
            chunk = protocol.FileChunk.from_wire(message)
            received[0] += len(chunk.data)
            if received[0] > max_bytes:
                raise CopyRefused(
                    f"sandbox path {path} is larger than the policy's limit of {max_bytes} bytes "
                    "(files.max_copy_bytes)"
                )
            await sink(chunk.data)

        reply = await self._request(
            {"op": "read_file", "path": path, "max_bytes": max_bytes},
            timeout=_COPY_TIMEOUT,
            limit=protocol.line_limit(protocol.FILE_CHUNK),
            on_event=event,
        )
        done = self._decoded(protocol.FileRead.from_wire, reply, max_bytes)
        if done.size != received[0]:
            raise self._invalid(protocol.ProtocolError("the size does not match the data sent"))
        return done

    # -- file tools -------------------------------------------------------------------

    async def read_slice(
        self, path: str, offset: int, limit: int | None, max_bytes: int, encoding: str
    ) -> protocol.FileSlice:
        """A piece of a file: whole lines of text from line ``offset``, or bytes of a binary file."""
        reply = await self._request(
            {
                "op": "read_slice",
                "path": path,
                "offset": offset,
                "limit": limit,
                "max_bytes": max_bytes,
                "encoding": encoding,
            },
            timeout=_FILE_TIMEOUT,
            limit=protocol.line_limit(max_bytes),
        )
        return self._decoded(protocol.FileSlice.from_wire, reply, max_bytes, offset)

    async def write_file(
        self, path: str, data: bytes, mode: int | None, make_parents: bool
    ) -> protocol.FileWritten:
        """Replace (or create) a file atomically, as root in the sandbox may."""
        reply = await self._request(
            {
                "op": "write_file",
                "path": path,
                "data_b64": protocol.data_to_wire(data),
                "mode": mode,
                "make_parents": make_parents,
            },
            timeout=_FILE_TIMEOUT,
            limit=_CONTROL_LINE_LIMIT,
        )
        return self._decoded(protocol.FileWritten.from_wire, reply, len(data))

    async def edit_file(
        self, path: str, old: str, new: str, count: int, max_bytes: int
    ) -> protocol.FileEdited:
        """Replace exactly ``count`` occurrences of ``old``; any other number of matches is refused."""
        reply = await self._request(
            {"op": "edit_file", "path": path, "old": old, "new": new, "count": count, "max_bytes": max_bytes},
            timeout=_FILE_TIMEOUT,
            limit=_CONTROL_LINE_LIMIT,
        )
        return self._decoded(protocol.FileEdited.from_wire, reply, count, max_bytes)

    async def list_files(
        self, path: str, pattern: str | None, depth: int, max_entries: int
    ) -> protocol.FileListing:
        """Entries under a directory, never following a symlink below it."""
        reply = await self._request(
            {
                "op": "list_files",
                "path": path,
                "pattern": pattern,
                "depth": depth,
                "max_entries": max_entries,
            },
            timeout=_FILE_TIMEOUT,
            limit=_LIST_LINE_LIMIT,
        )
        return self._decoded(protocol.FileListing.from_wire, reply, max_entries)

    async def read_tree(
        self,
        path: str,
        max_bytes: int,
        max_entries: int,
        on_entry: Callable[[protocol.TreeEntry], Awaitable[None]],
        on_data: Callable[[bytes], Awaitable[None]],
    ) -> protocol.TreeRead:
        """Stream a directory of the sandbox: each entry to ``on_entry``, a file's bytes to ``on_data``.

        The stream is checked as it comes: a file's bytes must add up to its declared
        size before the next entry, and the total stays within ``max_bytes``.
        """
        state = {"left": 0, "total": 0, "entries": 0}

        async def event(message: dict[str, Any]) -> None:
            kind = message.get("event")
            if kind == "entry":
                if state["left"]:
                    raise protocol.ProtocolError("an entry before the previous file's bytes were all sent")
                state["entries"] += 1
                if state["entries"] > max_entries:
                    raise protocol.ProtocolError(f"more than {max_entries} entries")
                entry = protocol.TreeEntry.from_wire(message, max_bytes)
                state["left"] = entry.size
                state["total"] += entry.size
                if state["total"] > max_bytes:
                    raise protocol.ProtocolError(f"more than the cap of {max_bytes} bytes")
                await on_entry(entry)
            elif kind == "data":
                chunk = protocol.FileChunk.from_wire(message)
                if len(chunk.data) > state["left"]:
                    raise protocol.ProtocolError("more bytes than the file's declared size")
                state["left"] -= len(chunk.data)
                await on_data(chunk.data)
            else:
                raise protocol.ProtocolError("an unexpected event")

        reply = await self._request(
            {"op": "read_tree", "path": path, "max_bytes": max_bytes, "max_entries": max_entries},
            timeout=_COPY_TIMEOUT,
            limit=protocol.line_limit(protocol.FILE_CHUNK),
            on_event=event,
        )
        done = self._decoded(protocol.TreeRead.from_wire, reply, max_bytes)
        if state["left"] or done.bytes != state["total"]:
            raise self._invalid(protocol.ProtocolError("the sizes do not match the data sent"))
        return done

    async def extract_tar(self, archive: str, destination: str, max_bytes: int) -> protocol.TreeWritten:
        """Unpack an archive copied into the sandbox under ``destination`` (the archive is removed)."""
        reply = await self._request(
            {"op": "extract_tar", "archive": archive, "destination": destination, "max_bytes": max_bytes},
            timeout=_COPY_TIMEOUT,
            limit=_CONTROL_LINE_LIMIT,
        )
        return self._decoded(protocol.TreeWritten.from_wire, reply, max_bytes)

    async def connect(self, port: int) -> anyio.abc.ByteStream:
        """A byte stream to ``port`` on the sandbox's own loopback, through its supervisor.

        Only the reply line is decoded (bounded, by the protocol module); what follows
        is the sandbox's raw bytes, for whoever connected to the forward. Raises
        SandboxGone, or ExecFailed when nothing listens there or the reply is invalid.
        """
        try:
            raw = await anyio.connect_unix(str(self._socket_path))
        except OSError:
            raise SandboxGone("the sandbox is not accepting connections (it may have stopped)") from None
        stream = BufferedByteStream(raw)
        try:
            with anyio.fail_after(_CONNECT_TIMEOUT):
                await stream.send(protocol.encode({"op": "connect", "port": port}))
                line = await stream.receive_until(b"\n", protocol.CONNECT_LINE_LIMIT)
            message = protocol.decode_line(line)
            if "error" in message:
                _raise_for(protocol.Failure.from_wire(message))
            protocol.connected_from_wire(message)
        except protocol.ProtocolError as exc:
            await raw.aclose()
            raise self._invalid(exc) from None
        except anyio.DelimiterNotFound:
            await raw.aclose()
            raise self._invalid(protocol.ProtocolError("a connect reply that is too long")) from None
        except (anyio.IncompleteRead, anyio.BrokenResourceError, OSError, TimeoutError):
            await raw.aclose()
            raise SandboxGone("the sandbox's supervisor did not answer the connection") from None
        except BaseException:
            await raw.aclose()
            raise
        return stream
