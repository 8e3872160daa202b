"""Pure rules for 'egress' sandboxes: addresses, the nftables ruleset, DNS decisions.

Each egress sandbox gets a /30 from ``SANDBOX_NETWORK``: the host end of its veth
(``ve-<id>``, made by nspawn's ``--network-veth``) is the first address and also
where the server's filtering resolver listens; the sandbox is the second.

The host's nftables table ``inet nspawn_mcp`` refuses everything from a sandbox
veth except, on input, DNS and the server-name check on that sandbox's own host end,
from that sandbox's own address (a per-sandbox chain picked by interface: one
sandbox cannot ask another sandbox's resolver and so open the other's allow set)
and, forwarded, the sandbox's listed CIDR/port pairs. Connections to the addresses its listed
domains resolved to (a set with timeouts, filled by the resolver) on the domain
ports are redirected to the server, which relays them only if their TLS
ClientHello names a listed domain that resolved to that very address, and only
while the sandbox keeps sending well-formed TLS records (:func:`frame_tls`). Other
sandboxes, the host itself, IPv6 and anything unlisted are dropped.

DNS is rebuilt, never forwarded: the server reads one question from the sandbox
(:func:`read_question`), asks upstream a fresh minimal query of its own
(:func:`upstream_query`), accepts only a reply that matches it
(:func:`read_upstream_reply`) and answers the sandbox with a message it builds
itself (:func:`sandbox_reply`). No byte the sandbox chose but the listed name
leaves the host.

"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ..errors import QuotaExceeded
from ..naming import INTERFACE_PATTERN, host_interface, nft_object, sandbox_of_interface
from ..policy import EgressPlan

__all__ = [
    "MAX_TLS_RECORD",
    "SANDBOX_NETWORK",
    "SNI_PROXY_PORT",
    "DnsQuestion",
    "NotTls",
    "SubnetPool",
    "TlsFraming",
    "UpstreamReply",
    "base_ruleset",
    "dns_action",
    "domain_allowed",
    "egress_interfaces_in",
    "endpoints",
    "frame_tls",
    "parse_sni",
    "reachable_answer",
    "read_question",
    "read_upstream_reply",
    "resolved_addresses",
    "sandbox_reply",
    "sandbox_rules",
    "sandbox_rules_removal",
    "upstream_query",
]

SANDBOX_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
TABLE = "inet nspawn_mcp"
SNI_PROXY_PORT = 3129
"""Where an egress sandbox's connections to its listed domains are redirected, on its gateway."""


def _first_free(used: Iterable[str]) -> str:
    """The first free /30 of ``SANDBOX_NETWORK``; QuotaExceeded when every one is taken."""
    taken = set(used)
    for subnet in SANDBOX_NETWORK.subnets(new_prefix=30):
        if str(subnet) not in taken:
            return str(subnet)
    raise QuotaExceeded(
        f"this host has no network left for another egress sandbox (all {len(taken)} are in use); "
        "destroy an egress sandbox first, or use a policy without network.mode = 'egress'"
    )


class SubnetPool:
    """Which egress sandbox holds which /30 of ``SANDBOX_NETWORK``: no I/O, no awaits.

    :meth:`reserve` is synchronous, so two creates cannot take the same subnet; a subnet
    stays held until :meth:`release`, after its sandbox (and so its veth) has gone.
    """

    def __init__(self) -> None:
        self._subnets: dict[str, str] = {}
        """sandbox id -> its subnet"""
        self._holders: dict[str, str] = {}
        """subnet -> the sandbox holding it"""

    def reserve(self, sandbox_id: str) -> str:
        """A free /30 for ``sandbox_id`` (the one it holds, if any); QuotaExceeded if none is left."""
        if sandbox_id not in self._subnets:
            self.claim(sandbox_id, _first_free(self._holders))
        return self._subnets[sandbox_id]

    def claim(self, sandbox_id: str, subnet: str) -> None:
        """Record that ``sandbox_id`` has ``subnet`` (a sandbox adopted after a restart).

        Raises ValueError if another sandbox holds it, or this one holds another.
        """
        holder = self._holders.get(subnet, sandbox_id)
        if holder != sandbox_id:
            raise ValueError(f"{subnet} for {sandbox_id}: {holder} holds {subnet}")
        held = self._subnets.get(sandbox_id, subnet)
        if held != subnet:
            raise ValueError(f"{subnet} for {sandbox_id}: {sandbox_id} holds {held}")
        self._subnets[sandbox_id] = subnet
        self._holders[subnet] = sandbox_id

    def release(self, sandbox_id: str) -> None:
        subnet = self._subnets.pop(sandbox_id, None)
        if subnet is not None:
            del self._holders[subnet]

    def held(self, sandbox_id: str) -> str | None:
        return self._subnets.get(sandbox_id)


