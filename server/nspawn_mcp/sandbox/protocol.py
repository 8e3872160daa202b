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

===============  ===========================================================  ========================
op               fields                                                       reply
===============  ===========================================================  ========================
``ping``         -                                                            ``{"ok": true}``
``exec``         a :class:`Command`, ``stream``                               :class:`CommandOutcome`
``spawn``        a :class:`Command` (output kept in files)                    ``{"process_id": ...}``
``read``         ``process_id``, ``stdout_offset``, ``stderr_offset``,        :class:`ProcessOutput`
                 ``max_bytes``
``write``        ``process_id``, ``data_b64``, ``close``                      ``{"written": n}``
``kill``         ``process_id``, ``signal``                                   :class:`ProcessState`
``list``         -                                                            ``{"processes": [...]}``
``read_file``    ``path``, ``max_bytes``                                      :class:`FileRead`
``read_slice``   ``path``, ``offset``, ``limit``, ``max_bytes``,              :class:`FileSlice`
                 ``encoding``
``write_file``   ``path``, ``data_b64``, ``mode``, ``make_parents``           :class:`FileWritten`
``edit_file``    ``path``, ``old``, ``new``, ``count``, ``max_bytes``         :class:`FileEdited`
``list_files``   ``path``, ``pattern``, ``depth``, ``max_entries``            :class:`FileListing`
``read_tree``    ``path``, ``max_bytes``, ``max_entries``                     :class:`TreeRead`
``extract_tar``  ``archive``, ``destination``, ``max_bytes``                  :class:`TreeWritten`
``connect``      ``port``                                                     ``{"connected": true}``
===============  ===========================================================  ========================

Paths in these requests are resolved by the supervisor, inside the jail: a symlink
the sandbox planted can only lead to another of the sandbox's own files.
``read_tree`` streams a :class:`TreeEntry` event before each entry, and after a
file's entry the file's bytes as ``FileChunk`` events (exactly its ``size``).

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

TYPE_CHECKING = False  # not ``typing.TYPE_CHECKING``: the supervisor need not import typing
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "ARGV_SHOWN",
    "CONNECT_LINE_LIMIT",
    "FAILURE_KINDS",
    "FILE_CHUNK",
    "LIST_REPLY_BYTES",
    "MAX_LIST_ENTRIES",
    "MAX_PATH_CHARS",
    "MAX_PROCESSES",
    "MAX_REQUEST_BYTES",
    "MAX_TREE_ENTRIES",
    "Command",
    "CommandOutcome",
    "Failure",
    "FileChunk",
    "FileEdited",
    "FileEntry",
    "FileListing",
    "FileRead",
    "FileSlice",
    "FileWritten",
    "OutputChunk",
    "ProcessOutput",
    "ProcessState",
    "ProtocolError",
    "RequestError",
    "TreeEntry",
    "TreeRead",
    "TreeWritten",
    "connected_from_wire",
    "data_to_wire",
    "decode_line",
    "encode",
    "line_limit",
    "relative_path",
    "spawned_from_wire",
    "text_lines",
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
    "no_match",
    "ambiguous",
    "io_error",
    "not_listening",
)


class RequestError(Exception):
    """A request the supervisor cannot carry out; ``kind`` is one of :data:`FAILURE_KINDS`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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
    keep_tail: bool = False
    """Past ``max_output``, keep the last bytes of each stream instead of the first."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "keep": "tail" if self.keep_tail else "head",
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
            keep_tail=_keep_tail(message),
        )


