"""Logging to journald with its native protocol: one datagram of structured fields per record.

Under systemd, stderr reaches the journal too, but as lines of text; the native
protocol keeps the fields: the priority, the code location, the logger, and ours,
``NSPAWN_MCP_SANDBOX`` and ``NSPAWN_MCP_CLIENT``, so that
``journalctl NSPAWN_MCP_SANDBOX=sbx-1a2b3c4d`` tells one sandbox's story, and
``NSPAWN_MCP_EVENT`` (``created``, ``destroyed``, ``expired``, ``refused``, ... see
:data:`EVENTS`), ``NSPAWN_MCP_POLICY`` and ``NSPAWN_MCP_RULE`` where a record has them, so
that ``journalctl NSPAWN_MCP_EVENT=refused`` lists every refusal.

The protocol (https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): an ``AF_UNIX`` datagram
to ``/run/systemd/journal/socket`` holding ``KEY=value\\n`` for each field; a value
with a newline is sent as ``KEY\\n``, its length as 64-bit little endian, the value
and ``\\n``. An entry too large for one datagram goes in a sealed memfd, sent as the
only content of an otherwise empty datagram.

The socket is connected once, when the handler is made (the daemon may do that
before it changes its mount namespace), and never again: journald's socket is held
by systemd (``systemd-journald.socket``) and survives journald's restarts. Sending
blocks while journald's queue is full, as ``sd_journal_send`` does. ``emit`` never
raises: a failure goes to ``Handler.handleError``, like every logging handler's.

Sandbox and client come from the record (``log.info("...", extra={"sandbox": id,
"client": who})``) or, for every record logged inside it, from :func:`log_context`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path

from .identity import LOCAL, current_client

__all__ = [
    "EVENTS",
    "JOURNAL_SOCKET",
    "JournalHandler",
    "LogContext",
    "configure_logging",
    "encode_entry",
    "journal_available",
    "log_context",
    "syslog_priority",
]

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

EVENTS = frozenset(
    {
        "created",
        "create-failed",
        "destroyed",
        "expired",
        "idled-out",
        "stopped",
        "disconnected",
        "refused",
        "operator-destroy",
    }
)
"""What ``NSPAWN_MCP_EVENT`` says happened: a sandbox was created; destroyed by its owner (or the
operator); destroyed by the reaper because it expired, idled out, stopped on its own, or its client
disconnected; a request or connection was refused; the operator asked to destroy a sandbox."""

_EXTRA_FIELDS = (("NSPAWN_MCP_EVENT", "event"), ("NSPAWN_MCP_POLICY", "policy"), ("NSPAWN_MCP_RULE", "rule"))

IDENTIFIER = "nspawn-mcp"

_FIELD_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
"""journald's rule for fields a client may send: no leading underscore (those are journald's own)."""

_STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


@dataclass(frozen=True)
class LogContext:
    """What the records logged inside :func:`log_context` are about (None: not known).

    The client is not kept here: it is :data:`nspawn_mcp.identity.current_client`, which the
    daemon sets for every connection."""

    sandbox: str | None = None


_context: ContextVar[LogContext] = ContextVar("nspawn_mcp_log_context", default=LogContext())  # noqa: B039 - frozen


@contextlib.contextmanager
def log_context(*, sandbox: str | None = None) -> Iterator[LogContext]:
    """Tag every record logged inside with ``sandbox``; what is not given is kept from the
    enclosing context. Follows the task (a context variable), not the thread."""
    given = {"sandbox": sandbox} if sandbox is not None else {}
    current = replace(_context.get(), **given)
    token = _context.set(current)
    try:
        yield current
    finally:
        _context.reset(token)


def syslog_priority(levelno: int) -> int:
    """A logging level as a syslog priority: 2 crit, 3 err, 4 warning, 6 info, 7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def encode_entry(fields: Iterable[tuple[str, str]]) -> bytes:
    """One journal entry in the native protocol's form. Raises ValueError for a bad field name."""
    parts: list[bytes] = []
    for name, value in fields:
        if not _FIELD_NAME.match(name):
            raise ValueError(f"journal field name {name!r} does not match {_FIELD_NAME.pattern}")
        key = name.encode("ascii")
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            parts.append(key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(key + b"=" + data + b"\n")
    return b"".join(parts)


class JournalHandler(logging.Handler):
    """Sends each record to journald as one entry. Connects to ``socket_path`` now (OSError if it
    cannot); ``identifier`` is the entry's ``SYSLOG_IDENTIFIER``."""

    def __init__(
        self, socket_path: Path = JOURNAL_SOCKET, *, identifier: str = IDENTIFIER, level: int = logging.NOTSET
    ) -> None:
        super().__init__(level)
        self.socket_path = socket_path
        self.identifier = identifier
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._socket.connect(str(socket_path))
        except OSError:
            self._socket.close()
            raise

    def fields(self, record: logging.LogRecord) -> list[tuple[str, str]]:
        """The entry for ``record``: what journald stores, field by field."""
        fields = [
            ("MESSAGE", self.format(record)),
            ("PRIORITY", str(syslog_priority(record.levelno))),
            ("SYSLOG_IDENTIFIER", self.identifier),
            ("LOGGER", record.name),
            ("CODE_FILE", record.pathname),
            ("CODE_LINE", str(record.lineno)),
            ("CODE_FUNC", record.funcName),
        ]
        context = _context.get()
        caller = current_client.get()
        for field, attribute, default in (
            ("NSPAWN_MCP_SANDBOX", "sandbox", context.sandbox),
            ("NSPAWN_MCP_CLIENT", "client", None if caller is LOCAL else caller.identity),
        ):
            value = getattr(record, attribute, None)
            value = default if value is None else value
            if value is not None:
                fields.append((field, str(value)))
        for field, attribute in _EXTRA_FIELDS:
            value = getattr(record, attribute, None)
            if value is not None:
                fields.append((field, str(value)))
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = encode_entry(self.fields(record))
            try:
                self._socket.send(entry)
            except OSError as exc:
                if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                    raise
                self._send_in_memfd(entry)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def _send_in_memfd(self, entry: bytes) -> None:
        """Too large for a datagram: the entry in a sealed memfd, passed alone (journald refuses an
        unsealed one)."""
        fd = os.memfd_create("nspawn-mcp-journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(entry)
            while view:
                view = view[os.write(fd, view) :]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            socket.send_fds(self._socket, [], [fd])
        finally:
            os.close(fd)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.close()
        super().close()


def journal_available(
    socket_path: Path = JOURNAL_SOCKET, *, environ: Mapping[str, str] | None = None, stderr_fd: int = 2
) -> bool:
    """True when systemd connected our stderr to the journal and its socket is there.

    ``JOURNAL_STREAM`` (``DEVICE:INODE``) is set by systemd for a service whose output goes to the
    journal; it is inherited, so it counts only if it still names stderr (systemd.exec(5))."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        info = os.fstat(stderr_fd)
        if (info.st_dev, info.st_ino) != (int(device), int(inode)):
            return False
    except (OSError, ValueError):
        return False
    return socket_path.is_socket()


def configure_logging(verbose: bool, journal_socket: Path | None) -> logging.Handler:
    """The root logger's one handler: journald at ``journal_socket``, or stderr (None, or the socket
    cannot be connected: then a warning says so). Replaces handlers set before (the MCP SDK's
    ``MCPServer`` adds one to a root logger that has none). Returns the handler."""
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    problem = None
    handler: logging.Handler | None = None
    if journal_socket is not None:
        try:
            handler = JournalHandler(journal_socket)
        except OSError as exc:
            problem = f"cannot connect to the journal at {journal_socket} ({exc.strerror}); logging to stderr"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_STDERR_FORMAT))
    root.addHandler(handler)
    if problem is not None:
        logging.getLogger(__name__).warning("%s", problem)
    return handler
