"""The daemon's own TCP listeners (egress relays, port forwards): one socket, one accept loop.

anyio's ``create_tcp_listener`` hides its socket in a MultiListener, whose ``serve``
ends on the first accept error, EMFILE included: one full file table would stop a
listener for good. Here the errors of the one connection being accepted are skipped,
running out of descriptors or memory backs off until connections close, and only an
error of the listener itself ends the loop (for its owner's error boundary to log).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import anyio.abc

__all__ = ["accept_forever", "tcp_listener"]

log = logging.getLogger(__name__)

ACCEPT_BACKOFF = 0.1
"""After EMFILE and the like: time for other connections to close."""
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_CONNECTION_ERRORS = frozenset(
    {
        errno.ECONNABORTED,
        errno.ECONNRESET,
        errno.EPROTO,
        errno.EPERM,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
"""accept(2)'s errors of the one connection being accepted, not of the listener."""


async def tcp_listener(host: str, port: int) -> anyio.abc.SocketListener:
    """One listening socket on ``host`` (IPv4 or IPv6 only) and ``port`` (0: a free one)."""
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        return await anyio.abc.SocketListener.from_socket(sock)
    except BaseException:
        sock.close()
        raise


async def accept_forever(
    listener: anyio.abc.SocketListener,
    tasks: anyio.abc.TaskGroup,
    handle: Callable[[anyio.abc.SocketStream], Coroutine[Any, Any, None]],
    admit: Callable[[], bool],
    what: str,
) -> None:
    """Accept connections until cancelled; each one ``admit`` takes (it reserves a slot, or says
    why not and answers False) is handled by ``handle`` in ``tasks``, the others are closed.
    ``what`` names the listener in the log. Raises OSError when the listener itself is broken."""
    out_of_resources = False
    while True:
        try:
            client = await listener.accept()
        except OSError as exc:
            if exc.errno in _CONNECTION_ERRORS:
                log.info("%s: accept failed: %s", what, exc)
                continue
            if exc.errno not in _OUT_OF_RESOURCES:
                raise
            if not out_of_resources:
                log.warning("%s cannot accept: %s", what, exc)
            out_of_resources = True
            await anyio.sleep(ACCEPT_BACKOFF)
            continue
        out_of_resources = False
        if not admit():
            await client.aclose()
            continue
        tasks.start_soon(handle, client)
