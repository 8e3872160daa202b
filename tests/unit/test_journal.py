"""The journald handler, against a datagram socket standing in for journald's: the fields, the binary
form of multi-line values, priorities, sandbox and client from the record or the context, entries too
large for a datagram (a sealed memfd), and emit never raising."""

from __future__ import annotations

import fcntl
import inspect
import logging
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nspawn_mcp.identity import Client, current_client
from nspawn_mcp.journal import (
    JournalHandler,
    configure_logging,
    encode_entry,
    journal_available,
    log_context,
    syslog_priority,
)


def decode_entry(data: bytes) -> dict[str, str]:
    """The reader's side of the native protocol (what journald does with a datagram)."""
    fields: dict[str, str] = {}
    while data:
        end = data.index(b"\n")
        head = data[:end]
        if b"=" in head:
            key, _, value = head.partition(b"=")
            data = data[end + 1 :]
        else:
            key = head
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n", "a binary value ends with a newline"
            data = data[end + 10 + size :]
        assert key.decode() not in fields
        fields[key.decode()] = value.decode()
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    """A bound datagram socket where journald's would be; reads fail after 5 s instead of hanging."""
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "journal.sock"))
    receiver.settimeout(5)
    yield receiver
    receiver.close()


@pytest.fixture
def log(journal: socket.socket) -> Iterator[logging.Logger]:
    handler = JournalHandler(Path(journal.getsockname()))
    logger = logging.getLogger(f"nspawn_mcp.test_journal.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield logger
    logger.removeHandler(handler)
    handler.close()


def received(journal: socket.socket) -> dict[str, str]:
    return decode_entry(journal.recv(1 << 20))


def test_an_entry_has_message_priority_identifier_logger_and_code_location(
    journal: socket.socket, log: logging.Logger
) -> None:
    here = inspect.currentframe()
    assert here is not None
    log.info("sandbox %s created", "sbx-1")
    line = here.f_lineno - 1  # the frame is on this line now: the call is the one above
    assert received(journal) == {
        "MESSAGE": "sandbox sbx-1 created",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "nspawn-mcp",
        "LOGGER": log.name,
        "CODE_FILE": __file__,
        "CODE_LINE": str(line),
        "CODE_FUNC": "test_an_entry_has_message_priority_identifier_logger_and_code_location",
    }


def test_a_multi_line_value_is_sent_length_prefixed(journal: socket.socket, log: logging.Logger) -> None:
    log.warning("first line\nsecond line=with an equals sign")
    raw = journal.recv(1 << 20)
    value = b"first line\nsecond line=with an equals sign"
    assert raw.startswith(b"MESSAGE\n" + struct.pack("<Q", len(value)) + value + b"\nPRIORITY=4\n")
    assert decode_entry(raw)["MESSAGE"] == value.decode()


def test_an_exception_is_in_the_message(journal: socket.socket, log: logging.Logger) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed")
    fields = received(journal)
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"].startswith("failed\nTraceback (most recent call last):\n")
    assert fields["MESSAGE"].endswith("RuntimeError: boom")


@pytest.mark.parametrize(
    ("level", "priority"),
    [
        (logging.DEBUG, 7),
        (5, 7),
        (logging.INFO, 6),
        (25, 6),
        (logging.WARNING, 4),
        (logging.ERROR, 3),
        (45, 3),
        (logging.CRITICAL, 2),
        (60, 2),
    ],
)
def test_levels_map_to_syslog_priorities(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority


def test_priorities_reach_the_journal(journal: socket.socket, log: logging.Logger) -> None:
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        log.log(level, "x")
    assert [received(journal)["PRIORITY"] for _ in range(5)] == ["7", "6", "4", "3", "2"]


def test_sandbox_and_client_come_from_extra(journal: socket.socket, log: logging.Logger) -> None:
    log.info("created", extra={"sandbox": "sbx-1a2b3c4d", "client": "uid:0"})
    log.info("plain")
    fields = received(journal)
    assert (fields["NSPAWN_MCP_SANDBOX"], fields["NSPAWN_MCP_CLIENT"]) == ("sbx-1a2b3c4d", "uid:0")
    assert not {"NSPAWN_MCP_SANDBOX", "NSPAWN_MCP_CLIENT"} & set(received(journal))


def test_sandbox_and_client_come_from_the_context(journal: socket.socket, log: logging.Logger) -> None:
    token = current_client.set(Client("token:alice"))
    with log_context():
        log.info("one")
        with log_context(sandbox="sbx-1"):
            log.info("two")
            log.info("three", extra={"sandbox": "sbx-2"})  # the record's own wins
        log.info("four")
    current_client.reset(token)
    log.info("five")
    entries = [received(journal) for _ in range(5)]
    tagged = [(e.get("NSPAWN_MCP_CLIENT"), e.get("NSPAWN_MCP_SANDBOX")) for e in entries]
    assert tagged == [
        ("token:alice", None),
        ("token:alice", "sbx-1"),
        ("token:alice", "sbx-2"),
        ("token:alice", None),
        (None, None),
    ]


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(
    journal: socket.socket, log: logging.Logger
) -> None:
    message = "x" * (4 << 20)
    log.info(message)
    data, fds, _, _ = socket.recv_fds(journal, 1 << 16, 4)
    assert data == b""
    assert len(fds) == 1
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
        assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE) == (
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        )
        content = os.pread(fds[0], 8 << 20, 0)
    finally:
        for fd in fds:
            os.close(fd)
    assert decode_entry(content)["MESSAGE"] == message


def test_emit_never_raises(tmp_path: Path) -> None:
    failures: list[logging.LogRecord] = []

    class Recording(JournalHandler):
        def handleError(self, record: logging.LogRecord) -> None:
            failures.append(record)

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "journal.sock"))
    handler = Recording(tmp_path / "journal.sock")
    receiver.close()  # journald went away: sending is refused
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "lost", None, None)
    handler.emit(record)
    handler.close()
    handler.emit(record)  # and a closed handler
    assert failures == [record, record]


