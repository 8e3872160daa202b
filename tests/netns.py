"""Test hosts for network tests, in a network namespace the tests make themselves.

198.18.0.2, .3 and .4 (a benchmarking range, unrouted) sit behind a veth

whose host end is 198.18.0.1. They run TCP servers and a DNS server that log
every connection and question; nothing leaves this machine.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

NETNS = "nsmcp-test-out"
HOST_SCRIPT = Path(__file__).parent / "integration" / "probes" / "outside_host.py"
HTTPS_SCRIPT = Path(__file__).parent / "integration" / "probes" / "https_host.py"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True)


def _remove() -> None:
    subprocess.run(["ip", "netns", "del", NETNS], capture_output=True, check=False)
    subprocess.run(["ip", "link", "del", "nsmt-host"], capture_output=True, check=False)


@contextlib.contextmanager
def outside_hosts(log: Path) -> Iterator[Path]:
    """Start the test hosts; yield the log of what reached them; remove everything after."""
    _remove()
    _sh("ip", "netns", "add", NETNS)
    try:
        _sh("ip", "link", "add", "nsmt-host", "type", "veth", "peer", "name", "nsmt-out")
        _sh("ip", "link", "set", "nsmt-out", "netns", NETNS)
        _sh("ip", "addr", "add", "198.18.0.1/24", "dev", "nsmt-host")
        _sh("ip", "link", "set", "nsmt-host", "up")
        inside = ["ip", "netns", "exec", NETNS]
        _sh(*inside, "ip", "addr", "add", "198.18.0.2/24", "dev", "nsmt-out")
        _sh(*inside, "ip", "addr", "add", "198.18.0.3/24", "dev", "nsmt-out")
        _sh(*inside, "ip", "addr", "add", "198.18.0.4/24", "dev", "nsmt-out")
        _sh(*inside, "ip", "link", "set", "nsmt-out", "up")
        _sh(*inside, "ip", "link", "set", "lo", "up")
        hosts = subprocess.Popen([*inside, sys.executable, str(HOST_SCRIPT), str(log)])
        try:
            deadline = time.monotonic() + 20
            while not (log.exists() and "ready" in log.read_text()):
                if time.monotonic() > deadline or hosts.poll() is not None:
                    raise AssertionError("the test hosts did not start")
                time.sleep(0.02)
            yield log
        finally:
            hosts.kill()
            hosts.wait()
    finally:
        _remove()


@contextlib.contextmanager
def https_host(cert: Path, key: Path, address: str, port: int) -> Iterator[None]:
    """A web server over TLS at ``address:port`` among the test hosts (inside :func:`outside_hosts`)."""
    serve = [sys.executable, str(HTTPS_SCRIPT), str(cert), str(key), address, str(port)]
    with subprocess.Popen(["ip", "netns", "exec", NETNS, *serve], stdout=subprocess.PIPE) as server:
        try:
            assert server.stdout is not None
            if server.stdout.readline() != b"ready\n":
                raise AssertionError("the https test host did not start")
            yield
        finally:
            server.kill()


EGRESS_TO_OUTSIDE_HOSTS = """
[network]
mode = "egress"
allow = [{ cidr = "198.18.0.4/32", ports = [8443] }]
domains = ["allowed.test"]
domain_ports = [8443]
upstream_dns = "198.18.0.2"
private_dns_answers = true
"""
