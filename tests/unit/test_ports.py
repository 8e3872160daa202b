"""Exposed ports and environment at create: the policy's rules, the supervisor's ``connect``, the
forwards and the service's bookkeeping, without root (the supervisor runs on the host here)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.abc
import pytest
from pydantic import ValidationError

from nspawn_mcp.backend.jail import JailClient
from nspawn_mcp.backend.units import supervisor_command
from nspawn_mcp.commands import CommandRequest, merged_environment, sandbox_environment
from nspawn_mcp.errors import BackendError, ExecFailed, InvalidRequest, NotFound, PolicyRefused, SandboxGone
from nspawn_mcp.forwards import port_forwards
from nspawn_mcp.images import Catalog, ImageEntry
from nspawn_mcp.policy import CreateRequest, Policy, PolicySet, resolve_expose
from nspawn_mcp.sandbox import protocol
from nspawn_mcp.service import SandboxService
from tests.unit.fake_backend import FakeBackend
from tests.waiting import wait_until
from tests.web import refused

pytestmark = pytest.mark.anyio

SUPERVISOR_DIR = Path(__file__).parents[2] / "server/nspawn_mcp/sandbox"


# -- the policy ----------------------------------------------------------------------

TWO_ADDRESSES = Policy.model_validate({"ports": {"max_exposed": 2, "addresses": ["127.0.0.1", "::1"]}})


def test_the_default_is_loopback_and_four_ports() -> None:
    assert resolve_expose("default", Policy(), 8000, None, 0) == "127.0.0.1"
    assert Policy().ports.max_exposed == 4


def test_an_allowed_address_is_taken_in_its_canonical_form() -> None:
    assert resolve_expose("p", TWO_ADDRESSES, 8000, "0:0::1", 0) == "::1"


@pytest.mark.parametrize(
    ("policy", "port", "address", "exposed", "error", "text"),
    [
        (Policy(), 8000, "0.0.0.0", 0, PolicyRefused, r"0\.0\.0\.0 is not allowed.*allowed: 127\.0\.0\.1 "),
        (TWO_ADDRESSES, 8000, "10.0.0.1", 0, PolicyRefused, r"allowed: 127\.0\.0\.1, ::1.*ports\.addresses"),
        (Policy(), 8000, "localhost", 0, InvalidRequest, r"not an IP address; allowed: 127\.0\.0\.1"),
        (TWO_ADDRESSES, 8000, None, 2, PolicyRefused, r"already exposes 2 ports.*ports\.max_exposed"),
        (Policy(), 0, None, 0, InvalidRequest, r"not a TCP port \(1-65535\)"),
        (Policy(), 65536, None, 0, InvalidRequest, r"not a TCP port"),
        (
            Policy.model_validate({"ports": {"max_exposed": 0}}),
            8000,
            None,
            0,
            PolicyRefused,
            r"allows no exposed ports.*ports\.max_exposed",
        ),
    ],
)
def test_refusals_say_what_is_allowed(
    policy: Policy, port: int, address: str | None, exposed: int, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        resolve_expose("p", policy, port, address, exposed)


@pytest.mark.parametrize(
    "ports",
    [
        {"addresses": []},
        {"addresses": ["localhost"]},
        {"max_exposed": -1},
        {"max_connections": 0},
        {"typo": 1},
    ],
)
def test_a_bad_ports_section_is_refused_when_the_policy_loads(ports: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Policy.model_validate({"ports": ports})


# -- environment at create -------------------------------------------------------------


def test_the_merge_order_is_image_then_sandbox_then_command() -> None:
    merged = merged_environment(
        {"A": "image", "B": "image", "C": "image"}, {"B": "sandbox", "C": "sandbox"}, {"C": "command"}
    )
    assert merged == {"A": "image", "B": "sandbox", "C": "command"}


@pytest.mark.parametrize(
    ("env", "text"),
    [
        ({f"V{i}": "x" for i in range(65)}, "65 variables; at most 64"),
        ({"1ABC": "x"}, "invalid environment variable name '1ABC'"),
        ({"A-B": "x"}, "invalid environment variable name"),
        ({"A=B": "x"}, "invalid environment variable name"),
        ({"": "x"}, "invalid environment variable name"),
        ({"A" * 129: "x"}, "at most 128 characters"),
        ({"A": "x\x00y"}, "A contains a NUL byte"),
        ({"BIG": "x" * (32 << 10 + 1)}, "BIG is .* bytes long; at most 32768"),
        ({f"V{i}": "x" * (30 << 10) for i in range(3)}, "bytes in all; at most 65536"),
    ],
)
def test_env_at_create_is_bounded_and_refused_clearly(env: dict[str, str], text: str) -> None:
    with pytest.raises(InvalidRequest, match=text):
        sandbox_environment(env)


def test_env_at_create_takes_posix_names() -> None:
    env = {"_private": "1", "PATH": "/opt/bin:/usr/bin", "lower_case9": "é"}
    assert sandbox_environment(env) == env


# -- the protocol and the supervisor's connect -----------------------------------------


def test_only_connected_true_is_a_connect_reply() -> None:
    protocol.connected_from_wire({"connected": True})
    for reply in ({"connected": False}, {"connected": 1}, {"connected": True, "extra": 1}, {}):
        with pytest.raises(protocol.ProtocolError):
            protocol.connected_from_wire(reply)


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[JailClient]:
    path = tmp_path / "exec.sock"
    process = subprocess.Popen(supervisor_command(str(SUPERVISOR_DIR), str(path), python=sys.executable))
    try:
        yield JailClient(path)
    finally:
        process.kill()
        process.wait()


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP server on loopback that sends back what it gets, upper-cased, then ends when its client does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with contextlib.suppress(OSError):
            connection, _ = listener.accept()
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data.upper())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


async def receive_all(stream: anyio.abc.ByteReceiveStream) -> bytes:
    data = b""
    with contextlib.suppress(anyio.EndOfStream):
        while True:
            data += await stream.receive()
    return data


async def test_connect_splices_bytes_both_ways_and_passes_a_half_close_on(
    supervisor: JailClient, tmp_path: Path
) -> None:
    await wait_until((tmp_path / "exec.sock").exists, what="the supervisor's socket")
    with echo_server() as port, anyio.fail_after(10):
        stream = await supervisor.connect(port)
        async with stream:
            await stream.send(b"hello ")
            await stream.send(b"forward")
            await stream.send_eof()  # the echo server sees the end, answers everything and closes
            assert await receive_all(stream) == b"HELLO FORWARD"


async def test_connect_to_a_port_where_nothing_listens_says_so(
    supervisor: JailClient, tmp_path: Path
) -> None:
    await wait_until((tmp_path / "exec.sock").exists, what="the supervisor's socket")
    with socket.create_server(("127.0.0.1", 0)) as reserved:
        port = reserved.getsockname()[1]
    with pytest.raises(ExecFailed, match=f"nothing listens on port {port} in the sandbox"):
        await supervisor.connect(port)


@contextlib.contextmanager
def hostile_supervisor(path: Path, reply: bytes) -> Iterator[None]:
    """A stand-in for a supervisor root inside replaced: reads the request, sends ``reply`` and waits
    for the client to hang up (an empty reply: hangs up itself)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(65536)
                    if reply:
                        connection.sendall(reply)
                        while connection.recv(65536):
                            pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()


