"""Run inside a sandbox: try a TCP connection to each {"host", "port"} given as JSON on stdin;
print, as JSON, "connected" or the error each attempt met."""

from __future__ import annotations

import json
import socket
import sys

results = []
for target in json.load(sys.stdin):
    try:
        with socket.create_connection((target["host"], target["port"]), timeout=2):
            results.append("connected")
    except OSError as exc:
        results.append(f"error: {type(exc).__name__}")
print(json.dumps(results))
