"""Resources and logging through `nspawn-mcp serve` and the real daemon, as a client sees them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import LoggingMessageNotificationParams

from tests.e2e.conftest import CALL_TIMEOUT, call, serve

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_a_sandbox_resource_and_log_messages_over_the_daemon(box_lifetime: None, workdir: Path) -> None:
    heard: list[LoggingMessageNotificationParams] = []
    arrived = anyio.Event()

    async def on_log(params: LoggingMessageNotificationParams) -> None:
        heard.append(params)
        arrived.set()

    async def next_event() -> dict[str, Any]:
        nonlocal arrived
        with anyio.fail_after(CALL_TIMEOUT):
            while not heard:
                await arrived.wait()
                arrived = anyio.Event()
        data: dict[str, Any] = heard.pop(0).data
        return data

    async with Client(serve(cwd=workdir), mode="legacy", logging_callback=on_log) as client:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            await client.set_logging_level("info")
        sandbox = (await call(client, "create_sandbox"))["sandbox_id"]
        created = await next_event()
        assert (created["event"], created["sandbox_id"]) == ("created", sandbox)
        await call(client, "exec_in_sandbox", sandbox_id=sandbox, command="head -c 8M /dev/urandom > /root/x")
        with anyio.fail_after(CALL_TIMEOUT):
            read = await client.read_resource(f"sandbox://{sandbox}")
        status = json.loads(read.contents[0].text)  # type: ignore[union-attr]
        print(status["usage"])
        assert status["status"] == "running"
        assert status["usage"]["memory_mb"] > 0
        assert status["usage"]["cpu_seconds"] > 0
        assert status["usage"]["processes"] >= 1
        await call(client, "destroy_sandbox", sandbox_id=sandbox)
        destroyed = await next_event()
    assert (destroyed["event"], destroyed["sandbox_id"]) == ("destroyed", sandbox)
