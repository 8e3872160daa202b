"""Run inside a sandbox: try each target given as JSON on stdin; print what happened, as JSON.

A target is {"host": name or address, "port": n} (TCP) or {"resolve": name}.
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


def udp_send(host: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.sendto(b"\xc0quic-initial", (host, port))
        except OSError as exc:
            return f"error: {type(exc).__name__}"
    return "sent"


def tls(host: str, port: int, server_name: str) -> str:
    """Open a TLS connection as far as the ClientHello naming ``server_name``; return what comes back."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    outgoing = ssl.MemoryBIO()
    client = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    try:
        with socket.create_connection((host, port), timeout=2) as connection:
            connection.settimeout(2)
            connection.sendall(outgoing.read())
            return connection.recv(100).decode(errors="replace").strip() or "closed"
    except OSError as exc:
        return f"error: {type(exc).__name__}"


results: list[object] = []
for target in json.load(sys.stdin):
    if "tls" in target:
        results.append(tls(target["tls"], target["port"], target["sni"]))
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
