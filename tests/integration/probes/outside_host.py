"""A test host, run inside a network namespace the tests make: TCP echo-ish servers and a DNS server.

Every TCP connection and every DNS question is logged (one line each) to the file
given as the first argument, so tests can check what reached the outside.
"""

from __future__ import annotations

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
        name = query.question[0].name.to_text()
        log(f"dns {name}")
        reply = dns.message.make_response(query)
        if name in NAMES:
            reply.answer.append(dns.rrset.from_text(name, 30, "IN", "A", NAMES[name]))
        else:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(reply.to_wire(), self.client_address)


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
    TCP(("198.18.0.3", 8443), Hello),
    TCP(("198.18.0.4", 8443), Hello),
    socketserver.ThreadingUDPServer(("198.18.0.2", 53), Dns),
    socketserver.ThreadingUDPServer(("198.18.0.2", 8443), Datagram),  # where QUIC would go
]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
log("ready")
threading.Event().wait()