@pytest.mark.parametrize(
    ("reply", "error", "text"),
    [
        (b"x" * (1 << 20), ExecFailed, "too long"),
        (b'{"connected": false}\n', ExecFailed, "invalid reply"),
        (b"[1, 2]\n", ExecFailed, "not a JSON object"),
        (b'{"error": "made_up", "message": "x"}\n', ExecFailed, "unknown error kind"),
        (b"", SandboxGone, "did not answer"),
    ],
)
async def test_a_hostile_connect_reply_is_refused_within_its_bound(
    tmp_path: Path, reply: bytes, error: type[Exception], text: str
) -> None:
    path = tmp_path / "exec.sock"
    with hostile_supervisor(path, reply), anyio.fail_after(10), pytest.raises(error, match=text):
        await JailClient(path).connect(8000)


async def test_bytes_sent_right_after_the_reply_reach_the_client(tmp_path: Path) -> None:
    path = tmp_path / "exec.sock"
    with hostile_supervisor(path, b'{"connected": true}\nraw bytes'), anyio.fail_after(10):
        stream = await JailClient(path).connect(8000)
        async with stream:
            assert await stream.receive() == b"raw bytes"


# -- forwards and the service ------------------------------------------------------------


@pytest.fixture
def backend(tmp_path: Path) -> FakeBackend:
    (tmp_path / "staging").mkdir()
    return FakeBackend(staging_dir=tmp_path / "staging")