def _keep_tail(message: dict[str, Any]) -> bool:
    keep = message.get("keep", "head")
    if keep not in ("head", "tail"):
        raise ProtocolError("keep must be 'head' or 'tail'")
    return bool(keep == "tail")


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
        cls,
        message: dict[str, Any],
        max_bytes: int,
        stdout_offset: int,
        stderr_offset: int,
        tail: bool = False,
    ) -> ProcessOutput:
        """``tail``: the read may have skipped output after the offsets to return the newest."""
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
        starts = (output.next_stdout_offset - len(stdout), output.next_stderr_offset - len(stderr))
        if starts != (stdout_offset, stderr_offset) and not (
            tail and starts[0] >= stdout_offset and starts[1] >= stderr_offset
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


# -- file tools ---------------------------------------------------------------------

MAX_PATH_CHARS = 4096
"""The longest path (or symlink target) a reply may name."""
MAX_LIST_ENTRIES = 10_000
"""The most entries one ``list_files`` reply may carry."""
LIST_REPLY_BYTES = 8 << 20
"""The supervisor stops adding entries to a ``list_files`` reply before its line reaches this."""
MAX_TREE_ENTRIES = 100_000
"""The most entries one ``read_tree`` may stream."""
FILE_TYPES = ("file", "directory", "symlink", "fifo", "socket", "char_device", "block_device", "other")
_MAX_SIZE = 1 << 62
_MAX_MTIME = 1e12


def _shown(text: str) -> str:
    """A name from the sandbox as it may be shown: no control characters, no lone surrogates."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(c if c.isprintable() else "?" for c in text)


def _path_text(message: dict[str, Any], name: str) -> str:
    return _shown(_text(message, name, MAX_PATH_CHARS))


def _mode(message: dict[str, Any]) -> int:
    return _int(message, "mode", 0, 0o7777)


def text_lines(data: bytes) -> int:
    """How many lines ``data`` holds: its newlines, plus one for a last line without a newline."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


@dataclass(frozen=True)
class FileSlice:
    """A piece of a regular file (the reply of ``read_slice``).

    Text: ``offset`` and ``next_offset`` count lines, and ``data`` holds whole lines
    (the last one cut only when a single line is longer than ``max_bytes``:
    ``line_cut``). Binary: they count bytes. ``end`` is the byte position just
    after ``data``; ``size`` the file's size in bytes.
    """

    binary: bool
    data: bytes
    offset: int
    next_offset: int
    end: int
    size: int
    eof: bool
    line_cut: bool
    mode: int
    mtime: float

    def to_wire(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "data_b64": _b64(self.data),
            "offset": self.offset,
            "next_offset": self.next_offset,
            "end": self.end,
            "size": self.size,
            "eof": self.eof,
            "line_cut": self.line_cut,
            "mode": self.mode,
            "mtime": self.mtime,
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int, offset: int) -> FileSlice:
        binary = _bool(message, "binary")
        data = _data(message, "data_b64", max_bytes)
        piece = cls(
            binary=binary,
            data=data,
            offset=_int(message, "offset", offset, offset),
            next_offset=_int(message, "next_offset", 0, _MAX_SIZE),
            end=_int(message, "end", len(data), _MAX_SIZE),
            size=_int(message, "size", 0, _MAX_SIZE),
            eof=_bool(message, "eof"),
            line_cut=_bool(message, "line_cut"),
            mode=_mode(message),
            mtime=_number(message, "mtime", -_MAX_MTIME, _MAX_MTIME),
        )
        counted = len(data) if binary else text_lines(data)
        if piece.next_offset != offset + counted:
            raise ProtocolError("the next offset does not follow from the data")
        if piece.end > piece.size or (binary and piece.end != offset + len(data)):
            raise ProtocolError("the end of the data lies beyond the file")
        if piece.line_cut and (binary or piece.eof):
            raise ProtocolError("a cut line in binary data or at the end of the file")
        return piece


@dataclass(frozen=True)
class FileWritten:
    """A file written whole and put in place (the reply of ``write_file``)."""

    size: int
    mode: int
    created: bool

    def to_wire(self) -> dict[str, Any]:
        return {"size": self.size, "mode": self.mode, "created": self.created}

    @classmethod
    def from_wire(cls, message: dict[str, Any], sent: int) -> FileWritten:
        return cls(
            size=_int(message, "size", sent, sent), mode=_mode(message), created=_bool(message, "created")
        )


@dataclass(frozen=True)
class FileEdited:
    """An exact replacement done and put in place (the reply of ``edit_file``)."""

    replaced: int
    size: int

    def to_wire(self) -> dict[str, Any]:
        return {"replaced": self.replaced, "size": self.size}

    @classmethod
    def from_wire(cls, message: dict[str, Any], count: int, max_bytes: int) -> FileEdited:
        return cls(replaced=_int(message, "replaced", count, count), size=_int(message, "size", 0, max_bytes))


@dataclass(frozen=True)
class FileEntry:
    """One entry of a listing: its path relative to the listed directory, never followed."""

    path: str
    type: str
    size: int
    mode: int
    mtime: float
    target: str | None = None
    """A symlink's target, as written (not resolved)."""

    def to_wire(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "type": self.type,
            "size": self.size,
            "mode": self.mode,
            "mtime": self.mtime,
            "target": self.target,
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any]) -> FileEntry:
        kind = _text(message, "type", 16)
        if kind not in FILE_TYPES:
            raise ProtocolError(f"unknown file type {kind!r}")
        target = message.get("target")
        if target is not None and kind != "symlink":
            raise ProtocolError("a target on something that is not a symlink")
        return cls(
            path=_path_text(message, "path"),
            type=kind,
            size=_int(message, "size", 0, _MAX_SIZE),
            mode=_mode(message),
            mtime=_number(message, "mtime", -_MAX_MTIME, _MAX_MTIME),
            target=None if target is None else _path_text(message, "target"),
        )