def endpoints(subnet: str) -> tuple[str, str]:
    """(host end, sandbox end) of a sandbox's /30."""
    hosts = list(ipaddress.IPv4Network(subnet).hosts())
    return str(hosts[0]), str(hosts[1])


def base_ruleset() -> str:
    """The table every egress sandbox hangs off; created once, kept while sandboxes live."""
    return f"""\
add table {TABLE}
add map {TABLE} sandbox_input {{ type ifname : verdict; }}
add map {TABLE} sandbox_egress {{ type ifname : verdict; }}
add map {TABLE} sandbox_sni {{ type ifname : verdict; }}
add chain {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain {TABLE} input {{ type filter hook input priority filter; policy accept; }}
add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add rule {TABLE} input iifname "{INTERFACE_PATTERN}" meta nfproto ipv4 iifname vmap @sandbox_input
add rule {TABLE} input iifname "{INTERFACE_PATTERN}" drop
add rule {TABLE} forward oifname "{INTERFACE_PATTERN}" ct state established,related accept
add rule {TABLE} forward oifname "{INTERFACE_PATTERN}" drop
add rule {TABLE} forward iifname "{INTERFACE_PATTERN}" ip daddr {SANDBOX_NETWORK} drop
add rule {TABLE} forward iifname "{INTERFACE_PATTERN}" meta nfproto ipv4 iifname vmap @sandbox_egress
add rule {TABLE} forward iifname "{INTERFACE_PATTERN}" drop
add rule {TABLE} prerouting iifname "{INTERFACE_PATTERN}" meta nfproto ipv4 iifname vmap @sandbox_sni
add rule {TABLE} postrouting ip saddr {SANDBOX_NETWORK} oifname != "{INTERFACE_PATTERN}" masquerade
"""


def sandbox_rules(sandbox_id: str, plan: EgressPlan) -> str:
    """Listed ranges are forwarded as they are; connections to addresses that listed
    domains resolved to go to the TLS server-name check on the sandbox's gateway.

    Input from the sandbox's veth reaches only its own gateway's resolver and relay,
    and only from its own address: not another sandbox's services, not the host's.
    """
    assert plan.subnet is not None
    chain, resolved = nft_object("egress", sandbox_id), nft_object("resolved", sandbox_id)
    sni, services = nft_object("sni", sandbox_id), nft_object("input", sandbox_id)
    interface = host_interface(sandbox_id)
    gateway, sandbox_end = endpoints(plan.subnet)
    own = f"ip saddr {sandbox_end} ip daddr {gateway}"
    lines = [
        f"add set {TABLE} {resolved} {{ type ipv4_addr; flags timeout; }}",
        f"add chain {TABLE} {services}",
        f"add rule {TABLE} {services} {own} udp dport 53 accept",
        f"add rule {TABLE} {services} {own} tcp dport {SNI_PROXY_PORT} accept",
        f"add chain {TABLE} {chain}",
        f"add chain {TABLE} {sni}",
    ]
    for cidr, ports in plan.rules:
        network = ipaddress.ip_network(cidr)
        if network.version == 4:
            listed = f"ip daddr {network} tcp dport {{ {_ports(ports)} }}"
            lines.append(f"add rule {TABLE} {chain} {listed} accept")
            lines.append(f"add rule {TABLE} {sni} {listed} return")  # listed ranges are not redirected

    if plan.domains and plan.domain_ports:
        lines.append(
            f"add rule {TABLE} {sni} ip daddr @{resolved} tcp dport {{ {_ports(plan.domain_ports)} }} "
            f"dnat ip to {gateway}:{SNI_PROXY_PORT}"
        )
    lines.append(f'add element {TABLE} sandbox_input {{ "{interface}" : jump {services} }}')
    lines.append(f'add element {TABLE} sandbox_egress {{ "{interface}" : jump {chain} }}')
    lines.append(f'add element {TABLE} sandbox_sni {{ "{interface}" : jump {sni} }}')
    return "\n".join(lines) + "\n"


