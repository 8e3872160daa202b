"""The protocol between the server and the supervisor inside each sandbox: the one place it is defined.

Both sides import this module: the server as ``nspawn_mcp.sandbox.protocol``, the
supervisor from the same read-only directory it is loaded from, with the image's
own ``python3``. So it uses only the standard library and stays importable by
Python 3.9.

Trust. The supervisor lives inside the jail: root in the sandbox can kill it and
answer in its place, so everything the server reads is hostile input. It is
decoded here and nowhere else, with hard bounds: the length of a line (derived
from the caps the server asked for), the type and size of every field, the
length of every list. A message that breaks them raises :class:`ProtocolError`,
which ends that request only. A reply that fits the bounds may still be a lie,
but only about the sandbox's own results.

Framing. One connection per request. The server sends one JSON object on one
line; the supervisor answers with JSON lines. The last line is the reply (or a
:class:`Failure`); lines before it are events: ``OutputChunk`` while a streaming
``exec`` runs, ``FileChunk`` while a file is read. The requests:

==============  ====================================================  ======================
op              fields                                                reply
==============  ====================================================  ======================
``ping``        -                                                     ``{"ok": true}``
``exec``        a :class:`Command`, ``stream``                        :class:`CommandOutcome`
``spawn``       a :class:`Command` (output kept in files)             ``{"process_id": ...}``
``read``        ``process_id``, ``stdout_offset``, ``stderr_offset``,  :class:`ProcessOutput`
                ``max_bytes``
``write``       ``process_id``, ``data_b64``, ``close``               ``{"written": n}``
``kill``        ``process_id``, ``signal``                            :class:`ProcessState`
``list``        -                                                     ``{"processes": [...]}``
``read_file``   ``path``, ``max_bytes``                               :class:`FileRead`
``connect``     ``port``                                              ``{"connected": true}``
==============  ====================================================  ======================

Hanging up on an ``exec`` or ``read_file`` stops it (the command is killed).

``connect`` takes the connection over: the supervisor connects to ``port`` on the
sandbox's own loopback (127.0.0.1, then ::1), answers one line (:func:`connected_from_wire`
or a ``not_listening`` :class:`Failure`, at most :data:`CONNECT_LINE_LIMIT` bytes), and
from then on only raw bytes flow, both ways, until either side closes (a half-close is
passed on). The server sends nothing after the request until it has read the reply.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ARGV_SHOWN",
    "CONNECT_LINE_LIMIT",
    "FAILURE_KINDS",
    "FILE_CHUNK",
    "MAX_PROCESSES",
    "MAX_REQUEST_BYTES",
    "Command",
    "CommandOutcome",
    "Failure",
    "FileChunk",
    "FileRead",
    "OutputChunk",
    "ProcessOutput",
    "ProcessState",
    "ProtocolError",
    "connected_from_wire",
    "data_to_wire",
    "decode_line",
    "encode",
    "line_limit",
    "spawned_from_wire",
    "written_from_wire",
]

MAX_REQUEST_BYTES = 128 << 20
"""The longest request line the supervisor reads (64 MiB of stdin, base64-encoded, fits)."""
MAX_PROCESSES = 1024
"""The most background processes a ``list`` reply may name (the policy's cap is at most this)."""
ARGV_SHOWN = (32, 512)
"""A process's argv as replies show it: at most 32 arguments of at most 512 characters."""
FILE_CHUNK = 256 << 10
"""Bytes of a file per ``FileChunk`` event."""
_MESSAGE_CHARS = 1000
CONNECT_LINE_LIMIT = 8192
"""The longest reply line of a ``connect`` (a short Failure at most): everything after it is raw bytes."""
_OVERHEAD = 64 << 10
"""Room on a line for everything but the data fields."""

FAILURE_KINDS = (
    "not_found",
    "not_executable",
    "bad_cwd",
    "bad_user",
    "no_such_process",
    "bad_request",
    "no_such_file",
    "permission_denied",
    "not_regular",
    "too_large",
    "not_listening",
)


class ProtocolError(Exception):
    """A message broke the protocol: malformed, of the wrong shape, or beyond its bounds."""


def _b64_length(size: int) -> int:
    return (size + 2) // 3 * 4


def line_limit(max_data_bytes: int) -> int:
    """The longest line a reply carrying up to ``max_data_bytes`` per data field may have (two fields)."""
    return 2 * _b64_length(max_data_bytes) + _OVERHEAD


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """One line as a JSON object; anything else is a ProtocolError."""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        raise ProtocolError("a line that is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("a line that is not a JSON object")
    return message


# -- field readers: each checks one field's type and bounds -------------------------


def _field(message: dict[str, Any], name: str) -> Any:
    if name not in message:
        raise ProtocolError(f"field {name!r} is missing")
    return message[name]


def _bool(message: dict[str, Any], name: str) -> bool:
    value = _field(message, name)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} is not a boolean")
    return value


def _int(message: dict[str, Any], name: str, low: int, high: int) -> int:
    value = _field(message, name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"field {name!r} is not an integer in [{low}, {high}]")
    return value


def _optional_int(message: dict[str, Any], name: str, low: int, high: int) -> int | None:
    return None if message.get(name) is None else _int(message, name, low, high)


def _number(message: dict[str, Any], name: str, low: float, high: float) -> float:
    value = _field(message, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ProtocolError(f"field {name!r} is not a number in [{low:g}, {high:g}]")
    return float(value)


def _text(message: dict[str, Any], name: str, max_chars: int) -> str:
    value = _field(message, name)
    if not isinstance(value, str) or len(value) > max_chars:
        raise ProtocolError(f"field {name!r} is not a string of at most {max_chars} characters")
    return value


def _data(message: dict[str, Any], name: str, max_bytes: int) -> bytes:
    value = _field(message, name)
    if not isinstance(value, str) or len(value) > _b64_length(max_bytes):
        raise ProtocolError(f"field {name!r} is not base64 of at most {max_bytes} bytes")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"field {name!r} is not valid base64") from None
    if len(data) > max_bytes:
        raise ProtocolError(f"field {name!r} carries more than {max_bytes} bytes")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_to_wire(data: bytes) -> str:
    """Bytes as requests carry them (``stdin_b64``, ``data_b64``)."""
    return _b64(data)


def spawned_from_wire(message: dict[str, Any]) -> str:
    """The ``process_id`` of a ``spawn`` reply."""
    return _text(message, "process_id", 16)


def written_from_wire(message: dict[str, Any], sent: int) -> int:
    """The ``written`` count of a ``write`` reply: no more than was sent."""
    return _int(message, "written", 0, sent)


def connected_from_wire(message: dict[str, Any]) -> None:
    """Check the reply of a ``connect``: ``{"connected": true}`` and nothing else."""
    if set(message) != {"connected"} or message["connected"] is not True:
        raise ProtocolError('a connect reply that is not {"connected": true}')


def _argv_shown(argv: list[str]) -> tuple[str, ...]:
    count, chars = ARGV_SHOWN
    return tuple(argument[:chars] for argument in argv[:count])


# -- requests (server -> supervisor) ---------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A command to run: what ``exec`` and ``spawn`` carry."""

    argv: tuple[str, ...]
    cwd: str | None
    env: dict[str, str]
    user: str
    stdin: bytes
    timeout: float | None
    max_output: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "argv": list(self.argv),
            "cwd": self.cwd,
            "env": dict(self.env),
            "user": self.user,
            "stdin_b64": _b64(self.stdin),
            "timeout": self.timeout,
            "max_output": self.max_output,
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Command:
        argv = message.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ProtocolError("argv must be a non-empty list of strings")
        env = message.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ProtocolError("env must map names to strings")
        cwd = message.get("cwd")
        user = message.get("user") or "root"
        timeout = message.get("timeout")
        if not isinstance(cwd, (str, type(None))) or not isinstance(user, str):
            raise ProtocolError("cwd and user must be strings")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise ProtocolError("timeout must be a positive number")
        return cls(
            argv=tuple(argv),
            cwd=cwd or None,
            env={str(k): v for k, v in env.items()},
            user=user,
            stdin=_data(message, "stdin_b64", MAX_REQUEST_BYTES) if message.get("stdin_b64") else b"",
            timeout=None if timeout is None else float(timeout),
            max_output=_int(message, "max_output", 1, 1 << 40),
        )


# -- replies and events (supervisor -> server) -----------------------------------------


@dataclass(frozen=True)
class Failure:
    """An error reply: the request could not be carried out."""

    kind: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"error": self.kind, "message": self.message[:_MESSAGE_CHARS]}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> Failure:
        kind = _text(message, "error", 32)
        if kind not in FAILURE_KINDS:
            raise ProtocolError(f"unknown error kind {kind[:32]!r}")
        text = _text(message, "message", _MESSAGE_CHARS)
        return cls(kind=kind, message="".join(c if c.isprintable() else "?" for c in text))