@dataclass(frozen=True)
class FileListing:
    """The reply of ``list_files``: at most ``max_entries`` entries; ``truncated`` if there were more."""

    entries: tuple[FileEntry, ...]
    truncated: bool

    def to_wire(self) -> dict[str, Any]:
        return {"entries": [entry.to_wire() for entry in self.entries], "truncated": self.truncated}

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_entries: int) -> FileListing:
        entries = _field(message, "entries")
        if not isinstance(entries, list) or len(entries) > max_entries:
            raise ProtocolError(f"field 'entries' is not a list of at most {max_entries}")
        if not all(isinstance(item, dict) for item in entries):
            raise ProtocolError("field 'entries' holds something that is not an object")
        return cls(
            entries=tuple(FileEntry.from_wire(item) for item in entries),
            truncated=_bool(message, "truncated"),
        )


def relative_path(text: str) -> tuple[str, ...]:
    """The components of a relative path inside a copied tree; anything that could leave it is refused."""
    parts = tuple(text.split("/"))
    if (
        not text
        or len(text) > MAX_PATH_CHARS
        or "\x00" in text
        or any(part in ("", ".", "..") or len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts)
    ):
        raise ProtocolError("a tree entry whose path is not a plain relative path")
    return parts


@dataclass(frozen=True)
class TreeEntry:
    """An entry of a tree being read (an event of ``read_tree``): a directory, or a file (bytes follow)."""

    path: str
    directory: bool
    mode: int
    size: int

    def to_wire(self) -> dict[str, Any]:
        kind = "directory" if self.directory else "file"
        return {"event": "entry", "path": self.path, "type": kind, "mode": self.mode, "size": self.size}

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.path.split("/"))

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int) -> TreeEntry:
        path = _text(message, "path", MAX_PATH_CHARS)
        relative_path(path)
        kind = _text(message, "type", 16)
        if kind not in ("file", "directory"):
            raise ProtocolError("a tree entry that is neither a file nor a directory")
        size = _int(message, "size", 0, max_bytes)
        if kind == "directory" and size:
            raise ProtocolError("a directory entry with a size")
        return cls(path=path, directory=kind == "directory", mode=_mode(message), size=size)


@dataclass(frozen=True)
class TreeRead:
    """The end of ``read_tree``: what was sent, and what was left out (symlinks, devices, ...)."""

    files: int
    directories: int
    bytes: int
    skipped: int
    skipped_examples: tuple[str, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "directories": self.directories,
            "bytes": self.bytes,
            "skipped": self.skipped,
            "skipped_examples": list(self.skipped_examples[:_SKIPPED_SHOWN]),
        }

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int) -> TreeRead:
        examples = _field(message, "skipped_examples")
        if not isinstance(examples, list) or len(examples) > _SKIPPED_SHOWN:
            raise ProtocolError(f"field 'skipped_examples' is not a list of at most {_SKIPPED_SHOWN}")
        if not all(isinstance(item, str) and len(item) <= MAX_PATH_CHARS for item in examples):
            raise ProtocolError("field 'skipped_examples' holds something that is not a short string")
        return cls(
            files=_int(message, "files", 0, MAX_TREE_ENTRIES),
            directories=_int(message, "directories", 0, MAX_TREE_ENTRIES),
            bytes=_int(message, "bytes", 0, max_bytes),
            skipped=_int(message, "skipped", 0, _MAX_SIZE),
            skipped_examples=tuple(_shown(item) for item in examples),
        )


_SKIPPED_SHOWN = 20


@dataclass(frozen=True)
class TreeWritten:
    """The reply of ``extract_tar``: what was put in place inside the sandbox."""

    files: int
    directories: int
    bytes: int

    def to_wire(self) -> dict[str, Any]:
        return {"files": self.files, "directories": self.directories, "bytes": self.bytes}

    @classmethod
    def from_wire(cls, message: dict[str, Any], max_bytes: int) -> TreeWritten:
        return cls(
            files=_int(message, "files", 0, MAX_TREE_ENTRIES),
            directories=_int(message, "directories", 0, MAX_TREE_ENTRIES),
            bytes=_int(message, "bytes", 0, max_bytes),
        )