def sandbox_rules_removal(sandbox_id: str) -> list[str]:
    """Separate scripts, so one that fails (already gone) does not stop the others."""
    interface = host_interface(sandbox_id)
    return [
        f'delete element {TABLE} sandbox_input {{ "{interface}" }}\n',
        f'delete element {TABLE} sandbox_egress {{ "{interface}" }}\n',
        f'delete element {TABLE} sandbox_sni {{ "{interface}" }}\n',
        f"delete chain {TABLE} {nft_object('input', sandbox_id)}\n",
        f"delete chain {TABLE} {nft_object('egress', sandbox_id)}\n",
        f"delete chain {TABLE} {nft_object('sni', sandbox_id)}\n",
        f"delete set {TABLE} {nft_object('resolved', sandbox_id)}\n",
    ]


def resolved_addresses(sandbox_id: str, addresses: Iterable[str], ttl_seconds: int) -> str:
    elements = ", ".join(f"{address} timeout {max(ttl_seconds, 60)}s" for address in addresses)
    return f"add element {TABLE} {nft_object('resolved', sandbox_id)} {{ {elements} }}\n"


def _ports(ports: Iterable[int]) -> str:
    return ", ".join(str(port) for port in sorted(set(ports)))


def egress_interfaces_in(listing: str) -> set[str]:
    """Sandbox ids whose veths have entries in ``nft -j list map ... sandbox_egress`` output."""
    found: set[str] = set()
    for item in json.loads(listing).get("nftables", []):
        for element in item.get("map", {}).get("elem", []):
            key = element[0] if isinstance(element, list) else element
            sandbox_id = sandbox_of_interface(key) if isinstance(key, str) else None
            if sandbox_id is not None:
                found.add(sandbox_id)
    return found


def domain_allowed(name: str, domains: Iterable[str]) -> bool:
    """``name`` (any case, trailing dot or not) is listed, or under a listed ``*.`` domain."""
    name = name.rstrip(".").lower()
    for domain in domains:
        if domain.startswith("*."):
            if name.endswith(domain[1:]):
                return True
        elif name == domain:
            return True
    return False


_NEVER = (
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("169.254.0.0/16"),  # link-local, cloud metadata
    ipaddress.IPv4Network("224.0.0.0/4"),
    ipaddress.IPv4Network("240.0.0.0/4"),
    SANDBOX_NETWORK,
)
_PRIVATE = (
    ipaddress.IPv4Network("10.0.0.0/8"),
    ipaddress.IPv4Network("172.16.0.0/12"),
    ipaddress.IPv4Network("192.168.0.0/16"),
    ipaddress.IPv4Network("100.64.0.0/10"),  # CGNAT
    ipaddress.IPv4Network("192.0.0.0/24"),
    ipaddress.IPv4Network("198.18.0.0/15"),
)


def reachable_answer(address: str, *, private_allowed: bool) -> bool:
    """Whether a listed domain's resolved address may be reached. Loopback, link-local
    (cloud metadata), multicast and sandbox addresses never; private ranges and CGNAT
    only where the policy allows them (an internal mirror, say); IPv4 only."""
    ip = ipaddress.ip_address(address)
    if ip.version != 4 or any(ip in network for network in _NEVER):
        return False
    return private_allowed or not any(ip in network for network in _PRIVATE)


