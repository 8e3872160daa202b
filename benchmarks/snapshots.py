"""Snapshot and fork latency through a real MCP client, on the real daemons.

``bench_snapshots(client)`` is called by ``benchmarks/bench.py`` (``make bench``) with a client
talking to ``nspawn-mcp serve`` over stdio; run this file (as root, under the test lock) to
measure it alone. A sandbox writes 300 MB first, so that a fork copies a filesystem with
something in it (copy-on-write: the size should not matter). Targets (DESIGN.md, issue #12):
fork p50 <= 50 ms, 10 forks at once <= 300 ms. Indicative only: the machine has 2 shared cores.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

__all__ = ["bench_snapshots"]

SERVER = Path(sys.executable).parent / "nspawn-mcp"


async def _call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return dict(result.structured_content)


async def _timed(client: Client, tool: str, **arguments: Any) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    result = await _call(client, tool, **arguments)
    return (time.perf_counter() - started) * 1000, result


async def bench_snapshots(
    client: Client,
    *,
    rounds: int = 10,
    fork10_rounds: int = 3,
    written_mb: int = 300,
    policy: str = "default",
) -> dict[str, list[float]]:
    """Milliseconds per snapshot_sandbox, per fork_sandbox (one fork of a sandbox that wrote
    ``written_mb``), and per fork_sandbox(count=10); every sandbox it makes is destroyed."""
    parent = (await _call(client, "create_sandbox", policy=policy, disk_mb=written_mb + 512))["sandbox_id"]
    snapshot_ms: list[float] = []
    fork_ms: list[float] = []
    fork10_ms: list[float] = []
    try:
        await _call(
            client,
            "exec_in_sandbox",
            sandbox_id=parent,
            command=f"head -c {written_mb}M /dev/urandom > /root/written && sync",
            timeout_seconds=120,
        )
        for index in range(rounds):
            ms, taken = await _timed(client, "snapshot_sandbox", sandbox_id=parent, name=f"b{index}")
            snapshot_ms.append(ms)
            await _call(client, "delete_snapshot", sandbox_id=parent, name=taken["name"])
        for _ in range(rounds):
            ms, forked = await _timed(client, "fork_sandbox", sandbox_id=parent)
            fork_ms.append(ms)
            for fork in forked["sandboxes"]:
                await _call(client, "destroy_sandbox", sandbox_id=fork["sandbox_id"])
        for _ in range(fork10_rounds):
            ms, forked = await _timed(client, "fork_sandbox", sandbox_id=parent, count=10)
            fork10_ms.append(ms)
            for fork in forked["sandboxes"]:
                await _call(client, "destroy_sandbox", sandbox_id=fork["sandbox_id"])
    finally:
        with anyio.CancelScope(shield=True):
            await _call(client, "destroy_sandbox", sandbox_id=parent)
    return {
        "snapshot_ms": [round(ms, 1) for ms in snapshot_ms],
        "fork_ms": [round(ms, 1) for ms in fork_ms],
        "fork10_wall_ms": [round(ms, 1) for ms in fork10_ms],
    }


async def _main() -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        params = StdioServerParameters(
            command=str(SERVER),
            args=["serve", "--max-sandboxes", "100", "--max-calls-per-second", "0"],
            cwd=workdir,
        )
        async with Client(params) as client:
            results = await bench_snapshots(client)
    medians = {name: round(statistics.median(samples), 1) for name, samples in results.items()}
    print(json.dumps({"samples": results, "p50": medians}, indent=2))


if __name__ == "__main__":
    anyio.run(_main)
