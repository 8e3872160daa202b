"""Run inside a sandbox, in the background: a TCP server on its loopback for the port-forward tests.

``serve.py bytes PORT SIZE``: each connection gets SIZE zero bytes, then the server closes it.
``serve.py hello PORT``: each connection gets b"x", then the server closes it.
"""

from __future__ import annotations

import socket
import sys
import threading

mode, port = sys.argv[1], int(sys.argv[2])
size = int(sys.argv[3]) if len(sys.argv) > 3 else 0
block = b"\0" * (1 << 20)


def serve(connection: socket.socket) -> None:
    with connection:
        if mode == "bytes":
            left = size
            while left > 0:
                count = min(left, len(block))
                connection.sendall(block[:count])
                left -= count
        else:
            connection.sendall(b"x")


server = socket.create_server(("127.0.0.1", port))
while True:
    accepted, _ = server.accept()
    threading.Thread(target=serve, args=(accepted,), daemon=True).start()
