"""A thin typed wrapper over one dbus-fast connection to the system bus.

dbus-fast's ``call`` returns error replies instead of raising; :meth:`Bus.call`
raises our errors instead, mapped in :mod:`.dbus_errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import AuthError

from ..errors import BackendUnavailable
from .dbus_errors import map_dbus_error

__all__ = ["Bus", "SignalHandler"]

log = logging.getLogger(__name__)

SignalHandler = Callable[[Message], None]


class Bus:
    """One connection; methods are the D-Bus primitives the clients need."""

    def __init__(self, connection: MessageBus) -> None:
        self._connection = connection

    @classmethod
    async def connect(cls, address: str) -> Bus:
        try:
            connection = await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()
        except (OSError, AuthError) as exc:
            log.warning("cannot connect to the system bus at %s: %s", address, exc)
            raise BackendUnavailable("the system bus is not reachable; run `nspawn-mcp doctor`") from None
        return cls(connection)

    async def call(
        self,
        *,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        unix_fds: Sequence[int] = (),
        operation: str | None = None,
    ) -> list[Any]:
        """Call a method; return the reply body or raise a mapped error."""
        message = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
            unix_fds=list(unix_fds),
        )
        try:
            reply = await self._connection.call(message)
        except (OSError, EOFError) as exc:
            log.warning("D-Bus connection failed during %s: %s", member, exc)
            raise BackendUnavailable(f"{operation or member}: the system bus connection failed") from None
        if reply is None:
            raise BackendUnavailable(f"{operation or member}: no reply from the system bus")
        for fd in reply.unix_fds:  # no call of ours expects descriptors back
            _close_quietly(fd)
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise map_dbus_error(reply.error_name, text, operation or member)
        return list(reply.body)

    async def get_property(
        self, *, destination: str, path: str, interface: str, name: str, operation: str
    ) -> Any:
        """``org.freedesktop.DBus.Properties.Get``, unwrapped from its variant."""
        reply = await self.call(
            destination=destination,
            path=path,
            interface="org.freedesktop.DBus.Properties",
            member="Get",
            signature="ss",
            body=[interface, name],
            operation=operation,
        )
        return reply[0].value

    async def add_match(self, rule: str) -> None:

        await self.call(
            destination="org.freedesktop.DBus",
            path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus",
            member="AddMatch",
            signature="s",
            body=[rule],
        )

    def add_signal_handler(self, handler: SignalHandler) -> None:
        def filtered(message: Message) -> None:
            if message.message_type == MessageType.SIGNAL:
                handler(message)

        self._connection.add_message_handler(filtered)

    @property
    def connected(self) -> bool:
        return bool(self._connection.connected)

    def disconnect(self) -> None:
        self._connection.disconnect()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
