"""One MCP session per connection to the daemon's socket, for the client the connection is.

The peer's uid comes from the kernel (``SO_PEERCRED``); the front end's hello names its
session (see :mod:`.handshake`). The MCP session runs with that client set in
:data:`nspawn_mcp.identity.current_client`, which every request handler inherits, so
nothing a request says can change who it comes from. When the connection ends, the
service is told, and applies the policy's ``on_disconnect`` to the session's sandboxes.

Who may do what is decided here, once per connection, by :func:`admit`: an operator's
connection (``nspawn-mcp list`` / ``destroy``, see :mod:`.operator`) only from uid 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import mcp_types
from anyio.abc import SocketAttribute, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp.server.mcpserver import MCPServer
from mcp.shared.message import SessionMessage

from .. import __version__
from ..errors import SandboxError
from ..identity import OPERATOR, Client, current_client
from ..records import LiveSandbox
from .handshake import MAX_LINE, Hello, HelloError, Welcome, decode_hello, encode
from .operator import (
    MAX_REQUEST,
    DestroyRequest,
    OperatorError,
    OperatorRequest,
    decode_request,
    encode_reply,
)

__all__ = ["MAX_MESSAGE", "OperatorHandler", "SessionHooks", "admit", "serve_connection"]

log = logging.getLogger(__name__)

MAX_MESSAGE = 96 << 20
"""Longest MCP message a front end may send (a write_process_stdin of 8 MiB, JSON-escaped, fits)."""
_HELLO_TIMEOUT = 10.0
_UCRED = struct.Struct("3i")


OperatorHandler = Callable[[OperatorRequest], Awaitable[list[LiveSandbox] | None]]
"""Answers an operator's request: a listing, or None once done; raises SandboxError to refuse."""


async def _no_operator(request: OperatorRequest) -> list[LiveSandbox] | None:
    raise OperatorError("this daemon serves no operator requests")


@dataclass(frozen=True)
class SessionHooks:
    """What the daemon does when a client's connection starts and ends, and the options it runs with."""

    started: Callable[[Client], None]
    ended: Callable[[Client], Awaitable[None]]
    options: tuple[str, ...] = ()
    operator: OperatorHandler = _no_operator
    """The operator's requests."""


def admit(uid: int, hello: Hello, options: tuple[str, ...]) -> Client | str:
    """The client a connection is, from the peer's uid (the kernel's word) and its hello; or (a
    string) why it is refused. The one place that decides what a connection may do."""
    if hello.operator:
        if uid != 0:
            return (
                f"operator commands (nspawn-mcp list, destroy) are for root on the daemon's host; "
                f"this connection is uid {uid}"
            )
        return OPERATOR
    if hello.options is not None and hello.options != options:
        return (
            "the running daemon was started with other options ("
            + (" ".join(options) or "none")
            + "); run this front end with the same ones, or stop the daemon first with "
            "`nspawn-mcp daemon stop` (its sandboxes keep running)"
        )
    return Client(f"uid:{uid}", session=hello.session, workdir=hello.workdir if uid == 0 else None)


def peer_uid(stream: SocketStream) -> int:
    raw: socket.socket = stream.extra(SocketAttribute.raw_socket)  # noqa: S610 - anyio, not Django
    _pid, uid, _gid = _UCRED.unpack(raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return int(uid)


def _mount_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:
        return "unknown"


async def _greet(
    stream: SocketStream, received: BufferedByteReceiveStream, options: tuple[str, ...]
) -> Client | None:
    """Read the hello and answer it; None (after telling the peer why) if it is refused."""
    uid = peer_uid(stream)
    try:
        with anyio.fail_after(_HELLO_TIMEOUT):
            hello = decode_hello(await received.receive_until(b"\n", MAX_LINE))
    except (HelloError, anyio.DelimiterNotFound) as exc:
        await stream.send(encode(f"not an nspawn-mcp hello: {exc}"))
        return None
    except (TimeoutError, anyio.IncompleteRead, anyio.EndOfStream):
        return None
    client = admit(uid, hello, options)
    if isinstance(client, str):
        log.warning("refused a connection of uid %d: %s", uid, client, extra={"event": "refused"})
        await stream.send(encode(client))
        return None
    await stream.send(encode(Welcome(client.identity, __version__, _mount_namespace())))
    return client


async def serve_connection(stream: SocketStream, server: MCPServer[object], hooks: SessionHooks) -> None:
    """Serve one front end until it closes its end (or sends what is not MCP)."""
    async with stream:
        received = BufferedByteReceiveStream(stream)
        try:
            client = await _greet(stream, received, hooks.options)
        except (anyio.BrokenResourceError, OSError):
            return
        if client is None:
            return
        if client is OPERATOR:
            token = current_client.set(client)
            try:
                await _run_operator(stream, received, hooks.operator)
            finally:
                current_client.reset(token)
            return
        log.info(
            "client %s connected (session %s)",
            client.identity,
            client.session,
            extra={"client": client.identity},
        )
        token = current_client.set(client)
        hooks.started(client)
        try:
            await _run_session(stream, received, server)
        finally:
            current_client.reset(token)
            with anyio.CancelScope(shield=True):
                log.info("client %s disconnected", client.identity, extra={"client": client.identity})
                await hooks.ended(client)


async def _run_operator(
    stream: SocketStream, received: BufferedByteReceiveStream, handler: OperatorHandler
) -> None:
    """The operator's requests, one line each, until it closes its end."""
    while True:
        try:
            line = await received.receive_until(b"\n", MAX_REQUEST)
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
            return
        except anyio.DelimiterNotFound:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                await stream.send(encode_reply(f"a request is at most {MAX_REQUEST} bytes"))
            return
        try:
            request = decode_request(line)
            if isinstance(request, DestroyRequest):
                log.info(
                    "the operator destroys %s",
                    request.sandbox_id,
                    extra={"sandbox": request.sandbox_id, "event": "operator-destroy"},
                )
            reply: list[LiveSandbox] | str | None = await handler(request)
        except (OperatorError, SandboxError) as exc:
            reply = str(exc)
        except Exception:
            log.exception("an operator request failed")
            reply = "the daemon failed to answer; its log has the detail"
        try:
            await stream.send(encode_reply(reply))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return


async def _run_session(
    stream: SocketStream, received: BufferedByteReceiveStream, server: MCPServer[object]
) -> None:
    incoming_send, incoming = anyio.create_memory_object_stream[SessionMessage | Exception](16)
    outgoing, outgoing_receive = anyio.create_memory_object_stream[SessionMessage](16)

    async def read() -> None:
        async with incoming_send:
            while True:
                try:
                    line = await received.receive_until(b"\n", MAX_MESSAGE)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, OSError):
                    return
                except anyio.DelimiterNotFound:
                    log.warning("a client sent a message over %d bytes; closing its connection", MAX_MESSAGE)
                    return
                try:
                    message = mcp_types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                except ValueError as exc:
                    await incoming_send.send(exc)
                    continue
                await incoming_send.send(SessionMessage(message))

    async def write() -> None:
        async with outgoing_receive:
            async for message in outgoing_receive:
                line = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                try:
                    await stream.send(line.encode() + b"\n")
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(read)
        tasks.start_soon(write)
        # the SDK's session loop over our streams (MCPServer offers no public way to serve a stream pair)
        lowlevel = server._lowlevel_server
        await lowlevel.run(incoming, outgoing, lowlevel.create_initialization_options())
        tasks.cancel_scope.cancel()
