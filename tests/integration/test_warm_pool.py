"""The warm pool on the real daemons: a pooled sandbox handed out takes the create's caps and
network, and no pooled sandbox outlives its daemon (stopped or killed)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.naming import machine_name, slice_unit
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import load_policy_text
from nspawn_mcp.pool import pool_specs
from nspawn_mcp.service import SandboxService
from tests.integration.conftest import HostView
from tests.integration.test_egress import probe
from tests.integration.test_sandbox_lifecycle import run
from tests.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

POOLED = """
[limits.max]
memory = "2GiB"
cpus = 2.0
processes = 1024
ttl_seconds = 86400
disk = "4GiB"

[pool]
size = 2
"""

EGRESS_POOLED = """
[network]
mode = "egress"
allow = [{ cidr = "198.18.0.4/32", ports = [8443] }]
upstream_dns = "198.18.0.2"
private_dns_answers = true

[pool]
size = 1
"""


@asynccontextmanager
async def pooled_service(
    backend: NspawnBackend, records: Path, text: str, *, crash: bool = False
) -> AsyncIterator[SandboxService]:
    """A service keeping ``text``'s pool filled; ``crash``: it ends as a killed daemon would (no stop)."""
    policies = PolicySet(
        {"default": load_policy_text("", "default.toml"), "pooled": load_policy_text(text, "pooled.toml")}
    )
    service = SandboxService(backend, policies, records_dir=records, pool=pool_specs(policies))
    await service.reconcile()
    size = pool_specs(policies)[0].size
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(service.pool.run)
        try:
            await wait_until(lambda: service.pool.ready() == size, timeout=60, what="the pool to fill")
            yield service
        finally:
            with anyio.CancelScope(shield=True):
                for sandbox in service.list():
                    await service.destroy(sandbox.sandbox_id)
                if not crash:
                    await service.pool.stop()
            tasks.cancel_scope.cancel()


async def machines(backend: NspawnBackend) -> set[str]:
    return {machine.name for machine in await backend.machined.list_machines()}


async def test_a_handed_out_sandbox_takes_the_creates_caps_and_runs_commands(
    backend: NspawnBackend, tmp_path: Path
) -> None:
    async with pooled_service(backend, tmp_path / "records", POOLED) as service:
        pooled = await machines(backend)
        info = await service.create(
            CreateRequest(policy="pooled", memory_mb=768, cpus=0.5, max_processes=48, disk_mb=1024)
        )
        assert machine_name(info.sandbox_id) in pooled  # served from the pool, not started
        slice_path = f"nspawnmcp.slice/{slice_unit(info.sandbox_id)}"
        memory = HostView.cgroup_file(slice_path, "memory", "memory.limit_in_bytes", "memory.max")
        pids = HostView.cgroup_file(slice_path, "pids", "pids.max", "pids.max")
        quota = HostView.cgroup_file(slice_path, "cpu", "cpu.cfs_quota_us", "cpu.max")
        assert int(memory.read_text()) == 768 << 20
        assert int(pids.read_text()) == 48
        assert quota.read_text().split()[0] == "50000"
        control = await run(backend, info.sandbox_id, "head -c 10M /dev/zero > /small; sync; echo $?")
        assert control.stdout == b"0\n"
        outcome = await run(backend, info.sandbox_id, "head -c 1500M /dev/zero > /big", timeout=120)
        assert b"Disk quota exceeded" in outcome.stderr  # its new 1 GiB cap (the pool's was 4 GiB)
        await wait_until(lambda: service.pool.ready() == 2, timeout=60, what="the refill")


async def test_a_stopped_pool_leaves_no_sandbox(backend: NspawnBackend, tmp_path: Path) -> None:
    before = await machines(backend)
    async with pooled_service(backend, tmp_path / "records", POOLED) as service:
        pooled = await machines(backend) - before
        assert len(pooled) == 2
    assert await machines(backend) == before
    names = {image.name for image in await backend.machined.list_images()}
    assert not names & pooled
    del service


async def test_the_next_daemon_removes_the_pool_of_one_that_was_killed(
    backend: NspawnBackend, tmp_path: Path
) -> None:
    before = await machines(backend)
    async with pooled_service(backend, tmp_path / "records", POOLED, crash=True):
        pooled = await machines(backend) - before
    assert await machines(backend) >= pooled  # the killed daemon left them running
    successor = SandboxService(
        backend,
        PolicySet({"default": load_policy_text("", "default.toml")}),
        records_dir=tmp_path / "records",
    )
    await successor.reconcile()
    assert not await machines(backend) & pooled
    names = {image.name for image in await backend.machined.list_images()}
    assert not names & pooled


async def test_a_pooled_egress_sandbox_gets_its_network_at_hand_out(
    egress_backend: NspawnBackend, outside: Path, tmp_path: Path
) -> None:
    async with pooled_service(egress_backend, tmp_path / "records", EGRESS_POOLED) as service:
        pooled = await machines(egress_backend)
        info = await service.create(CreateRequest(policy="pooled"))
        assert machine_name(info.sandbox_id) in pooled
        results = await probe(
            egress_backend,
            info.sandbox_id,
            [{"host": "198.18.0.4", "port": 8443}, {"host": "198.18.0.3", "port": 8443}],
        )
        assert results == ["hello from 198.18.0.4:8443", "error: TimeoutError"]
