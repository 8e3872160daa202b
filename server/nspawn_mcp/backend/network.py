"""Egress networking on the host: veth addresses, nftables rules, the filtering resolver.

Set-up code may use command-line tools; this module drives the kernel with ``ip``
and ``nft`` (no D-Bus service configures veths or nftables) and answers DNS itself.
The rules, the DNS messages and the TLS record check are pure functions in
:mod:`.egress`; this module only does the I/O.

The resolver listens on each egress sandbox's host end, port 53. It answers only
names the policy lists: for those it asks the upstream resolver a query of its
own, keeps only the A records the policy lets the sandbox reach, adds them to the
sandbox's nftables set (for as long as their TTL, at least a minute) and only then
replies with an answer it builds itself. Any other name gets REFUSED without a
query leaving the host, so DNS cannot carry data out.

Next to it, on port ``SNI_PROXY_PORT``, connections to those addresses arrive
(redirected by nftables). Each is relayed to where it was going only if it opens
with a TLS ClientHello whose server name is listed and resolved, for this sandbox,
to that address: a listed name cannot be used to reach other sites that share
its address (a CDN), and plain-text connections to domain addresses are refused.
After the hello, the sandbox's side must stay a stream of TLS records.

Both services answer only their own sandbox's address (nftables already drops the
rest; they check again). Each sandbox's services run behind their own error
boundary with caps on in-flight queries and open connections: a sandbox that
floods or breaks its services ends at most its own, never the server.

"""

from __future__ import annotations

import logging
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import dns.rcode
from anyio.abc import TaskGroup

from ..errors import BackendError
from ..listeners import accept_forever, tcp_listener
from ..naming import host_interface
from ..policy import EgressPlan
from .egress import (
    SNI_PROXY_PORT,
    DnsQuestion,
    NotTls,
    SubnetPool,
    TlsFraming,
    UpstreamReply,
    base_ruleset,
    dns_action,
    domain_allowed,
    egress_interfaces_in,
    endpoints,
    frame_tls,
    parse_sni,
    reachable_answer,
    read_question,
    read_upstream_reply,
    resolved_addresses,
    sandbox_reply,
    sandbox_rules,
    sandbox_rules_removal,
    upstream_query,
)

__all__ = ["MAX_DNS_QUERIES", "MAX_RELAYED_CONNECTIONS", "EgressNetwork"]

log = logging.getLogger(__name__)

MAX_RELAYED_CONNECTIONS = 64
"""Connections one sandbox may have open at its relay (waiting for a hello or relayed);
more are closed as soon as they are accepted."""
MAX_DNS_QUERIES = 32
"""DNS queries of one sandbox being answered at once; more are dropped unanswered."""

_UPSTREAM_TIMEOUT = 3.0
_HELLO_TIMEOUT = 10.0
_CONNECT_TIMEOUT = 10.0
_MAX_HELLO = 64 << 10
_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
_IP_FORWARD = anyio.Path("/proc/sys/net/ipv4/ip_forward")


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


