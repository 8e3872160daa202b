"""The front ends' contract with the daemon: the hello, and a relay that never leaves a client hanging."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from nspawn_mcp.daemon.handshake import Hello, HelloError, Welcome, decode_hello, decode_welcome, encode
from nspawn_mcp.daemon.main import HttpAddress
from nspawn_mcp.frontend.stdio import Connection, Relay, connect

pytestmark = pytest.mark.anyio

SESSION = "0123456789abcdef0123456789abcdef"


def test_a_hello_round_trips() -> None:
    hello = Hello(SESSION, workdir="/home/me", options=("--policy-dir", "/etc/p"))
    assert decode_hello(encode(hello)) == hello
    welcome = Welcome("uid:0", "1.0", "mnt:[1]")
    assert decode_welcome(encode(welcome)) == welcome


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"GET / HTTP/1.1\n", "not JSON"),
        (b"[1]\n", "not a JSON object"),
        (b'{"nspawn_mcp": 2, "session": "' + SESSION.encode() + b'"}\n', "protocol 1"),
        (b'{"nspawn_mcp": 1, "session": "../../etc"}\n', "32 lowercase hex"),
        (b'{"nspawn_mcp": 1, "session": "' + SESSION.encode() + b'", "workdir": "rel"}\n', "absolute"),
        (b'{"nspawn_mcp": 1, "session": "' + SESSION.encode() + b'", "options": "x"}\n', "list of strings"),
        (b"x" * 10_000, "longer than"),
    ],
)
def test_a_bad_hello_is_refused_with_the_reason(line: bytes, message: str) -> None:
    with pytest.raises(HelloError, match=message):
        decode_hello(line)


def test_a_refusal_carries_the_daemons_reason() -> None:
    with pytest.raises(HelloError, match="started with other options"):
        decode_welcome(encode("the running daemon was started with other options"))


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [("127.0.0.1:8765", "127.0.0.1", 8765), ("[::1]:8765", "::1", 8765), ("localhost:80", "localhost", 80)],
)
def test_http_addresses(text: str, host: str, port: int) -> None:
    assert HttpAddress.parse(text) == HttpAddress(host, port)


@pytest.mark.parametrize("text", ["8765", "127.0.0.1", ":8765", "127.0.0.1:0", "127.0.0.1:99999", "h:x"])
def test_bad_http_addresses_say_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|1 to 65535"):
        HttpAddress.parse(text)


class FakeDaemon:
    """A unix socket that answers the hello, records what it receives, and answers requests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received: list[dict[str, object]] = []
        self.connections: list[SocketStream] = []
        self.hold: set[str] = set()
        """Methods it does not answer (calls left in flight)."""

    async def serve(self, stream: SocketStream) -> None:
        self.connections.append(stream)
        async with stream:
            await self._answer(stream)

    async def _answer(self, stream: SocketStream) -> None:
        received = BufferedByteReceiveStream(stream)
        decode_hello(await received.receive_until(b"\n", 8192))
        await stream.send(encode(Welcome("uid:0", "test", "mnt:[1]")))
        try:
            while True:
                message = json.loads(await received.receive_until(b"\n", 1 << 20))
                self.received.append(message)
                if "id" in message and message.get("method") not in self.hold:
                    reply = {"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message["method"]}}
                    await stream.send(json.dumps(reply, separators=(",", ":")).encode() + b"\n")
        except (
            anyio.EndOfStream,
            anyio.IncompleteRead,
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
        ):
            return


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[FakeDaemon]:
    fake = FakeDaemon(tmp_path / "daemon.sock")
    async with await anyio.create_unix_listener(fake.path) as listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, fake.serve)
        yield fake
        tasks.cancel_scope.cancel()


def request(request_id: int, method: str) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": {}}).encode() + b"\n"


async def test_the_relay_answers_lost_calls_reconnects_and_replays_the_session(daemon: FakeDaemon) -> None:
    to_client: list[dict[str, object]] = []
    client_lines = anyio.create_memory_object_stream[bytes](16)

    async def open_connection() -> Connection:
        return await connect(str(daemon.path), Hello(SESSION))

    async def write_client(line: bytes) -> None:
        to_client.append(json.loads(line))

    async def read_client() -> bytes:
        try:
            return await client_lines[1].receive()
        except anyio.EndOfStream:
            return b""

    relay = Relay(open_connection, write_client, reconnect_timeout=10)
    daemon.hold = {"tools/call"}
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(relay.run, read_client)
            await client_lines[0].send(request(1, "initialize"))
            await client_lines[0].send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
            await client_lines[0].send(request(2, "tools/call"))
            while len(daemon.received) < 3:
                await anyio.sleep(0.01)
            await daemon.connections[0].aclose()  # the daemon dies with a call in flight
            while len(to_client) < 2:
                await anyio.sleep(0.01)
            await client_lines[0].send(request(3, "tools/list"))  # after the reconnection
            while len(to_client) < 3:
                await anyio.sleep(0.01)
            client_lines[0].close()
    client_lines[1].close()

    assert to_client[0] == {"jsonrpc": "2.0", "id": 1, "result": {"echo": "initialize"}}
    lost = to_client[1]
    assert lost["id"] == 2
    assert lost["result"]["isError"] is True  # type: ignore[index]
    assert "daemon restarted during this call" in json.dumps(lost)
    # the new connection was put in the client's session first, and the replayed answer swallowed
    assert [m.get("method") for m in daemon.received[3:]] == [
        "initialize",
        "notifications/initialized",
        "tools/list",
    ]
    assert to_client[2] == {"jsonrpc": "2.0", "id": 3, "result": {"echo": "tools/list"}}
    assert len(daemon.connections) == 2


