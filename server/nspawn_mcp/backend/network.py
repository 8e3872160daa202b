"""Egress networking on the host: veth addresses, nftables rules, the filtering resolver.

Set-up code may use command-line tools; this module drives the kernel with ``ip``
and ``nft`` (no D-Bus service configures veths or nftables) and answers DNS itself.
The rules are pure functions in :mod:`.egress`.

The resolver listens on each egress sandbox's host end, port 53. It answers only
names the policy lists: for those it asks the upstream resolver, keeps only the A
records the policy lets the sandbox reach, adds them to the sandbox's nftables set
(for as long as their TTL, at least a minute) and only then replies. Any other
name gets REFUSED without a query leaving the host, so DNS cannot carry data out.

Next to it, on port ``SNI_PROXY_PORT``, connections to those addresses arrive
(redirected by nftables). Each is relayed to where it was going only if it opens
with a TLS ClientHello whose server name is listed and resolved, for this sandbox,
to that address: a listed name cannot be used to reach other sites that share
its address (a CDN), and plain-text connections to domain addresses are refused.

"""

from __future__ import annotations

import functools
import logging
import socket
from pathlib import Path

import anyio
import anyio.abc
import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
from anyio.abc import TaskGroup

from ..errors import BackendError
from ..policy import EgressPlan
from .egress import (
    SNI_PROXY_PORT,
    base_ruleset,
    domain_allowed,
    egress_interfaces_in,
    endpoints,
    host_interface,
    parse_sni,
    reachable_answer,
    resolved_addresses,
    sandbox_rules,
    sandbox_rules_removal,
)

__all__ = ["EgressNetwork"]

log = logging.getLogger(__name__)

_UPSTREAM_TIMEOUT = 3.0
_HELLO_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 10.0
_MAX_HELLO = 64 << 10
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_IP_FORWARD = anyio.Path("/proc/sys/net/ipv4/ip_forward")

_MAX_DNS_MESSAGE = 4096


def _host_resolver() -> str:
    try:
        for line in Path("/etc/resolv.conf").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                return fields[1]
    except OSError:
        pass
    return "127.0.0.1"