POLICIES = PolicySet(
    {
        "default": Policy(),
        "one": Policy.model_validate({"ports": {"max_connections": 1}}),
    }
)


@contextlib.asynccontextmanager
async def running_service(backend: FakeBackend, records: Path) -> AsyncIterator[SandboxService]:
    async with port_forwards(lambda sandbox_id, port: backend.jail(sandbox_id).connect(port)) as forwards:
        yield SandboxService(backend, POLICIES, records_dir=records, cwd=str(records), forwards=forwards)


@contextlib.asynccontextmanager
async def stand_in(backend: FakeBackend, sandbox_id: str, port: int) -> AsyncIterator[list[bytes]]:
    """What listens on ``port`` in the fake sandbox: answers each connection with "hi <what it got>"."""
    received: list[bytes] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    backend.listening[(sandbox_id, port)] = listener.extra(anyio.abc.SocketAttribute.local_port)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    data = await stream.receive()
                    received.append(data)
                    await stream.send(b"hi " + data)

    async with listener, anyio.create_task_group() as tasks:
        tasks.start_soon(listener.serve, answer)
        try:
            yield received
        finally:
            tasks.cancel_scope.cancel()


async def test_a_forward_carries_bytes_until_unexposed_and_then_refuses(
    backend: FakeBackend, tmp_path: Path
) -> None:
    async with running_service(backend, tmp_path / "records") as service:
        sandbox = (await service.create(CreateRequest())).sandbox_id
        exposed = await service.expose_port(sandbox, 8000)
        async with stand_in(backend, sandbox, 8000):
            with anyio.fail_after(10):
                client = await anyio.connect_tcp(exposed.host, exposed.host_port)
                await client.send(b"there")
                assert await client.receive() == b"hi there"
                await service.unexpose_port(sandbox, 8000)
                # the open connection ended with the forward, and nothing listens any more
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await client.receive()
                await client.aclose()
                assert await refused(exposed.host, exposed.host_port)
        with pytest.raises(NotFound, match=r"port 8000 of .* is not exposed; exposed ports: none"):
            await service.unexpose_port(sandbox, 8000)


async def test_a_connection_where_nothing_listens_is_closed_and_the_forward_lives_on(
    backend: FakeBackend, tmp_path: Path
) -> None:
    async with running_service(backend, tmp_path / "records") as service:
        sandbox = (await service.create(CreateRequest())).sandbox_id
        exposed = await service.expose_port(sandbox, 8000)
        with anyio.fail_after(10):
            async with await anyio.connect_tcp(exposed.host, exposed.host_port) as early:
                assert await receive_all(early) == b""  # closed at once: nothing listens yet
            async with stand_in(backend, sandbox, 8000):
                client = await anyio.connect_tcp(exposed.host, exposed.host_port)
                await client.send(b"later")
                assert await client.receive() == b"hi later"
                await client.aclose()


async def test_connections_beyond_the_cap_are_closed_at_once(backend: FakeBackend, tmp_path: Path) -> None:
    async with running_service(backend, tmp_path / "records") as service:
        sandbox = (await service.create(CreateRequest(policy="one"))).sandbox_id
        exposed = await service.expose_port(sandbox, 8000)
        async with stand_in(backend, sandbox, 8000):
            with anyio.fail_after(10):
                first = await anyio.connect_tcp(exposed.host, exposed.host_port)
                await first.send(b"one")
                assert await first.receive() == b"hi one"
                second = await anyio.connect_tcp(exposed.host, exposed.host_port)
                assert await receive_all(second) == b""  # over the cap of 1: closed
                await first.send(b"still")
                assert await first.receive() == b"hi still"  # the first one is untouched
                await first.aclose()
                await second.aclose()


async def test_a_failing_forward_ends_alone_and_never_the_daemons_task_group(tmp_path: Path) -> None:
    async def broken(sandbox_id: str, port: int) -> anyio.abc.ByteStream:
        raise RuntimeError("a bug in connecting")

    async with port_forwards(broken) as forwards:
        port = await forwards.open("sbx-1a2b3c4d", 8000, "127.0.0.1")
        with anyio.fail_after(10):
            for _ in range(3):  # each connection fails on its own; the forward still accepts
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    assert await receive_all(stream) == b""
        assert await forwards.close("sbx-1a2b3c4d", 8000)


