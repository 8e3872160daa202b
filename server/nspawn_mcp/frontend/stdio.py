"""``nspawn-mcp serve``: MCP on stdio, relayed line by line to the daemon's socket.

The front end is not an MCP server: it carries the client's messages to the daemon
and the daemon's back, unchanged. It starts the daemon's unit if it does not run, and
it survives a daemon restart:

- calls in flight when the connection drops are answered at once with an error that
  says the daemon restarted and their outcome is unknown (a client never hangs);
- it reconnects with the same session, so the restarted daemon gives it its sandboxes
  back, and replays the client's ``initialize`` (swallowing the answer), so the client
  carries on in the session it has;
- calls made while the daemon is unreachable wait for it up to ``reconnect_timeout``,
  then fail with the reason.

To know which calls are in flight it reads each message's ``id``: fully for the client's
messages, from the head of the line for the daemon's (which the SDK writes ``jsonrpc``,
``id``, then ``result`` or ``error``), so large results are not parsed twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import anyio
import anyio.to_thread
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from ..daemon.handshake import MAX_LINE, Hello, HelloError, Welcome, decode_welcome, encode

__all__ = ["Connection", "DaemonUnreachable", "Relay", "connect", "serve_stdio", "verify_daemon"]

log = logging.getLogger(__name__)

_MAX_REPLY = 256 << 20
_RESPONSE_HEAD = re.compile(rb'^\{"jsonrpc":"2\.0","id":(-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)"')
_INTERNAL_ERROR = -32603


class DaemonUnreachable(RuntimeError):
    """The daemon could not be started or reached; the message says why.

    ``settled``: trying again at once will not help (the daemon cannot be started), so
    calls waiting for a connection fail now rather than at their timeout.
    """

    def __init__(self, message: str, *, settled: bool = False) -> None:
        super().__init__(message)
        self.settled = settled


@dataclass
class Connection:
    stream: SocketStream
    received: BufferedByteReceiveStream
    welcome: Welcome


async def connect(socket_path: str, hello: Hello) -> Connection:
    """Connect to the daemon's socket and introduce ourselves."""
    try:
        stream = await anyio.connect_unix(socket_path)
    except OSError as exc:
        raise DaemonUnreachable(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
    received = BufferedByteReceiveStream(stream)
    try:
        await stream.send(encode(hello))
        with anyio.fail_after(30):
            welcome = decode_welcome(await received.receive_until(b"\n", MAX_LINE))
    except HelloError as exc:
        await stream.aclose()
        raise DaemonUnreachable(f"the daemon refused the connection: {exc}", settled=True) from None
    except (OSError, anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
        await stream.aclose()
        raise DaemonUnreachable(f"the daemon closed the connection: {exc}") from None
    except TimeoutError:
        await stream.aclose()
        raise DaemonUnreachable("the daemon did not answer in 30 s") from None
    return Connection(stream, received, welcome)


async def verify_daemon(socket_path: str, options: tuple[str, ...]) -> None:
    """Check that the daemon answers and runs with ``options`` (raises DaemonUnreachable otherwise)."""
    connection = await connect(socket_path, Hello(session=new_session(), options=options))
    await connection.stream.aclose()


def _error_line(request_id: object, method: str | None, message: str) -> bytes:
    """The answer to a request the daemon cannot give: a tool error for a tool call (which the model
    reads), a JSON-RPC error otherwise."""
    body: dict[str, object] = {"jsonrpc": "2.0", "id": request_id}
    if method == "tools/call":
        body["result"] = {
            "content": [{"type": "text", "text": message}],
            "isError": True,
            "resultType": "complete",
        }
    else:
        body["error"] = {"code": _INTERNAL_ERROR, "message": message}
    return json.dumps(body).encode() + b"\n"


def _response_id(line: bytes) -> str | None:
    """The id a daemon line answers (as JSON text), or None for notifications and requests."""
    head = _RESPONSE_HEAD.match(line[:512])
    if head is not None:
        return head.group(1).decode()
    if len(line) > 65536:
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if isinstance(message, dict) and "id" in message and "method" not in message:
        return json.dumps(message["id"])
    return None


@dataclass
class Relay:
    """Carries one client's MCP session to the daemon, across daemon restarts."""

    open_connection: Callable[[], Awaitable[Connection]]
    write_client: Callable[[bytes], Awaitable[None]]
    reconnect_timeout: float = 60.0
    _connection: Connection | None = None
    _up: anyio.Event = field(default_factory=anyio.Event)
    _down_reason: str = "the daemon is starting"
    _in_flight: dict[str, tuple[object, str | None]] = field(default_factory=dict)
    """Requests sent to the daemon and not answered yet: JSON id text -> (the id, its method)."""
    _initialize: bytes | None = None
    _initialized: bytes | None = None
    _swallow: str | None = None

    async def run(self, read_client: Callable[[], Awaitable[bytes]]) -> None:
        """Relay until the client closes its input."""
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._keep_connected)
            while line := await read_client():
                if line.strip():
                    await self._from_client(line if line.endswith(b"\n") else line + b"\n")
            tasks.cancel_scope.cancel()
        if self._connection is not None:
            await self._connection.stream.aclose()

    async def _from_client(self, line: bytes) -> None:
        request_id, method = _request_of(line)
        with anyio.move_on_after(self.reconnect_timeout):
            await self._up.wait()
        connection = self._connection
        if connection is None:
            if request_id is not None:
                await self.write_client(
                    _error_line(
                        request_id, method, f"the nspawn-mcp daemon is not reachable: {self._down_reason}"
                    )
                )
            return
        if request_id is not None:
            self._in_flight[json.dumps(request_id)] = (request_id, method)
        try:
            await connection.stream.send(line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the reader sees the end too, and answers what is in flight
        if method == "initialize":  # what a reconnection replays
            self._initialize = line
        elif method == "notifications/initialized":
            self._initialized = line

    async def _keep_connected(self) -> None:
        """Connect, relay, and after each loss connect again (backing off while that fails).

        ``_up`` is set once an attempt settles: with a connection, or (the daemon cannot be
        started) without one, so that calls waiting for it fail at once with the reason.
        """
        delay = 0.05
        while True:
            try:
                connection = await self.open_connection()
            except DaemonUnreachable as exc:
                self._down_reason = str(exc)
                log.warning("%s; retrying", exc)
                if exc.settled:
                    self._up.set()
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            await self._replay(connection)
            self._connection = connection
            self._up.set()
            await self._to_client(connection)
            await connection.stream.aclose()
            self._connection = None
            self._up = anyio.Event()
            self._down_reason = "the daemon stopped; reconnecting"
            await self._fail_in_flight()

    async def _replay(self, connection: Connection) -> None:
        """After a reconnect: put the new connection in the session the client believes it has."""
        if self._initialize is None:
            return
        request_id, _ = _request_of(self._initialize)
        self._swallow = json.dumps(request_id)
        await connection.stream.send(self._initialize)
        if self._initialized is not None:
            await connection.stream.send(self._initialized)

    async def _to_client(self, connection: Connection) -> None:
        while True:
            try:
                line = await connection.received.receive_until(b"\n", _MAX_REPLY)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                return
            except anyio.DelimiterNotFound:
                log.warning("the daemon sent a line over %d bytes; reconnecting", _MAX_REPLY)
                await connection.stream.aclose()
                return
            answered = _response_id(line)
            if answered is not None:
                if answered == self._swallow:
                    self._swallow = None
                    continue
                self._in_flight.pop(answered, None)
            await self.write_client(line + b"\n")

    async def _fail_in_flight(self) -> None:
        pending, self._in_flight = self._in_flight, {}
        for request_id, method in pending.values():
            await self.write_client(
                _error_line(
                    request_id,
                    method,
                    "the nspawn-mcp daemon restarted during this call, so whether it took effect is "
                    "unknown; list_sandboxes shows what exists",
                )
            )


def _request_of(line: bytes) -> tuple[object | None, str | None]:
    """A client line's request id (None for notifications and responses) and method."""
    try:
        message = json.loads(line)
    except ValueError:
        return None, None
    if not isinstance(message, dict):
        return None, None
    method = message.get("method")
    method = method if isinstance(method, str) else None
    return (message.get("id") if method is not None else None), method


def new_session() -> str:
    return secrets.token_hex(16)


async def serve_stdio(
    ensure_daemon: Callable[[], Awaitable[None]],
    socket_path: str,
    options: tuple[str, ...] | None,
    stdin: BinaryIO,
    stdout: BinaryIO,
) -> None:
    """Relay stdin/stdout to the daemon (started through ``ensure_daemon`` when it does not answer).

    ``options``: the daemon options this front end was given; None accepts any running daemon."""
    hello = Hello(session=new_session(), workdir=os.getcwd(), options=options)
    own_namespace = os.readlink("/proc/self/ns/mnt")

    async def open_connection() -> Connection:
        try:
            connection = await connect(socket_path, hello)
        except DaemonUnreachable as exc:
            if exc.settled:
                raise
            try:
                await ensure_daemon()
            except Exception as exc:  # any failure to start is reported the same way
                raise DaemonUnreachable(f"cannot start the daemon: {exc}", settled=True) from None
            connection = await connect(socket_path, hello)
        if connection.welcome.mount_namespace != own_namespace:
            log.warning(
                "the daemon sees another mount namespace (%s, here %s): host paths may differ",
                connection.welcome.mount_namespace,
                own_namespace,
            )
        return connection

    async def read_client() -> bytes:
        line: bytes = await anyio.to_thread.run_sync(stdin.readline)
        return line

    lock = anyio.Lock()

    async def write_client(line: bytes) -> None:
        async with lock:
            await anyio.to_thread.run_sync(_write_flush, stdout, line)

    await Relay(open_connection, write_client).run(read_client)


def _write_flush(stream: BinaryIO, data: bytes) -> None:
    stream.write(data)
    stream.flush()


def stdio_streams() -> tuple[BinaryIO, BinaryIO]:
    """The process's stdin and stdout as binary streams; stdout is then pointed at stderr, so that
    nothing else printed can corrupt the protocol."""
    stdout = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    return sys.stdin.buffer, stdout
