"""What the server tells a client about its own sandboxes: creates, destroys, refusals, expiries.

The service :meth:`EventFeed.emit` s an event without waiting (it never blocks a create, a
destroy or the reaper); one pump task (:meth:`EventFeed.run`) hands each event to the
subscribers it belongs to. An event belongs to the client that owns the sandbox, or that
made the refused request: the same identity, and the same connection where the sandbox
belongs to one (the rule :mod:`nspawn_mcp.service` applies to seeing a sandbox). Never
another client's.

Subscribers are MCP connections that asked for log messages (``logging/setLevel``, see
:mod:`nspawn_mcp.features.client_log`); the feed itself knows nothing of MCP.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Literal, get_args

import anyio

from .identity import Client

__all__ = ["LEVELS", "Action", "EventFeed", "Level", "SandboxEvent"]

log = logging.getLogger(__name__)

Level = Literal["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"]
LEVELS: tuple[Level, ...] = get_args(Level)
"""Syslog's severities (RFC 5424), least severe first, as MCP's logging uses them."""

Action = Literal["created", "destroyed", "refused", "expired", "reaped"]

_QUEUE = 256
"""Events waiting for the pump; beyond that they are dropped (and the drop is logged)."""
DELIVERY_TIMEOUT = 1.0
"""How long one subscriber may take to accept one event before it is skipped for it."""


@dataclass(frozen=True)
class SandboxEvent:
    level: Level
    action: Action
    message: str
    """One sentence for the client, safe to show (like an error message)."""
    owner: str
    """The identity it belongs to."""
    session: str | None
    """The connection it belongs to; None: every connection of ``owner``."""
    sandbox_id: str | None = None

    def belongs_to(self, client: Client) -> bool:
        return self.owner == client.identity and self.session in (None, client.session)

    def data(self) -> dict[str, str]:
        """What a client receives (a log message's ``data``)."""
        shown = {"event": self.action, "message": self.message}
        return shown | ({"sandbox_id": self.sandbox_id} if self.sandbox_id is not None else {})


Deliver = Callable[[SandboxEvent], Awaitable[None]]


@dataclass
class _Subscriber:
    client: Client
    level: Level
    deliver: Deliver

    def wants(self, event: SandboxEvent) -> bool:
        return event.belongs_to(self.client) and LEVELS.index(event.level) >= LEVELS.index(self.level)


class EventFeed:
    def __init__(self) -> None:
        self._subscribers: dict[Hashable, _Subscriber] = {}
        self._queue: deque[SandboxEvent] = deque()
        self._wakeup: anyio.Event | None = None
        self.dropped = 0

    def subscribe(self, key: Hashable, client: Client, level: Level, deliver: Deliver) -> bool:
        """Send ``client``'s events at ``level`` and above to ``deliver`` (again: a new level).
        Returns whether ``key`` is new (its owner must :meth:`unsubscribe` it when it ends)."""
        new = key not in self._subscribers
        self._subscribers[key] = _Subscriber(client, level, deliver)
        return new

    def unsubscribe(self, key: Hashable) -> None:
        self._subscribers.pop(key, None)

    def emit(self, event: SandboxEvent) -> None:
        """Queue ``event`` for its subscribers, without waiting; nothing happens if nobody listens."""
        if not any(subscriber.wants(event) for subscriber in self._subscribers.values()):
            return
        if len(self._queue) >= _QUEUE:
            self.dropped += 1
            log.warning("dropped a client event (%d so far): the event queue is full", self.dropped)
            return
        self._queue.append(event)
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self) -> None:
        """Forever: deliver queued events, each subscriber bounded by :data:`DELIVERY_TIMEOUT`."""
        while True:
            if not self._queue:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            event = self._queue.popleft()
            for key, subscriber in list(self._subscribers.items()):
                if not subscriber.wants(event):
                    continue
                with anyio.move_on_after(DELIVERY_TIMEOUT) as scope:
                    try:
                        await subscriber.deliver(event)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        self.unsubscribe(key)
                if scope.cancelled_caught:
                    log.info("a client took over %.1f s to take an event; skipped", DELIVERY_TIMEOUT)
