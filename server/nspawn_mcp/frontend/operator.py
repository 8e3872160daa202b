"""The operator's side of its requests to the daemon (``nspawn-mcp list`` and ``destroy``)."""

from __future__ import annotations

import anyio

from ..daemon.handshake import Hello
from ..daemon.operator import MAX_REPLY, OperatorError, OperatorRequest, decode_reply, encode_request
from ..records import LiveSandbox
from .stdio import DaemonUnreachable, connect, new_session

__all__ = ["ask_daemon"]

_TIMEOUT = 60.0
"""A destroy waits for systemd to stop the sandbox (its stop timeout is 5 s)."""


async def ask_daemon(socket_path: str, request: OperatorRequest) -> list[LiveSandbox] | None:
    """Send one request as the operator; raises DaemonUnreachable, or OperatorError with the
    daemon's reason (a non-root caller is refused at the hello)."""
    connection = await connect(socket_path, Hello(session=new_session(), operator=True))
    async with connection.stream:
        try:
            with anyio.fail_after(_TIMEOUT):
                await connection.stream.send(encode_request(request))
                return decode_reply(await connection.received.receive_until(b"\n", MAX_REPLY))
        except TimeoutError:
            raise OperatorError(f"the daemon did not answer in {_TIMEOUT:g} s") from None
        except (OSError, anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
            raise DaemonUnreachable(f"the daemon closed the connection: {exc}") from None
        except anyio.DelimiterNotFound:
            raise OperatorError(f"the daemon's answer is longer than {MAX_REPLY} bytes") from None
