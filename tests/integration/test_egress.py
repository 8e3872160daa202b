"""Egress networking against the real kernel: test hosts live in a network namespace the
tests make (198.18.0.2 and .3, with a DNS server); nothing leaves this machine."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.backend.network import EgressNetwork
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.layout import Layout
from nspawn_mcp.policy import Policy
from nspawn_mcp.runtime import Daemons
from tests.integration.conftest import Factory, sandbox_factory
from tests.netns import outside_hosts

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBES = Path(__file__).parent / "probes"


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with outside_hosts(tmp_path_factory.mktemp("outside") / "seen.log") as log:
        yield log


@pytest.fixture
async def egress_backend(daemons: Daemons, layout: Layout) -> AsyncIterator[NspawnBackend]:
    async with anyio.create_task_group() as tasks:
        backend = await NspawnBackend.connect(
            daemons.bus_address,
            layout,
            network=EgressNetwork(tasks, daemons.proc_root, layout.state_dir),
            proc_root=daemons.proc_root,
        )
        yield backend
        backend.close()
        tasks.cancel_scope.cancel()


@pytest.fixture
async def make_egress_sandbox(egress_backend: NspawnBackend) -> AsyncIterator[Factory]:
    async with sandbox_factory(egress_backend) as make:
        yield make


def egress_policy(private_dns_answers: bool = True) -> Policy:
    return Policy.model_validate(
        {
            "network": {
                "mode": "egress",
                "allow": [{"cidr": "198.18.0.4/32", "ports": [8443]}],
                "domains": ["allowed.test", "rebind.test"],
                "domain_ports": [8443],
                "upstream_dns": "198.18.0.2",
                "private_dns_answers": private_dns_answers,
            }
        }
    )


async def probe(backend: NspawnBackend, sandbox: str, targets: list[dict[str, object]]) -> list[object]:
    spec = CommandSpec(
        argv=("python3", "-c", (PROBES / "connect.py").read_text()),
        cwd=None,
        env={},
        stdin=json.dumps(targets).encode(),
        timeout_seconds=60,
        max_output_bytes=1 << 20,
    )
    outcome = await backend.jail(sandbox).run(spec)
    assert outcome.stderr == b"", outcome.stderr
    result: list[object] = json.loads(outcome.stdout)
    return result


async def test_egress_reaches_only_what_the_policy_lists(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    sandbox = await make_egress_sandbox(policy=egress_policy())
    results = await probe(
        egress_backend,
        sandbox,
        [
            {"host": "198.18.0.4", "port": 8443},  # listed address and port
            {"tls": "allowed.test", "port": 8443, "sni": "allowed.test"},  # listed domain, over TLS
            {"tls": "allowed.test", "port": 8443, "sni": "evil.test"},  # its address, another name
            {"host": "allowed.test", "port": 8443},  # its address, no TLS: no name to check
            {"tls": "198.18.0.3", "port": 8443, "sni": "allowed.test"},  # a listed name, elsewhere
            {"host": "198.18.0.2", "port": 8080},  # the domain's address, other port
            {"host": "198.18.0.3", "port": 8443},  # unlisted address
            {"resolve": "also.test"},  # a name listed nowhere
            {"resolve": "rebind.test"},  # listed, but resolves to cloud metadata
            {"host": "10.0.0.1", "port": 80},  # private ranges
            {"host": "192.168.0.1", "port": 443},
            {"host": "169.254.169.254", "port": 80},
            {"host": "2852039166", "port": 80},  # the same address, as one number
            {"host": "::ffff:169.254.169.254", "port": 80},  # and IPv4-mapped IPv6
            {"dns_direct": "198.18.0.2", "name": "exfil.test"},  # DNS past the resolver
            {"udp": "198.18.0.4", "port": 8443},  # QUIC to an allowed address and port
        ],
    )
    assert results == [
        "hello from 198.18.0.4:8443",
        "hello from 198.18.0.2:8443",
        "closed",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: gaierror",
        "error: gaierror",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: TimeoutError",
        "error: TimeoutError",  # IPv4-mapped: the kernel sends it as IPv4, and it is dropped
        "error: TimeoutError",
        "sent",
    ]
    seen = outside.read_text().splitlines()
    assert "tcp 198.18.0.2:8080" not in seen
    assert "tcp 198.18.0.3:8443" not in seen
    assert "dns also.test." not in seen  # an unlisted name never leaves the host
    assert "dns exfil.test." not in seen
    assert "udp 198.18.0.4:8443" not in seen  # TCP only: no QUIC
    assert seen.count("tcp 198.18.0.2:8443") == 1  # only the connection that named allowed.test

    assert "dns allowed.test." in seen


async def test_listed_names_may_not_resolve_to_private_addresses_unless_allowed(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    sandbox = await make_egress_sandbox(policy=egress_policy(private_dns_answers=False))
    results = await probe(
        egress_backend, sandbox, [{"resolve": "allowed.test"}, {"host": "198.18.0.4", "port": 8443}]
    )
    assert results == ["error: gaierror", "hello from 198.18.0.4:8443"]


async def test_sandboxes_and_the_host_are_out_of_reach(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    first = await make_egress_sandbox(policy=egress_policy())
    second = await make_egress_sandbox(policy=egress_policy())
    address = await probe(egress_backend, second, [])  # warm up
    assert address == []
    gateway_and_peer = await egress_backend.jail(second).run(
        CommandSpec(("/bin/sh", "-c", "cat /etc/resolv.conf"), None, {}, b"", 10, 1 << 20)
    )
    gateway = gateway_and_peer.stdout.split()[1].decode()
    peer = gateway.rsplit(".", 1)[0] + "." + str(int(gateway.rsplit(".", 1)[1]) + 1)
    server = await egress_backend.jail(second).spawn(
        CommandSpec(
            ("python3", "-c", "import socket; s=socket.create_server(('0.0.0.0', 9000)); s.accept()"),
            None,
            {},
            b"",
            60,
            1 << 20,
        ),
        None,
    )
    assert server
    results = await probe(
        egress_backend,
        first,
        [{"host": peer, "port": 9000}, {"host": gateway, "port": 22}, {"host": "198.18.0.1", "port": 22}],
    )
    assert results == ["error: TimeoutError", "error: TimeoutError", "error: TimeoutError"]


async def test_a_sandbox_without_network_reaches_no_test_host(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    sandbox = await make_egress_sandbox()  # the default policy: network "none"
    before = len(outside.read_text().splitlines())
    results = await probe(
        egress_backend,
        sandbox,
        [
            {"host": "198.18.0.2", "port": 8443},
            {"resolve": "allowed.test"},
            {"dns_direct": "198.18.0.2", "name": "x"},
        ],
    )
    assert results == ["error: OSError", "error: gaierror", "error: OSError"]
    assert outside.read_text().splitlines()[before:] == []  # nothing reached the test hosts
