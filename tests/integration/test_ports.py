"""Exposed ports and environment at create, on the real daemons, through the service.

A forward leads from a host address into the sandbox's own loopback and nowhere
else: the attacks below run inside a no-network sandbox and must fail, next to a
control that shows the same probe connecting where it is allowed to.
"""

from __future__ import annotations

import contextlib
import json
import socket
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.errors import InvalidRequest, PolicyRefused
from nspawn_mcp.forwards import port_forwards
from nspawn_mcp.policy import CreateRequest, Policy, PolicySet
from nspawn_mcp.service import SandboxService
from tests.web import answered, refused

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBES = Path(__file__).parent / "probes"
SITE = "mkdir -p /tmp/site && printf 'hello from the sandbox' > /tmp/site/hello.txt"
POLICIES = PolicySet(
    {
        "default": Policy(),
        "twoports": Policy.model_validate({"ports": {"max_exposed": 2, "addresses": ["127.0.0.1", "::1"]}}),
    }
)


@contextlib.asynccontextmanager
async def open_service(backend: NspawnBackend, records: Path) -> AsyncIterator[SandboxService]:
    """A service as the daemon runs it (real backend, real forwards); its forwards end with it."""
    async with port_forwards(lambda sandbox_id, port: backend.jail(sandbox_id).connect(port)) as forwards:
        yield SandboxService(backend, POLICIES, records_dir=records, cwd=str(records), forwards=forwards)


@pytest.fixture
async def service(backend: NspawnBackend, tmp_path: Path) -> AsyncIterator[SandboxService]:
    async with open_service(backend, tmp_path / "records") as opened:
        try:
            yield opened
        finally:
            with anyio.CancelScope(shield=True):
                for info in opened.list():
                    await opened.destroy(info.sandbox_id)


async def start_web_server(
    service: SandboxService, sandbox: str, port: int = 8000, bind: str = "127.0.0.1"
) -> None:
    await service.exec(sandbox, CommandRequest(SITE))
    argv = ["python3", "-m", "http.server", str(port), "--bind", bind, "--directory", "/tmp/site"]
    await service.start_background(sandbox, CommandRequest(argv))


async def start_probe_server(service: SandboxService, sandbox: str, *args: str) -> None:
    script = (PROBES / "serve.py").read_text()
    await service.start_background(sandbox, CommandRequest(["python3", "-c", script, *args]))


def exposed_ports(service: SandboxService, sandbox: str) -> list[int]:
    info = next(info for info in service.list() if info.sandbox_id == sandbox)
    return [port.sandbox_port for port in info.ports]


async def test_a_web_server_answers_on_the_exposed_loopback_address_until_unexposed(
    service: SandboxService,
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await start_web_server(service, sandbox)
    exposed = await service.expose_port(sandbox, 8000)
    assert exposed.host == "127.0.0.1"
    assert exposed.address == f"127.0.0.1:{exposed.host_port}"
    assert exposed_ports(service, sandbox) == [8000]

    reply = await answered(exposed.host, exposed.host_port)
    assert reply.endswith(b"hello from the sandbox")

    await service.unexpose_port(sandbox, 8000)
    assert await refused(exposed.host, exposed.host_port)
    assert exposed_ports(service, sandbox) == []


async def test_a_web_server_stops_answering_when_its_sandbox_is_destroyed(service: SandboxService) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await start_web_server(service, sandbox)
    exposed = await service.expose_port(sandbox, 8000)
    await answered(exposed.host, exposed.host_port)

    await service.destroy(sandbox)
    assert await refused(exposed.host, exposed.host_port)


async def test_a_server_on_the_sandboxs_ipv6_loopback_is_reached_too(service: SandboxService) -> None:
    sandbox = (await service.create(CreateRequest(policy="twoports"))).sandbox_id
    await start_web_server(service, sandbox, bind="::1")
    exposed = await service.expose_port(sandbox, 8000, "::1")
    assert exposed.address == f"[::1]:{exposed.host_port}"
    assert (await answered(exposed.host, exposed.host_port)).endswith(b"hello from the sandbox")


def host_addresses() -> list[str]:
    """The host's own IPv4 addresses, loopback included."""
    lines = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True)
    return sorted({line.split()[3].split("/")[0] for line in lines.stdout.splitlines()})