@dataclass(frozen=True)
class OutputChunk:
    """Output a running command produced since the previous chunk (an event of a streaming exec)."""

    stdout: bytes
    stderr: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"event": "output", "stdout_b64": _b64(self.stdout), "stderr_b64": _b64(self.stderr)}

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int) -> OutputChunk:
        return cls(
            stdout=_data(message, "stdout_b64", max_bytes), stderr=_data(message, "stderr_b64", max_bytes)
        )


def _status_to_wire(returncode: int | None) -> dict[str, int | None]:
    if returncode is None:
        return {"exit_code": None, "signal": None}
    if returncode < 0:
        return {"exit_code": None, "signal": -returncode}
    return {"exit_code": returncode, "signal": None}


@dataclass(frozen=True)
class CommandOutcome:
    """How a command run to completion ended (the reply of ``exec``)."""

    exit_code: int | None
    """None when the command was killed by a signal."""
    signal: int | None
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdout_b64": _b64(self.stdout),
            "stderr_b64": _b64(self.stderr),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "timed_out": self.timed_out,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_output: int) -> CommandOutcome:
        return cls(
            exit_code=_optional_int(message, "exit_code", 0, 255),
            signal=_optional_int(message, "signal", 1, 64),
            stdout=_data(message, "stdout_b64", max_output),
            stderr=_data(message, "stderr_b64", max_output),
            stdout_truncated=_bool(message, "stdout_truncated"),
            stderr_truncated=_bool(message, "stderr_truncated"),
            timed_out=_bool(message, "timed_out"),
            duration_ms=_number(message, "duration_ms", 0, 1e10),
        )

    @staticmethod
    def status(returncode: int | None) -> dict[str, int | None]:
        """``exit_code`` and ``signal`` from a ``Popen.returncode``."""
        return _status_to_wire(returncode)


