"""Snapshots and forks, measured by ``snapshots.py`` (its own owner) when the server offers them."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

from mcp.client import Client

__all__ = ["offered", "snapshots_and_forks"]

TOOL = "fork_sandbox"

BenchSnapshots = Callable[[Client], Awaitable[dict[str, list[float]]]]


async def offered(client: Client) -> bool:
    tools = await client.list_tools()
    return any(tool.name == TOOL for tool in tools.tools)


def _measure() -> BenchSnapshots | None:
    try:
        module: Any = importlib.import_module(f"{__package__}.snapshots")
    except ModuleNotFoundError:
        return None
    return cast(BenchSnapshots, module.bench_snapshots)


async def snapshots_and_forks(client: Client) -> dict[str, list[float]] | str:
    """``{"snapshot_ms": [...], "fork_ms": [...], "fork10_wall_ms": [...]}``, or why not measured."""
    if not await offered(client):
        return f"not offered (the server has no {TOOL} tool)"
    measure = _measure()
    if measure is None:
        return "benchmarks/snapshots.py is missing"
    return await measure(client)
