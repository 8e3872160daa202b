"""Benchmarks through a real MCP client over stdio, on the real daemons.

Run with ``make bench`` (as root). Prints p50/p95 next to the targets from
DESIGN.md; never fails on speed (targets are checked by reading, not by tests).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

SERVER = Path(sys.executable).parent / "nspawn-mcp"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = await action()
    return (time.perf_counter() - started) * 1000, result


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        raise RuntimeError(f"{tool} failed: {result.content}")
    return dict(result.structured_content)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


async def bench(creates: int, execs: int, idle: int, copy_mb: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as workdir:
        policy_dir = Path(workdir) / "policies"
        policy_dir.mkdir()
        (policy_dir / "bench.toml").write_text("[sandboxes]\nmax_live = 1000\n")
        params = StdioServerParameters(
            command=str(SERVER),
            args=[
                "serve",
                "--max-sandboxes",
                "1000",
                "--max-calls-per-second",
                "0",
                "--policy-dir",
                str(policy_dir),
            ],
            cwd=workdir,
        )
        async with Client(params) as client:
            await call(client, "list_sandboxes")
            create_ms, destroy_ms, ids = [], [], []
            for _ in range(creates):
                ms, info = await timed(lambda: call(client, "create_sandbox"))
                create_ms.append(ms)
                ids.append(info["sandbox_id"])
            exec_ms = []
            for _ in range(execs):
                ms, _ = await timed(
                    lambda: call(client, "exec_in_sandbox", sandbox_id=ids[0], command=["true"])
                )
                exec_ms.append(ms)
            payload = Path(workdir) / "payload.bin"
            payload.write_bytes(os.urandom(copy_mb << 20))
            copy_in_ms, _ = await timed(
                lambda: call(
                    client,
                    "copy_file",
                    sandbox_id=ids[0],
                    source=str(payload),
                    destination="/root/p",
                    direction="to_sandbox",
                )
            )
            copy_out_ms, _ = await timed(
                lambda: call(
                    client,
                    "copy_file",
                    sandbox_id=ids[0],
                    source="/root/p",
                    destination=str(payload) + ".out",
                    direction="from_sandbox",
                )
            )
            for sandbox in ids:
                ms, _ = await timed(lambda: call(client, "destroy_sandbox", sandbox_id=sandbox))  # noqa: B023
                destroy_ms.append(ms)

            before = available_memory()
            idle_ids: list[str] = []
            try:
                for _ in range(idle):
                    idle_ids.append((await call(client, "create_sandbox", policy="bench"))["sandbox_id"])
                await anyio.sleep(2)
                per_sandbox = (before - available_memory()) / idle
            finally:
                for sandbox in idle_ids:
                    await call(client, "destroy_sandbox", sandbox_id=sandbox)

    def summary(samples: list[float]) -> dict[str, float]:
        return {"p50_ms": round(statistics.median(samples), 1), "p95_ms": round(percentile(samples, 0.95), 1)}

    results["create_sandbox"] = summary(create_ms) | {"n": creates, "target": "p50<=80 p95<=150"}
    results["exec_true"] = summary(exec_ms) | {"n": execs, "target": "p50<=10 p95<=25"}
    results["destroy_sandbox"] = summary(destroy_ms) | {"n": creates, "target": "<=40"}
    results["copy_to_sandbox_MBps"] = round(copy_mb / (copy_in_ms / 1000), 1)
    results["copy_from_sandbox_MBps"] = round(copy_mb / (copy_out_ms / 1000), 1)
    results["copy_target"] = ">=200 MB/s for 100 MB"
    results["idle_memory_per_sandbox_MB"] = round(per_sandbox / (1 << 20), 2)
    results["idle_sandboxes"] = idle
    results["idle_target"] = "200 idle with <=8 MB each"
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=30)
    parser.add_argument("--execs", type=int, default=200)
    parser.add_argument("--idle", type=int, default=50)
    parser.add_argument("--copy-mb", type=int, default=100)
    args = parser.parse_args()
    results = anyio.run(bench, args.creates, args.execs, args.idle, args.copy_mb)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
