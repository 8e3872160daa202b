"""The supervisor protocol as the server decodes it: a supervisor that lies gets bounded answers.

Root in a sandbox can replace the supervisor. These tests play that fake supervisor on a
real Unix socket and check that each way of lying is an error of that one request, read
within bounds, while a well-formed reply (the control) is accepted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import resource
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from nspawn_mcp.backend.api import CommandSpec, OutputChunk
from nspawn_mcp.backend.jail import JailClient
from nspawn_mcp.errors import CopyRefused, ExecFailed
from nspawn_mcp.sandbox import protocol

pytestmark = pytest.mark.anyio

_MiB = 1 << 20

Replier = Callable[[anyio.abc.SocketStream, dict[str, Any]], Awaitable[None]]


def state(**changes: Any) -> dict[str, Any]:
    fields = {
        "process_id": "p1",
        "argv": ["sleep", "1"],
        "running": True,
        "exit_code": None,
        "signal": None,
        "timed_out": False,
        "stdout_truncated": False,
        "stderr_truncated": False,
    }
    return fields | changes


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def spec(cap: int = _MiB) -> CommandSpec:
    return CommandSpec(argv=("true",), cwd=None, env={}, stdin=b"", timeout_seconds=5, max_output_bytes=cap)


@pytest.fixture
async def fake(tmp_path: Path) -> AsyncIterator[Callable[[Replier], JailClient]]:
    """A fake supervisor answering every request with ``replier``; returns a client of it."""
    path = tmp_path / "exec.sock"
    replier: list[Replier] = []

    async def serve(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            request = await stream.receive()
            with contextlib.suppress(anyio.BrokenResourceError, OSError):  # the client hung up, as it should
                await replier[0](stream, json.loads(request.partition(b"\n")[0]))

    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, serve)

        def make(answer: Replier) -> JailClient:
            replier[:] = [answer]
            return JailClient(path, "sbx-0000fa4e")

        yield make
        tasks.cancel_scope.cancel()


def lines(*messages: dict[str, Any]) -> Replier:
    async def reply(stream: anyio.abc.SocketStream, request: dict[str, Any]) -> None:
        for message in messages:
            await stream.send(protocol.encode(message))

    return reply


OUTCOME = {
    "exit_code": 0,
    "signal": None,
    "stdout_b64": b64(b"out"),
    "stderr_b64": "",
    "stdout_truncated": False,
    "stderr_truncated": False,
    "timed_out": False,
    "duration_ms": 1.5,
}


async def test_a_well_formed_reply_is_accepted(fake: Callable[[Replier], JailClient]) -> None:
    outcome = await fake(lines(OUTCOME)).run(spec())
    assert (outcome.exit_code, outcome.stdout) == (0, b"out")
    assert [s.process_id for s in await fake(lines({"processes": [state()]})).list()] == ["p1"]


async def test_an_endless_line_is_cut_at_its_bound_without_reading_it_all(
    fake: Callable[[Replier], JailClient],
) -> None:
    async def flood(stream: anyio.abc.SocketStream, request: dict[str, Any]) -> None:
        chunk = b"x" * _MiB
        for _ in range(300):  # 300 MiB on one line
            await stream.send(chunk)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with anyio.fail_after(10), pytest.raises(ExecFailed, match=r"invalid reply \(a line longer than"):
        await fake(flood).list()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 100


@pytest.mark.parametrize(
    ("name", "reply", "match"),
    [
        ("not JSON", b"{oops\n", "not JSON"),
        ("not an object", b"[1, 2]\n", "not a JSON object"),
        ("wrong type", protocol.encode(OUTCOME | {"exit_code": "0"}), "exit_code"),
        ("exit code out of range", protocol.encode(OUTCOME | {"exit_code": 1 << 40}), "exit_code"),
        ("output past the cap", protocol.encode(OUTCOME | {"stdout_b64": b64(b"x" * 2048)}), "stdout_b64"),
        ("not base64", protocol.encode(OUTCOME | {"stdout_b64": "@@@@"}), "base64"),
        (
            "missing field",
            protocol.encode({k: v for k, v in OUTCOME.items() if k != "timed_out"}),
            "timed_out",
        ),
        ("unknown error kind", protocol.encode({"error": "x" * 20, "message": "m"}), "error kind"),
        ("an event nobody asked for", protocol.encode({"event": "output"}), "event"),
    ],
)
async def test_a_malformed_exec_reply_is_an_error_of_that_request(
    fake: Callable[[Replier], JailClient], name: str, reply: bytes, match: str
) -> None:
    async def answer(stream: anyio.abc.SocketStream, request: dict[str, Any]) -> None:
        await stream.send(reply)

    with pytest.raises(ExecFailed, match=match) as raised:
        await fake(answer).run(spec(cap=1024))
    assert "destroy it" in str(raised.value)


async def test_streamed_output_beyond_the_cap_is_refused(fake: Callable[[Replier], JailClient]) -> None:
    chunk = {"event": "output", "stdout_b64": b64(b"y" * 1000), "stderr_b64": ""}
    seen: list[OutputChunk] = []

    async def on_output(output: OutputChunk) -> None:
        seen.append(output)

    with pytest.raises(ExecFailed, match="more streamed output than the cap"):
        await fake(lines(chunk, chunk, OUTCOME)).run(spec(cap=1500), on_output)
    assert len(seen) == 1  # the first chunk fits the cap; the second breaks it


async def test_background_output_beyond_the_asked_size_is_refused(
    fake: Callable[[Replier], JailClient],
) -> None:
    six_mib = b"z" * (6 * _MiB)
    lying = {
        "state": state(),
        "stdout_b64": b64(six_mib),
        "stderr_b64": "",
        "next_stdout_offset": len(six_mib),
        "next_stderr_offset": 0,
    }
    with pytest.raises(ExecFailed, match="invalid reply"):
        await fake(lines(lying)).read("p1", 0, 0, _MiB)
    honest = lying | {"stdout_b64": b64(six_mib[:_MiB]), "next_stdout_offset": _MiB}
    assert len((await fake(lines(honest)).read("p1", 0, 0, _MiB)).stdout) == _MiB
    skewed = honest | {"next_stdout_offset": 5}
    with pytest.raises(ExecFailed, match="offsets"):
        await fake(lines(skewed)).read("p1", 0, 0, _MiB)


async def test_lists_and_argv_are_bounded(fake: Callable[[Replier], JailClient]) -> None:
    too_many = {"processes": [state(process_id=f"p{i}") for i in range(protocol.MAX_PROCESSES + 1)]}
    with pytest.raises(ExecFailed, match="processes"):
        await fake(lines(too_many)).list()
    with pytest.raises(ExecFailed, match="argv"):
        await fake(lines({"processes": [state(argv=["a" * 10_000])]})).list()


async def test_a_file_larger_than_the_cap_stops_the_copy(fake: Callable[[Replier], JailClient]) -> None:
    chunk = {"event": "data", "data_b64": b64(b"d" * protocol.FILE_CHUNK)}
    received: list[bytes] = []

    async def sink(data: bytes) -> None:
        received.append(data)

    with pytest.raises(CopyRefused, match="larger than the policy's limit"):
        await fake(lines(*[chunk] * 5, {"size": 5 * protocol.FILE_CHUNK, "mode": 0o644})).read_file(
            "/f", 2 * protocol.FILE_CHUNK, sink
        )
    assert len(received) == 2
    with pytest.raises(ExecFailed, match="size does not match"):
        await fake(lines(chunk, {"size": 7, "mode": 0o644})).read_file("/f", _MiB, sink)


def test_failure_messages_are_bounded_and_printable() -> None:
    failure = protocol.Failure.from_wire({"error": "not_found", "message": "bad\x1b[2Jname"})
    assert failure.message == "bad?[2Jname"
    with pytest.raises(protocol.ProtocolError):
        protocol.Failure.from_wire({"error": "not_found", "message": "m" * 5000})