def parse_sni(data: bytes) -> tuple[bool, str | None]:
    """(complete, server name) of a TLS ClientHello at the start of ``data``.

    ``complete`` is False while more bytes are needed; a complete record that is not
    a ClientHello, or has no server name, gives (True, None).
    """
    if len(data) < 5:
        return False, None
    if data[0] != 0x16:  # not a TLS handshake record
        return True, None
    length = int.from_bytes(data[3:5], "big")
    if len(data) < 5 + length:
        return False, None
    hello = data[5 : 5 + length]
    try:
        if hello[0] != 0x01:  # ClientHello
            return True, None
        position = 4 + 2 + 32  # handshake header, version, random
        position += 1 + hello[position]  # session id
        position += 2 + int.from_bytes(hello[position : position + 2], "big")  # cipher suites
        position += 1 + hello[position]  # compression methods
        end = position + 2 + int.from_bytes(hello[position : position + 2], "big")
        position += 2
        while position + 4 <= end:
            kind = int.from_bytes(hello[position : position + 2], "big")
            size = int.from_bytes(hello[position + 2 : position + 4], "big")
            body = hello[position + 4 : position + 4 + size]
            if kind == 0:  # server_name: list length, type 0 (host name), name length, name
                if len(body) >= 5 and body[2] == 0:
                    name_length = int.from_bytes(body[3:5], "big")
                    return True, body[5 : 5 + name_length].decode("ascii").lower()
                return True, None
            position += 4 + size
    except (IndexError, UnicodeDecodeError):
        return True, None
    return True, None


MAX_TLS_RECORD = (1 << 14) + 2048
"""The longest TLS record a peer may send (RFC 8446 5.2: 2^14 + 256 for TLSPlaintext;
TLSCiphertext may be up to 2^14 + 2048 in TLS 1.2)."""
_TLS_CONTENT_TYPES = range(20, 24)  # change_cipher_spec, alert, handshake, application_data
_TLS_HEADER = 5


class NotTls(ValueError):
    """Bytes from a sandbox that are not a well-formed sequence of TLS records."""


@dataclass(frozen=True)
class TlsFraming:
    """Where a stream of TLS records stands between two chunks: the part of a record
    header seen so far, or how much of the current record's body is still to come."""

    header: bytes = b""
    body_left: int = 0


def _check_header(header: bytes) -> None:
    """Each byte of a record header is checked as soon as it arrives."""
    if header[0] not in _TLS_CONTENT_TYPES:
        raise NotTls(f"content type {header[0]} is not a TLS record")
    if len(header) > 1 and header[1] != 0x03:
        raise NotTls(f"legacy version {header[1]:#04x}.. is not TLS")
    if len(header) == _TLS_HEADER and int.from_bytes(header[3:5], "big") > MAX_TLS_RECORD:
        raise NotTls(f"a record of {int.from_bytes(header[3:5], 'big')} bytes is longer than TLS allows")


def frame_tls(state: TlsFraming, data: bytes) -> TlsFraming:
    """Check that ``data``, following ``state``, continues a stream of TLS records.

    Threat: "domain ports carry TLS only" must hold for the whole connection, not just
    its first record: a sandbox that sends a valid ClientHello and then plain text would
    otherwise talk any protocol to a listed domain's address. Every record header must
    name a TLS content type (20-23), legacy version 0x03xx and a length of at most
    ``MAX_TLS_RECORD``; record bodies are opaque (they are encrypted). Raises
    :class:`NotTls` at the first byte that breaks this, so the caller forwards nothing
    of a chunk that does not frame. Returns the state to pass with the next chunk.
    """
    header, body_left = state.header, state.body_left
    position = 0
    while position < len(data):
        if body_left:
            step = min(body_left, len(data) - position)
            body_left -= step
            position += step
            continue
        take = min(_TLS_HEADER - len(header), len(data) - position)
        header += data[position : position + take]
        position += take
        _check_header(header)
        if len(header) == _TLS_HEADER:
            body_left = int.from_bytes(header[3:5], "big")
            header = b""
    return TlsFraming(header, body_left)


_MAX_ANSWERS = 16  # keeps a reply well under 512 bytes, so no truncation and no TCP
_MAX_CNAME_HOPS = 8
_MAX_TTL = 3600


@dataclass(frozen=True)
class DnsQuestion:
    """The one question of a sandbox's DNS query, and what its reply must echo."""

    query_id: int
    asked: dns.name.Name
    """The name as the sandbox wrote it (echoed to the sandbox only, never sent upstream)."""
    rdtype: dns.rdatatype.RdataType
    recursion_desired: bool

    @property
    def name(self) -> str:
        """Lower case, without the trailing dot: all that is ever sent upstream."""
        return self.asked.to_text(omit_final_dot=True).lower()


