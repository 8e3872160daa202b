"""Pure rules for 'egress' sandboxes: addresses, the nftables ruleset, DNS decisions.

Each egress sandbox gets a /30 from ``SANDBOX_NETWORK``: the host end of its veth
(``ve-<id>``, made by nspawn's ``--network-veth``) is the first address and also
where the server's filtering resolver listens; the sandbox is the second.

The host's nftables table ``inet nspawn_mcp`` refuses everything from a sandbox
veth except DNS and the server-name check on the host end (input) and, forwarded,
the sandbox's listed CIDR/port pairs. Connections to the addresses its listed
domains resolved to (a set with timeouts, filled by the resolver) on the domain
ports are redirected to the server, which relays them only if their TLS
ClientHello names a listed domain that resolved to that very address. Other
sandboxes, the host itself, IPv6 and anything unlisted are dropped.

"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable

from ..policy import EgressPlan

__all__ = [
    "SANDBOX_NETWORK",
    "SNI_PROXY_PORT",
    "allocate_subnet",
    "base_ruleset",
    "domain_allowed",
    "egress_interfaces_in",
    "endpoints",
    "host_interface",
    "parse_sni",
    "reachable_answer",
    "resolved_addresses",
    "sandbox_rules",
    "sandbox_rules_removal",
]

SANDBOX_NETWORK = ipaddress.IPv4Network("10.213.0.0/16")
TABLE = "inet nspawn_mcp"
SNI_PROXY_PORT = 3129
"""Where an egress sandbox's connections to its listed domains are redirected, on its gateway."""
_INTERFACES = "ve-sbx-*"


def host_interface(sandbox_id: str) -> str:
    """nspawn names the host end of the veth ``ve-<machine>`` (15 characters at most)."""
    return f"ve-{sandbox_id}"[:15]


def allocate_subnet(used: Iterable[str]) -> str:
    """The first free /30 of ``SANDBOX_NETWORK``."""
    taken = set(used)
    for subnet in SANDBOX_NETWORK.subnets(new_prefix=30):
        if str(subnet) not in taken:
            return str(subnet)
    raise RuntimeError("no free sandbox subnet")


def endpoints(subnet: str) -> tuple[str, str]:
    """(host end, sandbox end) of a sandbox's /30."""
    hosts = list(ipaddress.IPv4Network(subnet).hosts())
    return str(hosts[0]), str(hosts[1])


def _chain(sandbox_id: str) -> str:
    return "egress_" + sandbox_id.removeprefix("sbx-")


def _sni_chain(sandbox_id: str) -> str:
    return "sni_" + sandbox_id.removeprefix("sbx-")


def _set(sandbox_id: str) -> str:
    return "resolved_" + sandbox_id.removeprefix("sbx-")


def base_ruleset() -> str:
    """The table every egress sandbox hangs off; created once, kept while sandboxes live."""
    return f"""\
add table {TABLE}
add map {TABLE} sandbox_egress {{ type ifname : verdict; }}
add map {TABLE} sandbox_sni {{ type ifname : verdict; }}
add chain {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain {TABLE} input {{ type filter hook input priority filter; policy accept; }}
add chain {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}
add chain {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}
add rule {TABLE} input iifname "{_INTERFACES}" ip daddr {SANDBOX_NETWORK} udp dport 53 accept
add rule {TABLE} input iifname "{_INTERFACES}" ip daddr {SANDBOX_NETWORK} tcp dport 53 accept

add rule {TABLE} input iifname "{_INTERFACES}" ip daddr {SANDBOX_NETWORK} tcp dport {SNI_PROXY_PORT} accept
add rule {TABLE} input iifname "{_INTERFACES}" ct state established,related accept
add rule {TABLE} input iifname "{_INTERFACES}" drop
add rule {TABLE} forward oifname "{_INTERFACES}" ct state established,related accept
add rule {TABLE} forward oifname "{_INTERFACES}" drop
add rule {TABLE} forward iifname "{_INTERFACES}" ip daddr {SANDBOX_NETWORK} drop
add rule {TABLE} forward iifname "{_INTERFACES}" meta nfproto ipv4 iifname vmap @sandbox_egress
add rule {TABLE} forward iifname "{_INTERFACES}" drop
add rule {TABLE} prerouting iifname "{_INTERFACES}" meta nfproto ipv4 iifname vmap @sandbox_sni
add rule {TABLE} postrouting ip saddr {SANDBOX_NETWORK} oifname != "{_INTERFACES}" masquerade
"""


def sandbox_rules(sandbox_id: str, plan: EgressPlan) -> str:
    """Listed ranges are forwarded as they are; connections to addresses that listed
    domains resolved to go to the TLS server-name check on the sandbox's gateway."""
    assert plan.subnet is not None
    chain, resolved, sni = _chain(sandbox_id), _set(sandbox_id), _sni_chain(sandbox_id)
    interface = host_interface(sandbox_id)
    gateway, _ = endpoints(plan.subnet)
    lines = [
        f"add set {TABLE} {resolved} {{ type ipv4_addr; flags timeout; }}",
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
    lines.append(f'add element {TABLE} sandbox_egress {{ "{interface}" : jump {chain} }}')
    lines.append(f'add element {TABLE} sandbox_sni {{ "{interface}" : jump {sni} }}')
    return "\n".join(lines) + "\n"


def sandbox_rules_removal(sandbox_id: str) -> list[str]:
    """Separate scripts, so one that fails (already gone) does not stop the others."""
    interface = host_interface(sandbox_id)
    return [
        f'delete element {TABLE} sandbox_egress {{ "{interface}" }}\n',
        f'delete element {TABLE} sandbox_sni {{ "{interface}" }}\n',
        f"delete chain {TABLE} {_chain(sandbox_id)}\n",
        f"delete chain {TABLE} {_sni_chain(sandbox_id)}\n",
        f"delete set {TABLE} {_set(sandbox_id)}\n",
    ]


def resolved_addresses(sandbox_id: str, addresses: Iterable[str], ttl_seconds: int) -> str:
    elements = ", ".join(f"{address} timeout {max(ttl_seconds, 60)}s" for address in addresses)
    return f"add element {TABLE} {_set(sandbox_id)} {{ {elements} }}\n"


def _ports(ports: Iterable[int]) -> str:
    return ", ".join(str(port) for port in sorted(set(ports)))


def egress_interfaces_in(listing: str) -> set[str]:
    """Sandbox ids whose veths have entries in ``nft -j list map ... sandbox_egress`` output."""
    found: set[str] = set()
    for item in json.loads(listing).get("nftables", []):
        for element in item.get("map", {}).get("elem", []):
            key = element[0] if isinstance(element, list) else element
            if isinstance(key, str) and key.startswith("ve-sbx-"):
                found.add(key.removeprefix("ve-"))
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