@dataclass(frozen=True)
class ProcessState:
    """A background process as ``kill``, ``list`` and ``read`` report it."""

    process_id: str
    argv: tuple[str, ...]
    """At most ``ARGV_SHOWN`` arguments, each cut to its length."""
    running: bool
    exit_code: int | None
    signal: int | None
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool

    def to_wire(self) -> dict[str, Any]:
        return {
            "process_id": self.process_id,
            "argv": list(_argv_shown(list(self.argv))),
            "running": self.running,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> ProcessState:
        argv = _field(message, "argv")
        count, chars = ARGV_SHOWN
        if (
            not isinstance(argv, list)
            or len(argv) > count
            or not all(isinstance(a, str) and len(a) <= chars for a in argv)
        ):
            raise ProtocolError(f"field 'argv' is not a list of at most {count} short strings")
        return cls(
            process_id=_text(message, "process_id", 16),
            argv=tuple(argv),
            running=_bool(message, "running"),
            exit_code=_optional_int(message, "exit_code", 0, 255),
            signal=_optional_int(message, "signal", 1, 64),
            timed_out=_bool(message, "timed_out"),
            stdout_truncated=_bool(message, "stdout_truncated"),
            stderr_truncated=_bool(message, "stderr_truncated"),
        )

    @classmethod
    def list_from_wire(cls, message: dict[str, Any]) -> list[ProcessState]:
        processes = _field(message, "processes")
        if not isinstance(processes, list) or len(processes) > MAX_PROCESSES:
            raise ProtocolError(f"field 'processes' is not a list of at most {MAX_PROCESSES}")
        if not all(isinstance(item, dict) for item in processes):
            raise ProtocolError("field 'processes' holds something that is not an object")
        return [cls.from_wire(item) for item in processes]


@dataclass(frozen=True)
class ProcessOutput:
    """New output of a background process since the given offsets (the reply of ``read``)."""

    state: ProcessState
    stdout: bytes
    stderr: bytes
    next_stdout_offset: int
    next_stderr_offset: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "state": self.state.to_wire(),
            "stdout_b64": _b64(self.stdout),
            "stderr_b64": _b64(self.stderr),
            "next_stdout_offset": self.next_stdout_offset,
            "next_stderr_offset": self.next_stderr_offset,
        }

    @classmethod
    def from_wire(
        cls, message: dict[str, Any], max_bytes: int, stdout_offset: int, stderr_offset: int
    ) -> ProcessOutput:
        state = _field(message, "state")
        if not isinstance(state, dict):
            raise ProtocolError("field 'state' is not an object")
        stdout = _data(message, "stdout_b64", max_bytes)
        stderr = _data(message, "stderr_b64", max_bytes)
        output = cls(
            state=ProcessState.from_wire(state),
            stdout=stdout,
            stderr=stderr,
            next_stdout_offset=_int(message, "next_stdout_offset", 0, 1 << 62),
            next_stderr_offset=_int(message, "next_stderr_offset", 0, 1 << 62),
        )
        if (output.next_stdout_offset, output.next_stderr_offset) != (
            stdout_offset + len(stdout),
            stderr_offset + len(stderr),
        ):
            raise ProtocolError("the next offsets do not follow from the data")
        return output


@dataclass(frozen=True)
class FileChunk:
    """Bytes of a file being read (an event of ``read_file``)."""

    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"event": "data", "data_b64": _b64(self.data)}

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> FileChunk:
        return cls(data=_data(message, "data_b64", FILE_CHUNK))


@dataclass(frozen=True)
class FileRead:
    """The end of ``read_file``: how many bytes were sent, and the file's permission bits."""

    size: int
    mode: int = field(default=0o644)

    def to_wire(self) -> dict[str, Any]:
        return {"size": self.size, "mode": self.mode}

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int) -> FileRead:
        return cls(size=_int(message, "size", 0, max_bytes), mode=_int(message, "mode", 0, 0o7777))
