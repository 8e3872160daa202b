"""The Host and Origin headers the HTTP transport answers: DNS-rebinding protection for every bind.

Threat: a web page opened in a browser on the host (or on the network) makes the
browser resolve the page's own name (``evil.example``) to our address and send
requests to our port; the browser then sends ``Host: evil.example:PORT``. Refusing
every Host header that is not one of our own names defeats it.

The SDK turns the check on by itself only for a loopback bind and only when given no
settings; these settings turn it on for every bind. Allowed are the bind address
with its port, the loopback names for a loopback bind, and the host names the
operator lists. A bind to every address (``0.0.0.0``, ``::``) has no name of its
own, so it requires that list (loopback names are allowed there too, since loopback
is among every address).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from mcp.server.transport_security import TransportSecuritySettings

__all__ = ["transport_security"]

_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_PORT = re.compile(r"^[0-9]{1,5}$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(text: str) -> Address | None:
    try:
        return ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        return None


def _authority(address: Address) -> str:
    """An address as the Host header spells it (IPv6 in brackets)."""
    return f"[{address.compressed}]" if address.version == 6 else address.compressed


def _check_port(port: int, what: str) -> int:
    if not 0 < port < 65536:
        raise ValueError(f"{what}: port {port} is not in 1..65535")
    return port


def _split(entry: str) -> tuple[str, int | None]:
    """``name``, ``name:port``, ``1.2.3.4[:port]`` or ``[v6][:port]`` into host and port."""
    if entry.startswith("["):
        inside, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"allowed host {entry!r}: write an IPv6 address as [address] or [address]:port")
        host, port_text = f"[{inside}]", (rest[1:] if rest else None)
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host, port_text = entry, None
    if port_text is None:
        return host, None
    if not _PORT.match(port_text):
        raise ValueError(f"allowed host {entry!r}: the port must be a number")
    return host, _check_port(int(port_text), f"allowed host {entry!r}")


def _allowed(entry: str, port: int) -> list[str]:
    """An operator's host name: exactly as given if it names a port, else at ``port`` and without one
    (a reverse proxy in front forwards the public name, on its default port)."""
    host, named_port = _split(entry.strip().lower())
    address = _address(host)
    if address is not None:
        if address.is_unspecified:
            raise ValueError(f"allowed host {entry!r}: clients never name the unspecified address")
        host = _authority(address)
    elif not _HOST_NAME.match(host):
        raise ValueError(f"allowed host {entry!r} is not a host name or an IP address")
    if named_port is not None:
        return [f"{host}:{named_port}"]
    return [f"{host}:{port}", host]


def transport_security(host: str, port: int, allowed_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """The DNS-rebinding settings for serving on ``host``:``port``; ``allowed_hosts`` are the names
    clients use for this host (required for ``0.0.0.0`` and ``::``). Raises ValueError for a bad
    name or port, or an unspecified bind without names."""
    _check_port(port, f"bind {host!r}")
    address = _address(host)
    hosts: list[str] = []
    if address is None:
        name = host.lower()
        if not _HOST_NAME.match(name):
            raise ValueError(f"bind {host!r} is not a host name or an IP address")
        if name == "localhost":
            hosts += [f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"]
        else:
            hosts.append(f"{name}:{port}")
    elif address.is_unspecified:
        if not allowed_hosts:
            raise ValueError(
                f"binding {_authority(address)} answers on every address, so there is no name to check "
                "the Host header against: name the host names clients use (allowed hosts)"
            )
        hosts += [f"localhost:{port}", f"127.0.0.1:{port}"]
        if address.version == 6:
            hosts.append(f"[::1]:{port}")
    else:
        hosts.append(f"{_authority(address)}:{port}")
        if address.is_loopback:
            hosts.append(f"localhost:{port}")
    for entry in allowed_hosts:
        hosts += _allowed(entry, port)
    unique = list(dict.fromkeys(hosts))
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=unique,
        allowed_origins=[f"{scheme}://{name}" for name in unique for scheme in ("http", "https")],
    )