def test_the_socket_is_connected_when_the_handler_is_made(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        JournalHandler(tmp_path / "missing.sock")


def test_field_names_are_checked() -> None:
    for bad in ("_PID", "message", "1ST", "A-B", "A" * 65, ""):
        with pytest.raises(ValueError, match="journal field name"):
            encode_entry([(bad, "x")])


@given(
    st.lists(
        st.tuples(st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True), st.text()), unique_by=lambda f: f[0]
    )
)
def test_entries_decode_to_what_was_encoded(fields: list[tuple[str, str]]) -> None:
    expected = {name: value.encode("utf-8", "backslashreplace").decode() for name, value in fields}
    assert decode_entry(encode_entry(fields)) == expected


def test_journal_available_only_when_stderr_is_the_journal_stream(
    journal: socket.socket, tmp_path: Path
) -> None:
    path = Path(journal.getsockname())
    with (tmp_path / "stderr").open("w") as stderr:
        info = os.fstat(stderr.fileno())
        stream = {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}
        fd = stderr.fileno()
        assert journal_available(path, environ=stream, stderr_fd=fd)
        assert not journal_available(tmp_path / "missing.sock", environ=stream, stderr_fd=fd)
        assert not journal_available(tmp_path / "stderr", environ=stream, stderr_fd=fd)  # not a socket
        assert not journal_available(path, environ={}, stderr_fd=fd)
        assert not journal_available(path, environ={"JOURNAL_STREAM": "garbage"}, stderr_fd=fd)
        assert not journal_available(path, environ={"JOURNAL_STREAM": f"{info.st_dev}:1"}, stderr_fd=fd)


@pytest.fixture
def bare_root_logger() -> Iterator[logging.Logger]:
    """The root logger without pytest's handlers while the test replaces them; restored after."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    for handler in saved:
        root.removeHandler(handler)
    yield root
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(level)


def test_configure_logging_uses_the_journal(journal: socket.socket, bare_root_logger: logging.Logger) -> None:
    root = bare_root_logger
    root.addHandler(logging.NullHandler())  # a handler set before (the SDK's) is replaced
    handler = configure_logging(verbose=True, journal_socket=Path(journal.getsockname()))
    assert root.handlers == [handler]
    assert isinstance(handler, JournalHandler)
    assert root.level == logging.DEBUG
    logging.getLogger("nspawn_mcp.somewhere").debug("hello", extra={"sandbox": "sbx-9"})
    fields = received(journal)
    assert (fields["MESSAGE"], fields["NSPAWN_MCP_SANDBOX"]) == ("hello", "sbx-9")


def test_configure_logging_falls_back_to_stderr(
    tmp_path: Path, bare_root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root = bare_root_logger
    handler = configure_logging(verbose=False, journal_socket=tmp_path / "missing.sock")
    assert root.handlers == [handler]
    assert type(handler) is logging.StreamHandler
    assert root.level == logging.INFO
    assert "cannot connect to the journal at" in capsys.readouterr().err
    assert type(configure_logging(verbose=False, journal_socket=None)) is logging.StreamHandler


def test_event_policy_and_rule_come_from_extra(journal: socket.socket, log: logging.Logger) -> None:
    log.warning("refused", extra={"event": "refused", "policy": "dev", "rule": "sandboxes.max_live"})
    log.info("plain")
    fields = received(journal)
    assert (fields["NSPAWN_MCP_EVENT"], fields["NSPAWN_MCP_POLICY"], fields["NSPAWN_MCP_RULE"]) == (
        "refused",
        "dev",
        "sandboxes.max_live",
    )
    assert not {"NSPAWN_MCP_EVENT", "NSPAWN_MCP_POLICY", "NSPAWN_MCP_RULE"} & set(received(journal))
