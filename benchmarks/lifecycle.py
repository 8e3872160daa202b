"""Create, first exec, exec and destroy: one at a time, in bursts, and sustained by several clients."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio
from mcp.client import Client

from .session import Bench, BenchError, call, timed

__all__ = ["Burst", "Sequential", "Sustained", "burst", "exec_true", "sequential", "sustained"]

TRUE = ["true"]


@dataclass
class Sequential:
    create_ms: list[float] = field(default_factory=list)
    first_exec_ms: list[float] = field(default_factory=list)
    """From the create call to the end of the first ``true``."""
    destroy_ms: list[float] = field(default_factory=list)


async def sequential(client: Client, policy: str, n: int, gap_s: float) -> Sequential:
    """``n`` rounds of create, ``true``, destroy, ``gap_s`` apart (an agent's pace; a pool refills)."""
    out = Sequential()
    for _ in range(n):
        started = time.perf_counter()
        sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
        created = time.perf_counter()
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=TRUE)
        ran = time.perf_counter()
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
        out.create_ms.append((created - started) * 1000)
        out.first_exec_ms.append((ran - started) * 1000)
        out.destroy_ms.append((time.perf_counter() - ran) * 1000)
        await anyio.sleep(gap_s)
    return out


async def exec_true(client: Client, policy: str, n: int) -> list[float]:
    """``n`` runs of ``true`` in one sandbox, after one warm-up run."""
    sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
    try:
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=TRUE)
        samples = []
        for _ in range(n):
            ms, _ = await timed(lambda: call(client, "exec_in_sandbox", sandbox_id=sandbox, command=TRUE))
            samples.append(ms)
        return samples
    finally:
        await call(client, "destroy_sandbox", sandbox_id=sandbox)


@dataclass
class Burst:
    first_exec_ms: list[float] = field(default_factory=list)
    wall_ms: float = 0.0
    failures: list[str] = field(default_factory=list)


async def burst(client: Client, policy: str, size: int) -> Burst:
    """``size`` creates sent at once on one session, each followed by ``true``; then all destroyed."""
    out = Burst()
    sandboxes: list[str] = []

    async def one() -> None:
        started = time.perf_counter()
        try:
            sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
            sandboxes.append(sandbox)
            await call(client, "exec_in_sandbox", sandbox_id=sandbox, command=TRUE)
        except BenchError as exc:
            out.failures.append(str(exc)[:200])
            return
        out.first_exec_ms.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    async with anyio.create_task_group() as group:
        for _ in range(size):
            group.start_soon(one)
    out.wall_ms = (time.perf_counter() - started) * 1000
    await destroy_all(client, sandboxes)
    return out


async def destroy_all(client: Client, sandboxes: list[str], at_once: int = 8) -> None:
    limiter = anyio.CapacityLimiter(at_once)

    async def one(sandbox: str) -> None:
        async with limiter:
            await call(client, "destroy_sandbox", sandbox_id=sandbox)

    async with anyio.create_task_group() as group:
        for sandbox in sandboxes:
            group.start_soon(one, sandbox)


@dataclass
class Sustained:
    creates: int
    seconds: float
    per_client: list[int]
    failures: int

    @property
    def per_second(self) -> float:
        return self.creates / self.seconds


async def sustained(bench: Bench, policy: str, clients: int, seconds: float) -> Sustained:
    """``clients`` stdio sessions in parallel, each creating and destroying in a loop for ``seconds``."""
    counts = [0] * clients
    failures = 0
    go = anyio.Event()

    async def loop(index: int) -> None:
        nonlocal failures
        async with bench.client() as client:
            await call(client, "list_sandboxes")  # the session is up before the clock starts
            await go.wait()
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                try:
                    sandbox = (await call(client, "create_sandbox", policy=policy))["sandbox_id"]
                except BenchError:
                    failures += 1
                    continue
                counts[index] += 1
                await call(client, "destroy_sandbox", sandbox_id=sandbox)

    started = 0.0
    async with anyio.create_task_group() as group:
        for index in range(clients):
            group.start_soon(loop, index)
        await anyio.sleep(3)  # the sessions start (each a serve process)
        started = time.perf_counter()
        go.set()
    return Sustained(sum(counts), time.perf_counter() - started, counts, failures)