async def _pipe(
    source: anyio.abc.SocketStream, destination: anyio.abc.SocketStream, framing: TlsFraming | None = None
) -> None:
    """Copy ``source`` to ``destination`` until either ends. With ``framing``, each chunk goes on
    only if it continues the TLS records; :class:`NotTls` is raised (before sending it) if not."""
    try:
        async for chunk in source:
            if framing is not None:
                framing = frame_tls(framing, chunk)
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
        self._services: dict[str, anyio.CancelScope] = {}
        self._subnets = SubnetPool()
        self._base_lock = anyio.Lock()  # the shared table is made and removed by one task at a time
        self._saved_forwarding = anyio.Path(state_dir / "ip_forward.saved")

    async def _ensure_base(self) -> None:
        """The shared table, and IPv4 forwarding (its previous value is kept to restore).

        A table left by an older server without per-sandbox input chains is replaced:
        its input rules let any sandbox reach every sandbox's services. The sandboxes it
        served lose their rules and so all their traffic (fail closed)."""
        if not await _run(["nft", "list", "map", "inet", "nspawn_mcp", "sandbox_input"], check=False):
            if await _run(["nft", "delete", "table", "inet", "nspawn_mcp"], check=False):
                log.warning("replaced an egress table of an older layout; its sandboxes lost their network")
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
        async with self._base_lock:
            for sandbox_id in egress_interfaces_in(listing.stdout.decode()) - keep:
                log.info("removing the egress rules of vanished sandbox %s", sandbox_id)
                for script in sandbox_rules_removal(sandbox_id):
                    await _run(["nft", "-f", "-"], script, check=False)
            await self._remove_base_if_unused()

    def reserve(self, sandbox_id: str) -> str:
        """A /30 for a new egress sandbox, held until :meth:`release`; QuotaExceeded if none is left.

        Synchronous: a create reserves between its quota check and registering the sandbox,
        with no await in between, so concurrent creates cannot take the same subnet.
        """
        return self._subnets.reserve(sandbox_id)

    def release(self, sandbox_id: str) -> None:
        """The sandbox is gone, and its veth with it: its subnet may be given again."""
        self._subnets.release(sandbox_id)

    def _claim(self, sandbox_id: str, plan: EgressPlan) -> str:
        """The sandbox's subnet, recorded as its own (reserved at create, or adopted after a restart)."""
        if plan.subnet is None:
            raise BackendError(f"sandbox {sandbox_id} has no network reserved")
        try:
            self._subnets.claim(sandbox_id, plan.subnet)
        except ValueError as exc:
            log.warning("sandbox %s: cannot hold its subnet: %s", sandbox_id, exc)
            raise BackendError(f"sandbox {sandbox_id}'s network is held by another sandbox") from None
        return plan.subnet

    async def attach(self, sandbox_id: str, plan: EgressPlan, leader: int) -> str:
        """Address both ends of the sandbox's veth, route, apply its rules, start its resolver;
        return the resolver's address (the host end)."""
        subnet = self._claim(sandbox_id, plan)
        self._services[sandbox_id] = anyio.CancelScope()  # from here on, detach has work to do
        host_end, sandbox_end = endpoints(subnet)

        interface = host_interface(sandbox_id)
        await _run(["ip", "addr", "add", f"{host_end}/30", "dev", interface])
        await _run(["ip", "link", "set", interface, "up"])
        inside = ["nsenter", f"--net={self._proc_root}/{leader}/ns/net", "--"]
        await _run([*inside, "ip", "addr", "add", f"{sandbox_end}/30", "dev", "host0"])
        await _run([*inside, "ip", "link", "set", "host0", "up"])
        await _run([*inside, "ip", "route", "add", "default", "via", host_end])
        async with self._base_lock:
            await self._ensure_base()
            await _run(["nft", "-f", "-"], sandbox_rules(sandbox_id, plan))
        await self.serve(sandbox_id, plan)
        return host_end

    async def serve(self, sandbox_id: str, plan: EgressPlan) -> None:
        """Start the sandbox's filtering resolver and server-name check (also after a restart,
        when this also records the subnet the sandbox has as held)."""
        host_end, sandbox_end = endpoints(self._claim(sandbox_id, plan))
        udp = await anyio.create_udp_socket(local_host=host_end, local_port=53)
        try:
            listener = await tcp_listener(host_end, SNI_PROXY_PORT)
        except BaseException:
            await udp.aclose()
            raise
        scope = anyio.CancelScope()
        self._services[sandbox_id] = scope
        service = _SandboxServices(sandbox_id, plan, sandbox_end)
        self._tasks.start_soon(service.run, scope, udp, listener)

    async def detach(self, sandbox_id: str) -> None:
        """Undo :meth:`attach` (or :meth:`serve`); nothing to do for sandboxes without egress.

        The subnet stays held until :meth:`release`, once the sandbox's veth is gone."""
        scope = self._services.pop(sandbox_id, None)
        if scope is None:
            return
        scope.cancel()
        async with self._base_lock:
            for script in sandbox_rules_removal(sandbox_id):
                await _run(["nft", "-f", "-"], script, check=False)
            await self._remove_base_if_unused()


