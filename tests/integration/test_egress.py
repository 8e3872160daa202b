"""Egress networking against the real kernel: test hosts live in a network namespace the
tests make (198.18.0.2 and .3, with a DNS server); nothing leaves this machine."""

from __future__ import annotations

import json
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.api import CommandSpec
from nspawn_mcp.backend.egress import SNI_PROXY_PORT
from nspawn_mcp.backend.network import MAX_RELAYED_CONNECTIONS
from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.policy import Policy
from tests.certificates import make_server_certificate
from tests.integration.conftest import Factory, sandbox_factory
from tests.integration.test_sandbox_lifecycle import command, run
from tests.netns import https_host
from tests.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

PROBES = Path(__file__).parent / "probes"


@pytest.fixture
async def make_egress_sandbox(egress_backend: NspawnBackend) -> AsyncIterator[Factory]:
    async with sandbox_factory(egress_backend) as make:
        yield make


def egress_policy(
    private_dns_answers: bool = True,
    domains: tuple[str, ...] = ("allowed.test", "rebind.test"),
    domain_ports: tuple[int, ...] = (8443,),
) -> Policy:
    return Policy.model_validate(
        {
            "network": {
                "mode": "egress",
                "allow": [{"cidr": "198.18.0.4/32", "ports": [8443]}],
                "domains": list(domains),
                "domain_ports": list(domain_ports),
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


async def test_curl_over_https_reaches_a_listed_name_with_a_certificate_the_sandbox_trusts(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path, tmp_path: Path
) -> None:
    """What an agent does under egress-web (curl https://...), against a test host with a test CA."""
    made = make_server_certificate(tmp_path, "allowed.test")
    sandbox = await make_egress_sandbox(policy=egress_policy(domain_ports=(8443, 8445)))
    fetch = "curl --silent --show-error --max-time 10 https://allowed.test:8445/"
    with https_host(made.cert, made.key, "198.18.0.2", 8445):
        untrusted = await run(egress_backend, sandbox, fetch)
        trust = await egress_backend.jail(sandbox).run(
            command(
                "/bin/sh",
                "-c",
                "cat > /usr/local/share/ca-certificates/nspawn-mcp-test.crt && update-ca-certificates",
                stdin=made.ca.read_bytes(),
            )
        )
        trusted = await run(egress_backend, sandbox, fetch)
        unlisted_port = await run(egress_backend, sandbox, fetch.replace(":8445", ":8446"))

    assert untrusted.exit_code == 60, untrusted.stderr  # reached, and the unknown issuer refused
    assert trust.exit_code == 0, trust.stderr
    assert (trusted.exit_code, trusted.stdout) == (0, b"hello over https\n"), trusted.stderr
    assert unlisted_port.exit_code != 0


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


async def gateway_of(backend: NspawnBackend, sandbox: str) -> str:
    """The host end of the sandbox's veth: where its resolver and relay listen."""
    spec = CommandSpec(("/bin/sh", "-c", "cat /etc/resolv.conf"), None, {}, b"", 10, 1 << 20)
    return (await backend.jail(sandbox).run(spec)).stdout.split()[1].decode()


def seen_since(outside: Path, before: int) -> list[str]:
    return outside.read_text().splitlines()[before:]


async def test_upstream_gets_the_servers_own_minimal_query(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    """DNS cannot carry data out in the query's ID, class, EDNS options or extra records:
    the test host's resolver sees only the query the server built."""
    sandbox = await make_egress_sandbox(policy=egress_policy())
    before = len(outside.read_text().splitlines())
    results = await probe(
        egress_backend,
        sandbox,
        [
            {"dns_query": "resolver", "name": "ALLOWED.test", "id": 0x1234},  # listed: asked upstream
            {"dns_query": "resolver", "name": "exfil.test", "id": 0x4321},  # unlisted: refused
        ],
    )
    # the sandbox's own ID comes back, in an answer the server built: one A record, no EDNS
    assert results == ["id=4660 rcode=0 an=1 ar=0", "id=17185 rcode=5 an=0 ar=0"]
    queries = [line for line in seen_since(outside, before) if line.startswith("dns-query")]
    assert len(queries) == 1, queries  # control: the listed name was asked, once
    name, upstream_id, *rest = queries[0].split()[1:]
    assert name == "allowed.test."  # normalised to lower case
    assert upstream_id != "id=4660"  # the server's own ID (random; 1 in 65536 it equals ours)
    assert rest == ["class=IN", "type=A", "edns=-1", "additional=0", "size=30"]  # no EDNS, no extras
    assert not any("exfil" in line for line in seen_since(outside, before))


async def test_a_sandbox_cannot_use_another_sandboxs_resolver_or_relay(
    egress_backend: NspawnBackend,
    make_egress_sandbox: Factory,
    outside: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sandbox B may resolve also.test only; A's policy lists allowed.test. B asking A's
    resolver must not resolve allowed.test (and so open A's allow set to B's traffic):
    nftables drops it, and, with a hole punched in nftables, A's resolver and relay still
    refuse B because of its source address."""
    caplog.set_level(logging.INFO, logger="nspawn_mcp.backend.network")
    first = await make_egress_sandbox(policy=egress_policy())
    second = await make_egress_sandbox(policy=egress_policy(domains=("also.test",)))
    first_gateway = await gateway_of(egress_backend, first)
    second_gateway = await gateway_of(egress_backend, second)
    before = len(outside.read_text().splitlines())

    attack = [
        {"dns_query": first_gateway, "name": "allowed.test", "id": 1},  # A's resolver
        {"host": first_gateway, "port": SNI_PROXY_PORT},  # A's relay
        {"dns_query": "resolver", "name": "allowed.test", "id": 2},  # its own: not listed for it
    ]
    assert await probe(egress_backend, second, attack) == [
        "error: TimeoutError",
        "error: TimeoutError",
        "id=2 rcode=5 an=0 ar=0",
    ]
    assert "dns allowed.test." not in seen_since(outside, before)
    # controls: each sandbox's own resolver answers its own listed names
    assert await probe(egress_backend, second, [{"dns_query": "resolver", "name": "also.test", "id": 3}]) == [
        "id=3 rcode=0 an=1 ar=0"
    ]
    assert await probe(
        egress_backend, first, [{"dns_query": "resolver", "name": "allowed.test", "id": 4}]
    ) == ["id=4 rcode=0 an=1 ar=0"]

    # The services' own check: let B's packets to A's gateway through nftables.
    second_end = second_gateway.rsplit(".", 1)[0] + "." + str(int(second_gateway.rsplit(".", 1)[1]) + 1)
    hole = await anyio.run_process(
        [
            "nft", "--echo", "--handle", "insert", "rule", "inet", "nspawn_mcp", "input",
            "ip", "saddr", second_end, "ip", "daddr", first_gateway, "accept",
        ]
    )  # fmt: skip
    handle = hole.stdout.decode().split("# handle ")[1].split()[0]
    try:
        before = len(outside.read_text().splitlines())
        caplog.clear()
        results = await probe(egress_backend, second, attack[:2])
    finally:
        await anyio.run_process(["nft", "delete", "rule", "inet", "nspawn_mcp", "input", "handle", handle])
    assert results == ["error: TimeoutError", ""]  # the relay accepted, then hung up at once
    assert "dns allowed.test." not in seen_since(outside, before)
    refusals = [r.getMessage() for r in caplog.records if r.name == "nspawn_mcp.backend.network"]
    assert any(f"ignored a DNS query from {second_end}" in message for message in refusals), refusals
    assert any(f"refused a relay connection from ('{second_end}'" in message for message in refusals), (
        refusals
    )


PLAINTEXT = b"PLAINTEXT-MARKER: GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n"
TLS_RECORD = b"\x17\x03\x03\x00\x0eTLS-OK-MARKER!"


async def test_plaintext_after_a_client_hello_never_reaches_the_host(
    egress_backend: NspawnBackend, make_egress_sandbox: Factory, outside: Path
) -> None:
    """'Domain ports carry TLS only' holds for the whole connection: after a ClientHello
    naming a listed domain, a TLS record is relayed, plain text cuts the connection."""
    sandbox = await make_egress_sandbox(policy=egress_policy(domain_ports=(8443, 8444)))
    before = len(outside.read_text().splitlines())
    hello = {"tls_then": "allowed.test", "port": 8444, "sni": "allowed.test"}
    results = await probe(
        egress_backend,
        sandbox,
        [
            {**hello, "then_hex": TLS_RECORD.hex()},  # control: a TLS record after the hello
            {**hello, "then_hex": PLAINTEXT.hex()},  # plain text once the relay is through
            {**hello, "then_hex": PLAINTEXT.hex(), "together": True},  # in the hello's own write
        ],
    )
    assert str(results[0]).startswith("got ")  # the control went through, record and all
    cut = {"closed", "error: ConnectionResetError"}  # hung up on; a reset if our FIN came late
    assert set(results[1:]) <= cut, results

    def recorded() -> list[str]:
        return [line for line in seen_since(outside, before) if line.startswith("recorded ")]

    await wait_until(lambda: len(recorded()) == 2, what="the test host to log both relayed connections")
    control, attack = recorded()
    assert TLS_RECORD.hex() in control
    assert PLAINTEXT.hex()[:20] not in attack  # not a byte of the plain text arrived
    assert PLAINTEXT.hex()[:20] not in outside.read_text()
    assert seen_since(outside, before).count("tcp 198.18.0.2:8444") == 2  # the third never connected


async def wait_for_output(backend: NspawnBackend, sandbox: str, process: str, text: str) -> str:
    """The background process's stdout, once it contains ``text`` (bounded)."""
    with anyio.fail_after(30):
        while True:
            output = await backend.jail(sandbox).read(process, 0, 0, 1 << 16)
            if text in output.stdout.decode():
                return output.stdout.decode()
            await anyio.sleep(0.05)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def established_at(address: str, port: int) -> int:
    """Established connections whose local end is ``address:port``, as the host's kernel
    lists them: the relay's open ones plus any still waiting in its accept queue."""
    local = f"{socket.inet_aton(address)[::-1].hex().upper()}:{port:04X}"
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for row in rows if row[1] == local and row[3] == "01")


async def test_a_flooding_sandbox_cannot_take_the_network_services_down(
    egress_backend: NspawnBackend,
    make_egress_sandbox: Factory,
    outside: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """20 DNS queries at once, then 1,500 idle connections to the relay while the server
    is short of file descriptors: the flooder's services and its neighbour's keep
    answering, the server's descriptors stay bounded, and nothing fails in the network
    component (it runs in this test's task group: an error there would end the test)."""
    caplog.set_level(logging.INFO, logger="nspawn_mcp.backend.network")
    flooder = await make_egress_sandbox(policy=egress_policy())
    neighbour = await make_egress_sandbox(policy=egress_policy())
    burst = {"dns_burst": "resolver", "name": "allowed.test", "count": 20}
    assert await probe(egress_backend, flooder, [burst]) == ["answered 20 of 20"]

    # Leave the server few descriptors, then flood the relay.
    baseline = open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (baseline + 40, hard))
    try:
        flood = await egress_backend.jail(flooder).spawn(
            CommandSpec(
                ("python3", "-c", (PROBES / "flood.py").read_text(), "allowed.test", "8443", "1500"),
                None,
                {},
                b"",
                60,
                1 << 20,
            ),
            None,
        )

        def out_of_descriptors() -> bool:
            return any("its relay cannot accept" in record.getMessage() for record in caplog.records)

        await wait_until(out_of_descriptors, what="the relay to run out of file descriptors")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    await wait_for_output(egress_backend, flooder, flood, "opened 1500")
    gateway = await gateway_of(egress_backend, flooder)
    await wait_until(
        lambda: established_at(gateway, SNI_PROXY_PORT) <= MAX_RELAYED_CONNECTIONS,
        what="the relay to close the connections beyond its cap",
    )

    # While the 1,500 are held: the server holds at most the cap of them, and both
    # sandboxes' services answer (the flooder's relay is full, by design: it hurt itself).
    assert open_fds() <= baseline + MAX_RELAYED_CONNECTIONS + 8
    tls = {"tls": "allowed.test", "port": 8443, "sni": "allowed.test"}
    assert await probe(egress_backend, neighbour, [tls, burst]) == [
        "hello from 198.18.0.2:8443",
        "answered 20 of 20",
    ]
    assert await probe(egress_backend, flooder, [{"resolve": "allowed.test"}]) == [["198.18.0.2"]]

    await egress_backend.jail(flooder).write(flood, b"", close=True)
    report = await wait_for_output(egress_backend, flooder, flood, "closed by the server")
    closed = int(report.rsplit(maxsplit=1)[1])
    assert closed >= 1500 - MAX_RELAYED_CONNECTIONS  # the excess was refused, not queued

    # After the flood, the flooder's relay serves it again; no service failed on the way.
    assert await probe(egress_backend, flooder, [tls]) == ["hello from 198.18.0.2:8443"]
    failures = [r for r in caplog.records if r.name.startswith("nspawn_mcp") and r.levelno >= logging.ERROR]
    assert failures == []
