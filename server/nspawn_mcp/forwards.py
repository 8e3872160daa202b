"""Port forwards: host listeners whose connections lead into a sandbox's own loopback.

Each exposed port is a listening socket in the daemon's (the host's) network
namespace. Every accepted connection asks the sandbox's supervisor, over its
control socket, to ``connect`` to the port inside the sandbox; then bytes are
copied both ways until either side ends. The sandbox never gets a socket of the
host's: it only answers connections the supervisor opens inside its own network
namespace, so a forward leads in and never out, whatever the sandbox's network
policy.

Threat: everything after the supervisor's reply line is the sandbox's bytes,
passed to the client untouched (the forward's whole purpose); nothing here
parses it. One forward's failure (a broken listener, a bug) is logged and ends
that forward only: each runs behind an error boundary of its own, never in the
daemon's root task group. Connections per forward are capped; the ones beyond are
closed at once.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import anyio.abc

from .errors import SandboxError
from .listeners import accept_forever, tcp_listener

__all__ = ["Connector", "PortForwards", "port_forwards"]

log = logging.getLogger(__name__)

Connector = Callable[[str, int], Awaitable[anyio.abc.ByteStream]]
"""Opens a byte stream to (sandbox id, port) inside the sandbox."""

_CHUNK = 256 << 10
_CONNECT_TIMEOUT = 20.0


async def _pipe(source: anyio.abc.ByteStream, destination: anyio.abc.ByteStream) -> None:
    """Copy until ``source`` ends, then pass the end on. A broken side ends the whole connection."""
    while True:
        try:
            chunk = await source.receive(_CHUNK)
        except anyio.EndOfStream:
            break
        await destination.send(chunk)
    await destination.send_eof()


@dataclass
class _Forward:
    """One exposed port: its listener's scope and its open connections."""

    sandbox_id: str
    sandbox_port: int
    host: str
    host_port: int
    max_connections: int
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    connections: int = 0
    stopped: anyio.Event = field(default_factory=anyio.Event)
    """Set once its listener and connections are closed."""


def _admit(forward: _Forward) -> bool:
    """Take a connection slot of ``forward``; False (and it is closed) at the policy's maximum."""
    if forward.connections >= forward.max_connections:
        log.info(
            "sandbox %s: closed a connection to port %d: %d open, the policy's maximum",
            forward.sandbox_id,
            forward.sandbox_port,
            forward.connections,
        )
        return False
    forward.connections += 1
    return True


class PortForwards:
    """The daemon's port forwards, by (sandbox id, sandbox port)."""

    def __init__(self, tasks: anyio.abc.TaskGroup, connect: Connector) -> None:
        self._tasks = tasks
        self._connect = connect
        self._forwards: dict[tuple[str, int], _Forward] = {}

    async def open(
        self, sandbox_id: str, sandbox_port: int, host: str, host_port: int = 0, max_connections: int = 64
    ) -> int:
        """Listen on ``host``:``host_port`` (0: a free port the kernel picks) and forward each connection
        to ``sandbox_port`` in the sandbox; returns the port listened on. Raises OSError if it cannot."""
        key = (sandbox_id, sandbox_port)
        if key in self._forwards:
            raise ValueError(f"port {sandbox_port} of {sandbox_id} is already forwarded")
        listener = await tcp_listener(host, host_port)
        bound = int(listener.extra(anyio.abc.SocketAttribute.local_port))  # noqa: S610 - not Django
        forward = _Forward(sandbox_id, sandbox_port, host, bound, max_connections)
        self._forwards[key] = forward
        self._tasks.start_soon(self._serve, forward, listener)
        return bound

    async def close(self, sandbox_id: str, sandbox_port: int) -> bool:
        """Stop forwarding ``sandbox_port`` and return once its listener and connections are closed;
        False if it was not forwarded."""
        forward = self._forwards.pop((sandbox_id, sandbox_port), None)
        if forward is None:
            return False
        forward.scope.cancel()
        with anyio.CancelScope(shield=True):
            await forward.stopped.wait()
        return True

    async def close_sandbox(self, sandbox_id: str) -> None:
        """Stop every forward of the sandbox."""
        for owner, port in list(self._forwards):
            if owner == sandbox_id:
                await self.close(owner, port)

    def connections(self, sandbox_id: str, sandbox_port: int) -> int:
        """Connections open now through one forward (0 if it does not exist)."""
        forward = self._forwards.get((sandbox_id, sandbox_port))
        return 0 if forward is None else forward.connections

    async def _serve(self, forward: _Forward, listener: anyio.abc.SocketListener) -> None:
        """Accept until closed, behind this forward's own error boundary."""
        try:
            with forward.scope:
                try:
                    async with listener, anyio.create_task_group() as tasks:
                        await accept_forever(
                            listener,
                            tasks,
                            functools.partial(self._carry, forward),
                            functools.partial(_admit, forward),
                            f"sandbox {forward.sandbox_id}: the forward of port {forward.sandbox_port}",
                        )
                except Exception:
                    log.exception(
                        "sandbox %s: the forward of port %d failed and stopped",
                        forward.sandbox_id,
                        forward.sandbox_port,
                    )
        finally:
            if self._forwards.get((forward.sandbox_id, forward.sandbox_port)) is forward:
                del self._forwards[(forward.sandbox_id, forward.sandbox_port)]
            forward.stopped.set()

    async def _carry(self, forward: _Forward, client: anyio.abc.SocketStream) -> None:
        try:
            async with client:
                try:
                    with anyio.fail_after(_CONNECT_TIMEOUT):
                        upstream = await self._connect(forward.sandbox_id, forward.sandbox_port)
                except (SandboxError, OSError, TimeoutError) as exc:
                    log.info(
                        "sandbox %s: a connection to port %d was refused: %s",
                        forward.sandbox_id,
                        forward.sandbox_port,
                        exc,
                    )
                    return
                async with upstream:
                    try:
                        async with anyio.create_task_group() as pipes:
                            pipes.start_soon(_pipe, client, upstream)
                            pipes.start_soon(_pipe, upstream, client)
                    except* (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass  # one side went away: the connection is over
        except Exception:
            log.exception("sandbox %s: a forwarded connection failed", forward.sandbox_id)
        finally:
            forward.connections -= 1


@asynccontextmanager
async def port_forwards(connect: Connector) -> AsyncIterator[PortForwards]:
    """Port forwards that all close when the context ends (the daemon stops)."""
    async with anyio.create_task_group() as tasks:
        try:
            yield PortForwards(tasks, connect)
        finally:
            tasks.cancel_scope.cancel()