async def test_destroying_a_sandbox_closes_its_forwards(backend: FakeBackend, tmp_path: Path) -> None:
    async with running_service(backend, tmp_path / "records") as service:
        sandbox = (await service.create(CreateRequest())).sandbox_id
        exposed = await service.expose_port(sandbox, 8000)
        await service.destroy(sandbox)
        assert await refused(exposed.host, exposed.host_port)


async def test_env_and_ports_are_in_the_record_and_a_restarted_daemon_listens_again(
    backend: FakeBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = tmp_path / "records"
    async with running_service(backend, records) as service:
        sandbox = (await service.create(CreateRequest(), env={"GREETING": "hello"})).sandbox_id
        kept = await service.expose_port(sandbox, 8000)
        taken = await service.expose_port(sandbox, 8001)
    saved = json.loads((records / f"{sandbox}.json").read_text())
    assert saved["env"] == {"GREETING": "hello"}
    assert [p["sandbox_port"] for p in saved["ports"]] == [8000, 8001]

    with socket.create_server(("127.0.0.1", taken.host_port)):  # someone took this host port meanwhile
        async with running_service(backend, records) as restarted:
            await restarted.reconcile()
            info = restarted.list()[0]
            assert [(p.sandbox_port, p.host_port) for p in info.ports] == [(8000, kept.host_port)]
            assert "dropping the exposure of port 8001" in caplog.text
            await restarted.exec(sandbox, CommandRequest("true", env={"OTHER": "1"}))
            assert backend.commands[-1][1].env == {"GREETING": "hello", "OTHER": "1"}
            async with stand_in(backend, sandbox, 8000):
                with anyio.fail_after(10):
                    client = await anyio.connect_tcp(kept.host, kept.host_port)
                    await client.send(b"again")
                    assert await client.receive() == b"hi again"
                    await client.aclose()


async def test_a_commands_own_env_wins_over_the_sandboxs(backend: FakeBackend, tmp_path: Path) -> None:
    async with running_service(backend, tmp_path / "records") as service:
        sandbox = (await service.create(CreateRequest(), env={"A": "sandbox", "B": "sandbox"})).sandbox_id
        await service.exec(sandbox, CommandRequest("true", env={"B": "command"}))
        await service.start_background(sandbox, CommandRequest("sleep 1"))
        assert backend.commands[-1][1].env == {"A": "sandbox", "B": "command"}
        spawned, _ = backend.processes["p1"]
        assert spawned.env == {"A": "sandbox", "B": "sandbox"}
        with pytest.raises(InvalidRequest, match="invalid environment variable name"):
            await service.create(CreateRequest(), env={"NO-DASH": "x"})


async def test_the_images_recipe_env_is_under_the_sandboxs_and_kept_across_a_rebuild(
    backend: FakeBackend, tmp_path: Path
) -> None:
    catalog = Catalog(tmp_path / "images")
    recorded = ImageEntry(
        name="default",
        source="recipe",
        origin="default.toml",
        version="1",
        built_at=datetime(2026, 1, 1, tzinfo=UTC),
        build_seconds=1.0,
        env={"PIP_NO_CACHE_DIR": "1", "LANG": "C.UTF-8"},
    )
    catalog.put(recorded)
    service = SandboxService(
        backend, POLICIES, records_dir=tmp_path / "records", cwd=str(tmp_path), catalog=catalog
    )
    sandbox = (await service.create(CreateRequest(), env={"LANG": "en_GB.UTF-8"})).sandbox_id
    catalog.put(recorded.model_copy(update={"version": "2", "env": {"PIP_NO_CACHE_DIR": "0"}}))

    await service.exec(sandbox, CommandRequest("true"))

    assert backend.commands[-1][1].env == {"PIP_NO_CACHE_DIR": "1", "LANG": "en_GB.UTF-8"}


async def test_without_forwards_expose_port_says_the_server_offers_none(
    backend: FakeBackend, tmp_path: Path
) -> None:
    service = SandboxService(backend, POLICIES, records_dir=tmp_path / "records", cwd=str(tmp_path))
    sandbox = (await service.create(CreateRequest())).sandbox_id
    with pytest.raises(BackendError, match="does not offer port forwards"):
        await service.expose_port(sandbox, 8000)
