"""Density: host memory each of N idle sandboxes, as (MemAvailable before - after) / N once settled."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import anyio
from mcp.client import Client

from .lifecycle import destroy_all
from .session import call

__all__ = ["Density", "density"]

_MiB = 1 << 20


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


@dataclass(frozen=True)
class Density:
    n: int
    before: int
    after: int
    create_s: float

    @property
    def mib_each(self) -> float:
        return (self.before - self.after) / self.n / _MiB


async def _settled_memory(readings: int = 3) -> int:
    await anyio.sleep(3)
    samples = []
    for _ in range(readings):
        samples.append(available_memory())
        await anyio.sleep(1)
    return int(statistics.median(samples))


async def density(client: Client, policy: str, n: int, at_once: int = 4) -> Density:
    """Create ``n`` idle sandboxes (``at_once`` at a time), read the memory they hold, destroy them."""
    before = await _settled_memory()
    sandboxes: list[str] = []
    limiter = anyio.CapacityLimiter(at_once)

    async def one() -> None:
        async with limiter:
            sandboxes.append((await call(client, "create_sandbox", policy=policy))["sandbox_id"])

    started = anyio.current_time()
    try:
        async with anyio.create_task_group() as group:
            for _ in range(n):
                group.start_soon(one)
        create_s = anyio.current_time() - started
        after = await _settled_memory()
    finally:
        with anyio.CancelScope(shield=True):
            await destroy_all(client, sandboxes)
    return Density(n, before, after, create_s)
