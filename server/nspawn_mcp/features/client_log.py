"""The ``logging`` capability: a client that sets a level (``logging/setLevel``) receives the
server's events about its own sandboxes at that level and above, as ``notifications/message``
(see :mod:`nspawn_mcp.events` for which events, and whose).

Handshake-era protocol versions only: from 2026-07-28 on, log delivery is a per-request opt-in
and ``logging/setLevel`` is gone (SEP-2577).
"""

from __future__ import annotations

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, EmptyResult, SetLevelRequestParams

from ..errors import SandboxError
from ..events import SandboxEvent
from ..service import SandboxService
from .caller import Guard, as_caller, calling_client

__all__ = ["LOGGER", "register_logging"]

LOGGER = "nspawn-mcp"
"""The ``logger`` of every message the server sends."""


def _connection(session: ServerSession) -> Connection:
    """The connection a request came on. The SDK keeps it private on the session; the lowlevel
    handlers of ``logging/setLevel`` have no other way to it (the one private access here)."""
    connection: Connection = session._connection
    return connection


def register_logging(mcp: MCPServer[SandboxService], guard: Guard) -> None:
    caller = as_caller(guard)

    async def set_level(
        ctx: ServerRequestContext[SandboxService], params: SetLevelRequestParams
    ) -> EmptyResult:
        try:
            client = await caller(calling_client)
        except (SandboxError, ToolError) as exc:
            raise MCPError(INTERNAL_ERROR, str(exc)) from None
        connection = _connection(ctx.session)
        feed = ctx.lifespan_context.events

        async def deliver(event: SandboxEvent) -> None:
            await connection.notify(
                "notifications/message", {"level": event.level, "logger": LOGGER, "data": event.data()}
            )

        if feed.subscribe(connection, client, params.level, deliver):
            connection.exit_stack.callback(feed.unsubscribe, connection)
        return EmptyResult()

    mcp._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_level)
