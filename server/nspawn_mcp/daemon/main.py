"""The daemon process: one per host, the only one that talks to systemd and machined.

Start-up, in order:

1. Where PID 1 is not systemd the daemon is a unit of the project's private systemd
   (:mod:`nspawn_mcp.box`), so it starts in the box's pid and mount namespaces. It
   keeps the box's pid namespace but joins the host's mount namespace (the file named
   by ``NSPAWN_MCP_HOST_MOUNT_NS``), so host paths mean what they mean to its clients.
   The readiness socket is connected before that, while its path is still visible.
2. The lock: a second daemon on the same state directory refuses to start.
3. The service: reconcile with what systemd and machined report, adopt, reap.
4. The listeners: the unix socket for the front ends (and HTTP where configured).
5. ``READY=1`` to systemd.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio
from anyio.abc import SocketStream

from .. import kernel
from ..app import build_server
from ..identity import Client
from ..policy import PolicySet
from ..runtime import ServerConfig, open_service
from ..service import SandboxService
from ..throttle import Throttle
from .sessions import SessionHooks, serve_connection

__all__ = ["DaemonConfig", "DaemonError", "join_host_mounts", "run_daemon"]

log = logging.getLogger(__name__)

HOST_MOUNT_NS_ENV = "NSPAWN_MCP_HOST_ANCHOR"
"""Set where the daemon runs in the box: the file naming the anchor process (see :mod:`nspawn_mcp.box`)."""


class DaemonError(RuntimeError):
    """The daemon cannot start; the message says why and what to do."""


@dataclass(frozen=True)
class DaemonConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    max_calls_per_second: float = 50.0
    socket_group: str | None = None
    """A group whose members may connect to the daemon's socket (default: root only)."""
    options: tuple[str, ...] = ()
    """The options as given on the command line (front ends compare theirs with them)."""


class _Notifier:
    """``sd_notify``: connected at start, so it still works after the mount namespace changes."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        address = os.environ.pop("NOTIFY_SOCKET", None)
        if not address:
            return
        target = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.connect(target)
        except OSError as exc:
            log.warning("cannot reach systemd's notification socket: %s", exc)
            self._socket.close()
            self._socket = None

    def notify(self, state: str) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.send(state.encode())


def join_host_mounts() -> None:
    """Join the host's mount namespace, held by the box's anchor (where the daemon runs in the box).

    Must run while the process has one thread: the kernel refuses to move a process
    whose threads share its filesystem context.
    """
    anchor_file = os.environ.pop(HOST_MOUNT_NS_ENV, None)
    if not anchor_file:
        return
    try:
        anchor = int(Path(anchor_file).read_text())
        fd = os.open(f"/proc/{anchor}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise DaemonError(f"cannot reach the host's mount namespace through {anchor_file}: {exc}") from None
    try:
        kernel.setns(fd, kernel.CLONE_NEWNS)
    finally:
        os.close(fd)
    os.chdir("/")


@contextlib.contextmanager
def _single_daemon(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise DaemonError(
                f"another nspawn-mcp daemon already runs on {lock_path.parent} ({holder}); "
                "there is one per host: `nspawn-mcp daemon status` shows it"
            ) from None
        _write_holder(lock)
        yield


def _write_holder(lock: IO[str]) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} in {os.readlink('/proc/self/ns/pid')}\n")
    lock.flush()


@asynccontextmanager
async def _unix_listener(path: Path, group: str | None) -> AsyncIterator[anyio.abc.SocketListener]:
    await anyio.Path(path.parent).mkdir(parents=True, exist_ok=True, mode=0o755)
    await anyio.Path(path).unlink(missing_ok=True)  # ours: the lock says no other daemon runs
    listener = await anyio.create_unix_listener(path, mode=0o600 if group is None else 0o660)
    try:
        if group is not None:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise DaemonError(f"--socket-group {group!r}: no such group") from None
            os.chown(path, 0, gid)
        yield listener
    finally:
        await listener.aclose()
        await anyio.Path(path).unlink(missing_ok=True)


def _raise_open_file_limit() -> None:
    """Every egress sandbox may hold up to 64 relayed connections (two descriptors each): the
    soft limit of 1024 would run out long before the hard one, which is ours to take."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_daemon(config: DaemonConfig) -> None:
    """Run until SIGTERM or SIGINT; sandboxes outlive the daemon (the next one adopts them)."""
    notifier = _Notifier()
    join_host_mounts()
    layout = config.server.layout
    policies = config.server.load_policies()  # fail fast, before any client connects
    _raise_open_file_limit()
    with _single_daemon(layout.daemon_lock):
        anyio.run(_serve, config, policies, notifier)


async def _serve(config: DaemonConfig, policies: PolicySet, notifier: _Notifier) -> None:
    layout = config.server.layout
    throttle = Throttle(rate=config.max_calls_per_second, burst=config.max_calls_per_second * 4)
    async with open_service(config.server, policies) as service:

        @asynccontextmanager
        async def shared_service() -> AsyncIterator[SandboxService]:
            yield service

        server = build_server(shared_service, policies, throttle)
        stopping = False

        async def session_ended(client: Client) -> None:
            if not stopping:  # a daemon that stops is not a client that leaves
                await service.session_ended(client)

        hooks = SessionHooks(started=service.session_started, ended=session_ended, options=config.options)
        async with _unix_listener(layout.daemon_socket, config.socket_group) as listener:

            async def handle(stream: SocketStream) -> None:
                await serve_connection(stream, server, hooks)  # type: ignore[arg-type]

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listener.serve, handle)
                log.info("serving MCP on %s", layout.daemon_socket)
                notifier.notify("READY=1")
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for received in signals:
                        log.info("stopping on %s; the sandboxes keep running", signal.Signals(received).name)
                        notifier.notify("STOPPING=1")
                        stopping = True
                        tasks.cancel_scope.cancel()
                        break
