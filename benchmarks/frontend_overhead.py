"""What the stdio front end adds per call: the same calls through `serve` and straight to the daemon.

Raw JSON-RPC lines on both paths (no client library in the measurement), after the same
initialize; prints p50/p95 of a `list_sandboxes` round trip on each and the difference.
Run as root with the daemon's set-up done (`make setup`): ``python benchmarks/frontend_overhead.py``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nspawn_mcp.daemon.handshake import Hello, decode_welcome, encode
from nspawn_mcp.layout import Layout

CALLS = 2000
SERVER = Path(sys.executable).parent / "nspawn-mcp"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "bench", "version": "0"},
    },
}


def _line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def _measure(send: Callable[[bytes], object], receive: Callable[[], bytes]) -> list[float]:
    send(_line(INITIALIZE))
    receive()
    send(_line({"jsonrpc": "2.0", "method": "notifications/initialized"}))
    times = []
    for number in range(1, CALLS + 1):
        call = {"jsonrpc": "2.0", "id": number, "method": "tools/call", "params": {"name": "list_sandboxes"}}
        started = time.perf_counter()
        send(_line(call))
        reply = receive()
        times.append((time.perf_counter() - started) * 1000)
        assert b'"id":' + str(number).encode() in reply, reply[:200]
    return times


def through_front_end() -> list[float]:
    process = subprocess.Popen(
        [str(SERVER), "serve", "--max-calls-per-second", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    stdin, stdout = process.stdin, process.stdout

    def send(data: bytes) -> None:
        stdin.write(data)
        stdin.flush()

    try:
        return _measure(send, stdout.readline)
    finally:
        stdin.close()
        process.wait(timeout=30)


def straight_to_the_daemon() -> list[float]:
    connection = socket.socket(socket.AF_UNIX)
    connection.connect(str(Layout.from_env().daemon_socket))
    reader = connection.makefile("rb")
    options = ("--max-calls-per-second", "0")
    connection.sendall(encode(Hello(session=os.urandom(16).hex(), options=options)))
    decode_welcome(reader.readline())
    try:
        return _measure(connection.sendall, reader.readline)
    finally:
        connection.close()


def _summary(name: str, times: list[float]) -> tuple[float, float]:
    quantiles = statistics.quantiles(times, n=100)
    print(f"{name:<24} p50 {quantiles[49]:.3f} ms  p95 {quantiles[94]:.3f} ms  (n={len(times)})")
    return quantiles[49], quantiles[94]


def main() -> None:
    subprocess.run([str(SERVER), "daemon", "stop"], check=True, capture_output=True)
    relayed = _summary("through `serve`", through_front_end()[100:])  # also starts the daemon
    direct = _summary("straight to the socket", straight_to_the_daemon()[100:])
    print(
        f"the front end adds {relayed[0] - direct[0]:.3f} ms at p50, {relayed[1] - direct[1]:.3f} ms at p95"
    )
    subprocess.run([str(SERVER), "daemon", "stop"], check=True, capture_output=True)


if __name__ == "__main__":
    main()
