"""Run inside a sandbox: try each target given as JSON on stdin; print what happened, as JSON.

A target is {"host": name or address, "port": n} (TCP) or {"resolve": name}, or one of the
other kinds below (TLS hellos, crafted DNS queries, bursts of them). "resolver" as a DNS
server means the sandbox's own, from its resolv.conf.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys


def dns_direct(server: str, name: str) -> str:
    """A DNS question straight to ``server``, past the sandbox's resolver."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    packet = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + question + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        try:
            udp.sendto(packet, (server, 53))
            udp.recv(512)
        except OSError as exc:
            return f"error: {type(exc).__name__}"
    return "answered"


def resolver() -> str:
    """The sandbox's own resolver, as its resolv.conf names it."""
    with open("/etc/resolv.conf") as conf:
        return next(line.split()[1] for line in conf if line.startswith("nameserver"))


def crafted_query(name: str, query_id: int) -> bytes:
    """A query that carries data beyond its name: its ID, an EDNS option, an extra record."""
    question = b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    header = query_id.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x02"
    option = (65001).to_bytes(2, "big") + (11).to_bytes(2, "big") + b"exfiltrated"
    opt = b"\0" + b"\x00\x29" + b"\x10\x00" + b"\x00\x00\x00\x00" + len(option).to_bytes(2, "big") + option
    txt = b"\x04data\x00" + b"\x00\x10\x00\x01" + b"\x00\x00\x01\x2c" + b"\x00\x07\x06secret"
    return header + question + b"\x00\x01\x00\x01" + txt + opt


def dns_query(server: str, name: str, query_id: int) -> str:
    """Send ``crafted_query``; describe the reply's header (ID, rcode, record counts)."""
    server = resolver() if server == "resolver" else server
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(2)
        try:
            udp.sendto(crafted_query(name, query_id), (server, 53))
            reply = udp.recv(4096)
        except OSError as exc:
            return f"error: {type(exc).__name__}"
    counts = [int.from_bytes(reply[i : i + 2], "big") for i in range(4, 12, 2)]
    return f"id={int.from_bytes(reply[:2], 'big')} rcode={reply[3] & 15} an={counts[1]} ar={counts[3]}"


def dns_burst(server: str, name: str, count: int) -> str:
    """``count`` queries sent at once, each from its own socket; how many were answered."""
    server = resolver() if server == "resolver" else server
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    answered = 0
    try:
        for number, udp in enumerate(sockets):
            udp.sendto(crafted_query(name, number), (server, 53))
        for udp in sockets:
            udp.settimeout(3)
            with contextlib.suppress(OSError):
                if udp.recv(4096):
                    answered += 1
    finally:
        for udp in sockets:
            udp.close()
    return f"answered {answered} of {count}"


def tls_then(host: str, port: int, server_name: str, then: bytes, together: bool) -> str:
    """A ClientHello naming ``server_name``, then ``then``: in the same write (``together``),
    or once the far end's "ready" shows the relay is through. Returns what comes back."""
    hello = client_hello(server_name)
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            connection.settimeout(2)
            if together:
                connection.sendall(hello + then)
            else:
                connection.sendall(hello)
                if connection.recv(6) != b"ready\n":
                    return "no ready"
                connection.sendall(then)
            connection.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := connection.recv(100):
                reply += chunk
            return reply.decode(errors="replace").strip() or "closed"
    except OSError as exc:
        return f"error: {type(exc).__name__}"


def udp_send(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.sendto(b"\xc0quic-initial", (host, port))
        except OSError as exc:
            return f"error: {type(exc).__name__}"
    return "sent"


def client_hello(server_name: str) -> bytes:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def tls(host: str, port: int, server_name: str) -> str:
    """Open a TLS connection as far as the ClientHello naming ``server_name``; return what comes back."""
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            connection.settimeout(2)
            connection.sendall(client_hello(server_name))
            return connection.recv(100).decode(errors="replace").strip() or "closed"
    except OSError as exc:
        return f"error: {type(exc).__name__}"


results: list[object] = []
for target in json.load(sys.stdin):
    if "tls" in target:
        results.append(tls(target["tls"], target["port"], target["sni"]))
        continue
    if "tls_then" in target:
        then = bytes.fromhex(target["then_hex"])
        results.append(
            tls_then(target["tls_then"], target["port"], target["sni"], then, target.get("together", False))
        )
        continue
    if "dns_query" in target:
        results.append(dns_query(target["dns_query"], target["name"], target["id"]))
        continue
    if "dns_burst" in target:
        results.append(dns_burst(target["dns_burst"], target["name"], target["count"]))
        continue
    if "udp" in target:
        results.append(udp_send(target["udp"], target["port"]))
        continue

    if "dns_direct" in target:
        results.append(dns_direct(target["dns_direct"], target["name"]))
        continue

    if "resolve" in target:
        try:
            results.append(
                sorted({info[4][0] for info in socket.getaddrinfo(target["resolve"], 80, socket.AF_INET)})
            )
        except OSError as exc:
            results.append(f"error: {type(exc).__name__}")
        continue
    try:
        with socket.create_connection((target["host"], target["port"]), timeout=2) as connection:
            connection.settimeout(2)
            results.append(connection.recv(100).decode().strip())
    except OSError as exc:
        results.append(f"error: {type(exc).__name__}")
print(json.dumps(results))
