"""The bench's own policy directory, the daemon that serves it, and MCP clients over stdio.

Every client is ``nspawn-mcp serve --policy-dir DIR`` driven by ``mcp.client.Client``, as an
agent's would be. The daemon is one per host and runs with the options of the front end that
started it, so the bench stops any running daemon first and stops its own at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from nspawn_mcp.policy.loader import PolicyError, load_policy_file

__all__ = [
    "BURST_POOLED",
    "COLD",
    "POOLED",
    "Bench",
    "BenchError",
    "call",
    "pooled_ready",
    "prepare",
    "prepare_bursts",
    "stop_daemon",
    "timed",
]

SERVER = Path(sys.executable).parent / "nspawn-mcp"
POLICIES = Path(__file__).parent / "policies"
COLD = "bench"
POOLED = "bench-pool"
BURST_POOLED = "bench-burst"
MAX_SANDBOXES = 1200
T = TypeVar("T")


class BenchError(RuntimeError):
    """A tool call the bench needed failed."""


@dataclass(frozen=True)
class Bench:
    workdir: Path
    """The clients' working directory (copy_file's host side), with the policy directory in it."""
    pool_policy: str | None
    """The pooled series' policy, if the server's policy loader accepts ``[pool]``."""
    pool_refusal: str

    @property
    def policy_dir(self) -> Path:
        return self.workdir / "policies"

    def parameters(self) -> StdioServerParameters:
        return StdioServerParameters(
            command=str(SERVER),
            args=[
                "serve",
                "--max-sandboxes",
                str(MAX_SANDBOXES),
                "--max-calls-per-second",
                "0",
                "--policy-dir",
                str(self.policy_dir),
            ],
            cwd=str(self.workdir),
        )

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Client]:
        """One stdio session; its sandboxes are destroyed when it ends (``on_disconnect``)."""
        async with Client(self.parameters(), read_timeout_seconds=600) as client:
            yield client


def prepare(workdir: Path) -> Bench:
    """Copy the bench policies into ``workdir``; the pooled one only if this server accepts it."""
    policy_dir = workdir / "policies"
    policy_dir.mkdir()
    shutil.copy(POLICIES / f"{COLD}.toml", policy_dir)
    pooled = POLICIES / f"{POOLED}.toml"
    try:
        load_policy_file(pooled)
    except PolicyError as exc:
        reason = "; ".join(
            line.strip() for line in str(exc).replace(str(pooled), f"{POOLED}.toml").splitlines()
        )
        return Bench(workdir, None, f"pool not available: {reason}")
    shutil.copy(pooled, policy_dir)
    return Bench(workdir, POOLED, "")


def prepare_bursts(workdir: Path) -> Bench | None:
    """A second policy directory in ``workdir`` for the pooled bursts: a pool as large as a burst
    (a daemon of its own, so its pool does not weigh on the other measurements); None without pools."""
    policy_dir = workdir / "policies"
    policy_dir.mkdir(parents=True)
    pooled = POLICIES / f"{BURST_POOLED}.toml"
    try:
        load_policy_file(pooled)
    except PolicyError:
        return None
    shutil.copy(pooled, policy_dir)
    return Bench(workdir, BURST_POOLED, "")


async def pooled_ready(policy: str, size: int, timeout: float = 120) -> None:
    """Wait until the daemon's warm pool holds ``size`` sandboxes of ``policy`` (the operator's view)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = await anyio.run_process([str(SERVER), "list", "--json"], check=False)
        rows = json.loads(listing.stdout) if listing.returncode == 0 else []
        if sum(1 for row in rows if row.get("pooled") and row["policy"] == policy) >= size:
            await anyio.sleep(1)  # the pool starts one at a time: the last one counted is ready by now
            return
        await anyio.sleep(0.5)
    raise BenchError(f"the warm pool of {policy} did not reach {size} in {timeout:g} s")


def stop_daemon() -> None:
    subprocess.run([str(SERVER), "daemon", "stop"], check=True, capture_output=True)


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    if result.is_error or result.structured_content is None:
        text = " ".join(getattr(c, "text", "") for c in result.content)
        raise BenchError(f"{tool} failed: {text}")
    return dict(result.structured_content)


async def timed(action: Callable[[], Awaitable[T]]) -> tuple[float, T]:
    """``action``'s result and how long it took, in ms."""
    started = time.perf_counter()
    result = await action()
    return (time.perf_counter() - started) * 1000, result
