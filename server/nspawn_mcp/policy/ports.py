"""Which host address an exposed port may listen on, and how many a sandbox may have: pure."""

from __future__ import annotations

import ipaddress

from ..errors import InvalidRequest, PolicyRefused
from .models import Policy

__all__ = ["resolve_expose"]


def resolve_expose(
    policy_name: str, policy: Policy, sandbox_port: int, host_address: str | None, exposed: int
) -> str:
    """The host address to listen on for ``sandbox_port``, given ``exposed`` ports already exposed.

    Refuses a port outside 1-65535, an address that is not an IP address, one the
    policy does not list (naming the ones it does), and the exposure beyond the cap.
    """
    if not 1 <= sandbox_port <= 65535:
        raise InvalidRequest(f"sandbox_port {sandbox_port} is not a TCP port (1-65535)")
    rules = policy.ports
    if rules.max_exposed == 0:
        raise PolicyRefused(f"policy {policy_name!r} allows no exposed ports", rule="ports.max_exposed")
    if exposed >= rules.max_exposed:
        raise PolicyRefused(
            f"this sandbox already exposes {exposed} ports, the most policy {policy_name!r} allows; "
            "unexpose_port one first",
            rule="ports.max_exposed",
        )
    allowed = [str(address) for address in rules.addresses]
    if host_address is None:
        return allowed[0]
    try:
        address = str(ipaddress.ip_address(host_address))
    except ValueError:
        raise InvalidRequest(
            f"host_address {host_address[:64]!r} is not an IP address; allowed: {', '.join(allowed)}"
        ) from None
    if address not in allowed:
        raise PolicyRefused(
            f"host address {address} is not allowed for exposed ports; allowed: {', '.join(allowed)}",
            rule="ports.addresses",
        )
    return address
