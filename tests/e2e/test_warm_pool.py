"""The warm pool through the real MCP client: a create hands out a sandbox that was already
running, the operator sees the pool as nobody's, and a daemon that stops leaves none of it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from mcp.client import Client

from tests.e2e.conftest import call, serve, stop_daemon
from tests.e2e.leaks import machines_and_images, warm_pool

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

POOLED = "[sandboxes]\nmax_live = 4\n\n[pool]\nsize = 2\n"


async def test_a_create_hands_out_a_running_sandbox_and_a_stopped_daemon_leaves_no_pool(
    daemon_with_policies: Path, workdir: Path
) -> None:
    (daemon_with_policies / "pooled.toml").write_text(POOLED)
    before, images_before = await machines_and_images(with_pool=True)
    async with Client(serve("--policy-dir", str(daemon_with_policies), cwd=workdir)) as client:
        with anyio.fail_after(60):  # the shipped default's 2 and these 2, one being started at most
            while len(pooled := await warm_pool()) < 4:
                await anyio.sleep(0.1)
        running, _ = await machines_and_images(with_pool=True)
        assert len(pooled & running) >= 3
        assert (await call(client, "list_sandboxes"))["sandboxes"] == []  # the pool is nobody's
        created = await call(client, "create_sandbox", policy="pooled")
        assert created["sandbox_id"] in pooled  # it was running before the create
        ran = await call(client, "exec_in_sandbox", sandbox_id=created["sandbox_id"], command="echo ok")
        assert ran["stdout"] == "ok\n"
        cold = await call(
            client, "create_sandbox", policy="pooled", memory_mb=256
        )  # less than it started with
        assert cold["sandbox_id"] not in pooled
        assert {created["sandbox_id"], cold["sandbox_id"]}.isdisjoint(await warm_pool())
        for sandbox in (created, cold):
            await call(client, "destroy_sandbox", sandbox_id=sandbox["sandbox_id"])
    await anyio.to_thread.run_sync(stop_daemon)
    machines, images = await machines_and_images(with_pool=True)
    assert machines <= before  # the pool and its refills went with the daemon
    assert images <= images_before