async def test_calls_fail_with_the_reason_when_the_daemon_cannot_be_started(tmp_path: Path) -> None:
    from nspawn_mcp.frontend.stdio import DaemonUnreachable

    async def open_connection() -> Connection:
        raise DaemonUnreachable("cannot start the daemon: the policy dir is bad", settled=True)

    answers: list[bytes] = []

    async def write_client(line: bytes) -> None:
        answers.append(line)

    lines = iter([request(1, "initialize"), b""])

    async def read_client() -> bytes:
        return next(lines)

    with anyio.fail_after(5):  # far below the reconnect timeout: a settled failure is answered at once
        await Relay(open_connection, write_client, reconnect_timeout=60).run(read_client)
    error = json.loads(answers[0])
    assert error["id"] == 1
    assert "the policy dir is bad" in error["error"]["message"]


def test_the_daemons_unit_in_the_private_systemd() -> None:
    from inline_snapshot import snapshot

    from nspawn_mcp.daemon.unit import BoxPlacement, DaemonOptions, unit_properties

    properties = unit_properties(
        DaemonOptions(("--policy-dir", "/etc/p")),
        python="/venv/bin/python",
        environment={"NSPAWN_MCP_STATE_DIR": "/var/lib/nspawn-mcp"},
        box=BoxPlacement(box_pid=4242, anchor_pid=2),
    )
    assert properties == snapshot(
        {
            "Description": "nspawn-mcp: disposable sandboxes for AI agents",
            "ExecStart": [
                (
                    "/usr/bin/nsenter",
                    [
                        "nsenter",
                        "--mount=/proc/2/ns/mnt",
                        "--",
                        "/venv/bin/python",
                        "-m",
                        "nspawn_mcp",
                        "daemon",
                        "run",
                        "--policy-dir",
                        "/etc/p",
                    ],
                    False,
                )
            ],
            "Type": "notify",
            "NotifyAccess": "main",
            "Restart": "on-failure",
            "RestartUSec": 500000,
            "StartLimitIntervalUSec": 0,
            "RestartPreventExitStatus": ([78], []),
            "TimeoutStartUSec": 90000000,
            "TimeoutStopUSec": 15000000,
            "KillMode": "mixed",
            "CollectMode": "inactive-or-failed",
            "Environment": [
                "NSPAWN_MCP_STATE_DIR=/var/lib/nspawn-mcp",
                "NSPAWN_MCP_SYSTEMD_ROOT=/proc/4242/root",
            ],
            "StandardOutput": "journal",
            "StandardError": "journal",
            "SyslogIdentifier": "nspawn-mcp",
        }
    )


@pytest.mark.parametrize(
    ("state", "calls"),
    [
        ("active", []),
        ("activating", []),  # starting, or waiting to restart after a crash
        ("deactivating", []),  # a killed daemon's last processes going: systemd restarts it next
        ("failed", ["reset_failed", "start"]),
        (None, ["start"]),
    ],
)
async def test_a_front_end_starts_the_daemon_only_when_systemd_will_not(
    monkeypatch: pytest.MonkeyPatch, state: str | None, calls: list[str]
) -> None:
    # Resetting a unit that is still dying clears the failure its restart is for: systemd then
    # counts it as stopped cleanly and does not restart it (seen: tests/e2e/test_faults.py).
    from contextlib import asynccontextmanager

    from nspawn_mcp.backend.systemd1 import UnitStatus
    from nspawn_mcp.daemon import unit
    from nspawn_mcp.layout import Layout
    from nspawn_mcp.runtime import Daemons

    made: list[str] = []

    class FakeSystemd:
        async def list_units(self, patterns: list[str]) -> list[UnitStatus]:
            return [] if state is None else [UnitStatus(unit.DAEMON_UNIT, "loaded", state, "x")]

        async def reset_failed(self, name: str) -> None:
            made.append("reset_failed")

        async def start_transient_unit(self, name: str, properties: object, *, timeout: float) -> None:
            made.append("start")

    @asynccontextmanager
    async def fake_systemd(layout: Layout) -> AsyncIterator[tuple[FakeSystemd, Daemons]]:
        yield FakeSystemd(), Daemons("unix:path=/nonexistent", box_pid=1)

    monkeypatch.setattr(unit, "_systemd", fake_systemd)
    monkeypatch.setattr(unit, "_placement", lambda box_pid: unit.BoxPlacement(box_pid, anchor_pid=2))
    await unit.start_daemon(Layout(), unit.DaemonOptions())
    assert made == calls
