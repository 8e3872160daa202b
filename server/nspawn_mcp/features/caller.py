"""Who is asking: the one rule of the tools (the connection's identity, the rate limit), for
requests that are not tool calls (resources, completions, logging/setLevel)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from ..errors import SandboxError
from ..identity import Client, current_client

__all__ = ["Guard", "as_caller", "calling_client"]

T = TypeVar("T")

Guard = Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]
"""The tools' error boundary (``app._agent_errors``): settles the calling client in
:data:`current_client` and admits the call through its rate limit; turns our errors into
``ToolError`` and anything else into a logged reference."""


def as_caller(guard: Guard) -> Callable[[Callable[[], Awaitable[T]]], Awaitable[T]]:
    """Run work as the calling client, through ``guard``; our own errors come out as they are
    (so that each kind of request can say them its own way), the guard's refusals as ToolError."""

    async def run(work: Callable[[], Awaitable[T]]) -> T:
        caught: list[SandboxError] = []

        async def settled() -> T | None:
            try:
                return await work()
            except SandboxError as exc:
                caught.append(exc)
                return None

        settled.__name__ = getattr(work, "__name__", "request")
        result = await guard(settled)()
        if caught:
            raise caught[0]
        return cast(T, result)

    return run


async def calling_client() -> Client:
    """The client a guarded request runs as."""
    return current_client.get()