@dataclass(frozen=True)
class UpstreamReply:
    """What the server takes from an upstream reply: its rcode and the A records (address,
    TTL) of the asked name, following CNAMEs; nothing else of it reaches the sandbox."""

    rcode: int
    addresses: tuple[tuple[str, int], ...]


def read_question(packet: bytes) -> DnsQuestion | None:
    """The question of a standard query with exactly one class IN question, or None
    (the packet is then dropped unanswered)."""
    try:
        query = dns.message.from_wire(packet)
    except (dns.exception.DNSException, ValueError):
        return None
    if query.flags & dns.flags.QR or query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
        return None
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN or not question.name.is_absolute():
        return None
    return DnsQuestion(
        query_id=query.id,
        asked=question.name,
        rdtype=question.rdtype,
        recursion_desired=bool(query.flags & dns.flags.RD),
    )


def dns_action(question: DnsQuestion, domains: Iterable[str]) -> Literal["refuse", "empty", "ask"]:
    """Unlisted names are refused without a query leaving the host; listed names get an
    empty answer for anything but A (egress is IPv4 only); A of a listed name is asked."""
    if not domain_allowed(question.name, domains):
        return "refuse"
    if question.rdtype != dns.rdatatype.A:
        return "empty"
    return "ask"


def upstream_query(name: str, query_id: int) -> bytes:
    """The query the server sends upstream for the A records of listed ``name``.

    Threat: the sandbox's own message (its ID, class, extra records, EDNS options,
    the case of its name) would carry data to the upstream resolver and beyond. This
    one is built from the normalised name alone: the server's ``query_id`` (random,
    chosen by the caller), RD, one question ``name IN A``, no EDNS, nothing else.
    """
    query = dns.message.make_query(name.rstrip(".").lower() + ".", dns.rdatatype.A, use_edns=False)
    query.id = query_id
    return query.to_wire()


def read_upstream_reply(wire: bytes, query_id: int, name: str) -> UpstreamReply | None:
    """The reply to :func:`upstream_query`, or None if ``wire`` is not that reply
    (another ID or question, not a response, not parseable): it is then ignored."""
    try:
        reply = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError):
        return None
    asked = dns.name.from_text(name.rstrip(".").lower() + ".")
    if (
        reply.id != query_id
        or not reply.flags & dns.flags.QR
        or reply.opcode() != dns.opcode.QUERY
        or len(reply.question) != 1
        or reply.question[0].name != asked
        or reply.question[0].rdtype != dns.rdatatype.A
        or reply.question[0].rdclass != dns.rdataclass.IN
    ):
        return None
    rcode = reply.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        return UpstreamReply(dns.rcode.SERVFAIL, ())
    owner = asked
    for _ in range(_MAX_CNAME_HOPS):
        records = _find(reply.answer, owner, dns.rdatatype.A)
        if records is not None:
            addresses = tuple((record.address, min(records.ttl, _MAX_TTL)) for record in records)
            return UpstreamReply(rcode, addresses[:_MAX_ANSWERS])
        alias = _find(reply.answer, owner, dns.rdatatype.CNAME)
        if alias is None:
            break
        owner = next(iter(alias)).target
    return UpstreamReply(rcode, ())


def _find(section: list[dns.rrset.RRset], owner: dns.name.Name, rdtype: int) -> dns.rrset.RRset | None:
    for rrset in section:
        if rrset.name == owner and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
            return rrset
    return None


def sandbox_reply(question: DnsQuestion, rcode: int, addresses: Mapping[str, int]) -> bytes:
    """The answer the sandbox gets, built by the server: its ID and question echoed,
    ``rcode``, and the A records ``addresses`` (address -> TTL), nothing from upstream."""
    reply = dns.message.Message(id=question.query_id)
    reply.flags = dns.flags.QR | dns.flags.RA | (dns.flags.RD if question.recursion_desired else 0)
    reply.set_rcode(dns.rcode.Rcode.make(rcode))
    reply.question = [dns.rrset.RRset(question.asked, dns.rdataclass.IN, question.rdtype)]
    if addresses:
        ttl = min(addresses.values())
        reply.answer = [dns.rrset.from_text_list(question.asked, ttl, "IN", "A", list(addresses))]
    return reply.to_wire()
