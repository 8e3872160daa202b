"""The daemon process: one per host, the only one that talks to systemd and machined.

Start-up, in order:

1. Where PID 1 is not systemd the daemon is a unit of the project's private systemd
   (:mod:`nspawn_mcp.box`). Its unit enters the host's mount namespace before the
   daemon starts (through the box's anchor), so host paths mean to it what they mean
   to its clients; it keeps the box's pid namespace, and reaches the box's
   notification and journal sockets through ``/proc/BOXPID/root``.
2. The lock: a second daemon on the same state directory refuses to start.
3. The service: reconcile with what systemd and machined report, adopt, reap.
4. The listeners: the unix socket for the front ends, and streamable HTTP where configured
   (always behind bearer tokens, on loopback too: every local user can reach loopback).
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
import anyio.abc
from anyio.abc import SocketStream
from mcp.server.mcpserver import MCPServer

from ..app import build_server
from ..auth import BearerTokenVerifier, TokenError, TokenStore, current_identity, http_auth_settings
from ..auth.hosts import transport_security
from ..auth.tokens import default_token_file
from ..errors import InvalidRequest
from ..identity import Client
from ..policy import PolicySet
from ..policy.loader import PolicyError
from ..records import LiveSandbox
from ..runtime import ServerConfig, open_service
from ..service import SandboxService
from ..throttle import Throttle
from .operator import DestroyRequest, OperatorRequest
from .sessions import SessionHooks, serve_connection

__all__ = [
    "REFUSED",
    "SYSTEMD_ROOT_ENV",
    "DaemonConfig",
    "DaemonError",
    "HttpAddress",
    "check_config",
    "run_daemon",
]

log = logging.getLogger(__name__)

SYSTEMD_ROOT_ENV = "NSPAWN_MCP_SYSTEMD_ROOT"
"""Set where the daemon runs in the box: where the box's filesystem (its ``/run``) is seen from the
host's mount namespace, which the daemon's unit puts it in (``/proc/BOXPID/root``)."""


def systemd_path(path: str) -> str:
    """A path of the systemd that runs us (its notification or journal socket), as we reach it."""
    root = os.environ.get(SYSTEMD_ROOT_ENV)
    return path if not root or not path.startswith("/") else root + path


REFUSED = 78
"""The exit status of a daemon that refused to start (``EX_CONFIG``): its unit does not restart it,
since the next attempt would be refused alike (a bad policy, no tokens, the HTTP port taken)."""


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
    http: HttpAddress | None = None
    """Where to serve streamable HTTP (``http://HOST:PORT/mcp``); None: the unix socket only."""
    http_names: tuple[str, ...] = ()
    """Host names clients use to reach the HTTP address (DNS-rebinding protection admits only these)."""


@dataclass(frozen=True)
class HttpAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HttpAddress:
        """``HOST:PORT``, ``[IPv6]:PORT``; raises ValueError saying what is wrong."""
        host, separator, port = text.rpartition(":")
        if not separator or not port.isdigit() or not host:
            raise ValueError(f"--http {text!r}: expected HOST:PORT, like 127.0.0.1:8765 or [::1]:8765")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not 0 < int(port) < 65536:
            raise ValueError(f"--http {text!r}: the port must be 1 to 65535")
        return cls(host, int(port))

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}"


class _Notifier:
    """``sd_notify`` to the systemd that runs us (the private one's socket through its root, see
    :func:`systemd_path`); a no-op when no systemd asked for notifications."""

    def __init__(self) -> None:
        self._socket: socket.socket | None = None
        address = os.environ.pop("NOTIFY_SOCKET", None)
        if not address:
            return
        target = "\0" + address[1:] if address.startswith("@") else systemd_path(address)
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


def _token_store(config: DaemonConfig) -> TokenStore | None:
    """The tokens HTTP clients must present; refuses to serve HTTP without any."""
    if config.http is None:
        return None
    store = TokenStore(default_token_file(config.server.layout))
    try:
        identities = store.identities()
    except TokenError as exc:
        raise DaemonError(f"HTTP needs bearer tokens, and the token file is not usable: {exc}") from None
    if not identities:
        raise DaemonError(
            f"HTTP needs a bearer token, on loopback too (any local user can reach it), and "
            f"{store.path} has none: make one with `nspawn-mcp token add NAME`"
        )
    try:
        transport_security(config.http.host, config.http.port, config.http_names)
    except ValueError as exc:
        raise DaemonError(f"{exc} (name them with --http-host-name)") from None
    return store