def _original_destination(stream: anyio.abc.SocketStream) -> tuple[str, int]:
    """Where the sandbox sent a connection before nftables redirected it here."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)  # noqa: S610 - not Django
    packed = raw.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(packed[4:8]), int.from_bytes(packed[2:4], "big")


async def _pipe(source: anyio.abc.SocketStream, destination: anyio.abc.SocketStream) -> None:
    try:
        async for chunk in source:
            await destination.send(chunk)
        await destination.send_eof()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass


async def _run(argv: list[str], stdin: str | None = None, *, check: bool = True) -> bool:
    result = await anyio.run_process(argv, input=stdin.encode() if stdin else None, check=False)
    if result.returncode != 0 and check:
        log.warning("%s failed: %s", " ".join(argv[:3]), result.stderr.decode(errors="replace").strip())
        raise BackendError("setting up the sandbox's network failed")
    return result.returncode == 0


class EgressNetwork:
    """Host-side networking of egress sandboxes; one per server, living in its task group."""

    def __init__(self, tasks: TaskGroup, proc_root: Path, state_dir: Path) -> None:
        self._tasks = tasks
        self._proc_root = proc_root
        self._resolvers: dict[str, anyio.CancelScope] = {}
        # per sandbox: address -> the listed names that resolved to it
        self._answers: dict[str, dict[str, set[str]]] = {}
        self._saved_forwarding = anyio.Path(state_dir / "ip_forward.saved")

    async def _ensure_base(self) -> None:
        """The shared table, and IPv4 forwarding (its previous value is kept to restore)."""
        if not await _run(["nft", "list", "table", "inet", "nspawn_mcp"], check=False):
            await _run(["nft", "-f", "-"], base_ruleset())
        if not await self._saved_forwarding.exists():
            await self._saved_forwarding.write_text(await _IP_FORWARD.read_text())
        await _IP_FORWARD.write_text("1\n")

    async def _remove_base_if_unused(self) -> None:
        """With no egress sandbox left, the host gets its table and forwarding setting back."""
        listing = await anyio.run_process(
            ["nft", "list", "map", "inet", "nspawn_mcp", "sandbox_egress"], check=False
        )
        if listing.returncode != 0 or b"elements" in listing.stdout:
            return
        await _run(["nft", "delete", "table", "inet", "nspawn_mcp"], check=False)
        if await self._saved_forwarding.exists():
            await _IP_FORWARD.write_text(await self._saved_forwarding.read_text())
            await self._saved_forwarding.unlink()

    async def prune(self, keep: set[str]) -> None:
        """After a restart: drop the rules of egress sandboxes that went while the server was down."""
        listing = await anyio.run_process(
            ["nft", "-j", "list", "map", "inet", "nspawn_mcp", "sandbox_egress"], check=False
        )
        if listing.returncode != 0:
            return
        for sandbox_id in egress_interfaces_in(listing.stdout.decode()) - keep:
            log.info("removing the egress rules of vanished sandbox %s", sandbox_id)
            for script in sandbox_rules_removal(sandbox_id):
                await _run(["nft", "-f", "-"], script, check=False)
        await self._remove_base_if_unused()

    async def attach(self, sandbox_id: str, plan: EgressPlan, leader: int) -> None:
        """Address both ends of the sandbox's veth, route, apply its rules, start its resolver."""
        assert plan.subnet is not None
        self._resolvers[sandbox_id] = anyio.CancelScope()  # from here on, detach has work to do
        await self._ensure_base()
        host_end, sandbox_end = endpoints(plan.subnet)

        interface = host_interface(sandbox_id)
        await _run(["ip", "addr", "add", f"{host_end}/30", "dev", interface])
        await _run(["ip", "link", "set", interface, "up"])
        inside = ["nsenter", f"--net={self._proc_root}/{leader}/ns/net", "--"]
        await _run([*inside, "ip", "addr", "add", f"{sandbox_end}/30", "dev", "host0"])
        await _run([*inside, "ip", "link", "set", "host0", "up"])
        await _run([*inside, "ip", "route", "add", "default", "via", host_end])
        await _run(["nft", "-f", "-"], sandbox_rules(sandbox_id, plan))
        await self.serve(sandbox_id, plan)

    async def serve(self, sandbox_id: str, plan: EgressPlan) -> None:
        """Start the sandbox's filtering resolver and server-name check (also after a restart)."""
        assert plan.subnet is not None
        host_end, _ = endpoints(plan.subnet)
        udp = await anyio.create_udp_socket(local_host=host_end, local_port=53)
        listener = await anyio.create_tcp_listener(local_host=host_end, local_port=SNI_PROXY_PORT)
        scope = anyio.CancelScope()
        self._resolvers[sandbox_id] = scope
        self._answers.setdefault(sandbox_id, {})
        self._tasks.start_soon(self._serve_forever, scope, udp, listener, sandbox_id, plan)

    async def detach(self, sandbox_id: str) -> None:
        """Undo :meth:`attach` (or :meth:`serve`); nothing to do for sandboxes without egress."""
        scope = self._resolvers.pop(sandbox_id, None)
        if scope is None:
            return
        scope.cancel()
        self._answers.pop(sandbox_id, None)
        for script in sandbox_rules_removal(sandbox_id):
            await _run(["nft", "-f", "-"], script, check=False)
        await self._remove_base_if_unused()

    async def _serve_forever(
        self,
        scope: anyio.CancelScope,
        udp: anyio.abc.UDPSocket,
        listener: anyio.abc.Listener[anyio.abc.SocketStream],
        sandbox_id: str,
        plan: EgressPlan,
    ) -> None:
        with scope:
            async with udp, listener, anyio.create_task_group() as tasks:
                tasks.start_soon(listener.serve, functools.partial(self._check_and_relay, sandbox_id, plan))
                async for packet, client in udp:
                    tasks.start_soon(self._answer, udp, packet, client, sandbox_id, plan)

    async def _check_and_relay(
        self, sandbox_id: str, plan: EgressPlan, client: anyio.abc.SocketStream
    ) -> None:
        """A connection redirected here must carry a TLS ClientHello naming a listed domain that
        resolved, for this sandbox, to the address it was sent to; then it is relayed there."""
        async with client:
            address, port = _original_destination(client)
            hello = b""
            complete, name = False, None
            with anyio.move_on_after(_HELLO_TIMEOUT):
                while not complete and len(hello) <= _MAX_HELLO:
                    try:
                        hello += await client.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                        return
                    complete, name = parse_sni(hello)
            known = self._answers.get(sandbox_id, {}).get(address, set())
            if name is None or not domain_allowed(name, plan.domains) or name not in known:
                log.info(
                    "sandbox %s: refused a connection to %s:%d (server name %r)",
                    sandbox_id,
                    address,
                    port,
                    name,
                )
                return
            try:
                with anyio.fail_after(_CONNECT_TIMEOUT):
                    upstream = await anyio.connect_tcp(address, port)
            except (OSError, TimeoutError):
                return
            async with upstream:
                await upstream.send(hello)
                async with anyio.create_task_group() as pipes:
                    pipes.start_soon(_pipe, client, upstream)
                    pipes.start_soon(_pipe, upstream, client)

    async def _answer(
        self,
        udp: anyio.abc.UDPSocket,
        packet: bytes,
        client: tuple[str, int],
        sandbox_id: str,
        plan: EgressPlan,
    ) -> None:
        try:
            query = dns.message.from_wire(packet)
        except dns.exception.DNSException:
            return
        try:
            reply = await self._decide(query, sandbox_id, plan)
        except BackendError:
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
        try:
            await udp.sendto(reply.to_wire(max_size=_MAX_DNS_MESSAGE), *client)
        except (OSError, dns.exception.DNSException) as exc:
            log.info("cannot answer a DNS query of %s: %s", sandbox_id, exc)

    async def _decide(
        self, query: dns.message.Message, sandbox_id: str, plan: EgressPlan
    ) -> dns.message.Message:
        reply = dns.message.make_response(query)
        if len(query.question) != 1 or not domain_allowed(query.question[0].name.to_text(), plan.domains):
            reply.set_rcode(dns.rcode.REFUSED)
            return reply
        if query.question[0].rdtype != dns.rdatatype.A:
            return reply  # no IPv6 or other records: an empty answer
        try:
            upstream = await self._ask_upstream(query, plan.upstream_dns or _host_resolver())
        except (OSError, TimeoutError, dns.exception.DNSException):
            reply.set_rcode(dns.rcode.SERVFAIL)
            return reply
        allowed: dict[str, int] = {}
        kept = []
        for rrset in upstream.answer:
            if rrset.rdtype == dns.rdatatype.A:
                reachable = [
                    r for r in rrset if reachable_answer(r.address, private_allowed=plan.private_dns_answers)
                ]
                if not reachable:
                    continue
                for record in reachable:
                    allowed[record.address] = rrset.ttl
                rrset = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, reachable)
            kept.append(rrset)
        if allowed:
            script = resolved_addresses(sandbox_id, allowed, max(allowed.values()))
            await _run(["nft", "-f", "-"], script)
            name = query.question[0].name.to_text().rstrip(".").lower()
            answers = self._answers.setdefault(sandbox_id, {})
            for address in allowed:
                answers.setdefault(address, set()).add(name)
        reply.set_rcode(upstream.rcode())
        reply.answer = kept
        return reply

    async def _ask_upstream(self, query: dns.message.Message, server: str) -> dns.message.Message:
        with anyio.fail_after(_UPSTREAM_TIMEOUT):
            async with await anyio.create_connected_udp_socket(server, 53) as upstream:
                await upstream.send(query.to_wire())
                return dns.message.from_wire(await upstream.receive())
