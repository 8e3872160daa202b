"""Run inside a sandbox: open N idle TCP connections to HOST:PORT (argv) and hold them.

Prints "opened N" once they are all open, then waits for stdin to close, then prints how
many of them the far end had closed meanwhile, and closes the rest.
"""

from __future__ import annotations

import resource
import socket
import sys

host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
held = []
for _ in range(count):
    connection = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    connection.settimeout(5)
    connection.connect(address)  # completes in the kernel's backlog, accepted or not
    held.append(connection)
print(f"opened {len(held)}", flush=True)
sys.stdin.read()
closed = 0
for connection in held:
    connection.setblocking(False)  # with a timeout set, recv would first wait for data
    try:
        closed += connection.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        pass  # open, and quiet
    except OSError:
        closed += 1  # reset
    connection.close()
print(f"closed by the server {closed}", flush=True)