async def test_an_exposed_port_gives_the_sandbox_no_way_to_the_host_or_the_network(
    service: SandboxService,
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await start_web_server(service, sandbox)
    exposed = await service.expose_port(sandbox, 8000)
    await answered(exposed.host, exposed.host_port)  # the forward works from the host

    with socket.create_server(("0.0.0.0", 0)) as canary:
        canary_port = canary.getsockname()[1]
        attacks = [{"host": "127.0.0.1", "port": exposed.host_port}]
        for address in host_addresses():
            attacks += [{"host": address, "port": exposed.host_port}, {"host": address, "port": canary_port}]
        attacks += [{"host": "1.1.1.1", "port": 80}, {"host": "1.1.1.1", "port": 443}]
        control = {"host": "127.0.0.1", "port": 8000}  # the sandbox's own web server, from inside
        probe = await service.exec(
            sandbox,
            CommandRequest(
                ["python3", "-c", (PROBES / "reach.py").read_text()], stdin=json.dumps([*attacks, control])
            ),
        )
        canary.settimeout(0.2)
        with pytest.raises(TimeoutError):
            canary.accept()  # nothing reached the host side
    results = json.loads(probe.stdout)
    assert results[-1] == "connected", probe.stderr
    for attack, result in zip(attacks, results[:-1], strict=True):
        assert result.startswith("error:"), attack


async def test_the_policy_caps_exposed_ports_and_lists_the_allowed_addresses(service: SandboxService) -> None:
    sandbox = (await service.create(CreateRequest(policy="twoports"))).sandbox_id
    await service.expose_port(sandbox, 8000)
    await service.expose_port(sandbox, 8001, "::1")
    with pytest.raises(PolicyRefused, match=r"already exposes 2 ports.*ports\.max_exposed"):
        await service.expose_port(sandbox, 8002)
    await service.unexpose_port(sandbox, 8001)
    with pytest.raises(PolicyRefused, match=r"0\.0\.0\.0 is not allowed.*allowed: 127\.0\.0\.1, ::1"):
        await service.expose_port(sandbox, 8002, "0.0.0.0")
    with pytest.raises(InvalidRequest, match="already exposed"):
        await service.expose_port(sandbox, 8000)
    assert exposed_ports(service, sandbox) == [8000]


async def test_env_at_create_reaches_every_command_and_a_commands_own_env_wins(
    service: SandboxService,
) -> None:
    sandbox = (
        await service.create(CreateRequest(), env={"GREETING": "hello", "PROJECT": "ports"})
    ).sandbox_id
    script = 'printf "%s %s" "$GREETING" "$PROJECT"'
    assert (await service.exec(sandbox, CommandRequest(script))).stdout == "hello ports"
    overridden = await service.exec(sandbox, CommandRequest(script, env={"GREETING": "bye"}))
    assert overridden.stdout == "bye ports"
    info = next(info for info in service.list() if info.sandbox_id == sandbox)
    assert info.env == ["GREETING", "PROJECT"]


async def test_a_restarted_daemon_keeps_env_and_listens_again_on_the_same_host_port(
    backend: NspawnBackend, tmp_path: Path
) -> None:
    records = tmp_path / "records"
    sandbox = None
    try:
        async with open_service(backend, records) as first:
            sandbox = (await first.create(CreateRequest(), env={"GREETING": "still here"})).sandbox_id
            await start_web_server(first, sandbox)
            exposed = await first.expose_port(sandbox, 8000)
            await answered(exposed.host, exposed.host_port)
        # the first daemon is gone: so is its listener
        assert await refused(exposed.host, exposed.host_port)
        # (reconcile removes every sandbox without a record here: the test lock says only ours run)
        async with open_service(backend, records) as second:
            await second.reconcile()
            assert exposed_ports(second, sandbox) == [8000]
            assert (await answered(exposed.host, exposed.host_port)).endswith(b"hello from the sandbox")
            greeting = await second.exec(sandbox, CommandRequest('printf "%s" "$GREETING"'))
            assert greeting.stdout == "still here"
    finally:
        if sandbox is not None:
            with anyio.CancelScope(shield=True):
                await backend.destroy(sandbox)


async def test_forward_throughput_and_connection_latency(service: SandboxService) -> None:
    """Not a timed test: it moves 100 MB and times 50 connections, and prints what it measured."""
    size = 100 << 20
    sandbox = (await service.create(CreateRequest(policy="twoports"))).sandbox_id
    await start_probe_server(service, sandbox, "bytes", "9000", str(size))
    await start_probe_server(service, sandbox, "hello", "9001")
    bulk = await service.expose_port(sandbox, 9000)
    hello = await service.expose_port(sandbox, 9001)

    async def first_byte() -> float:
        started = time.perf_counter()
        async with await anyio.connect_tcp(hello.host, hello.host_port) as stream:
            if await stream.receive() != b"x":
                raise AssertionError("the hello server answered something else")
        return time.perf_counter() - started

    with anyio.fail_after(15):  # until the server listens
        while True:
            with contextlib.suppress(OSError, anyio.EndOfStream):
                await first_byte()
                break
            await anyio.sleep(0.05)
    latencies = sorted([await first_byte() for _ in range(50)])

    with anyio.fail_after(120):
        started = time.perf_counter()
        received = 0
        async with await anyio.connect_tcp(bulk.host, bulk.host_port) as stream:
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    received += len(await stream.receive(1 << 20))
        elapsed = time.perf_counter() - started
    assert received == size
    print(
        f"\nforward: {size / elapsed / (1 << 20):.0f} MiB/s for 100 MiB; connect to first byte "
        f"p50 {statistics.median(latencies) * 1000:.2f} ms, "
        f"p95 {latencies[int(len(latencies) * 0.95)] * 1000:.2f} ms"
    )