def check_config(config: DaemonConfig) -> tuple[PolicySet, TokenStore | None]:
    """What would stop the daemon from starting, found before it starts: policies, tokens, names.
    Returns the policies and (where HTTP is served) the token store."""
    try:
        policies = config.server.load_policies()
    except PolicyError as exc:
        raise DaemonError(str(exc)) from None
    return policies, _token_store(config)


def run_daemon(config: DaemonConfig) -> None:
    """Run until SIGTERM or SIGINT; sandboxes outlive the daemon (the next one adopts them)."""
    notifier = _Notifier()
    layout = config.server.layout
    policies, store = check_config(config)  # fail fast, before any client connects
    _raise_open_file_limit()
    with _single_daemon(layout.daemon_lock):
        try:
            anyio.run(_serve, config, policies, store, notifier)
        except BaseExceptionGroup as group:  # a refusal from inside a task group (HTTP's address)
            refusals, others = group.split(DaemonError)
            if refusals is None or others is not None:
                raise
            raise _first_leaf(refusals) from None


def _first_leaf(group: BaseExceptionGroup[DaemonError]) -> DaemonError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


async def _serve(
    config: DaemonConfig, policies: PolicySet, store: TokenStore | None, notifier: _Notifier
) -> None:
    layout = config.server.layout
    throttle = Throttle(rate=config.max_calls_per_second, burst=config.max_calls_per_second * 4)
    async with open_service(config.server, policies) as service:

        @asynccontextmanager
        async def shared_service() -> AsyncIterator[SandboxService]:
            yield service

        server = build_server(
            shared_service,
            policies,
            throttle,
            identify=_token_client,
            token_verifier=None if store is None else BearerTokenVerifier(store),
            auth=None if config.http is None else http_auth_settings(config.http.url),
        )
        stopping = False

        async def session_ended(client: Client) -> None:
            if not stopping:  # a daemon that stops is not a client that leaves
                await service.session_ended(client)

        async def operator(request: OperatorRequest) -> list[LiveSandbox] | None:
            if isinstance(request, DestroyRequest):
                await service.operator_destroy(request.sandbox_id)
                return None
            return await service.live_sandboxes()

        hooks = SessionHooks(
            started=service.session_started, ended=session_ended, options=config.options, operator=operator
        )
        async with _unix_listener(layout.daemon_socket, config.socket_group) as listener:

            async def handle(stream: SocketStream) -> None:
                await serve_connection(stream, server, hooks)  # type: ignore[arg-type]

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(listener.serve, handle)
                log.info("serving MCP on %s", layout.daemon_socket)
                if config.http is not None:
                    await tasks.start(_serve_http, server, config.http, config.http_names, tasks.cancel_scope)
                notifier.notify("READY=1")
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for received in signals:
                        log.info("stopping on %s; the sandboxes keep running", signal.Signals(received).name)
                        notifier.notify("STOPPING=1")
                        stopping = True
                        tasks.cancel_scope.cancel()
                        break


def _token_client() -> Client:
    """The client of an HTTP request: its bearer token's identity (the SDK admitted nothing else)."""
    identity = current_identity()
    if identity is None:  # only the unix socket's sessions come without a token, and they set theirs
        raise InvalidRequest("this request carries no identity")
    return Client(f"token:{identity.name}", policies=frozenset(identity.policies) or None, workdir="/")


async def _serve_http(
    server: MCPServer[SandboxService],
    address: HttpAddress,
    names: tuple[str, ...],
    stop: anyio.CancelScope,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Streamable HTTP at ``address`` until the daemon stops (uvicorn, on our own socket)."""
    import uvicorn

    app = server.streamable_http_app(
        host=address.host, transport_security=transport_security(address.host, address.port, names)
    )
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((address.host, address.port))
    except OSError as exc:
        listening.close()
        raise DaemonError(f"cannot serve HTTP at {address.url}: {exc.strerror}") from None
    listening.listen(128)
    http = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    log.info("serving MCP at %s/mcp (bearer tokens required)", address.url)
    task_status.started()
    try:
        await http.serve(sockets=[listening])
    finally:
        listening.close()
    stop.cancel()  # uvicorn took the stop signal: the whole daemon stops