@dataclass
class _SandboxServices:
    """One egress sandbox's resolver and relay: answers only ``sandbox_end``, bounded, and
    behind an error boundary of their own (:meth:`run`)."""

    sandbox_id: str
    plan: EgressPlan
    sandbox_end: str
    answers: dict[str, set[str]] = field(default_factory=dict)
    """address -> the listed names that resolved to it, for this sandbox"""
    queries: int = 0
    relays: int = 0
    send_lock: anyio.Lock = field(default_factory=anyio.Lock)
    """anyio refuses concurrent sends on one UDP socket (BusyResourceError)."""

    async def run(
        self,
        scope: anyio.CancelScope,
        udp: anyio.abc.UDPSocket,
        listener: anyio.abc.SocketListener,
    ) -> None:
        """Serve until cancelled. Threat: an error here used to end the server's root task
        group, so one sandbox could stop every sandbox's services and the server itself.
        Now it is logged and ends this sandbox's services only (its traffic then fails
        closed: nftables still redirects it, and nothing answers)."""
        with scope:
            try:
                async with udp, listener, anyio.create_task_group() as tasks:
                    relay = f"sandbox {self.sandbox_id}: its relay"
                    tasks.start_soon(accept_forever, listener, tasks, self._relay, self._admit, relay)
                    await self._receive_forever(udp, tasks)
            except Exception:
                log.exception("sandbox %s: its resolver and relay failed and stopped", self.sandbox_id)

    async def _receive_forever(self, udp: anyio.abc.UDPSocket, tasks: TaskGroup) -> None:
        async for packet, (address, port) in udp:
            if address != self.sandbox_end:
                log.info("sandbox %s: ignored a DNS query from %s", self.sandbox_id, address)
                continue
            if self.queries >= MAX_DNS_QUERIES:
                log.debug("sandbox %s: dropped a DNS query, %d in flight", self.sandbox_id, self.queries)
                continue
            self.queries += 1
            tasks.start_soon(self._answer, udp, packet, (address, port))

    def _admit(self) -> bool:
        """Take a relay slot for a new connection; False (and it is closed) when all are taken."""
        if self.relays >= MAX_RELAYED_CONNECTIONS:
            log.debug("sandbox %s: closed a connection, %d open", self.sandbox_id, self.relays)
            return False
        self.relays += 1
        return True

    async def _answer(self, udp: anyio.abc.UDPSocket, packet: bytes, client: tuple[str, int]) -> None:
        """One query, behind its own error boundary: a failure drops its answer only."""
        try:
            question = read_question(packet)
            if question is None:
                return
            reply = await self._decide(question)
            async with self.send_lock:
                await udp.sendto(reply, *client)
        except (OSError, anyio.BrokenResourceError) as exc:
            log.info("sandbox %s: cannot answer a DNS query: %s", self.sandbox_id, exc)
        except Exception:
            log.exception("sandbox %s: a DNS query failed", self.sandbox_id)
        finally:
            self.queries -= 1

    async def _decide(self, question: DnsQuestion) -> bytes:
        action = dns_action(question, self.plan.domains)
        if action == "refuse":
            return sandbox_reply(question, dns.rcode.REFUSED, {})
        if action == "empty":
            return sandbox_reply(question, dns.rcode.NOERROR, {})
        try:
            upstream = await self._ask_upstream(question.name)
        except (OSError, TimeoutError):
            return sandbox_reply(question, dns.rcode.SERVFAIL, {})
        allowed = {
            address: ttl
            for address, ttl in upstream.addresses
            if reachable_answer(address, private_allowed=self.plan.private_dns_answers)
        }
        if allowed:
            script = resolved_addresses(self.sandbox_id, allowed, max(allowed.values()))
            try:
                await _run(["nft", "-f", "-"], script)
            except (BackendError, OSError):
                return sandbox_reply(question, dns.rcode.SERVFAIL, {})
            for address in allowed:
                self.answers.setdefault(address, set()).add(question.name)
        return sandbox_reply(question, upstream.rcode, allowed)

    async def _ask_upstream(self, name: str) -> UpstreamReply:
        """A fresh query of the server's own (random ID and source port); replies that do
        not match it are ignored until one does or the time is up."""
        query_id = secrets.randbelow(1 << 16)
        server = self.plan.upstream_dns or _host_resolver()
        with anyio.fail_after(_UPSTREAM_TIMEOUT):
            async with await anyio.create_connected_udp_socket(server, 53) as upstream:
                await upstream.send(upstream_query(name, query_id))
                while True:
                    reply = read_upstream_reply(await upstream.receive(), query_id, name)
                    if reply is not None:
                        return reply

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        """One connection, behind its own error boundary."""
        try:
            async with client:
                await self._check_and_relay(client)
        except Exception:
            log.exception("sandbox %s: a relayed connection failed", self.sandbox_id)
        finally:
            self.relays -= 1

    async def _check_and_relay(self, client: anyio.abc.SocketStream) -> None:
        """A connection redirected here must come from the sandbox, carry a TLS ClientHello
        naming a listed domain that resolved, for this sandbox, to the address it was sent
        to, and continue as TLS records; then it is relayed there."""
        source = client.extra(anyio.abc.SocketAttribute.remote_address)  # noqa: S610 - not Django
        if not isinstance(source, tuple) or source[0] != self.sandbox_end:
            log.info("sandbox %s: refused a relay connection from %s", self.sandbox_id, source)
            return
        try:
            address, port = _original_destination(client)
        except OSError:
            return  # not redirected by nftables: nowhere to relay to
        hello = b""
        complete, name = False, None
        with anyio.move_on_after(_HELLO_TIMEOUT):
            while not complete and len(hello) <= _MAX_HELLO:
                try:
                    hello += await client.receive()
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                complete, name = parse_sni(hello)
        known = self.answers.get(address, set())
        if name is None or not domain_allowed(name, self.plan.domains) or name not in known:
            log.info(
                "sandbox %s: refused a connection to %s:%d (server name %r)",
                self.sandbox_id,
                address,
                port,
                name,
            )
            return
        try:
            framing = frame_tls(TlsFraming(), hello)
        except NotTls as exc:
            log.info("sandbox %s: cut a connection to %s:%d: %s", self.sandbox_id, address, port, exc)
            return
        try:
            with anyio.fail_after(_CONNECT_TIMEOUT):
                upstream = await anyio.connect_tcp(address, port)
        except (OSError, TimeoutError):
            return
        async with upstream:
            await upstream.send(hello)
            try:
                async with anyio.create_task_group() as pipes:
                    pipes.start_soon(_pipe, client, upstream, framing)
                    pipes.start_soon(_pipe, upstream, client)
            except* NotTls as group:
                log.info(
                    "sandbox %s: cut a connection to %s:%d: %s",
                    self.sandbox_id,
                    address,
                    port,
                    group.exceptions[0],
                )
