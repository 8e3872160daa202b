"""Destroy on the real daemons: nothing of the sandbox runs once it answers, its remains go right
behind it, and a daemon stopped in between leaves nothing after the next start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from nspawn_mcp.backend.nspawn import NspawnBackend
from nspawn_mcp.commands import CommandRequest
from nspawn_mcp.layout import Layout
from nspawn_mcp.naming import slice_unit
from nspawn_mcp.policy import CreateRequest, PolicySet
from nspawn_mcp.policy.loader import shipped_policy_dir
from nspawn_mcp.service import SandboxService
from tests.integration.conftest import HostView
from tests.waiting import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

_SIGKILL_BIT = 1 << (9 - 1)


def make_service(backend: NspawnBackend, records: Path) -> SandboxService:
    return SandboxService(
        backend, PolicySet.load([shipped_policy_dir()]), records_dir=records, cwd=str(records)
    )


@pytest.fixture
async def service(backend: NspawnBackend, tmp_path: Path) -> AsyncIterator[SandboxService]:
    """A service whose clean-up runs in the background, as the daemon's does."""
    served = make_service(backend, tmp_path / "records")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(served.run_cleanup)
        await anyio.wait_all_tasks_blocked()
        try:
            yield served
        finally:
            for sandbox in served.list():
                await served.destroy(sandbox.sandbox_id)
            with anyio.fail_after(30):
                await served.settled()
            tasks.cancel_scope.cancel()


def sandbox_pids(sandbox_id: str) -> set[int]:
    """Every process in the sandbox's slice, as the host numbers them (every cgroup below it)."""
    slice_dir = HostView.cgroup_file(f"nspawnmcp.slice/{slice_unit(sandbox_id)}", "pids", "", "")
    return {int(pid) for procs in slice_dir.rglob("cgroup.procs") for pid in procs.read_text().split()}


def can_still_run(pid: int) -> bool:
    """Whether process ``pid`` may still run code of its own: alive, not a zombie, no SIGKILL pending."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    status = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
    return not status["State"].startswith(("Z", "X")) and not pending & _SIGKILL_BIT


def remains(sandbox_id: str, host: HostView, layout: Layout) -> list[str]:
    found = []
    if (host.machines_dir / sandbox_id).exists():
        found.append("snapshot")
    if layout.sandbox_dir(sandbox_id).exists():
        found.append("directory")
    if HostView.cgroup_file(f"nspawnmcp.slice/{slice_unit(sandbox_id)}", "pids", "", "").exists():
        found.append("slice")
    return found


async def test_nothing_of_a_destroyed_sandbox_runs_when_destroy_returns(
    service: SandboxService, backend: NspawnBackend, host: HostView, layout: Layout
) -> None:
    sandbox = (await service.create(CreateRequest())).sandbox_id
    await service.start_background(sandbox, CommandRequest(["sh", "-c", "setsid sleep 600 & sleep 600"]))
    await wait_until(lambda: len(sandbox_pids(sandbox)) >= 6, what="nspawn, init, supervisor and 3 commands")
    pids = sandbox_pids(sandbox)
    assert all(can_still_run(pid) for pid in pids)  # control: the check sees them alive
    with anyio.fail_after(10):
        await service.destroy(sandbox)
    assert [pid for pid in pids if can_still_run(pid)] == []
    assert [pid for pid in sandbox_pids(sandbox) if can_still_run(pid)] == []  # none forked meanwhile
    # the rest goes right behind it
    with anyio.fail_after(30):
        await service.settled()
    assert remains(sandbox, host, layout) == []
    assert sandbox not in await backend.leftovers()


async def test_a_daemon_stopped_before_the_remains_went_leaves_nothing_after_restart(
    backend: NspawnBackend, tmp_path: Path, host: HostView, layout: Layout
) -> None:
    records = tmp_path / "records"
    first = make_service(backend, records)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(first.run_cleanup)
        await anyio.wait_all_tasks_blocked()
        doomed = (await first.create(CreateRequest())).sandbox_id
        kept = (await first.create(CreateRequest())).sandbox_id
        await first.destroy(doomed)
        tasks.cancel_scope.cancel()  # the daemon stops with the removal pending (or half done)
    assert (records / f"{doomed}.json").exists()  # the record that tells the next daemon

    second = make_service(backend, records)
    with anyio.fail_after(60):
        await second.reconcile()
    try:
        assert remains(doomed, host, layout) == []
        assert doomed not in await backend.leftovers() | await backend.running()
        assert [sandbox.sandbox_id for sandbox in second.list()] == [kept]
        assert not (records / f"{doomed}.json").exists()
    finally:
        await second.destroy(kept)
