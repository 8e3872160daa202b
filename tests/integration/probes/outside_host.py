"""A test host, run inside a network namespace the tests make: TCP echo-ish servers and a DNS server.

Every TCP connection and every DNS question is logged to the file given as the first
argument (for DNS also the query's ID, class, EDNS and extra records; for the recorder
on port 8444 every byte received), so tests can check what reached the outside.
"""

from __future__ import annotations

import contextlib
import socketserver
import sys
import threading

import dns.message
import dns.rcode
import dns.rrset

LOG = open(sys.argv[1], "a", buffering=1)  # noqa: SIM115 - lives as long as the process
NAMES = {
    "allowed.test.": "198.18.0.2",
    "also.test.": "198.18.0.3",
    "rebind.test.": "169.254.169.254",
}
LOCK = threading.Lock()


def log(line: str) -> None:
    with LOCK:
        LOG.write(line + "\n")


class Hello(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        host, port = self.request.getsockname()
        log(f"tcp {host}:{port}")
        self.request.sendall(f"hello from {host}:{port}\n".encode())


class Dns(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text()
        log(f"dns {name}")
        log(
            f"dns-query {name} id={query.id} class={question.rdclass.name} type={question.rdtype.name} "
            f"edns={query.edns} additional={len(query.additional)} size={len(data)}"
        )
        reply = dns.message.make_response(query)
        if name in NAMES:
            reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", NAMES[name]))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(reply.to_wire(), self.client_address)


class Recorder(socketserver.BaseRequestHandler):
    """Says "ready" (so a client knows its relay is through), then logs, in hex, every byte
    that arrives until the client closes, and says how many."""

    def handle(self) -> None:
        host, port = self.request.getsockname()
        log(f"tcp {host}:{port}")
        self.request.settimeout(10)
        received = b""
        try:
            self.request.sendall(b"ready\n")
            while chunk := self.request.recv(65536):
                received += chunk
        except OSError:
            pass
        log(f"recorded {host}:{port} {received.hex()}")
        with contextlib.suppress(OSError):
            self.request.sendall(f"got {len(received)}\n".encode())


class Datagram(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        _, sock = self.request
        host, port = sock.getsockname()
        log(f"udp {host}:{port}")


class TCP(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


servers: list[socketserver.BaseServer] = [
    TCP(("198.18.0.2", 8443), Hello),
    TCP(("198.18.0.2", 8080), Hello),
    TCP(("198.18.0.2", 8444), Recorder),
    TCP(("198.18.0.3", 8443), Hello),
    TCP(("198.18.0.4", 8443), Hello),
    socketserver.ThreadingUDPServer(("198.18.0.2", 53), Dns),
    socketserver.ThreadingUDPServer(("198.18.0.2", 8443), Datagram),  # where QUIC would go
]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
log("ready")
threading.Event().wait()
